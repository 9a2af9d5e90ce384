"""Benchmark: how fast the owner's server moves bundles and adapters, next to a bare gRPC stream.

    python benchmarks/bench_transfer.py                 # 1 GiB bundle file, 235 MiB adapter, 3 rounds
    python benchmarks/bench_transfer.py --quick         # 64 MiB / 6 MiB, 1 round: a smoke run (~25 s)
    python benchmarks/bench_transfer.py --json out.json

Everything runs on loopback with real mutual TLS, in one run, interleaved:

* **offsite**: ``offsite serve`` as its own process on a fresh owner state (tests/world.py's
  ``ServerProcess``), with one enrolled data owner (its own certificate) and two published jobs: a real
  tiny bundle whose emulator weights file is padded to ``--size-mib`` (tests/big.py ``padded_bundle``),
  and a bundle whose adapter is two whole 1600-wide GPT-2 blocks (``wide_bundle``, 235 MiB; only a job
  of such a bundle accepts an adapter that large). The client is ``offsite.client`` in this process.
* **bare**: this script with ``--bare-server``, its own process: a minimal gRPC service (generic
  handlers, raw bytes, no protobuf) with the same server certificate, client-certificate check, CA,
  thread pool and channel options (``offsite.wire.transport``), streaming the same bytes (the same
  file, read into memory when it starts) in chunks of the same size: no hashing, no disk.

Measured, per round (the order of offsite and bare alternates between rounds):

* **download**: ``OffsiteClient._download`` of the padded file: chunks from disk on the server, each
  chunk's sha256 checked by the client, written to disk, the whole file's sha256 checked, renamed
  into place. Bare: the same number of bytes counted. Also **fetch**: the whole ``offsite client
  fetch`` path (list jobs, the manifest's signature, every file, and ``Bundle.open``'s private copy
  with every hash checked again before the bundle appears).
* **upload**: one stream of the adapter's files, chunks hashed by the client as ``offsite.client``
  does, checked by the server chunk by chunk and file by file, written and fsynced (the server answers
  with the committed size only once the bytes are durable). Bare: the same bytes, counted. Then
  **decide**: the ``finish_write`` that runs the server's checks (safetensors, tensor table, finite
  values) and stores the files; and **submit**: ``OffsiteClient.submit`` end to end.
* **time to first byte**: from the call to the first chunk in hand (median of 20 calls).
* **small calls**: sequential round trips per second of ``ListJobs`` and ``GetSubmission`` against a
  bare unary echo of 64 bytes (same channel settings, one connection).
* **memory**: the server's ``RssAnon`` (``/proc/PID/status``) sampled every 10 ms during the download,
  over its idle value after a warm-up.

Wall times on a shared machine move with other jobs: compare the ratios within a run, and see
``cpu s/GiB`` (the server's and the client's CPU time per GiB moved, from ``/proc``), which depends far
less on the load.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # world.py, big.py and tiny.py: the tests' real set-up

MiB = 1 << 20
GiB = 1 << 30
BARE = "bare.Bare"


# ------------------------------------------------------------------------------------------ the bare server


def bare_server(state: Path, payload: Path, port: int) -> None:
    """Serve Down (stream the payload's bytes), Up (count a stream's bytes) and Echo, then wait."""
    import grpc

    from offsite.wire import transport

    transport.tune_allocator()  # the same process settings as `offsite serve`
    data = payload.read_bytes()
    chunk = transport.CHUNK_BYTES

    def down(request: bytes, context):
        size = min(int.from_bytes(request, "little"), len(data))
        view = memoryview(data)
        for start in range(0, size, chunk):
            yield bytes(view[start : min(start + chunk, size)])

    def up(requests, context) -> bytes:
        return sum(len(m) for m in requests).to_bytes(8, "little")

    def echo(request: bytes, context) -> bytes:
        return request

    handlers = {
        "Down": grpc.unary_stream_rpc_method_handler(down),
        "Up": grpc.stream_unary_rpc_method_handler(up),
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=transport.MAX_WORKERS),
        options=transport.server_options(),
        maximum_concurrent_rpcs=transport.MAX_CONCURRENT_RPCS,
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(BARE, handlers)])
    tls = grpc.ssl_server_credentials(
        [((state / "tls" / "server.key").read_bytes(), (state / "tls" / "server.pem").read_bytes())],
        root_certificates=(state / "ca" / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    server.add_secure_port(f"127.0.0.1:{port}", tls)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


class BareProcess:
    def __init__(self, state: Path, payload: Path, port: int):
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--bare-server", str(state), str(payload), str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"the bare server did not start: {line!r}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------ set-up


@dataclasses.dataclass
class Setup:
    root: Path
    world: object  # tests/world.World
    payload: Path  # the padded emulator file (the bytes both servers send)
    payload_sha256: str
    adapter: Path
    submission_id: str = ""


def build(root: Path, size: int, quick: bool) -> Setup:
    from big import adapter_from, padded_bundle, wide_bundle
    from tiny import make_tiny_checkpoint
    from world import World

    from offsite.fileio import sha256_file
    from offsite.prepare import PrepareOptions, prepare
    from offsite.server import admin
    from offsite.server.owner_state import OwnerState, init_owner

    owner = root / "owner"
    init_owner(owner, "localhost", 50051)
    world = World(root, owner, None, None, "", None)
    world.enrol("alice")
    model = make_tiny_checkpoint(root / "model", "gpt2", layers=4, hidden=32)
    small = root / "small-bundle"
    prepare(model, small, PrepareOptions(adapter_bottom=1, adapter_top=1))
    big = padded_bundle(small, root / "big-bundle", size)
    if quick:  # a 256-wide model instead of GPT-2 XL's width: a 6 MiB adapter
        model = make_tiny_checkpoint(root / "wide-model", "gpt2", layers=3, hidden=256, distinct=False)
        wide = root / "wide-bundle"
        prepare(model, wide, PrepareOptions(adapter_bottom=1, adapter_top=1))
    else:
        wide = wide_bundle(root)
    with OwnerState(owner) as state:
        common = dict(clients=["alice"], max_epsilon=50, max_delta=1e-3, allow_no_dp=True)
        admin.publish(state, small, job_id="small", **common)
        admin.publish(state, big, job_id="big", **common)
        admin.publish(state, wide, job_id="wide", **common)
    adapter = adapter_from(wide, root / "adapter")
    payload = root / "payload.safetensors"
    os.replace(big / "emulator" / "model.safetensors", payload)
    for path in (big, wide, root / "model", root / "wide-model"):
        shutil.rmtree(path, ignore_errors=True)
    return Setup(root, world, payload, sha256_file(payload), adapter)


# ------------------------------------------------------------------------------------------ readings


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Timed:
    seconds: float
    server_cpu: float
    client_cpu: float


class Meter:
    """Wall time, and CPU time of the server process and of this process, around a block."""

    def __init__(self, server_pid: int):
        self.pid = server_pid

    def __enter__(self) -> Meter:
        self.t0, self.s0, self.c0 = time.perf_counter(), cpu_seconds(self.pid), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.result = Timed(
            time.perf_counter() - self.t0,
            cpu_seconds(self.pid) - self.s0,
            time.process_time() - self.c0,
        )


# ------------------------------------------------------------------------------------------ the runs


class Runs:
    def __init__(self, setup: Setup, server, bare: BareProcess, rss_interval: float = 0.01):
        import grpc

        from offsite.client.connection import open_channel
        from offsite.client.transfers import OffsiteClient
        from offsite.wire.v1 import offsite_pb2 as pb

        self.grpc, self.pb = grpc, pb
        self.setup, self.server, self.bare = setup, server, bare
        world = setup.world
        creds = world.credentials("alice")
        self.client = OffsiteClient(creds, world.clients["alice"], f"127.0.0.1:{server.port}")
        self.stub = self.client.stub
        self.bare_channel = open_channel(creds, f"127.0.0.1:{bare.port}")
        self.size = setup.payload.stat().st_size
        self.rss_interval = rss_interval
        self.scratch = setup.root / "scratch"

    def _fresh_scratch(self) -> Path:
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir()
        return self.scratch

    # -- downloads ------------------------------------------------------------------------------
    def download(self) -> tuple[Timed, int]:
        """The verified download of the big file; returns the time and the server's RssAnon peak (KiB)."""
        from big import AnonPeak

        dest = self._fresh_scratch() / "model.safetensors"
        rel = "emulator/model.safetensors"
        with AnonPeak(self.server.proc.pid, self.rss_interval) as mem, Meter(self.server.proc.pid) as m:
            self.client._download("big", rel, self.setup.payload_sha256, dest, lambda *a: lambda n: None)
        assert dest.stat().st_size == self.size
        return m.result, mem.peak

    def fetch(self) -> Timed:
        out = self._fresh_scratch() / "bundle"
        with Meter(self.server.proc.pid) as m:
            fetched = self.client.fetch("big", out)
        assert fetched.manifest["files"]["emulator/model.safetensors"] == self.setup.payload_sha256
        return m.result

    def bare_download(self) -> Timed:
        down = self.bare_channel.unary_stream(f"/{BARE}/Down")
        with Meter(self.bare.proc.pid) as m:
            got = sum(len(c) for c in down(self.size.to_bytes(8, "little")))
        assert got == self.size
        return m.result

    def first_byte(self, n: int = 20) -> tuple[float, float]:
        """Median seconds to the first chunk: offsite's DownloadFile, then bare Down."""
        pb = self.pb
        down = self.bare_channel.unary_stream(f"/{BARE}/Down")
        ours, bare = [], []
        for _ in range(n):
            t = time.perf_counter()
            call = self.stub.DownloadFile(
                pb.DownloadFileRequest(job_id="big", path="emulator/model.safetensors")
            )
            next(call)
            ours.append(time.perf_counter() - t)
            call.cancel()
            t = time.perf_counter()
            call = down(self.size.to_bytes(8, "little"))
            next(call)
            bare.append(time.perf_counter() - t)
            call.cancel()
        return statistics.median(ours), statistics.median(bare)

    # -- uploads --------------------------------------------------------------------------------
    def _begin(self) -> str:
        from offsite.formats import submission as envelope_format

        creds = self.client.credentials
        files = envelope_format.files_of(self.setup.adapter)
        envelope = envelope_format.make_envelope("wide", creds.client_id, files)
        request = self.pb.BeginSubmissionRequest(
            envelope=envelope, signature=envelope_format.sign_envelope(envelope, creds.signing_key)
        )
        return self.stub.BeginSubmission(request, timeout=30).submission_id

    def _messages(self, submission_id: str):
        """The adapter's files as chunks, hashed as offsite.client hashes them (read from disk)."""
        from offsite.formats import submission as envelope_format
        from offsite.wire import transport

        offset, first = 0, True
        for f in envelope_format.files_of(self.setup.adapter):
            with open(self.setup.adapter / f["name"], "rb") as fh:
                while data := fh.read(transport.CHUNK_BYTES):
                    yield self.pb.WriteSubmissionRequest(
                        submission_id=submission_id if first else "",
                        offset=offset,
                        data=data,
                        sha256=hashlib.sha256(data).hexdigest(),
                    )
                    first, offset = False, offset + len(data)

    def upload(self) -> tuple[Timed, Timed, int]:
        """One verified, durable upload stream; then the finish_write that decides it."""
        pb = self.pb
        sid = self._begin()
        with Meter(self.server.proc.pid) as m:
            committed = self.stub.WriteSubmission(self._messages(sid), timeout=600).committed_size
        finish = pb.WriteSubmissionRequest(submission_id=sid, offset=committed, finish_write=True)
        with Meter(self.server.proc.pid) as d:
            decided = self.stub.WriteSubmission(iter([finish]), timeout=600).submission
        assert decided.state == pb.SUBMISSION_STATE_ACCEPTED, decided.reason
        self.setup.submission_id = sid
        return m.result, d.result, committed

    def submit(self) -> Timed:
        with Meter(self.server.proc.pid) as m:
            result = self.client.submit("wide", self.setup.adapter)
        assert result.submission.state == self.pb.SUBMISSION_STATE_ACCEPTED
        return m.result

    def bare_upload(self, size: int) -> Timed:
        from offsite.wire import transport

        data = b"".join(
            (self.setup.adapter / n).read_bytes() for n in ("adapter.json", "adapter.safetensors")
        )
        assert len(data) == size
        view = memoryview(data)
        up = self.bare_channel.stream_unary(f"/{BARE}/Up")
        chunks = (bytes(view[i : i + transport.CHUNK_BYTES]) for i in range(0, size, transport.CHUNK_BYTES))
        with Meter(self.bare.proc.pid) as m:
            got = int.from_bytes(up(chunks, timeout=600), "little")
        assert got == size
        return m.result

    # -- small calls ----------------------------------------------------------------------------
    def small_calls(self, seconds: float = 2.0) -> dict[str, float]:
        """Round trips per second, each call repeated in slices of 0.1 s, the slices interleaved."""
        pb = self.pb
        echo = self.bare_channel.unary_unary(f"/{BARE}/Echo")
        calls = {
            "ListJobs": lambda: self.stub.ListJobs(pb.ListJobsRequest(), timeout=30),
            "GetSubmission": lambda: self.stub.GetSubmission(
                pb.GetSubmissionRequest(submission_id=self.setup.submission_id), timeout=30
            ),
            "bare echo (64 B)": lambda: echo(b"x" * 64, timeout=30),
        }
        counts = dict.fromkeys(calls, 0)
        spent = dict.fromkeys(calls, 0.0)
        for _ in range(max(1, round(seconds / 0.1))):
            for name, call in calls.items():
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < 0.1:
                    call()
                    counts[name] += 1
                spent[name] += time.perf_counter() - t0
        return {name: counts[name] / spent[name] for name in calls}


