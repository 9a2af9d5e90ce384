"""Checkpoints written tensor by tensor: the same bytes as loading the model whole.

``offsite owner prepare`` (without distillation) and ``offsite owner plug`` never load the full model;
they stream it from the checkpoint's files. Here both are compared with the in-memory path they
replace (``from_pretrained`` -> ``build_emulator`` / ``plug_in`` + ``merge`` -> ``save_pretrained``),
byte for byte, on tiny real models; sharded checkpoints in and out; and the checks on a sharded
index, which is input like any other.
"""

from __future__ import annotations

import filecmp
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save, save_file
from tiny import make_tiny_checkpoint

from offsite.errors import FormatError
from offsite.fileio import staged_directory
from offsite.formats.adapter import read_adapter, write_adapter
from offsite.formats.bundle import Bundle
from offsite.formats.checkpoint_files import CheckpointFiles
from offsite.formats.safetensors_writer import INDEX, tensor_out, write_safetensors
from offsite.models.emulator import build_emulator
from offsite.models.loading import load_model
from offsite.models.plugin import export_peft, merge, plug_in
from offsite.plug import manifest_from_bundle_dir, plug
from offsite.prepare import PrepareOptions, prepare
from offsite.tune import adapter_tensors_for_export

CONFIG_FILES = ("config.json", "generation_config.json")


def _labels(family: str) -> int | None:
    return 3 if family == "bert" else None  # roberta stays a masked LM: both encoder tasks are covered


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same_files(a, b, names) -> None:
    for name in names:
        assert (a / name).exists() == (b / name).exists(), name
        if (a / name).exists():
            assert filecmp.cmp(a / name, b / name, shallow=False), f"{name} differs"


def test_the_writer_lays_files_out_as_safetensors_does(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"t{i}.{dtype}".removeprefix("torch."): (torch.rand(shape, generator=gen) * 100).to(dtype)
        for i, (dtype, shape) in enumerate(
            [
                (torch.float64, (3,)),
                (torch.float32, (2, 5)),
                (torch.bfloat16, (4, 3)),
                (torch.float16, ()),
                (torch.int64, (2,)),
                (torch.int32, (3, 1)),
                (torch.int16, (0,)),
                (torch.int8, (7,)),
                (torch.uint8, (5,)),
                (torch.bool, (3,)),
                (torch.float32, (0, 4)),
            ]
        )
    }
    for metadata in (None, {"format": "pt"}):
        write_safetensors(tmp_path / "f", [tensor_out(n, t) for n, t in reversed(tensors.items())], metadata)
        assert (tmp_path / "f").read_bytes() == save(tensors, metadata=metadata)
    with pytest.raises(ValueError, match="two tensors of one name"):
        write_safetensors(tmp_path / "g", [tensor_out("x", torch.zeros(1)), tensor_out("x", torch.ones(1))])


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "qwen2", "bloom", "bert", "roberta"])
def test_the_streamed_emulator_is_the_in_memory_one(tmp_path, family):
    src = make_tiny_checkpoint(tmp_path / "m", family, layers=8)
    nl = _labels(family)
    result = prepare(src, tmp_path / "b", PrepareOptions(emulator_layers=2, num_labels=nl))
    streamed = tmp_path / "b" / "emulator"
    # Today's in-memory path: the whole model loaded, the emulator copied out of it and saved.
    reference = tmp_path / "ref"
    build_emulator(load_model(src, num_labels=nl), result.layer_map).save_pretrained(reference)
    _same_files(streamed, reference, CONFIG_FILES)
    if nl is None:
        _same_files(streamed, reference, ["model.safetensors"])
        return
    # A classifier's head is new: drawn from the seed, so it cannot equal the other path's random draw.
    ours, theirs = _tensors(streamed), _tensors(reference)
    assert ours.keys() == theirs.keys()
    new = {"classifier.weight", "bert.pooler.dense.weight"}
    for name in ours.keys() - new:
        assert torch.equal(ours[name], theirs[name]), name
    for name in new:
        assert ours[name].shape == theirs[name].shape and not torch.equal(ours[name], theirs[name])
        assert 0.01 < ours[name].std() < 0.03  # the family's own initialisation, N(0, 0.02)
    # ... and it is a function of the seed, the same in the emulator and in the initial adapter.
    prepare(src, tmp_path / "b2", PrepareOptions(emulator_layers=2, num_labels=nl))
    again = _tensors(tmp_path / "b2" / "emulator")
    initial = load_file(str(tmp_path / "b" / "initial_adapter.safetensors"))
    for name in new:
        assert torch.equal(ours[name], again[name])
        assert torch.equal(ours[name], initial[f"head.{name}"])


