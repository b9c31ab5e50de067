"""Class-importance scores per (class, channel), batched: one forward and one backward per batch.

ClassPathQ's score of channel k for class c is the fraction of class-c images whose first-order
Taylor term ``|a_k(x) * d target / d a_k(x)|`` exceeds ``eps`` somewhere (max over spatial positions).
The reference computes it one image per backward pass. In eval mode the images of a batch are
independent, so one backward of ``sum_i target_i(x_i)`` yields every image's own gradient at once.
We ask autograd only for activation gradients (parameters are frozen for the pass), so no weight
gradients are computed, and reduce each activation as soon as its gradient arrives (a tensor hook)
instead of retaining gradients.

``a`` is the output of every Conv2d/Linear by default (model-agnostic: for conv -> BN -> ReLU the
non-zero pattern matches the reference's ReLU-output reading), or of named modules.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CpqError
from ..fileio import atomic_torch_save
from ..progress import progress as progress_bar
from ..quant.transform import quantizable_layers
from ..train.evaluate import memory_format_of

SCORERS = ("taylor", "activation", "gradient")
TARGETS = ("logit", "loss")
FORMAT = "cpq-class-scores/1"


class ScoringError(CpqError):
    """Bad scoring input: unknown scorer or module, or a class without images."""


@dataclass(frozen=True)
class ScoreSettings:
    """What is scored and how. ``taylor`` gives fractions of images; the others per-class means."""

    scorer: str = "taylor"
    target: str = "logit"
    eps: float = 0.0  # the reference's 1e-50 underflows to 0 in float32: "exceeds eps" = "is non-zero"
    modules: tuple[str, ...] | None = None  # None: every Conv2d/Linear output

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise ScoringError(f"unknown scorer {self.scorer!r}; allowed: {', '.join(SCORERS)}")
        if self.target not in TARGETS:
            raise ScoringError(f"unknown target {self.target!r}; allowed: {', '.join(TARGETS)}")
        if self.eps < 0:
            raise ScoringError(f"eps must be >= 0, got {self.eps}")


@dataclass
class ClassScores:
    """Scores (classes x channels) per scored layer, in forward registration order."""

    scores: dict[str, torch.Tensor]
    class_names: list[str]
    images_per_class: list[int]
    full_precision: list[str]
    settings: dict[str, Any]

    @property
    def layers(self) -> list[str]:
        return list(self.scores)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_count(self) -> dict[str, torch.Tensor]:
        """Class-based quantization's score: per channel, the sum of its class scores (in [0, C])."""
        return {name: score.sum(0) for name, score in self.scores.items()}

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: layer, depth, channel, class, score, full_precision."""
        frames = []
        for depth, (name, score) in enumerate(self.scores.items()):
            classes, channels = score.shape
            frames.append(pd.DataFrame({
                "layer": name, "depth": depth, "full_precision": name in self.full_precision,
                "class": [self.class_names[c] for c in range(classes) for _ in range(channels)],
                "channel": list(range(channels)) * classes, "score": score.flatten().tolist(),
            }))
        return pd.concat(frames, ignore_index=True)

    def save(self, path: str | os.PathLike) -> None:
        atomic_torch_save({"format": FORMAT, "scores": self.scores, "class_names": self.class_names,
                           "images_per_class": self.images_per_class, "full_precision": self.full_precision,
                           "settings": self.settings}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClassScores":
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ScoringError(f"class scores {path} are unreadable: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ScoringError(f"{path} is not a class-score file ({FORMAT})")
        return cls(dict(payload["scores"]), list(payload["class_names"]), list(payload["images_per_class"]),
                   list(payload["full_precision"]), dict(payload["settings"]))


def scored_modules(model: nn.Module, names: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    if names is None:
        return quantizable_layers(model)
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ScoringError(f"unknown module(s) {unknown[:5]}; e.g. {[n for n in modules if n][:6]}")
    return [(n, modules[n]) for n in names]


@contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, frozen parameters and out-of-place activations for the duration of scoring."""
    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    inplace = [(m, m.inplace) for m in model.modules() if isinstance(getattr(m, "inplace", None), bool)]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for m, _ in inplace:  # an in-place op on a scored output would change the ``a`` we multiply with
        m.inplace = False
    try:
        yield
    finally:
        model.train(was_training)
        for p, flag in zip(model.parameters(), grads):
            p.requires_grad_(flag)
        for m, flag in inplace:
            m.inplace = flag


def _channel_first(t: torch.Tensor, is_linear: bool) -> torch.Tensor:
    """(B, C, ...) with the channel axis second: Linear's channels are its last axis."""
    return t.movedim(-1, 1) if is_linear and t.dim() > 2 else t


def per_image_statistic(a: torch.Tensor, g: torch.Tensor | None, scorer: str) -> torch.Tensor:
    """(B, C): max |a*g| (taylor), mean |a| (activation) or mean |g| (gradient) over positions."""
    if scorer == "taylor":
        t = a * g
        return t.abs() if t.dim() == 2 else torch.linalg.vector_norm(t.flatten(2), ord=float("inf"), dim=2)
    source = a if scorer == "activation" else g
    return source.abs() if source.dim() == 2 else source.abs().flatten(2).mean(2)


