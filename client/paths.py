"""Where the data owner's private material lives on its machine."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def default_client_dir() -> Path:
    """The data owner's credentials directory: signing key, salt, budget history.

    ``OFFSITE_CLIENT_DIR`` overrides it (tests, several identities on one machine).
    The gRPC client's credentials will live here too.
    """
    env = os.environ.get("OFFSITE_CLIENT_DIR")
    return Path(env) if env else Path(platformdirs.user_config_dir("offsite")) / "client"
