"""BatchNorm re-estimation: running statistics recomputed for the quantized network (AIMET's "BN re-estimation").

Lowering weights or activations shifts every channel's output distribution; the running mean and
variance a BatchNorm learned for the full-precision network then normalise the wrong distribution, and
at 2 bits a plan's accuracy collapses towards chance although a few hundred images would fix most of
it. Re-estimation runs those images through the quantized model with only the BatchNorm layers in
training mode and a cumulative average (``momentum=None``), so the statistics are exactly the mean and
(unbiased) variance over the batches, independent of the order of earlier estimates. Nothing is trained.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from ..devices import check_model_device

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
STATE = ("running_mean", "running_var", "num_batches_tracked")


def batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The model's BatchNorm layers that track running statistics."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BATCHNORMS) and m.track_running_stats]


def bn_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every BatchNorm's running statistics (to restore after a re-estimation)."""
    return {f"{name}.{key}": getattr(bn, key).detach().clone() for name, bn in batchnorms(model) for key in STATE}


@torch.no_grad()
def load_bn_statistics_(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back statistics taken by :func:`bn_statistics`."""
    for name, bn in batchnorms(model):
        for key in STATE:
            getattr(bn, key).copy_(saved[f"{name}.{key}"])


@contextmanager
def restored_bn_statistics(model: nn.Module) -> Iterator[None]:
    """Whatever happens inside, the BatchNorm running statistics are the same afterwards."""
    saved = bn_statistics(model)
    try:
        yield
    finally:
        load_bn_statistics_(model, saved)


@torch.no_grad()
def reestimate_bn_(model: nn.Module, batches: Iterable, device: str | torch.device = "cpu") -> int:
    """Recompute every BatchNorm's running mean and variance on ``batches`` of (images, labels).

    The rest of the model stays in eval mode (dropout off, quantizers fixed). Returns the number of
    images seen; a model without BatchNorm is left as it is (0). The model must be on ``device``.
    """
    norms = [bn for _, bn in batchnorms(model)]
    if not norms:
        return 0
    check_model_device(model, device, "reestimate_bn_")
    was_training = model.training
    momenta = [bn.momentum for bn in norms]
    model.eval()
    seen = 0
    try:
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: the exact mean over the batches
            bn.train()
        for images, _ in batches:
            model(images.to(device))
            seen += int(images.shape[0])
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise ValueError("BatchNorm re-estimation got no images")
    return seen