def test_a_half_precision_checkpoint_streams_in_its_own_dtype(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m32", "llama", layers=6)
    bf16 = tmp_path / "m"
    load_model(src, dtype=torch.bfloat16).save_pretrained(bf16)
    shutil.copy(src / "tokenizer.json", bf16)
    shutil.copy(src / "tokenizer_config.json", bf16)
    result = prepare(bf16, tmp_path / "b", PrepareOptions(lora_rank=2))
    build_emulator(load_model(bf16), result.layer_map).save_pretrained(tmp_path / "ref")
    _same_files(tmp_path / "b" / "emulator", tmp_path / "ref", [*CONFIG_FILES, "model.safetensors"])
    initial = load_file(str(tmp_path / "b" / "initial_adapter.safetensors"))
    assert {t.dtype for t in initial.values()} == {torch.bfloat16}


def test_lora_starts_as_its_base_from_the_seed(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "opt", layers=6)
    for seed, out in ((0, "b0"), (0, "b0again"), (1, "b1")):
        prepare(src, tmp_path / out, PrepareOptions(lora_rank=4, seed=seed))
    a, again, b = (
        load_file(str(tmp_path / d / "initial_adapter.safetensors")) for d in ("b0", "b0again", "b1")
    )
    assert a.keys() == b.keys() and len(a) == 4 * 6 * 2  # 4 adapter blocks x 6 linears x (A, B)
    for name, t in a.items():
        assert torch.equal(t, again[name])
        if ".lora_B." in name:
            assert not t.any()  # the layer starts exactly as its base
        else:
            fan_in = t.shape[1]
            assert t.abs().max() <= fan_in**-0.5 and t.std() > 0.3 * fan_in**-0.5  # Kaiming-uniform, a=√5
            assert not torch.equal(t, b[name])


def _adapter(tmp_path, src, lora, nl):
    """A bundle of ``src`` and a trained-looking (perturbed) adapter for it."""
    prepare(src, tmp_path / "b", PrepareOptions(lora_rank=lora, num_labels=nl))
    bundle = Bundle.open(tmp_path / "b")
    _, view = bundle.load_emulator()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in view.named_parameters().values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    with staged_directory(tmp_path / "a") as stage:
        write_adapter(
            stage,
            adapter_tensors_for_export(view, bundle),
            spec=bundle.spec,
            bundle_id=bundle.id,
            source_fingerprint=bundle.source_fingerprint,
            hyperparameters={},
        )
    return bundle


def _in_memory_plug(src, bundle, adapter_dir, out, nl) -> None:
    """Today's plug-in: the whole model loaded, the adapter plugged in, merged, saved."""
    adapter = read_adapter(
        adapter_dir,
        expected_tensors=bundle.expected_tensors,
        bundle_id=bundle.id,
        source_fingerprint=bundle.source_fingerprint,
    )
    model = load_model(src, task=bundle.task, dtype="auto", num_labels=nl)
    view = plug_in(model, bundle.spec, adapter.tensors)
    if bundle.spec.kind == "lora":
        export_peft(view, out / "peft", bundle.task)
    merge(model)
    model.save_pretrained(out)


@pytest.mark.parametrize(
    "family,lora", [("gpt2", 4), ("llama", None), ("opt", 4), ("bloom", None), ("bert", 4)]
)
def test_the_streamed_merge_is_the_in_memory_one(tmp_path, family, lora):
    src = make_tiny_checkpoint(tmp_path / "m", family)
    nl = _labels(family)
    bundle = _adapter(tmp_path, src, lora, nl)
    plug(src, tmp_path / "a", tmp_path / "merged", manifest_from_bundle_dir(tmp_path / "b"))
    _in_memory_plug(src, bundle, tmp_path / "a", tmp_path / "ref", nl)
    peft = ["peft/adapter_model.safetensors", "peft/adapter_config.json"] if lora else []
    _same_files(tmp_path / "merged", tmp_path / "ref", [*CONFIG_FILES, "model.safetensors", *peft])


def _shard(src, out, max_shard_size):
    """``src`` saved again by ``save_pretrained`` in shards, with its tokenizer."""
    load_model(src).save_pretrained(out, max_shard_size=max_shard_size)
    shutil.copy(src / "tokenizer.json", out)
    shutil.copy(src / "tokenizer_config.json", out)
    assert (out / INDEX).exists()
    return out


def test_sharded_checkpoints_in_and_out(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "llama", layers=8)
    sharded = _shard(src, tmp_path / "sharded", "40KB")
    result = prepare(sharded, tmp_path / "b", PrepareOptions(emulator_layers=2, max_shard_bytes=30_000))
    emulator = tmp_path / "b" / "emulator"
    index = json.loads((emulator / INDEX).read_text())
    shards = sorted(p.name for p in emulator.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    for f in shards:
        assert (emulator / f).stat().st_size <= 30_000 + 4096  # the limit, plus the header
    build_emulator(load_model(src), result.layer_map).save_pretrained(tmp_path / "ref")
    ours, ref = _tensors(emulator), _tensors(tmp_path / "ref")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[n], ref[n]) for n in ref)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())
    # from_pretrained reads the sharded emulator (the data owner's side), and the bundle verifies.
    model, _ = Bundle.open(tmp_path / "b").load_emulator()
    assert all(torch.equal(p, ref[n].float()) for n, p in model.state_dict().items() if n in ref)

    bundle = _adapter(tmp_path / "plug", sharded, None, None)
    plug(
        sharded,
        tmp_path / "plug" / "a",
        tmp_path / "merged",
        manifest_from_bundle_dir(tmp_path / "plug" / "b"),
        30_000,
    )
    assert (tmp_path / "merged" / INDEX).exists()
    _in_memory_plug(sharded, bundle, tmp_path / "plug" / "a", tmp_path / "ref-merged", None)
    ours, ref = _tensors(tmp_path / "merged"), _tensors(tmp_path / "ref-merged")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[n], ref[n]) for n in ref)


