"""A zoo of tiny models for the end-to-end tests, built from code with random weights.

Nothing is downloaded: every model comes from code or a config. Each entry is
a ``ZooEntry``: a function building the model, a function making random inputs
(the inputs that should receive gradients have ``requires_grad=True``) and a
loss mapping the model's output to a scalar. Shapes stay tiny because Triton's
interpreter costs about 1.5 ms per program instance.

The second half holds the parity harness: ``training_step`` runs one
forward and backward and collects the loss and every gradient by name;
``assert_parity`` compares two such results by relative error.

Example:
    >>> entry = ZOO["mlp"]
    >>> model = entry.model()
    >>> loss = entry.run(model, entry.inputs())
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from retrograd.numerics import relative_error, wide

__all__ = ["ZooEntry", "ZOO", "mlp", "cnn", "attention_block", "gpt2_tiny", "mlp_frozen",
           "lora", "MLP", "SmallCNN", "AttentionBlock", "LoRALinear", "LoRATransformer",
           "training_step",
           "assert_parity", "clone_inputs", "errors"]


@dataclass(frozen=True)
class ZooEntry:
    """A model of the zoo: how to build it, feed it, and reduce its output to a loss."""

    name: str
    model: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    loss: Callable[[Any], torch.Tensor]
    call: Callable[..., Any] = lambda model, *inputs: model(*inputs)

    def run(self, model: Callable, inputs: tuple) -> torch.Tensor:
        """The loss of ``model`` (eager or compiled) on ``inputs``."""
        return self.loss(self.call(model, *inputs))


def _weighted_sum(output: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient differs from element to element.

    Squares and positive weights: no cancellation in the sum, so the loss's
    relative error measures the model, not the loss.
    """
    weights = torch.linspace(0.5, 1.5, output.numel(), dtype=output.dtype,
                             device=output.device).view(output.shape)
    return (output.square() * weights).sum()


# -- MLP ------------------------------------------------------------------------

class MLP(nn.Module):
    """Linear -> GELU -> Linear, a residual around it, then LayerNorm and a head."""

    def __init__(self, features: int = 8, hidden: int = 16, classes: int = 4):
        super().__init__()
        self.up = nn.Linear(features, hidden)
        self.down = nn.Linear(hidden, features)
        self.norm = nn.LayerNorm(features)
        self.head = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.down(F.gelu(self.up(x)))
        return self.head(self.norm(x))


def mlp() -> ZooEntry:
    return ZooEntry(
        "mlp",
        model=lambda: MLP(),
        inputs=lambda: (torch.randn(4, 8, requires_grad=True),),
        loss=_weighted_sum,
    )


def mlp_frozen() -> ZooEntry:
    """The MLP with half its parameter tensors frozen; the input still wants a gradient."""

    def build() -> nn.Module:
        model = MLP()
        for module in (model.up, model.norm):
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        return model

    return ZooEntry(
        "mlp_frozen",
        model=build,
        inputs=lambda: (torch.randn(4, 8, requires_grad=True),),
        loss=_weighted_sum,
    )


# -- CNN ------------------------------------------------------------------------

