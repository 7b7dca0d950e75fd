"""Data flows one way: phases get what they need from the data explicitly (`DataFacts`, loaders
fed by callbacks) and never reach into the DataModule; the DataModule never reads the model."""
import ast
from pathlib import Path

import pytest
import torch

from lpt_lightning.data_facts import DataFacts, connect
from lpt_lightning.errors import ConfigError
from lpt_lightning.models.expert import ExpertSpec
from lpt_lightning.phases import AdaptPhase
from tiny_models import tiny_backbone

PACKAGE = Path(__file__).resolve().parents[1] / "lpt_lightning"
DATAMODULE_NAMES = {"dm", "datamodule"}


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _last_name(node: ast.AST) -> str:
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""


def phase_violations(source: str) -> list[str]:
    """A phase reading ``<trainer>.datamodule``, assigning attributes on a DataModule or touching
    its private attributes."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "datamodule":
            found.append(f"line {node.lineno}: reads .datamodule")
        elif isinstance(node, ast.Attribute) and _root_name(node.value) in DATAMODULE_NAMES:
            if node.attr.startswith("_"):
                found.append(f"line {node.lineno}: private DataModule attribute {node.attr}")
            elif isinstance(node.ctx, ast.Store):
                found.append(f"line {node.lineno}: assigns DataModule attribute {node.attr}")
    return found


def data_violations(source: str) -> list[str]:
    """The data package reading the model: ``trainer.lightning_module`` or ``trainer.model``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        if node.attr == "lightning_module":
            found.append(f"line {node.lineno}: reads .lightning_module")
        elif node.attr == "model" and _last_name(node.value).endswith("trainer"):
            found.append(f"line {node.lineno}: reads trainer.model")
    return found


@pytest.mark.parametrize("package, check", [("phases", phase_violations), ("data", data_violations)])
def test_no_module_reaches_across(package, check):
    files = sorted((PACKAGE / package).glob("*.py"))
    assert files
    problems = {f.name: v for f in files if (v := check(f.read_text()))}
    assert problems == {}


def test_the_checks_catch_each_kind_of_access():
    phase = ("def setup(self):\n    dm = self.trainer.datamodule\n    dm.fit_split = 'val'\n"
             "    return dm._splits\n")
    assert phase_violations(phase) == ["line 2: reads .datamodule", "line 3: assigns DataModule attribute fit_split",
                                       "line 4: private DataModule attribute _splits"]
    assert phase_violations("def f(self, facts):\n    return facts.batch_size\n") == []
    data = "def f(self):\n    return self.trainer.lightning_module.img_size, self.trainer.model\n"
    assert sorted(data_violations(data)) == ["line 2: reads .lightning_module", "line 2: reads trainer.model"]


class FakeData:
    """The public API `DataFacts.from_datamodule` reads, nothing else."""

    img_size = None
    batch_size = 24
    group_class_counts = torch.tensor([9, 5, 2])
    train_class_counts = torch.tensor([8, 4, 2])

    def data_record(self):
        return {"train": "abc", "num_train": 14}


def test_connect_passes_image_size_to_the_data_and_facts_to_the_model():
    phase = AdaptPhase(expert=ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=2),
                       num_classes=3)
    data = FakeData()
    connect(phase, data)
    assert data.img_size == 32  # the tiny ViT's
    facts = phase.data_facts
    assert facts.batch_size == 24 and facts.record == {"train": "abc", "num_train": 14}
    assert facts.group_class_counts.tolist() == [9, 5, 2] and facts.train_class_counts.tolist() == [8, 4, 2]
    data.img_size = 48  # data.img_size, when set, wins
    connect(phase, data)
    assert data.img_size == 48


def test_facts_of_another_class_count_are_refused():
    phase = AdaptPhase(expert=ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=2),
                       num_classes=4)
    with pytest.raises(ConfigError, match="data has 3 classes but model.num_classes=4"):
        phase.attach_data(DataFacts(torch.ones(3), torch.ones(3), {}, 8))
