"""`model.compile: true`: the expert's forward under torch.compile (inductor on this CPU) gives the
eager outputs and gradients, with no graph break and no recompile across the steps of phases 1 and 2."""
import lightning as L
import pytest
import torch
from torch._dynamo.utils import counters

from lpt_lightning.data import ImageFolderSource, LongTailDataModule
from lpt_lightning.data_facts import connect
from lpt_lightning.errors import ConfigError
from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec, LongTailExpert
from lpt_lightning.phases import AdaptPhase, GroupPromptPhase, OptimSpec
from lpt_lightning.phases.base import check_cpu_compiler
from tiny_models import tiny_backbone, tiny_image_folder

GROUP = GroupPromptSpec(pool_size=4, top_k=2, start_block=2, length=2)


def expert_spec(kind: str) -> ExpertSpec:
    # No dropout: inductor draws other random numbers than eager, parity needs none drawn.
    return ExpertSpec(kind=kind, backbone=tiny_backbone(kind), prompt_length=2, adapter_dropout=0.0, head_dropout=0.0)


@pytest.mark.parametrize("kind", ["visual", "vl"])
def test_no_graph_break_in_a_block_nor_in_the_prompted_forward(kind):
    torch._dynamo.reset()
    expert = LongTailExpert(expert_spec(kind), 4, GROUP).train()
    images = torch.rand(3, 3, 32, 32)
    tokens = expert.backbone.embed(images)
    explained = {
        "block": torch._dynamo.explain(lambda x: expert._prompted_block(0, x, None, x.shape[1]))(tokens),
        "last block (CLS row only)": torch._dynamo.explain(lambda x: expert._prompted_block(3, x, None, 1))(tokens),
        "prompted forward (phase 1)": torch._dynamo.explain(expert)(images, use_group_prompts=False),
        "prompted forward with prompt selection (phase 2)": torch._dynamo.explain(expert)(images),
    }
    for name, result in explained.items():
        assert result.graph_count == 1 and result.graph_break_count == 0, (name, result.break_reasons)


class GraphCounter(L.Callback):
    """Graphs dynamo compiles during each training step; keeps the last batch's images."""

    def __init__(self):
        self.per_step: list[int] = []
        self.images: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = counters["stats"]["unique_graphs"]
        self.images = torch.cat([stream["image"] for stream in batch.values()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_step.append(counters["stats"]["unique_graphs"] - self._before)


def fit(model, data, root, steps, callbacks=()):
    connect(model, data)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=steps, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root), callbacks=list(callbacks))
    trainer.fit(model, datamodule=data)
    return trainer


# Inductor builds C++ kernels: about 100 s with a cold cache on a loaded 2-core machine (30 s warm).
@pytest.mark.slow
def test_compiled_phases_match_eager_without_recompiles(tmp_path, caplog):
    try:
        check_cpu_compiler()
    except ConfigError as error:
        pytest.skip(f"cannot test torch.compile here: {error}")
    torch._dynamo.reset()
    counters.clear()
    L.seed_everything(0)
    folder = tiny_image_folder(tmp_path / "imgs")
    source = ImageFolderSource(root=str(folder), val_per_class=3, test_per_class=2, seed=0, name="tiny")

    def data():
        return LongTailDataModule(source, batch_size=4, num_workers=0, img_size=32, pin_memory=False)

    phase1 = AdaptPhase(expert=expert_spec("visual"), num_classes=4, optim=OptimSpec(warmup_epochs=0), compile=True)
    graphs = GraphCounter()
    fit(phase1, data(), tmp_path / "p1", steps=3, callbacks=[graphs]).save_checkpoint(tmp_path / "p1.ckpt")
    assert graphs.per_step[0] >= 1 and graphs.per_step[1:] == [0, 0], f"phase 1: {graphs.per_step}"
    assert phase1.expert._compiled_call_impl is not None
    counters.clear()

    # The compiled phase 1's checkpoint has the eager parameter names: phase 2 loads it as usual.
    phase2 = GroupPromptPhase(phase1_checkpoint=str(tmp_path / "p1.ckpt"), num_classes=4, group_prompts=GROUP,
                              optim=OptimSpec(warmup_epochs=0), compile=True)
    graphs = GraphCounter()
    with caplog.at_level("INFO"):
        fit(phase2, data(), tmp_path / "p2", steps=5, callbacks=[graphs])
    assert graphs.per_step[0] >= 1, "the first step compiled nothing: the expert ran eagerly"
    assert graphs.per_step[1:] == [0] * 4, f"recompiles after the first step: {graphs.per_step}"
    assert "model.compile: the first training step took" in caplog.text

    expert = phase2.expert.train()
    assert expert._compiled_call_impl is not None
    trained = [p for p in expert.parameters() if p.requires_grad]
    compiled, eager = expert(graphs.images), expert.forward(graphs.images)  # forward: the eager path
    assert torch.equal(compiled.match.indices, eager.match.indices)  # the same prompts selected
    for name in ("logits", "features", "query"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=0, atol=1e-5)
    grads = [torch.autograd.grad(out.logits.square().sum() + out.match.similarity.sum(), trained)
             for out in (compiled, eager)]
    for g_compiled, g_eager in zip(*grads):
        torch.testing.assert_close(g_compiled, g_eager, rtol=0, atol=1e-5)
    assert graphs.per_step[1:] == [0] * 4 and counters["stats"]["unique_graphs"] == sum(graphs.per_step), \
        "the parity check recompiled"


def test_compile_without_a_cpu_compiler_is_refused_up_front(monkeypatch):
    from torch._inductor import config

    monkeypatch.setattr(config.cpp, "cxx", ("no-such-compiler++",))
    with pytest.raises(ConfigError, match="needs a C.. compiler.*no-such-compiler.*model.compile: false"):
        check_cpu_compiler()
