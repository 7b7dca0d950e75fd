"""Data layer: dataset sources, long-tail subsampling, rank-aware samplers, the training streams and the DataModule."""
from lpt_lightning.data.datamodule import LongTailDataModule
from lpt_lightning.data.datasets import (
    LongTailImageDataset,
    StreamBatches,
    UndecodedImages,
    collate_images,
    collate_skipping,
)
from lpt_lightning.data.device_decode import decode_on_device
from lpt_lightning.data.image_checks import verify_images
from lpt_lightning.data.long_tail import (
    balanced_holdout,
    cap_per_class,
    holdout_slices,
    target_slices,
    class_order,
    long_tail_counts,
    make_long_tailed,
)
from lpt_lightning.data.prepared import PreparedSource
from lpt_lightning.data.samplers import (
    ClassAwareSampler,
    InstanceSampler,
    PowerSampler,
    ShardedEvalSampler,
    StreamBatchSampler,
)
from lpt_lightning.data.sources import (
    FASHION_MNIST_CLASSES,
    AnnotationListSource,
    DatasetSplits,
    DataSource,
    FashionMNISTSource,
    ImageFolderSource,
    INatJsonSource,
    Split,
    read_idx,
)
from lpt_lightning.data.training_streams import TrainingStreams
from lpt_lightning.data.transforms import (
    TestTimeSpec,
    build_eval_transform,
    build_train_transform,
    eval_resize_size,
)

__all__ = [
    "AnnotationListSource",
    "ClassAwareSampler",
    "DataSource",
    "DatasetSplits",
    "FASHION_MNIST_CLASSES",
    "FashionMNISTSource",
    "INatJsonSource",
    "ImageFolderSource",
    "InstanceSampler",
    "LongTailDataModule",
    "LongTailImageDataset",
    "PowerSampler",
    "PreparedSource",
    "ShardedEvalSampler",
    "Split",
    "StreamBatchSampler",
    "StreamBatches",
    "TestTimeSpec",
    "TrainingStreams",
    "UndecodedImages",
    "balanced_holdout",
    "build_eval_transform",
    "build_train_transform",
    "cap_per_class",
    "collate_images",
    "collate_skipping",
    "decode_on_device",
    "eval_resize_size",
    "holdout_slices",
    "target_slices",
    "class_order",
    "long_tail_counts",
    "make_long_tailed",
    "read_idx",
    "verify_images",
]
