"""Everything that touches ``torch.distributed``: process-group setup and the feature gather for losses.

Launch several processes with ``torchrun`` (``torchrun --nproc_per_node N -m ehrclip_kit.cli pretrain ...``);
:func:`init_distributed` reads the environment torchrun sets. With one process nothing here ever calls
``torch.distributed``, so the same code runs in a notebook. :func:`epoch_batches` is the deterministic
sharding of an epoch across ranks that the Trainer uses.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and shows progress bars (rank 0)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str | None = None, device: str | torch.device | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables (or with WORLD_SIZE=1) returns a single-process :class:`DistInfo` and does not
    initialise anything. The backend is NCCL when CUDA is available, else gloo (CPU). Each process uses
    ``cuda:LOCAL_RANK`` when CUDA is available. ``device`` overrides the device choice (e.g. "cpu" to test
    the gloo path on a GPU machine).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size <= 1:
        return DistInfo(rank=0, world_size=1, local_rank=local_rank, device=dev, backend=None)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def cleanup() -> None:
    """Leave the process group (no-op when none was initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True when not distributed, or on rank 0."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def gather_features(
    a: torch.Tensor,
    b: torch.Tensor,
    rank: int,
    world_size: int,
    gather_with_grad: bool = True,
    local_loss: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather both towers' features from every process, concatenated in rank order.

    * ``world_size == 1``: returns ``(a, b)`` untouched; ``torch.distributed`` is never called.
    * ``gather_with_grad=True`` (recommended): ``torch.distributed.nn.functional.all_gather``, whose backward
      sums the gradients of every rank's loss into each rank's local rows. With DDP's gradient *averaging*
      on top, parameter gradients then equal those of one process on the concatenated batch.
    * ``gather_with_grad=False``: a plain all_gather (no autograd), with this rank's own tensors put back in
      place so that gradients still flow to the local rows; other ranks' rows act as constant negatives.
      Cheaper, but gradients are not those of the concatenated batch.

    ``local_loss`` is accepted for open_clip parity; the local rows are put back in either case. Every rank
    must pass the same batch size (the Trainer's sharding guarantees it).
    """
    del local_loss  # The gather itself does not depend on it; the loss uses it to pick rows and labels.
    if world_size == 1:
        return a, b
    if gather_with_grad:
        import torch.distributed.nn.functional as dist_fn

        all_a = torch.cat(dist_fn.all_gather(a), dim=0)
        all_b = torch.cat(dist_fn.all_gather(b), dim=0)
        return all_a, all_b
    gathered_a = [torch.zeros_like(a) for _ in range(world_size)]
    gathered_b = [torch.zeros_like(b) for _ in range(world_size)]
    dist.all_gather(gathered_a, a.contiguous())
    dist.all_gather(gathered_b, b.contiguous())
    # all_gather output has no autograd history; the local slot gets the live tensor back.
    gathered_a[rank] = a
    gathered_b[rank] = b
    return torch.cat(gathered_a, dim=0), torch.cat(gathered_b, dim=0)


def all_reduce_mean(value: torch.Tensor, world_size: int) -> torch.Tensor:
    """Mean of ``value`` over processes (a copy; identity when ``world_size == 1``). For logging."""
    if world_size == 1:
        return value.detach().clone()
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size


def broadcast_object(obj, info: DistInfo):
    """Send a picklable object from rank 0 to every rank (identity when single-process)."""
    if info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    """Collect a picklable object from every rank (``[obj]`` when single-process)."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op when single-process)."""
    if info.world_size > 1:
        dist.barrier()


def epoch_batches(
    n: int,
    batch_size: int,
    epoch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
    shuffle: bool = True,
) -> list[list[int]]:
    """This rank's batches (lists of dataset indices) for one epoch, from ``(seed, epoch)`` alone.

    Global batch k is ``perm[k·W·B : (k+1)·W·B]`` and rank r takes its r-th slice of B, so the ranks'
    batches concatenated in rank order are exactly the batches of one process with batch W·B. Without
    ``drop_last`` the last partial global batch is padded by wrap-around so every rank gets the same size.

    >>> epoch_batches(5, 2, epoch=0, seed=0, shuffle=False, drop_last=False)
    [[0, 1], [2, 3], [4]]
    """
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    g = batch_size * world_size
    full = n // g
    batches = [order[k * g + rank * batch_size : k * g + (rank + 1) * batch_size] for k in range(full)]
    rest = order[full * g :]
    if len(rest) and not drop_last:
        per = math.ceil(len(rest) / world_size)
        padded = np.concatenate([rest, np.resize(order, per * world_size - len(rest))])
        batches.append(padded[rank * per : (rank + 1) * per])
    return [b.tolist() for b in batches]
