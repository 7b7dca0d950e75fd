"""Accuracy at the taxonomy levels of iNaturalist-style categories, its off switch, the metrics.json
entries and the per-class plot grouped by supercategory."""
import json
from pathlib import Path

import pytest
import torch

from lpt_lightning.data import INatJsonSource
from lpt_lightning.errors import DataFormatError
from lpt_lightning.metrics import EvalMetrics
from lpt_lightning.reports import plot_per_class_accuracy, write_metrics
from lpt_lightning.taxonomy import (
    TAXONOMY_LEVELS,
    Taxonomy,
    TaxonomyEvalMetrics,
    eval_metrics,
    supercategory_groups,
    taxonomy_values,
)
from datasets_available import needs_fmnist

# Six species; class 3's genus shares its name with class 1's ("Pica") in another family: a
# different genus, since an ancestor is its whole path from the kingdom down.
PATHS = [
    ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus"),
    ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica"),
    ("Animalia", "Chordata", "Aves", "Passeriformes", "Paridae", "Parus"),
    ("Animalia", "Chordata", "Mammalia", "Carnivora", "Felidae", "Pica"),
    ("Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae", "Danaus"),
    ("Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Rosaceae", "Rosa"),
]
SUPER = ["Aves", "Aves", "Aves", "Mammalia", "Insecta", "Plantae"]
# Category ids are not the class indices: sorted ids 3, 8, 11, 20, 31, 40 -> classes 0..5.
IDS = [3, 8, 11, 20, 31, 40]
RECORDS = [{"id": cid, "name": f"species {c}", "supercategory": SUPER[c], **dict(zip(TAXONOMY_LEVELS, PATHS[c]))}
           for c, cid in enumerate(IDS)]
TRAIN_COUNTS = [200, 150, 50, 30, 5, 3]  # lpt groups: many 0-1, medium 2-3, few 4-5
# (true, predicted) of eight test images, and the deepest level at which each prediction is right.
PAIRS = [(0, 0), (0, 1), (1, 2), (2, 3), (3, 1), (4, 5), (5, 5), (3, 4)]
# deepest shared level: genus, family, order, phylum, phylum (not genus: homonym), none, genus, kingdom


def taxonomy() -> Taxonomy:
    return Taxonomy.from_categories({r["id"]: r for r in RECORDS}, IDS, Path("categories.json"))


def evaluate(metric: EvalMetrics) -> dict:
    target = torch.tensor([t for t, _ in PAIRS])
    probs = torch.softmax(5.0 * torch.nn.functional.one_hot(torch.tensor([p for _, p in PAIRS]), 6).float(), dim=1)
    metric.update(probs[:5], target[:5])  # two batches: the counts add up
    metric.update(probs[5:], target[5:])
    return metric.compute()


def test_level_accuracies_overall_and_per_group_by_hand():
    result = taxonomy_values(evaluate(TaxonomyEvalMetrics(TRAIN_COUNTS, taxonomy())))
    # Right at each level (of 8): kingdom 7, phylum 6, class 4, order 4, family 3, genus 2.
    assert result["taxonomy"] == pytest.approx(
        {"kingdom": 87.5, "phylum": 75.0, "class": 50.0, "order": 50.0, "family": 37.5, "genus": 25.0})
    # many: pairs 1-3; medium: pairs 4, 5, 8; few: pairs 6, 7.
    assert result["taxonomy_many"] == pytest.approx(
        {"kingdom": 100.0, "phylum": 100.0, "class": 100.0, "order": 100.0, "family": 200 / 3, "genus": 100 / 3})
    assert result["taxonomy_medium"] == pytest.approx(
        {"kingdom": 100.0, "phylum": 200 / 3, "class": 0.0, "order": 0.0, "family": 0.0, "genus": 0.0})
    assert result["taxonomy_few"] == pytest.approx({level: 50.0 for level in TAXONOMY_LEVELS})


def test_the_other_metrics_are_unchanged_by_the_taxonomy():
    plain, with_levels = evaluate(EvalMetrics(TRAIN_COUNTS)), evaluate(TaxonomyEvalMetrics(TRAIN_COUNTS, taxonomy()))
    assert float(with_levels["acc"]) == 25.0
    for key, value in plain.items():
        assert torch.allclose(torch.as_tensor(value), torch.as_tensor(with_levels[key]), rtol=0, atol=0,
                              equal_nan=True), key


