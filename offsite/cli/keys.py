"""`offsite client keys`: the data owner's signing key and secret salt.

``register_keys(client_subparsers)`` is called by the ``client`` role parser. The private key and
salt are never printed or logged: only their paths and the public key fingerprint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from offsite.cli import client_service
from offsite.cli.ui import console, print_json


def register_keys(client_subparsers: argparse._SubParsersAction) -> None:
    keys = client_subparsers.add_parser(
        "keys",
        help="manage this data owner's signing key",
        description="The Ed25519 key that signs privacy receipts, and the secret salt of dataset fingerprints.",
    )
    cmds = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    p = cmds.add_parser(
        "init",
        help="create the signing key, public key and secret salt",
        description="Create an Ed25519 signing key (PEM, mode 0600), its public key and a 32-byte secret "
        "salt (mode 0600). Refuses to replace existing ones unless --force.",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to put them (default: the data owner's config directory, or $OFFSITE_CLIENT_DIR)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace existing keys (old receipts will no longer verify against the new key)",
    )
    p.add_argument("--json", action="store_true", help="print paths and fingerprint as JSON")
    p.set_defaults(func=cmd_keys_init)
    client_service.register_keys(cmds)


def cmd_keys_init(args: argparse.Namespace) -> int:
    from offsite import crypto

    directory = args.dir
    if directory is None:
        from offsite import state

        directory = state.client_dir()
    paths = crypto.init_client_keys(directory, force=args.force)
    fingerprint = crypto.public_key_fingerprint(crypto.load_public_key(paths.public_key))
    info = {
        "private_key": str(paths.private_key),
        "public_key": str(paths.public_key),
        "salt": str(paths.salt),
        "public_key_fingerprint": fingerprint,
    }
    info |= client_service.after_keys_init(Path(directory), force=args.force)
    if getattr(args, "json", False):
        print_json(info)
        return 0
    console.print("[green]signing key created[/green]")
    console.print(f"  private key  {paths.private_key}  (mode 0600; keep it secret, never share it)")
    console.print(f"  public key   {paths.public_key}  (give this to whoever audits your receipts)")
    console.print(f"  secret salt  {paths.salt}  (mode 0600; keys dataset fingerprints)")
    console.print(f"  public key fingerprint  sha256:{fingerprint}")
    console.print(f"  TLS key      {info['tls_key']}  (mode 0600; for the owner's server)")
    console.print(f"  enrolment request  {info['enrolment_request']}  (send it to the model owner to enrol)")
    return 0
