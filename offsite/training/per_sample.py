"""Per-sample gradient clipping for DP-SGD, owned by the project.

Why our own engine
------------------
Opacus' per-layer samplers and its functorch fallback assume every activation has the
batch as its leading dimension. OPT flattens activations to ``(batch·seq, d)`` inside
its decoder layer, GPT-2 uses ``Conv1D`` rather than ``nn.Linear``, and Opacus' ghost mode
only has norm samplers for ``nn.Linear``/``nn.Embedding``. Here the engine knows the
physical batch size ``B`` of the current forward (the caller returns one loss per
sample), so any captured tensor whose leading dimension is ``B`` or ``B·k`` (batch-major)
is viewed as ``(B, k, ...)``: flattening inside a block is harmless.

How it works
------------
Every module that holds trainable parameters *directly* is intercepted while a step runs:

* ``nn.Linear`` / HF ``Conv1D`` (block linears, LoRA ``lora_A``/``lora_B``, heads, the
  pooler) run through a custom autograd Function whose backward returns only the input
  gradient. Autograd therefore never computes the ordinary (summed) weight gradient;
  the backward instead hands the activation ``a`` (B, T, in) and output gradient
  ``g`` (B, T, out) to the engine. A layer called several times in one forward
  (weight sharing) just contributes more rows: concatenating the uses along T is
  exact, because its gradient is a sum over all rows.
* Any other module with trainable parameters (LayerNorm, the RMSNorm variants) runs
  through a generic Function; per-sample gradients come from ``torch.func``
  (vmap over samples of the vjp of ``functional_call`` on the captured per-sample
  input and output gradient). These modules are small.

After the single backward pass:

1. per-sample squared norms, summed over *all* trainable parameters jointly;
2. clip factors ``c_i = min(1, C / (‖g_i‖ + 1e-6))``;
3. "book-keeping": the clipped sum ``Σ_i c_i g_i`` is formed directly from the stored
   ``(a, g)`` as ``(c ⊙ g)ᵀ a``, the same cost as the ordinary weight gradient that was
   skipped, and *added* to ``p.grad`` so that the physical batches of one logical batch
   accumulate. Noise and the division by the expected batch size are left to the
   optimizer (e.g. Opacus' ``DPOptimizer.add_noise``/``scale_grad``).

``mode="reference"`` materialises every per-sample gradient (``grad_samples``) and
derives the norms and the clipped sum from them; it is the oracle for tests and a
fallback.

The arithmetic (the floor the benchmark prints)
-----------------------------------------------
For a trainable linear layer with ``in``/``out`` features seen by ``B`` samples of ``T``
rows, counting a multiply-add as 2 FLOPs, an ordinary step costs

    forward 2·B·T·in·out,  backward 2·B·T·in·out (input grad) + 2·B·T·in·out (weight grad).

Book-keeping replaces the weight gradient by the clipped one at identical cost, so the
only extra work is the per-sample norm of ``G_i = Σ_t g_t a_tᵀ``:

* materialised: form every ``G_i``: 2·B·T·in·out, plus 2·B·in·out for the squares
  (and B·in·out memory). Equal to one more weight gradient: +50 % of the layer's
  backward, +33 % of its forward+backward.
* ghost norm: ``‖G_i‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s)``: 2·B·T²·(in+out) + 2·B·T²
  (and B·T² memory), never materialising ``G_i``.

Ghost is cheaper exactly when ``T·(in+out) < in·out``: long rows, short sequences. The
engine picks the cheaper one per layer ("mixed ghost clipping"); ``norm_flops`` reports
the resulting extra FLOPs. A bias adds 2·B·T·out. Example: d=768, T=128, a
768×3072 MLP layer: ghost 2·B·16384·3840 ≈ 1.3e8·B vs materialised 6.0e8·B, against
1.8e9·B for the layer's ordinary forward+backward (+7 % with ghost). A LoRA ``lora_A``
(in=d, out=r) has ``in·out/(in+out) ≈ r`` so for T > r it is materialised, costing about
its own forward: negligible. Norm layers cost a few multiples of their (tiny) forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from transformers.pytorch_utils import Conv1D

from offsite.models.lora import is_linear, linear_dims

Mode = Literal["fast", "reference"]
LinearNorm = Literal["auto", "ghost", "materialise"]

CLIP_EPS = 1e-6


# -- cost model ----------------------------------------------------------------------
def linear_norm_costs(batch: int, rows: int, in_f: int, out_f: int) -> tuple[int, int]:
    """(ghost, materialised) FLOPs of the per-sample weight-gradient norms of one linear layer."""
    ghost = 2 * batch * rows * rows * (in_f + out_f) + 2 * batch * rows * rows
    materialised = 2 * batch * rows * in_f * out_f + 2 * batch * in_f * out_f
    return ghost, materialised


def _prefer_ghost(rows: int, in_f: int, out_f: int, policy: LinearNorm) -> bool:
    if policy != "auto":
        return policy == "ghost"
    ghost, materialised = linear_norm_costs(1, rows, in_f, out_f)
    return ghost < materialised


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str  # "ghost", "materialise" or "generic"
    norm_flops: int
    """Extra FLOPs of this layer's per-sample norms."""
    train_flops: int
    """FLOPs of the layer's ordinary forward + backward (for relating the overhead)."""


