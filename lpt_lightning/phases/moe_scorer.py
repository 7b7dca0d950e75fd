"""Phase 3 (MoEScorerPhase): both experts frozen; learn the mixture weight w(x) (SPEC 5).

Expert outputs over the held-out images (and the training images, for the fit-on-train ablation)
are cached once; the searching-based scorer picks W_base on the held-out split and the
learning-based scorer trains on cached tensors of it. Never on the test split.
Validation and test report each expert alone, W_base fusion and the full scorer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lpt_lightning import __version__
from lpt_lightning.checkpoints import (
    META_KEY,
    check_same_data,
    expert_from_checkpoint,
    is_saved_key,
    load_checkpoint_file,
    read_phase_metadata,
)
from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.expert_cache import cache_key, cached_outputs, compute_outputs, ensure_disk_space, file_digest
from lpt_lightning.metrics import SPLIT_KEYS, SplitAccuracy
from lpt_lightning.models.scorer import MoEScorer, fuse, search_base_weight
from lpt_lightning.phases.base import seed_training_step

# Rows of every phase-3 evaluation: the gain of each part stays visible.
ROWS = {"visual": "visual expert", "vl": "vision-language expert", "base": "W_base fusion", "fused": "LPT++ (scorer)"}
EXPERTS = ("visual", "vl")


@dataclass
class ScorerSpec:
    """Mixture scorer settings (design, SPEC 5).

    Attributes:
        hidden_dim: width of the offset MLP g.
        dropout: dropout inside g.
        grid_step: W_base grid spacing over [0, 1].
        lr: AdamW learning rate of g.
        weight_decay: AdamW weight decay.
        fit_on: data the offset MLP g trains on: ``heldout`` (the validation or carved held-out
            split, the default) or ``train`` (an ablation). The experts are over-confident on
            their own training images, so a scorer fitted there learns to trust whichever
            expert memorised more, not which one generalises. W_base is always searched on the
            held-out split.
        learn_offset: False = searching-based scorer only (no training of g).
    """

    hidden_dim: int = 256
    dropout: float = 0.1
    grid_step: float = 0.05
    lr: float = 1e-3
    weight_decay: float = 1e-4
    fit_on: Literal["heldout", "train"] = "heldout"
    learn_offset: bool = True


class MoEScorerPhase(L.LightningModule):
    """LPT++ phase 3.

    Args:
        visual_checkpoint: the visual expert's phase-2 checkpoint (.ckpt or exported .safetensors).
        vl_checkpoint: the vision-language expert's phase-2 checkpoint.
        num_classes, class_names: linked from the data.
        scorer: scorer settings.
        cache_dir: where cached expert outputs go (default: <trainer.default_root_dir>/expert_cache).
        split_convention: many/medium/few thresholds.
    """

    phase_name = "moe_scorer"

    def __init__(self, visual_checkpoint: str, vl_checkpoint: str, num_classes: int = 0,
                 class_names: list[str] | None = None, scorer: ScorerSpec | None = None, cache_dir: str | None = None,
                 split_convention: Literal["lpt", "oltr"] = "lpt"):
        super().__init__()
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.scorer_spec = scorer or ScorerSpec()
        self.cache_dir = cache_dir
        self.split_convention = split_convention
        self.checkpoints = {"visual": visual_checkpoint, "vl": vl_checkpoint}
        self.scales: dict[str, float] = {}
        self.digests: list[str] = []
        self.expert_data: dict[str, dict[str, Any] | None] = {}
        self.data_record: dict[str, Any] | None = None
        experts = {}
        for kind, path in self.checkpoints.items():
            checkpoint = load_checkpoint_file(path)
            meta = read_phase_metadata(checkpoint, path)
            if meta["phase"] not in ("adapt", "group_prompt"):
                raise CheckpointError(f"model.{kind}_checkpoint={path}: a '{meta['phase']}' checkpoint is not an expert")
            if meta["expert"]["kind"] != kind:
                raise ConfigError(f"model.{kind}_checkpoint={path} holds a '{meta['expert']['kind']}' expert, "
                                  f"expected '{kind}' (are the two checkpoints swapped?)")
            if meta["num_classes"] != num_classes:
                raise ConfigError(f"model.{kind}_checkpoint={path}: trained for {meta['num_classes']} classes, "
                                  f"but the data has {num_classes}")
            experts[kind] = expert_from_checkpoint(checkpoint, path)
            self.scales[kind] = float(meta.get("logit_scale", 20.0))
            self.expert_data[kind] = meta.get("data")
            self.digests.append(file_digest(path))
        self.visual, self.vl = experts["visual"], experts["vl"]
        if self.visual.img_size != self.vl.img_size:
            raise ConfigError(f"the experts take {self.visual.img_size}px and {self.vl.img_size}px images; "
                              "phase 3 feeds both from one loader and needs one size")
        for expert in (self.visual, self.vl):
            expert.requires_grad_(False)
            expert.eval()
        spec = self.scorer_spec
        self.scorer = MoEScorer(self.visual.backbone.feature_dim, self.vl.backbone.feature_dim, spec.hidden_dim,
                                spec.dropout)
        if not spec.learn_offset:
            self.scorer.offset.requires_grad_(False)
        self.register_buffer("class_counts", torch.ones(num_classes, dtype=torch.long))
        self.strict_loading = False  # backbones are rebuilt, not loaded
        self.results: dict[str, dict[str, Any]] = {}
        self._outputs: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def img_size(self) -> int:
        return self.visual.img_size

    def experts(self) -> dict[str, nn.Module]:
        return {"visual": self.visual, "vl": self.vl}

    def train(self, mode: bool = True) -> "MoEScorerPhase":
        super().train(mode)
        self.visual.eval()
        self.vl.eval()
        return self

    # ----------------------------------------------------------------- setup and caches
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        counts = torch.as_tensor(dm.group_class_counts, dtype=torch.long)  # the many/medium/few groups
        if counts.numel() != self.num_classes:
            raise ConfigError(f"data has {counts.numel()} classes but model.num_classes={self.num_classes}")
        self.class_counts.copy_(counts)
        self.metrics = nn.ModuleDict({
            f"{stage_}_{row}": SplitAccuracy(counts, convention=self.split_convention)
            for stage_ in ("val", "test") for row in ROWS
        })
        self.data_record = dm.data_record()
        if stage == "fit":
            if dm.val_is_test:
                raise ConfigError("phase 3 searches W_base and fits the scorer on the validation split, which is the "
                                  "TEST split here (data.val_from_test=true): set data.holdout_per_class instead, in "
                                  "every phase, so the experts never train on the held-out images")
            for kind, path in self.checkpoints.items():
                check_same_data(self.expert_data[kind], self.data_record, f"model.{kind}_checkpoint={path}")
            # The scorer's training batches index the split it is fitted on.
            dm.fit_split = self.fit_split
        # Everything but prediction reads cached expert outputs: batches need no images.
        dm.load_images = stage == "predict"

    @property
    def fit_split(self) -> str:
        return "val" if self.scorer_spec.fit_on == "heldout" else "train"

    def _cache_path(self, name: str, key: str) -> Path:
        root = Path(self.cache_dir or Path(self.trainer.default_root_dir) / "expert_cache")
        return root / f"{name}-{key}.pt"

    def outputs(self, name: str) -> dict[str, torch.Tensor]:
        """Cached expert outputs over split ``train`` (label probabilities only), ``val`` or
        ``test`` (full probabilities); one cache and one inference pass per underlying split."""
        dm = self.trainer.datamodule
        split_name, split = ("train", dm.splits.train) if name == "train" else dm.eval_split(name)
        if split_name in self._outputs:
            return self._outputs[split_name]
        full = split_name != "train"
        key = cache_key(self.digests, split, self.img_size, full)
        path = self._cache_path(split_name, key)
        if not path.is_file():
            per_row = 16 + 4 * sum(e.backbone.feature_dim + (self.num_classes if full else 1)
                                   for e in self.experts().values())
            ensure_disk_space(path.parent, len(split) * per_row)

        def compute() -> dict[str, torch.Tensor]:
            rank_zero_info(f"phase 3: computing expert outputs for the {split_name} split -> {path}")
            return compute_outputs(self.experts(), self.scales, dm.split_dataloader(split_name), self.device, full,
                                   autocast=self.trainer.precision_plugin.forward_context)

        data = cached_outputs(path, compute, self.global_rank, self.trainer.world_size, self.trainer.strategy.barrier)
        if not torch.equal(data["index"], torch.arange(len(split))):
            raise CheckpointError(f"{path}: does not cover the {split_name} split; delete it to recompute")
        self._outputs[split_name] = data
        return data

    def on_fit_start(self) -> None:
        self.outputs(self.fit_split)
        held = self.outputs("val")
        if self.global_step == 0:  # a resumed run keeps the W_base it searched before
            w_base, scores = search_base_weight(held["visual.prob"], held["vl.prob"], held["label"],
                                                self.scorer_spec.grid_step)
            self.scorer.w_base.fill_(w_base)
            rank_zero_info(f"phase 3: W_base = {w_base:.2f} (balanced held-out accuracy "
                           f"{100 * scores[w_base]:.2f}%; w=0: {100 * scores[0.0]:.2f}%, w=1: {100 * scores[1.0]:.2f}%)")
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        rank_zero_info(f"moe_scorer: {trainable:,} trainable parameters (scorer MLP, fitted on the "
                       f"{self.fit_split} split); experts frozen")

    # ----------------------------------------------------------------- training
    def _rows(self, name: str, index: torch.Tensor) -> dict[str, torch.Tensor]:
        data = self.outputs(name)
        idx = index.cpu()
        return {k: v[idx].to(self.device, non_blocking=True) for k, v in data.items()}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed_training_step(self.current_epoch, batch_idx, self.global_rank)

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        index = torch.cat([b["index"] for b in batch.values()])
        rows = self._rows(self.fit_split, index)
        w = self.scorer(rows["visual.query"], rows["vl.query"])
        p_label = w * label_probability(rows, "visual") + (1 - w) * label_probability(rows, "vl")
        loss = -torch.log(p_label.clamp_min(1e-12)).mean()  # NLL of the fused probability
        self.log("train/loss", loss, prog_bar=True, batch_size=index.numel())
        self.log("train/w_mean", w.mean(), batch_size=index.numel())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.scorer.parameters() if p.requires_grad]
        if not params:  # searching-based scorer only: a no-op optimiser keeps Lightning's loop uniform
            params = [nn.Parameter(torch.zeros(()))]
        return torch.optim.AdamW(params, lr=self.scorer_spec.lr, weight_decay=self.scorer_spec.weight_decay)

    # ----------------------------------------------------------------- evaluation
    def fused_probabilities(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = self.scorer(rows["visual.query"], rows["vl.query"])
        return {
            "visual": rows["visual.prob"],
            "vl": rows["vl.prob"],
            "base": fuse(rows["visual.prob"], rows["vl.prob"], self.scorer.w_base),
            "fused": fuse(rows["visual.prob"], rows["vl.prob"], w),
        }

    def _eval_step(self, stage: str, batch: dict[str, torch.Tensor]) -> None:
        rows = self._rows(stage, batch["index"])
        for row, probs in self.fused_probabilities(rows).items():
            self.metrics[f"{stage}_{row}"].update(probs, batch["label"])

    def on_validation_start(self) -> None:
        self.outputs("val")

    def on_test_start(self) -> None:
        self.outputs("test")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _log_rows(self, stage: str) -> None:
        logged = {}
        for row, title in ROWS.items():
            metric = self.metrics[f"{stage}_{row}"]
            result = metric.compute()
            metric.reset()
            self.results[f"{stage}: {title}"] = {k: float(result[k]) for k in SPLIT_KEYS} | {
                "per_class": result["per_class"].cpu()}
            prefix = stage if row == "fused" else f"{stage}/{row}"
            logged |= {f"{prefix}/{k}": float(result[k]) for k in SPLIT_KEYS}
        logged[f"{stage}/w_base"] = float(self.scorer.w_base)
        self.log_dict(logged, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_rows("val")

    def on_test_epoch_end(self) -> None:
        self._log_rows("test")

    # ----------------------------------------------------------------- inference on images
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Fused class probabilities [B, C] for images in [0, 1]: both experts (1.5 backbone passes
        each with prefix reuse) and the scorer."""
        outs = {k: e(images) for k, e in self.experts().items()}
        probs = {k: torch.softmax(self.scales[k] * o.logits.float(), dim=-1) for k, o in outs.items()}
        w = self.scorer(outs["visual"].query, outs["vl"].query)
        return fuse(probs["visual"], probs["vl"], w)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"index": batch["index"], "probs": self(batch["image"])}

    # ----------------------------------------------------------------- checkpoints
    def metadata(self) -> dict[str, Any]:
        return {"version": __version__, "phase": self.phase_name, "num_classes": self.num_classes,
                "class_names": self.class_names, "split_convention": self.split_convention,
                "expert_checkpoints": dict(self.checkpoints), "logit_scales": dict(self.scales),
                "scorer_fit_on": self.scorer_spec.fit_on, "data": self.data_record}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if is_saved_key(k) and not k.startswith("metrics.")}
        checkpoint[META_KEY] = self.metadata()


def label_probability(rows: dict[str, torch.Tensor], expert: str) -> torch.Tensor:
    """An expert's probability of the true label: stored as such for the training split, taken
    from the full probability vector for the held-out split."""
    if f"{expert}.prob_label" in rows:
        return rows[f"{expert}.prob_label"]
    return rows[f"{expert}.prob"].gather(1, rows["label"][:, None]).squeeze(1)