# ------------------------------------------------------------------------------------------ main


def _mbps(size: int, t: Timed) -> float:
    return size / t.seconds / 1e6


def run(args) -> dict:
    import grpc
    from big import proc_status
    from world import ServerProcess, free_port

    from offsite.wire import transport

    transport.tune_allocator()  # as the client commands do
    size = (64 if args.quick else args.size_mib) * MiB
    rounds = 1 if args.quick else args.rounds
    root = Path(tempfile.mkdtemp(prefix="bench-transfer-", dir=args.work))
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "?")
    conditions = {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "load_before": os.getloadavg(),
    }
    try:
        t0 = time.perf_counter()
        setup = build(root, size, args.quick)
        print(f"set-up: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        # The per-client call rate limit would cap the small-call rounds at its rate: lift it, so that
        # what is measured is the cost of a call, not the limit.
        unlimited = ("--calls-per-second", "1e9", "--call-burst", "1000000000")
        server = ServerProcess(setup.world.owner, free_port(), *unlimited).start()
        bare = BareProcess(setup.world.owner, setup.payload, free_port())
        try:
            runs = Runs(setup, server, bare)
            # warm-up: each kind of call once (imports, threads, TLS sessions, the server's checks)
            runs.client.fetch("small", root / "warm")
            runs.upload()
            runs.bare_upload(_upload_size(setup))
            runs.first_byte(3)
            time.sleep(0.5)
            idle = proc_status(server.proc.pid, "RssAnon")
            results: dict[str, list] = {}
            up_size = _upload_size(setup)
            for r in range(rounds):
                # Each measurement of offsite is paired with the bare one next to it (order alternating),
                # so that both see the same load on the machine.
                first_ours = r % 2 == 0
                for pair in ("download", "upload"):
                    for ours in (first_ours, not first_ours):
                        if pair == "download" and ours:
                            before = proc_status(server.proc.pid, "RssAnon")
                            timed, peak = runs.download()
                            results.setdefault("rss", []).append((before, peak))
                        elif pair == "download":
                            timed = runs.bare_download()
                        elif ours:
                            timed, decide, committed = runs.upload()
                            assert committed == up_size
                            results.setdefault("decide", []).append(decide)
                        else:
                            timed = runs.bare_upload(up_size)
                        results.setdefault(pair if ours else f"bare_{pair}", []).append(timed)
                results.setdefault("fetch", []).append(runs.fetch())
                results.setdefault("submit", []).append(runs.submit())
                print(f"round {r + 1}/{rounds} done", file=sys.stderr)
            ttfb = runs.first_byte(20)
            small = runs.small_calls(args.call_seconds)
        finally:
            server.stop()
            bare.stop()
        conditions["load_after"] = os.getloadavg()
        return report(results, size, up_size, ttfb, small, idle, conditions, rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _upload_size(setup: Setup) -> int:
    return sum((setup.adapter / n).stat().st_size for n in ("adapter.json", "adapter.safetensors"))


def _span(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def report(results, size, up_size, ttfb, small, idle, conditions, rounds) -> dict:
    rows = []
    for name, key, nbytes, bare in (
        ("download: verified, on disk", "download", size, "bare_download"),
        ("fetch: the whole command", "fetch", size, "bare_download"),
        ("upload: verified, fsynced", "upload", up_size, "bare_upload"),
        ("submit: upload + checks", "submit", up_size, "bare_upload"),
    ):
        ours = [_mbps(nbytes, t) for t in results[key]]
        theirs = [_mbps(nbytes, t) for t in results[bare]]
        ratios = [100 * a / b for a, b in zip(ours, theirs, strict=True)]
        per_gib = nbytes / GiB
        rows.append(
            {
                "what": name,
                "MB/s": _span(ours),
                "bare MB/s": _span(theirs),
                "% of bare (pairs)": _span(ratios),
                "CPU s/GiB server + client": f"{statistics.median(t.server_cpu / per_gib for t in results[key]):.2f} + {statistics.median(t.client_cpu / per_gib for t in results[key]):.2f}",
                "bare CPU s/GiB": f"{statistics.median(t.server_cpu / per_gib for t in results[bare]):.2f} + {statistics.median(t.client_cpu / per_gib for t in results[bare]):.2f}",
            }
        )
    rss = results["rss"]
    out = {
        "sizes": {"download_bytes": size, "upload_bytes": up_size},
        "rounds": rounds,
        "throughput": rows,
        "decide_seconds": _span([t.seconds for t in results["decide"]], "{:.2f}"),
        "time_to_first_byte_ms": {"offsite": ttfb[0] * 1e3, "bare": ttfb[1] * 1e3},
        "small_calls_per_second": small,
        "server_rss_anon_mib": {
            "idle": idle / 1024,
            "largest_rise_during_a_download": max(peak - before for before, peak in rss) / 1024,
            "peak_over_idle": (max(peak for _, peak in rss) - idle) / 1024,
        },
        "conditions": conditions,
    }
    print_tables(out)
    return out


def print_tables(out: dict) -> None:
    rows = out["throughput"]
    cols = list(rows[0])
    sizes = out["sizes"]
    print(
        f"\ndownload {sizes['download_bytes'] / MiB:.0f} MiB, upload {sizes['upload_bytes'] / MiB:.0f} MiB, "
        f"{out['rounds']} round(s): median (min-max)\n"
    )
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    small = out["small_calls_per_second"]
    ttfb = out["time_to_first_byte_ms"]
    rss = out["server_rss_anon_mib"]
    echo = small["bare echo (64 B)"]
    print(f"\nchecks after the upload (finish_write until accepted): {out['decide_seconds']} s")
    print(f"time to first byte (median of 20): offsite {ttfb['offsite']:.1f} ms, bare {ttfb['bare']:.1f} ms")
    print("\n| small call | calls/s | µs/call | % of bare echo |\n|---|---|---|---|")
    for name, rate in small.items():
        print(f"| {name} | {rate:.0f} | {1e6 / rate:.0f} | {100 * rate / echo:.0f}% |")
    print(
        f"\nserver RssAnon: idle {rss['idle']:.0f} MiB; while serving the download it rose by at most "
        f"{rss['largest_rise_during_a_download']:.1f} MiB over its value just before, and peaked "
        f"{rss['peak_over_idle']:.1f} MiB over the idle value"
    )
    c = out["conditions"]
    print(
        f"conditions: {c['cpus']} CPUs ({c['cpu']}), Python {c['python']}, grpcio {c['grpcio']}, "
        f"load average before {c['load_before'][0]:.1f}, after {c['load_after'][0]:.1f}"
    )


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--bare-server":
        bare_server(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=1024, help="size of the bundle file downloaded (MiB)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--call-seconds", type=float, default=2.0, help="how long each small call is repeated")
    p.add_argument("--quick", action="store_true", help="64 MiB download, 6 MiB upload, one round")
    p.add_argument("--work", default=None, help="directory for the temporary state (default: the system's)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    out = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