def test_level_map_identifies_ancestors_by_their_path():
    level_map = taxonomy().level_map()
    assert level_map.shape == (6, 6)
    assert level_map[-1, 1] != level_map[-1, 3]  # the two "Pica" are different genera
    assert level_map[4, 0] == level_map[4, 1] != level_map[4, 2]  # Corvidae, Corvidae, Paridae


def _inat(root: Path, categories: list[dict]) -> INatJsonSource:
    images = [{"id": i, "file_name": f"t/{i}.jpg"} for i in range(6)]
    annotations = [{"id": i, "image_id": i, "category_id": cid} for i, cid in enumerate(IDS)]
    train = {"images": images, "annotations": annotations, "categories": [{"id": cid, "name": str(cid)} for cid in IDS]}
    root.mkdir(exist_ok=True)
    (root / "train2018.json").write_text(json.dumps(train))
    (root / "categories.json").write_text(json.dumps(categories))
    return INatJsonSource(root=str(root), test_json=None, names_json="categories.json")


def test_inat_source_reads_the_taxonomy_or_leaves_it_off(tmp_path):
    splits = _inat(tmp_path / "full", list(reversed(RECORDS))).load()
    assert splits.taxonomy == taxonomy()
    assert splits.taxonomy.levels == TAXONOMY_LEVELS and splits.taxonomy.supercategories == tuple(SUPER)
    assert splits.taxonomy.ancestors[2] == tuple(p[2] for p in PATHS)
    # Names and supercategories only (no level): no taxonomy, the plain metric.
    bare = _inat(tmp_path / "bare", [{"id": r["id"], "name": r["name"], "supercategory": r["supercategory"]}
                                     for r in RECORDS]).load()
    assert bare.taxonomy is None
    assert type(eval_metrics(TRAIN_COUNTS, "lpt", bare.taxonomy)) is EvalMetrics
    assert type(eval_metrics(TRAIN_COUNTS, "lpt", splits.taxonomy)) is TaxonomyEvalMetrics
    partial = [dict(r) for r in RECORDS]
    del partial[2]["genus"]
    with pytest.raises(DataFormatError, match=r"categories.json: category 11 has no 'genus' while others have one"):
        _inat(tmp_path / "partial", partial).load()


