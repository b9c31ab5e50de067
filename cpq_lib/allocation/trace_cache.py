"""Hessian traces estimated once per model, images and estimator settings, shared by a sweep's runs.

``hawq`` and ``hawq_channel`` at one seed estimate the same traces (766 s of Hessian-vector products
for ResNet-20 on 512 CIFAR-10 images on one thread, most of either run's search); the runs of a sweep
share ``<shared folder>/cache`` as they share class scores. An entry is keyed
(:class:`~cpq_lib.artefacts.ArtefactKey`) by the float model's state, the images and labels
themselves, the estimator's settings and the code that computes it, so traces made with anything
else are recomputed, never returned. Parallel runs wait on a file lock and compute an entry once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from filelock import FileLock
from torch import nn

from ..artefacts import ArtefactKey, load_artefact, save_artefact, state_fingerprint
from .hessian import TraceEstimate

TRACE_CODE = ("allocation/hessian", "allocation/hawq", "allocation/trace_cache")
KINDS = ("model", "per-class")  # the mean loss over all images; one estimate per class, each on its own images


def images_fingerprint(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> str:
    """Hash of the images and labels (values, shapes, dtypes, order): the data the traces are taken on."""
    digest = hashlib.sha256()
    for images, labels in batches:
        for tensor in (images, labels):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


def trace_key(kind: str, model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
              settings: dict[str, Any]) -> ArtefactKey:
    if kind not in KINDS:
        raise ValueError(f"trace cache kind must be one of {KINDS}, got {kind!r}")
    device = batches[0][0].device.type if batches else "cpu"
    return ArtefactKey.make(f"hessian-traces-{kind}", {"model": state_fingerprint(model), "images": images_fingerprint(batches),
                                                       "device": device, "dtype": torch.get_default_dtype(), **settings},
                            TRACE_CODE)


def _to_payload(estimate: TraceEstimate) -> dict[str, Any]:
    return {"per_layer": dict(estimate.per_layer), "per_channel": {k: v.cpu() for k, v in estimate.per_channel.items()},
            "probes": estimate.probes, "hessian_vector_products": estimate.hessian_vector_products,
            "seconds": estimate.seconds, "converged": estimate.converged}


def _from_payload(payload: dict[str, Any]) -> TraceEstimate:
    return TraceEstimate({k: float(v) for k, v in payload["per_layer"].items()}, dict(payload["per_channel"]),
                         int(payload["probes"]), int(payload["hessian_vector_products"]), float(payload["seconds"]),
                         bool(payload["converged"]), from_cache=True)


def cached_traces(cache_dir: str | os.PathLike | None, kind: str, model: nn.Module,
                  batches: Sequence[tuple[torch.Tensor, torch.Tensor]], settings: dict[str, Any],
                  compute: Callable[[], Any]) -> Any:
    """``compute()`` (a TraceEstimate, or a dict of them by class), read from ``cache_dir`` when an
    entry with an equal key is there; without a folder, computed every time."""
    if cache_dir is None:
        return compute()
    key = trace_key(kind, model, batches, settings)
    path = Path(cache_dir) / f"traces-{key.digest}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock"))):
        stored = load_artefact(path, key)
        if stored is not None:
            if kind == "model":
                return _from_payload(stored)
            return {int(c): _from_payload(p) for c, p in stored.items()}
        result = compute()
        payload = _to_payload(result) if kind == "model" else {str(c): _to_payload(e) for c, e in result.items()}
        save_artefact(payload, path, key)
        return result