def norm_cost_table(
    model_or_layers: nn.Module | Iterable[tuple[str, nn.Module]],
    batch: int,
    seq: int,
    policy: LinearNorm = "auto",
) -> list[LayerCost]:
    """Per-layer estimate, assuming every trainable module sees ``seq`` rows per sample.

    Heads and poolers really see one row per sample, so for encoders this overestimates
    their (small) share; the engine's ``last_costs`` records the real shapes of a step.
    """
    modules = _trainable_modules(model_or_layers)
    out = []
    for name, mod in modules:
        trainable = [p for p in mod.parameters(recurse=False) if p.requires_grad]
        if is_linear(mod):
            in_f, out_f = linear_dims(mod)
            out.append(_linear_cost(name, mod, batch, seq, in_f, out_f, policy))
        else:
            numel = sum(p.numel() for p in trainable)
            # vmap'd vjp plus the re-forward for the input gradient: a few elementwise passes.
            out.append(LayerCost(name, "generic", 10 * batch * seq * numel, 6 * batch * seq * numel))
    return out


def _linear_cost(
    name: str, mod: nn.Module, batch: int, rows: int, in_f: int, out_f: int, policy: LinearNorm
) -> LayerCost:
    ghost, materialised = linear_norm_costs(batch, rows, in_f, out_f)
    use_ghost = _prefer_ghost(rows, in_f, out_f, policy)
    flops = ghost if use_ghost else materialised
    bias = getattr(mod, "bias", None)
    if bias is not None and bias.requires_grad:
        flops += 2 * batch * rows * out_f
    return LayerCost(name, "ghost" if use_ghost else "materialise", flops, 6 * batch * rows * in_f * out_f)


def norm_flops(
    model_or_layers: nn.Module | Iterable[tuple[str, nn.Module]],
    batch: int,
    seq: int,
    policy: LinearNorm = "auto",
) -> int:
    """Estimated extra FLOPs per step of the per-sample norms (the DP "arithmetic floor")."""
    return sum(c.norm_flops for c in norm_cost_table(model_or_layers, batch, seq, policy))


# -- discovery -----------------------------------------------------------------------
def _trainable_modules(
    model_or_layers: nn.Module | Iterable[tuple[str, nn.Module]],
) -> list[tuple[str, nn.Module]]:
    named = model_or_layers.named_modules() if isinstance(model_or_layers, nn.Module) else model_or_layers
    return [(name, mod) for name, mod in named if any(p.requires_grad for p in mod.parameters(recurse=False))]


