"""Dataset sources: parse annotation files / folders / IDX files into `DatasetSplits`, one module
per format. Configs name a source by ``class_path: lpt_lightning.data.<Source>``."""
from lpt_lightning.data.sources.annotation_list import (
    AnnotationListSource,
    parse_class_names,
)
from lpt_lightning.data.sources.base import (
    IMAGE_EXTENSIONS,
    DatasetSplits,
    DataSource,
    Split,
    read_lines,
)
from lpt_lightning.data.sources.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEFAULT_DIR,
    FashionMNISTSource,
    read_idx,
)
from lpt_lightning.data.sources.image_folder import (
    ImageFolderSource,
    extract_archive_to,
)
from lpt_lightning.data.sources.inat_json import INatJsonSource

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_DIR",
    "IMAGE_EXTENSIONS",
    "AnnotationListSource",
    "DataSource",
    "DatasetSplits",
    "FashionMNISTSource",
    "INatJsonSource",
    "ImageFolderSource",
    "Split",
    "extract_archive_to",
    "parse_class_names",
    "read_idx",
    "read_lines",
]
