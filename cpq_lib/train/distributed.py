"""Training on several processes started by torchrun: ranks, one writer, gradients averaged by DDP.

``python -m torch.distributed.run --nproc-per-node N -m cpq_lib.train ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; :func:`init_from_environment` joins the group
(NCCL on CUDA, gloo on the CPU). Every rank steps through the same global batches, each taking its piece
(the loaders' ``shard``), so N ranks with a global batch B train as one process with batch B: the same
images, crops and flips, the gradient of the same mean loss (BatchNorm aside: each rank normalises with
its own piece's statistics unless ``train.sync_bn`` makes them global, which torch supports on GPUs only).
Rank 0 alone writes checkpoints, logs and records; the others wait at a barrier and read them.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..errors import TrainingError


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """Whether this process writes shared files (checkpoints, logs, records): rank 0, or a lone process."""
    return world()[0] == 0


def init_from_environment(device: str | torch.device = "cpu") -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (nothing to do for one process).

    Returns (rank, world size). On CUDA each rank takes the GPU of its ``LOCAL_RANK``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise TrainingError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=timedelta(minutes=30))
    return world()


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def leave() -> None:
    """Leave the process group together: every rank waits for the others, then destroys the group.
    A process that exits without ``destroy_process_group`` can abort (SIGABRT) in interpreter shutdown
    while gloo's worker threads still hold tensors of its last collectives (pytorch/pytorch#179291;
    seen once on a rank that had only broadcast a finished run's record)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def agree(value):
    """Rank 0's ``value`` on every rank: decisions every rank must take alike (is a cached file usable?)."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)  # pickled between this job's own ranks, never from a file
    return box[0]


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) ``tensor`` over the ranks in place; nothing for one process."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def local_device(device: str | torch.device) -> torch.device:
    """``device`` as this rank uses it (``cuda`` -> ``cuda:<LOCAL_RANK>`` under torchrun)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and world()[1] > 1:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def to_sync_batchnorm(model: nn.Module, device: str | torch.device) -> nn.Module:
    """BatchNorm layers replaced by SyncBatchNorm (statistics over the global batch); GPUs only."""
    if torch.device(device).type != "cuda":
        raise TrainingError("train.sync_bn needs CUDA: torch's SyncBatchNorm runs on GPUs only; leave it off on the CPU")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def from_sync_batchnorm_(model: nn.Module) -> nn.Module:
    """SyncBatchNorm layers back to BatchNorm2d with the same state (a trained model runs anywhere)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.SyncBatchNorm):
            plain = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            plain.load_state_dict(child.state_dict())
            plain.to(next(iter(child.state_dict().values())).device).train(child.training)
            setattr(model, name, plain)
        else:
            from_sync_batchnorm_(child)
    return model


def data_parallel(model: nn.Module, device: str | torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel (gradients averaged over the ranks in backward)."""
    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
