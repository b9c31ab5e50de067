"""The reference's per-image scoring procedure: one forward and one backward per image.

Kept as the baseline that benchmarks compare the batched scorer against (and as documentation of
what the batched scorer must reproduce). Slow by design; use ``score_classes`` for real work.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .scoring import ClassScores, ScoreSettings, scored_modules, scoring_mode


def score_classes_per_image(model: nn.Module, batches: Iterable, num_classes: int, class_names: Sequence[str] | None = None,
                            settings: ScoreSettings = ScoreSettings(), device: str | torch.device = "cpu") -> ClassScores:
    """Taylor scores image by image with ``retain_grad`` on every scored output."""
    if settings.scorer != "taylor":
        raise ValueError("the per-image reference implements the Taylor scorer only")
    modules = scored_modules(model, settings.modules)
    hits: dict[str, torch.Tensor] = {}
    counts = torch.zeros(num_classes)
    with scoring_mode(model):
        for p in model.parameters():  # the reference lets gradients reach the weights
            p.requires_grad_(True)
        for images, labels in batches:
            for x, y in zip(images.to(device), labels.to(device)):
                outputs: dict[str, torch.Tensor] = {}

                def keep(module, inputs, output, name):
                    output.retain_grad()
                    outputs[name] = output

                handles = [m.register_forward_hook(lambda mod, i, o, n=n: keep(mod, i, o, n)) for n, m in modules]
                try:
                    logits = model(x[None])
                finally:
                    for handle in handles:
                        handle.remove()
                target = logits[0, y] if settings.target == "logit" else F.cross_entropy(logits, y[None])
                model.zero_grad(set_to_none=True)
                target.backward()
                for name, module in modules:
                    t = (outputs[name] * outputs[name].grad).abs()[0]
                    if isinstance(module, nn.Linear) and t.dim() > 1:
                        t = t.movedim(-1, 0)
                    per_channel = t.flatten(1).amax(1) if t.dim() > 1 else t
                    hits.setdefault(name, torch.zeros(num_classes, per_channel.numel()))
                    hits[name][int(y)] += (per_channel > settings.eps).float().cpu()
                counts[int(y)] += 1
        model.zero_grad(set_to_none=True)
    names = [n for n, _ in modules]
    return ClassScores({n: hits[n] / counts[:, None] for n in names}, list(class_names or range(num_classes)),
                       counts.long().tolist(), [], {"scorer": "taylor", "target": settings.target, "eps": settings.eps,
                                                    "reference": "per-image"})
