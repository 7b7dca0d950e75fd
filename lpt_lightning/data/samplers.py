"""Rank-aware samplers (SPEC section 4).

Every sampler subclasses `DistributedSampler` so that Lightning neither wraps it in its own
distributed sampler nor forgets to call ``set_epoch``. Training samplers build the GLOBAL index
sequence from a private generator seeded with ``seed + epoch`` -- identical on every rank, and
independent of the global RNG state -- pad it by repeating its head to a multiple of
``num_replicas`` and yield the rank's strided shard ``seq[rank::num_replicas]``.

With ``draw_keys=True`` they yield `Draw` keys instead of plain indices: the index plus a seed for
that draw's augmentation, derived from (seed, epoch, position in the global sequence). An image
drawn twice is then augmented twice differently, and every draw's view is the same whatever the
number of ranks or workers and wherever a resumed epoch restarts.

``DistributedSampler.__init__`` is deliberately not called: it needs an initialised process
group, and ranks are passed in explicitly (the DataModule reads them from the Trainer).

`StreamBatchSampler` combines the streams of one training run (class-balanced "cb" and
instance-balanced "ib" for dual sampling) into one sampler whose elements are whole training
steps, so that one DataLoader (one worker pool, one prefetch queue) serves every stream. It is
stateful (epoch and steps done), for torchdata's ``StatefulDataLoader`` to resume exactly.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from lpt_lightning.errors import ConfigError


class Draw(NamedTuple):
    """One draw of a training sampler: the dataset index and the seed of its augmentation."""

    index: int
    seed: int


def _check_replicas(num_replicas: int, rank: int) -> None:
    if num_replicas < 1:
        raise ConfigError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ConfigError(f"rank must be in [0, {num_replicas}), got {rank}")


def _as_label_tensor(labels: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
    if labels.numel() == 0:
        raise ConfigError("sampler needs at least one labelled sample")
    if labels.min() < 0:
        raise ConfigError(f"labels must be >= 0, found {int(labels.min())}")
    return labels


class _GlobalSequenceSampler(DistributedSampler):
    """Shared machinery: seeded global sequence -> padded -> strided rank shard."""

    def __init__(self, global_num_samples: int, seed: int, num_replicas: int, rank: int, draw_keys: bool) -> None:
        _check_replicas(num_replicas, rank)
        if global_num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {global_num_samples}")
        self.dataset = None
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = int(seed)
        self.epoch = 0
        self.shuffle = True
        self.drop_last = False
        self.global_num_samples = int(global_num_samples)
        # DistributedSampler semantics: num_samples is the PER-RANK count.
        self.num_samples = math.ceil(self.global_num_samples / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.draw_keys = draw_keys

    def _build(self, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def global_sequence(self) -> torch.Tensor:
        """The padded global sequence of this epoch (the same on every rank)."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        seq = self._build(generator)
        assert seq.numel() == self.global_num_samples
        pad = self.total_size - seq.numel()
        if pad:
            seq = torch.cat([seq, seq.repeat(math.ceil(pad / seq.numel()))[:pad]])
        return seq

    def shard(self, start: int = 0) -> list[int] | list[Draw]:
        """This rank's items of the current epoch from rank-local position ``start`` on."""
        shard = self.global_sequence()[self.rank :: self.num_replicas][start:].tolist()
        if not self.draw_keys:
            return shard
        # Seeds follow the GLOBAL position, which does not depend on the rank count.
        positions = range(self.rank + start * self.num_replicas, self.total_size, self.num_replicas)
        # SeedSequence mixes (seed, epoch) into one well-spread 64-bit base (it takes no negative words).
        base = int(np.random.SeedSequence([self.seed % 2**64, self.epoch]).generate_state(1, np.uint64)[0])
        return [Draw(index, (base + position) % 2**64) for index, position in zip(shard, positions)]

    def __iter__(self) -> Iterator[int] | Iterator[Draw]:
        return iter(self.shard())

    def __len__(self) -> int:
        return self.num_samples


