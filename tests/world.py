"""A small, real deployment for the service tests: an owner state with its PKI, a published bundle of a
tiny GPT-2, enrolled data owners, and a DP adapter trained by one of them (real Opacus, real receipt).

Built once per test session (``world`` fixture in conftest.py); tests copy what they change.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tiny import WORDS, make_tiny_checkpoint

from offsite import crypto
from offsite.client import identity
from offsite.client.transfers import OffsiteClient
from offsite.prepare import PrepareOptions, prepare
from offsite.server import admin
from offsite.server.owner_state import OwnerState, init_owner
from offsite.tune import TuneOptions, tune
from offsite.wire import transport
from offsite.wire.v1 import offsite_pb2_grpc

SERVER_NAME = "localhost"


@dataclass
class World:
    root: Path
    owner: Path
    model: Path
    bundle: Path
    bundle_id: str
    data: Path
    clients: dict[str, Path] = field(default_factory=dict)
    adapter: Path | None = None  # alice's DP adapter for the bundle

    def credentials(self, client: str) -> identity.Credentials:
        return identity.load_credentials(self.clients[client])

    def client(self, name: str, port: int, **kw) -> OffsiteClient:
        return OffsiteClient(self.credentials(name), self.clients[name], f"127.0.0.1:{port}", **kw)

    def stub(self, name: str, port: int) -> tuple[grpc.Channel, offsite_pb2_grpc.OffsiteServiceStub]:
        from offsite.client.connection import open_channel, stub

        channel = open_channel(self.credentials(name), f"127.0.0.1:{port}")
        return channel, stub(channel)

    def enrol(self, name: str) -> Path:
        keys = self.root / "clients" / name
        crypto.init_client_keys(keys)
        request = identity.write_request(keys)
        with OwnerState(self.owner) as state:
            admin.enrol(state, request.read_bytes(), name, self.root / "packages" / name, "request")
        identity.install(keys, self.root / "packages" / name)
        self.clients[name] = keys
        return keys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_data(path: Path, n: int = 80, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            record = {
                "prompt": " ".join(rng.choices(WORDS, k=4)),
                "completion": " ".join(rng.choices(WORDS, k=2)),
            }
            f.write(json.dumps(record) + "\n")
    return path


def train_adapter(
    world: World, client: str, out: Path, bundle: Path | None = None, dataset: str = "ds1"
) -> Path:
    keys = world.clients[client]
    opts = TuneOptions(
        epochs=1,
        batch_size=16,
        eval_fraction=0.0,
        dataset_id=dataset,
        epsilon=8.0,
        keys_dir=keys,
        budget_dir=keys,
        bundle_owner_key=identity.owner_key(keys),
    )
    tune(bundle or world.bundle, world.data, out, opts)
    return out


def build_world(root: Path) -> World:
    model = make_tiny_checkpoint(root / "model", "gpt2", layers=4, hidden=32)
    bundle = root / "bundle"
    result = prepare(model, bundle, PrepareOptions(adapter_bottom=1, adapter_top=1))
    owner = root / "owner"
    init_owner(owner, SERVER_NAME, 50051)
    world = World(root, owner, model, bundle, result.bundle_id, training_data(root / "train.jsonl"))
    for name in ("alice", "bob"):
        world.enrol(name)
    with OwnerState(owner) as state:
        admin.record_bundle(state, bundle)
        admin.publish(state, bundle, job_id="j1", clients=["alice"], max_epsilon=50, max_delta=1e-3)
        admin.publish(state, bundle, job_id="j2", clients=["bob"], max_epsilon=50, max_delta=1e-3)
        admin.publish(state, bundle, job_id="strict", clients=["alice"], max_epsilon=0.5, max_delta=1e-3)
        admin.publish(
            state,
            bundle,
            job_id="open",
            clients=["alice", "bob"],
            max_epsilon=50,
            max_delta=1e-3,
            allow_no_dp=True,
        )
        # The ledger counts a DP submission only under a grant for its (client, dataset).
        admin.grant(state, "alice", "ds1", epsilon=50, delta=1e-3)
        admin.grant(state, "bob", "ds1", epsilon=50, delta=1e-3)
    # alice trains on the bundle as fetched over the wire would be: signed by the owner
    signed = root / "bundle-signed"
    shutil.copytree(bundle, signed)
    with OwnerState(owner) as state:
        (signed / "manifest.sig").write_bytes(state.storage.get_bundle(world.bundle_id).signature)
    world.adapter = train_adapter(world, "alice", root / "adapter-alice", bundle=signed)
    return world


def copy_state(world: World, dest: Path) -> Path:
    """A private copy of the owner's state (for tests that kill, revoke or fill it)."""
    shutil.copytree(world.owner, dest)
    return dest


def wait_serving(port: int, timeout: float = 30.0) -> None:
    """Until the server's health service answers (plaintext health is not served: use TLS-less probe)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port}")


__all__ = ["World", "build_world", "copy_state", "free_port", "train_adapter", "transport", "wait_serving"]


class ServerProcess:
    """``offsite serve`` as a separate process (so it can be killed with SIGKILL and restarted)."""

    def __init__(self, state: Path, port: int, *extra: str):
        import os
        import sys

        self.state, self.port, self.extra = state, port, extra
        self.cmd = [
            sys.executable,
            "-m",
            "offsite.cli.main",
            "serve",
            "--state",
            str(state),
            "--host",
            "127.0.0.1",
        ]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = None
        self.output: list[str] = []

    def start(self, timeout: float = 60.0) -> ServerProcess:
        import subprocess
        import threading

        self.proc = subprocess.Popen(
            [*self.cmd, "--port", str(self.port), *self.extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )
        ready = threading.Event()

        def pump(proc=self.proc):
            for line in proc.stdout:
                self.output.append(line)
                if line.startswith("serving on"):
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout):
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.output))
        return self

    def kill(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        import signal

        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except Exception:
                self.proc.kill()
                raise
        return self.proc.returncode if self.proc else 0