def test_a_legacy_checkpoint_streams_under_current_names(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "bert")
    prepare(src, tmp_path / "canonical", PrepareOptions())
    legacy = tmp_path / "legacy"
    shutil.copytree(src, legacy)
    tensors = load_file(str(src / "model.safetensors"))
    # Old BERT checkpoints store LayerNorm parameters as gamma/beta; transformers renames them on load.
    renamed = {
        n.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
        for n, t in tensors.items()
    }
    assert sum("gamma" in n for n in renamed) > 4
    save_file(renamed, str(legacy / "model.safetensors"), metadata={"format": "pt"})
    prepare(legacy, tmp_path / "b", PrepareOptions())
    _same_files(
        tmp_path / "b" / "emulator", tmp_path / "canonical" / "emulator", ["config.json", "model.safetensors"]
    )


@pytest.mark.parametrize(
    "spoil,match",
    [
        (lambda m: m.__setitem__(next(iter(m)), "../outside.safetensors"), "weight_map"),
        (lambda m: m.__setitem__(next(iter(m)), "/etc/model.safetensors"), "weight_map"),
        (lambda m: m.__setitem__(next(iter(m)), "sub/model.safetensors"), "weight_map"),
        (lambda m: m.__setitem__(next(iter(m)), "missing.safetensors"), "does not exist"),
        (lambda m: m.__setitem__("no.such.tensor", next(iter(m.values()))), "no file holds"),
        (lambda m: m.pop(next(iter(m))), "the index says nothing"),
    ],
)
def test_a_sharded_index_names_only_its_own_files_and_tensors(tmp_path, spoil, match):
    src = make_tiny_checkpoint(tmp_path / "m", "gpt2", layers=2, hidden=16)
    sharded = _shard(src, tmp_path / "s", "10KB")
    index = json.loads((sharded / INDEX).read_text())
    spoil(index["weight_map"])
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(FormatError, match=match):
        CheckpointFiles(sharded)
    with pytest.raises(FormatError):
        prepare(sharded, tmp_path / "b", PrepareOptions(adapter_bottom=1, adapter_top=0))
    assert not (tmp_path / "b").exists()


def test_an_index_that_misplaces_a_tensor_is_refused(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "gpt2", layers=2, hidden=16)
    sharded = _shard(src, tmp_path / "s", "10KB")
    index = json.loads((sharded / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(FormatError, match=f"tensor {name} is in {files[0]}, the index says {files[1]}"):
        CheckpointFiles(sharded)


def test_a_checkpoint_without_weights_or_with_a_bad_header_is_refused(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "gpt2", layers=2, hidden=16)
    data = bytearray((src / "model.safetensors").read_bytes())
    (src / "model.safetensors").write_bytes(bytes(data[:-3]))
    with pytest.raises(FormatError, match="tensor data"):
        prepare(src, tmp_path / "b", PrepareOptions(adapter_bottom=1, adapter_top=0))
    (src / "model.safetensors").unlink()
    with pytest.raises(FormatError, match="model.safetensors does not exist"):
        CheckpointFiles(src)


def test_a_tensor_of_the_wrong_shape_is_refused(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "llama", layers=4)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.3.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match=r"model.layers.3.mlp.up_proj.weight has shape \[3, 3\]"):
        prepare(src, tmp_path / "b", PrepareOptions(adapter_bottom=1, adapter_top=1))
