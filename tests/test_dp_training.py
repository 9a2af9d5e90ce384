"""DP training end to end: noise, budgets across runs, receipts, resume, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import make_dp_setup, make_tiny_checkpoint, write_lm_records

from offsite import crypto
from offsite.errors import BudgetError, DataError, FormatError, IntegrityError, OffsiteError
from offsite.formats.bundle import Bundle
from offsite.prepare import PrepareOptions, prepare
from offsite.privacy import history
from offsite.privacy.receipt_audit import verify_receipt
from offsite.training.dp import add_noise_and_scale, default_delta, make_plan, size_bucket
from offsite.training.noise import NOISE, ChaChaStream
from offsite.tune import TuneOptions, state_dir_for, tune


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    return make_dp_setup(root)


def _budgets(setup, dataset_id):
    # One budget directory per dataset id: the tests reuse the same records under several ids, which
    # one directory would (rightly) refuse as overlapping datasets.
    return setup / "budgets" / dataset_id


def _opts(setup, **kw):
    base = dict(
        epochs=1,
        batch_size=16,
        lr=1e-2,
        eval_fraction=0.0,
        dataset_id="ds",
        epsilon=20.0,  # the dataset's budget (first run); σ is given, so it is only checked
        noise_multiplier=1.0,
        keys_dir=setup / "keys",
    )
    base.update(kw)
    base.setdefault("budget_dir", _budgets(setup, base["dataset_id"] or "none"))
    return TuneOptions(**base)


def test_noise_has_standard_deviation_sigma_times_c_and_is_divided_by_the_nominal_batch():
    params = [torch.nn.Parameter(torch.zeros(200, 100)), torch.nn.Parameter(torch.zeros(37))]
    sigma, c, nominal = 1.3, 0.7, 16
    size = sum(p.numel() for p in params)

    def run(stream):
        for p in params:
            p.grad = torch.zeros_like(p)  # the clipped sum is zero: p.grad is pure noise
        add_noise_and_scale(params, stream.normals(NOISE, 1, size), sigma * c, nominal)
        return torch.cat([p.grad.flatten() for p in params]) * nominal

    noise = run(ChaChaStream.insecure_from_seed(1))
    # 20,037 draws: the sample s.d. is within 2% of the truth with overwhelming probability.
    assert abs(noise.std().item() / (sigma * c) - 1) < 0.02
    assert abs(noise.mean().item()) < 0.05
    assert torch.equal(run(ChaChaStream.insecure_from_seed(1)), noise)
    assert not torch.equal(run(ChaChaStream.insecure_from_seed(2)), noise)
    assert not torch.equal(run(ChaChaStream.from_os()), run(ChaChaStream.from_os()))
    # The clipped sum is kept and the whole is divided by the nominal batch.
    for p in params:
        p.grad = torch.full_like(p, 32.0)
    add_noise_and_scale(params, np.zeros(size, dtype=np.float32), sigma * c, nominal)
    assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in params)
    with pytest.raises(ValueError, match="noise has"):
        add_noise_and_scale(params, np.zeros(size + 1, dtype=np.float32), 1.0, 1)


def test_plan_refuses_what_it_must():
    with pytest.raises(DataError, match="fewer records than one batch"):
        make_plan(10, 16, 1, prior_history=[], epsilon=8, delta=None, noise_multiplier=None, max_grad_norm=1)
    with pytest.raises(BudgetError, match="not below 1/N"):
        make_plan(100, 16, 1, prior_history=[], epsilon=8, delta=0.01, noise_multiplier=None, max_grad_norm=1)
    assert [size_bucket(n) for n in (1, 2, 3, 64, 65, 2880)] == [1, 2, 4, 64, 128, 4096]
    assert default_delta(128) == 1e-4 and default_delta(4096) == 1e-5 and default_delta(1) == 0.1
    assert all(default_delta(size_bucket(n)) <= 0.1 / n for n in range(1, 5000))
    plan = make_plan(
        64, 16, 2, prior_history=[], epsilon=None, delta=None, noise_multiplier=1.0, max_grad_norm=1
    )
    assert (plan.sample_rate, plan.steps, plan.nominal_batch, plan.size_bucket) == (0.25, 8, 16, 64)


@pytest.mark.parametrize("n", [33, 40, 63, 64])
def test_plan_is_a_function_of_the_size_bucket_only(n):
    def plan(records):
        return make_plan(
            records, 8, 3, prior_history=[], epsilon=4.0, delta=None, noise_multiplier=None, max_grad_norm=1
        )

    assert plan(n) == plan(64)  # every N in (32, 64] plans the same run
    p = plan(n)
    assert p.sample_rate == 8 / 64 and p.steps == 24 and p.delta == 1e-3
    assert p.sample_rate * n <= p.nominal_batch < 2 * p.sample_rate * n  # expected batch in (B/2, B]


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
        tmp_path / "a", public_key=crypto.load_public_key(crypto.KeyPaths.in_dir(setup / "keys").public_key)
    )
    assert report.ok and report.signer_verified
    r = result.receipt
    assert r["run_history"] == [
        {"mechanism": "poisson-subsampled-gaussian", "noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 4}
    ]
    # No field publishes the dataset size: the size bucket stands in for it (the run has 64 records).
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
        "size_bucket",
        "nominal_batch",
        "noise_source",
        "budget",
        "run_history",
        "cumulative_history",
        "epsilon",
        "accountants",
        "signer",
        "versions",
    }
    assert (r["size_bucket"], r["nominal_batch"], r["format_version"]) == (64, 16, 2)
    assert r["noise_source"] == {"generator": "chacha20-box-muller", "seeded": False}
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
    # The budget is the pair the first run fixed: asking for more ε is refused (another δ too, see
    # test_budgets.py)...
    delta = first.receipt["delta"]
    with pytest.raises(BudgetError, match="offsite client set-budget budget --epsilon E --delta D"):
        tune(
            setup / "bundle",
            setup / "train.jsonl",
            tmp_path / "a3",
            _opts(setup, dataset_id="budget", noise_multiplier=None, epsilon=5.0),
        )
    assert (
        not (tmp_path / "a3").exists() and len(history.load_history("budget", _budgets(setup, "budget"))) == 1
    )
    # ... until it is changed explicitly, which is recorded.
    history.set_budget("budget", 5.0, delta, _budgets(setup, "budget"))
    second = tune(
        setup / "bundle",
        setup / "train.jsonl",
        tmp_path / "a3",
        _opts(setup, dataset_id="budget", noise_multiplier=None, epsilon=None),
    )
    assert [
        (c["epsilon"], c["how"])
        for c in history.budget_for_receipt("budget", _budgets(setup, "budget"))["changes"]
    ] == [
        (3.0, "first-run"),
        (5.0, "set-budget"),
    ]
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
    spent = history.load_history("resume", _budgets(setup, "resume"))
    assert [e["steps"] for e in spent] == [4]  # the whole run was reserved before it started
    result = tune(
        setup / "bundle", setup / "train.jsonl", out, _opts(setup, dataset_id="resume", checkpoint_every=2)
    )
    assert result.resumed_from == 2
    final = history.load_history("resume", _budgets(setup, "resume"))
    assert len(final) == 1 and final[0]["steps"] == 4 and final[0]["run_id"] == result.run_id
    assert not state_dir_for(out).exists()


def test_refusals_leave_nothing_behind(setup, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        tune(setup / "bundle", empty, tmp_path / "o1", _opts(setup))
    with pytest.raises(DataError, match="fewer records than one batch"):
        tune(setup / "bundle", setup / "train.jsonl", tmp_path / "o2", _opts(setup, batch_size=128))
    with pytest.raises(OffsiteError, match="keys init"):
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
    assert history.load_history("ds", _budgets(setup, "ds")) == []


# -- crashes, options and non-finite adapters ------------------------------------------------------


def test_ctrl_c_before_the_first_periodic_checkpoint_resumes_under_its_reservation(setup, tmp_path):
    out = tmp_path / "a"

    def stop_at_1(step, _):
        if step == 1:
            raise KeyboardInterrupt

    opts = _opts(setup, dataset_id="early", checkpoint_every=20)
    with pytest.raises(KeyboardInterrupt):
        tune(setup / "bundle", setup / "train.jsonl", out, opts, on_step=stop_at_1)
    reserved = history.load_history("early", _budgets(setup, "early"))
    assert len(reserved) == 1 and state_dir_for(out).is_dir()  # the step-0 state, committed with it
    result = tune(setup / "bundle", setup / "train.jsonl", out, opts)
    assert result.resumed_from == 0 and result.run_id == reserved[0]["run_id"]
    assert history.load_history("early", _budgets(setup, "early")) == reserved  # not reserved again


def test_a_state_from_another_run_is_refused_saying_what_differs(setup, tmp_path):
    out = tmp_path / "a"

    def stop(step, _):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(setup / "bundle", setup / "train.jsonl", out, _opts(setup, dataset_id="other"), on_step=stop)
    with pytest.raises(OffsiteError, match=r"other inputs, output or settings \(lr differ\).*remove"):
        tune(setup / "bundle", setup / "train.jsonl", out, _opts(setup, dataset_id="other", lr=2e-2))
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join((setup / "train.jsonl").read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(OffsiteError, match=r"\(dataset_fingerprint differ\)"):
        tune(setup / "bundle", fewer, out, _opts(setup, dataset_id="other"))
    assert len(history.load_history("other", _budgets(setup, "other"))) == 1


BAD_OPTIONS = [
    dict(max_grad_norm=float("nan")),
    dict(max_grad_norm=float("inf")),
    dict(max_grad_norm=0.0),
    dict(max_grad_norm=-1.0),
    dict(max_grad_norm=1e38),
    dict(lr=float("inf")),
    dict(lr=0.0),
    dict(lr=-1.0),
    dict(lr=float("nan")),
    dict(lr=1e30),
    dict(epochs=0),
    dict(epochs=1.5),
    dict(batch_size=0),
    dict(physical_batch_size=0),
    dict(checkpoint_every=0),
    dict(seed=-1),
    dict(eval_fraction=1.0),
    dict(eval_fraction=float("nan")),
    dict(max_length=0),
    dict(epsilon=float("inf")),
    dict(epsilon=float("nan")),
    dict(epsilon=0.0),
    dict(epsilon=-3.0),
    dict(delta=0.0),
    dict(delta=1.0),
    dict(delta=float("nan")),
    dict(noise_multiplier=float("nan")),
    dict(noise_multiplier=float("inf")),
    dict(noise_multiplier=0.0),
    dict(noise_multiplier=0.01),
    dict(noise_multiplier=True),
    dict(inherit=("opts",)),
    dict(inherit=("x", "x")),
    dict(inherit=("../x",)),
    dict(dp=False, epsilon=None, noise_multiplier=None, new_budget=True),
]


@pytest.mark.parametrize("bad", BAD_OPTIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_every_option_is_checked_before_any_budget_is_reserved(setup, tmp_path, bad):
    budgets = tmp_path / "budgets"
    with pytest.raises(OffsiteError, match="|".join(f"--{k.replace('_', '-')}" for k in bad if k != "dp")):
        tune(
            setup / "bundle",
            setup / "train.jsonl",
            tmp_path / "a",
            _opts(setup, dataset_id="opts", budget_dir=budgets, **bad),
        )
    assert not budgets.exists() and not (tmp_path / "a").exists()
    assert not state_dir_for(tmp_path / "a").exists()


def test_the_command_line_checks_options_before_reserving(setup, tmp_path, monkeypatch, capsys):
    from offsite.cli.main import main

    monkeypatch.setenv("OFFSITE_CLIENT_DIR", str(tmp_path / "client"))
    crypto.init_client_keys(tmp_path / "client")
    for flag, value in (("--lr", "inf"), ("--max-grad-norm", "nan"), ("--epochs", "0"), ("--delta", "2")):
        argv = ["client", "train", str(setup / "bundle"), "--data", str(setup / "train.jsonl")]
        argv += ["--out", str(tmp_path / "a"), "--dataset-id", "cli", "--epsilon", "4", flag, value]
        assert main(argv) == 2
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "client" / "budgets").exists() and not (tmp_path / "a").exists()


def _bundle_with_final_norm(setup, tmp_path, value: float):
    from safetensors.torch import load_file, save_file

    src = make_tiny_checkpoint(tmp_path / "model", "llama", layers=6)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], value)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    prepare(src, tmp_path / "bundle", PrepareOptions())
    return tmp_path / "bundle"


def test_no_adapter_and_no_receipt_for_a_non_finite_adapter(setup, tmp_path):
    # A (finite) final norm near float32's maximum overflows the logits: training yields NaN.
    bundle = _bundle_with_final_norm(setup, tmp_path, 3e38)
    out = tmp_path / "a"
    with pytest.raises(OffsiteError, match="NaN or infinite.*no adapter or receipt.*stays recorded"):
        tune(bundle, setup / "train.jsonl", out, _opts(setup, dataset_id="nan", budget_dir=tmp_path / "b"))
    assert not out.exists() and not state_dir_for(out).exists()
    assert len(history.load_history("nan", tmp_path / "b")) == 1  # the reserved budget stays spent


def test_a_bundle_with_non_finite_weights_is_refused_before_reserving(setup, tmp_path):
    bundle = _bundle_with_final_norm(setup, tmp_path, float("nan"))
    with pytest.raises(FormatError, match="NaN or infinite values"):
        tune(bundle, setup / "train.jsonl", tmp_path / "a", _opts(setup, budget_dir=tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_the_same_records_as_csv_under_another_id_must_inherit_or_say_new_budget(setup, tmp_path):
    import csv

    budgets = tmp_path / "client"
    first = tune(setup / "bundle", setup / "train.jsonl", tmp_path / "a", _opts(setup, budget_dir=budgets))
    same = tmp_path / "same.csv"  # the same records, as CSV with other columns in another order
    with open(same, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["completion", "note", "prompt"])
        for line in (setup / "train.jsonl").read_text().splitlines():
            r = json.loads(line)
            w.writerow([r["completion"], "copied", r["prompt"]])
    with pytest.raises(BudgetError, match=r"also in ds \(64 of .*--inherit ds"):
        tune(setup / "bundle", same, tmp_path / "b", _opts(setup, dataset_id="copy", budget_dir=budgets))
    assert not (tmp_path / "b").exists() and history.load_history("copy", budgets) == []
    second = tune(
        setup / "bundle",
        same,
        tmp_path / "b",
        _opts(setup, dataset_id="copy", budget_dir=budgets, inherit=("ds",)),
    )
    assert [e["run_id"] for e in second.receipt["cumulative_history"]] == [second.run_id, first.run_id]
    eps = second.receipt["epsilon"]
    assert eps["cumulative"]["prv_upper"] > eps["this_run"]["prv_upper"]
    assert history.budget_for_receipt("copy", budgets)["inherits"] == ["ds"]


def test_two_runs_writing_one_output_do_not_train_together(setup, tmp_path):
    from offsite.fileio import exclusive_lock

    out = tmp_path / "a"
    with (
        exclusive_lock(state_dir_for(out) / ".lock"),  # what a running `client train` holds
        pytest.raises(OffsiteError, match="another `offsite client train` is using"),
    ):
        tune(setup / "bundle", setup / "train.jsonl", out, _opts(setup, budget_dir=tmp_path / "b"))
    assert not (tmp_path / "b" / "budgets" / "ds.json").exists() and not out.exists()


def _published(adapter_dir) -> dict:
    """adapter.json and the receipt without ids, hashes, times and the fingerprint."""
    meta = json.loads((adapter_dir / "adapter.json").read_text())
    meta.pop("sha256")
    receipt = json.loads((adapter_dir / "receipt.json").read_text())
    for key in ("run_id", "created_at", "dataset_id", "dataset_fingerprint", "adapter_sha256"):
        receipt.pop(key)
    for entry in receipt["cumulative_history"]:
        entry.pop("run_id")
    for change in receipt["budget"]["changes"]:
        change.pop("at")
    return {"adapter.json": meta, "receipt.json": receipt}


def test_n_and_n_plus_one_records_publish_the_same_fields(setup, tmp_path):
    # 40 and 41 records share the size bucket 64: with the same flags nothing published may differ.
    published = []
    for n in (40, 41):
        data = write_lm_records(tmp_path / f"train{n}.jsonl", n, seed=n)
        opts = _opts(setup, dataset_id=f"size-{n}", noise_multiplier=None, epsilon=4.0, batch_size=8)
        result = tune(setup / "bundle", data, tmp_path / f"a{n}", opts)
        assert result.plan.size_bucket == 64 and result.plan.sample_rate == 8 / 64
        published.append(_published(tmp_path / f"a{n}"))
    assert published[0] == published[1]
    assert published[0]["receipt.json"]["size_bucket"] == 64


def test_a_seeded_run_is_reproducible_and_its_receipt_fails_the_audit(setup, tmp_path, capsys):
    import argparse

    from safetensors.torch import load_file

    from offsite.cli.audit import register

    def train(name, **kw):
        tune(setup / "bundle", setup / "train.jsonl", tmp_path / name, _opts(setup, dataset_id=name, **kw))
        return load_file(str(tmp_path / name / "adapter.safetensors"))

    a, b = train("s1", noise_seed=11), train("s2", noise_seed=11)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed: same sampling and noise
    c, d = train("u1"), train("u2")
    assert not all(torch.equal(c[k], d[k]) for k in c)  # fresh keys: different noise

    parser = argparse.ArgumentParser(prog="offsite")
    register(parser.add_subparsers(dest="command", required=True))
    pub = crypto.KeyPaths.in_dir(setup / "keys").public_key
    argv = ["audit", "receipt", str(tmp_path / "s1" / "receipt.json"), "--adapter", str(tmp_path / "s1")]
    args = parser.parse_args([*argv, "--pubkey", str(pub), "--json"])
    assert args.func(args) == 1
    report = json.loads(capsys.readouterr().out)
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    assert [c["name"] for c in failed] == ["noise source"] and "seeded" in failed[0]["detail"]
    args = parser.parse_args(
        [*argv[:2], str(tmp_path / "u1" / "receipt.json"), "--adapter", str(tmp_path / "u1"), "--json"]
    )
    assert args.func(args) == 0
