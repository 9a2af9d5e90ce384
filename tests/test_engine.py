"""Emulator surgery, bundle and adapter formats, plug-in: exactness on every family."""

from __future__ import annotations

import hashlib

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from tiny import ENCODERS, FAMILIES, load_full, make_tiny_checkpoint

from offsite.errors import (
    FormatError,
    IntegrityError,
    MismatchError,
    OffsiteError,
    UnsupportedArchitectureError,
)
from offsite.fileio import staged_directory
from offsite.formats.adapter import write_adapter
from offsite.formats.bundle import Bundle
from offsite.models.adapters import AdapterView, identity_positions
from offsite.models.emulator import build_emulator, emulator_layer_map, kept_middle_indices
from offsite.models.loading import load_model
from offsite.models.registry import architecture_for, get_blocks
from offsite.plug import plug as _plug
from offsite.prepare import PrepareOptions
from offsite.prepare import prepare as _prepare
from offsite.server import admin
from offsite.server.owner_state import OwnerState
from offsite.state import owner_dir
from offsite.tune import adapter_tensors_for_export


def prepare(model, out, opts: PrepareOptions):
    """As the CLI does: record the issued bundle in the owner's state (isolated per test)."""
    result = _prepare(model, out, opts)
    with OwnerState(owner_dir()) as state:
        admin.record_bundle(state, out)
    return result


def plug(model, adapter, out):
    """As the CLI does: find the bundle in the owner's record of issued bundles."""
    with OwnerState(owner_dir()) as state:
        return _plug(model, adapter, out, admin.manifest_source(state))


TOKENS = torch.tensor([[7, 8, 9, 10, 11, 12, 13], [14, 15, 16, 17, 18, 19, 20]])


def _labels(family):
    return 3 if family in ENCODERS else None


def _write(bundle: Bundle, view: AdapterView, out):
    with staged_directory(out) as stage:
        write_adapter(
            stage,
            adapter_tensors_for_export(view, bundle),
            spec=bundle.spec,
            bundle_id=bundle.id,
            source_fingerprint=bundle.source_fingerprint,
            hyperparameters={"test": True},
        )


