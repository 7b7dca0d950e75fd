"""`TrainingStreams`: the streams' samplers built once, and the epoch record a resume starts from."""
import numpy as np
import pytest
from torch.utils.data import Dataset, DistributedSampler

from lpt_lightning.data.training_streams import INSTANCE_SEED_OFFSET, TrainingStreams
from lpt_lightning.errors import ConfigError

LABELS = np.repeat(np.arange(4), [50, 20, 5, 1])  # N = 76


class Steps(Dataset):
    """The sampler's step itself: what the loader hands out is the keys of every stream."""

    def __getitem__(self, step):
        return step


def streams(**kwargs):
    return TrainingStreams(**{"sampling": "dual", "batch_size": 5, "images_per_class": 4, "seed": 2,
                              "draw_keys": False, **kwargs})


def test_instance_stream_is_torchs_permutation_with_the_offset_seed():
    first = next(iter(streams().loader(Steps(), LABELS, 1, 0, "samples")))
    assert set(first) == {"cb", "ib"}
    torchs = list(DistributedSampler(range(76), num_replicas=1, rank=0, shuffle=True, seed=2 + 1_000_003))
    assert INSTANCE_SEED_OFFSET == 1_000_003 and first["ib"] == torchs[:5]


def test_epoch_record_resumes_with_the_next_epoch():
    running = streams()
    assert running.state_dict() == {}  # no loader yet: nothing to record
    loader = running.loader(Steps(), LABELS, 2, 1, "samples")
    assert len(loader) == 38 // 5 == 7  # 76 / 2 ranks, drop_last
    loader.sampler.set_epoch(4)
    epoch4 = list(loader)
    assert running.state_dict() == {"train_epoch": 4}

    resumed = streams()
    resumed.load_state_dict(running.state_dict())
    resumed_steps = list(resumed.loader(Steps(), LABELS, 2, 1, "samples"))
    reference = streams().loader(Steps(), LABELS, 2, 1, "samples")
    reference.sampler.set_epoch(5)
    assert resumed_steps == list(reference) and resumed.state_dict() == {"train_epoch": 5}
    assert resumed_steps != epoch4


def test_bad_sampling_and_batch_size_are_refused():
    with pytest.raises(ConfigError, match="data.sampling must be one of dual, instance, class_aware, square_root"):
        streams(sampling="balanced")
    with pytest.raises(ConfigError, match="data.batch_size=40 exceeds the 38 samples per device"):
        streams(batch_size=40).loader(Steps(), LABELS, 2, 0, "samples")
