"""Phase 3 of LPT++ in one place (SPEC 5): both experts frozen, the mixture weight w(x) learned.

Top to bottom, never on the test split:
1. outputs: both experts over the held-out split (and the training split, for the fit-on-train
   ablation), once, through the predict loop of the fit's own trainer (`write_expert_outputs`);
2. cache: a DataModule over those memory-mapped outputs (`CachedOutputsDataModule`);
3. W_base: the fixed weight with the best balanced held-out accuracy (`search_w_base`);
4. scorer: `MoEScorerPhase.training_step` fits the offset MLP g around W_base;
5. evaluation: each expert alone, W_base fusion and the full scorer, on cached rows or on images
   (then both experts run, as in `lpt test` / `lpt predict`).

`scorer_fit_data` runs steps 1-3; ``lpt fit`` calls it, and so does plain Python,
``trainer.fit(model, datamodule=scorer_fit_data(model, images, trainer))``.

The module is the whole LPT++ model and is built whole: both experts (from their phase-2 files,
or from the specs its checkpoint records, which are also its ``experts`` hyperparameter, so
`load_from_checkpoint` and ``--ckpt_path`` rebuild it without the phase-2 files) and the scorer.
Its state is its parameters and buffers (the experts' trained tensors, the scorer, W_base, the
class counts), restored by ``load_state_dict``.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lpt_lightning import __version__
from lpt_lightning.checkpoints.files import load_checkpoint_file
from lpt_lightning.checkpoints.metadata import META_KEY, check_same_data, is_saved_key, read_phase_metadata
from lpt_lightning.data.cached_outputs import CachedOutputsDataModule
from lpt_lightning.data_facts import DataFacts
from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.expert_outputs import expert_probabilities, expert_rows, write_expert_outputs
from lpt_lightning.metrics import log_values, row_values
from lpt_lightning.models.scorer import BaseWeightSearch, MoEScorer, fuse
from lpt_lightning.phases.moe_experts import (
    EXPERTS,
    architecture,
    experts_from_phase2,
    experts_from_specs,
    recorded_experts,
)
from lpt_lightning.precision import check_precision
from lpt_lightning.test_priors import TestPriors, prior_shift_metrics, record_prior_shift
from lpt_lightning.taxonomy import eval_metrics, taxonomy_log_values, taxonomy_values

# Rows of every phase-3 evaluation: the gain of each part stays visible.
ROWS = {"visual": "visual expert", "vl": "vision-language expert", "base": "W_base fusion", "fused": "LPT++ (scorer)"}
# Phase 3's validation split is the split W_base is searched on (and the scorer fitted on, by
# default): its rows and logged values are named so, never to be read as held-out numbers.
STAGE_ROWS = {"val": "fit split (val)", "test": "test"}
STAGE_LOG_PREFIXES = {"val": "fit_split_val", "test": "test"}

NOT_ON_IMAGES = ("MoEScorerPhase fits on its experts' cached outputs, not on images: fit it with `lpt fit`, or in "
                 "Python with trainer.fit(model, datamodule=scorer_fit_data(model, images, trainer)) "
                 "(lpt_lightning.phases.moe_scorer)")


def row_name(stage: str, title: str) -> str:
    """The result row of one part (a `ROWS` title) evaluated in ``stage`` (``val`` or ``test``)."""
    return f"{STAGE_ROWS[stage]}: {title}"


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
        learn_offset: False = searching-based scorer only (an LPT++ ablation): g is not trained,
            fit skips every training batch (no backward) and evaluates W_base fusion alone.
    """

    hidden_dim: int = 256
    dropout: float = 0.1
    grid_step: float = 0.05
    lr: float = 1e-3
    weight_decay: float = 1e-4
    fit_on: Literal["heldout", "train"] = "heldout"
    learn_offset: bool = True


