"""Training on many processes with ``torchrun``: the process group as training sees it.

cncad uses PyTorch's own machinery: ``torchrun`` starts the processes and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``;
[`from_environment`][cncad.distributed.ProcessGroup.from_environment] joins (or, when the
script has not, creates) the default process group, NCCL on CUDA and gloo on the CPU;
the trainable part of the model is wrapped in ``DistributedDataParallel`` by
[`Trainer`][cncad.training.Trainer]. One process without
``torchrun`` is the same code with a group of one, where every collective is the identity.

Examples:
    ```bash
    torchrun --nproc_per_node 4 -m cncad fit mvtec_ad --out mvtec.cnc --checkpoint-dir runs
    torchrun --nproc_per_node 4 my_script.py   # which calls CNCDetector(...).fit(data)
    ```
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ProcessGroup", "is_main_process", "local_device"]


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the training processes.

    Attributes:
        rank: Global rank, 0 for the process that writes files and shows progress.
        world_size: Number of processes (1 without ``torchrun``).
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> ProcessGroup:
        """The running process group, initialised from ``torchrun``'s variables if needed.

        Args:
            device: The model's device: NCCL serves CUDA, gloo the CPU.

        Returns:
            The group; ``ProcessGroup()`` (one process) outside ``torchrun``.
        """
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        atexit.register(_destroy)
        return cls(dist.get_rank(), dist.get_world_size())

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over all processes (a new tensor; no gradient)."""
        total = tensor.detach().clone()
        if self.is_distributed:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def sum_with_local_gradient(self, local: Tensor) -> Tensor:
        """The sum of ``local`` over all processes, differentiable in this process's term.

        The value is the global sum; the gradient flows to ``local`` as if the other
        processes' terms were constants. Summing every process's gradient (what
        ``DistributedDataParallel`` does, up to its division by the world size) then gives
        the gradient of a function of the global sum.
        """
        if not self.is_distributed:
            return local
        others = self.sum(local) - local.detach()
        return local + others


def is_main_process() -> bool:
    """Whether this process writes files: rank 0 of a running group, or ``RANK`` 0 or unset."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def local_device(name: str) -> torch.device:
    """The device that ``"auto"`` or ``"cuda"`` means in this process.

    Under ``torchrun`` with CUDA each process takes the GPU of its ``LOCAL_RANK``;
    otherwise ``"auto"`` is CUDA when available, else the CPU.

    Args:
        name: ``config.device``.

    Returns:
        The device.

    Raises:
        ValueError: ``name`` is not a device torch knows.
        RuntimeError: CUDA is asked for but not available.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or another device type torch "
            f"knows (such as 'mps' or 'xpu'), got {name!r}"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available")
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
