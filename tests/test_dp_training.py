"""DP training end to end: noise, budgets across runs, receipts, resume, refusals."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny import WORDS, make_tiny_checkpoint

from offsite import crypto
from offsite.errors import BudgetError, DataError, IntegrityError, OffsiteError
from offsite.formats.bundle import Bundle
from offsite.prepare import PrepareOptions, prepare
from offsite.privacy import history
from offsite.privacy.receipt import verify_receipt
from offsite.training.dp import DPPlan, default_delta, make_dp_optimizer, make_plan
from offsite.tune import TuneOptions, state_dir_for, tune


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    src = make_tiny_checkpoint(root / "model", "llama", layers=6)
    prepare(src, root / "bundle", PrepareOptions())
    rng = random.Random(0)
    data = root / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"prompt": " ".join(rng.choices(WORDS, k=4)), "completion": " ".join(rng.choices(WORDS, k=2))}
            )
            + "\n"
            for _ in range(64)
        )
    )
    crypto.init_client_keys(root / "keys")
    return root


def _opts(setup, **kw):
    base = dict(
        epochs=1,
        batch_size=16,
        lr=1e-2,
        eval_fraction=0.0,
        dataset_id="ds",
        noise_multiplier=1.0,
        keys_dir=setup / "keys",
        budget_dir=setup / "keys",
    )
    base.update(kw)
    return TuneOptions(**base)


def test_noise_has_standard_deviation_sigma_times_c():
    params = [torch.nn.Parameter(torch.zeros(200, 100))]
    plan = DPPlan(
        noise_multiplier=1.3, sample_rate=0.1, steps=1, delta=1e-5, max_grad_norm=0.7, expected_batch_size=16
    )
    captured = []

    def run(seed):
        params[0].grad = torch.zeros_like(params[0])  # the clipped sum is zero: p.grad is pure noise
        opt = make_dp_optimizer(torch.optim.SGD(params, lr=0.0), plan, torch.Generator().manual_seed(seed))
        opt.step_hook = lambda o: captured.append(params[0].grad.clone() * plan.expected_batch_size)
        opt.step()
        return captured[-1]

    noise = run(1)
    sd = noise.std().item()
    # 20,000 draws: the sample s.d. is within 2% of the truth with overwhelming probability.
    assert abs(sd / (1.3 * 0.7) - 1) < 0.02
    assert abs(noise.mean().item()) < 0.05
    assert torch.equal(run(1), noise) and not torch.equal(run(2), noise)


def test_plan_refuses_what_it_must():
    with pytest.raises(DataError, match="fewer records than one batch"):
        make_plan(10, 16, 1, prior_history=[], epsilon=8, delta=None, noise_multiplier=None, max_grad_norm=1)
    with pytest.raises(BudgetError, match="not below 1/N"):
        make_plan(100, 16, 1, prior_history=[], epsilon=8, delta=0.01, noise_multiplier=None, max_grad_norm=1)
    assert default_delta(100) == 1e-3 and default_delta(5000) == 1e-5 and default_delta(999) < 1 / 999
    plan = make_plan(
        64, 16, 2, prior_history=[], epsilon=None, delta=None, noise_multiplier=1.0, max_grad_norm=1
    )
    assert (plan.sample_rate, plan.steps, plan.expected_batch_size) == (0.25, 8, 16)


def test_dp_run_moves_only_the_adapter_and_writes_a_valid_receipt(setup, tmp_path):
    bundle = Bundle.open(setup / "bundle")
    emulator, view = bundle.load_emulator()
    before = {n: p.detach().clone() for n, p in emulator.named_parameters()}
    result = tune(setup / "bundle", setup / "train.jsonl", tmp_path / "a", _opts(setup, dataset_id="move"))
    from safetensors.torch import load_file

    trained = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    moved = [n for n, t in trained.items() if not torch.equal(t, view.state_dict()[n])]
    assert len(moved) == len(trained)  # every adapter tensor moved
    report = verify_receipt(
        tmp_path / "a", public_key=crypto.load_public_key(setup / "keys" / crypto.PUBLIC_KEY_FILE)
    )
    assert report.ok and report.signer_verified
    r = result.receipt
    assert r["run_history"] == [
        {"mechanism": "poisson-subsampled-gaussian", "noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 4}
    ]
    # No field publishes the dataset size (q and steps are what accounting needs).
    assert set(r) == {
        "format",
        "format_version",
        "created_at",
        "run_id",
        "bundle_id",
        "dataset_id",
        "dataset_fingerprint",
        "fingerprint_scheme",
        "adapter_sha256",
        "mechanism",
        "neighbouring_relation",
        "delta",
        "max_grad_norm",
        "noise_seed",
        "run_history",
        "cumulative_history",
        "epsilon",
        "accountants",
        "signer",
        "versions",
    }
    assert 64 not in [v for v in r.values() if isinstance(v, int)]
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert "loss" not in json.dumps(meta)
    # The frozen emulator is never touched by training: it is reloaded from the bundle, so check
    # the tuned adapter is the only difference between emulators.
    tuned, tuned_view = bundle.load_emulator()
    tuned_view.load_state_dict(trained)
    adapter_ids = {id(p) for p in tuned_view.named_parameters().values()}
    for n, p in tuned.named_parameters():
        if id(p) not in adapter_ids:
            assert torch.equal(p, before[n]), n


def test_budget_is_total_per_dataset_and_composes(setup, tmp_path):
    first = tune(
        setup / "bundle",
        setup / "train.jsonl",
        tmp_path / "a1",
        _opts(setup, dataset_id="budget", noise_multiplier=None, epsilon=3.0),
    )
    assert first.receipt["epsilon"]["cumulative"]["prv_upper"] <= 3.0
    with pytest.raises(BudgetError, match="already spent"):
        tune(
            setup / "bundle",
            setup / "train.jsonl",
            tmp_path / "a2",
            _opts(setup, dataset_id="budget", noise_multiplier=None, epsilon=3.0),
        )
    assert not (tmp_path / "a2").exists()
    second = tune(
        setup / "bundle",
        setup / "train.jsonl",
        tmp_path / "a3",
        _opts(setup, dataset_id="budget", noise_multiplier=None, epsilon=5.0),
    )
    eps = second.receipt["epsilon"]
    assert eps["cumulative"]["prv_upper"] <= 5.0 + 1e-9
    assert eps["this_run"]["prv_upper"] < eps["cumulative"]["prv_upper"]
    # composed, not added: less than the sum of the two runs' ε
    assert (
        eps["cumulative"]["prv_upper"]
        < first.receipt["epsilon"]["this_run"]["prv_upper"] + eps["this_run"]["prv_upper"]
    )
    assert len(second.receipt["cumulative_history"]) == 2


def test_interrupted_run_resumes_without_resetting_budget(setup, tmp_path):
    out = tmp_path / "a"

    def stop_at_3(step, _):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(
            setup / "bundle",
            setup / "train.jsonl",
            out,
            _opts(setup, dataset_id="resume", checkpoint_every=2),
            on_step=stop_at_3,
        )
    assert not out.exists() and state_dir_for(out).is_dir()
    spent = history.load_history("resume", setup / "keys")
    assert [e["steps"] for e in spent] == [4]  # the whole run was reserved before it started
    result = tune(
        setup / "bundle", setup / "train.jsonl", out, _opts(setup, dataset_id="resume", checkpoint_every=2)
    )
    assert result.resumed_from == 2
    final = history.load_history("resume", setup / "keys")
    assert len(final) == 1 and final[0]["steps"] == 4 and final[0]["run_id"] == result.run_id
    assert not state_dir_for(out).exists()


def test_refusals_leave_nothing_behind(setup, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        tune(setup / "bundle", empty, tmp_path / "o1", _opts(setup))
    with pytest.raises(DataError, match="fewer records than one batch"):
        tune(setup / "bundle", setup / "train.jsonl", tmp_path / "o2", _opts(setup, batch_size=128))
    with pytest.raises(DataError, match="keys init"):
        tune(
            setup / "bundle",
            setup / "train.jsonl",
            tmp_path / "o3",
            _opts(setup, keys_dir=tmp_path / "nokeys"),
        )
    with pytest.raises(OffsiteError, match="dataset-id"):
        tune(setup / "bundle", setup / "train.jsonl", tmp_path / "o4", _opts(setup, dataset_id=None))
    wrong_kind = tmp_path / "mc.jsonl"  # multiple-choice records for a bundle that trains a causal LM
    wrong_kind.write_text('{"question": "the cat", "choices": ["a", "b"], "answer": 1}\n' * 40)
    with pytest.raises(DataError, match="mc.jsonl:1: missing field"):
        tune(setup / "bundle", wrong_kind, tmp_path / "o6", _opts(setup))
    import shutil

    shutil.copytree(setup / "bundle", tmp_path / "bad_bundle")
    (tmp_path / "bad_bundle" / "initial_adapter.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(IntegrityError):
        tune(tmp_path / "bad_bundle", setup / "train.jsonl", tmp_path / "o5", _opts(setup))
    for i in range(1, 7):
        assert not (tmp_path / f"o{i}").exists()
    assert history.load_history("ds", setup / "keys") == []
