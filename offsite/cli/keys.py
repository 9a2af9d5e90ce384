"""`offsite client keys`: the data owner's signing key and secret salt.

``register_keys(client_subparsers)`` is called by the ``client`` role parser. The private key and
salt are never printed or logged: only their paths and the public key fingerprint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from offsite.cli import client_service
from offsite.cli.ui import console, print_json, warn


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
        "salt (mode 0600), as one unit: a new generation DIR/keys/gen-*/ is written and fsynced whole, then "
        "made current by one atomic rename of DIR/keys/CURRENT, so a crash leaves the old set or the new "
        "one, never a mix (and loading refuses a public key that is not the private key's). Refuses to "
        "replace existing keys unless --force. With --force and budget histories in DIR/budgets (they "
        "depend on the salt, which keys their datasets' fingerprints, and on the record-hash key beside "
        "them), say what to do with them: --keep-salt replaces only the signing key; --discard-histories "
        "replaces the salt too and moves the histories aside, no longer enforced. The record-hash key is "
        "never replaced while histories are in force.",
    )
    p.add_argument(
        "--dir", "--keys-dir", dest="dir", type=Path, default=None, help=client_service.KEYS_DIR_HELP
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace existing keys (receipts signed with the old key will no longer verify against the "
        "new one; a new salt changes every dataset fingerprint)",
    )
    p.add_argument(
        "--keep-salt",
        action="store_true",
        help="with --force: replace only the signing key; the salt, the budget histories and the "
        "record-hash key stay as they are and in force",
    )
    p.add_argument(
        "--discard-histories",
        action="store_true",
        help="with --force: replace the salt too, and move every budget history, record hash and the "
        "record-hash key to DIR/budgets.discarded-TIME/. They are kept but NO LONGER ENFORCED: the budget "
        "spent on every dataset is forgotten on this machine, so later runs on the same data start from "
        "zero (receipts already published still state what was spent)",
    )
    p.add_argument("--json", action="store_true", help="print paths and fingerprint as JSON")
    p.set_defaults(func=cmd_keys_init)
    client_service.register_keys(cmds)

    p = cmds.add_parser(
        "show",
        help="show where the public key is and its fingerprint",
        description="The public key in force (the file to give whoever audits your receipts) and its "
        "sha256 fingerprint. Checks that it is the private key's.",
    )
    p.add_argument(
        "--dir", "--keys-dir", dest="dir", type=Path, default=None, help=client_service.KEYS_DIR_HELP
    )
    p.add_argument("--json", action="store_true", help="print paths and fingerprint as JSON")
    p.set_defaults(func=cmd_keys_show)


def _directory(args: argparse.Namespace) -> Path:
    if args.dir is not None:
        return args.dir
    from offsite import state

    return state.client_dir()


def _describe(paths) -> dict:
    from offsite import crypto

    return {
        "private_key": str(paths.private_key),
        "public_key": str(paths.public_key),
        "salt": str(paths.salt),
        "public_key_fingerprint": crypto.public_key_fingerprint(crypto.load_public_key(paths.public_key)),
    }


def cmd_keys_init(args: argparse.Namespace) -> int:
    from offsite import crypto

    paths = crypto.init_client_keys(
        _directory(args),
        force=args.force,
        keep_salt=args.keep_salt,
        discard_histories=args.discard_histories,
    )
    info = _describe(paths)
    info["discarded_histories"] = str(paths.discarded_histories) if paths.discarded_histories else None
    info |= client_service.after_keys_init(Path(_directory(args)), force=args.force)
    if getattr(args, "json", False):
        print_json(info)
        return 0
    console.print("[green]signing key created[/green]")
    console.print(
        f"  private key  {paths.private_key}  (mode 0600; keep it secret, never share it)", soft_wrap=True
    )
    console.print(
        f"  public key   {paths.public_key}  (give this to whoever audits your receipts)", soft_wrap=True
    )
    console.print(f"  secret salt  {paths.salt}  (mode 0600; keys dataset fingerprints)", soft_wrap=True)
    console.print(f"  public key fingerprint  sha256:{info['public_key_fingerprint']}", soft_wrap=True)
    console.print(f"  TLS key      {info['tls_key']}  (mode 0600; for the owner's server)", soft_wrap=True)
    console.print(
        f"  enrolment request  {info['enrolment_request']}  (send it to the model owner to enrol)",
        soft_wrap=True,
    )
    if paths.discarded_histories:
        warn(
            f"budget histories moved to {paths.discarded_histories}: they are no longer enforced, and the "
            "budget spent on every dataset is forgotten on this machine"
        )
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    from offsite import crypto

    directory = _directory(args)
    crypto.load_client_keys(directory)  # refuses a set whose files do not belong together
    info = _describe(crypto.KeyPaths.in_dir(directory))
    if args.json:
        print_json(info)
        return 0
    console.print(f"public key   {info['public_key']}", soft_wrap=True)
    console.print(f"fingerprint  sha256:{info['public_key_fingerprint']}", soft_wrap=True)
    return 0
