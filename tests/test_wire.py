"""The committed generated code is what the proto and the pinned grpcio-tools produce today."""

from __future__ import annotations

from pathlib import Path

import pytest

from offsite.wire import generate, transport
from offsite.wire.v1 import offsite_pb2

pytest.importorskip("grpc_tools")


def test_committed_code_is_fresh(tmp_path):
    fresh = generate.generate(tmp_path)
    for path in fresh:
        committed = generate.OUT_DIR / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run `python -m offsite.wire.generate` and commit the result"
        )


def test_a_changed_proto_is_detected(tmp_path, monkeypatch):
    proto = tmp_path / "offsite" / "v1"
    proto.mkdir(parents=True)
    text = (generate.PROTO_DIR / generate.PROTO_NAME).read_text()
    (proto / generate.PROTO_NAME).write_text(text.replace("uint64 file_size = 4;", "uint64 file_size = 5;"))
    monkeypatch.setattr(generate, "PROTO_DIR", proto)
    fresh = generate.generate(tmp_path / "out")
    assert (tmp_path / "out" / "offsite_pb2.py").read_bytes() != (
        generate.OUT_DIR / "offsite_pb2.py"
    ).read_bytes()
    assert all(p.exists() for p in fresh)


def test_the_proto_package_is_versioned():
    assert offsite_pb2.DESCRIPTOR.package == "offsite.v1"
    assert "OffsiteService" in offsite_pb2.DESCRIPTOR.services_by_name


def test_a_full_chunk_fits_in_a_message_on_both_sides():
    chunk = offsite_pb2.WriteSubmissionRequest(
        submission_id="x" * 64, offset=2**62, data=b"\0" * transport.MAX_CHUNK_BYTES, sha256="0" * 64
    )
    assert chunk.ByteSize() < transport.MAX_MESSAGE_BYTES
    for options in (transport.server_options(), transport.channel_options()):
        limits = dict(options)
        assert limits["grpc.max_receive_message_length"] == transport.MAX_MESSAGE_BYTES
        assert limits["grpc.max_send_message_length"] == transport.MAX_MESSAGE_BYTES
    assert transport.CHUNK_BYTES <= transport.MAX_CHUNK_BYTES
    assert Path(generate.PROTO_DIR / generate.PROTO_NAME).is_file()


def test_remembered_chunk_hashes_are_bounded_and_reused(tmp_path):
    import hashlib

    from offsite.server.transfer import ChunkHashes, read_chunks

    data = bytes(range(256)) * 40  # 10240 bytes: chunks of 4096, 4096, 2048
    path = tmp_path / "f"
    path.write_bytes(data)
    hashes = ChunkHashes(max_chunks=4)
    table = hashes.of("f", 4096)
    with open(path, "rb") as f:
        first = list(read_chunks(f, 0, 4096, known=table))
    assert [c.sha256 for c in first] == [
        hashlib.sha256(data[i : i + 4096]).hexdigest() for i in (0, 4096, 8192)
    ]
    assert table == {0: first[0].sha256, 1: first[1].sha256, 2: first[2].sha256}
    with open(path, "rb") as f:  # a resumed download: the first, unaligned chunk is hashed, not looked up
        resumed = list(read_chunks(f, 100, 4096, known=table))
    assert [c.offset for c in resumed] == [100, 4096, 8192] and len(resumed[0].data) == 3996
    assert resumed[0].sha256 == hashlib.sha256(data[100:4096]).hexdigest() and len(table) == 3
    assert hashes.of("f", 4096) is table and hashes.of("f", 2048) is not table  # per chunk size
    other = hashes.of("g", 4096)
    other.update({0: "a", 1: "b"})  # 5 hashes held, more than 4: the least recently used file goes
    assert hashes.of("g", 4096) is other
    assert hashes.of("f", 4096) == {}