# -- capture -------------------------------------------------------------------------
@dataclass(eq=False)
class _Record:
    name: str
    module: nn.Module
    kind: str  # "linear", "conv1d" or "generic"
    orig_forward: Callable
    params: dict[str, nn.Parameter]  # trainable direct parameters, by local name
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class _LinearFn(torch.autograd.Function):
    """A linear op whose backward yields only the input gradient and records (a, g).

    ``weight``/``bias`` are inputs so that the output requires grad even when ``x`` does
    not (the first adapter block sits on frozen embeddings); returning ``None`` for them
    means autograd never computes nor accumulates their summed gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rec):  # type: ignore[override]
        ctx.rec = rec
        ctx.save_for_backward(x, weight)
        if rec.kind == "conv1d":
            # Same op as transformers' Conv1D.forward, so results match bit for bit.
            flat = x.reshape(-1, x.size(-1))
            y = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
            return y.view(*x.shape[:-1], weight.shape[1])
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        ctx.rec.pairs.append((x.detach(), g.detach()))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight.T if ctx.rec.kind == "conv1d" else g @ weight
        return grad_x, None, None, None


class _GenericFn(torch.autograd.Function):
    """A one-tensor-in, one-tensor-out module whose parameters autograd never differentiates."""

    @staticmethod
    def forward(ctx, rec, x, *params):  # type: ignore[override]
        ctx.rec = rec
        ctx.n_params = len(params)
        ctx.save_for_backward(x)
        return rec.orig_forward(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        ctx.rec.pairs.append((x.detach(), g.detach()))
        grad_x = None
        if ctx.needs_input_grad[1]:
            with torch.enable_grad():
                x_ = x.detach().requires_grad_(True)
                # autograd.grad w.r.t. x only: the parameters' .grad stays untouched.
                (grad_x,) = torch.autograd.grad(ctx.rec.orig_forward(x_), x_, g)
        return (None, grad_x) + (None,) * ctx.n_params


def _per_sample(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """View a captured tensor as (B, k, ...): leading dim B, or B·k when flattened (OPT)."""
    if t.shape[0] == batch:
        return t
    if t.dim() >= 1 and t.shape[0] % batch == 0:
        return t.reshape(batch, t.shape[0] // batch, *t.shape[1:])
    raise RuntimeError(
        f"{what}: leading dimension {t.shape[0]} is neither the batch size {batch} nor a multiple of it"
    )


def _rows(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """(B, rows, features): every position of a sample, across all leading dims."""
    return _per_sample(t, batch, what).reshape(batch, -1, t.shape[-1])


def _cat_rows(ts: list[torch.Tensor], batch: int, what: str) -> torch.Tensor:
    """(B, rows, features) of all uses of a layer; no copy when it was used once."""
    if len(ts) == 1:
        return _rows(ts[0], batch, what)
    return torch.cat([_rows(t, batch, what) for t in ts], dim=1)


# -- the engine ----------------------------------------------------------------------
class PerSampleClipper:
    """Per-sample clipping of all trainable parameters of ``model`` (one joint norm per sample).

    Usage for one logical batch split into physical batches::

        clipper = PerSampleClipper(model, max_grad_norm=1.0)
        optimizer.zero_grad(set_to_none=True)
        with clipper:
            for batch in physical_batches:
                norms = clipper.step(lambda: per_sample_loss(model, batch), batch_size=len(batch))
        # p.grad now holds Σ_i c_i g_i over the logical batch: add noise, divide, step.

    With an Opacus ``DPOptimizer`` (so its noise is the one accounted for): set
    ``p.summed_grad = p.grad`` for every parameter, call ``add_noise()``, divide ``p.grad``
    by ``expected_batch_size`` yourself (``scale_grad`` needs Opacus' ``grad_sample``),
    then ``original_optimizer.step()``.

    ``step`` may also be called without the ``with`` block; it then attaches and detaches
    around itself. The set of trainable parameters is fixed at attach time.
    """

    def __init__(
        self,
        model: nn.Module,
        max_grad_norm: float,
        mode: Mode = "fast",
        linear_norm: LinearNorm = "auto",
    ):
        if mode not in ("fast", "reference"):
            raise ValueError(f"mode must be 'fast' or 'reference', not {mode!r}")
        if linear_norm not in ("auto", "ghost", "materialise"):
            raise ValueError(f"linear_norm must be 'auto', 'ghost' or 'materialise', not {linear_norm!r}")
        if max_grad_norm <= 0:
            raise ValueError("max_grad_norm must be positive")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.mode: Mode = mode
        self.linear_norm: LinearNorm = linear_norm
        self._records: list[_Record] = []
        self._capturing = False
        self._attached = False
        self.grad_samples: dict[str, torch.Tensor] = {}
        """reference mode: name -> (B, *shape) per-sample gradients of the last step."""
        self.last_clip_factors: torch.Tensor | None = None
        self.last_costs: list[LayerCost] = []

    # -- set-up -------------------------------------------------------------------
    def attach(self) -> PerSampleClipper:
        """Install the interceptors (inert outside ``step``)."""
        if self._attached:
            return self
        seen: dict[int, str] = {}
        records = []
        for name, mod in _trainable_modules(self.model):
            params = {n: p for n, p in mod.named_parameters(recurse=False) if p.requires_grad}
            for n, p in params.items():
                full = f"{name}.{n}" if name else n
                if id(p) in seen:
                    raise ValueError(
                        f"trainable parameter {full} is shared with {seen[id(p)]}: per-sample norms "
                        "of tied parameters are not supported"
                    )
                seen[id(p)] = full
            kind = "generic"
            # Subclasses with their own forward (quantised linears, ...) are not plain matmuls.
            if type(mod).forward is nn.Linear.forward:
                kind = "linear"
            elif type(mod).forward is Conv1D.forward:
                kind = "conv1d"
            records.append(_Record(name, mod, kind, mod.forward, params))
        for rec in records:
            rec.module.forward = self._make_forward(rec)
        self._records = records
        self._trainable = {id(p) for p in self.model.parameters() if p.requires_grad}
        self._attached = True
        return self

    def detach(self) -> None:
        """Remove the interceptors; the model is exactly as before ``attach``."""
        for rec in self._records:
            # The interceptor is an instance attribute shadowing the class's forward.
            if rec.module.__dict__.get("forward") is not None:
                del rec.module.forward
            rec.pairs.clear()
        self._records = []
        self._attached = False

    def __enter__(self) -> PerSampleClipper:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _make_forward(self, rec: _Record) -> Callable:
        engine = self

        def forward(*args, **kwargs):
            if not engine._capturing or not torch.is_grad_enabled():
                return rec.orig_forward(*args, **kwargs)
            if rec.kind != "generic":
                if kwargs or len(args) != 1:
                    raise TypeError(f"{rec.name}: linear layers are intercepted for a single input")
                return _LinearFn.apply(args[0], rec.module.weight, rec.module.bias, rec)
            if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
                raise TypeError(
                    f"{rec.name} ({type(rec.module).__name__}) holds trainable parameters but is not "
                    "called with a single tensor: per-sample gradients are not supported for it"
                )
            return _GenericFn.apply(rec, args[0], *rec.params.values())

        return forward

    # -- one physical batch -----------------------------------------------------------
    def step(self, loss_fn: Callable[[], torch.Tensor], batch_size: int | None = None) -> torch.Tensor:
        """Run ``loss_fn`` (forward of one physical batch, returning per-sample losses of
        shape (B,)), backpropagate once, and add ``Σ_i c_i g_i`` to every trainable ``.grad``.

        Returns the unclipped per-sample gradient norms (B,). ``batch_size=0`` (an empty
        Poisson batch) skips ``loss_fn`` entirely.
        """
        if not self._attached:
            with self:
                return self.step(loss_fn, batch_size)
        current = {id(p) for p in self.model.parameters() if p.requires_grad}
        if current != self._trainable:
            raise RuntimeError("the set of trainable parameters changed since attach(); re-attach")
        params = [p for rec in self._records for p in rec.params.values()]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grad_samples = {}
        self.last_costs = []
        if batch_size == 0:
            return self._empty()

        saved = {}
        try:
            self._capturing = True
            losses = loss_fn()
            if losses.dim() != 1:
                raise ValueError(
                    f"loss_fn must return one loss per sample, shape (B,), got {tuple(losses.shape)}"
                )
            batch = losses.shape[0]
            if batch_size is not None and batch != batch_size:
                raise ValueError(f"loss_fn returned {batch} losses for a batch of {batch_size}")
            if batch == 0:
                return self._empty()
            if not losses.requires_grad:
                raise RuntimeError("the per-sample losses do not depend on any trainable parameter")
            # Any gradient autograd accumulates itself escaped the interceptors (a parameter
            # used outside its module's forward): it would be unclipped, so detect it.
            saved = {id(p): p.grad for p in params}
            for p in params:
                p.grad = None
            # Still capturing: gradient checkpointing re-runs forwards during backward.
            losses.sum().backward()
            self._capturing = False
            leaked = [rec.name for rec in self._records for p in rec.params.values() if p.grad is not None]
            if leaked:
                raise RuntimeError(f"parameters of {leaked} were used outside their module's forward")
            for p in params:
                p.grad = saved[id(p)]
            saved = {}
            with torch.no_grad():
                return self._clip_and_accumulate(batch, losses.device)
        finally:
            self._capturing = False
            for p in params:
                if id(p) in saved:
                    p.grad = saved[id(p)]
            for rec in self._records:
                rec.pairs.clear()

    def _empty(self) -> torch.Tensor:
        self.last_clip_factors = torch.zeros(0)
        return torch.zeros(0)

    # -- arithmetic ---------------------------------------------------------------------
    def _clip_and_accumulate(self, batch: int, device: torch.device) -> torch.Tensor:
        sq = torch.zeros(batch, dtype=torch.float32, device=device)
        finishers: list[Callable[[torch.Tensor], None]] = []
        for rec in self._records:
            if not rec.pairs:
                # Not on the loss's path this step: its per-sample gradients are zero.
                if self.mode == "reference":
                    for n, p in rec.params.items():
                        self.grad_samples[self._full(rec, n)] = p.new_zeros(batch, *p.shape)
                continue
            if rec.kind == "generic":
                finishers.append(self._generic(rec, batch, sq))
            else:
                finishers.append(self._linear(rec, batch, sq))
        norms = sq.sqrt()
        factors = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        for finish in finishers:
            finish(factors)
        self.last_clip_factors = factors
        return norms

    @staticmethod
    def _full(rec: _Record, local: str) -> str:
        return f"{rec.name}.{local}" if rec.name else local

    def _store_or_book(
        self, rec: _Record, grads: dict[str, torch.Tensor], sq: torch.Tensor
    ) -> Callable[[torch.Tensor], None]:
        """Per-sample grads given: add their squared norms; clipped sum = Σ_i c_i G_i."""
        for n, gs in grads.items():
            sq += gs.reshape(gs.shape[0], -1).float().pow(2).sum(1)
            if self.mode == "reference":
                self.grad_samples[self._full(rec, n)] = gs

        def finish(c: torch.Tensor) -> None:
            for n, gs in grads.items():
                p = rec.params[n]
                p.grad += torch.einsum("b,b...->...", c.to(gs.dtype), gs).view_as(p)

        return finish

    def _linear(self, rec: _Record, batch: int, sq: torch.Tensor) -> Callable[[torch.Tensor], None]:
        a = _cat_rows([x for x, _ in rec.pairs], batch, rec.name)
        g = _cat_rows([y for _, y in rec.pairs], batch, rec.name)
        rows, in_f, out_f = a.shape[1], a.shape[2], g.shape[2]
        weight = rec.params.get("weight")
        bias = rec.params.get("bias")
        if self.mode == "reference":
            grads = {}
            if weight is not None:
                # (B, out, in); Conv1D stores its weight as (in, out).
                gs = torch.bmm(g.transpose(1, 2), a)
                grads["weight"] = gs.transpose(1, 2) if rec.kind == "conv1d" else gs
            if bias is not None:
                grads["bias"] = g.sum(1)
            self.last_costs.append(
                _linear_cost(rec.name, rec.module, batch, rows, in_f, out_f, "materialise")
            )
            return self._store_or_book(rec, grads, sq)

        cost = _linear_cost(rec.name, rec.module, batch, rows, in_f, out_f, self.linear_norm)
        self.last_costs.append(cost)
        materialised = None
        if weight is not None:
            if cost.kind == "ghost":
                # Σ_{t,s} (a_t·a_s)(g_t·g_s) as a batched dot product of the two Gram matrices.
                ga = torch.bmm(a, a.transpose(1, 2)).view(batch, 1, rows * rows)
                gg = torch.bmm(g, g.transpose(1, 2)).view(batch, rows * rows, 1)
                sq += torch.bmm(ga, gg).view(batch).float()
                del ga, gg
            else:
                materialised = torch.bmm(g.transpose(1, 2), a)
                sq += materialised.float().pow(2).sum((1, 2))
        bias_gs = None
        if bias is not None:
            bias_gs = g.sum(1)
            sq += bias_gs.float().pow(2).sum(1)

        def finish(c: torch.Tensor) -> None:
            c = c.to(g.dtype)
            if weight is not None:
                if materialised is not None:
                    # B·in·out: cheaper than redoing the B·T·in·out contraction.
                    grad = (c @ materialised.view(batch, -1)).view(out_f, in_f)
                    weight.grad += grad.T if rec.kind == "conv1d" else grad
                else:
                    # Scale whichever of a, g is smaller, then accumulate in place.
                    # (Elementwise results keep the input's strides: reshape, not view.)
                    if in_f < out_f:
                        a2, g2 = (a * c[:, None, None]).reshape(-1, in_f), g.reshape(-1, out_f)
                    else:
                        a2, g2 = a.reshape(-1, in_f), (g * c[:, None, None]).reshape(-1, out_f)
                    if rec.kind == "conv1d":  # weight stored (in, out)
                        weight.grad.addmm_(a2.T, g2)
                    else:
                        weight.grad.addmm_(g2.T, a2)
            if bias_gs is not None:
                bias.grad += c @ bias_gs

        return finish

    def _generic(self, rec: _Record, batch: int, sq: torch.Tensor) -> Callable[[torch.Tensor], None]:
        module = rec.module
        params = {n: p.detach() for n, p in rec.params.items()}

        def one(x_i: torch.Tensor, g_i: torch.Tensor) -> dict[str, torch.Tensor]:
            _, pullback = vjp(lambda ps: functional_call(module, ps, (x_i,)), params)
            return pullback(g_i)[0]

        total: dict[str, torch.Tensor] = {}
        numel = 0
        for x, g in rec.pairs:
            xs, gs = _per_sample(x, batch, rec.name), _per_sample(g, batch, rec.name)
            numel += xs[0].numel()
            with torch.enable_grad():
                grads = vmap(one)(xs, gs)
            for n, v in grads.items():
                total[n] = total[n] + v if n in total else v
        self.last_costs.append(LayerCost(rec.name, "generic", 10 * batch * numel, 6 * batch * numel))
        return self._store_or_book(rec, total, sq)
