"""Data-parallel training under torchrun, Horovod or neither, behind one small interface.

    dist = distributed.setup()           # reads the launcher's environment variables
    model = dist.wrap_model(model)       # parameters from rank 0; gradients averaged
    optimizer = dist.wrap_optimizer(optimizer, model)
    loader = DataLoader(data, sampler=dist.sampler(data, shuffle=True, seed=0))
    loss_sum, count = dist.allreduce_sum([loss_sum, count])
    if dist.is_main: ...                 # log metrics, write outputs
    dist.shutdown()

Horovod sets HOROVOD_RANK and HOROVOD_SIZE (mpirun, which Azure ML uses for Horovod, sets
OMPI_COMM_WORLD_RANK); torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR; with neither the script runs as the one and only rank, exactly as before. The
torch.distributed backend is nccl when CUDA is there and gloo otherwise; on a GPU machine each
local rank uses GPU LOCAL_RANK of the ones it can see. Standard library and torch only:
horovod is imported when Horovod launched the script.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Sampler


class SingleProcess:
    """No launcher: rank 0 of 1, and every operation is the identity."""

    launcher = "none"
    rank, size, local_rank = 0, 1, 0

    @property
    def is_main(self) -> bool:
        """Whether this rank logs metrics and writes outputs (rank 0)."""
        return self.rank == 0

    def device(self) -> torch.device:
        """The device this rank trains on: its own GPU when there are any, else the CPU."""
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The model to train: parameters as rank 0 has them, gradients averaged over ranks."""
        return model

    def wrap_optimizer(
        self, optimizer: torch.optim.Optimizer, model: nn.Module
    ) -> torch.optim.Optimizer:
        """The optimizer to step (Horovod averages gradients here, DDP in the model)."""
        return optimizer

    def sampler(self, dataset: Dataset, shuffle: bool, seed: int) -> Sampler | None:
        """This rank's share of `dataset` (None: the whole of it, in the loader's order).

        Call `set_epoch(epoch)` on it every epoch, so that each epoch shuffles differently.
        """
        return None

    def allreduce_sum(self, values: list[float]) -> list[float]:
        """The sums of `values` over all ranks; every rank gets the same result."""
        return list(values)

    def allreduce_mean(self, values: list[float]) -> list[float]:
        """The means of `values` over all ranks."""
        return [value / self.size for value in self.allreduce_sum(values)]

    def barrier(self) -> None:
        """Wait until every rank gets here."""

    def shutdown(self) -> None:
        """Leave the process group (before the script exits)."""


class Torchrun(SingleProcess):
    """Launched by torchrun: torch.distributed with DDP."""

    launcher = "torchrun"

    def __init__(self) -> None:
        self.rank = int(os.environ["RANK"])
        self.size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        torch.distributed.init_process_group(backend)  # rendezvous from MASTER_ADDR/PORT

    def wrap_model(self, model: nn.Module) -> nn.Module:
        # DDP broadcasts rank 0's parameters and buffers on construction and averages the
        # gradients during backward().
        on_gpu = next(model.parameters()).is_cuda
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.local_rank] if on_gpu else None
        )

    def sampler(self, dataset: Dataset, shuffle: bool, seed: int) -> Sampler | None:
        return DistributedSampler(
            dataset, num_replicas=self.size, rank=self.rank, shuffle=shuffle, seed=seed
        )

    def allreduce_sum(self, values: list[float]) -> list[float]:
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        torch.distributed.barrier()

    def shutdown(self) -> None:
        # Every rank done with its collectives before the group goes: a Gloo worker thread
        # still holding work at interpreter exit aborts the process (SIGABRT, seen in CI).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class Horovod(SingleProcess):
    """Launched by horovodrun: Horovod's DistributedOptimizer and broadcasts."""

    launcher = "horovod"

    def __init__(self) -> None:
        import horovod.torch as hvd  # only here: the other launchers do not need horovod

        self.hvd = hvd
        hvd.init()
        self.rank, self.size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return model

    def wrap_optimizer(
        self, optimizer: torch.optim.Optimizer, model: nn.Module
    ) -> torch.optim.Optimizer:
        optimizer = self.hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters()
        )
        self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        return optimizer

    def sampler(self, dataset: Dataset, shuffle: bool, seed: int) -> Sampler | None:
        return DistributedSampler(
            dataset, num_replicas=self.size, rank=self.rank, shuffle=shuffle, seed=seed
        )

    def allreduce_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name="allreduce_sum").tolist()

    def barrier(self) -> None:
        self.hvd.barrier()

    def shutdown(self) -> None:
        self.hvd.shutdown()


def setup() -> SingleProcess:
    """The launcher this process runs under, from its environment variables, initialized."""
    if "HOROVOD_RANK" in os.environ and "HOROVOD_SIZE" in os.environ:
        return Horovod()
    if "OMPI_COMM_WORLD_RANK" in os.environ:  # mpirun, as Azure ML's MpiConfiguration starts it
        return Horovod()
    if all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        return Torchrun()
    return SingleProcess()
