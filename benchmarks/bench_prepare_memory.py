"""Benchmark: the memory `offsite owner prepare` needs for a checkpoint larger than it should need.

    python benchmarks/bench_prepare_memory.py                 # a 2.55 GB (2.37 GiB) checkpoint, both paths
    python benchmarks/bench_prepare_memory.py --layers 9      # a 4.2 GB one
    python benchmarks/bench_prepare_memory.py --keep DIR      # keep the checkpoint and outputs in DIR

A synthetic LLaMA-architecture checkpoint (width 4096, MLP 11008, vocab 32000, bf16; 5 blocks make
2.55 GB) is written directly with the streaming safetensors writer: no model is built and nothing is
trained; the weights are a repeated N(0, 0.02) pattern. It is then prepared (whole-block adapter 1 + 1
blocks, one of the middle blocks kept) two ways, each in its own fresh process:

* ``streaming`` - this tree's ``offsite.prepare.prepare``: the emulator and the initial adapter are
  written from the checkpoint's files one tensor at a time;
* ``in-memory`` - what ``prepare`` did before: ``from_pretrained(dtype="auto")`` of the whole model,
  ``build_emulator``, ``save_pretrained``, the initial adapter from ``AdapterView.state_dict`` and
  ``save_file`` (the same library calls, in this process);
* ``plug`` - ``offsite.plug.plug`` of a LoRA adapter into the same checkpoint (``owner plug``): the
  merged model is written tensor by tensor, each adapter block's weights merged as they pass. The bundle
  (LoRA rank 8) is prepared and the adapter (its initial tensors, as a data owner would return them) is
  written before the measurement starts.

Memory is the process's **anonymous** resident memory (``RssAnon`` in ``/proc/self/status``: heap and
anonymous mappings, what a model loaded into memory occupies), sampled every 2 ms by a thread, its peak
reported against the checkpoint's size. ``RLIMIT_AS`` cannot bound this: memory-mapped checkpoint files
count towards the address space without using memory. File-backed pages (the page cache of files read
or memory-mapped, shared libraries) are not the process's own and the kernel reclaims them at will, so
they are left out; ``VmHWM`` (the kernel's high-water mark of all resident pages, file-backed included)
is printed beside it as an upper bound that no sampling can miss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # big.py: the memory sampler the load tests use too
from big import AnonPeak, proc_status  # noqa: E402


# --------------------------------------------------------------------------- the checkpoint
def llama_config(layers: int, hidden: int = 4096, ffn: int = 11008) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128,
        "num_hidden_layers": layers,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "bos_token_id": 2,
        "eos_token_id": 3,
        "pad_token_id": 0,
    }


def write_synthetic_checkpoint(
    directory: Path, layers: int = 5, vocab: int = 32000, hidden: int = 4096, ffn: int = 11008
) -> int:
    """A bf16 LLaMA checkpoint written tensor by tensor (the shapes a LlamaForCausalLM expects) and a
    small tokenizer; returns the weights' size in bytes."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from offsite.formats.safetensors_writer import TensorOut, write_safetensors

    cfg = llama_config(layers, hidden, ffn)
    cfg["vocab_size"] = vocab
    d, ffn = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {
        "model.embed_tokens.weight": (vocab, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (vocab, d),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (d, d)
        shapes[f"{p}mlp.gate_proj.weight"] = (ffn, d)
        shapes[f"{p}mlp.up_proj.weight"] = (ffn, d)
        shapes[f"{p}mlp.down_proj.weight"] = (d, ffn)
        shapes[f"{p}input_layernorm.weight"] = (d,)
        shapes[f"{p}post_attention_layernorm.weight"] = (d,)
    pattern = (torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    chunk = memoryview(pattern.view(torch.uint8).numpy().tobytes())  # 8 MiB, sliced without copies

    def filler(nbytes: int, offset: int):
        def write(f) -> None:
            done, start = 0, offset % len(chunk)
            while done < nbytes:
                piece = chunk[start : start + min(nbytes - done, len(chunk) - start)]
                while piece:
                    piece = piece[f.write(piece) :]
                done += min(nbytes - done, len(chunk) - start)
                start = 0

        return write

    entries = [
        TensorOut(name, "BF16", shape, filler(2 * math.prod(shape), 2 * i))
        for i, (name, shape) in enumerate(shapes.items())
    ]
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", entries, {"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg))
    vocab_words = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{f"w{i}": 4 + i for i in range(60)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab_words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(directory)
    return sum(e.nbytes for e in entries)


# --------------------------------------------------------------------------- measuring
def _status(key: str) -> int:
    """A size from this process's ``/proc/self/status``, in bytes."""
    return proc_status(os.getpid(), key.rstrip(":")) * 1024


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(mode: str, checkpoint: Path, out: Path, lora_rank: int = 0, warm: bool = False) -> dict:
    """Prepare ``checkpoint`` into ``out`` by ``mode`` and report memory; run in a fresh process.

    ``warm``: first prepare a tiny checkpoint of the same architecture (3 blocks of width 128) the same
    way, so that the libraries' lazily imported modules and caches are in memory before the measured
    run; ``warm_anon`` is the RssAnon after it, what the measured run starts from.
    """
    import torch

    torch.set_num_threads(1)
    from offsite.prepare import PrepareOptions, prepare

    if mode == "plug":
        from safetensors.torch import load_file

        from offsite.fileio import staged_directory
        from offsite.formats.adapter import write_adapter
        from offsite.formats.bundle import Bundle
        from offsite.plug import manifest_from_bundle_dir, plug

        bundle_dir, adapter_dir = out.with_name(out.name + "-bundle"), out.with_name(out.name + "-adapter")
        prepare(
            checkpoint,
            bundle_dir,
            PrepareOptions(adapter_bottom=1, adapter_top=1, emulator_layers=1, lora_rank=8),
        )
        with Bundle.open(bundle_dir) as bundle, staged_directory(adapter_dir) as stage:
            write_adapter(
                stage,
                load_file(str(bundle_dir / "initial_adapter.safetensors")),
                spec=bundle.spec,
                bundle_id=bundle.id,
                source_fingerprint=bundle.source_fingerprint,
                hyperparameters={},
            )
    if mode == "in-memory":
        from safetensors.torch import save_file

        from offsite.models.adapters import BLOCKS, AdapterSpec, AdapterView, positions_from_layer_map
        from offsite.models.emulator import build_emulator, emulator_layer_map
        from offsite.models.loading import load_model
    baseline = _status("RssAnon:")

    def run(checkpoint: Path, out: Path) -> None:
        if mode == "plug":
            plug(checkpoint, adapter_dir, out, manifest_from_bundle_dir(bundle_dir))
        elif mode == "streaming":
            opts = PrepareOptions(
                adapter_bottom=1, adapter_top=1, emulator_layers=1, lora_rank=lora_rank or None
            )
            prepare(checkpoint, out, opts)
        else:  # before this change: the whole model in memory, the emulator copied out of it
            model = load_model(checkpoint, dtype="auto")
            total = model.config.num_hidden_layers
            layer_map = emulator_layer_map(total, 1, 1, 1)
            emulator = build_emulator(model, layer_map)
            out.mkdir()
            emulator.save_pretrained(out / "emulator")
            view = AdapterView(
                emulator, AdapterSpec(kind=BLOCKS, layers=(0, total - 1)), positions_from_layer_map(layer_map)
            )
            view.attach()
            save_file(view.state_dict(), str(out / "initial_adapter.safetensors"))

    if warm and mode == "plug":
        raise SystemExit("warm: prepare modes only")
    if warm:
        tiny = out.with_name(out.name + "-warm")
        write_synthetic_checkpoint(tiny / "model", layers=3, vocab=1000, hidden=128, ffn=344)
        run(tiny / "model", tiny / "bundle")
        shutil.rmtree(tiny)
    warm_anon = _status("RssAnon:")
    reset_hwm()
    start = time.perf_counter()
    with AnonPeak(os.getpid(), interval=0.002) as peak:
        run(checkpoint, out)
    seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "baseline_anon": baseline,
        "warm_anon": warm_anon,
        "peak_anon": peak.peak * 1024,
        "vmhwm": _status("VmHWM:"),
        "seconds": seconds,
        "written": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
    }


def run_worker(mode: str, checkpoint: Path, out: Path, lora_rank: int = 0, warm: bool = False) -> dict:
    """``worker`` in a fresh process (so that nothing else is in its memory)."""
    script = str(HERE / "bench_prepare_memory.py")
    cmd = [
        sys.executable,
        script,
        "--worker",
        mode,
        str(checkpoint),
        str(out),
        str(lora_rank),
        str(int(warm)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=5, help="blocks of the synthetic model (5: 2.55 GB)")
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["streaming", "in-memory", "plug"],
        choices=["streaming", "in-memory", "plug"],
    )
    ap.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument(
        "--worker", nargs=5, metavar=("MODE", "CHECKPOINT", "OUT", "LORA", "WARM"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.worker:
        mode, checkpoint, out, lora, warm = args.worker
        print(json.dumps(worker(mode, Path(checkpoint), Path(out), int(lora), bool(int(warm)))))
        return 0

    root = args.keep or Path(tempfile.mkdtemp(prefix="offsite-bench-prepare-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        size = write_synthetic_checkpoint(root / "model", args.layers)
        print(f"synthetic checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
        results = []
        for mode in args.modes:
            res = run_worker(mode, root / "model", root / f"out-{mode}")
            res["checkpoint_bytes"] = size
            results.append(res)
            for extra in ("", "-bundle", "-adapter"):
                shutil.rmtree(root / f"out-{mode}{extra}", ignore_errors=True)
        print()
        print(
            "| path | checkpoint | peak RssAnon | peak RssAnon / checkpoint | RssAnon before | VmHWM (all resident pages) | written | time |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            print(
                f"| {r['mode']} | {size / 1e9:.2f} GB | {r['peak_anon'] / 2**20:.0f} MiB | "
                f"{r['peak_anon'] / size:.3f}× | {r['baseline_anon'] / 2**20:.0f} MiB | {r['vmhwm'] / 2**20:.0f} MiB | "
                f"{r['written'] / 1e9:.2f} GB | {r['seconds']:.1f} s |"
            )
        print(
            f"\nload average (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
