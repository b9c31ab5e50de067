"""Dynamic network surgery (Guo, Yao and Chen, NeurIPS 2016): pruning masks that follow training, weights that grow back.

Magnitude pruning removes a weight for good. Surgery keeps every latent weight and a mask per layer:
the layer computes with ``weight * mask``, while the gradient updates every latent weight as if it
were active (straight-through), so a pruned weight whose magnitude grows past a threshold is
*spliced* back and an active one that shrinks below another is cut. The two thresholds
``a < b`` leave a band in which a weight keeps its state (hysteresis, so masks do not flicker).

The paper derives ``a`` and ``b`` from each layer's mean and standard deviation with a hand-set
factor per layer; we aim at a sparsity instead: at every update ``a = (1 - h) q`` and ``b = (1 + h) q``
with ``q`` the magnitude below which ``target`` of the layer's latent weights lie (``h`` =
``hysteresis``, 0.1 by default), so each layer settles near its target and sparsity still differs by
layer when targets do (:data:`cpq_lib.sparse.pruning.Sparsity`). Masks update on every training
forward (``update_every`` to thin that out), never in eval mode; their state (mask, target, update
count) is in the state dict, so a killed fine-tuning resumes exactly. torch has no such mask
(``torch.nn.utils.prune`` masks are fixed), hence this parametrization.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parametrize

from .pruning import Sparsity, check_layer_sparsity, layer_targets, make_permanent_, prunable_layers, sparsity_table


def _threshold(magnitudes: torch.Tensor, target: float) -> float:
    """The magnitude below which ``target`` of the entries lie (0 for target 0)."""
    count = round(target * magnitudes.numel())
    if count == 0:
        return 0.0
    return float(torch.kthvalue(magnitudes.flatten().double().cpu(), count).values)


class SurgeryMask(nn.Module):
    """Parametrization ``weight -> weight * mask`` whose mask follows the latent weights during training."""

    def __init__(self, weight: torch.Tensor, target: float, hysteresis: float = 0.1, update_every: int = 1) -> None:
        super().__init__()
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis must be in [0, 1), got {hysteresis!r}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an integer >= 1, got {update_every!r}")
        self.hysteresis, self.update_every = float(hysteresis), update_every
        magnitudes = weight.detach().abs()
        count = round(target * weight.numel())
        order = torch.sort(magnitudes.flatten(), stable=True).indices  # exactly the target at the start
        mask = torch.ones(weight.numel(), dtype=weight.dtype, device=weight.device)
        mask[order[:count]] = 0.0
        self.register_buffer("mask", mask.view_as(weight))
        self.register_buffer("target", torch.tensor(float(target), dtype=torch.float64))
        self.register_buffer("updates", torch.tensor(0))

    @torch.no_grad()
    def update(self, weight: torch.Tensor) -> None:
        """Cut weights below ``(1 - h) q``, splice back those above ``(1 + h) q``, keep the rest as they are."""
        magnitudes = weight.detach().abs()
        q = _threshold(magnitudes, float(self.target))
        low, high = (1 - self.hysteresis) * q, (1 + self.hysteresis) * q
        mask = torch.where(magnitudes < low, torch.zeros_like(self.mask), self.mask)
        self.mask.copy_(torch.where(magnitudes > high, torch.ones_like(mask), mask) if q > 0 else torch.ones_like(mask))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.updates += 1
            if int(self.updates) % self.update_every == 0:
                self.update(weight)
        return weight + (weight * self.mask - weight).detach()  # the value weight * mask, the gradient to every weight


def surgery_layers(model: nn.Module) -> list[tuple[str, nn.Module, SurgeryMask]]:
    return [(name, module, module.parametrizations.weight[0]) for name, module in model.named_modules()
            if parametrize.is_parametrized(module, "weight") and isinstance(module.parametrizations.weight[0], SurgeryMask)]


@torch.no_grad()
def surgery_prune_(model: nn.Module, sparsity: Sparsity, exclude: Sequence[str] = (), hysteresis: float = 0.1,
                   update_every: int = 1) -> pd.DataFrame:
    """Put surgery masks on every Conv2d / Linear not excluded, each at its target (the smallest magnitudes
    first); later calls (a gradual schedule) only change the targets. Returns :func:`sparsity_table`."""
    sparsity = check_layer_sparsity(sparsity)
    existing = {name: mask for name, _, mask in surgery_layers(model)}
    if existing:
        targets = layer_targets([(name, None) for name in existing], sparsity)
        for name, mask in existing.items():
            mask.target.fill_(targets[name])
        return sparsity_table(model)
    make_permanent_(model)  # magnitude masks folded first
    layers = prunable_layers(model, exclude)
    if not layers:
        raise ValueError("no Conv2d / Linear layer to prune (check exclude)")
    targets = layer_targets(layers, sparsity)
    masks = {name: SurgeryMask(module.weight, targets[name], hysteresis, update_every) for name, module in layers}
    for name, module in layers:
        parametrize.register_parametrization(module, "weight", masks[name])
    return sparsity_table(model)


def prepare_surgery_(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Give the named layers surgery masks (target 0), so a state dict saved during surgery loads into a fresh model."""
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        if not (parametrize.is_parametrized(module, "weight") and isinstance(module.parametrizations.weight[0], SurgeryMask)):
            parametrize.register_parametrization(module, "weight", SurgeryMask(module.weight, 0.0))
    return model


def surgery_names(state: dict) -> list[str]:
    """Layer names with a surgery mask in a state dict."""
    suffix = ".parametrizations.weight.0.mask"
    return [key[: -len(suffix)] for key in state if key.endswith(suffix) and key[: -len(suffix)] + ".parametrizations.weight.0.target" in state]


@torch.no_grad()
def fold_surgery_(model: nn.Module) -> nn.Module:
    """Bake the masks in: plain weights with zeros where cut (the latent values of cut weights are dropped)."""
    for _, module, _ in surgery_layers(model):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model