def _perturb_adapter(view: AdapterView, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in view.named_parameters().values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def test_kept_indices_follow_the_reference_rule():
    # OPT-1.3B "2-8-2": the reference keeps 2,5,7,10,13,16,18,21.
    assert emulator_layer_map(24, 2, 2, 8) == [0, 1, 2, 5, 7, 10, 13, 16, 18, 21, 22, 23]
    for m in range(1, 30):
        for k in range(1, m + 1):
            kept = kept_middle_indices(m, k)
            expect = [0] if k == 1 else [round(i * (m - 1) / (k - 1)) for i in range(k)]
            assert kept == expect and len(set(kept)) == k
            assert kept[0] == 0 and (k == 1 or kept[-1] == m - 1)
    assert emulator_layer_map(24, 2, 2, None) == [0, 1] + [2 + i for i in kept_middle_indices(20, 10)] + [
        22,
        23,
    ]


@pytest.mark.parametrize("args", [(6, 2, 2, 0), (6, 2, 2, 3), (6, 3, 3, 1), (6, 4, 2, 1)])
def test_bad_splits_are_refused(args):
    with pytest.raises(OffsiteError):
        emulator_layer_map(*args)


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*llama"):
        architecture_for("t5")


@pytest.mark.parametrize("family", FAMILIES)
def test_emulator_keeping_every_block_equals_full_model(tmp_path, family):
    src = make_tiny_checkpoint(tmp_path / "m", family)
    model = load_model(src, dtype=torch.float32)
    emulator = build_emulator(model, list(range(6)))
    torch.testing.assert_close(emulator(TOKENS).logits, model(TOKENS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora", [None, 4])
def test_untouched_adapter_plugs_in_exactly(tmp_path, family, lora):
    src = make_tiny_checkpoint(tmp_path / "m", family)
    nl = _labels(family)
    prepare(src, tmp_path / "b", PrepareOptions(lora_rank=lora, num_labels=nl))
    bundle = Bundle.open(tmp_path / "b")
    _, view = bundle.load_emulator()
    _write(bundle, view, tmp_path / "a")
    plug(src, tmp_path / "a", tmp_path / "merged")
    merged = load_full(tmp_path / "merged", family, nl)
    original = load_full(src, family, nl)
    if nl:  # the original model with the bundle's (new) classification head
        AdapterView(original, bundle.spec, identity_positions(6)).attach()
        AdapterView(original, bundle.spec, identity_positions(6)).load_state_dict(view.state_dict())
    torch.testing.assert_close(merged(TOKENS).logits, original(TOKENS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "bloom", "bert"])
def test_trained_lora_merges_and_matches_peft(tmp_path, family):
    src = make_tiny_checkpoint(tmp_path / "m", family)
    nl = _labels(family)
    prepare(src, tmp_path / "b", PrepareOptions(lora_rank=4, num_labels=nl))
    bundle = Bundle.open(tmp_path / "b")
    _, view = bundle.load_emulator()
    _perturb_adapter(view)
    _write(bundle, view, tmp_path / "a")
    plug(src, tmp_path / "a", tmp_path / "merged")
    merged = load_full(tmp_path / "merged", family, nl)
    # Reference: the full model with the same LoRA layers, unmerged.
    reference = load_full(src, family, nl)
    ref_view = AdapterView(reference, bundle.spec, identity_positions(6))
    ref_view.attach()
    ref_view.load_state_dict(view.state_dict())
    expected = reference(TOKENS).logits
    torch.testing.assert_close(merged(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)
    peft_model = PeftModel.from_pretrained(load_full(src, family, nl), tmp_path / "merged" / "peft").eval()
    torch.testing.assert_close(peft_model(input_ids=TOKENS).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_trained_blocks_go_to_their_original_index(tmp_path, family):
    src = make_tiny_checkpoint(tmp_path / "m", family)
    prepare(src, tmp_path / "b", PrepareOptions(emulator_layers=1))
    bundle = Bundle.open(tmp_path / "b")
    emulator, view = bundle.load_emulator()
    _perturb_adapter(view)
    _write(bundle, view, tmp_path / "a")
    plug(src, tmp_path / "a", tmp_path / "merged")
    merged = load_full(tmp_path / "merged", family)
    original = load_full(src, family)
    layer_map = bundle.layer_map  # [0, 1, 2, 4, 5]
    mb, eb, ob = get_blocks(merged), get_blocks(emulator), get_blocks(original)
    for pos, orig in enumerate(layer_map):
        if orig in bundle.spec.layers:
            for (n, a), (_, b) in zip(
                mb[orig].state_dict().items(), eb[pos].state_dict().items(), strict=True
            ):
                torch.testing.assert_close(a, b, msg=n)
    for i in range(6):
        if i not in bundle.spec.layers:
            for (n, a), (_, b) in zip(mb[i].state_dict().items(), ob[i].state_dict().items(), strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def _tensor_hashes(path) -> set[str]:
    out = set()
    for f in path.rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118
                out.add(hashlib.sha256(st.get_tensor(name).numpy().tobytes()).hexdigest())
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_no_dropped_block_tensor_is_in_the_bundle(tmp_path, family):
    src = make_tiny_checkpoint(tmp_path / "m", family, layers=8, distinct=True)
    prepare(src, tmp_path / "b", PrepareOptions(emulator_layers=2, num_labels=_labels(family)))
    bundle = Bundle.open(tmp_path / "b")
    model = load_model(src, dtype="auto")
    dropped = [i for i in range(8) if i not in bundle.layer_map]
    assert dropped == [3, 4]
    shipped = _tensor_hashes(tmp_path / "b")
    blocks = get_blocks(model)
    for i in dropped:
        for name, t in blocks[i].state_dict().items():
            digest = hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
            assert digest not in shipped, f"block {i} tensor {name} leaked into the bundle"
    for i in bundle.layer_map:  # and the kept ones are there, so the check can fire
        t = next(iter(blocks[i].state_dict().values()))
        assert hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() in shipped


def test_tied_weights_stored_once_and_generation_with_cache(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "qwen2", layers=8)
    prepare(src, tmp_path / "b", PrepareOptions(emulator_layers=2))
    bundle = Bundle.open(tmp_path / "b")
    config = bundle.manifest["source"]["config"]
    assert len(config["layer_types"]) == 8
    emulator, _ = bundle.load_emulator()
    assert len(emulator.config.layer_types) == 6
    assert [b.self_attn.layer_idx for b in get_blocks(emulator)] == list(range(6))
    out = emulator.generate(TOKENS[:1], max_new_tokens=5, do_sample=False, use_cache=True)
    no_cache = emulator.generate(TOKENS[:1], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(out, no_cache)
    # GPT-2 ties lm_head to wte: one copy in the emulator file.
    src2 = make_tiny_checkpoint(tmp_path / "g", "gpt2")
    prepare(src2, tmp_path / "gb", PrepareOptions())
    with safe_open(str(tmp_path / "gb" / "emulator" / "model.safetensors"), framework="pt") as st:
        names = list(st.keys())
    assert not any(n.startswith("lm_head") for n in names) and any("wte" in n for n in names)


def test_tampered_bundle_is_refused_before_loading(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "llama")
    prepare(src, tmp_path / "b", PrepareOptions())
    Bundle.open(tmp_path / "b")
    weights = tmp_path / "b" / "emulator" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="emulator/model.safetensors"):
        Bundle.open(tmp_path / "b")


def test_bundle_with_a_missing_or_an_unlisted_file_is_refused(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "gpt2")
    prepare(src, tmp_path / "b", PrepareOptions())
    (tmp_path / "b" / "emulator" / "extra.safetensors").write_bytes(b"{}")
    with pytest.raises(IntegrityError, match="does not list"):
        Bundle.open(tmp_path / "b")
    (tmp_path / "b" / "emulator" / "extra.safetensors").unlink()
    (tmp_path / "b" / "initial_adapter.safetensors").unlink()
    with pytest.raises(IntegrityError, match="initial_adapter.safetensors is missing"):
        Bundle.open(tmp_path / "b")


def test_adapter_checks(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "llama")
    prepare(src, tmp_path / "b", PrepareOptions())
    bundle = Bundle.open(tmp_path / "b")
    _, view = bundle.load_emulator()
    _write(bundle, view, tmp_path / "a")
    # Tampered tensor file: hash mismatch, refused before parsing.
    bad = tmp_path / "tampered"
    import shutil

    shutil.copytree(tmp_path / "a", bad)
    data = bytearray((bad / "adapter.safetensors").read_bytes())
    data[-1] ^= 1
    (bad / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        plug(src, bad, tmp_path / "out1")
    assert not (tmp_path / "out1").exists()
    # Non-finite values.
    with torch.no_grad():
        next(iter(view.named_parameters().values())).view(-1)[0] = float("nan")
    _write(bundle, view, tmp_path / "nan")
    with pytest.raises(FormatError, match="NaN"):
        plug(src, tmp_path / "nan", tmp_path / "out2")
    # A different model.
    other = make_tiny_checkpoint(tmp_path / "other", "llama", seed=5)
    with pytest.raises(MismatchError, match="fingerprint"):
        plug(other, tmp_path / "a", tmp_path / "out3")
    # An adapter for a bundle this owner never issued.
    shutil.copytree(tmp_path / "a", tmp_path / "foreign")
    meta = (tmp_path / "foreign" / "adapter.json").read_text().replace(bundle.id, "0" * 64)
    (tmp_path / "foreign" / "adapter.json").write_text(meta)
    with pytest.raises(FormatError, match="not issued"):
        plug(src, tmp_path / "foreign", tmp_path / "out4")


def test_adapter_with_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from offsite.fileio import canonical_json, sha256_file

    src = make_tiny_checkpoint(tmp_path / "m", "gpt2")
    prepare(src, tmp_path / "b", PrepareOptions())
    bundle = Bundle.open(tmp_path / "b")
    _, view = bundle.load_emulator()
    _write(bundle, view, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "a" / "adapter.safetensors"))
    import json

    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    meta["sha256"]["adapter.safetensors"] = sha256_file(tmp_path / "a" / "adapter.safetensors")
    (tmp_path / "a" / "adapter.json").write_bytes(canonical_json(meta))
    with pytest.raises(FormatError, match="shape"):
        plug(src, tmp_path / "a", tmp_path / "out")


def test_half_precision_checkpoint_keeps_its_dtype_end_to_end(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from offsite.tune import TuneOptions, tune

    src = make_tiny_checkpoint(tmp_path / "m32", "llama")
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(torch.bfloat16).save_pretrained(
        tmp_path / "m"
    )
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src).save_pretrained(tmp_path / "m")
    prepare(tmp_path / "m", tmp_path / "b", PrepareOptions(lora_rank=2))
    bundle = Bundle.open(tmp_path / "b")
    assert bundle.manifest["source"]["dtype"] == "bfloat16"
    assert {t["dtype"] for t in bundle.expected_tensors.values()} == {"bfloat16"}
    emulator, _ = bundle.load_emulator()  # training runs in fp32
    assert next(emulator.parameters()).dtype == torch.float32
    data = tmp_path / "d.txt"
    data.write_text("the cat sat on the mat\na dog is red\n" * 8)
    tune(tmp_path / "b", data, tmp_path / "a", TuneOptions(dp=False, epochs=1, batch_size=4, eval_fraction=0))
    assert {t.dtype for t in load_file(str(tmp_path / "a" / "adapter.safetensors")).values()} == {
        torch.bfloat16
    }
    plug(tmp_path / "m", tmp_path / "a", tmp_path / "merged")
    merged = load_model(tmp_path / "merged")  # dtype="auto"
    assert next(merged.parameters()).dtype == torch.bfloat16