def score_classes(model: nn.Module, batches: Iterable, num_classes: int, class_names: Sequence[str] | None = None,
                  settings: ScoreSettings = ScoreSettings(), device: str | torch.device = "cpu",
                  full_precision: Iterable[str] = (), progress: bool = True) -> ClassScores:
    """Score every (class, channel) of the scored modules over ``batches`` of (images, labels)."""
    modules = scored_modules(model, settings.modules)
    names = [n for n, _ in modules]
    sums: dict[str, torch.Tensor] = {}
    per_class = torch.zeros(num_classes, dtype=torch.long)
    needs_grad = settings.scorer != "activation"
    fmt = memory_format_of(model)
    with scoring_mode(model):
        for images, labels in progress_bar(batches, progress, desc="scoring", leave=False):
            images, labels = images.to(device).contiguous(memory_format=fmt), labels.to(device)
            if int(labels.max()) >= num_classes or int(labels.min()) < 0:
                raise ScoringError(f"label {int(labels.max())} outside 0..{num_classes - 1}: class count mismatch")
            pending: dict[str, torch.Tensor] = {}
            one_hot = F.one_hot(labels, num_classes).to(torch.float64)

            def record(name: str, is_linear: bool, a: torch.Tensor, g: torch.Tensor | None) -> None:
                stat = per_image_statistic(_channel_first(a.detach(), is_linear),
                                           None if g is None else _channel_first(g, is_linear), settings.scorer)
                if settings.scorer == "taylor":
                    stat = stat > settings.eps
                # per-class sums as one small matmul (index_add_ on these strided slices is ~100x slower)
                per_class_sum = one_hot.T @ stat.to(torch.float64)
                sums[name] = per_class_sum.cpu() if name not in sums else sums[name] + per_class_sum.cpu()

            def forward_hook(module, inputs, output, name):
                if not isinstance(output, torch.Tensor):
                    raise ScoringError(f"module {name!r} does not return a tensor; score another module")
                is_linear = isinstance(module, nn.Linear)
                if not needs_grad:
                    record(name, is_linear, output, None)
                    return None
                if not output.requires_grad:
                    output.requires_grad_(True)  # first scored layer: the graph starts here
                pending[name] = output
                output.register_hook(lambda g, a=output, n=name, lin=is_linear: record(n, lin, a, g))
                return None

            hooks = [m.register_forward_hook(lambda mod, i, o, n=n: forward_hook(mod, i, o, n)) for n, m in modules]
            try:
                with torch.set_grad_enabled(needs_grad):
                    logits = model(images)
                    if logits.shape[1] != num_classes:
                        raise ScoringError(f"class count mismatch: the model has {logits.shape[1]} outputs, the data {num_classes} classes")
                    if needs_grad:
                        if settings.target == "logit":
                            target = logits.gather(1, labels[:, None]).sum()
                        else:
                            target = F.cross_entropy(logits, labels, reduction="sum")
                        torch.autograd.grad(target, list(pending.values()), allow_unused=True)
            finally:
                for handle in hooks:
                    handle.remove()
            missing = [n for n in names if n not in sums]
            if missing:
                raise ScoringError(f"module(s) {missing[:5]} received no gradient from the target; they do not affect the output")
            per_class += torch.bincount(labels.cpu(), minlength=num_classes)
    empty = [c for c in range(num_classes) if per_class[c] == 0]
    if empty:
        label = [class_names[c] for c in empty] if class_names else empty
        raise ScoringError(f"class(es) {label} have no images in the scoring data; every class needs at least one")
    scores = {n: (sums[n] / per_class[:, None].double()).float() for n in names}
    return ClassScores(scores, list(class_names or [str(c) for c in range(num_classes)]), per_class.tolist(),
                       [n for n in names if n in set(full_precision)], asdict(settings))


def state_fingerprint(model: nn.Module) -> str:
    """Hash of a model's state (weights and buffers), to key cached scores by checkpoint."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes() if value.dtype != torch.bfloat16 else b"")
    return digest.hexdigest()[:16]


def cached_scores(cache_dir: str | os.PathLike, model: nn.Module, data_key: dict[str, Any], compute, settings: ScoreSettings) -> ClassScores:
    """Load scores for (model state, data, settings) from ``cache_dir`` or compute and store them."""
    key_source = json.dumps({"model": state_fingerprint(model), "data": data_key, "settings": asdict(settings)}, sort_keys=True)
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"scores-{key}.pt"
    if path.is_file():
        try:
            return ClassScores.load(path)
        except ScoringError:
            pass  # damaged cache entry: recompute and overwrite
    scores = compute()
    scores.settings = {**scores.settings, "cache_key": key, "data": data_key}
    scores.save(path)
    return scores
