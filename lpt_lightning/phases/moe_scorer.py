"""Phase 3 (MoEScorerPhase): both experts frozen; learn the mixture weight w(x) (SPEC 5).

Phase 3 is three parts: the experts' outputs over the held-out split (and the training split, for
the fit-on-train ablation) computed once through Lightning's predict loop
(`lpt_lightning.expert_outputs`), a DataModule over those cached tensors
(`lpt_lightning.data.cached_outputs`), and this module, which searches W_base on the held-out
outputs and trains the scorer on them. Never on the test split.

The module is the whole LPT++ model: both experts (their trained tensors and specs are in its
checkpoint, so it rebuilds without the phase-2 files) and the scorer. Evaluation takes either
cached rows or images (then both experts run, as in `lpt test` / `lpt predict`) and reports each
expert alone, W_base fusion and the full scorer.
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
from lpt_lightning.checkpoints.experts import (
    expert_from_checkpoint,
    expert_spec_from_dict,
)
from lpt_lightning.checkpoints.files import load_checkpoint_file
from lpt_lightning.checkpoints.metadata import (
    META_KEY,
    is_saved_key,
    read_phase_metadata,
)
from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.metrics import log_values, row_values
from lpt_lightning.models.expert import GroupPromptSpec, LongTailExpert, view_outputs
from lpt_lightning.models.scorer import BaseWeightSearch, MoEScorer, fuse
from lpt_lightning.precision import check_precision
from lpt_lightning.test_priors import TestPriors, prior_shift_metrics, record_prior_shift
from lpt_lightning.taxonomy import eval_metrics, taxonomy_log_values, taxonomy_values

# Rows of every phase-3 evaluation: the gain of each part stays visible.
ROWS = {"visual": "visual expert", "vl": "vision-language expert", "base": "W_base fusion", "fused": "LPT++ (scorer)"}
EXPERTS = ("visual", "vl")
# Phase 3's validation split is the split W_base is searched on (and the scorer fitted on, by
# default): its rows and logged values are named so, never to be read as held-out numbers.
STAGE_ROWS = {"val": "fit split (val)", "test": "test"}
STAGE_LOG_PREFIXES = {"val": "fit_split_val", "test": "test"}

NOT_ON_IMAGES = ("MoEScorerPhase fits on its experts' cached outputs, not on images: fit it with `lpt fit`, or in "
                 "Python with trainer.fit(model, datamodule=scorer_fit_data(model, images, trainer)) "
                 "(lpt_lightning.expert_outputs)")


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
    """

    phase_name = "moe_scorer"

    def __init__(self, visual_checkpoint: str | None = None, vl_checkpoint: str | None = None, num_classes: int = 0,
                 class_names: list[str] | None = None, scorer: ScorerSpec | None = None, cache_dir: str | None = None,
                 outputs_dtype: Literal["float16", "float32"] = "float16",
                 split_convention: Literal["lpt", "oltr"] = "lpt", weights: str | None = None):
        super().__init__()
        spec = ScorerSpec(**scorer) if isinstance(scorer, dict) else (scorer or ScorerSpec())
        scorer = asdict(spec)  # plain data in the saved hyperparameters (weights_only loading)
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.scorer_spec = spec
        self.cache_dir = cache_dir
        self.outputs_dtype = outputs_dtype
        self.split_convention = split_convention
        self.checkpoints = {"visual": visual_checkpoint, "vl": vl_checkpoint}
        self.expert_info: dict[str, dict[str, Any]] = {}  # per expert: specs, logit scale, digest, source, data
        self.visual: LongTailExpert | None = None
        self.vl: LongTailExpert | None = None
        self.scorer: MoEScorer | None = None
        self.data_record: dict[str, Any] | None = None
        self.taxonomy = None  # the classes' taxonomy.Taxonomy, where the image data has one (data_facts.connect)
        self.register_buffer("class_counts", torch.ones(num_classes, dtype=torch.long))
        self.strict_loading = False  # backbones are rebuilt, not loaded
        self.results: dict[str, dict[str, Any]] = {}
        self.test_priors: TestPriors | None = None  # set by `--report.test_priors` (reports.SplitReport)
        if weights is not None:
            checkpoint = load_checkpoint_file(weights)
            meta = read_phase_metadata(checkpoint, weights)
            if meta["phase"] != self.phase_name:
                raise CheckpointError(f"model.weights={weights}: written by phase '{meta['phase']}', expected a "
                                      "phase-3 checkpoint or LPT++ export")
            self.on_load_checkpoint(checkpoint, where=f"model.weights={weights}")
            self.load_state_dict(checkpoint["state_dict"], strict=False)
        elif all(path is not None and _exists(path) for path in self.checkpoints.values()):
            self.build_experts()

    # ----------------------------------------------------------------- the experts
    def build_experts(self) -> None:
        """Both experts from their phase-2 files (nothing to do once they are built)."""
        if self.visual is not None:
            return
        experts, info = {}, {}
        for kind, path in self.checkpoints.items():
            if path is None:
                raise ConfigError(f"model.{kind}_checkpoint is not set: phase 3 starts from two phase-2 experts")
            checkpoint = load_checkpoint_file(path)
            meta = read_phase_metadata(checkpoint, path)
            if meta["phase"] not in ("adapt", "group_prompt"):
                raise CheckpointError(f"model.{kind}_checkpoint={path}: a '{meta['phase']}' checkpoint is not an expert")
            if meta["expert"]["kind"] != kind:
                raise ConfigError(f"model.{kind}_checkpoint={path} holds a '{meta['expert']['kind']}' expert, "
                                  f"expected '{kind}' (are the two checkpoints swapped?)")
            if meta["num_classes"] != self.num_classes:
                raise ConfigError(f"model.{kind}_checkpoint={path}: trained for {meta['num_classes']} classes, "
                                  f"but the data has {self.num_classes}")
            experts[kind] = expert_from_checkpoint(checkpoint, path)
            info[kind] = {"expert": meta["expert"], "group_prompts": meta.get("group_prompts"),
                          "logit_scale": float(meta.get("logit_scale", 20.0)), "source": str(path),
                          "data": meta.get("data")}
        from lpt_lightning.expert_outputs import expert_digest

        for kind, expert in experts.items():
            info[kind]["digest"] = expert_digest(expert, architecture(info[kind]))
        self._install(experts, info)

    def _install(self, experts: dict[str, LongTailExpert], info: dict[str, dict[str, Any]]) -> None:
        if experts["visual"].img_size != experts["vl"].img_size:
            raise ConfigError(f"the experts take {experts['visual'].img_size}px and {experts['vl'].img_size}px images; "
                              "phase 3 feeds both from one loader and needs one size")
        self.visual, self.vl = experts["visual"], experts["vl"]
        self.expert_info = info
        for expert in (self.visual, self.vl):
            expert.requires_grad_(False)
            expert.eval()
        spec = self.scorer_spec
        self.scorer = MoEScorer(self.visual.backbone.feature_dim, self.vl.backbone.feature_dim, spec.hidden_dim,
                                spec.dropout)
        if not spec.learn_offset:
            self.scorer.offset.requires_grad_(False)

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
            if expert is not None:
                expert.eval()
        return self

    # ----------------------------------------------------------------- inputs from the data
    def use_data(self, class_counts: torch.Tensor, data_record: dict[str, Any] | None) -> None:
        """The many/medium/few class counts and the data record of the data it is fitted on."""
        counts = torch.as_tensor(class_counts, dtype=torch.long)
        if counts.numel() != self.num_classes:
            raise ConfigError(f"data has {counts.numel()} classes but model.num_classes={self.num_classes}")
        self.class_counts.copy_(counts)
        self.data_record = data_record

    @torch.no_grad()
    def search_base_weight(self, heldout: Iterable[dict[str, torch.Tensor]]) -> float:
        """Searching-based scorer: W_base with the best balanced accuracy on the held-out rows."""
        search = BaseWeightSearch(self.num_classes, self.scorer_spec.grid_step)
        for rows in heldout:
            search.update(self.probabilities(rows, "visual"), self.probabilities(rows, "vl"), rows["label"])
        w_base, scores = search.result()
        self.scorer.w_base.fill_(w_base)
        rank_zero_info(f"phase 3: W_base = {w_base:.2f} (balanced held-out accuracy {100 * scores[w_base]:.2f}%; "
                       f"w=0: {100 * scores[0.0]:.2f}%, w=1: {100 * scores[1.0]:.2f}%)")
        return w_base

    def _experts_in_place(self) -> None:
        # Called once a checkpoint is restored (or not): without one, the phase-2 files are needed.
        if self.visual is None:
            self.build_experts()
            self.to(self.device)

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
        return torch.softmax(self.scales[kind] * rows[f"{kind}.logits"].float(), dim=-1)

    def label_probability(self, rows: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
        """An expert's probability of the true label: cached as such for the training split, taken
        from the logits for the held-out split."""
        if f"{kind}.prob_label" in rows:
            return rows[f"{kind}.prob_label"]
        return self.probabilities(rows, kind).gather(1, rows["label"][:, None]).squeeze(1)

    def expert_rows(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both experts on images (1.5 backbone passes each with prefix reuse), or on the test-time
        views of each image (averaged, `view_outputs`): what the cache holds."""
        rows = {}
        for kind, expert in self.experts().items():
            rows[f"{kind}.logits"], rows[f"{kind}.query"] = view_outputs(expert, images, self.scales[kind])
        return rows

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
        if self.scorer is None:
            raise ConfigError(NOT_ON_IMAGES)
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

    def _start_metrics(self) -> None:
        # Built when evaluation starts: a restored checkpoint's class counts are in place by then.
        counts = self.class_counts.cpu()
        self.metrics = nn.ModuleDict({
            f"{stage}_{row}": eval_metrics(counts, self.split_convention, self.taxonomy)
            for stage in ("val", "test") for row in ROWS}).to(self.device)
        self.prior_shift = prior_shift_metrics(counts, self.test_priors, list(self.metrics)).to(self.device)

    def _eval_step(self, stage: str, batch: dict[str, torch.Tensor]) -> None:
        rows = self.expert_rows(batch["image"]) if "image" in batch else batch
        for row, probs in self.fused_probabilities(rows).items():
            self.metrics[f"{stage}_{row}"].update(probs, batch["label"])
            if f"{stage}_{row}" in self.prior_shift:
                self.prior_shift[f"{stage}_{row}"].update(probs, batch["label"])

    def on_validation_start(self) -> None:
        self._experts_in_place()
        self._start_metrics()

    def on_test_start(self) -> None:
        self._experts_in_place()
        self._start_metrics()

    def on_predict_start(self) -> None:
        self._experts_in_place()

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
        """Rebuild both experts from the specs the checkpoint records (their trained tensors follow
        in the state dict), unless the ones built from the phase-2 files have the same specs."""
        meta = checkpoint.get(META_KEY) or {}
        info = meta.get("experts")
        if not isinstance(info, dict) or set(info) != set(EXPERTS):
            raise CheckpointError(f"{where}: records no specs of both experts (written by another phase or an "
                                  "earlier version of lpt_lightning)")
        if meta.get("num_classes") != self.num_classes:
            raise ConfigError(f"{where}: trained for {meta.get('num_classes')} classes, but the data has "
                              f"{self.num_classes}")
        try:
            recorded = ScorerSpec(**meta["scorer"]) if "scorer" in meta else self.scorer_spec
        except TypeError as exc:
            raise CheckpointError(f"{where}: malformed scorer spec in the metadata ({exc})") from None
        same_scorer, self.scorer_spec = recorded == self.scorer_spec, recorded  # as its tensors were trained
        if self.visual is None or any(architecture(info[k]) != architecture(self.expert_info[k]) for k in EXPERTS):
            self._install({k: expert_from_specs(info[k], self.num_classes, where) for k in EXPERTS}, info)
        elif not same_scorer:
            self._install(self.experts(), info)
        else:
            self.expert_info = info
        self.data_record = meta.get("data")


def architecture(info: dict[str, Any]) -> dict[str, Any]:
    """What defines an expert's model (its specs and logit scale), as recorded in checkpoints."""
    return {k: info.get(k) for k in ("expert", "group_prompts", "logit_scale")}


def expert_from_specs(info: dict[str, Any], num_classes: int, where: str) -> LongTailExpert:
    """An expert's model from its recorded specs; its trained tensors come from a state dict."""
    try:
        group = GroupPromptSpec(**info["group_prompts"]) if info.get("group_prompts") else None
    except TypeError as exc:
        raise CheckpointError(f"{where}: malformed group prompt spec in the metadata ({exc})") from None
    expert = LongTailExpert(expert_spec_from_dict(info["expert"], where), num_classes, group=group)
    expert.release_text_tower()  # the head comes from the checkpoint
    return expert


def _exists(path: str) -> bool:
    return Path(path).is_file()
