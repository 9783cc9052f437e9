"""Data-parallel training: process-group setup, batch-exact sharding and worker spawning.

Normalizer-free models have no batch statistics, so the gradient of a global batch does not
depend on how it is split over processes. :class:`ShardedBatchSampler` makes the *examples* of
every global batch independent of the world size as well: one permutation per epoch (seeded by
``(seed, epoch)``, the same on every rank), global batch ``i`` is ``perm[i·B:(i+1)·B]`` and rank
``r`` of ``W`` takes the ``r``-th of its ``W`` equal slices (split again into ``accum_steps``
micro-batches). DDP averages the per-rank mean gradients, which equals the mean gradient of the
global batch; a 2-process run therefore matches a 1-process run up to float rounding.

Augmentation randomness is per example: the sampler yields ``(seed, index)`` keys whose seed is
a hash of ``(run seed, epoch, index)``, and :class:`SeededDataset` draws the example's
augmentation inside ``torch.random.fork_rng`` from that seed. The draws are independent of
worker count, rank, world size and where a resumed run restarts the epoch.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

__all__ = [
    "DistInfo",
    "SeededDataset",
    "ShardedBatchSampler",
    "all_reduce_sum",
    "cleanup_distributed",
    "example_seed",
    "find_free_port",
    "init_distributed",
    "local_world_size",
    "select_device",
    "shard_indices",
]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def example_seed(*parts: int) -> int:
    """A 63-bit seed hashed from integers (splitmix64 chain), e.g. ``(seed, epoch, index)``."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def local_world_size() -> int:
    """Processes on this machine (``LOCAL_WORLD_SIZE`` from torchrun, else 1)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def select_device(device: str, local_rank: int = 0, what: str = "train.device") -> torch.device:
    """``auto`` (CUDA device ``local_rank`` if available, else CPU), ``cpu``, ``cuda`` (device
    ``local_rank``), ``cuda:N``. Anything else, CUDA on a machine without it, or a process
    whose ``local_rank`` has no CUDA device of its own (more processes per machine than GPUs)
    raises :class:`~normfree.train.config.ConfigError` naming ``what`` (the option that set
    it)."""
    from normfree.train.config import ConfigError

    name = str(device).strip().lower()
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name == "auto" or name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{what}={device!r} but CUDA is not available on this machine; use auto or cpu"
            )
        count = torch.cuda.device_count()
        if name in ("auto", "cuda"):  # one GPU per local process
            if local_rank >= count:
                raise ConfigError(
                    f"{what}={device!r} puts process {local_rank} of this machine on "
                    f"cuda:{local_rank}, but it has {count} CUDA device(s): run at most "
                    f"{count} processes per machine (--nproc, torchrun --nproc-per-node), or "
                    "use cpu"
                )
            return torch.device(f"cuda:{local_rank}")
        index = name.partition(":")[2]
        if not index.isdigit() or int(index) >= count:
            raise ConfigError(
                f"{what}={device!r}: this machine has {count} CUDA device(s) (cuda:0 ...)"
            )
        return torch.device(f"cuda:{int(index)}")
    raise ConfigError(f"{what}={device!r} is not a device normfree runs on; use auto, cpu, cuda "
                      "or cuda:N")  # fmt: skip


def init_distributed(
    backend: str = "auto", device: str = "auto", timeout_s: int = 1800
) -> DistInfo:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); a single process when ``WORLD_SIZE`` is
    unset or 1. ``backend="auto"`` picks NCCL on CUDA and gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = select_device(device, local_rank)
    if world <= 1:
        return DistInfo(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("dist.backend='nccl' needs CUDA devices; use gloo on CPU")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend)


def cleanup_distributed(sync: bool = False) -> None:
    """Leave the process group. ``sync`` (after a run that finished on every rank) first waits
    at a barrier, so that no rank tears gloo down while a peer's last messages are in flight
    (seen as a rare ``SIGABRT`` of one worker at exit); after an error there is no barrier,
    which could wait for a rank that is gone."""
    if dist.is_available() and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op in a single process)."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------- sampling
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch ``epoch`` (identical on every rank)."""
    g = torch.Generator().manual_seed(example_seed(seed, epoch, 0x5EED))
    return torch.randperm(num_examples, generator=g)


class ShardedBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's micro-batches of every global batch of an epoch (see module docstring).

    Args:
        num_examples: dataset size.
        global_batch: examples per optimizer step over all ranks and micro-batches.
        rank / world_size: this process and the number of processes.
        accum_steps: micro-batches per optimizer step on each rank.
        seed / epoch: the shuffle (``shuffle=False``: dataset order).
        start_step: first global batch to yield (resuming mid-epoch).
        max_steps: at most this many global batches per epoch (``None``: ``N // B``).

    Yields lists of ``(example_seed, index)`` keys for :class:`SeededDataset`; the last
    incomplete global batch is dropped.
    """

    def __init__(
        self,
        num_examples: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
        seed: int = 0,
        epoch: int = 0,
        start_step: int = 0,
        shuffle: bool = True,
        max_steps: int | None = None,
    ) -> None:
        if global_batch % (world_size * accum_steps):
            raise ValueError(
                f"train.batch_size={global_batch} must be divisible by world_size × accum_steps "
                f"= {world_size} × {accum_steps}"
            )
        if num_examples < global_batch:
            raise ValueError(
                f"train.batch_size={global_batch} is larger than the training set "
                f"({num_examples} examples)"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_examples, self.global_batch = num_examples, global_batch
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        steps = num_examples // global_batch
        self.steps_per_epoch = min(steps, max_steps) if max_steps else steps
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        self.start_step = start_step

    @property
    def micro_batch(self) -> int:
        return self.global_batch // (self.world_size * self.accum_steps)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            order = epoch_permutation(self.num_examples, self.seed, self.epoch).tolist()
        else:
            order = list(range(self.num_examples))
        per_rank = self.global_batch // self.world_size
        m = self.micro_batch
        for step in range(self.start_step, self.steps_per_epoch):
            begin = step * self.global_batch + self.rank * per_rank
            local = order[begin : begin + per_rank]
            for a in range(self.accum_steps):
                idx = local[a * m : (a + 1) * m]
                yield [(example_seed(self.seed, self.epoch, i), i) for i in idx]


def shard_indices(num_examples: int, rank: int, world_size: int) -> list[int]:
    """Evaluation shard of a rank: ``rank, rank + W, …`` (no padding, no duplicates)."""
    return list(range(rank, num_examples, world_size))


class SeededDataset(Dataset):
    """Wrap a dataset so that ``ds[(seed, index)]`` draws the example's random augmentation
    from ``seed`` (torch, Python and NumPy generators, restored afterwards); a plain integer
    index reads the example with the current global RNG."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | Sequence[int]) -> Any:
        if isinstance(key, int):
            return self.dataset[key]
        seed, index = key
        py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002  (the global legacy RNG is what we save)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed is slow
            random.seed(seed)
            np.random.seed(seed % (1 << 32))  # noqa: NPY002  (the global legacy RNG is what we save)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)  # noqa: NPY002  (the global legacy RNG is what we save)
