"""The data owner's kept checkpoints (``offsite.client.checkpoints``): each is verified with the owner key
before it is kept, and one that contradicts a checkpoint kept before (another head at the same index of
the same ledger, or another ledger under the same owner key) is kept as evidence and reported as a fork."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ledger_kit import checkpoint_at, enrol, grant, new_owner

from offsite.client import checkpoints
from offsite.errors import IntegrityError
from offsite.formats import ledger as fmt
from offsite.privacy.ledger_audit import audit_ledger
from offsite.server.owner_state import OwnerState
from offsite.server.storage.base import utc_now


def test_a_forked_checkpoint_is_kept_and_reported(tmp_path):
    state_dir = new_owner(tmp_path / "owner")
    with OwnerState(state_dir) as state:
        enrol(state, "alice")
        grant(state, "alice", "clinic", 3.5)
        key, pub = state.ledger.key, state.ledger.key.public_key()
        honest = [checkpoint_at(state, i) for i in (1, 2)]
        ledger_id = state.storage.ledger_rows()[0].hash
    keys = tmp_path / "alice"
    for data in honest:  # successive heads of one ledger: no conflict
        assert checkpoints.store(keys, data, pub).is_file()
    assert checkpoints.store(keys, honest[0], pub).is_file()  # the same one again: nothing new
    with pytest.raises(IntegrityError):  # not the owner's: refused, not kept
        checkpoints.store(
            keys, fmt.make_checkpoint(Ed25519PrivateKey.generate(), ledger_id, 2, "0" * 64, utc_now()), pub
        )
    assert len(checkpoints.stored(keys)) == 2

    rewritten = fmt.make_checkpoint(key, ledger_id, 2, "f" * 64, utc_now())
    with pytest.raises(
        checkpoints.LedgerForkError, match="signed entry 2 with hash ffffffffffffffff… now"
    ) as info:
        checkpoints.store(keys, rewritten, pub)
    assert info.value.path.read_bytes() == rewritten and len(checkpoints.stored(keys)) == 3
    report = audit_ledger(state_dir, owner_pubkey=pub, checkpoints=checkpoints.directory(keys))
    assert report.first_bad.kind == "forked"  # what was kept is what an auditor needs

    other_keys = tmp_path / "bob"
    checkpoints.store(other_keys, honest[1], pub)
    restarted = fmt.make_checkpoint(key, "e" * 64, 0, "e" * 64, utc_now())
    with pytest.raises(checkpoints.LedgerForkError, match="the ledger was started again"):
        checkpoints.store(other_keys, restarted, pub)
