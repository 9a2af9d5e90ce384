"""Benchmark: the canary audit's power and cost (`offsite audit canaries`, docs/privacy.md).

    python benchmarks/bench_canaries.py                 # 3 runs per setting, about 3-5 minutes
    python benchmarks/bench_canaries.py --runs 5 --json canaries.json

On the tests' tiny LLaMA (tests/tiny.py: 6 blocks of width 32; the bundle's adapter is blocks 0, 1, 4, 5),
runs the audit of 1000 canaries at the settings of tests/test_canaries.py (size bucket 1024, q = 128/1024,
128 steps, C = 1, δ = 1e-5), interleaving the settings over the runs: without DP (σ = 0), with σ for ε = 1
(within the audit's reach), with σ for ε = 8 (beyond it: 1000 canaries cannot show more than 5.04) and with
σ = 0.5 (ε ≈ 43). Prints, per run, the ε lower bound (95%), the accountant's ε, AUROC, TPR at FPR 1%, and
the seconds spent training and in total; then the range per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the offsite command does
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from tiny import make_tiny_checkpoint  # noqa: E402

from offsite.canary_audit import AuditOptions, run_canary_audit, settings_from_flags  # noqa: E402
from offsite.prepare import PrepareOptions, prepare  # noqa: E402
from offsite.privacy import accounting  # noqa: E402

BUCKET, NOMINAL, STEPS, DELTA, CANARIES = 1024, 128, 128, 1e-5, 1000
SETTINGS = ("no DP", "ε = 1", "ε = 8", "σ = 0.5")


def settings(name: str):
    q = NOMINAL / BUCKET
    if name == "no DP":
        sigma = None
    elif name == "σ = 0.5":
        sigma = 0.5
    else:  # "ε = E"
        sigma = accounting.calibrate_noise([], q, STEPS, float(name.split("=")[1]), DELTA)
    return settings_from_flags(
        noise_multiplier=sigma, sample_rate=q, steps=STEPS, max_grad_norm=1.0, delta=DELTA, bucket=BUCKET
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write every run's report here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(make_tiny_checkpoint(root / "model", "llama"), root / "bundle", PrepareOptions())
        for run in range(args.runs):
            for name in SETTINGS:
                result = run_canary_audit(root / "bundle", settings(name), AuditOptions(canaries=CANARIES))
                rows.append({"setting": name, "run": run, **result.to_dict()})
                acct = result.accountant_epsilon
                print(
                    f"{name:8s} run {run}: lower bound {result.bound.epsilon:.3f}  accountant "
                    f"{'∞' if acct is None else f'{acct:.3f}'}  AUROC {result.auroc:.3f}  TPR@1% "
                    f"{result.tpr_at_fpr:.3f}  training {result.train_seconds:.1f} s  total {result.seconds:.1f} s",
                    flush=True,
                )
    print()
    for name in SETTINGS:
        mine = [r for r in rows if r["setting"] == name]

        def span(key, mine=mine):
            values = [key(r) for r in mine]
            return f"{min(values):.3f}-{max(values):.3f}"

        print(
            f"{name:8s}: lower bound {span(lambda r: r['epsilon_lower_bound'])}, AUROC {span(lambda r: r['auroc'])}, "
            f"training {span(lambda r: r['seconds']['training'])} s, total {span(lambda r: r['seconds']['total'])} s"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
