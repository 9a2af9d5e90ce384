"""Where models run: the one module that puts tensors on devices and chooses their precision.

A command that runs a model resolves one ``Placement`` from ``--device``, ``--frozen-dtype`` and
``--gradient-checkpointing`` and makes it current (``use``); the core asks ``current()`` and goes
through the functions here for every move between devices, so no other module calls ``.to(device)``:

* ``Placement.load_kwargs`` / ``Placement.place``: a model is loaded straight onto the device, then
  ``place`` gives each *part* (each block, each non-block part of the base model, the head; the
  registry's ``model_parts``) its dtype: a part holding a trainable parameter stays float32 (adapter
  blocks, LoRA, a new classification head), every other part takes the frozen dtype, and each part
  casts its floating-point inputs to its own dtype (a forward pre-hook), so activations cross
  between fp32 and bf16 only at part boundaries. Gradients flow back through those casts, so the
  per-sample engine sees fp32 activations and output gradients at every trainable layer: per-sample
  norms, clipping, the noise and AdamW's state stay float32. With ``gradient_checkpointing`` the
  frozen blocks (the emulator's middle) keep no activations for the backward pass and recompute them.
* ``inputs_for``: a collated batch (built on the CPU) goes to the device the model takes its inputs on.
* ``HostBuffers`` / ``upload``: the DP noise is drawn on the CPU (``offsite.training.noise``) into
  host buffers, pinned on CUDA, and copied to the device without blocking; ``Upload.wait`` says when
  the host buffer may be reused.

Several GPUs (``torch.distributed``) will be another kind of placement: ``place`` wrapping the model
and ``inputs_for`` choosing each rank's share; callers do not change.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from offsite.errors import OffsiteError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
FROZEN_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- choosing ---------------------------------------------------------------------------
def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str) -> torch.device:
    """``auto`` takes the current CUDA device if there is one, else Apple's MPS, else the CPU."""
    name = str(name).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise OffsiteError("--device mps: no MPS device (Apple silicon with a torch built for it) here")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise OffsiteError(f"--device {name}: no CUDA device here (torch {torch.__version__})")
        index_text = name.partition(":")[2]
        if not index_text:
            return torch.device("cuda", torch.cuda.current_device())
        if not index_text.isdigit() or int(index_text) >= torch.cuda.device_count():
            raise OffsiteError(
                f"--device {name}: this machine has CUDA devices 0 to {torch.cuda.device_count() - 1}"
            )
        return torch.device("cuda", int(index_text))
    raise OffsiteError(f"--device must be {DEVICE_CHOICES}, got {name!r}")


