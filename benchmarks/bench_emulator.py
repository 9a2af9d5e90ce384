"""Benchmark: emulator fine-tuning vs full fine-tuning (FLOPs, step time, peak memory).

    python benchmarks/bench_emulator.py            # 24-block LLaMA, width 256, 2-8-2 emulator
    python benchmarks/bench_emulator.py --quick    # small smoke run (< 1 minute)
    python benchmarks/bench_emulator.py --device cuda --frozen-dtype bf16   # the same table on a GPU

Three configurations are trained on the same random-init LLaMA-architecture model
(built from a ``LlamaConfig``, nothing downloaded):

* ``full``      - full fine-tuning of the full model (every parameter trainable);
* ``emu-blocks`` - the emulator (bottom/top adapter blocks + uniformly kept middle
  blocks, ``emulator_layer_map`` + ``build_emulator``) with whole adapter blocks trainable;
* ``emu-lora``  - the same emulator with LoRA (rank 8, alpha 16) in the adapter blocks.

One training step is forward + backward + AdamW step on one fixed batch, with the
project's per-sample causal-LM loss. Each configuration runs in its own fresh
subprocess (so peak memories do not mix), configurations are interleaved over several
rounds (rotating the order), and step time is the median over every timed step.

Peak memory on CPU is the process's resident-set high-water mark (``VmHWM``), reset
(``/proc/self/clear_refs``) once the model is built, read after training; when the
reset is not available, ``ru_maxrss`` is used instead. Reported are the peak above the
RSS after model construction ("train overhead": gradients, AdamW state, activations) and
the peak above the RSS before the model existed ("total": that plus the weights).

FLOPs per step are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls of
forward and backward, LM head and attention included). PyTorch's counter has no formula
for the CPU SDPA kernel, so the model uses ``attn_implementation="eager"`` for both the
count and the timing. The count is cross-checked against a closed-form count.

``--device`` (``cpu`` by default; ``cuda``, ``cuda:N``, ``mps``, ``auto``), ``--frozen-dtype`` and
``--gradient-checkpointing`` place each model with ``offsite.device.Placement`` as the commands do
(full fine-tuning trains every part, so it stays fp32 and nothing is checkpointed). On a GPU, step times
wait for the device (``synchronize``) and memory is the caching allocator's: weights are what is
allocated after the model is placed, the peak is ``max_memory_allocated`` (reset after placing).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from memory import peak_kib, reset_peak, rss_kib, trim

CONFIGS = ("full", "emu-blocks", "emu-lora")


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    seq: int
    batch: int
    bottom: int
    top: int
    keep: int
    lora_rank: int = 8
    lora_alpha: float = 16.0


FULL_SHAPE = Shape(
    layers=24, hidden=256, heads=4, intermediate=688, vocab=1000, seq=128, batch=8, bottom=2, top=2, keep=8
)
QUICK_SHAPE = Shape(
    layers=8, hidden=64, heads=4, intermediate=172, vocab=1000, seq=32, batch=4, bottom=2, top=2, keep=2
)


# --------------------------------------------------------------------------- worker
def worker(
    config: str, shape: Shape, warmup: int, steps: int, count_flops: bool, place: dict | None = None
) -> dict:
    import torch

    torch.set_num_threads(2)
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from offsite import device as placement_module
    from offsite.data import Example, collate
    from offsite.models.adapters import BLOCKS, LORA, AdapterSpec, AdapterView, positions_from_layer_map
    from offsite.models.emulator import build_emulator, emulator_layer_map
    from offsite.training.losses import per_sample_loss

    place = place or {}
    placement = placement_module.Placement.resolve(
        place.get("device", "cpu"),
        place.get("frozen_dtype", "fp32"),
        place.get("gradient_checkpointing", False),
    )
    on_gpu = placement.device.type in ("cuda", "mps")

    def used_kib() -> int:  # what the run holds: device allocations on a GPU, resident memory on the CPU
        if placement.device.type == "cuda":
            return torch.cuda.memory_allocated(placement.device) // 1024
        if placement.device.type == "mps":
            return torch.mps.current_allocated_memory() // 1024
        return rss_kib()

    trim()
    rss_before_model = used_kib()

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=max(shape.seq, 128),
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg)
    if config == "full":
        model.requires_grad_(True)
        layer_map = list(range(shape.layers))
    else:
        layer_map = emulator_layer_map(shape.layers, shape.bottom, shape.top, shape.keep)
        full = model
        model = build_emulator(full, layer_map)
        del full
        adapter_layers = tuple(range(shape.bottom)) + tuple(range(shape.layers - shape.top, shape.layers))
        if config == "emu-blocks":
            spec = AdapterSpec(kind=BLOCKS, layers=adapter_layers)
        else:
            spec = AdapterSpec(
                kind=LORA, layers=adapter_layers, lora_rank=shape.lora_rank, lora_alpha=shape.lora_alpha
            )
        AdapterView(model, spec, positions_from_layer_map(layer_map)).attach()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    if placement != placement_module.Placement():
        placement.place(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    g = torch.Generator().manual_seed(1)
    examples = [
        Example(input_ids=ids, labels=list(ids))
        for ids in torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g).tolist()
    ]
    batch = placement_module.inputs_for(model, collate(examples, pad_id=0))
    where = placement.device

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = per_sample_loss(model, batch, shift=True).mean()
        loss.backward()
        optimizer.step()

    trim()
    rss_after_model = used_kib()
    if placement.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(where)
    hwm_reset = reset_peak() if not on_gpu else True
    maxrss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    for _ in range(warmup):
        step()
    times, cpu_times = [], []
    for _ in range(steps):
        placement_module.synchronize(where)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        placement_module.synchronize(where)  # a step ends when the device is done
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)

    if placement.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(where) // 1024
    elif placement.device.type == "mps":  # MPS keeps no peak: what the driver holds after the steps
        peak = torch.mps.driver_allocated_memory() // 1024
    else:
        peak = peak_kib() if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flops = None
    if count_flops:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = int(counter.get_total_flops())

    return {
        "config": config,
        "times": times,
        "cpu_times": cpu_times,
        "flops": flops,
        "peak_total_mib": (peak - rss_before_model) / 1024,
        "peak_overhead_mib": (peak - rss_after_model) / 1024,
        "weights_mib": (rss_after_model - rss_before_model) / 1024,
        "hwm_reset": hwm_reset,
        "maxrss_at_start_above_after_model_mib": (maxrss_start - rss_after_model) / 1024,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in trainable),
        "layer_map": layer_map,
        "device": str(where),
    }


# --------------------------------------------------------------------------- arithmetic
def expected_flops(shape: Shape, config: str) -> int:
    """Closed-form matmul FLOPs (2·M·N·K per matmul) of one forward + backward.

    A linear's backward costs its forward once for the input gradient (if its input
    needs one) and once for the weight gradient (if the weight trains). Embeddings and
    norms carry no matmul FLOPs; the LM head (not tied) is frozen outside full FT.
    """
    h, i, v, r = shape.hidden, shape.intermediate, shape.vocab, shape.lora_rank
    tokens = shape.batch * shape.seq
    lin = {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
    attn_fwd = 2 * 2 * shape.batch * shape.seq * shape.seq * h  # QK^T and PV

    def fwd(dims):
        return 2 * tokens * dims[0] * dims[1]

    if config == "full":
        return 3 * (shape.layers * (sum(fwd(d) for d in lin.values()) + attn_fwd) + fwd((h, v)))

    n = shape.bottom + shape.keep + shape.top
    adapters = set(range(shape.bottom)) | set(range(n - shape.top, n))
    total = fwd((h, v)) * 2  # head forward + input gradient
    for pos in range(n):
        # Does the block's input carry a gradient? Not below the first adapter block.
        input_grad = pos > 0
        train = pos in adapters
        for name, d in lin.items():
            # Inputs of q/k/v and gate/up are norm outputs: with whole blocks the norm
            # weights train, so they carry a gradient even in block 0.
            x_grad = input_grad or name not in ("q", "k", "v") or (train and config == "emu-blocks")
            total += fwd(d)
            if config == "emu-lora" and train:
                # frozen base: input gradient only; A: weight grad (+ input grad); B: both.
                total += fwd(d) if x_grad else 0
                total += 2 * tokens * r * d[0] * (2 + int(x_grad)) + 2 * tokens * r * d[1] * 3
            else:
                total += fwd(d) * (int(x_grad) + int(train and config == "emu-blocks"))
        total += attn_fwd * 3
    return total


# --------------------------------------------------------------------------- parent
def run_worker(
    config: str, shape: Shape, warmup: int, steps: int, count_flops: bool, place: dict | None = None
) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        config,
        "--shape",
        json.dumps(asdict(shape)),
        "--warmup",
        str(warmup),
        "--steps",
        str(steps),
    ]
    if count_flops:
        cmd.append("--count-flops")
    if place:
        cmd += ["--place", json.dumps(place)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"worker {config} failed with exit code {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_flops(x: float) -> str:
    return f"{x / 1e9:.1f} G"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, one round: a smoke test")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick 1)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per subprocess (default 3)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per subprocess (default 8)")
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--place", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    ap.add_argument(
        "--frozen-dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="the emulator's frozen parts"
    )
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute the frozen middle")
    args = ap.parse_args(argv)

    if args.worker:
        shape = Shape(**json.loads(args.shape))
        place = json.loads(args.place) if args.place else None
        print(json.dumps(worker(args.worker, shape, args.warmup, args.steps, args.count_flops, place)))
        return 0
    place = {
        "device": args.device,
        "frozen_dtype": args.frozen_dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
    }

    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    rounds = args.rounds or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    steps = args.steps or (2 if args.quick else 8)
    middle = shape.layers - shape.bottom - shape.top
    print(
        f"LLaMA {shape.layers} blocks, width {shape.hidden}, {shape.heads} heads, intermediate "
        f"{shape.intermediate}, vocab {shape.vocab}; batch {shape.batch} x seq {shape.seq}; emulator "
        f"{shape.bottom}-{shape.keep}-{shape.top} (keep {shape.keep} of {middle} middle blocks); eager attention; "
        f"{rounds} round(s) x ({warmup} warm-up + {steps} timed) steps per config; 2 threads; "
        f"device {args.device}, frozen {args.frozen_dtype}"
        + (", gradient checkpointing" if args.gradient_checkpointing else ""),
        flush=True,
    )

    results: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    t_start = time.perf_counter()
    for rnd in range(rounds):
        order = CONFIGS[rnd % len(CONFIGS) :] + CONFIGS[: rnd % len(CONFIGS)]
        for config in order:
            res = run_worker(config, shape, warmup, steps, count_flops=(rnd == 0), place=place)
            results[config].append(res)
            print(
                f"  round {rnd + 1} {config:<10} median {statistics.median(res['times']) * 1e3:8.1f} ms/step, "
                f"peak overhead {res['peak_overhead_mib']:7.1f} MiB, total {res['peak_total_mib']:7.1f} MiB",
                flush=True,
            )

    rows = {}
    for config, runs in results.items():
        rows[config] = {
            "flops": runs[0]["flops"],
            "expected": expected_flops(shape, config),
            "time": statistics.median([t for r in runs for t in r["times"]]),
            "min": min(t for r in runs for t in r["times"]),
            "cpu": statistics.median([t for r in runs for t in r["cpu_times"]]),
            "round_medians": [statistics.median(r["times"]) for r in runs],
            "overhead": statistics.median(r["peak_overhead_mib"] for r in runs),
            "total": statistics.median(r["peak_total_mib"] for r in runs),
            "params": runs[0]["params"],
            "trainable": runs[0]["trainable"],
        }
    full = rows["full"]

    header = (
        "| config | blocks | trainable params | FLOPs/step | time/step median (min) | CPU time/step | "
        "peak mem train overhead | peak mem total | FLOP ratio full/x | time ratio full/x median (min) | "
        "CPU-time ratio full/x | mem ratio full/x overhead (total) | "
        "measured speedup as % of FLOP ratio: median (min) [CPU] |"
    )
    print()
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for config, row in rows.items():
        blocks = shape.layers if config == "full" else shape.bottom + shape.keep + shape.top
        fr = full["flops"] / row["flops"]
        tr, tmin, tcpu = (full[k] / row[k] for k in ("time", "min", "cpu"))
        print(
            f"| {config} | {blocks} | {row['trainable'] / 1e6:.2f} M | {fmt_flops(row['flops'])} | "
            f"{row['time'] * 1e3:.0f} ms ({row['min'] * 1e3:.0f} ms) | {row['cpu'] * 1e3:.0f} ms | "
            f"{row['overhead']:.0f} MiB | {row['total']:.0f} MiB | {fr:.2f}x | {tr:.2f}x ({tmin:.2f}x) | "
            f"{tcpu:.2f}x | {full['overhead'] / row['overhead']:.2f}x ({full['total'] / row['total']:.2f}x) | "
            f"{100 * tr / fr:.0f}% ({100 * tmin / fr:.0f}%) [{100 * tcpu / fr:.0f}%] |"
        )
    print()
    for config, row in rows.items():
        dev = 100 * (row["flops"] - row["expected"]) / row["expected"]
        medians = ", ".join(f"{m * 1e3:.0f}" for m in row["round_medians"])
        print(
            f"{config:<10} counted {row['flops']:,} FLOPs vs closed form {row['expected']:,} ({dev:+.2f}%); "
            f"per-round median ms/step: {medians}; median CPU ms/step {row['cpu'] * 1e3:.0f}"
        )
    if args.gradient_checkpointing:
        print(
            "(gradient checkpointing: the counts include the frozen middle's recomputed forward; the closed form does not)"
        )
    print(
        f"load average at end (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"
    )
    print(f"wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
