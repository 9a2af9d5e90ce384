"""The model owner's state directory (``--state STATE``, default ``$OFFSITE_OWNER_DIR``)::

    STATE/
      ca/ca.pem                 the owner's CA certificate (clients trust it; the server checks clients by it)
      ca/ca.key                 its private key, 0600: needed by `owner enrol` only, never by `serve`
      tls/server.pem, .key      the server's certificate (SAN = --server-name) and key (0600)
      signing/                  the owner's Ed25519 key (0600) that signs bundle manifests, and its public key
      server.json               server name and port (the address written into enrolment packages)
      offsite.db                SQLite: clients, issued bundles, jobs, nonces, submissions and the privacy
                                ledger (storage.sqlite; the ledger's format: offsite.formats.ledger)
      blobs/sha256/ab/…         content-addressed files: published bundle files, accepted adapters
      uploads/<submission>/     partial uploads (never served, never plugged)

``offsite owner init`` makes the keys and certificates and opens the ledger; the database and file stores
are made on first use, so ``offsite owner prepare`` can record issued bundles before (or without)
``owner init``. Everything the ledger records needs the signing key, so it needs an initialised state.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from offsite import crypto, pki
from offsite.errors import FormatError, OffsiteError
from offsite.fileio import canonical_json, write_bytes_atomic
from offsite.formats import signing
from offsite.formats.ledger import STATE_DB_FILE
from offsite.server.ledger import LedgerWriter
from offsite.server.storage.base import Storage
from offsite.server.storage.blobs import BlobStore, UploadArea
from offsite.server.storage.sqlite import SQLiteStorage

DEFAULT_PORT = 50051


@dataclass(frozen=True)
class OwnerPaths:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "tls" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "tls" / "server.key"

    @property
    def signing_dir(self) -> Path:
        return self.root / "signing"

    @property
    def signing_key(self) -> Path:
        return self.signing_dir / signing.OWNER_PRIVATE_KEY

    @property
    def signing_public_key(self) -> Path:
        return self.signing_dir / signing.OWNER_PUBLIC_KEY

    @property
    def server_config(self) -> Path:
        return self.root / "server.json"

    @property
    def db(self) -> Path:
        return self.root / STATE_DB_FILE

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"


@dataclass(frozen=True)
class ServerConfig:
    server_name: str
    port: int

    @property
    def address(self) -> str:
        host = f"[{self.server_name}]" if ":" in self.server_name else self.server_name
        return f"{host}:{self.port}"


def init_owner(root: str | os.PathLike, server_name: str, port: int = DEFAULT_PORT) -> OwnerPaths:
    """Make the CA, the server's certificate for ``server_name``, the signing key and the database."""
    paths = OwnerPaths(Path(root))
    pki.server_san(server_name)  # refuse a bad name before anything is written
    if not 0 < port < 65536:
        raise OffsiteError(f"--port {port}: not a TCP port")
    existing = [
        p for p in (paths.ca_cert, paths.ca_key, paths.server_config, paths.signing_key) if p.exists()
    ]
    if existing:
        raise OffsiteError(
            f"{paths.root} is initialised already ({existing[0]} exists); refusing to replace the owner's "
            "CA and keys (every enrolled client trusts them)"
        )
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key, ca_cert = pki.make_ca(f"offsite owner CA ({server_name})")
    pki.write_secret(paths.ca_key, pki.key_pem(ca_key))
    write_bytes_atomic(paths.ca_cert, pki.cert_pem(ca_cert))
    server_key = pki.new_key()
    pki.write_secret(paths.server_key, pki.key_pem(server_key))
    write_bytes_atomic(
        paths.server_cert, pki.cert_pem(pki.issue_server_cert(ca_key, ca_cert, server_key, server_name))
    )
    signing.init_owner_signing_key(paths.signing_dir)
    write_bytes_atomic(paths.server_config, canonical_json({"server_name": server_name, "port": port}))
    with OwnerState(paths.root) as state:
        state.ledger.open()
    return paths


def read_server_config(paths: OwnerPaths) -> ServerConfig:
    try:
        doc = json.loads(paths.server_config.read_text())
        return ServerConfig(str(doc["server_name"]), int(doc["port"]))
    except FileNotFoundError:
        raise OffsiteError(
            f"{paths.root} is not initialised: run `offsite owner init --state {paths.root} --server-name NAME`"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{paths.server_config}: malformed ({e})") from None


def open_storage(paths: OwnerPaths) -> Storage:
    """The one place that chooses the storage backend."""
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return SQLiteStorage(paths.db)


class OwnerState:
    """Records, file store and upload area of one state directory; close it (or use ``with``)."""

    def __init__(self, root: str | os.PathLike):
        self.paths = OwnerPaths(Path(root))
        self.storage = open_storage(self.paths)
        self.blobs = BlobStore(self.paths.blobs)
        self.uploads = UploadArea(self.paths.uploads)
        self._ledger: LedgerWriter | None = None

    @property
    def ledger(self) -> LedgerWriter:
        """The ledger's writer, with the owner's signing key (read on first use)."""
        if self._ledger is None:
            if not self.paths.signing_key.is_file():
                raise OffsiteError(
                    f"{self.paths.root} has no signing key ({self.paths.signing_key}): the ledger needs an "
                    f"initialised state (`offsite owner init --state {self.paths.root} --server-name NAME`)"
                )
            self._ledger = LedgerWriter(self.storage, crypto.load_private_key(self.paths.signing_key))
        return self._ledger

    def close(self) -> None:
        self.storage.close()

    def __enter__(self) -> OwnerState:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