def scorer_fit_data(model: "MoEScorerPhase", images, trainer: L.Trainer) -> CachedOutputsDataModule:
    """Steps 1-3 of phase 3: the protocol checks, the experts' outputs where the cache lacks them
    (on ``trainer``, the one the fit runs on), the cached-output DataModule, and W_base searched on
    the held-out split (a resumed run restores the W_base it searched before, with the scorer)."""
    if images.val_is_test:
        raise ConfigError("phase 3 searches W_base and fits the scorer on the validation split, which is the "
                          "TEST split here (data.val_from_test=true): set data.holdout_per_class instead, in "
                          "every phase, so the experts never train on the held-out images")
    record = images.data_record()
    for kind, info in model.expert_info.items():
        check_same_data(info["data"], record, f"model.{kind}_checkpoint={info['source']}")
    fit_split = model.fit_split
    splits = {fit_split: fit_split == "train", "val": False}
    facts = {"class_counts": images.group_class_counts.tolist(), "class_names": images.class_names, "record": record}
    root = Path(model.cache_dir or Path(trainer.default_root_dir) / "expert_cache")
    experts = model.experts()
    # 1. outputs
    directories = write_expert_outputs(experts, model.scales, [model.expert_info[k]["digest"] for k in experts],
                                       images, splits, root, facts, trainer, model.outputs_dtype)
    # 2. cache
    data = CachedOutputsDataModule(directories, fit_split=fit_split, batch_size=images.batch_size,
                                   eval_batch_size=images.eval_batch_size, sampling=images.sampling,
                                   images_per_class=images.images_per_class, seed=images.seed)
    model.use_data(data.group_class_counts, data.data_record())
    model.taxonomy = getattr(images, "taxonomy", None)
    # 3. W_base
    w_base = search_w_base(data.heldout_batches(), model.scales, model.num_classes, model.scorer_spec.grid_step)
    model.scorer.w_base.fill_(w_base)
    return data


@torch.no_grad()
def search_w_base(heldout: Iterable[dict[str, torch.Tensor]], scales: dict[str, float], num_classes: int,
                  grid_step: float) -> float:
    """Searching-based scorer: the W_base with the best balanced accuracy on the held-out rows."""
    search = BaseWeightSearch(num_classes, grid_step)
    for rows in heldout:
        search.update(expert_probabilities(rows, "visual", scales["visual"]),
                      expert_probabilities(rows, "vl", scales["vl"]), rows["label"])
    w_base, scores = search.result()
    rank_zero_info(f"phase 3: W_base = {w_base:.2f} (balanced held-out accuracy {100 * scores[w_base]:.2f}%; "
                   f"w=0: {100 * scores[0.0]:.2f}%, w=1: {100 * scores[1.0]:.2f}%)")
    return w_base