class SmallCNN(nn.Module):
    """Two stages and a linear head: Conv -> BatchNorm -> ReLU -> MaxPool, then
    Conv (with bias) -> ReLU -> BatchNorm -> AvgPool. BatchNorm uses batch
    statistics in training mode. The first conv has no bias: a bias right
    before BatchNorm has a gradient that is zero in exact arithmetic, so its
    computed value is rounding noise that no relative test can compare.
    """

    def __init__(self, channels: int = 3, width: int = 4, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.avg_pool2d(self.bn2(F.relu(self.conv2(x))), 2)
        return self.head(x.flatten(1))


def cnn() -> ZooEntry:
    return ZooEntry(
        "cnn",
        model=lambda: SmallCNN(),
        inputs=lambda: (torch.randn(2, 3, 8, 8, requires_grad=True),),
        loss=_weighted_sum,
    )


# -- a causal self-attention block, by hand ---------------------------------------

class AttentionBlock(nn.Module):
    """A pre-norm transformer block: causal self-attention and a GELU MLP, with residuals."""

    def __init__(self, dim: int = 16, heads: int = 2, max_tokens: int = 8):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(2 * dim, dim)
        causal = torch.tril(torch.ones(max_tokens, max_tokens, dtype=torch.bool))
        self.register_buffer("causal", causal, persistent=False)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=-1)
        q, k, v = (t.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)
                   for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads)
        scores = scores.masked_fill(~self.causal[:tokens, :tokens], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(mixed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


def attention_block() -> ZooEntry:
    return ZooEntry(
        "attention_block",
        model=lambda: AttentionBlock(),
        inputs=lambda: (torch.randn(2, 8, 16, requires_grad=True),),
        loss=_weighted_sum,
    )


# -- GPT-2, tiny ----------------------------------------------------------------

def _gpt2_model() -> nn.Module:
    """Built from a config with random weights (no download) and the library's
    default attention (SDPA). Dropout is off so that gradients compare exactly
    with eager; tests/test_transformers_zoo.py covers the default dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        summary_first_dropout=0.0, bos_token_id=0, eos_token_id=1)
    model = GPT2LMHeadModel(config)
    model.train()
    return model


def gpt2_tiny() -> ZooEntry:
    """transformers' GPT2LMHeadModel, 2 layers of width 32, on 2x8 token ids.

    It is called with ``labels``, so its LM loss (shift, cross-entropy) is part
    of the compiled graph; the loss is that output's ``.loss``.
    """
    return ZooEntry(
        "gpt2_tiny",
        model=_gpt2_model,
        inputs=lambda: (torch.randint(0, 64, (2, 8)),),
        loss=lambda output: output.loss,
        call=lambda model, ids: model(input_ids=ids, labels=ids),
    )


# -- a LoRA fine-tune -----------------------------------------------------------

class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``B @ A`` (Hu et al., 2021).

    ``y = base(x) + (x @ A^T @ B^T) * alpha / rank``. LoRA starts ``B`` at zero;
    here it starts small and random so that every adapter gradient is non-zero
    from the first step (a zero ``B`` gives ``A`` an exactly zero gradient,
    which no relative test can compare).
    """

    def __init__(self, features_in: int, features_out: int, rank: int = 4,
                 alpha: float = 8.0):
        super().__init__()
        self.base = nn.Linear(features_in, features_out)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, features_in) / math.sqrt(features_in))
        self.lora_b = nn.Parameter(torch.randn(features_out, rank) * 0.1)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling


