"""Where the tests find real data, and the markers of tests that need it.

Locally a test whose dataset is missing is skipped. Under CI (``CI=true``, set by `.ci/run` and
by GitHub) a missing Fashion-MNIST must fail the run instead (see conftest.py): the data-driven
tests are the ones that show the model learns, so a CI run without them proves nothing.
"""
import os
from pathlib import Path

import pytest

from lpt_lightning.data.sources import FASHION_MNIST_DEFAULT_DIR

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
FMNIST = Path(os.environ.get("LPT_FASHION_MNIST_DIR") or FASHION_MNIST_DEFAULT_DIR)
# The project's shared data folder sits beside the repository (also in CI's clean clone).
CIFAR_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"


def fmnist_present() -> bool:
    return any((FMNIST / f"train-labels-idx1-ubyte{ext}").is_file() for ext in ("", ".gz"))


needs_fmnist = pytest.mark.skipif(not fmnist_present() and not IN_CI,
                                  reason="Fashion-MNIST IDX files not installed (Debian package dataset-fashion-mnist)")
