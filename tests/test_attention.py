"""Scaled dot-product attention: one fused unit in the joint graph, right gradients.

PyTorch's core decomposition of ``_scaled_dot_product_flash_attention_for_cpu``
returned the attention probabilities where the op's derivative formula
expects the logsumexp, so every SDPA gradient came out wrong (relative
errors of 10 and more) without an error. The op now stays whole
(``decompositions.EXCLUDED``): forward and backward run as the fused aten
kernels, extern calls, and only the O(T) logsumexp crosses to the backward.

Every variant runs through both faces and is compared with eager, outputs
and the gradient of every input that requires grad, for one random upstream
gradient. Dropout cannot match eager's random stream; it is checked by
consistency instead: the backward must apply exactly the forward's mask.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import retrograd
from checks import assert_close_floor

B, H, T, D = 2, 4, 8, 16

sdpa = F.scaled_dot_product_attention


def _qkv(*shape_of, dtype=torch.float32, noncontiguous=False):
    torch.manual_seed(0)
    tensors = []
    for shape in shape_of:
        if noncontiguous:   # (B, T, H, D) storage seen as (B, H, T, D)
            b, h, t, d = shape
            tensors.append(torch.randn(b, t, h, d, dtype=dtype).transpose(1, 2))
        else:
            tensors.append(torch.randn(*shape, dtype=dtype))
    return [t.requires_grad_() for t in tensors]


_generator = torch.Generator().manual_seed(1)
BOOL_MASK = torch.rand(T, T, generator=_generator) > 0.3
FLOAT_MASK = torch.randn(B, 1, T, T, generator=_generator)


#: name -> (function of the inputs, inputs)
VARIANTS = {
    "plain": (lambda q, k, v: sdpa(q, k, v), lambda: _qkv(*[(B, H, T, D)] * 3)),
    "causal": (lambda q, k, v: sdpa(q, k, v, is_causal=True), lambda: _qkv(*[(B, H, T, D)] * 3)),
    "bool_mask": (lambda q, k, v: sdpa(q, k, v, attn_mask=BOOL_MASK),
                  lambda: _qkv(*[(B, H, T, D)] * 3)),
    "float_mask": (lambda q, k, v: sdpa(q, k, v, attn_mask=FLOAT_MASK),
                   lambda: _qkv(*[(B, H, T, D)] * 3)),
    "float_mask_requires_grad": (
        lambda q, k, v, m: sdpa(q, k, v, attn_mask=m),
        lambda: _qkv(*[(B, H, T, D)] * 3) + [torch.randn(B, H, T, T).requires_grad_()]),
    "gqa": (lambda q, k, v: sdpa(q, k, v, enable_gqa=True),
            lambda: _qkv((B, H, T, D), (B, 2, T, D), (B, 2, T, D))),
    "tq_ne_tk": (lambda q, k, v: sdpa(q, k, v), lambda: _qkv((B, H, T, D), *[(B, H, 12, D)] * 2)),
    "tq_ne_tk_causal": (lambda q, k, v: sdpa(q, k, v, is_causal=True),
                        lambda: _qkv((B, H, T, D), *[(B, H, 12, D)] * 2)),
    "scale": (lambda q, k, v: sdpa(q, k, v, scale=0.3), lambda: _qkv(*[(B, H, T, D)] * 3)),
    "noncontiguous": (lambda q, k, v: sdpa(q, k, v, is_causal=True),
                      lambda: _qkv(*[(B, H, T, D)] * 3, noncontiguous=True)),
}
for _d in (8, 32, 64, 128):
    VARIANTS[f"head_dim_{_d}"] = (lambda q, k, v: sdpa(q, k, v, is_causal=True),
                                  lambda d=_d: _qkv(*[(1, 2, T, d)] * 3))


def _run(function, inputs, autocast=None):
    """Output (as float32) and the gradients of ``inputs`` for a fixed upstream gradient."""
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = function(*inputs)
    torch.manual_seed(3)
    upstream = torch.randn(out.shape)
    grads = torch.autograd.grad(out.float(), inputs, upstream)
    return [out.float(), *grads]


def _fresh(inputs):
    return [t.detach().clone().requires_grad_() for t in inputs]


def _compiled(face, function):
    if face == "standalone":
        return retrograd.compile(function)
    torch._dynamo.reset()
    return torch.compile(function, backend="retrograd", fullgraph=True)


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_attention_matches_eager(name, face):
    function, make = VARIANTS[name]
    inputs = make()
    expected = _run(function, _fresh(inputs))
    got = _run(_compiled(face, function), _fresh(inputs))
    for g, e in zip(got, expected):
        assert_close_floor(g, e, 1e-5)


@pytest.mark.parametrize("name", ["causal", "float_mask", "gqa"])
def test_attention_bf16_autocast(name):
    """bf16 under autocast (failed with "expected scalar type Float but found
    BFloat16"): no worse than eager bf16 against the fp32 result."""
    function, make = VARIANTS[name]
    inputs = make()
    exact = _run(function, _fresh(inputs))
    eager = _run(function, _fresh(inputs), autocast=torch.bfloat16)
    got = _run(retrograd.compile(function), _fresh(inputs), autocast=torch.bfloat16)
    for g, e, x in zip(got, eager, exact):
        eager_error = (e - x).abs().max().item()
        assert (g - x).abs().max().item() <= 1.5 * eager_error + 1e-6


def test_attention_saves_logsumexp_not_probabilities():
    """Only the output and the O(T) logsumexp cross to the backward, never the
    O(T^2) attention probabilities."""
    t = 64
    q, k, v = _qkv(*[(1, 2, t, 8)] * 3)
    compiled = retrograd.compile(lambda q, k, v: sdpa(q, k, v, is_causal=True))
    compiled(q, k, v).sum().backward()
    stats = {p["name"]: p["stats"] for p in compiled.reports["forward"]["passes"]}
    output_bytes, logsumexp_bytes = q.numel() * 4, 1 * 2 * t * 4
    assert stats["checkpoint"]["saved_activation_bytes"] == output_bytes + logsumexp_bytes
    assert compiled.reports["forward"]["kernels"]["extern_ops"] == {
        "aten._scaled_dot_product_flash_attention_for_cpu.default": 1}


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
def test_attention_dropout_backward_uses_forward_mask(face):
    """With an identity ``v`` the output is the dropped, rescaled probability
    matrix itself; the gradients must be those of that exact matrix."""
    p = 0.3
    torch.manual_seed(0)
    q, k = (torch.randn(B, H, T, T, requires_grad=True) for _ in range(2))
    v = torch.eye(T).expand(B, H, T, T).clone().requires_grad_()
    function = _compiled(face, lambda q, k, v: sdpa(q, k, v, dropout_p=p))
    out = function(q, k, v)
    upstream = torch.randn(out.shape)
    got = torch.autograd.grad(out, (q, k, v), upstream)

    kept = (out != 0).detach()
    assert 0.5 < kept.float().mean().item() < 0.9      # a mask was applied at all
    q2, k2, v2 = _fresh([q, k, v])
    probs = torch.softmax(q2 @ k2.transpose(-2, -1) / T ** 0.5, dim=-1)
    expected_out = (probs * kept / (1 - p)) @ v2
    expected = torch.autograd.grad(expected_out, (q2, k2, v2), upstream)
    assert_close_floor(out, expected_out, 1e-5)
    for g, e in zip(got, expected):
        assert_close_floor(g, e, 1e-5)


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_module(need_weights):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(B, T, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(T)

    def step(module):
        inputs = x.clone().requires_grad_()
        out = module(inputs, inputs, inputs, attn_mask=mask, need_weights=need_weights)[0]
        out.square().sum().backward()
        grads = [inputs.grad] + [p.grad.clone() for p in mha.parameters()]
        mha.zero_grad()
        return [out] + grads

    expected = step(mha)
    compiled = retrograd.compile(mha)
    got = step(compiled)
    for g, e in zip(got, expected):
        assert_close_floor(g, e, 1e-5)
    if not need_weights:
        # q, k, v, the output and the logsumexp; the slices of the packed
        # in_proj_weight are views of a parameter, not saved activations
        stats = {p["name"]: p["stats"] for p in compiled.reports["forward"]["passes"]}
        head = B * 4 * T * 8 * 4
        assert stats["checkpoint"]["saved_activation_bytes"] == 4 * head + B * 4 * T * 4
