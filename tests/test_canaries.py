"""The one-run canary audit: its statistics (against exact and brute-force values) and `offsite audit
canaries` end to end on a real tiny model: clearly positive without DP, below the accountant's ε with it,
and a FAIL for a DP-SGD that forgets its noise."""

from __future__ import annotations

import itertools
import json
import math
import random
from fractions import Fraction

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tiny import make_tiny_checkpoint

from offsite.canary_audit import (
    AuditOptions,
    default_bucket,
    run_canary_audit,
    settings_from_flags,
    settings_from_receipt,
)
from offsite.cli.main import main
from offsite.errors import OffsiteError
from offsite.prepare import PrepareOptions, prepare
from offsite.privacy import accounting
from offsite.privacy.canaries import (
    Hypothesis,
    auroc,
    correct_guesses,
    epsilon_lower_bound,
    guess_accuracy,
    hypotheses,
    max_epsilon,
    one_run_lower_bound,
    p_value,
    tpr_at_fpr,
)
from offsite.privacy.receipt import build_receipt, first_run_budget, write_receipt
from offsite.training import dp

# -- the statistics ---------------------------------------------------------------------------------


def _exact_p_value(m: int, r: int, v: int, p: Fraction, delta: Fraction) -> Fraction:
    """The paper's bound in exact rational arithmetic, each term summed from its definition."""
    pmf = [math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(r + 1)]
    tail = sum(pmf[v:], Fraction(0))
    alpha = max((sum(pmf[v - i : v], Fraction(0)) / i for i in range(1, v + 1)), default=Fraction(0))
    return min(tail + 2 * m * delta * alpha, Fraction(1))


@pytest.mark.parametrize(
    "m, r, v, delta",
    [(10, 10, 10, 0), (100, 40, 30, 0), (1000, 100, 75, 1e-4), (1000, 200, 150, 1e-5), (50, 20, 0, 1e-3)],
)
def test_p_value_matches_exact_rational_arithmetic(m, r, v, delta):
    # ε = ln 3 makes p = e^ε/(1+e^ε) exactly 3/4; ε = ln 2 makes it 2/3.
    for eps, p in ((math.log(3), Fraction(3, 4)), (math.log(2), Fraction(2, 3))):
        exact = _exact_p_value(m, r, v, p, Fraction(delta))
        assert p_value(m, r, v, eps, delta) == pytest.approx(float(exact), rel=1e-9, abs=1e-300)


def test_without_delta_the_p_value_is_exactly_the_chance_of_randomised_response():
    """ε-DP randomised response on each canary is right with probability p = e^ε/(1+e^ε) and attains the
    bound: enumerate all 2^r outcomes of r answers and count those with at least v right."""
    eps, r, m = 0.7, 10, 12
    p = guess_accuracy(eps)
    assert p == pytest.approx(math.exp(eps) / (1 + math.exp(eps)))
    for v in range(r + 1):
        chance = sum(
            math.prod(p if right else 1 - p for right in outcome)
            for outcome in itertools.product((True, False), repeat=r)
            if sum(outcome) >= v
        )
        assert p_value(m, r, v, eps, 0.0) == pytest.approx(chance, rel=1e-9)


def test_lower_bound_reproduces_the_papers_printed_values():
    # Steinke, Nasr and Jagielski, arXiv:2305.08846: its appendix's example (m=1000, r=100, v=75, δ=1e-4,
    # 95%: ε ≥ 0.673) and §7 (m=100000, r=1510, v=1439, δ=1e-5, 95%: ε ≥ 2.675).
    assert epsilon_lower_bound(1000, 100, 75, 1e-4, 0.05) == pytest.approx(0.673, abs=1e-3)
    assert epsilon_lower_bound(100000, 1510, 1439, 1e-5, 0.05) == pytest.approx(2.6755, abs=1e-3)


