"""Evaluation: top-1, per-class accuracy and mean loss over any iterable of (images, labels) batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from ..devices import check_model_device
from ..progress import progress as progress_bar


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    per_class_accuracy: list[float]
    count: int
    per_class_count: list[int] = field(default_factory=list)
    correct: torch.Tensor | None = None  # per image, in batch order (``per_image=True``): paired tests need it

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "loss": self.loss, "per_class_accuracy": self.per_class_accuracy,
                "count": self.count, "per_class_count": self.per_class_count}


def memory_format_of(model: nn.Module) -> torch.memory_format:
    """channels_last if the model's first 4-D weight is stored that way, so inputs can match it."""
    for parameter in model.parameters():
        if parameter.dim() == 4:
            return torch.channels_last if parameter.is_contiguous(memory_format=torch.channels_last) and not parameter.is_contiguous() else torch.contiguous_format
    return torch.contiguous_format


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, num_classes: int, device: str | torch.device = "cpu",
             progress: bool = False, desc: str = "eval", per_image: bool = False, sum_over_ranks: bool = False) -> EvalResult:
    """Evaluate in eval mode (restoring the previous mode afterwards). The model must already be on
    ``device`` (see cpq_lib.devices: functions never move a caller's model).

    ``sum_over_ranks``: ``batches`` is this rank's shard of the data (distributed training); the sums
    are added over the ranks, so every rank returns the accuracy on the whole data."""
    check_model_device(model, device, "evaluate")
    was_training = model.training
    model.eval()
    fmt = memory_format_of(model)
    correct = total = None
    loss_sum = None
    hits: list[torch.Tensor] = []
    criterion = nn.CrossEntropyLoss(reduction="sum")
    for images, labels in progress_bar(batches, progress, desc=desc, leave=False):
        images = images.to(device).contiguous(memory_format=fmt)
        labels = labels.to(device)
        logits = model(images)
        if logits.shape[1] != num_classes:
            raise ValueError(f"class count mismatch: the model outputs {logits.shape[1]} classes, the data has {num_classes}")
        if loss_sum is None:  # sums stay on the device until the end: no host round trip per batch
            loss_sum = torch.zeros((), dtype=torch.float64, device=labels.device)
            correct = torch.zeros(num_classes, dtype=torch.long, device=labels.device)
            total = torch.zeros(num_classes, dtype=torch.long, device=labels.device)
        loss_sum += criterion(logits, labels).double()
        one_hot = F.one_hot(labels, num_classes)  # exact integer sums, deterministic on every device
        total += one_hot.sum(0)
        right = logits.argmax(1) == labels
        correct += (one_hot * right.long()[:, None]).sum(0)
        if per_image:
            hits.append(right)
    model.train(was_training)
    if sum_over_ranks:
        from .distributed import all_reduce_

        if loss_sum is None:  # a rank whose shard was empty still joins the sums
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros(num_classes, dtype=torch.long, device=device)
            total = torch.zeros(num_classes, dtype=torch.long, device=device)
        for tensor in (loss_sum, correct, total):
            all_reduce_(tensor)
    if loss_sum is None or int(total.sum()) == 0:
        raise ValueError("evaluation data is empty")
    correct, total = correct.cpu(), total.cpu()
    count = int(total.sum())
    per_class = [float(c) / float(t) if t else float("nan") for c, t in zip(correct, total)]
    return EvalResult(float(correct.sum()) / count, float(loss_sum) / count, per_class, count, [int(t) for t in total],
                      torch.cat(hits).cpu() if per_image else None)
