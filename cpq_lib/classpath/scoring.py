"""Class-importance scores per (class, channel), batched: one forward and one backward per batch.

ClassPathQ's score of channel k for class c is built from the first-order Taylor term
``t = |a_k(x) * d target / d a_k(x)|`` at every spatial position p. The reference code
(``get_neuron_score_for_path``) takes, per position, the fraction of class-c images with ``t > eps``
and then the max over positions: ``score[c, k] = max_p mean_{x in c} [t_{x,k,p} > eps]``; that is
our default (``aggregate="position"``, accumulators of classes x positions x channels). The other
order, ``mean_x max_p``, is available as ``aggregate="image"``.
The reference computes one image per backward pass. In eval mode the images of a batch are
independent, so one backward of ``sum_i target_i(x_i)`` yields every image's own gradient at once.
We ask autograd only for activation gradients (parameters are frozen for the pass), so no weight
gradients are computed, and reduce each activation as soon as its gradient arrives (a tensor hook)
instead of retaining gradients.

``a`` is the output of every Conv2d/Linear by default (model-agnostic: for conv -> BN -> ReLU the
non-zero pattern matches the reference's ReLU-output reading), or of named modules.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn

from ..artefacts import ArtefactKey, state_fingerprint
from ..devices import check_model_device
from ..errors import CpqError
from ..fileio import atomic_torch_save
from ..progress import progress as progress_bar
from ..quant.kernels import mean_abs, taylor_active, taylor_max
from ..quant.transform import quantizable_layers
from ..train.evaluate import memory_format_of

SCORERS = ("taylor", "activation", "gradient")
SCORING_CODE = ("classpath/scoring", "quant/kernels")  # cached scores made by other code are recomputed
TARGETS = ("logit", "loss")
AGGREGATES = ("position", "image")
FORMAT = "cpq-class-scores/1"


class ScoringError(CpqError):
    """Bad scoring input: unknown scorer or module, or a class without images."""


@dataclass(frozen=True)
class ScoreSettings:
    """What is scored and how. ``taylor`` gives fractions of images; the others per-class means.

    ``aggregate`` is the order of the two reductions. ``"position"`` (the reference's order, default):
    per class and spatial position, the mean over the class's images, then the max over positions;
    for ``taylor`` that is ``max_p mean_i [t_ip > eps]``. ``"image"``: per image, the max (taylor) or
    mean (activation, gradient) over positions, then the mean over images; for ``taylor`` that is
    ``mean_i max_p [t_ip > eps]``, which is close to 1 for nearly every channel of a trained ResNet
    (some position of every channel is active in almost every image) and so carries little information.
    """

    scorer: str = "taylor"
    target: str = "logit"
    eps: float = 0.0  # the reference's 1e-50 underflows to 0 in float32: "exceeds eps" = "is non-zero"
    modules: tuple[str, ...] | None = None  # None: every Conv2d/Linear output
    aggregate: str = "position"

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise ScoringError(f"unknown scorer {self.scorer!r}; allowed: {', '.join(SCORERS)}")
        if self.aggregate not in AGGREGATES:
            raise ScoringError(f"unknown aggregate {self.aggregate!r}; allowed: {', '.join(AGGREGATES)}")
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
    # the reference's class count per channel, max_p sum_c mean_{x in c} [t > eps] (position aggregate only)
    position_counts: dict[str, torch.Tensor] | None = None

    @property
    def layers(self) -> list[str]:
        return list(self.scores)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_count(self, order: str = "sum_of_maxima") -> dict[str, torch.Tensor]:
        """Per channel, how many classes it matters for (in [0, C]).

        ``"reference"``: the reference's order (``get_neuron_score``), the per-position fractions summed
        over classes, then the max over positions; ``"sum_of_maxima"``: the sum of the class scores
        (each already a max over positions), which is at least as large.
        """
        if order == "sum_of_maxima":
            return {name: score.sum(0) for name, score in self.scores.items()}
        if order != "reference":
            raise ScoringError(f"unknown class-count order {order!r}; allowed: reference, sum_of_maxima")
        if self.position_counts is None:
            raise ScoringError("these scores hold no per-position class counts (they need ScoreSettings(aggregate='position'))")
        return dict(self.position_counts)

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
                           "settings": self.settings, "position_counts": self.position_counts}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClassScores":
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ScoringError(f"class scores {path} are unreadable: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ScoringError(f"{path} is not a class-score file ({FORMAT})")
        counts = payload.get("position_counts")
        return cls(dict(payload["scores"]), list(payload["class_names"]), list(payload["images_per_class"]),
                   list(payload["full_precision"]), dict(payload["settings"]), None if counts is None else dict(counts))


def scored_modules(model: nn.Module, names: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    if names is None:
        return quantizable_layers(model)
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ScoringError(f"unknown module(s) {unknown[:5]}; e.g. {[n for n in modules if n][:6]}")
    return [(n, modules[n]) for n in names]


@contextmanager
def scoring_mode(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Eval mode and frozen parameters while scoring; yields a switch that makes in-place modules
    out-of-place (restored on exit), for models that modify a scored output in place."""
    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    inplace = [(m, m.inplace) for m in model.modules() if isinstance(getattr(m, "inplace", None), bool)]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def out_of_place() -> None:
        for m, _ in inplace:
            m.inplace = False

    try:
        yield out_of_place
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
        return taylor_max(a, g)
    return mean_abs(a if scorer == "activation" else g)


def per_position_values(a: torch.Tensor, g: torch.Tensor | None, scorer: str, eps: float) -> torch.Tensor:
    """(B, positions, C): [|a*g| > eps] as 0/1 (taylor), |a| (activation) or |g| (gradient).

    Channels go last so that a channels_last activation flattens without a copy.
    """
    if scorer == "taylor":
        values = taylor_active(a, g, eps)
    else:
        values = (a if scorer == "activation" else g).abs().to(torch.float64)
    return values.movedim(1, -1).reshape(values.shape[0], -1, values.shape[1])


def _score_batch(model: nn.Module, modules: list[tuple[str, nn.Module]], images: torch.Tensor, labels: torch.Tensor,
                 num_classes: int, settings: ScoreSettings) -> dict[str, torch.Tensor] | None:
    """Per-class sums of the per-image statistic for one batch; None if a scored output was modified in place."""
    needs_grad = settings.scorer != "activation"
    one_hot = F.one_hot(labels, num_classes).to(torch.float64)
    sums: dict[str, torch.Tensor] = {}
    outputs: dict[str, tuple[torch.Tensor, int]] = {}

    def record(name: str, is_linear: bool, a: torch.Tensor, g: torch.Tensor | None) -> None:
        a = _channel_first(a.detach(), is_linear)
        g = None if g is None else _channel_first(g, is_linear)
        if settings.aggregate == "position":
            # (classes, positions, channels) sums: 0/1 counts are exact in float32 (< 2^24 images)
            values = per_position_values(a, g, settings.scorer, settings.eps)
            sums[name] = torch.einsum("bk,bpc->kpc", one_hot.to(values.dtype), values).cpu()
            return
        stat = per_image_statistic(a, g, settings.scorer)
        if settings.scorer == "taylor":
            stat = stat > settings.eps
        # per-class sums as one small matmul (index_add_ on these strided slices is ~100x slower)
        sums[name] = (one_hot.T @ stat.to(torch.float64)).cpu()

    called: set[str] = set()

    def forward_hook(module: nn.Module, output: torch.Tensor, name: str) -> None:
        if not isinstance(output, torch.Tensor):
            raise ScoringError(f"module {name!r} does not return a tensor; score another module")
        if name in called:  # weight sharing: which call's activation is "the channel" is undefined
            raise ScoringError(f"module {name!r} is called more than once per forward pass (shared weights); "
                               f"scores are defined per call: score modules that run once (ScoreSettings(modules=...))")
        called.add(name)
        is_linear = isinstance(module, nn.Linear)
        if not needs_grad:
            record(name, is_linear, output, None)
            return
        outputs[name] = (output, output._version)
        output.register_hook(lambda g, a=output, n=name, lin=is_linear: record(n, lin, a, g))

    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: forward_hook(mod, o, n)) for n, m in modules]
    try:
        with torch.set_grad_enabled(needs_grad):
            # the graph starts at the input (parameters are frozen); autograd.grad below only
            # back-propagates as far as the earliest scored output, never to the image
            logits = model(images.detach().requires_grad_(needs_grad))
            if logits.shape[1] != num_classes:
                raise ScoringError(f"class count mismatch: the model has {logits.shape[1]} outputs, the data {num_classes} classes")
            if any(out._version != version for out, version in outputs.values()):
                return None
            if needs_grad:
                if settings.target == "logit":
                    target = logits.gather(1, labels[:, None]).sum()
                else:
                    target = F.cross_entropy(logits, labels, reduction="sum")
                torch.autograd.grad(target, [out for out, _ in outputs.values()], allow_unused=True)
    finally:
        for handle in hooks:
            handle.remove()
    missing = [n for n, _ in modules if n not in sums]
    if missing:
        raise ScoringError(f"module(s) {missing[:5]} received no gradient from the target; they do not affect the output")
    return sums


