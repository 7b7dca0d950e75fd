"""Shared test setup: never touch the network, keep CPU runs small and deterministic."""
import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Text embeddings of class names are cached (lpt_lightning.models.text_cache): never in the home folder.
if "LPT_CACHE_DIR" not in os.environ:
    os.environ["LPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="lpt-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LPT_CACHE_DIR"], True)


def pytest_configure(config):
    from datasets_available import FMNIST, IN_CI, fmnist_present

    if IN_CI and not fmnist_present():
        raise pytest.UsageError(
            f"CI=true but the Fashion-MNIST IDX files are not in {FMNIST}: install the Debian package "
            "dataset-fashion-mnist (or set LPT_FASHION_MNIST_DIR). CI never skips the data tests.")


def pytest_collection_modifyitems(items):
    # The end-to-end runs take minutes each on a loaded 2-core machine: beyond the default timeout.
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(1800))
