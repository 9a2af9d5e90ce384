"""`offsite owner`: the model owner's commands (prepare a bundle, plug an adapter in, full fine-tuning)."""

from __future__ import annotations

import argparse
from pathlib import Path

from offsite.cli import owner_service
from offsite.cli.placement import add_placement_arguments, add_shard_argument, placement_from
from offsite.cli.progress import step_bar
from offsite.cli.ui import console, print_json, table


def register(sub: argparse._SubParsersAction) -> None:
    owner = sub.add_parser(
        "owner",
        help="model owner: prepare and publish bundles, enrol data owners, plug adapters in",
        description="Commands for the model owner, who keeps the full model. `offsite serve` runs its "
        "server; the commands here work on its state directory with or without the server running.",
    )
    cmds = owner.add_subparsers(dest="owner_command", metavar="COMMAND", required=True)

    p = cmds.add_parser(
        "prepare",
        help="make a bundle (emulator + initial adapter + tokenizer) from a model",
        description="Build the bundle a data owner fine-tunes: the adapter blocks (bottom and top), a "
        "uniformly layer-dropped emulator of the middle blocks (optionally distilled), and the tokenizer. "
        "The full model never leaves this machine.",
    )
    p.add_argument("model", type=Path, help="local Hugging Face checkpoint directory (safetensors)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    p.add_argument(
        "--adapter-bottom", type=int, default=2, help="bottom blocks the data owner trains (default 2)"
    )
    p.add_argument("--adapter-top", type=int, default=2, help="top blocks the data owner trains (default 2)")
    p.add_argument(
        "--emulator-layers",
        type=int,
        default=None,
        help="middle blocks kept in the emulator (default: half of the middle blocks, rounded up)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="train LoRA (this rank) on every linear layer of the adapter blocks instead of whole blocks",
    )
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument(
        "--num-labels",
        type=int,
        default=None,
        help="encoders: fine-tune for classification with this many labels (new head + pooler)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for new heads and LoRA initialisation")
    p.add_argument(
        "--distill-data",
        type=Path,
        default=None,
        help="the owner's public text (JSONL/CSV/text) to distil the emulator on",
    )
    p.add_argument("--distill-steps", type=int, default=200, help="distillation steps (default 200)")
    p.add_argument("--distill-lr", type=float, default=1e-4, help="distillation learning rate (default 1e-4)")
    p.add_argument("--distill-batch-size", type=int, default=8, help="distillation batch size (default 8)")
    p.add_argument(
        "--distill-checkpoint",
        type=Path,
        default=None,
        help="directory for a resumable distillation checkpoint (resumes if it exists)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    owner_service.add_state_argument(p)
    add_shard_argument(p)
    add_placement_arguments(p, frozen="distillation: the teacher and the emulator's frozen parts")
    p.add_argument(
        "--teacher-device-map",
        choices=("device", "auto"),
        default="device",
        help="distillation: where the full model (the teacher, forward passes only) is put: all on "
        "--device (default), or `auto`: accelerate spreads it over the GPUs, CPU memory and disk "
        "(a scratch directory inside the output), for a model larger than the device",
    )
    p.add_argument(
        "--teacher-max-memory",
        action="append",
        default=[],
        metavar="WHERE=SIZE",
        help="with --teacher-device-map auto: at most SIZE of the teacher on WHERE (a GPU index or "
        "`cpu`), e.g. 0=20GiB; repeat it for each place (0=20GiB, then cpu=64GiB); the rest is offloaded "
        "to disk",
    )
    p.set_defaults(func=cmd_prepare)

    p = cmds.add_parser(
        "plug",
        help="verify a data owner's adapter and plug it into the full model",
        description="Check an adapter (bundle id, model fingerprint, file hash, every tensor's name, shape, "
        "dtype and finiteness), load it into MODEL by explicit layer index and write a normal Hugging Face "
        "checkpoint. LoRA adapters are merged and also exported to OUT/peft/.",
    )
    p.add_argument("model", type=Path, help="the full model the bundle was prepared from")
    p.add_argument("adapter", type=Path, nargs="?", help="adapter directory returned by the data owner")
    p.add_argument(
        "--submission",
        default=None,
        help="instead of ADAPTER: an accepted submission received by `offsite serve`",
    )
    p.add_argument("--out", type=Path, required=True, help="directory for the merged model")
    p.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="the bundle directory (default: the owner's record of issued bundles in --state)",
    )
    owner_service.add_state_argument(p)
    add_shard_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_plug)

    p = cmds.add_parser(
        "finetune-full",
        help="fine-tune the whole model (research and demo reference only)",
        description="Full fine-tuning of every block: the 'full fine-tuned' row of the five-setting "
        "comparison. Not part of offsite-tuning: it needs the model and the data in one place.",
    )
    p.add_argument("model", type=Path, help="local Hugging Face checkpoint directory (safetensors)")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="training records (JSONL/CSV/text; the fields the model's task needs, see the README)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="directory for the fine-tuned checkpoint (must not exist)"
    )
    p.add_argument("--epochs", type=int, default=3, help="passes over the data (default 3)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=16, help="records per optimizer step (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order and a new head (default 0)")
    p.add_argument(
        "--num-labels",
        type=int,
        default=None,
        help="encoders: fine-tune for classification with this many labels (new head + pooler)",
    )
    add_placement_arguments(p)
    p.set_defaults(func=cmd_finetune_full)
    owner_service.register(cmds)


def cmd_prepare(args: argparse.Namespace) -> int:
    from offsite.prepare import PrepareOptions, prepare
    from offsite.training.distill import DistillConfig

    distill = None
    if args.distill_data is not None:
        distill = DistillConfig(
            steps=args.distill_steps,
            lr=args.distill_lr,
            batch_size=args.distill_batch_size,
            seed=args.seed,
            warmup_steps=min(100, max(1, args.distill_steps // 10)),
        )
    opts = PrepareOptions(
        adapter_bottom=args.adapter_bottom,
        adapter_top=args.adapter_top,
        emulator_layers=args.emulator_layers,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        num_labels=args.num_labels,
        seed=args.seed,
        distill_data=args.distill_data,
        distill=distill,
        distill_checkpoint=args.distill_checkpoint,
        max_shard_bytes=args.max_shard_size,
        teacher_device_map=args.teacher_device_map,
        teacher_max_memory=_memory_map(args.teacher_max_memory),
    )
    if distill:
        with placement_from(args), step_bar("distilling emulator", distill.steps, "kd") as on_step:
            result = prepare(args.model, args.out, opts, on_distill_step=on_step)
    else:  # no model runs: the emulator is written from the checkpoint's files
        result = prepare(args.model, args.out, opts)
    owner_service.record_prepared(args, args.out)
    if args.json:
        print_json(
            {
                "bundle": str(args.out),
                "bundle_id": result.bundle_id,
                "layer_map": result.layer_map,
                "distillation": result.distillation,
            }
        )
        return 0
    console.print(f"[green]bundle written[/green] to {args.out}")
    console.print(f"bundle id  {result.bundle_id}")
    console.print(f"emulator   layers {result.layer_map} (original indices)")
    if result.distillation:
        d = result.distillation
        ppl = d["held_out_perplexity"]
        console.print(
            table(
                "distillation (held-out public text)",
                ["", "value"],
                [
                    ("final KD loss", f"{d['final_kd_loss']:.4f}"),
                    (
                        "KD before → after",
                        f"{d['held_out_kd']['before']:.4f} → {d['held_out_kd']['after']:.4f}",
                    ),
                    ("perplexity full model", f"{ppl['full']:.2f}"),
                    (
                        "perplexity emulator before → after",
                        f"{ppl['emulator_before']:.2f} → {ppl['emulator_after']:.2f}",
                    ),
                ],
            )
        )
    return 0


def _memory_map(items: list[str]) -> dict[str, str]:
    from offsite.errors import OffsiteError

    out = {}
    for item in items:
        where, sep, size = item.partition("=")
        if not sep or not where or not size:
            raise OffsiteError(
                f"--teacher-max-memory takes WHERE=SIZE (e.g. 0=20GiB or cpu=64GiB), got {item!r}"
            )
        out[where] = size
    return out


def cmd_plug(args: argparse.Namespace) -> int:
    from offsite.plug import plug

    with owner_service.plug_inputs(args) as (adapter_dir, manifests, on_success):
        result = plug(args.model, adapter_dir, args.out, manifests, max_shard_bytes=args.max_shard_size)
        on_success()
    if args.json:
        print_json(
            {
                "merged": str(args.out),
                "bundle_id": result.bundle_id,
                "kind": result.kind,
                "layers": result.layers,
                "peft": str(result.peft_dir) if result.peft_dir else None,
            }
        )
        return 0
    console.print(f"[green]adapter verified and plugged in[/green]: {result.kind} on layers {result.layers}")
    console.print(f"merged model written to {args.out}")
    if result.peft_dir:
        console.print(f"PEFT LoRA export: {result.peft_dir}")
    return 0


def cmd_finetune_full(args: argparse.Namespace) -> int:
    from offsite.full_finetune import finetune_full
    from offsite.training.finetune import TrainConfig

    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    with placement_from(args), step_bar("full fine-tuning") as on_step:
        finetune_full(args.model, args.data, args.out, cfg, num_labels=args.num_labels, on_step=on_step)
    console.print(f"[green]fully fine-tuned model written[/green] to {args.out}")
    return 0
