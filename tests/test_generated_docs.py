"""The generated pages equal what their scripts render from the stored results, so a figure in the
docs always has its JSON beside it and no page is edited by hand."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def test_benchmarks_page_is_its_rendering():
    from benchmarks import report

    assert (REPO / "docs" / "benchmarks.md").read_text() == report.render(REPO / "benchmarks" / "results")


def test_results_page_is_its_rendering():
    import json

    import accuracy_study as study

    payloads = [json.loads(p.read_text()) for p in study.result_files()]
    diagnoses = [json.loads(p.read_text()) for p in study.diagnosis_files()]
    assert (REPO / "docs" / "results.md").read_text() == study.render(payloads, diagnoses)


def test_model_card_is_its_rendering():
    import json

    import pretrain_standins as standins

    card = REPO / "weights" / "standins"
    assert (card / "MODEL_CARD.md").read_text() == standins.model_card(json.loads((card / "standins.json").read_text()))
