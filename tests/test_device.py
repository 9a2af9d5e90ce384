"""Where models run (``offsite.device``): choosing a device, frozen parts in bf16, gradient
checkpointing of the frozen middle, the noise's way to the device, and whole runs under a placement.

The engine's exactness per device is tested in ``tests/test_per_sample.py`` and
``tests/test_dp_step.py`` (parametrised over the devices present; CUDA cases are marked ``gpu``).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import WORDS, make_dp_setup, make_tiny_checkpoint

from offsite import device
from offsite.device import Placement
from offsite.errors import OffsiteError
from offsite.formats.bundle import Bundle
from offsite.prepare import PrepareOptions, prepare
from offsite.tune import TuneOptions, tune

CUDA = torch.cuda.is_available()


def test_auto_takes_a_gpu_when_there_is_one_and_says_so():
    placement = Placement.resolve("auto")
    expected = "cuda" if CUDA else ("mps" if "mps" in device.available_devices() else "cpu")
    assert placement.device.type == expected
    assert placement.frozen_dtype == torch.float32 and not placement.gradient_checkpointing
    assert f"device {expected}" in placement.describe() and "chosen by --device auto" in placement.describe()
    cpu = Placement.resolve("cpu", "bf16", gradient_checkpointing=True)
    text = cpu.describe()
    assert "--device cpu" in text and "bfloat16" in text and "gradient checkpointing" in text


@pytest.mark.parametrize(
    "name,dtype,match",
    [
        ("gpu", "fp32", "--device must be"),
        ("cuda:x", "fp32", "cuda"),
        ("tpu", "fp32", "--device must be"),
        ("cpu", "fp8", "--frozen-dtype must be"),
        ("cpu", "fp16", "refused on the CPU"),
    ],
)
def test_unknown_or_unsupported_choices_are_refused(name, dtype, match):
    with pytest.raises(OffsiteError, match=match):
        Placement.resolve(name, dtype)


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA device")
def test_cuda_without_a_cuda_device_is_refused_clearly():
    for name in ("cuda", "cuda:0"):
        with pytest.raises(OffsiteError, match="no CUDA device here"):
            Placement.resolve(name)


def test_the_current_placement_is_the_cpu_unless_a_front_end_chooses():
    assert device.current() == Placement()
    chosen = Placement(frozen_dtype=torch.bfloat16)
    with device.use(chosen):
        assert device.current() is chosen
    assert device.current() == Placement()


def test_noise_on_the_cpu_is_added_where_it_was_drawn():
    host = device.HostBuffers(torch.device("cpu"))(1000)
    assert isinstance(host, np.ndarray) and host.dtype == np.float32
    upload = device.upload(host, torch.device("cpu"))
    assert upload.tensor.data_ptr() == host.ctypes.data  # no copy at all on the CPU
    upload.wait()


@pytest.mark.gpu
def test_noise_goes_to_a_cuda_device_from_pinned_memory_without_blocking():
    cuda = torch.device("cuda", torch.cuda.current_device())
    host = device.HostBuffers(cuda)(1 << 20)
    assert torch.from_numpy(host).is_pinned()
    host[:] = np.arange(host.size, dtype=np.float32)
    upload = device.upload(host, cuda)
    assert upload.tensor.device == cuda and upload._event is not None
    upload.wait()
    host[:] = 0  # the buffer may be reused once wait() returned: the device copy is unaffected
    assert torch.equal(upload.tensor.cpu(), torch.arange(1 << 20, dtype=torch.float32))


# -- whole runs -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    return make_dp_setup(root)


def _seeded_run(flow, out, name):
    opts = TuneOptions(
        epochs=2,
        batch_size=16,
        lr=1e-2,
        eval_fraction=0.0,
        dataset_id=name,
        epsilon=20.0,
        noise_multiplier=1.0,
        noise_seed=3,  # the same sampling and noise in both runs: only the precision differs
        keys_dir=flow / "keys",
        budget_dir=flow / "budgets" / name,
    )
    result = tune(flow / "bundle", flow / "train.jsonl", out, opts)
    return result, load_file(str(out / "adapter.safetensors"))


def test_a_dp_run_with_a_bf16_frozen_middle_and_checkpointing_stays_close_to_fp32(flow, tmp_path):
    fp32, a32 = _seeded_run(flow, tmp_path / "fp32", "fp32")
    placement = Placement(frozen_dtype=torch.bfloat16, gradient_checkpointing=True)
    with device.use(placement):
        bf16, a16 = _seeded_run(flow, tmp_path / "bf16", "bf16")
    # Identical privacy: the plan and the accounting do not depend on the precision.
    assert bf16.plan == fp32.plan
    assert bf16.receipt["epsilon"] == fp32.receipt["epsilon"]
    # The adapter is fp32 in training and stored in the bundle's dtype, whatever the frozen parts ran in.
    assert {t.dtype for t in a16.values()} == {torch.float32}
    with Bundle.open(flow / "bundle") as bundle:
        initial = load_file(str(bundle.staged / "initial_adapter.safetensors"))
    update = torch.cat([(a32[n] - initial[n]).flatten() for n in initial])
    diff = torch.cat([(a16[n] - a32[n]).flatten() for n in initial])
    assert update.norm() > 0.1
    # Same sampling, same noise: only bf16 rounding (u = 2^-8) in the frozen parts differs. It changes a
    # step's clipped gradient by about 1 % (tests/test_per_sample.py bounds that at 16u); over the 16
    # steps the two adapters end 0.3 % of the update apart here. Bound: 5 %.
    assert diff.norm() < 0.05 * update.norm()


def test_the_placement_reaches_the_model_of_every_step(flow, tmp_path, monkeypatch):
    """tune() loads the emulator with the current placement: frozen parts in bf16, adapter fp32, the
    frozen middle checkpointed."""
    from offsite import tune as tune_module

    seen = {}
    original = tune_module.load_for_tuning

    def spy(*args, **kwargs):
        inputs = original(*args, **kwargs)
        seen["model"] = inputs.model
        return inputs

    monkeypatch.setattr(tune_module, "load_for_tuning", spy)
    with device.use(Placement(frozen_dtype=torch.bfloat16, gradient_checkpointing=True)):
        tune(
            flow / "bundle",
            flow / "train.jsonl",
            tmp_path / "a",
            TuneOptions(dp=False, epochs=1, eval_fraction=0),
        )
    model = seen["model"]
    blocks = model.model.layers  # the emulator keeps layers 0, 1, 2, 4, 5: position 2 is the middle
    assert [b.gradient_checkpointing for b in blocks] == [False, False, True, False, False]
    for i, block in enumerate(blocks):
        expected = torch.bfloat16 if i == 2 else torch.float32
        assert {p.dtype for p in block.parameters()} == {expected}, i
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 == model.lm_head.weight.dtype
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_placement_is_refused_twice_with_another_setting():
    from tiny import tiny_config
    from transformers import AutoModelForCausalLM

    config, _ = tiny_config("gpt2", layers=2)
    model = AutoModelForCausalLM.from_config(config)
    placement = Placement(frozen_dtype=torch.bfloat16)
    assert placement.place(model) is placement.place(model)  # idempotent
    with pytest.raises(RuntimeError, match="another placement"):
        Placement().place(model)


def test_the_teacher_can_be_spread_over_memory_and_disk(tmp_path):
    """Distillation's teacher through accelerate's device_map, with so little memory allowed that
    most of it is offloaded to disk: the same distillation as with the teacher whole in memory."""
    from offsite.training.distill import DistillConfig

    src = make_tiny_checkpoint(tmp_path / "m", "llama", layers=8)
    rng = random.Random(0)
    public = tmp_path / "c.jsonl"
    public.write_text(
        "".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=10))}) + "\n" for _ in range(40))
    )
    cfg = DistillConfig(steps=4, warmup_steps=1)
    base = dict(emulator_layers=2, distill_data=public, distill=cfg)
    whole = prepare(src, tmp_path / "b1", PrepareOptions(**base))
    loaded = {}
    from offsite import prepare as prepare_module

    original = prepare_module._load_teacher

    def spy(*args, **kwargs):
        loaded["teacher"] = original(*args, **kwargs)
        return loaded["teacher"]

    prepare_module._load_teacher = spy
    try:
        spread = prepare(
            src,
            tmp_path / "b2",
            PrepareOptions(**base, teacher_device_map="auto", teacher_max_memory={"cpu": "60KB"}),
        )
    finally:
        prepare_module._load_teacher = original
    placed = set(loaded["teacher"].hf_device_map.values())
    assert "disk" in placed  # accelerate really offloaded part of it
    assert spread.distillation == whole.distillation
    assert (tmp_path / "b1" / "emulator" / "model.safetensors").read_bytes() == (
        tmp_path / "b2" / "emulator" / "model.safetensors"
    ).read_bytes()
    assert not any(p.name == ".distill-scratch" for p in (tmp_path / "b2").rglob("*"))  # offload removed


def test_the_command_lines_frozen_dtypes_are_the_devices():
    from offsite.cli.placement import FROZEN_DTYPES as on_the_command_line

    assert on_the_command_line == tuple(device.FROZEN_DTYPES)
