"""Where each role keeps its state on disk: the one module that knows the default directories.

Core library calls never look these up themselves; they take explicit directories. The front end
(``offsite.cli``) and the two sides (``offsite.client``, ``offsite.server``) call
the functions below to fill in what the user did not pass.

``OFFSITE_CLIENT_DIR`` (data owner)
    Default: the user config directory ``offsite/client``. Signing key, dataset salt, budget
    histories, the TLS key, the enrolment request and package (``offsite.client.identity``).
``OFFSITE_OWNER_DIR`` (model owner)
    Default: the user data directory ``offsite/owner``. The server's state: CA, certificates,
    signing key, the database (record of issued bundles, clients, jobs, submissions) and stored
    files (``offsite.server.owner_state``).
``OFFSITE_CACHE_DIR``
    Default: the user cache directory ``offsite``. The demo's pretrained model.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

CLIENT_ENV = "OFFSITE_CLIENT_DIR"
OWNER_ENV = "OFFSITE_OWNER_DIR"
CACHE_ENV = "OFFSITE_CACHE_DIR"


def client_dir() -> Path:
    """The data owner's credentials and budget histories (``$OFFSITE_CLIENT_DIR`` overrides)."""
    env = os.environ.get(CLIENT_ENV)
    return Path(env) if env else Path(platformdirs.user_config_dir("offsite")) / "client"


def owner_dir() -> Path:
    """The model owner's state (``$OFFSITE_OWNER_DIR`` overrides)."""
    env = os.environ.get(OWNER_ENV)
    return Path(env) if env else Path(platformdirs.user_data_dir("offsite")) / "owner"


def cache_dir() -> Path:
    """Rebuildable caches such as the demo model (``$OFFSITE_CACHE_DIR`` overrides)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path(platformdirs.user_cache_dir("offsite"))


def demo_cache_dir() -> Path:
    """The demo's cache: its pretrained model owner and the reference rows' scores."""
    return cache_dir() / "demo"