class MoEScorerPhase(L.LightningModule):
    """LPT++ phase 3.

    Args:
        visual_checkpoint: the visual expert's phase-2 checkpoint (.ckpt or exported .safetensors);
            read to fit. A file that is gone is not needed when a phase-3 checkpoint is restored
            (``--ckpt_path``, `load_from_checkpoint`) or ``weights`` is given.
        vl_checkpoint: the vision-language expert's phase-2 checkpoint.
        num_classes, class_names: linked from the data.
        scorer: scorer settings.
        cache_dir: where the experts' outputs go (default: <trainer.default_root_dir>/expert_cache).
        outputs_dtype: storage of the cached logits and query features.
        split_convention: many/medium/few thresholds.
        weights: a phase-3 checkpoint or LPT++ export (``lpt export``) to take both experts and the
            scorer from, e.g. to test or predict with an export.
        experts: what is recorded of both experts (specs, logit scales, sources, digests), written
            here once they are built, so that a phase-3 checkpoint's hyperparameters rebuild the
            same model (`load_from_checkpoint`, ``--ckpt_path``) without the phase-2 files. Not
            set by hand.
    """

    phase_name = "moe_scorer"

    def __init__(self, visual_checkpoint: str | None = None, vl_checkpoint: str | None = None, num_classes: int = 0,
                 class_names: list[str] | None = None, scorer: ScorerSpec | None = None, cache_dir: str | None = None,
                 outputs_dtype: Literal["float16", "float32"] = "float16",
                 split_convention: Literal["lpt", "oltr"] = "lpt", weights: str | None = None,
                 experts: dict[str, dict[str, Any]] | None = None):
        super().__init__()
        spec = ScorerSpec(**scorer) if isinstance(scorer, dict) else (scorer or ScorerSpec())
        scorer = asdict(spec)  # plain data in the saved hyperparameters (weights_only loading)
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.cache_dir = cache_dir
        self.outputs_dtype = outputs_dtype
        self.split_convention = split_convention
        self.data_record: dict[str, Any] | None = None
        self.results: dict[str, dict[str, Any]] = {}
        self.taxonomy = None  # the classes' taxonomy.Taxonomy, where the image data has one (data_facts.connect)
        self.test_priors: TestPriors | None = None  # set by `--report.test_priors` (reports.SplitReport)
        self.register_buffer("class_counts", torch.ones(num_classes, dtype=torch.long))
        self.strict_loading = False  # backbones are rebuilt, not loaded
        checkpoint = None
        if weights is not None:  # both experts' specs and the scorer's from the file, then its tensors
            where = f"model.weights={weights}"
            checkpoint = load_checkpoint_file(weights)
            meta = read_phase_metadata(checkpoint, weights)
            if meta["phase"] != self.phase_name:
                raise CheckpointError(f"{where}: written by phase '{meta['phase']}', expected a phase-3 checkpoint "
                                      "or LPT++ export")
            info = recorded_experts(meta, num_classes, where)
            spec = recorded_scorer_spec(meta, where, spec)
            built = experts_from_specs(info, num_classes, where)
        elif experts is not None:  # rebuilt from a phase-3 checkpoint's hyperparameters
            info = recorded_experts({"experts": experts, "num_classes": num_classes}, num_classes,
                                    "model.init_args.experts")
            built = experts_from_specs(info, num_classes, "model.init_args.experts")
        else:
            built, info = experts_from_phase2({"visual": visual_checkpoint, "vl": vl_checkpoint}, num_classes)
        if built["visual"].img_size != built["vl"].img_size:
            raise ConfigError(f"the experts take {built['visual'].img_size}px and {built['vl'].img_size}px images; "
                              "phase 3 feeds both from one loader and needs one size")
        self.scorer_spec = spec
        self.hparams["scorer"], self.hparams["experts"] = asdict(spec), info  # what rebuilds this model
        self.expert_info = info
        self.visual, self.vl = built["visual"], built["vl"]
        for expert in (self.visual, self.vl):
            expert.requires_grad_(False)
            expert.eval()
        self.scorer = MoEScorer(self.visual.backbone.feature_dim, self.vl.backbone.feature_dim, spec.hidden_dim,
                                spec.dropout)
        if not spec.learn_offset:
            self.scorer.offset.requires_grad_(False)
        if checkpoint is not None:
            self.on_load_checkpoint(checkpoint, where)
            self.load_state_dict(checkpoint["state_dict"], strict=False)

    @property
    def scales(self) -> dict[str, float]:
        return {kind: info["logit_scale"] for kind, info in self.expert_info.items()}

    @property
    def img_size(self) -> int:
        return self.visual.img_size

    def experts(self) -> dict[str, nn.Module]:
        return {"visual": self.visual, "vl": self.vl}

    @property
    def fit_split(self) -> str:
        return "val" if self.scorer_spec.fit_on == "heldout" else "train"

    def train(self, mode: bool = True) -> "MoEScorerPhase":
        super().train(mode)
        for expert in (self.visual, self.vl):
            expert.eval()  # frozen: no dropout or drop-path while the scorer trains
        return self

    # ----------------------------------------------------------------- inputs from the data
    def attach_data(self, facts: DataFacts) -> None:
        """From the image data only the taxonomy: the class counts and data record come with the
        cached outputs it is fitted on (`use_data`)."""
        self.taxonomy = facts.taxonomy

    def use_data(self, class_counts: torch.Tensor, data_record: dict[str, Any] | None) -> None:
        """The many/medium/few class counts and the data record of the data it is fitted on."""
        counts = torch.as_tensor(class_counts, dtype=torch.long)
        if counts.numel() != self.num_classes:
            raise ConfigError(f"data has {counts.numel()} classes but model.num_classes={self.num_classes}")
        self.class_counts.copy_(counts)
        self.data_record = data_record

    def setup(self, stage: str) -> None:
        check_precision(self.trainer.precision)

    def on_fit_start(self) -> None:
        if not self.scorer_spec.learn_offset:
            rank_zero_info("moe_scorer: searching-based scorer only (scorer.learn_offset=false): W_base is the "
                           "whole scorer, nothing is trained; fit only evaluates it")
            return
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        rank_zero_info(f"moe_scorer: {trainable:,} trainable parameters (scorer MLP, fitted on the "
                       f"{self.fit_split} split); experts frozen")

    # ----------------------------------------------------------------- expert outputs
    def probabilities(self, rows: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
        return expert_probabilities(rows, kind, self.scales[kind])

    def label_probability(self, rows: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
        """An expert's probability of the true label: cached as such for the training split, taken
        from the logits for the held-out split."""
        if f"{kind}.prob_label" in rows:
            return rows[f"{kind}.prob_label"]
        return self.probabilities(rows, kind).gather(1, rows["label"][:, None]).squeeze(1)

    def expert_rows(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both experts on images (1.5 backbone passes each with prefix reuse), or on the test-time
        views of each image (averaged, `view_outputs`): what the cache holds."""
        return expert_rows(self.experts(), images, self.scales)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor | None:
        streams = list(batch.values())
        if "image" in streams[0]:
            raise ConfigError(NOT_ON_IMAGES)
        if not self.scorer_spec.learn_offset:
            return None  # searching-based scorer: Lightning skips the batch (no backward, no parameter moves)
        rows = {k: torch.cat([s[k] for s in streams]) for k in streams[0]}
        w = self.scorer(rows["visual.query"], rows["vl.query"])
        p_label = w * self.label_probability(rows, "visual") + (1 - w) * self.label_probability(rows, "vl")
        loss = -torch.log(p_label.clamp_min(1e-12)).mean()  # NLL of the fused probability
        size = rows["index"].numel()
        self.log("train/loss", loss, batch_size=size)  # not prog_bar: no host sync per step (phases/base.py)
        self.log("train/w_mean", w.mean(), batch_size=size)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.scorer.parameters() if p.requires_grad]
        if not params:  # searching-based scorer only: an optimiser over nothing keeps Lightning's loop uniform
            params = [nn.Parameter(torch.zeros(()))]
        return torch.optim.AdamW(params, lr=self.scorer_spec.lr, weight_decay=self.scorer_spec.weight_decay)

    # ----------------------------------------------------------------- evaluation
    def fused_probabilities(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p_visual, p_vl = self.probabilities(rows, "visual"), self.probabilities(rows, "vl")
        w = self.scorer(rows["visual.query"], rows["vl.query"])
        return {"visual": p_visual, "vl": p_vl, "base": fuse(p_visual, p_vl, self.scorer.w_base),
                "fused": fuse(p_visual, p_vl, w)}

    def _start_metrics(self, stage: str) -> None:
        # Built when evaluation starts, for that stage: a restored checkpoint's class counts are in place by then.
        counts = self.class_counts.cpu()
        self.metrics = nn.ModuleDict({f"{stage}_{row}": eval_metrics(counts, self.split_convention, self.taxonomy)
                                      for row in ROWS}).to(self.device)
        self.prior_shift = prior_shift_metrics(counts, self.test_priors, list(self.metrics)).to(self.device)

    def _eval_step(self, stage: str, batch: dict[str, torch.Tensor]) -> None:
        rows = self.expert_rows(batch["image"]) if "image" in batch else batch
        for row, probs in self.fused_probabilities(rows).items():
            self.metrics[f"{stage}_{row}"].update(probs, batch["label"])
            if f"{stage}_{row}" in self.prior_shift:
                self.prior_shift[f"{stage}_{row}"].update(probs, batch["label"])

    def on_validation_start(self) -> None:
        self._start_metrics("val")

    def on_test_start(self) -> None:
        self._start_metrics("test")

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
            values = self.results[row_name(stage, title)] = row_values(result) | taxonomy_values(result)
            prefix = STAGE_LOG_PREFIXES[stage] if row == "fused" else f"{STAGE_LOG_PREFIXES[stage]}/{row}"
            logged |= {f"{prefix}/{k}": v for k, v in (log_values(values) | taxonomy_log_values(values)).items()}
            if f"{stage}_{row}" in self.prior_shift:  # tau from the fit split's row of the same part
                record_prior_shift(self.results, row_name(stage, title), self.prior_shift[f"{stage}_{row}"],
                                   row_name("val", title) if stage == "test" else None, self.test_priors)
        logged[f"{STAGE_LOG_PREFIXES[stage]}/w_base"] = float(self.scorer.w_base)
        self.log_dict(logged, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_rows("val")

    def on_test_epoch_end(self) -> None:
        self._log_rows("test")

    # ----------------------------------------------------------------- inference on images
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Fused class probabilities [B, C] for images in [0, 1]: both experts and the scorer."""
        rows = self.expert_rows(images)
        return self.fused_probabilities(rows)["fused"]

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"index": batch["index"], "probs": self(batch["image"])}

    # ----------------------------------------------------------------- checkpoints
    def metadata(self) -> dict[str, Any]:
        return {"version": __version__, "phase": self.phase_name, "num_classes": self.num_classes,
                "class_names": self.class_names, "split_convention": self.split_convention,
                "experts": self.expert_info, "scorer": asdict(self.scorer_spec),
                "scorer_fit_on": self.scorer_spec.fit_on, "data": self.data_record}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if is_saved_key(k) and not k.startswith("metrics.")}
        checkpoint[META_KEY] = self.metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any], where: str = "checkpoint") -> None:
        """Only a checkpoint of this very model loads: its tensors fill the parameters and buffers
        (strict about the trained ones); the data record comes with it."""
        meta = checkpoint.get(META_KEY) or {}
        info = recorded_experts(meta, self.num_classes, where)
        if any(architecture(info[k]) != architecture(self.expert_info[k]) for k in EXPERTS) or (
                recorded_scorer_spec(meta, where, self.scorer_spec).hidden_dim != self.scorer_spec.hidden_dim):
            raise CheckpointError(f"{where}: holds other experts or another scorer than this model; build the model "
                                  "from it instead (`lpt ... --ckpt_path`, MoEScorerPhase.load_from_checkpoint, or "
                                  "model.init_args.weights)")
        # Lightning loads non-strictly (the frozen backbones are rebuilt, not saved): every trained
        # tensor must be there all the same.
        missing = [k for k in self.state_dict() if is_saved_key(k) and not k.startswith("metrics.")
                   and k not in checkpoint["state_dict"]]
        if missing:
            raise CheckpointError(f"{where}: lacks {len(missing)} trained tensors of this model (e.g. {missing[0]})")
        self.data_record = meta.get("data")


def recorded_scorer_spec(meta: dict[str, Any], where: str, default: ScorerSpec) -> ScorerSpec:
    try:
        return ScorerSpec(**meta["scorer"]) if "scorer" in meta else default
    except TypeError as exc:
        raise CheckpointError(f"{where}: malformed scorer spec in the metadata ({exc})") from None
