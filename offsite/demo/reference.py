"""The demo's non-private reference rows: trained with the sweep's settings, cached by content.

Full fine-tuning, and the adapter trained without DP (scored on the emulator and plugged into the
full model), are deterministic given their inputs: the model, the bundle (its id pins every file),
the training and evaluation files, the settings, the seed, the library code and versions, the
torch thread count and the placement (device, frozen dtype). A warm run reuses their scores from a cache entry keyed by the sha256 of all of
these, instead of training the same thing again; anything that changes any input (a code edit
included) misses the cache and recomputes. The private rows are never cached: DP noise is fresh
every run.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from offsite import device
from offsite.demo.settings import EMULATOR_NODP, FULL_FT, PLUGIN_NODP, REFERENCE, Reference
from offsite.evaluation.settings import EvalInputs, Row, evaluate_settings
from offsite.fileio import canonical_json, sha256_bytes, sha256_file, write_bytes_atomic
from offsite.formats.bundle import Bundle
from offsite.full_finetune import finetune_full
from offsite.models.loading import model_fingerprint
from offsite.plug import manifest_from_bundle_dir, plug
from offsite.training.finetune import TrainConfig
from offsite.tune import TuneOptions, tune

ROWS = (FULL_FT, EMULATOR_NODP, PLUGIN_NODP)
# Which row of `evaluate_settings` each reference row is.
_SOURCE = {FULL_FT: "full fine-tuned", EMULATOR_NODP: "emulator fine-tuned", PLUGIN_NODP: "plug-in"}


def code_digest() -> str:
    """sha256 over the library's Python sources: any code change makes a new cache key."""
    import offsite

    root = Path(offsite.__file__).parent
    table = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*.py"))}
    return sha256_bytes(canonical_json(table))


def _placement() -> dict:
    p = device.current()
    return {
        "device": str(p.device),
        "frozen_dtype": str(p.frozen_dtype),
        "gradient_checkpointing": p.gradient_checkpointing,
    }


def cache_key(
    model_dir: Path,
    bundle_dir: Path,
    train_file: Path,
    eval_file: Path,
    seed: int,
    refs: dict[str, Reference],
) -> str:
    import tokenizers
    import transformers

    inputs = {
        "code": code_digest(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "torch_threads": torch.get_num_threads(),
        # Another device or precision computes other floating-point results (--device on the demo).
        "placement": _placement(),
        "model": model_fingerprint(model_dir),
        "bundle": Bundle.open(bundle_dir).id,
        "train": sha256_file(train_file),
        "eval": sha256_file(eval_file),
        "reference": {row: refs[row].to_json() for row in ROWS},
        "seed": seed,
    }
    return sha256_bytes(canonical_json(inputs))


def _read_cached(path: Path) -> dict[str, Row] | None:
    """The cached rows, or None if absent or not what this module writes (then they are recomputed)."""
    try:
        data = json.loads(path.read_bytes())
        rows = {}
        for row in ROWS:
            entry = data["rows"][row]
            metrics = {str(k): float(v) for k, v in entry["metrics"].items()}
            hyper = entry["hyperparameters"]
            rows[row] = Row(row, metrics, hyperparameters=dict(hyper) if isinstance(hyper, dict) else None)
        return rows
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def reference_rows(
    model_dir: Path,
    bundle_dir: Path,
    train_file: Path,
    eval_file: Path,
    seed: int,
    work: Path,
    cache_dir: Path,
    refresh: bool = False,
    refs: dict[str, Reference] = REFERENCE,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, Row], bool]:
    """The three reference rows and whether they came from the cache.

    On a miss, or with ``refresh``, the rows are trained into ``work`` (``full-ft``,
    ``adapter-nodp*``, ``merged-nodp``), scored, and written to ``cache_dir``.
    """
    key = cache_key(model_dir, bundle_dir, train_file, eval_file, seed, refs)
    entry = cache_dir / f"{key}.json"
    if not refresh and entry.is_file():
        cached = _read_cached(entry)
        if cached is not None:
            return cached, True
    rows = _train_and_score(model_dir, bundle_dir, train_file, eval_file, seed, work, refs, on_step)
    entry.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "key": key,
        "rows": {
            r.setting: {"metrics": r.metrics, "hyperparameters": r.hyperparameters} for r in rows.values()
        },
    }
    write_bytes_atomic(entry, canonical_json(doc))
    return rows, False


def _train_and_score(
    model_dir: Path,
    bundle_dir: Path,
    train_file: Path,
    eval_file: Path,
    seed: int,
    work: Path,
    refs: dict[str, Reference],
    on_step,
) -> dict[str, Row]:
    done = [0, 0]  # steps of finished trainings, steps of the current one: one bar counts them all

    def step(n: int, loss: float) -> None:
        done[1] = n
        if on_step:
            on_step(done[0] + n, loss)

    def finished() -> None:
        done[0], done[1] = done[0] + done[1], 0

    ft = refs[FULL_FT]
    cfg = TrainConfig(epochs=ft.epochs, lr=ft.lr, batch_size=ft.batch_size, seed=seed)
    finetune_full(model_dir, train_file, work / "full-ft", cfg, on_step=step)
    finished()
    # The emulator and plug-in rows each use their own chosen setting; one setting is trained once.
    adapters: dict[tuple, Path] = {}
    for row in (EMULATOR_NODP, PLUGIN_NODP):
        r = refs[row]
        setting = (r.lr, r.epochs, r.batch_size)
        if setting not in adapters:
            adapters[setting] = work / ("adapter-nodp" if not adapters else f"adapter-nodp-{len(adapters)}")
            opts = TuneOptions(
                epochs=r.epochs, lr=r.lr, batch_size=r.batch_size, seed=seed, eval_fraction=0.0, dp=False
            )
            tune(bundle_dir, train_file, adapters[setting], opts, on_step=step)
            finished()

    def adapter_of(row: str) -> Path:
        r = refs[row]
        return adapters[(r.lr, r.epochs, r.batch_size)]

    plug(model_dir, adapter_of(PLUGIN_NODP), work / "merged-nodp", manifest_from_bundle_dir(bundle_dir))
    report = evaluate_settings(
        eval_file,
        "mc",
        EvalInputs(
            bundle=bundle_dir,
            adapter=adapter_of(EMULATOR_NODP),
            merged=work / "merged-nodp",
            full_ft=work / "full-ft",
        ),
    )
    by_setting = {r.setting: r for r in report.rows}
    return {
        row: Row(
            row, by_setting[_SOURCE[row]].metrics, hyperparameters=by_setting[_SOURCE[row]].hyperparameters
        )
        for row in ROWS
    }
