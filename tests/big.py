"""Large, real bundles and adapters for the memory, load and speed checks (tests/test_load.py and
benchmarks/bench_transfer.py), and readings of another process's memory, threads and descriptors.

* ``padded_bundle``: a copy of a real bundle whose emulator weights file is made ``size`` bytes larger by
  one extra tensor (``offsite_padding``, uint8) written straight into the safetensors file, block by
  block; the manifest is rewritten with the file's new hash (a new bundle id). It is a valid bundle
  (``Bundle.open`` checks it like any other), and building a 1 GB one takes a second or two.
* ``wide_bundle``: a real 3-block GPT-2 with GPT-2 XL's width (1600), prepared with one adapter block at
  each end, so its adapter (two whole blocks, ~235 MiB) and the job's adapter size limit are large.
* ``adapter_from``: an adapter directory made from a bundle's initial adapter (optionally changed),
  with ``offsite.formats.adapter.write_adapter``; ``sign_receipt`` gives it a receipt built by
  ``offsite.privacy.receipt.build_receipt`` from another real receipt's privacy history, signed by a
  given data owner's key (what ``tune`` writes at the end of a DP run, without the run).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20


# ------------------------------------------------------------------------------------------ bundles


def padded_bundle(bundle: Path, out: Path, size: int) -> Path:
    """``bundle`` copied to ``out`` with ``size`` more bytes in ``emulator/model.safetensors``."""
    from offsite.fileio import canonical_json, sha256_file

    shutil.copytree(bundle, out)
    weights = out / "emulator" / "model.safetensors"
    with open(weights, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        body = f.read()
    header["offsite_padding"] = {
        "dtype": "U8",
        "shape": [size],
        "data_offsets": [len(body), len(body) + size],
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    block = os.urandom(MiB)
    with open(weights, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded + body)
        left = size
        while left:
            f.write(block[: min(left, MiB)])
            left -= min(left, MiB)
    manifest = json.loads((out / "manifest.json").read_bytes())
    manifest["files"]["emulator/model.safetensors"] = sha256_file(weights)
    (out / "manifest.json").write_bytes(canonical_json(manifest))
    return out


def wide_bundle(root: Path) -> Path:
    """A real bundle whose adapter is two whole blocks 1600 wide (~235 MiB); returns its directory.

    The model's weights are drawn uniformly by one generator instead of transformers' initialisation,
    which takes seconds at this size; nothing here trains it."""
    import torch
    from tiny import tiny_config
    from transformers import AutoModelForCausalLM

    from offsite.prepare import PrepareOptions, prepare

    config, tokenizer = tiny_config("gpt2", layers=3, hidden=1600)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05, generator=generator)
    model.save_pretrained(root / "wide-model")
    tokenizer.save_pretrained(root / "wide-model")
    del model
    prepare(root / "wide-model", root / "wide-bundle", PrepareOptions(adapter_bottom=1, adapter_top=1))
    shutil.rmtree(root / "wide-model")  # only the bundle is needed
    return root / "wide-bundle"


# ------------------------------------------------------------------------------------------ adapters


def adapter_from(bundle: Path, out: Path, change: Callable[[dict], None] | None = None) -> Path:
    """An adapter directory for ``bundle`` from its initial adapter; ``change`` may edit the tensors."""
    from safetensors.torch import load_file

    from offsite.formats.adapter import write_adapter

    manifest = json.loads((bundle / "manifest.json").read_bytes())
    tensors = load_file(str(bundle / "initial_adapter.safetensors"))
    if change is not None:
        change(tensors)
    out.mkdir(parents=True)
    write_adapter(
        out,
        tensors,
        spec=_spec(manifest),
        bundle_id=_bundle_id(bundle),
        source_fingerprint=manifest["source"]["fingerprint"],
        hyperparameters={"made_by": "tests/big.py"},
    )
    return out


def _spec(manifest: dict):
    from offsite.formats.spec import AdapterSpec

    return AdapterSpec.from_json(manifest["adapter"]["spec"])


def _bundle_id(bundle: Path) -> str:
    from offsite.fileio import sha256_file

    return sha256_file(bundle / "manifest.json")


def sign_receipt(adapter: Path, bundle: Path, template: dict, signing_key) -> None:
    """Write ``receipt.json`` + ``receipt.sig`` into ``adapter``: ``template``'s privacy history and
    budget, this adapter's hash and bundle, signed by ``signing_key`` (a data owner's receipt key)."""
    from offsite.fileio import sha256_file
    from offsite.privacy.receipt import build_receipt, write_receipt

    receipt = build_receipt(
        run_history=template["run_history"],
        cumulative_history=template["cumulative_history"],
        delta=template["delta"],
        max_grad_norm=template["max_grad_norm"],
        size_bucket=template["size_bucket"],
        nominal_batch=template["nominal_batch"],
        budget=template["budget"],
        dataset_id=template["dataset_id"],
        dataset_fingerprint=template["dataset_fingerprint"],
        adapter_sha256=sha256_file(adapter / "adapter.safetensors"),
        bundle_id=_bundle_id(bundle),
        signer_public_key=signing_key.public_key(),
        run_id=template["run_id"],
    )
    write_receipt(adapter, receipt, signing_key)


# ------------------------------------------------------------------------------------------ another process


def proc_status(pid: int, key: str) -> int:
    """A number from ``/proc/PID/status`` (``RssAnon`` and ``VmRSS`` in KiB, ``Threads``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def open_files(pid: int) -> list[str]:
    """What each of the process's open descriptors refers to (paths, ``socket:[…]``, ``pipe:[…]``)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


class AnonPeak:
    """Samples a process's anonymous resident memory (``RssAnon``) every ``interval`` s while open.

    ``RssAnon`` is the process's own memory (heap, stacks, buffers); file pages it reads are page cache
    (``RssFile``), which the kernel can drop. ``peak`` is the highest reading, in KiB."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.pid, self.interval = pid, interval
        self.start = proc_status(pid, "RssAnon")
        self.peak = self.start
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status(self.pid, "RssAnon"))
            self.samples += 1
            time.sleep(self.interval)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status(self.pid, "RssAnon"))