class InstanceSampler(_GlobalSequenceSampler):
    """Instance-balanced: a fresh permutation of all N samples each epoch.

    Its indices are exactly those of torch's ``DistributedSampler(shuffle=True, seed=seed)`` (same
    permutation, padding and stride; tests/test_samplers.py checks it). Kept because that one yields
    bare indices: no `Draw` keys, i.e. no per-draw augmentation seed that follows the global position.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        draw_keys: bool = False,
    ) -> None:
        self.labels = _as_label_tensor(labels)
        super().__init__(self.labels.numel(), seed, num_replicas, rank, draw_keys)

    def _build(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(self.labels.numel(), generator=generator)


class ClassAwareSampler(_GlobalSequenceSampler):
    """Class-balanced sampling as in the decoupling / LPT reference code.

    Classes are visited round-robin over a class order that is reshuffled after each full
    pass; each visit takes ``images_per_class`` images from that class's own shuffled list,
    which cycles (and is reshuffled) when exhausted. ``num_samples`` defaults to N, so an
    epoch lasts about one pass over the data, like the instance-balanced stream.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        images_per_class: int = 4,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        draw_keys: bool = False,
    ) -> None:
        if images_per_class < 1:
            raise ConfigError(f"images_per_class must be >= 1, got {images_per_class}")
        self.labels = _as_label_tensor(labels)
        self.images_per_class = images_per_class
        order = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels)
        # Classes absent from the data (count 0) are never visited.
        self.members = [chunk.tolist() for chunk in torch.split(order, counts.tolist()) if chunk.numel()]
        global_num_samples = self.labels.numel() if num_samples is None else num_samples
        super().__init__(global_num_samples, seed, num_replicas, rank, draw_keys)

    def _build(self, generator: torch.Generator) -> torch.Tensor:
        n, k, num_cls = self.global_num_samples, self.images_per_class, len(self.members)
        pools: list[list[int] | None] = [None] * num_cls  # lazily shuffled per-class lists
        ptr = [0] * num_cls
        out: list[int] = []
        visit_order: list[int] = []
        pos = 0
        while len(out) < n:
            if pos == len(visit_order):
                visit_order = torch.randperm(num_cls, generator=generator).tolist()
                pos = 0
            c = visit_order[pos]
            pos += 1
            members = self.members[c]
            for _ in range(min(k, n - len(out))):
                if pools[c] is None or ptr[c] == len(members):
                    pools[c] = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
                    ptr[c] = 0
                out.append(pools[c][ptr[c]])
                ptr[c] += 1
        return torch.tensor(out, dtype=torch.int64)


