"""`offsite client`: the data owner's commands (fine-tune an adapter privately, manage keys)."""

from __future__ import annotations

import argparse
from pathlib import Path

from offsite.cli.ui import console, err_console, table


def register(sub: argparse._SubParsersAction) -> None:
    client = sub.add_parser("client", help="data owner: fine-tune adapters on private data",
                            description="Commands for a data owner, whose data never leaves its machine.")
    cmds = client.add_subparsers(dest="client_command", metavar="COMMAND", required=True)
    p = cmds.add_parser(
        "train", help="fine-tune a bundle's adapter on local data",
        description="Fine-tune the adapter of BUNDLE on the emulator with local data and write ADAPTER "
        "(adapter.safetensors + adapter.json). Only the adapter leaves this machine; losses are shown here.")
    p.add_argument("bundle", type=Path, help="bundle directory from the model owner")
    p.add_argument("--data", type=Path, required=True, help="training records (JSONL, CSV or text)")
    p.add_argument("--out", type=Path, required=True, help="adapter directory to create")
    p.add_argument("--epochs", type=int, default=3, help="passes over the data (default 3)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--seed", type=int, default=0, help="data order, initialisation and dropout")
    p.add_argument("--eval-data", type=Path, default=None, help="records for the per-epoch eval loss")
    p.add_argument("--eval-fraction", type=float, default=0.1,
                   help="without --eval-data: fraction of --data held out for the eval loss (default 0.1)")
    p.add_argument("--max-length", type=int, default=None, help="token limit per record (default: the model's)")
    add_dp_arguments(p)
    p.set_defaults(func=cmd_train)
    from offsite.cli.keys import register_keys

    register_keys(cmds)


def add_dp_arguments(p: argparse.ArgumentParser) -> None:
    """DP flags; the DP issue makes DP the default."""
    p.add_argument("--no-dp", action="store_true", help="train WITHOUT differential privacy")


def cmd_train(args: argparse.Namespace) -> int:
    from offsite.cli.progress import step_bar
    from offsite.data import read_records
    from offsite.fileio import staged_directory
    from offsite.formats.adapter import write_adapter
    from offsite.training.finetune import TrainConfig, mean_loss, train
    from offsite.tune import adapter_tensors_for_export, load_for_tuning

    inputs = load_for_tuning(args.bundle, args.data, eval_data=args.eval_data, eval_fraction=args.eval_fraction,
                             seed=args.seed, max_length=args.max_length, reader=read_records)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    shift = inputs.bundle.task.value == "causal-lm"
    pad = inputs.tokenizer.pad_token_id
    steps = args.epochs * -(-len(inputs.train) // args.batch_size)
    eval_rows = []

    def on_epoch(epoch: int) -> None:
        if inputs.eval:
            loss = mean_loss(inputs.model, inputs.eval, pad, shift)
            eval_rows.append((epoch + 1, f"{loss:.4f}"))
            err_console.print(f"epoch {epoch + 1}: eval loss {loss:.4f}")

    with step_bar("training adapter (no DP)", steps) as on_step:
        train(inputs.model, inputs.view.named_parameters().values(), inputs.train, cfg, pad_id=pad, shift=shift,
              on_step=on_step, on_epoch=on_epoch)
    with staged_directory(args.out) as stage:
        write_adapter(stage, adapter_tensors_for_export(inputs.view, inputs.bundle), spec=inputs.bundle.spec,
                      bundle_id=inputs.bundle.id, source_fingerprint=inputs.bundle.source_fingerprint,
                      hyperparameters={**cfg.to_json(), "dp": False})
    if eval_rows:
        console.print(table("eval loss (this machine only)", ["epoch", "loss"], eval_rows))
    console.print(f"[green]adapter written[/green] to {args.out}")
    return 0