@pytest.mark.parametrize(
    "m, r, v, delta", [(1000, 100, 90, 1e-5), (1000, 1000, 760, 1e-5), (200, 50, 50, 0.0)]
)
def test_lower_bound_is_the_largest_rejected_epsilon(m, r, v, delta):
    eps = epsilon_lower_bound(m, r, v, delta, 0.01)
    assert eps > 0
    assert p_value(m, r, v, eps, delta) < 0.01  # the bound itself is rejected
    assert p_value(m, r, v, eps + 2e-4, delta) >= 0.01  # and, just above it, not
    assert epsilon_lower_bound(m, r, v, delta, 0.001) < eps  # more confidence, a smaller bound


def test_the_bound_covers_the_truth_for_randomised_response():
    """If the mechanism is ε-DP randomised response, the number right is Binomial(r, p): the chance that
    the 95% bound exceeds the true ε, summed over every outcome, is at most 5% (and not far below it: the
    bound is nearly tight for the mechanism that attains the theorem)."""
    eps, r = 1.0, 200
    p = guess_accuracy(eps)
    bounds = {v: epsilon_lower_bound(r, r, v, 0.0, 0.05) for v in range(r + 1)}
    pmf = [math.comb(r, v) * p**v * (1 - p) ** (r - v) for v in range(r + 1)]
    exceeds = sum(pmf[v] for v in range(r + 1) if bounds[v] > eps)
    assert 0.02 < exceeds <= 0.05
    assert bounds[round(r * p)] > 0.6  # at the typical outcome the bound is well above 0


def test_perfect_guesses_give_a_large_bound_and_random_ones_about_zero():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    perfect = one_run_lower_bound(included.astype(float) + rng.random(1000) * 0.1, included, 1e-5)
    assert perfect.epsilon > 4.0
    assert perfect.best.correct == perfect.best.k_plus + perfect.best.k_minus
    random_bounds = [
        one_run_lower_bound(np.random.default_rng(seed).normal(size=1000), included, 1e-5).epsilon
        for seed in range(10)
    ]
    assert max(random_bounds) < 0.5 and sum(b > 0 for b in random_bounds) <= 1


def test_the_most_an_audit_can_show_is_every_guess_right():
    """The bound grows with the number of correct guesses, so all-correct is the most m canaries can show."""
    each = 0.05 / len(hypotheses(200))
    bounds = [epsilon_lower_bound(200, 200, v, 1e-5, each) for v in range(0, 201, 4)]
    assert bounds == sorted(bounds)
    assert max_epsilon(200, 1e-5) == max(
        epsilon_lower_bound(200, h.guesses, h.guesses, 1e-5, each) for h in hypotheses(200)
    )
    assert max_epsilon(1000, 1e-5) == pytest.approx(5.04, abs=0.01)  # a claim of ε = 8 cannot fail
    # δ = 1e-3 is not far below 1/m: the δ term 2·m·δ·α takes most of what 200 canaries could show.
    assert max_epsilon(200, 1e-3) < max_epsilon(200, 1e-5) / 2
    scores = np.arange(1000.0)
    assert one_run_lower_bound(scores, scores >= 500, 1e-5).epsilon == max_epsilon(1000, 1e-5)


def test_hypotheses_are_fixed_by_m_and_guesses_are_counted_from_the_scores():
    hs = hypotheses(1000)
    assert hs == hypotheses(1000) and len(hs) == 14
    assert Hypothesis(1000, 0) in hs and Hypothesis(500, 500) in hs and Hypothesis(5, 5) in hs
    assert hypotheses(15) == [Hypothesis(10, 0), Hypothesis(5, 5), Hypothesis(15, 0), Hypothesis(8, 7)]
    scores = [5, 4, 3, 2, 1, 0]
    included = [True, False, True, False, False, True]
    # "in" for scores 5 and 4 (1 right), "out" for 1 and 0 (1 right).
    assert correct_guesses(scores, included, Hypothesis(2, 2)) == 2
    assert correct_guesses(scores, included, Hypothesis(3, 0)) == 2
    bound = one_run_lower_bound(scores, included, 0.0)
    assert bound.epsilon == 0 and bound.significance_each == pytest.approx(0.05 / 2)
    with pytest.raises(ValueError, match="finite"):
        one_run_lower_bound([1.0, float("nan")], [True, False], 0.0)


