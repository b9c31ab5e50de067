"""The reference's per-image scoring procedure: one forward and one backward per image.

Kept as the baseline that benchmarks compare the batched scorer against (and as documentation of
what the batched scorer must reproduce). Slow by design; use ``score_classes`` for real work.
Like the batched scorer it asks autograd for activation gradients only (parameters frozen), so the
two differ in one thing: one image per pass instead of a batch.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .scoring import ClassScores, ScoreSettings, scored_modules, scoring_mode


def score_classes_per_image(model: nn.Module, batches: Iterable, num_classes: int, class_names: Sequence[str] | None = None,
                            settings: ScoreSettings = ScoreSettings(), device: str | torch.device = "cpu") -> ClassScores:
    """Taylor scores image by image (``settings.aggregate``: position or image order)."""
    if settings.scorer != "taylor":
        raise ValueError("the per-image reference implements the Taylor scorer only")
    modules = scored_modules(model, settings.modules)
    hits: dict[str, torch.Tensor] = {}
    counts = torch.zeros(num_classes)
    with scoring_mode(model) as out_of_place:
        out_of_place()  # each scored output must survive until its gradient is read
        for images, labels in batches:
            for x, y in zip(images.to(device), labels.to(device)):
                outputs: dict[str, torch.Tensor] = {}

                def keep(module, inputs, output, name):
                    outputs[name] = output

                handles = [m.register_forward_hook(lambda mod, i, o, n=n: keep(mod, i, o, n)) for n, m in modules]
                try:
                    logits = model(x[None].requires_grad_(True))
                finally:
                    for handle in handles:
                        handle.remove()
                target = logits[0, y] if settings.target == "logit" else F.cross_entropy(logits, y[None])
                grads = torch.autograd.grad(target, [outputs[n] for n, _ in modules])
                for (name, module), grad in zip(modules, grads):
                    t = (outputs[name].detach() * grad).abs()[0]
                    if isinstance(module, nn.Linear) and t.dim() > 1:
                        t = t.movedim(-1, 0)
                    active = (t > settings.eps).float().reshape(t.shape[0], -1)  # (channels, positions)
                    if settings.aggregate == "image":
                        active = active.amax(1, keepdim=True)
                    hits.setdefault(name, torch.zeros(num_classes, *active.shape))
                    hits[name][int(y)] += active.cpu()
                counts[int(y)] += 1
    names = [n for n, _ in modules]
    fractions = {n: hits[n] / counts[:, None, None] for n in names}  # (classes, channels, positions)
    position_counts = {n: f.sum(0).amax(1) for n, f in fractions.items()} if settings.aggregate == "position" else None
    return ClassScores({n: f.amax(2) for n, f in fractions.items()}, list(class_names or range(num_classes)),
                       counts.long().tolist(), [], {"scorer": "taylor", "target": settings.target, "eps": settings.eps,
                                                    "aggregate": settings.aggregate, "reference": "per-image"},
                       position_counts)
