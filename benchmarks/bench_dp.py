"""Benchmark: what DP training costs the data owner, per family and adapter kind.

    python benchmarks/bench_dp.py                     # 12 blocks, width 256, seq 128, 2+2 adapter
    python benchmarks/bench_dp.py --quick             # tiny smoke run (< 1 minute)
    python benchmarks/bench_dp.py --families llama opt --batches 32

For every family (gpt2, opt, llama, bloom, bert) and adapter kind (whole blocks, LoRA
rank 8) on a randomly initialised 12-block model (width 256, sequence 128, adapter blocks
0, 1, 10, 11 of the full model, ``AdapterView(..., identity_positions(12)).attach()``)
training steps are compared at a logical batch of 32 and of 256:

* ``plain`` - no DP: per-sample loss -> mean -> backward -> AdamW. At 256 the logical
  batch is accumulated over physical batches of 32 (so memory is comparable).
* ``ours``  - the project's DP step, the loop of ``train_dp`` with a fixed batch instead
  of Poisson sampling: ``PerSampleClipper`` (fast mode, mixed ghost / materialised norms
  + book-keeping) over physical batches of at most 32, then ``add_noise_and_scale``
  (Gaussian noise from the ChaCha20 stream of ``offsite.training.noise``, drawn one step
  ahead in a background thread by ``StepNoise``, and division by the nominal batch) and
  AdamW.
* ``ours-inline`` - the same with the noise drawn when the step asks for it
  (``StepNoise(background=False)``): what the overlap saves.
* ``opacus`` - Opacus' own hooks mode (``GradSampleModule`` + ``DPOptimizer``,
  per-layer grad samplers with the functorch fallback for layers without one, such as
  GPT-2's ``Conv1D`` or LLaMA's RMSNorm), physical batches of 32 accumulated with
  ``signal_skip_step`` as Opacus' ``BatchMemoryManager`` does. Where it fails the table
  says so (OPT: Opacus' samplers cannot stack OPT's flattened activations).

A second table gives the noise's cost: the time to draw one step's normals, and the time
the step spends waiting for (inline: drawing) and adding them, as a share of the step.

Every (family, kind, variant, batch) runs in its own fresh subprocess; the
variants of a cell run back to back in a rotating order, so load drift on the machine
hits them alike. Reported: the median wall time per logical step, the median CPU time
(``time.process_time``, less sensitive to other jobs), and training-time memory growth:
the resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``
once the model is built) minus the RSS just before training.

The arithmetic floor next to each ratio is ``1 + extra / plain``: ``extra`` is the FLOPs
of the per-sample norms (``PerSampleClipper.last_costs``, i.e. ``norm_cost_table`` at the
real shapes of the step), ``plain`` the FLOPs of the non-DP step counted by
``torch.utils.flop_counter.FlopCounterMode`` (forward + backward matmuls, attention
included: models use ``attn_implementation="eager"`` so that attention is counted).
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

from memory import DeviceMemory, trim

FAMILIES = ("gpt2", "opt", "llama", "bloom", "bert")
KINDS = ("blocks", "lora")
VARIANTS = ("plain", "ours", "ours-inline", "opacus")


@dataclass(frozen=True)
class Shape:
    layers: int = 12
    hidden: int = 256
    heads: int = 4
    vocab: int = 1000
    seq: int = 128
    physical: int = 32
    bottom: int = 2
    top: int = 2
    lora_rank: int = 8
    lora_alpha: float = 16.0


FULL = Shape()
QUICK = Shape(layers=4, hidden=32, heads=4, vocab=64, seq=16, physical=4, bottom=1, top=1)


# --------------------------------------------------------------------------- models
def build_model(family: str, shape: Shape):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    d, L, h = shape.hidden, shape.layers, shape.heads
    ffn = 4 * d
    common = dict(vocab_size=shape.vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw = {
        "gpt2": dict(
            n_embd=d,
            n_layer=L,
            n_head=h,
            n_inner=ffn,
            n_positions=shape.seq,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
        "opt": dict(
            hidden_size=d,
            num_hidden_layers=L,
            num_attention_heads=h,
            ffn_dim=ffn,
            word_embed_proj_dim=d,
            max_position_embeddings=shape.seq,
            dropout=0.0,
            attention_dropout=0.0,
        ),
        # SwiGLU with 8/3·d (LLaMA's ratio) so the MLP matches the others' 4·d in size.
        "llama": dict(
            hidden_size=d,
            num_hidden_layers=L,
            num_attention_heads=h,
            num_key_value_heads=h,
            intermediate_size=int(8 * d / 3 / 16 + 0.5) * 16,
            max_position_embeddings=shape.seq,
            tie_word_embeddings=False,
        ),
        "bloom": dict(hidden_size=d, n_layer=L, n_head=h, hidden_dropout=0.0, attention_dropout=0.0),
        "bert": dict(
            hidden_size=d,
            num_hidden_layers=L,
            num_attention_heads=h,
            intermediate_size=ffn,
            max_position_embeddings=shape.seq,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=2,
        ),
    }[family]
    config = AutoConfig.for_model(family, **common, **kw)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    cls = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    return cls.from_config(config, attn_implementation="eager")


def make_batch(family: str, shape: Shape, n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, shape.vocab, (n, shape.seq), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (n,), generator=g) if family == "bert" else ids.clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def split(batch: dict, size: int) -> list[dict]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


# --------------------------------------------------------------------------- worker
def worker(
    family: str,
    kind: str,
    variant: str,
    logical: int,
    shape: Shape,
    warmup: int,
    steps: int,
    count_flops: bool,
    place: dict | None = None,
) -> dict:
    import torch

    place = place or {}
    dev = place.get("device", "cpu")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    if dev == "cpu":
        # Opacus on OPT treats batch·seq rows as samples and asks for ~24 GB: fail cleanly
        # (a MemoryError / RuntimeError) rather than wake the machine's OOM killer. (Not with CUDA,
        # whose context reserves far more address space than it uses.)
        limit = int(float(os.environ.get("BENCH_MEM_LIMIT_GB", "10")) * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import warnings

    warnings.filterwarnings("ignore")
    from torch.utils.flop_counter import FlopCounterMode

    from offsite.models.adapters import BLOCKS, LORA, AdapterSpec, AdapterView, identity_positions
    from offsite.training.dp import add_noise_and_scale
    from offsite.training.losses import per_sample_loss
    from offsite.training.noise import ChaChaStream, StepNoise
    from offsite.training.per_sample import PerSampleClipper

    trim()
    model = build_model(family, shape)
    layers = tuple(range(shape.bottom)) + tuple(range(shape.layers - shape.top, shape.layers))
    spec = AdapterSpec(
        kind=BLOCKS if kind == "blocks" else LORA,
        layers=layers,
        lora_rank=shape.lora_rank if kind == "lora" else None,
        lora_alpha=shape.lora_alpha if kind == "lora" else None,
        trains_head=family == "bert",
    )
    view = AdapterView(model, spec, identity_positions(shape.layers))
    view.attach()
    import offsite

    try:  # offsite.device exists from this change on; --compare-tree may run an older tree on the CPU
        from offsite import device as placement_module
    except ImportError:
        placement_module = None
    # An older tree without the module: the editable install's finder would supply this tree's instead.
    if placement_module and os.path.dirname(placement_module.__file__) != os.path.dirname(offsite.__file__):
        placement_module = None
    frozen = "fp32" if variant == "opacus" else place.get("frozen_dtype", "fp32")  # Opacus: fp32 only
    if (dev, frozen, place.get("gradient_checkpointing", False)) != ("cpu", "fp32", False):
        placement = placement_module.Placement.resolve(
            dev, frozen, place.get("gradient_checkpointing", False)
        )
        placement.place(model)
    model.train()
    shift = family != "bert"
    params = list(view.named_parameters().values())
    where = params[0].device
    sync = placement_module.synchronize if placement_module else (lambda device: None)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    batch = make_batch(family, shape, logical, seed=1)
    physical = split(batch, shape.physical)
    warm = split(make_batch(family, shape, shape.physical, seed=2), shape.physical)
    C, sigma = 1.0, 1.0
    info: dict = {}

    if variant == "plain":

        def step(chunks):
            optimizer.zero_grad(set_to_none=True)
            for pb in chunks:
                loss = per_sample_loss(model, pb, shift).mean() * (pb["input_ids"].shape[0] / logical)
                loss.backward()
            optimizer.step()

    elif variant in ("ours", "ours-inline"):
        # The train_dp step on a fixed batch: noise from the ChaCha20 stream, drawn a step ahead in
        # the background ("ours") or when the step asks for it ("ours-inline").
        # As train_dp: host buffers pinned for a CUDA device, a non-blocking copy per step.
        host = {"allocate": placement_module.HostBuffers(where)} if placement_module else {}
        noise = StepNoise(
            ChaChaStream.from_os(),
            sum(p.numel() for p in params),
            10**9,
            background=variant == "ours",
            **host,
        )
        clipper = PerSampleClipper(model, C).attach()
        counter = iter(range(1, 10**9))
        info.update(noise_size=noise.size, noise_exposed=[])
        pending = [None]

        def step(chunks):
            t = next(counter)
            noise.prefetch(t)  # a no-op when get(t - 1) already started it
            optimizer.zero_grad(set_to_none=True)
            extra = 0
            for pb in chunks:
                clipper.step(
                    lambda pb=pb: per_sample_loss(model, pb, shift), batch_size=pb["input_ids"].shape[0]
                )
                extra += sum(c.norm_flops for c in clipper.last_costs)
            info["norm_flops"] = extra
            info["kinds"] = {
                k: sum(c.kind == k for c in clipper.last_costs) for k in ("ghost", "materialise", "generic")
            }
            t0 = time.perf_counter()
            if placement_module:  # the buffer get() refills must have left for the device
                if pending[0] is not None:
                    pending[0].wait()
                pending[0] = placement_module.upload(noise.get(t), where)
                add_noise_and_scale(params, pending[0].tensor, sigma * C, logical)
            else:
                add_noise_and_scale(params, noise.get(t), sigma * C, logical)
            exposed = time.perf_counter() - t0  # waiting for (or drawing) the noise, copying and adding it
            optimizer.step()
            info["noise_gen"] = noise.generate_seconds / noise.fills  # mean time to draw one step's noise
            info["noise_exposed"].append(exposed)

    else:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=sigma,
            max_grad_norm=C,
            expected_batch_size=logical,
            loss_reduction="mean",
            generator=torch.Generator().manual_seed(3),
        )

        def step(chunks):
            for i, pb in enumerate(chunks):
                dp_optimizer.zero_grad(set_to_none=True)
                per_sample_loss(gsm, pb, shift).mean().backward()
                if i < len(chunks) - 1:
                    dp_optimizer.signal_skip_step(True)
                dp_optimizer.step()

    memory = DeviceMemory(dev)
    memory.start()
    out = {
        "offsite": os.path.dirname(os.path.abspath(offsite.__file__)),  # which tree ran (--compare-tree)
        "family": family,
        "kind": kind,
        "variant": variant,
        "logical": logical,
        "trainable": sum(p.numel() for p in params),
    }
    try:
        for _ in range(warmup):
            step(warm)
        times, cpu = [], []
        for _ in range(steps):
            sync(where)
            t0, c0 = time.perf_counter(), time.process_time()
            step(physical)
            sync(where)  # device work is asynchronous: a step ends when the device is done
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    except Exception as e:  # noqa: BLE001 - reported in the table
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        out["error"] = f"{type(e).__name__}: {msg}"[:120]
        return out
    out.update(
        times=times,
        cpu=cpu,
        growth_mib=memory.growth_mib(),
        hwm_reset=memory.hwm_reset,
        device=str(where),
        **info,
    )
    if count_flops:
        # FLOPs of the plain step (one physical batch, scaled): the floor's denominator.
        with FlopCounterMode(display=False) as counter:
            step(physical[:1])
        out["step_flops"] = int(counter.get_total_flops()) * len(physical)
    return out


# --------------------------------------------------------------------------- driver
def run_one(args: list[str], tree: str | None = None) -> dict:
    """One worker in a fresh process; ``tree``: import ``offsite`` from that source tree instead."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *args]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree)) if tree else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        if proc.returncode == -9:
            return {"error": "killed (out of memory)"}
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"worker crashed ({proc.returncode}): {tail}"[:120]}
    res = json.loads(lines[-1])
    if tree and os.path.dirname(res["offsite"]) != os.path.abspath(tree):
        raise SystemExit(f"--compare-tree {tree}: the worker imported {res['offsite']} instead")
    return res


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}×"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 256])
    ap.add_argument("--steps", type=int, default=None, help="timed steps at logical batch 32 (default 3)")
    ap.add_argument("--steps-large", type=int, default=1, help="timed steps at larger logical batches")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every cell this many times (interleaved)")
    ap.add_argument("--json", default=None, help="also write raw results here")
    ap.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="FILE",
        help="print the table from saved --json results (runs of the same cell are pooled)",
    )
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    ap.add_argument(
        "--frozen-dtype",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="frozen parts' dtype (not Opacus)",
    )
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute the frozen blocks")
    ap.add_argument(
        "--compare-tree",
        default=None,
        metavar="DIR",
        help="also run every cell with the offsite package of this source tree (e.g. a checkout of main), "
        "interleaved with this one, and print this tree's step time over that tree's",
    )
    ap.add_argument(
        "--worker", nargs=5, metavar=("FAMILY", "KIND", "VARIANT", "LOGICAL", "OPTS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()

    if args.worker:
        family, kind, variant, logical, opts = args.worker
        o = json.loads(opts)
        res = worker(
            family,
            kind,
            variant,
            int(logical),
            Shape(**o["shape"]),
            o["warmup"],
            o["steps"],
            o["flops"],
            o.get("place"),
        )
        print(json.dumps(res))
        return
    place = {
        "device": args.device,
        "frozen_dtype": args.frozen_dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    if args.compare_tree and place != {
        "device": "cpu",
        "frozen_dtype": "fp32",
        "gradient_checkpointing": False,
    }:
        raise SystemExit("--compare-tree compares CPU fp32 runs (older trees have no placement)")

    shape = QUICK if args.quick else FULL
    batches = args.batches
    if args.quick:  # a smoke test: two families (one Opacus cannot run), one logical batch of 2 physical
        batches = [8] if args.batches == [32, 256] else args.batches
        if args.families == list(FAMILIES):
            args.families = ["llama", "opt"]
    steps_small = args.steps if args.steps is not None else (2 if args.quick else 3)
    print(
        f"shape: {asdict(shape)}; physical batch {shape.physical}; batches {batches}; "
        f"threads {os.environ.get('BENCH_THREADS', '1')}; device {args.device}, frozen {args.frozen_dtype}"
        + (", gradient checkpointing" if args.gradient_checkpointing else "")
        + (f"; compared with {args.compare_tree}" if args.compare_tree else ""),
        flush=True,
    )

    results: dict[tuple, list[dict]] = {}
    cells = [(f, k, b) for b in batches for f in args.families for k in args.kinds]
    n = 0
    t_start = time.time()
    if args.from_json:
        for path in args.from_json:
            with open(path) as fh:
                for item in json.load(fh):
                    results.setdefault(tuple(item["key"]), []).extend(item["runs"])
        batches = sorted({k[3] for k in results})
        args.families = [f for f in FAMILIES if any(k[0] == f for k in results)]
    for r in range(0 if args.from_json else args.rounds):
        for f, k, b in cells:
            order = list(args.variants)
            rot = n % len(order)
            order = order[rot:] + order[:rot]
            n += 1
            trees = [None, args.compare_tree] if args.compare_tree else [None]
            runs = [(v, tree) for v in order for tree in (trees if n % 2 else trees[::-1])]
            for v, tree in runs:
                steps = steps_small if b <= shape.physical else args.steps_large
                opts = {
                    "shape": asdict(shape),
                    "warmup": 1,
                    "steps": steps,
                    "flops": v == "plain" and r == 0 and tree is None,
                    "place": place,
                }
                res = run_one([f, k, v, str(b), json.dumps(opts)], tree)
                label = v if tree is None else f"{v}@other"
                results.setdefault((f, k, label, b), []).append(res)
                t = statistics.median(res["times"]) if "times" in res else None
                print(
                    f"  [{time.time() - t_start:6.0f}s] {f:5} {k:6} {label:6} B={b:<4} "
                    + (f"{t:.2f}s/step, +{res['growth_mib']:.0f} MiB" if t else res.get("error", "?")),
                    flush=True,
                )

    if args.json and not args.from_json:
        with open(args.json, "w") as fh:
            json.dump([{"key": list(k), "runs": v} for k, v in results.items()], fh, indent=1)

    def agg(f, k, v, b):
        runs = [r for r in results.get((f, k, v, b), []) if "times" in r]
        if not runs:
            errs = [r.get("error") for r in results.get((f, k, v, b), [])]
            return None, (errs[0] if errs else None)
        return {
            "t": statistics.median(t for r in runs for t in r["times"]),
            "cpu": statistics.median(t for r in runs for t in r["cpu"]),
            "mem": statistics.median(r["growth_mib"] for r in runs),
            "flops": next((r["step_flops"] for r in runs if "step_flops" in r), None),
            "norm": next((r["norm_flops"] for r in runs if "norm_flops" in r), None),
            "noise_size": next((r["noise_size"] for r in runs if "noise_size" in r), None),
            "noise_gen": statistics.median(r["noise_gen"] for r in runs) if "noise_gen" in runs[0] else None,
            # the warm-up step is the first entry
            "noise_exposed": statistics.median(e for r in runs for e in r["noise_exposed"][1:])
            if "noise_exposed" in runs[0]
            else None,
        }, None

    header = (
        "| family | adapter | B | plain s/step | plain MiB | floor | ours time (cpu) | ours mem "
        "| Opacus hooks time (cpu) | Opacus mem |"
    )
    print()
    print(header)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for f, k, b in [(f, k, b) for b in batches for f in args.families for k in args.kinds]:
        p, _ = agg(f, k, "plain", b)
        o, oerr = agg(f, k, "ours", b)
        h, herr = agg(f, k, "opacus", b)
        floor = (
            1 + o["norm"] / p["flops"] if p and o and p.get("flops") and o.get("norm") is not None else None
        )

        def cell(x, err, p=p):
            if x is None:
                return (f"fails: {err[:60]}" if err else "-"), "-"
            if p is None:
                return f"{x['t']:.2f}s", f"{x['mem']:.0f} MiB"
            return (
                f"{x['t'] / p['t']:.2f}× ({x['cpu'] / p['cpu']:.2f}×)",
                f"{x['mem'] / p['mem']:.2f}×" if p["mem"] > 0 else "-",
            )

        ot, om = cell(o, oerr) if "ours" in args.variants else ("-", "-")
        ht, hm = cell(h, herr) if "opacus" in args.variants else ("-", "-")
        print(f"| {f} | {k} | {b} | {p['t']:.2f}" if p else f"| {f} | {k} | {b} | -", end="")
        print(f" | {p['mem']:.0f}" if p else " | -", end="")
        print(f" | {fmt_ratio(floor)} | {ot} | {om} | {ht} | {hm} |")
    if {"ours", "ours-inline"} <= set(args.variants):
        print_noise_table(agg, batches, args.families, args.kinds)
    if args.compare_tree:
        print_comparison(agg, batches, args.families, args.kinds, args.variants, args.compare_tree)
    print(f"\ntotal {time.time() - t_start:.0f}s")


def print_comparison(agg, batches, families, kinds, variants, tree) -> None:
    """This tree's median step time (and CPU time) over the other tree's, cell by cell."""
    print(f"\nthis tree / {tree} (median s/step, runs interleaved in one process tree):\n")
    print("| family | adapter | B | variant | this s/step | other s/step | time ratio | CPU-time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for f, k, b in [(f, k, b) for b in batches for f in families for k in kinds]:
        for v in variants:
            ours, _ = agg(f, k, v, b)
            other, _ = agg(f, k, f"{v}@other", b)
            if ours is None or other is None:
                print(f"| {f} | {k} | {b} | {v} | - | - | - | - |")
                continue
            ratios.append(ours["t"] / other["t"])
            print(
                f"| {f} | {k} | {b} | {v} | {ours['t']:.3f} | {other['t']:.3f} | {ours['t'] / other['t']:.3f}× "
                f"| {ours['cpu'] / other['cpu']:.3f}× |"
            )
    if ratios:
        print(f"\nmedian time ratio over the cells: {statistics.median(ratios):.3f}× ({len(ratios)} cells)")


def print_noise_table(agg, batches, families, kinds) -> None:
    """What the cryptographic noise costs a DP step: drawing it, and what the step waits for it.

    ``draw`` is the mean time to draw one step's normals (ChaCha20 + Box-Muller); ``exposed`` is the
    time the step spends in ``add_noise_and_scale`` (waiting for the noise, drawing it when inline,
    adding it). Overlapped ("ours"): drawn in the background during the previous step's optimizer
    step and this step's forward/backward; inline ("ours-inline"): drawn when the step asks for it.
    """
    print()
    print(
        "| family | adapter | B | normals/step | step s (overlapped) | draw ms | draw / step "
        "| exposed ms, overlapped | exposed / step | exposed ms, inline | exposed / step, inline "
        "| step inline / overlapped |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for f, k, b in [(f, k, b) for b in batches for f in families for k in kinds]:
        o, _ = agg(f, k, "ours", b)
        i, _ = agg(f, k, "ours-inline", b)
        if o is None or i is None or o["noise_gen"] is None:
            print(f"| {f} | {k} | {b} | - | - | - | - | - | - | - | - | - |")
            continue
        print(
            f"| {f} | {k} | {b} | {o['noise_size'] / 1e6:.2f} M | {o['t']:.2f} | {1e3 * o['noise_gen']:.1f} "
            f"| {100 * o['noise_gen'] / o['t']:.2f} % | {1e3 * o['noise_exposed']:.1f} "
            f"| {100 * o['noise_exposed'] / o['t']:.2f} % | {1e3 * i['noise_exposed']:.1f} "
            f"| {100 * i['noise_exposed'] / i['t']:.2f} % | {i['t'] / o['t']:.3f}× |"
        )


if __name__ == "__main__":
    main()