def test_metrics_json_and_the_plot_grouped_by_supercategory(tmp_path):
    result = evaluate(TaxonomyEvalMetrics(TRAIN_COUNTS, taxonomy()))
    row = {"acc": float(result["acc"]), "per_class": result["per_class"]} | taxonomy_values(result)
    write_metrics(tmp_path / "metrics.json", {"test": row}, torch.tensor(TRAIN_COUNTS), None, "lpt")
    written = json.loads((tmp_path / "metrics.json").read_text())["results"]["test"]
    assert written["taxonomy"] == {"kingdom": 87.5, "phylum": 75.0, "class": 50.0, "order": 50.0, "family": 37.5,
                                   "genus": 25.0}
    assert written["taxonomy_many"]["family"] == 66.6667
    assert supercategory_groups(SUPER) == {"Aves": [0, 1, 2], "Mammalia": [3], "Insecta": [4], "Plantae": [5]}
    path = tmp_path / "per_class.png"
    plot_per_class_accuracy(path, {"test": row, "val": row}, torch.tensor(TRAIN_COUNTS), "by supercategory", SUPER)
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.ddp
def test_ddp_two_process_sync_equals_one_process(tmp_path):
    import os
    import sys

    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.dirname(__file__))
    import ddp_taxonomy_worker

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (37,), generator=g)
    probs = torch.softmax(3 * torch.randn(37, 6, generator=g), dim=1)
    single = TaxonomyEvalMetrics(TRAIN_COUNTS, taxonomy())
    single.update(probs, target)
    expected = taxonomy_values(single.compute())
    mp.spawn(ddp_taxonomy_worker.run, args=(2, f"file://{tmp_path / 'rendezvous'}", TRAIN_COUNTS, taxonomy(), probs,
                                            target, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) == expected  # integer sums: exactly equal


@needs_fmnist
def test_a_phase_on_data_with_a_taxonomy_reports_its_levels(tmp_path):
    from dataclasses import replace

    import lightning as L

    from lpt_lightning.data import FashionMNISTSource, LongTailDataModule
    from lpt_lightning.data_facts import connect
    from lpt_lightning.models.expert import ExpertSpec
    from lpt_lightning.phases import AdaptPhase, MoEScorerPhase
    from lpt_lightning.reports import SplitReport
    from tiny_models import tiny_backbone

    torch.manual_seed(0)
    source = FashionMNISTSource(imbalance_ratio=10, max_per_class=60, val_per_class=10, max_test_per_class=10)
    dm = LongTailDataModule(source, batch_size=16, num_workers=0, seed=0)
    # Ten classes: one kingdom, families of two classes, a genus per class.
    records = {c: {"kingdom": "K", "family": f"F{c // 2}", "genus": f"G{c}", "supercategory": f"S{c % 3}"}
               for c in range(10)}
    dm.protocol._splits = replace(dm.splits, taxonomy=Taxonomy.from_categories(records, list(range(10)), Path("cats.json")))
    phase = AdaptPhase(expert=ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=3),
                       num_classes=10, class_names=dm.class_names)
    connect(phase, dm)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[SplitReport()])
    trainer.test(phase, datamodule=dm, verbose=False)
    phase.eval()
    with torch.no_grad():
        batches = [(phase.probabilities(b["image"]).argmax(1), b["label"]) for b in dm.test_dataloader()]
    pred, true = torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches])
    levels = phase.results["test"]["taxonomy"]
    assert levels["kingdom"] == 100.0
    assert levels["family"] == pytest.approx(100 * float((pred // 2 == true // 2).double().mean()), abs=1e-4)
    assert levels["genus"] == pytest.approx(phase.results["test"]["acc"], abs=1e-4)
    assert float(trainer.callback_metrics["test/taxonomy/family"]) == pytest.approx(levels["family"])
    assert {"test/taxonomy_few/genus", "test/taxonomy_many/kingdom"} <= set(trainer.callback_metrics)
    assert (tmp_path / "per_class_accuracy_test.png").read_bytes()[:4] == b"\x89PNG"
    # Phase 3 (no DataFacts: its counts come with the cached outputs) gets the taxonomy alone.
    # (Its experts are built in __init__ from phase-2 files; only the wiring is checked here.)
    scorer = MoEScorerPhase.__new__(MoEScorerPhase)
    torch.nn.Module.__init__(scorer)
    scorer.taxonomy = None
    connect(scorer, dm)
    assert scorer.taxonomy is dm.taxonomy and scorer.taxonomy.levels == ("kingdom", "family", "genus")


def test_the_console_shows_the_levels_read_back_from_metrics_json(tmp_path):
    from lpt_lightning.reports import read_metrics, split_table

    result = evaluate(TaxonomyEvalMetrics(TRAIN_COUNTS, taxonomy()))
    row = {k: float(result[k]) for k in ("acc", "acc_many", "acc_medium", "acc_few")} | taxonomy_values(result)
    write_metrics(tmp_path / "metrics.json", {"test": row | {"per_class": result["per_class"]}},
                  torch.tensor(TRAIN_COUNTS), None, "lpt")
    lines = split_table(read_metrics(tmp_path / "metrics.json")).splitlines()
    start = lines.index("Accuracy at each taxonomy level (%; per group in metrics.json)")
    assert lines[start + 1].split() == list(TAXONOMY_LEVELS)
    assert lines[start + 3].split() == ["test", "87.50", "75.00", "50.00", "50.00", "37.50", "25.00"]


def test_a_prepared_copy_keeps_the_taxonomy(tmp_path):
    """`lpt prepare` writes the taxonomy into the manifest; the prepared source gives it back."""
    from PIL import Image

    from lpt_lightning.data import PreparedSource
    from lpt_lightning.prepare import prepare

    source = _inat(tmp_path / "full", RECORDS)
    (tmp_path / "full" / "t").mkdir()
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 0, 0)).save(tmp_path / "full" / "t" / f"{i}.jpg")
    prepare(source, tmp_path / "prepared", short_side=32, workers=1, part_size=5, progress=False)
    assert PreparedSource(str(tmp_path / "prepared")).load().taxonomy == taxonomy()
