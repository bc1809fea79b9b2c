"""Global unstructured magnitude pruning, the paper's companion compression (docs/DESIGN.md section 4).

The smallest-magnitude weights of all nn.Linear and nn.Conv2d layers together (one global L1
ranking, `torch.nn.utils.prune.global_unstructured`) are set to zero, then the pruning is made
permanent (`prune.remove`) so the result is a plain model: its state_dict has the usual keys, and
calibration and the backend see ordinary weights. SS2D's own scan parameters (x_proj, dt_projs,
A_logs, Ds) are not Linear/Conv weights and are left alone, as in the paper's setting.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils import prune

PRUNABLE = (nn.Linear, nn.Conv2d)


def _prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]


def prune_global_magnitude(model: nn.Module, amount: float = 0.4) -> nn.Module:
    """A copy of `model` with the `amount` fraction of its Linear/Conv2d weights with the smallest
    |w| (ranked globally) set to zero; `model` itself is unchanged."""
    if not 0 <= amount < 1:
        raise ValueError(f"amount is the fraction of weights to prune, in [0, 1), got {amount!r}")
    pruned = copy.deepcopy(model)
    targets = _prunable_weights(pruned)
    if not targets:
        raise ValueError("the model has no nn.Linear or nn.Conv2d weights to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in targets:
        prune.remove(module, name)
    return pruned


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries among all Linear/Conv2d weights."""
    weights = [m.weight.detach() for m, _ in _prunable_weights(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)
