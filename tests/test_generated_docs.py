"""The generated pages equal what `python -m benchmarks.report --render` renders from the stored
results, so a figure in the docs always has its JSON beside it and no page is edited by hand."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.parametrize("page", ["docs/benchmarks.md", "docs/results.md", "README.md"])
def test_page_is_its_rendering(page):
    from benchmarks import report

    assert (REPO / page).read_text() == report.pages()[page]()


def test_model_card_is_its_rendering():
    import pretrain_standins as standins

    card = REPO / "weights" / "standins"
    assert (card / "MODEL_CARD.md").read_text() == standins.model_card(json.loads((card / "standins.json").read_text()))
