"""Rank-aware samplers: statistics, determinism, DDP sharding."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from lpt_lightning.data.samplers import (
    ClassAwareSampler,
    Draw,
    InstanceSampler,
    PowerSampler,
    ShardedEvalSampler,
    StreamBatchSampler,
)
from lpt_lightning.errors import ConfigError

LABELS = np.repeat(np.arange(4), [50, 20, 5, 1])  # N = 76, a long tail


def _shards(make, num_replicas, epoch=0):
    out = []
    for rank in range(num_replicas):
        s = make(num_replicas, rank)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def test_all_are_distributed_samplers():
    for s in (InstanceSampler(LABELS), ClassAwareSampler(LABELS), PowerSampler(LABELS), ShardedEvalSampler(5)):
        assert isinstance(s, DistributedSampler)  # Lightning then neither wraps nor replaces them


def test_instance_sampler_permutation_and_determinism():
    s = InstanceSampler(LABELS, seed=3)
    first = list(s)
    assert sorted(first) == list(range(76)) and len(s) == 76
    assert list(InstanceSampler(LABELS, seed=3)) == first  # same seed + epoch
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == list(range(76))
    s.set_epoch(0)
    assert list(s) == first
    assert list(InstanceSampler(LABELS, seed=4)) != first


def test_sequence_ignores_global_rng():
    torch.manual_seed(0)
    a = list(ClassAwareSampler(LABELS, seed=1))
    torch.manual_seed(123)
    torch.rand(10)
    assert list(ClassAwareSampler(LABELS, seed=1)) == a


def test_class_aware_chunks_and_balance():
    k = 4
    s = ClassAwareSampler(LABELS, images_per_class=k, seed=0)
    seq = list(s)
    assert len(seq) == len(s) == 76  # num_samples defaults to N
    chunks = [seq[i:i + k] for i in range(0, 76, k)]
    assert all(len({LABELS[j] for j in chunk}) == 1 for chunk in chunks)
    visits = [LABELS[c[0]] for c in chunks]
    # 19 visits = 4 full passes over the 4 classes (reshuffled each pass) + 3 distinct classes
    for p in range(4):
        assert sorted(visits[4 * p:4 * p + 4]) == [0, 1, 2, 3]
    assert len(set(visits[16:])) == 3
    counts = Counter(LABELS[seq].tolist())
    assert sorted(counts.values()) == [16, 20, 20, 20]
    # per-class lists cycle: a class is exhausted before any member repeats
    by_class = {c: [i for i in seq if LABELS[i] == c] for c in range(4)}
    assert len(set(by_class[0])) == len(by_class[0])  # 50 members, <= 20 draws: all distinct
    if counts[2] == 20:  # 5 members drawn 20 times: every member exactly 4 times
        assert Counter(by_class[2]).most_common()[-1][1] == 4 and len(set(by_class[2])) == 5
    assert set(by_class[3]) == {75}


def test_class_aware_num_samples_and_absent_class():
    labels = np.array([0, 0, 0, 2, 2])  # class 1 absent: never visited
    s = ClassAwareSampler(labels, images_per_class=2, num_samples=9, seed=1)
    seq = list(s)
    assert len(seq) == 9
    assert set(labels[seq].tolist()) == {0, 2}
    assert all(labels[seq[i]] == labels[seq[i + 1]] for i in range(0, 8, 2))


def test_class_aware_epochs_differ_and_repeat():
    s = ClassAwareSampler(LABELS, seed=2)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1
    s.set_epoch(0)
    assert list(s) == e0


@pytest.mark.parametrize("power, expected", [(0.0, [1 / 3] * 3), (1.0, [400 / 525, 100 / 525, 25 / 525]),
                                             (0.5, [4 / 7, 2 / 7, 1 / 7])])
def test_power_sampler_frequencies(power, expected):
    labels = np.repeat(np.arange(3), [400, 100, 25])
    s = PowerSampler(labels, power=power, num_samples=30000, seed=0)
    seq = np.array(list(s))
    freq = np.bincount(labels[seq], minlength=3) / seq.size
    assert np.allclose(freq, expected, atol=0.012)
    # uniform within a class: each of the 25 tail members is drawn about equally often
    tail = np.bincount(seq[labels[seq] == 2] - 500, minlength=25)
    assert tail.min() > 0 and tail.max() < 2.2 * tail.mean()


def test_power_sampler_zero_count_class_never_drawn():
    labels = np.array([0] * 10 + [2] * 30)
    seq = list(PowerSampler(labels, power=0.0, num_samples=4000, seed=1))
    freq = np.bincount(labels[seq], minlength=3) / 4000
    assert freq[1] == 0 and abs(freq[0] - 0.5) < 0.03
    assert len(PowerSampler(labels)) == 40


@pytest.mark.parametrize("make", [
    lambda r, k: InstanceSampler(LABELS, seed=5, num_replicas=r, rank=k),
    lambda r, k: ClassAwareSampler(LABELS, seed=5, num_replicas=r, rank=k),
    lambda r, k: PowerSampler(LABELS, seed=5, num_replicas=r, rank=k),
])
@pytest.mark.parametrize("num_replicas", [1, 3, 8])
def test_rank_shards_cover_global_sequence(make, num_replicas):
    shards = _shards(make, num_replicas, epoch=2)
    reference = make(1, 0)
    reference.set_epoch(2)
    global_seq = reference.global_sequence().tolist()
    assert global_seq == list(reference)
    per_rank = -(-76 // num_replicas)
    assert all(len(s) == per_rank for s in shards)
    assert all(len(make(num_replicas, r)) == per_rank for r in range(num_replicas))
    # interleaving the shards gives the global sequence, padded by repeating its head
    interleaved = [shards[i % num_replicas][i // num_replicas] for i in range(per_rank * num_replicas)]
    pad = per_rank * num_replicas - 76
    assert interleaved == global_seq + global_seq[:pad]


def test_eval_sampler_no_padding_disjoint_union():
    shards = [list(ShardedEvalSampler(10, num_replicas=3, rank=r)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(ShardedEvalSampler(10, 3, r)) for r in range(3)] == [4, 3, 3]
    assert sorted(sum(shards, [])) == list(range(10))
    assert list(ShardedEvalSampler(2, num_replicas=3, rank=2)) == []
    s = ShardedEvalSampler(4)
    s.set_epoch(5)
    assert list(s) == [0, 1, 2, 3]


def test_invalid_arguments():
    with pytest.raises(ConfigError, match="rank must be in"):
        InstanceSampler(LABELS, num_replicas=2, rank=2)
    with pytest.raises(ConfigError, match="num_replicas"):
        ShardedEvalSampler(3, num_replicas=0)
    with pytest.raises(ConfigError, match="images_per_class"):
        ClassAwareSampler(LABELS, images_per_class=0)
    with pytest.raises(ConfigError, match="at least one"):
        InstanceSampler([])


@pytest.mark.ddp
def test_two_process_gloo_shards_match_global(tmp_path):
    import torch.multiprocessing as mp

    import ddp_sampler_worker

    out = tmp_path / "result.json"
    mp.spawn(ddp_sampler_worker.run, args=(2, str(tmp_path / "init"), str(out), 3), nprocs=2, join=True)
    result = json.loads(out.read_text())
    shards, global_seq, labels = result["shards"], result["global"], np.array(result["labels"])
    assert len(shards[0]) == len(shards[1]) == 11  # N = 22 -> 11 per rank, no padding needed
    assert [shards[i % 2][i // 2] for i in range(22)] == global_seq
    assert all(labels[global_seq[i]] == labels[global_seq[i + 1]] for i in range(0, 22, 2))


@pytest.mark.parametrize("num_replicas", [1, 3])
def test_instance_sampler_indices_are_torch_distributed_samplers(num_replicas):
    """The library sampler gives the same indices; ours is kept for its Draw keys (per-draw seeds)."""
    for rank in range(num_replicas):
        for epoch in (0, 4):
            ours = InstanceSampler(LABELS, seed=9, num_replicas=num_replicas, rank=rank, draw_keys=True)
            torchs = DistributedSampler(range(76), num_replicas=num_replicas, rank=rank, shuffle=True, seed=9)
            ours.set_epoch(epoch), torchs.set_epoch(epoch)
            draws, indices = list(ours), list(torchs)
            assert [d.index for d in draws] == indices
            assert all(isinstance(d, Draw) for d in draws) and not any(isinstance(i, Draw) for i in indices)


def test_eval_sampler_shards_as_lightning_unrepeated_sampler_but_allows_empty_ranks():
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    for n, replicas in ((10, 3), (7, 2), (4, 4)):
        for rank in range(replicas):
            library = UnrepeatedDistributedSampler(range(n), num_replicas=replicas, rank=rank, shuffle=False)
            ours = ShardedEvalSampler(n, num_replicas=replicas, rank=rank)
            assert list(ours) == list(library) and len(ours) == len(library)
    # one image to predict on two ranks: ours gives rank 1 nothing, the library one refuses
    assert list(ShardedEvalSampler(1, num_replicas=2, rank=1)) == []
    with pytest.raises(AssertionError):
        UnrepeatedDistributedSampler(range(1), num_replicas=2, rank=1, shuffle=False)


def _streams(num_replicas=1, rank=0):
    common = {"num_replicas": num_replicas, "rank": rank, "draw_keys": True}
    return {"cb": ClassAwareSampler(LABELS, seed=2, **common), "ib": InstanceSampler(LABELS, seed=3, **common)}


def test_stream_batch_sampler_steps_are_the_streams_batches():
    sampler = StreamBatchSampler(_streams(num_replicas=2, rank=1), batch_size=5)
    assert len(sampler) == 38 // 5 == 7  # 76 / 2 ranks = 38 per rank, drop_last
    assert isinstance(sampler, DistributedSampler) and (sampler.num_replicas, sampler.rank) == (2, 1)
    sampler.set_epoch(3)
    steps = list(sampler)
    for name, stream in _streams(num_replicas=2, rank=1).items():
        stream.set_epoch(3)
        draws = list(stream)
        assert [step[name] for step in steps] == [draws[5 * k:5 * k + 5] for k in range(7)]
    with pytest.raises(ConfigError, match="sharded differently"):
        StreamBatchSampler({"cb": ClassAwareSampler(LABELS), "ib": InstanceSampler(LABELS, num_replicas=2)}, 4)


def test_stream_batch_sampler_state_resumes_mid_epoch_and_after_an_epoch():
    sampler = StreamBatchSampler(_streams(), batch_size=8)
    sampler.set_epoch(2)
    steps = iter(sampler)
    first = [next(steps) for _ in range(3)]
    assert sampler.state_dict() == {"epoch": 2, "steps_done": 3}
    rest = list(steps)
    assert sampler.state_dict() == {"epoch": 2, "steps_done": 9}

    resumed = StreamBatchSampler(_streams(), batch_size=8)  # a fresh process: epoch 0 until restored
    resumed.load_state_dict({"epoch": 2, "steps_done": 3})
    assert list(resumed) == rest and resumed.epoch == 2
    assert list(resumed) == first + rest  # the resume position is used once

    after = StreamBatchSampler(_streams(), batch_size=8)
    after.load_state_dict({"epoch": 2, "steps_done": 9})  # the end of epoch 2: epoch 3 from its start
    sampler.set_epoch(3)
    assert after.epoch == 3 and list(after) == list(sampler)
