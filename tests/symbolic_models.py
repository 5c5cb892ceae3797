"""The small float64 MLP, loss and batches the symbolic (dynamic-shape) tests
share: any batch size works, so a second size makes a program symbolic."""

from __future__ import annotations

import torch


def mlp() -> torch.nn.Module:
    """Linear(6, 8) -> Tanh -> Linear(8, 3), float64, the same weights each call."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).double()


def mse(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def batch(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and targets of ``rows`` rows for ``mlp``."""
    return torch.randn(rows, 6, dtype=torch.float64), torch.randn(rows, 3, dtype=torch.float64)