def score_classes(model: nn.Module, batches: Iterable, num_classes: int, class_names: Sequence[str] | None = None,
                  settings: ScoreSettings = ScoreSettings(), device: str | torch.device = "cpu",
                  full_precision: Iterable[str] = (), progress: bool = True) -> ClassScores:
    """Score every (class, channel) of the scored modules over ``batches`` of (images, labels).

    The model must already be on ``device`` (functions never move a caller's model).
    """
    check_model_device(model, device, "score_classes")
    modules = scored_modules(model, settings.modules)
    names = [n for n, _ in modules]
    totals: dict[str, torch.Tensor] = {}
    per_class = torch.zeros(num_classes, dtype=torch.long)
    fmt = memory_format_of(model)
    with scoring_mode(model) as out_of_place:
        for images, labels in progress_bar(batches, progress, desc="scoring", leave=False):
            images, labels = images.to(device).contiguous(memory_format=fmt), labels.to(device)
            if int(labels.max()) >= num_classes or int(labels.min()) < 0:
                raise ScoringError(f"label {int(labels.max())} outside 0..{num_classes - 1}: class count mismatch")
            sums = _score_batch(model, modules, images, labels, num_classes, settings)
            if sums is None:  # an in-place op changed a scored output (e.g. conv -> ReLU(inplace)): redo safely
                out_of_place()
                sums = _score_batch(model, modules, images, labels, num_classes, settings)
            for name, value in sums.items():
                totals[name] = totals[name] + value if name in totals else value
            per_class += torch.bincount(labels.cpu(), minlength=num_classes)
    empty = [c for c in range(num_classes) if per_class[c] == 0]
    if empty:
        label = [class_names[c] for c in empty] if class_names else empty
        raise ScoringError(f"class(es) {label} have no images in the scoring data; every class needs at least one")
    counts = None
    if settings.aggregate == "position":  # mean over each class's images per position, then max over positions
        fractions = {n: totals[n].double() / per_class[:, None, None].double() for n in names}
        scores = {n: f.amax(1).float() for n, f in fractions.items()}
        counts = {n: f.sum(0).amax(0).float() for n, f in fractions.items()}  # the reference's class count
    else:
        scores = {n: (totals[n] / per_class[:, None].double()).float() for n in names}
    return ClassScores(scores, list(class_names or [str(c) for c in range(num_classes)]), per_class.tolist(),
                       [n for n in names if n in set(full_precision)], asdict(settings), counts)


def cached_scores(cache_dir: str | os.PathLike, model: nn.Module, data_key: dict[str, Any], compute, settings: ScoreSettings) -> ClassScores:
    """Load scores for (model state, data, settings, precision, code) from ``cache_dir`` or compute and store them."""
    artefact = ArtefactKey.make("class-scores", {"model": state_fingerprint(model), "data": data_key, "settings": settings,
                                                 "dtype": torch.get_default_dtype()}, SCORING_CODE)
    key = artefact.digest
    path = Path(cache_dir) / f"scores-{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock"))):  # parallel runs of a sweep compute them once
        if path.is_file():
            try:
                return ClassScores.load(path)
            except ScoringError:
                pass  # damaged cache entry: recompute and overwrite
        scores = compute()
        scores.settings = {**scores.settings, "cache_key": key, "data": data_key}
        scores.save(path)
        return scores
