"""Per-sample clipping engine against an explicit per-example backward loop.

Tiny real transformers models built from configs (no downloads), every supported family,
both adapter kinds, right-padded batches whose samples have different loss-token counts.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.pytorch_utils import Conv1D

from offsite.device import Placement, available_devices
from offsite.models.adapters import AdapterSpec, AdapterView, identity_positions
from offsite.models.lora import LoRALinear
from offsite.models.registry import get_blocks, model_parts
from offsite.training.per_sample import PerSampleClipper, norm_cost_table, norm_flops

VOCAB = 100
HIDDEN = 32
LAYERS = 4
LENGTHS = (10, 7, 4, 9)  # differing loss-token counts; the batch is right-padded to 10
EAGER = {"attn_implementation": "eager"}


def _config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4)
    llama_like = dict(common, intermediate_size=64, num_key_value_heads=2, max_position_embeddings=32)
    encoder = dict(
        common,
        intermediate_size=64,
        max_position_embeddings=40,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    match family:
        case "gpt2":
            return tf.GPT2Config(
                vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=32,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            )  # fmt: skip
        case "opt":
            return tf.OPTConfig(
                **common, ffn_dim=64, max_position_embeddings=32, word_embed_proj_dim=HIDDEN,
                dropout=0.0, attention_dropout=0.0, pad_token_id=1,
            )  # fmt: skip
        case "llama":
            return tf.LlamaConfig(**llama_like)
        case "qwen2":
            return tf.Qwen2Config(**llama_like)
        case "mistral":
            return tf.MistralConfig(**llama_like)
        case "bloom":
            return tf.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=4)
        case "bert":
            return tf.BertConfig(**encoder)
        case "roberta":
            return tf.RobertaConfig(**encoder, pad_token_id=1)
    raise AssertionError(family)


_MODEL_CLASS = {
    "gpt2": tf.GPT2LMHeadModel,
    "opt": tf.OPTForCausalLM,
    "llama": tf.LlamaForCausalLM,
    "qwen2": tf.Qwen2ForCausalLM,
    "mistral": tf.MistralForCausalLM,
    "bloom": tf.BloomForCausalLM,
    "bert": tf.BertForSequenceClassification,
    "roberta": tf.RobertaForSequenceClassification,
}
ENCODERS = {"bert", "roberta"}
FAMILIES = list(_MODEL_CLASS)
#: Every device the engine's exactness is checked on: the CPU always; CUDA (marked gpu) and MPS where present.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.gpu),
    pytest.param("mps", marks=pytest.mark.skipif("mps" not in available_devices(), reason="no MPS device")),
]


def build(family: str, kind: str) -> nn.Module:
    torch.manual_seed(0)
    config = _config(family)
    config.update(EAGER)
    model = _MODEL_CLASS[family](config).float().eval()
    spec = AdapterSpec(
        kind=kind,
        layers=(0, LAYERS - 1),
        lora_rank=4 if kind == "lora" else None,
        lora_alpha=8 if kind == "lora" else None,
        trains_head=family in ENCODERS,
    )
    AdapterView(model, spec, identity_positions(LAYERS)).attach()
    with torch.no_grad():
        for m in model.modules():
            # LoRA B starts at zero, which would make every lora_A gradient zero: a vacuous test.
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0.0, 0.2)
            # Norm weights start at exactly one; perturb so they carry information.
            if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None:
                m.weight.add_(0.1 * torch.randn_like(m.weight))
    return model


def make_batch(family: str, lengths=LENGTHS, device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    pad = 1 if family in ("opt", "roberta") else 0
    ids = ids.masked_fill(mask == 0, pad)
    labels = torch.randint(0, 3, (len(lengths),), generator=g)
    return ids.to(device), mask.to(device), labels.to(device)


def per_sample_losses(model: nn.Module, family: str, ids, mask, labels) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits
    if family in ENCODERS:
        return nn.functional.cross_entropy(logits, labels, reduction="none")
    b, t = ids.shape
    token = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(b, t - 1)
    target_mask = mask[:, 1:].to(token.dtype)
    return (token * target_mask).sum(1) / target_mask.sum(1)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def loop_grads(model, family, ids, mask, labels) -> dict[str, torch.Tensor]:
    """Per-example gradients by running each example alone, unpadded."""
    params = trainable(model)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i, n in enumerate(mask.sum(1).tolist()):
        model.zero_grad(set_to_none=True)
        per_sample_losses(
            model, family, ids[i : i + 1, :n], mask[i : i + 1, :n], labels[i : i + 1]
        ).sum().backward()
        for name, p in params.items():
            out[name].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(v) for n, v in out.items()}


def close(actual: torch.Tensor, expected: torch.Tensor, scale: float | None = None) -> None:
    """Equal up to float32 round-off. ``scale`` is the size of the gradients being compared (default:
    this tensor's): a parameter whose gradient is zero in exact arithmetic (OPT's key bias, which
    softmax ignores) holds pure round-off, which only the scale of the whole gradient can judge."""
    scale = max(expected.abs().max().item(), scale or 0.0)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=max(1e-6 * scale, 1e-12))


def joint_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["blocks", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_per_example_loop(family: str, kind: str, device: str) -> None:
    model = Placement(torch.device(device)).place(build(family, kind))  # fp32 on the device
    ids, mask, labels = make_batch(family, device=device)
    params = trainable(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    if kind == "lora":
        head = ("classifier", "pooler")
        assert params and all(".lora_" in n or any(h in n for h in head) for n in params)

    expected = loop_grads(model, family, ids, mask, labels)
    expected_norms = joint_norms(expected)
    scale = max(g.abs().max().item() for g in expected.values())
    # Clip about half the samples so both branches of min(1, C/‖g‖) are exercised.
    clip = expected_norms.median().item()
    factors = (clip / (expected_norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    expected_sum = {n: torch.einsum("b,b...->...", factors, g) for n, g in expected.items()}

    def loss_fn():
        return per_sample_losses(model, family, ids, mask, labels)

    # 1. reference mode: per-sample gradients equal the per-example loop.
    ref = PerSampleClipper(model, clip, mode="reference")
    ref_norms = ref.step(loss_fn)
    assert set(ref.grad_samples) == set(params)
    for name in params:
        close(ref.grad_samples[name], expected[name], scale)
    close(ref_norms, expected_norms)
    ref_sum = {n: p.grad.clone() for n, p in params.items()}
    for name in params:
        close(ref_sum[name], expected_sum[name], scale)

    # 2. fast mode (mixed, all-ghost, all-materialised) equals reference mode.
    for policy in ("auto", "ghost", "materialise"):
        model.zero_grad(set_to_none=True)
        fast = PerSampleClipper(model, clip, mode="fast", linear_norm=policy)
        close(fast.step(loss_fn), ref_norms)
        for name, p in params.items():
            close(p.grad, ref_sum[name], scale)

    # 3. every clipped per-sample gradient lies within the ball of radius C.
    clipped = joint_norms(
        {n: g * ref.last_clip_factors.view(-1, *[1] * (g.dim() - 1)) for n, g in expected.items()}
    )
    assert (clipped <= clip * (1 + 1e-5)).all()

    # 4. frozen parameters: no gradient, and an optimizer step leaves them untouched.
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None, name
            assert torch.equal(p, frozen[name]), name
    # The engine leaves no interceptor behind.
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_physical_batches_accumulate(family: str) -> None:
    model = build(family, "blocks")
    ids, mask, labels = make_batch(family)
    params = trainable(model)

    def loss_on(sl):
        return lambda: per_sample_losses(model, family, ids[sl], mask[sl], labels[sl])

    clipper = PerSampleClipper(model, 0.05, mode="reference")
    clipper.step(loss_on(slice(None)))
    whole = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    with PerSampleClipper(model, 0.05) as fast:
        # HF models cannot run an empty batch, so a Poisson-empty one is announced by size.
        norms = [fast.step(loss_on(slice(a, b)), batch_size=b - a) for a, b in ((0, 1), (1, 4), (4, 4))]
    assert [len(n) for n in norms] == [1, 3, 0]
    for name, p in params.items():
        close(p.grad, whole[name])


def test_empty_batch_adds_nothing() -> None:
    model = build("llama", "lora")
    params = trainable(model)
    clipper = PerSampleClipper(model, 1.0)

    def never():
        raise AssertionError("loss_fn must not run for an empty batch")

    assert clipper.step(never, batch_size=0).shape == (0,)
    assert clipper.step(lambda: torch.zeros(0, requires_grad=True)).shape == (0,)
    assert all(p.grad is not None and not p.grad.any() for p in params.values())


def test_detach_restores_model() -> None:
    model = build("gpt2", "lora")
    ids, mask, labels = make_batch("gpt2")
    before = model(input_ids=ids, attention_mask=mask).logits
    with PerSampleClipper(model, 1.0) as clipper:
        assert any("forward" in m.__dict__ for m in model.modules())
        clipper.step(lambda: per_sample_losses(model, "gpt2", ids, mask, labels))
    assert all("forward" not in m.__dict__ for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before)
    # Ordinary training works again afterwards.
    model.zero_grad(set_to_none=True)
    per_sample_losses(model, "gpt2", ids, mask, labels).sum().backward()
    assert all(p.grad is not None for p in trainable(model).values())


def test_parameter_used_outside_its_module_is_refused() -> None:
    model = build("llama", "blocks")
    ids, mask, labels = make_batch("llama")
    weight = model.model.layers[0].mlp.up_proj.weight

    def leaky():
        return per_sample_losses(model, "llama", ids, mask, labels) + weight.sum()

    with pytest.raises(RuntimeError, match="outside"):
        PerSampleClipper(model, 1.0).step(leaky)


def test_norm_flops_prefers_the_cheaper_method() -> None:
    wide = nn.Linear(768, 3072)
    lora_a = nn.Linear(768, 4, bias=False)
    layers = [("mlp", wide), ("lora_A", lora_a)]
    table = {c.name: c for c in norm_cost_table(layers, batch=8, seq=128)}
    assert table["mlp"].kind == "ghost" and table["lora_A"].kind == "materialise"
    assert table["mlp"].norm_flops < 0.1 * table["mlp"].train_flops
    assert norm_flops(layers, batch=8, seq=128) == sum(c.norm_flops for c in table.values())
    assert norm_flops(build("opt", "lora"), batch=4, seq=10) > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing(family: str) -> None:
    model = build(family, "blocks")
    ids, mask, labels = make_batch(family)
    params = trainable(model)

    def loss_fn():
        return per_sample_losses(model, family, ids, mask, labels)

    ref_norms = PerSampleClipper(model, 0.05, mode="reference").step(loss_fn)
    ref_sum = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    # Recomputed forwards run during backward; dropout is zero so train mode is deterministic.
    model.activation_checkpointing_enable()
    model.train()
    assert model.is_activation_checkpointing
    close(PerSampleClipper(model, 0.05).step(loss_fn), ref_norms)
    for name, p in params.items():
        close(p.grad, ref_sum[name])


BF16_UNIT_ROUNDOFF = 2.0**-8


@pytest.mark.parametrize(
    "family,kind", [("llama", "blocks"), ("opt", "lora"), ("gpt2", "lora"), ("bert", "blocks")]
)
def test_a_bf16_frozen_middle_keeps_the_engine_fp32_and_close_to_the_fp32_run(family: str, kind: str) -> None:
    """Embeddings, the middle blocks (1, 2) and the head in bf16; the adapter blocks (0, 3) in fp32.

    Exact: every trainable parameter, gradient, per-sample norm and clip factor is fp32, and the fast
    engine equals reference mode (materialised per-sample gradients) on the mixed model to fp32
    round-off: clipping works on exactly the gradients the mixed model has.
    Bounded: against the all-fp32 model, the per-sample norms and the clipped gradient sum differ by at
    most 16 u, u = 2^-8 the bf16 unit round-off. Every frozen part's output is rounded to bf16 (relative
    error up to u per element) on the way forward, and the gradient is rounded again on the way back
    through the bf16 middle; those errors, a few u each, pass through the rest of the network. Measured
    over every family and adapter kind: at most 11 u for a per-sample norm (OPT with LoRA, whose random
    tiny weights make large activations) and 7 u for the clipped sum, typically 1-2 u.
    """
    reference_model = build(family, kind)
    ids, mask, labels = make_batch(family)
    mixed = copy.deepcopy(reference_model)
    Placement(frozen_dtype=torch.bfloat16).place(mixed)
    # Parts holding a trainable parameter (adapter blocks, with LoRA's frozen bases; a trained head) are
    # fp32; the frozen parts (embeddings, the middle, the LM head) bf16.
    for name, part in model_parts(mixed):
        trains = any(p.requires_grad for p in part.parameters())
        expected = torch.float32 if trains else torch.bfloat16
        assert {p.dtype for p in part.parameters()} <= {expected}, name
    assert next(get_blocks(mixed)[1].parameters()).dtype == torch.bfloat16  # the middle really is bf16

    def run(model, mode):
        model.zero_grad(set_to_none=True)
        clipper = PerSampleClipper(model, 0.05, mode=mode)
        norms = clipper.step(lambda: per_sample_losses(model, family, ids, mask, labels))
        grads = {n: p.grad.clone() for n, p in trainable(model).items()}
        return norms, grads, clipper.last_clip_factors

    norms, grads, factors = run(mixed, "fast")
    assert norms.dtype == factors.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads.values())
    ref_norms, ref_grads, _ = run(mixed, "reference")
    close(norms, ref_norms)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name in grads:
        close(grads[name], ref_grads[name], scale)

    fp32_norms, fp32_grads, _ = run(reference_model, "fast")
    bound = 16 * BF16_UNIT_ROUNDOFF
    assert ((norms - fp32_norms).abs() / fp32_norms).max() <= bound
    flat, fp32_flat = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (grads, fp32_grads))
    assert (flat - fp32_flat).norm() <= bound * fp32_flat.norm()
    assert not torch.equal(flat, fp32_flat)  # the bf16 parts really ran in bf16


@pytest.mark.parametrize(
    "family,kind,kinds",
    [("llama", "blocks", {"ghost"}), ("opt", "lora", {"materialise"}), ("gpt2", "blocks", {"ghost"})],
)
def test_checkpointing_the_frozen_middle_keeps_the_engine_exact(family: str, kind: str, kinds: set) -> None:
    """--gradient-checkpointing recomputes the frozen middle (blocks 1, 2) in the backward pass; the
    adapter blocks (0, 3), where the engine's interceptors are, run once, so each activation is
    recorded once and the clipped gradients equal the per-example loop's (computed without it)."""
    model = build(family, kind)
    ids, mask, labels = make_batch(family)
    params = trainable(model)
    expected = loop_grads(model, family, ids, mask, labels)
    expected_norms = joint_norms(expected)
    clip = expected_norms.median().item()
    factors = (clip / (expected_norms + 1e-6)).clamp(max=1.0)
    expected_sum = {n: torch.einsum("b,b...->...", factors, g) for n, g in expected.items()}
    scale = max(g.abs().max().item() for g in expected.values())

    Placement(gradient_checkpointing=True).place(model)
    model.train()  # checkpointing applies in training; dropout is zero, so train mode is deterministic
    blocks = get_blocks(model)
    assert [b.gradient_checkpointing for b in blocks] == [False, True, True, False]
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        first_linear = next(m for m in block.modules() if isinstance(m, (nn.Linear, Conv1D)))
        first_linear.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    for policy in ("auto", "materialise", "ghost"):
        model.zero_grad(set_to_none=True)
        calls[:] = [0] * len(blocks)
        clipper = PerSampleClipper(model, clip, linear_norm=policy)
        close(clipper.step(lambda: per_sample_losses(model, family, ids, mask, labels)), expected_norms)
        assert calls == [1, 2, 2, 1]  # the middle ran twice (forward, then recomputed): checkpointing is on
        for name, p in params.items():
            close(p.grad, expected_sum[name], scale)
        if policy == "auto":
            assert kinds <= {c.kind for c in clipper.last_costs}
