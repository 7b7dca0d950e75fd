"""Dataset sources (moved from data/sources.py; split into one module per format next)."""
from lpt_lightning.data.sources.base import (  # noqa: F401
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEFAULT_DIR,
    IMAGE_EXTENSIONS,
    AnnotationListSource,
    DatasetSplits,
    DataSource,
    FashionMNISTSource,
    ImageFolderSource,
    INatJsonSource,
    Split,
    _parse_class_names,
    _read_lines,
    read_idx,
)