def check_frozen_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a frozen dtype the device cannot run (or, for fp16 on a CPU, should not: see below)."""
    if dtype == torch.float32:
        return
    name = next(k for k, v in FROZEN_DTYPES.items() if v == dtype)
    if device.type == "cpu" and dtype == torch.float16:
        # CPUs without AVX512-FP16 compute fp16 by converting to fp32 and back (slower than fp32), and
        # fp16's range (largest value 65504) can overflow frozen activations: bf16 has neither problem.
        raise OffsiteError(
            "--frozen-dtype fp16 is refused on the CPU (slower than fp32, and can overflow); use bf16"
        )
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise OffsiteError(f"--frozen-dtype {name}: {torch.cuda.get_device_name(device)} has no bf16 support")
    if device.type == "mps":
        try:
            torch.zeros(1, dtype=dtype, device=device)
        except (RuntimeError, TypeError) as e:
            raise OffsiteError(f"--frozen-dtype {name}: not supported on this MPS device ({e})") from None


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    if device.type == "mps":
        return "mps (Apple GPU)"
    return f"cpu ({torch.get_num_threads()} threads)"


# -- a placement ------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """Where a run's models live and in what precision their frozen parts run."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    frozen_dtype: torch.dtype = torch.float32
    gradient_checkpointing: bool = False
    chosen_by: str = field(default="cpu", compare=False)
    """What was asked for (``auto``, ``cuda``, ...), for ``describe``."""

    @classmethod
    def resolve(
        cls, device: str = "auto", frozen_dtype: str = "fp32", gradient_checkpointing: bool = False
    ) -> Placement:
        if frozen_dtype not in FROZEN_DTYPES:
            raise OffsiteError(
                f"--frozen-dtype must be one of {', '.join(FROZEN_DTYPES)}, got {frozen_dtype!r}"
            )
        dev = resolve_device(device)
        check_frozen_dtype(dev, FROZEN_DTYPES[frozen_dtype])
        return cls(dev, FROZEN_DTYPES[frozen_dtype], bool(gradient_checkpointing), str(device))

    @property
    def mixed(self) -> bool:
        return self.frozen_dtype != torch.float32

    def describe(self) -> str:
        """One line for the terminal: which device, chosen how, and what runs in which precision."""
        how = "chosen by --device auto" if self.chosen_by == "auto" else f"--device {self.chosen_by}"
        text = f"device {describe_device(self.device)}, {how}"
        if self.mixed:
            text += f"; frozen parts in {str(self.frozen_dtype).removeprefix('torch.')}, trainable ones in float32"
        if self.gradient_checkpointing:
            text += "; gradient checkpointing of the frozen blocks"
        return text

    def dispatch_kwargs(self, max_memory: Mapping[str, str], offload_folder: Path) -> dict[str, Any]:
        """``from_pretrained`` arguments that spread a model too large for the device over the
        device, CPU memory and disk (accelerate's ``device_map="auto"``), in the frozen dtype: for a
        model that only runs forward passes (the distillation teacher). ``max_memory`` bounds each
        (``{"0": "20GiB", "cpu": "64GiB"}``); what does not fit goes to ``offload_folder``."""
        memory: dict[Any, str] = {}
        for key, size in max_memory.items():
            memory[int(key) if str(key).isdigit() else key] = size
        kwargs: dict[str, Any] = {
            "dtype": self.frozen_dtype,
            "device_map": "auto",
            "offload_folder": str(offload_folder),
        }
        if memory:
            kwargs["max_memory"] = memory
        return kwargs

    # -- models ---------------------------------------------------------------------------
    def load_kwargs(self, stored: torch.dtype | str | None = None) -> dict[str, Any]:
        """``from_pretrained`` arguments that load a model straight onto the device.

        ``stored``: load in this dtype (``"auto"``: the file's, so nothing is rounded before ``place``
        decides each part's dtype); default: the frozen dtype (a model that only runs inference).
        """
        return {"dtype": stored or self.frozen_dtype, "device_map": str(self.device)}

    def place(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device and give each part its dtype (see the module docstring).

        Call it after the trainable parameters are chosen (``AdapterView.attach``); it is idempotent.
        """
        from offsite.models.registry import model_parts

        if getattr(model, "_offsite_placement", None) == self:
            return model
        if getattr(model, "_offsite_placement", None) is not None:
            raise RuntimeError("this model was placed already, with another placement")
        parts = model_parts(model)
        covered = {id(p) for _, part in parts for p in part.parameters()}
        loose = [n for n, p in model.named_parameters() if id(p) not in covered]
        if loose:  # the registry's check_layout refuses such models; never leave a parameter unplaced
            raise RuntimeError(f"parameters outside every part of the model: {loose[:3]}")
        with torch.no_grad():
            for _, part in parts:
                params = list(part.parameters())
                if params:  # a part without parameters (rotary embeddings) keeps its buffers' dtype
                    trains = any(p.requires_grad for p in params)
                    part.to(dtype=torch.float32 if trains or not self.mixed else self.frozen_dtype)
            model.to(device=self.device)
        if self.mixed:
            for _, part in parts:
                dtype = next((p.dtype for p in part.parameters() if p.is_floating_point()), None)
                if dtype is not None:
                    part.register_forward_pre_hook(functools.partial(_cast_inputs, dtype), with_kwargs=True)
        if self.gradient_checkpointing:
            checkpoint_frozen_blocks(model)
        model._offsite_placement = self
        return model


def _cast_inputs(dtype: torch.dtype, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: floating-point tensors go into a part in the part's own dtype."""

    def cast(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
            return x.to(dtype)
        if isinstance(x, tuple) and any(isinstance(v, torch.Tensor) for v in x):
            return tuple(cast(v) for v in x)  # e.g. rotary (cos, sin)
        return x

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def checkpoint_frozen_blocks(model: nn.Module) -> int:
    """Recompute, in the backward pass, the activations of every block without a trainable parameter
    (the emulator's middle) instead of keeping them. Adapter blocks keep theirs, so the per-sample
    engine's interceptors (which live only in modules with trainable parameters) run once per use.
    Returns the number of blocks checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from offsite.models.registry import get_blocks

    # A block recomputed in the backward pass would write its keys and values into a KV cache twice;
    # training needs no cache (transformers turns it off the same way for whole-model checkpointing).
    model.config.use_cache = False
    frozen = [b for b in get_blocks(model) if not any(p.requires_grad for p in b.parameters())]
    for block in frozen:
        if not isinstance(block, GradientCheckpointingLayer):
            raise OffsiteError(f"{type(block).__name__} does not support gradient checkpointing")
        block.gradient_checkpointing = True
        # Non-reentrant: gradients reach the block's input through keyword arguments too, and the
        # recomputation is checked against the first forward's shapes.
        block._gradient_checkpointing_func = functools.partial(
            torch.utils.checkpoint.checkpoint, use_reentrant=False
        )
    return len(frozen)


# -- the current placement -----------------------------------------------------------------
_CURRENT: ContextVar[Placement | None] = ContextVar("offsite_placement", default=None)


def current() -> Placement:
    """The placement of the running command (the CPU in float32 unless a front end chose another)."""
    return _CURRENT.get() or Placement()


@contextlib.contextmanager
def use(placement: Placement) -> Iterator[Placement]:
    """Make ``placement`` current for the library calls made inside the block."""
    token = _CURRENT.set(placement)
    try:
        yield placement
    finally:
        _CURRENT.reset(token)


# -- tensors ---------------------------------------------------------------------------------
def input_device(model: nn.Module) -> torch.device:
    """The device ``model`` takes its inputs on (for a model dispatched over devices, its first)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:  # accelerate's hooks move each module's inputs on; the inputs start at the first
        first = next(iter(device_map.values()))
        if isinstance(first, int):
            return torch.device("cuda", first)
        return torch.device("cpu" if first == "disk" else first)
    return next(model.parameters()).device


def inputs_for(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` on the device ``model`` takes its inputs on (the same tensors if already there)."""
    device = input_device(model)
    if all(t.device == device for t in batch.values()):
        return dict(batch)
    return {k: t.to(device) for k, t in batch.items()}


def to_cpu(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` on the CPU (in ``dtype``, if given): what is written to files."""
    return tensor.to(device="cpu", dtype=dtype or tensor.dtype)


def to_device_of(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` on ``like``'s device (a no-op when it is there already)."""
    return tensor if tensor.device == like.device else tensor.to(like.device)


class HostBuffers:
    """Allocates the host buffers the DP noise is drawn into: page-locked (pinned) when the noise
    goes to a CUDA device, so that the copy can run without blocking the CPU."""

    def __init__(self, device: torch.device):
        self.pinned = device.type == "cuda"

    def __call__(self, size: int) -> np.ndarray:
        if self.pinned:
            return torch.empty(size, dtype=torch.float32, pin_memory=True).numpy()
        return np.empty(size, dtype=np.float32)


@dataclass
class Upload:
    """A host array on its way to a device: ``tensor`` may be used at once (device work is ordered
    after the copy); ``wait()`` returns once the host array may be overwritten."""

    tensor: torch.Tensor
    _event: Any = None

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()
            self._event = None


def upload(host: np.ndarray, device: torch.device) -> Upload:
    """``host`` (a float32 array) as a tensor on ``device``: the array itself on the CPU, else a copy,
    non-blocking from pinned memory on CUDA."""
    tensor = torch.from_numpy(host)
    if device.type == "cpu":
        return Upload(tensor)
    if device.type == "cuda":
        on_device = tensor.to(device, non_blocking=tensor.is_pinned())
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return Upload(on_device, event)
    return Upload(tensor.to(device))  # a blocking copy: done when it returns


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timing in benchmarks)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def available_devices() -> list[str]:
    """The device types this machine has (for tests parametrised over devices)."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if _mps_available():
        found.append("mps")
    return found