class _LoRABlock(nn.Module):
    """A pre-norm block: causal SDPA attention with LoRA on q, k, v and the output
    projection, then a GELU MLP; norms and MLP frozen."""

    def __init__(self, dim: int, heads: int, rank: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (LoRALinear(dim, dim, rank) for _ in range(4))
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        for module in (self.norm1, self.norm2, self.fc, self.out):
            module.requires_grad_(False)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = (projection(x).view(batch, tokens, self.heads, dim // self.heads)
                   .transpose(1, 2) for projection in (self.q, self.k, self.v))
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(mixed.transpose(1, 2).reshape(batch, tokens, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class LoRATransformer(nn.Module):
    """A small causal language model fine-tuned with LoRA: token and position
    embeddings, ``layers`` blocks, a final norm and an LM head, every base
    weight frozen; only the adapters (``lora_a``, ``lora_b``) train. Returns the
    next-token cross-entropy of ``ids``."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 2, layers: int = 2,
                 tokens: int = 8, rank: int = 4):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, dim), nn.Embedding(tokens, dim)
        self.blocks = nn.ModuleList(_LoRABlock(dim, heads, rank) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)
        for module in (self.embed, self.position, self.norm, self.head):
            module.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def lora() -> ZooEntry:
    """LoRATransformer, 2 layers of width 32, rank 4, on 2x8 token ids; the
    model returns its loss."""
    return ZooEntry(
        "lora",
        model=lambda: LoRATransformer(),
        inputs=lambda: (torch.randint(0, 64, (2, 8)),),
        loss=lambda output: output,
    )


ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in
                            (mlp(), cnn(), attention_block(), gpt2_tiny(), mlp_frozen(), lora())}


# -- the parity harness -------------------------------------------------------------

def clone_inputs(inputs: tuple, dtype: torch.dtype | None = None) -> tuple:
    """Fresh leaf copies (floating ones cast to ``dtype`` if given), same requires_grad."""
    copies = []
    for value in inputs:
        copy = value.detach().clone()
        if dtype is not None and copy.is_floating_point():
            copy = copy.to(dtype)
        copies.append(copy.requires_grad_(value.requires_grad))
    return tuple(copies)


def forward_backward_peak(entry: ZooEntry, model: nn.Module, compiled: Callable,
                          inputs: tuple) -> int:
    """Measured peak (the profiler's allocation events, benchmarks/measuring.py)
    of one forward + backward of ``compiled`` after two warm-ups, ``model``'s
    gradients cleared inside each step, the batch made before the profiler
    starts (as benchmarks/peaks.py measures it)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from measuring import profiled_peak

    def step(batch):
        model.zero_grad(set_to_none=True)
        entry.run(compiled, batch).backward()
    for _ in range(2):
        step(clone_inputs(inputs))
    batch = clone_inputs(inputs)
    return profiled_peak(lambda: step(batch))


def training_step(entry: ZooEntry, model: Callable, parameters_of: nn.Module,
                  inputs: tuple) -> dict[str, torch.Tensor | None]:
    """One forward and backward of ``model`` on copies of ``inputs``.

    Returns the loss under ``"loss"``, each parameter's gradient under
    ``"grad <name>"`` (named as in ``parameters_of``, the eager module the
    parameters belong to; None where no gradient was made) and each input's
    gradient under ``"grad input <i>"`` for inputs that require grad.
    """
    inputs = clone_inputs(inputs)
    loss = entry.run(model, inputs)
    loss.backward()
    result: dict[str, torch.Tensor | None] = {"loss": loss.detach()}
    for name, parameter in parameters_of.named_parameters():
        result[f"grad {name}"] = parameter.grad
    for index, value in enumerate(inputs):
        if value.requires_grad:
            result[f"grad input {index}"] = value.grad
    return result


def _same_non_finite(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """``got`` has ``ref``'s NaNs and infinities, where ``ref`` has them
    (relative_error measures the finite rest only)."""
    if got.shape != ref.shape:
        return True       # relative_error reads a shape change as inf itself
    got, ref = wide(got), wide(ref)
    infinite = ref.isinf()
    return torch.equal(got.isnan(), ref.isnan()) and torch.equal(got[infinite], ref[infinite])


def errors(got: dict, ref: dict) -> dict[str, float]:
    """Relative error per name (retrograd.numerics'); a gradient present on one
    side only, or a NaN or inf on one side only, counts as inf."""
    assert got.keys() == ref.keys(), f"different results: {sorted(got.keys() ^ ref.keys())}"
    result = {}
    for name, expected in ref.items():
        actual = got[name]
        if expected is None or actual is None:
            result[name] = 0.0 if expected is None and actual is None else math.inf
        else:
            result[name] = (relative_error(actual, expected)
                            if _same_non_finite(actual, expected) else math.inf)
    return result


def assert_parity(got: dict, ref: dict, tolerance: float = 1e-5) -> None:
    """Every entry of ``got`` within ``tolerance`` relative error of ``ref``."""
    bad = {name: error for name, error in errors(got, ref).items() if not error < tolerance}
    assert not bad, f"relative error >= {tolerance:g}: " + ", ".join(
        f"{name}: {error:.3g}" for name, error in sorted(bad.items()))
