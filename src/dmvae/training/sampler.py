"""Epoch-based, resumable, rank-sharded sampling for ``torch.utils.data.DataLoader``.

:class:`ResumableDistributedSampler` is a ``DistributedSampler`` (``set_epoch``, a fresh shuffle per
epoch, without replacement, disjoint per-rank shards) that can start in the middle of an epoch, and
that yields ``(index, sample_seed)`` keys so that the random augmentation of every sample depends on
(seed, epoch, position) only -- not on the worker, the rank, the number of processes or a resume.

Sample placement: the epoch's permutation is cut into global batches of ``G = world_size * b``
positions; rank r holds positions r, r + W, r + 2W, ... (``DistributedSampler``'s interleaving). So
global batch k is the same set of samples for any ``world_size`` with the same ``G``, epochs have
``len(dataset) // G`` steps, and :func:`dmvae.dist.local_rows` slices any per-step
draw over the global batch to this rank's samples.

:class:`TrainLoader` is the endless step iterator the examples use: it wraps a ``DataLoader``
(workers, ``pin_memory``, ``persistent_workers``, ``prefetch_factor``) over this sampler, counts the
batches handed to the loop, moves to the next epoch when one ends, and saves / restores that position
with ``state_dict()`` / ``load_state_dict()`` (store it in the training checkpoint), so a resumed run
sees exactly the remaining batches of an uninterrupted one. The state carries a digest of the data
(:func:`dmvae.training.data.data_identity`: the file names and sizes of an image dataset, the
tokenizer and file list of a latent cache, or ``data_id=``); a resume over other data, or where
nothing identifies the data, is refused (``check_state_dict`` runs before anything changes).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dmvae.dist import get_rank, get_world_size
from dmvae.training.data import data_identity

__all__ = ["ResumableDistributedSampler", "TrainLoader", "sample_seed"]


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the sample at ``position`` of epoch ``epoch`` (63-bit, reproducible)."""
    return (int(seed) * 6_364_136_223_846_793_005 + int(epoch) * 1_442_695_040_888_963_407
            + int(position) * 2_862_933_555_777_941_757) % (2**63)


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` with a start position and per-sample augmentation seeds.

    Args:
        dataset: a map-style dataset (only its length is used).
        num_replicas, rank: default: the current process group (1 / 0 without one).
        shuffle: a new permutation per epoch (``set_epoch``), seeded by ``seed + epoch``.
        seed: shared by all ranks.
        drop_last: always true here: the tail that does not fill every rank equally is dropped, so
            every rank has the same number of samples.
        yield_seeds: yield ``(index, sample_seed)`` keys (the datasets of
            :mod:`dmvae.training.data` accept both forms); False yields plain indices.

    ``set_start(global_position)`` skips the first positions of the current epoch (a multiple of
    ``num_replicas``); it applies to the next ``iter()`` only.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None, *,
                 shuffle: bool = True, seed: int = 0, yield_seeds: bool = True) -> None:
        num_replicas = get_world_size() if num_replicas is None else num_replicas
        rank = get_rank() if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        if self.num_samples == 0:
            raise ValueError(f"the dataset has {len(dataset)} samples, fewer than the {num_replicas} processes")
        self.yield_seeds = yield_seeds
        self.start = 0

    def set_start(self, global_position: int) -> None:
        if global_position % self.num_replicas or not 0 <= global_position <= self.total_size:
            raise ValueError(f"start position {global_position} must be a multiple of the {self.num_replicas} "
                             f"processes within [0, {self.total_size}]")
        self.start = global_position

    def __iter__(self) -> Iterator[Any]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)[: self.total_size]
        else:
            order = torch.arange(self.total_size)
        positions = range(self.start + self.rank, self.total_size, self.num_replicas)
        self.start = 0  # a resume applies to one pass only
        for p in positions:
            i = int(order[p])
            yield (i, sample_seed(self.seed, self.epoch, p)) if self.yield_seeds else i

    def __len__(self) -> int:
        return (self.total_size - self.start) // self.num_replicas


class TrainLoader:
    """Endless batches of a map-style dataset, by epochs, resumable mid-epoch.

    Args:
        dataset: map-style dataset accepting ``(index, sample_seed)`` keys.
        batch_size: per process (the global batch is ``batch_size * world_size``).
        seed: shuffling and augmentation seed.
        num_workers, pin_memory, persistent_workers, prefetch_factor: as ``DataLoader``
            (``pin_memory`` default: on with CUDA; ``persistent_workers`` on when there are workers).
        num_replicas, rank: default: the current process group.
        data_id: what identifies the data, for datasets that expose no ``data_identity()`` (any
            string that changes when the samples change); default: the dataset's own identity.

    Attributes ``epoch`` and ``batch_in_epoch`` count the batches handed out;
    ``steps_per_epoch = len(dataset) // (batch_size * world_size)``.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_workers: int = 0, pin_memory: bool | None = None, persistent_workers: bool | None = None,
                 prefetch_factor: int | None = None, num_replicas: int | None = None, rank: int | None = None,
                 collate_fn: Any = None, data_id: str | None = None) -> None:
        self._data_id = data_id
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = ResumableDistributedSampler(dataset, num_replicas, rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.steps_per_epoch = self.sampler.num_samples // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(dataset)} samples do not fill one global batch of {batch_size} x {self.sampler.num_replicas} "
                "processes; lower --batch-size or add data"
            )
        kw: dict[str, Any] = {}
        if num_workers > 0:
            kw["persistent_workers"] = True if persistent_workers is None else persistent_workers
            if prefetch_factor is not None:
                kw["prefetch_factor"] = prefetch_factor
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                                 drop_last=True, collate_fn=collate_fn, **kw)
        self.epoch = 0
        self.batch_in_epoch = 0
        self._it: Iterator[Any] | None = None

    @property
    def dataset(self) -> Dataset:
        return self.sampler.dataset

    @property
    def num_classes(self) -> int:
        return int(getattr(self.dataset, "num_classes", 1))

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.sampler.num_replicas

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Any:
        if self._it is None or self.batch_in_epoch >= self.steps_per_epoch:
            if self._it is not None:  # epoch finished
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._it = self._start_epoch()
        batch = next(self._it)
        self.batch_in_epoch += 1
        return batch

    def _start_epoch(self) -> Iterator[Any]:
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(self.batch_in_epoch * self.global_batch_size)
        return iter(self.loader)

    def data_digest(self) -> str | None:
        """What identifies the data (``data_id``, else the dataset's identity), or None."""
        return self._data_id if self._data_id is not None else data_identity(self.sampler.dataset)

    def state_dict(self) -> dict[str, Any]:
        """Position of the next batch: epoch, batches done in it, and what must match on resume."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "global_batch_size": self.global_batch_size, "dataset_size": len(self.sampler.dataset),
                "seed": self.sampler.seed, "data_digest": self.data_digest()}

    def check_state_dict(self, state: Any) -> None:
        """Raise ``ValueError`` unless ``state`` can be resumed here; changes nothing."""
        if not isinstance(state, dict):
            raise ValueError(f"a loader state must be a dict, got {type(state).__name__}")  # noqa: TRY004 - bad data
        missing = [k for k in ("epoch", "batch_in_epoch", "global_batch_size", "dataset_size", "seed")
                   if k not in state]
        if missing:
            raise ValueError(f"the loader state has no {missing} (not a TrainLoader state)")
        for key, have in (("global_batch_size", self.global_batch_size),
                          ("dataset_size", len(self.sampler.dataset)), ("seed", self.sampler.seed)):
            if int(state[key]) != have:
                raise ValueError(f"cannot resume the data order: the checkpoint has {key}={state[key]}, this run "
                                 f"{have} (keep --batch-size x processes, the data set and --seed)")
        saved, now = state.get("data_digest"), self.data_digest()
        if saved is None or now is None:
            what = "the checkpoint's loader state" if saved is None else "this run's dataset"
            raise ValueError(f"cannot resume the data order: nothing identifies the data of {what} (pass "
                             "TrainLoader(..., data_id=...) for a dataset without data_identity(), or start the "
                             "order afresh with skip_to(step))")
        if saved != now:
            raise ValueError(f"cannot resume the data order: the data set changed since the checkpoint (data "
                             f"digest {str(saved)[:12]} saved, {now[:12]} now: other files, sizes or labels); "
                             "resume with the same data, or start the order afresh with skip_to(step)")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s position (any number of processes with the same global batch and
        the same data; see :meth:`check_state_dict`)."""
        self.check_state_dict(state)
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self._it = None
        if self.batch_in_epoch >= self.steps_per_epoch:  # saved right at an epoch's end
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def skip_to(self, step: int) -> None:
        """Position at global step ``step`` from the start (for runs without a saved state)."""
        self.epoch, self.batch_in_epoch = divmod(int(step), self.steps_per_epoch)
        self._it = None