def test_auroc_and_tpr_at_low_fpr():
    assert auroc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert auroc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    assert auroc([1, 1, 1, 1], [True, False, True, False]) == 0.5
    assert auroc([0.9, 0.8, 0.7, 0.1], [True, False, True, False]) == 0.75
    assert auroc([1, 2], [True, True]) is None
    scores = list(range(100)) + [98.5] * 5 + [50] * 5
    included = [False] * 100 + [True] * 10
    # At most 1 of 100 excluded may score ≥ t: t = 98.5 lets 99 through and catches 5 of 10 included.
    assert tpr_at_fpr(scores, included, 0.01) == 0.5
    assert tpr_at_fpr(scores, included, 0.0) == 0.0
    assert tpr_at_fpr(scores, included, 0.5) == 1.0


# -- the audit run ----------------------------------------------------------------------------------

#: The settings the run tests share: bucket 1024 for 1000 canaries, q = 128/1024, 128 steps (16 epochs).
BUCKET, NOMINAL, STEPS, DELTA = 1024, 128, 128, 1e-5
SETTINGS = ["--sample-rate", str(NOMINAL / BUCKET), "--steps", str(STEPS), "--delta", str(DELTA)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("canaries")
    prepare(make_tiny_checkpoint(root / "model", "llama"), root / "bundle", PrepareOptions())
    return root / "bundle"


def _audit(capsys, *args) -> tuple[int, dict]:
    code = main(["audit", "canaries", *map(str, args), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_without_dp_the_audit_shows_epsilon_above_one_with_1000_canaries(bundle, capsys):
    assert default_bucket(1000) == BUCKET
    code, report = _audit(capsys, bundle, "--no-dp", *SETTINGS)
    print("no DP:", {k: report[k] for k in ("epsilon_lower_bound", "auroc", "seconds")})
    assert code == 0 and report["ok"] is True and report["verdict"] == "no-dp"
    assert report["audit_set"]["canaries"] == 1000
    assert BUCKET / 2 < report["audit_set"]["records"] <= BUCKET
    settings = report["settings"]
    assert (settings["noise_multiplier"], settings["nominal_batch"], settings["size_bucket"]) == (
        0.0,
        NOMINAL,
        BUCKET,
    )
    assert report["accountant_epsilon"] is None
    assert report["epsilon_lower_bound"] >= 1.0
    assert report["auroc"] > 0.75


def _receipt(path, sigma: float, q: float, steps: int, bucket: int, nominal: int, delta: float, extra=()):
    """A signed version-2 receipt for a DP run with these settings (and ``extra`` phases), as `client
    train` builds one."""
    key = Ed25519PrivateKey.generate()
    phases = [accounting.make_entry(sigma, q, steps), *extra]
    eps = accounting.epsilon_prv(phases, delta)
    receipt = build_receipt(
        run_history=phases,
        cumulative_history=[{**phase, "run_id": "0" * 32} for phase in phases],
        delta=delta,
        max_grad_norm=1.0,
        size_bucket=bucket,
        nominal_batch=nominal,
        budget=first_run_budget(math.ceil(eps * 100) / 100, delta),
        dataset_id="public-audit",
        dataset_fingerprint="a" * 64,
        adapter_sha256="b" * 64,
        bundle_id="c" * 64,
        signer_public_key=key.public_key(),
        run_id="0" * 32,
    )
    path.mkdir()
    return write_receipt(path, receipt, key)


#: A run the audit can fail: without noise these settings give bounds of about 2 with 200 canaries (the
#: test below), so a claim of ε = 0.5 is within reach.
SMALL = {"m": 200, "bucket": 256, "nominal": 32, "steps": 64, "epsilon": 0.5}


@pytest.fixture(scope="module")
def small_receipt(tmp_path_factory):
    q = SMALL["nominal"] / SMALL["bucket"]
    sigma = accounting.calibrate_noise([], q, SMALL["steps"], SMALL["epsilon"], DELTA)
    path = tmp_path_factory.mktemp("receipt") / "adapter"
    return _receipt(path, sigma, q, SMALL["steps"], SMALL["bucket"], SMALL["nominal"], DELTA)


def test_with_dp_the_audit_stays_below_the_accountant_it_could_exceed(bundle, small_receipt, capsys):
    code, report = _audit(capsys, bundle, "--receipt", small_receipt, "--canaries", SMALL["m"])
    print("DP, ε=0.5:", {k: report[k] for k in ("epsilon_lower_bound", "accountant_epsilon", "auroc")})
    assert code == 0 and report["ok"] is True and report["verdict"] == "pass"
    settings = report["settings"]
    assert (settings["steps"], settings["size_bucket"], settings["nominal_batch"]) == (64, 256, 32)
    assert settings["stated_epsilon"] == pytest.approx(report["accountant_epsilon"], abs=1e-6)
    assert report["accountant_epsilon"] == pytest.approx(SMALL["epsilon"], abs=0.01)
    assert report["could_fail"] is True and report["lower_bound"]["max_epsilon"] > 3
    assert report["epsilon_lower_bound"] < report["accountant_epsilon"]


def test_a_dp_sgd_that_forgets_its_noise_fails_the_audit(bundle, small_receipt, capsys, monkeypatch):
    """The bug the audit exists for: the noise is drawn but never added, at the same settings as above."""
    real = dp.add_noise_and_scale
    monkeypatch.setattr(
        dp, "add_noise_and_scale", lambda params, noise, std, nominal: real(params, noise, 0.0, nominal)
    )
    code, report = _audit(capsys, bundle, "--receipt", small_receipt, "--canaries", SMALL["m"])
    print("no noise, claiming ε=0.5:", {k: report[k] for k in ("epsilon_lower_bound", "accountant_epsilon")})
    assert code == 1 and report["ok"] is False and report["verdict"] == "fail"
    assert report["epsilon_lower_bound"] > report["accountant_epsilon"] == pytest.approx(0.5, abs=0.01)


def test_a_claim_out_of_reach_is_said_before_training(bundle, tmp_path):
    """With 1000 canaries no outcome shows more than about 5: an ε = 8 run cannot fail, and the auditor
    hears it before any training."""
    q = NOMINAL / BUCKET
    receipt = _receipt(
        tmp_path / "a", accounting.calibrate_noise([], q, STEPS, 8.0, DELTA), q, STEPS, BUCKET, NOMINAL, DELTA
    )

    class Stop(Exception):
        pass

    def on_warning(message):
        raise Stop(message)

    def on_total(steps):
        raise AssertionError("training started")

    with pytest.raises(Stop, match=r"cannot show more than ε ≥ 5\.04 .* cannot fail a claim of ε = 8\.00"):
        run_canary_audit(
            bundle, settings_from_receipt(receipt), AuditOptions(), on_warning=on_warning, on_total=on_total
        )


def test_a_receipt_written_by_client_train_is_replayed(world, capsys, tmp_path):
    receipt = json.loads((world.adapter / "receipt.json").read_bytes())
    code, report = _audit(capsys, world.bundle, "--receipt", world.adapter / "receipt.json", "--canaries", 64)
    assert code == 0 and report["verdict"] == "pass"
    settings = report["settings"]
    assert settings["steps"] == receipt["run_history"][0]["steps"]
    assert (
        settings["size_bucket"] == receipt["size_bucket"]
        and settings["nominal_batch"] == receipt["nominal_batch"]
    )
    assert settings["noise_multiplier"] == receipt["run_history"][0]["noise_multiplier"]
    assert settings["stated_epsilon"] == receipt["epsilon"]["this_run"]["prv_upper"]
    assert receipt["size_bucket"] / 2 < report["audit_set"]["records"] <= receipt["size_bucket"]
    assert report["audit_set"]["filler_source"] == "random"
    # Without --json, and with the auditor's own public filler: the settings, a table and the verdict.
    public = tmp_path / "public.jsonl"
    public.write_text("".join(json.dumps({"text": f"the cat sat on mat {i}"}) + "\n" for i in range(64)))
    args = ["audit", "canaries", str(world.bundle), "--receipt", str(world.adapter / "receipt.json")]
    assert main([*args, "--canaries", "64", "--data", str(public)]) == 0
    out = capsys.readouterr().out
    assert "ε lower bound (95%)" in out and "accountant ε (PRV upper)" in out and "AUROC" in out
    assert f"steps={settings['steps']}" in out and "pass" in out
    assert "".join(f"64 filler ({public})".split()) in "".join(out.split())  # however rich wraps it


# -- refusals (before any training) ----------------------------------------------------------------


def test_refusals_are_json_with_exit_2(bundle, tmp_path, capsys, world):
    def refused(*args) -> str:
        code, report = _audit(capsys, *args)
        assert code == 2 and report["ok"] is False and report["verdict"] == "error"
        return report["error"]

    assert "missing --sample-rate, --steps, --delta, --noise-multiplier" in refused(bundle)
    receipt = world.adapter / "receipt.json"
    assert "--steps: the settings come from --receipt" in refused(bundle, "--receipt", receipt, "--steps", 5)
    assert "is not a whole number" in refused(
        bundle, "--no-dp", "--sample-rate", 0.3, "--steps", 4, "--delta", 1e-5
    )
    assert "--no-dp audits σ = 0" in refused(bundle, "--no-dp", "--noise-multiplier", 1, *SETTINGS)
    assert "does not exist" in refused(bundle, "--receipt", tmp_path / "nope.json")
    # The auditor's own data must fill the receipt's bucket (128): 10 records + ~32 canaries do not.
    data = tmp_path / "public.txt"
    data.write_text("".join(" ".join(random.choices(["the", "cat", "sat"], k=5)) + "\n" for _ in range(10)))
    assert "give between" in refused(world.bundle, "--receipt", receipt, "--canaries", 64, "--data", data)
    assert "--canaries must be a whole number ≥ 2" in refused(bundle, "--canaries", 1, "--no-dp", *SETTINGS)
    # A receipt the audit cannot replay: two (σ, q) phases; a q that is not nominal_batch / size_bucket.
    two = _receipt(
        tmp_path / "two", 1.0, 0.125, 10, BUCKET, NOMINAL, DELTA, [accounting.make_entry(2.0, 0.125, 5)]
    )
    assert "2 phases" in refused(bundle, "--receipt", two)
    off_grid = _receipt(tmp_path / "off-grid", 1.0, 0.1, 10, BUCKET, NOMINAL, DELTA)
    assert "is not nominal_batch / size_bucket" in refused(bundle, "--receipt", off_grid)
    with pytest.raises(OffsiteError, match="--sample-rate must be at most 1"):
        settings_from_flags(noise_multiplier=1.0, sample_rate=2.0, steps=1, max_grad_norm=1.0, delta=1e-5)
    with pytest.raises(OffsiteError, match="--lr"):
        AuditOptions(lr=float("nan")).validate()


def test_help_explains_the_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["audit", "canaries", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--receipt", "--noise-multiplier", "--sample-rate", "--steps", "--max-grad-norm", "--delta"):
        assert flag in out
    assert "--no-dp" in out and "95% confidence" in out and "(default 1000)" in out


def test_the_audit_trains_where_the_command_places_it(bundle, capsys, monkeypatch):
    """--device / --frozen-dtype / --gradient-checkpointing reach the audit's training as they reach
    client train's: the emulator's frozen parts in bf16 with the middle checkpointed, the adapter fp32."""
    import torch

    from offsite import canary_audit

    seen = {}
    real = canary_audit.train_dp

    def spy(model, *args, **kwargs):
        seen["model"] = model
        return real(model, *args, **kwargs)

    monkeypatch.setattr(canary_audit, "train_dp", spy)
    code, report = _audit(
        capsys,
        bundle,
        "--no-dp",
        *["--sample-rate", 0.25, "--steps", 2, "--delta", DELTA, "--canaries", 32],
        *["--device", "cpu", "--frozen-dtype", "bf16", "--gradient-checkpointing"],
    )
    assert code == 0 and report["verdict"] == "no-dp"
    model = seen["model"]
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    frozen = [not any(p.requires_grad for p in b.parameters()) for b in model.model.layers]
    assert any(frozen) and [b.gradient_checkpointing for b in model.model.layers] == frozen
    assert {
        p.dtype for b, f in zip(model.model.layers, frozen, strict=True) if f for p in b.parameters()
    } == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