class PowerSampler(_GlobalSequenceSampler):
    """With replacement: class c drawn with probability ∝ n_c**power, then a uniform member.

    power=0 is class-balanced, 1 instance-balanced, 0.5 square-root sampling.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        power: float = 0.5,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        draw_keys: bool = False,
    ) -> None:
        self.labels = _as_label_tensor(labels)
        self.power = float(power)
        counts = torch.bincount(self.labels).to(torch.float64)
        present = counts > 0
        weights = torch.where(present, counts.clamp(min=1) ** self.power, torch.zeros_like(counts))  # 0**0 is 1
        self.class_probs = weights / weights.sum()
        self.order = torch.argsort(self.labels, stable=True)
        self.counts = counts.to(torch.int64)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        global_num_samples = self.labels.numel() if num_samples is None else num_samples
        super().__init__(global_num_samples, seed, num_replicas, rank, draw_keys)

    def _build(self, generator: torch.Generator) -> torch.Tensor:
        n = self.global_num_samples
        cls = torch.multinomial(self.class_probs, n, replacement=True, generator=generator)
        offset = (torch.rand(n, generator=generator, dtype=torch.float64) * self.counts[cls]).long()
        offset = torch.minimum(offset, self.counts[cls] - 1)  # guard the u -> 1.0 rounding edge
        return self.order[self.starts[cls] + offset]


class ShardedEvalSampler(DistributedSampler):
    """Evaluation shard ``range(rank, N, num_replicas)``: NO padding, so under DDP every sample of
    a split is evaluated exactly once (ranks may differ in length by one sample).

    It exists for exactness. Given a plain val/test loader, Lightning inserts torch's
    ``DistributedSampler(shuffle=False)``, which pads every rank to ``ceil(N / world)`` samples by
    repeating the first ones (5 images on 2 ranks: ``[0, 2, 4]`` and ``[1, 3, 0]``): image 0 would
    count twice in the accuracies, and twice in the phase-3 expert outputs, whose cache files
    store rank r's rows as exactly ``range(r, N, W)``. Being a ``DistributedSampler`` itself,
    Lightning keeps it as given. Lightning's ``UnrepeatedDistributedSampler`` (the predict loop's)
    has the same shards but asserts that every rank gets at least one sample, which a split
    smaller than the world size (a one-image prediction list on two GPUs) breaks;
    tests/test_samplers.py checks both."""

    def __init__(self, num_items: int, num_replicas: int = 1, rank: int = 0) -> None:
        _check_replicas(num_replicas, rank)
        self.dataset = None
        self.num_items = int(num_items)
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.seed = 0
        self.shuffle = False
        self.drop_last = False
        self.num_samples = len(range(rank, self.num_items, num_replicas))
        self.total_size = self.num_items

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_items, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class StreamBatchSampler(DistributedSampler):
    """One element per training step: ``{stream: [batch_size keys]}``, the next batch of every stream.

    Each stream keeps its own sampler (global sequence, rank shard, `Draw` keys); an epoch has as
    many steps as the shortest stream has full batches (drop_last). A DataLoader over it
    (``batch_size=None``) builds a step's batches of all streams in one worker. It is a
    `DistributedSampler` so that Lightning neither replaces it under DDP nor forgets ``set_epoch``
    (a DataLoader given ``batch_sampler=`` would have it rebuilt around a replaced sampler).

    Stateful: ``state_dict()`` is the epoch and the steps handed out; after ``load_state_dict`` the
    next iteration resumes there, and a state taken at the end of an epoch resumes at the start of
    the next one. The epoch is part of the state because on resume Lightning creates the first
    iterator (whose workers prefetch) before it calls ``set_epoch``.
    """

    def __init__(self, streams: Mapping[str, _GlobalSequenceSampler], batch_size: int) -> None:
        if not streams:
            raise ConfigError("StreamBatchSampler needs at least one stream")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        ranks = {(s.num_replicas, s.rank) for s in streams.values()}
        if len(ranks) != 1:
            raise ConfigError(f"the streams are sharded differently: {sorted(ranks)}")
        self.streams = dict(streams)
        self.batch_size = batch_size
        self.dataset = None
        (self.num_replicas, self.rank), = ranks
        self.epoch = 0
        self.seed = 0
        self.shuffle = True
        self.drop_last = True
        self.num_samples = min(len(s) for s in self.streams.values()) // batch_size  # steps per epoch
        self.total_size = self.num_samples * self.num_replicas
        self.steps_done = 0  # steps the current iteration has handed out
        self._resume_step = 0  # where the next iteration starts (set by load_state_dict)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "steps_done": self.steps_done}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        epoch, done = int(state["epoch"]), int(state["steps_done"])
        if done >= self.num_samples:  # the saved epoch had ended: resume at the start of the next one
            epoch, done = epoch + 1, 0
        self.epoch, self._resume_step = epoch, done

    def __iter__(self) -> Iterator[dict[str, list]]:
        start, self._resume_step = self._resume_step, 0
        self.steps_done = start
        return self._steps(start)

    def _steps(self, start: int) -> Iterator[dict[str, list]]:
        size = self.batch_size
        keys = {}
        for name, stream in self.streams.items():
            stream.set_epoch(self.epoch)
            keys[name] = stream.shard(start * size)
        for step in range(start, self.num_samples):
            self.steps_done = step + 1  # before the yield: the loader records the state on receipt
            offset = (step - start) * size
            yield {name: k[offset:offset + size] for name, k in keys.items()}

    def __len__(self) -> int:
        return self.num_samples
