"""What phases 1 and 2 share: dual-stream A-GCL training, SGD + cosine schedule, split metrics,
small checkpoints."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, is_dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lpt_lightning import __version__
from lpt_lightning.checkpoints.metadata import META_KEY, is_saved_key
from lpt_lightning.data_facts import DataFacts
from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.losses import AGCLLoss, LogitAdjustedCE, matching_loss
from lpt_lightning.metrics import EvalMetrics, log_values, row_values
from lpt_lightning.models.expert import ExpertOutput, LongTailExpert, view_outputs
from lpt_lightning.phases.specs import LossSpec, OptimSpec
from lpt_lightning.precision import check_precision
from lpt_lightning.test_priors import TestPriors, prior_shift_metrics, record_prior_shift
from lpt_lightning.taxonomy import eval_metrics, taxonomy_log_values, taxonomy_values


class ExpertPhase(L.LightningModule):
    """Base of AdaptPhase and GroupPromptPhase; subclasses build ``self.expert`` and freeze."""

    phase_name: str = ""

    def __init__(self, num_classes: int, class_names: list[str] | None, loss: LossSpec, optim: OptimSpec,
                 split_convention: Literal["lpt", "oltr"], compile: bool = False):
        super().__init__()
        if num_classes <= 0:
            raise ConfigError("model.num_classes must be positive (it is linked from data.num_classes)")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.loss_spec = loss
        self.optim_spec = optim
        self.split_convention = split_convention
        self.register_buffer("class_counts", torch.ones(num_classes, dtype=torch.long))
        self.stream_losses = nn.ModuleDict()
        self.results: dict[str, dict[str, Any]] = {}
        self.eval_row = ""  # label of the evaluated row; "" = the trained model
        self.test_priors: TestPriors | None = None  # set by `--report.test_priors` (reports.SplitReport)
        self.data_facts: DataFacts | None = None  # attach_data
        self.data_record: dict[str, Any] | None = None  # digests of the data it trains on (set in setup)
        self.taxonomy = None  # the classes' taxonomy.Taxonomy, where the data has one (set in setup)
        # Frozen backbone weights are not in our checkpoints: they come from the hub/local file.
        self.strict_loading = False
        self.expert: LongTailExpert
        # Optimizer steps of a run scheduled per step (configure_optimizers); None = per epoch.
        self.schedule_steps: int | None = None
        # `model.compile`: a run setting like the trainer's precision, not part of the saved model.
        self.compile_expert = compile
        self._first_step_started = 0.0
        self._compile_reported = False

    # ----------------------------------------------------------------- properties and metadata
    @property
    def img_size(self) -> int:
        return self.expert.img_size

    def metadata(self) -> dict[str, Any]:
        """Subclasses add their phase, expert and prompt specs."""
        return {"version": __version__, "num_classes": self.num_classes, "class_names": self.class_names,
                "split_convention": self.split_convention,
                "logit_scale": self.loss_spec.scale, "data": self.data_record}

    def check_upstream_data(self) -> None:
        """Phase 2 checks that phase 1 trained on the same data (nothing to check in phase 1)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_report(self) -> str:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        backbone = sum(p.numel() for p in self.expert.backbone.parameters())
        groups = {name: sum(p.numel() for p in m.parameters() if p.requires_grad)
                  for name, m in self.expert.named_children() if name != "backbone"}
        detail = ", ".join(f"{k} {v:,}" for k, v in groups.items() if v)
        return (f"{self.phase_name} [{self.expert.spec.kind} expert]: {trainable:,} trainable parameters "
                f"({100.0 * trainable / max(backbone, 1):.2f}% of the {backbone:,}-parameter frozen backbone; {detail})")

    def save_init_arguments(self, **arguments: Any) -> None:
        """Record the constructor arguments as plain data (weights_only-loadable), so that
        ``Phase.load_from_checkpoint(path)`` rebuilds the phase; Lightning's jsonargparse
        instantiator turns the dicts back into specs."""
        plain = {k: asdict(v) if is_dataclass(v) else v for k, v in arguments.items()}
        self.save_hyperparameters({"_instantiator": "lightning.pytorch.cli.instantiate_module",
                                   "_class_path": f"{type(self).__module__}.{type(self).__qualname__}", **plain},
                                  logger=False)

    # ----------------------------------------------------------------- data
    def attach_data(self, facts: DataFacts) -> None:
        """The data this phase trains or is evaluated on (`lpt` attaches the DataModule's facts;
        in Python: `lpt_lightning.data_facts.connect(model, datamodule)`). Its class counts are
        used from the next ``setup`` on, also over the counts of a restored checkpoint."""
        if facts.group_class_counts.numel() != self.num_classes:
            raise ConfigError(f"data has {facts.group_class_counts.numel()} classes but "
                              f"model.num_classes={self.num_classes}")
        self.data_facts = facts

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        check_precision(self.trainer.precision)
        facts = self.data_facts
        loss_counts = None
        if facts is not None:
            self.class_counts.copy_(facts.group_class_counts)
            loss_counts = facts.train_class_counts
            self.data_record = facts.record
            if stage == "fit":
                self.check_upstream_data()
        elif stage == "fit":
            raise ConfigError(f"{type(self).__name__}: no data attached (class counts for the losses, batch size for "
                              "the learning rate): call lpt_lightning.data_facts.connect(model, datamodule) before "
                              "trainer.fit (lpt does it)")
        self.taxonomy = facts.taxonomy if facts is not None else None
        self.val_accuracy = eval_metrics(self.class_counts.cpu(), self.split_convention, self.taxonomy)
        self.test_accuracy = eval_metrics(self.class_counts.cpu(), self.split_convention, self.taxonomy)
        self.prior_shift = prior_shift_metrics(self.class_counts.cpu(), self.test_priors, ("val", "test"))
        if stage == "fit":
            counts = loss_counts if loss_counts is not None else self.class_counts.cpu()
            self.stream_losses = nn.ModuleDict({s: self._make_loss(s, counts) for s in ("cb", "ib", "sqrt")})

    def _make_loss(self, stream: str, counts: torch.Tensor) -> nn.Module:
        """The loss of one stream; its prior is the real training counts (after any held-out carving)."""
        spec = self.loss_spec
        if spec.kind in ("logit_adjusted", "ce"):
            return LogitAdjustedCE(counts, tau=spec.tau if spec.kind == "logit_adjusted" else 0.0, scale=spec.scale)
        gamma_pos, gamma_neg = spec.class_balanced_gammas if stream == "cb" else spec.instance_gammas
        return AGCLLoss(counts, scale=spec.scale, margin=spec.margin, beta=spec.beta, gamma_pos=gamma_pos,
                        gamma_neg=gamma_neg, smoothing=spec.smoothing)

    def on_fit_start(self) -> None:
        if self.expert.spec.backbone_dtype != "float32" and "mixed" not in str(self.trainer.precision):
            raise ConfigError(f"expert.backbone_dtype={self.expert.spec.backbone_dtype} needs a mixed trainer "
                              f"precision (bf16-mixed), not {self.trainer.precision}")
        rank_zero_info(self.parameter_report())

    def configure_model(self) -> None:
        # After setup, on every rank: nn.Module.compile compiles the expert in place, so parameter
        # names, checkpoints and DDP see the same module as in eager mode.
        if self.compile_expert and getattr(self.expert, "_compiled_call_impl", None) is None:
            if self.device.type == "cpu":
                check_cpu_compiler()
            self.expert.compile()

    # ----------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.compile_expert and not self._compile_reported:
            self._first_step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.compile_expert and not self._compile_reported:
            # Compiling happens on the host during the first forward and backward: the step's wall
            # time is the compile time (the device's share is negligible beside it).
            seconds = time.perf_counter() - self._first_step_started
            rank_zero_info(f"model.compile: the first training step took {seconds:.1f} s, compile included "
                           "(later steps reuse the compiled expert)")
            self._compile_reported = True

    def stream_weight(self, stream: str, streams: list[str]) -> float:
        if stream == "ib" and "cb" in streams:
            if self.schedule_steps is not None:
                return instance_weight(self.trainer.global_step, self.schedule_steps, self.loss_spec.instance_weight)
            return instance_weight(self.current_epoch, self.trainer.max_epochs, self.loss_spec.instance_weight)
        return 1.0

    def stream_loss(self, stream: str, out: ExpertOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {"cls": self.stream_losses[stream](out.logits, labels)}
        if out.match is not None:
            terms["match"] = matching_loss(out.query, self.expert.group_prompts.keys, out.match.indices)
        return terms

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        streams = list(batch)
        sizes = [batch[s]["label"].shape[0] for s in streams]
        # One forward over all streams: fewer, larger matmuls than a pass per stream.
        out = self.expert(torch.cat([batch[s]["image"] for s in streams]))
        total = out.logits.new_zeros(())
        offset = 0
        for stream, size in zip(streams, sizes):
            part = _slice_output(out, offset, size)
            offset += size
            terms = self.stream_loss(stream, part, batch[stream]["label"])
            term = terms["cls"] + self.loss_spec.match_weight * terms.get("match", 0.0)
            total = total + self.stream_weight(stream, streams) * term
            for name, value in terms.items():
                self.log(f"train/{name}_{stream}", value.detach(), batch_size=size)
        penalty = self.head_penalty()
        if penalty is not None:
            total = total + penalty
            self.log("train/head_anchor", penalty.detach())
        # A non-finite loss is the NonFiniteLossPolicy callback's to handle (stop or skip).
        # Not in the progress bar: Lightning turns progress-bar values into numbers after every batch
        # (a host sync per step); loggers and LogLines read it at log_every_n_steps.
        self.log("train/loss", total.detach(), batch_size=sum(sizes))
        return total

    def head_penalty(self) -> torch.Tensor | None:
        """An extra term on the head (AdaptPhase: ``loss.head_anchor``); None = none."""
        return None

    # ----------------------------------------------------------------- evaluation
    def _eval_step(self, batch: dict[str, torch.Tensor], metric: EvalMetrics, stage: str) -> None:
        probs = self.probabilities(batch["image"])
        metric.update(probs, batch["label"])
        if stage in self.prior_shift:
            self.prior_shift[stage].update(probs, batch["label"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_accuracy, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_accuracy, "test")

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities [B, C]: the softmax of the scaled cosine logits (averaged over the
        test-time views of images [B, V, 3, S, S])."""
        logits, _ = view_outputs(self.expert, images, self.loss_spec.scale)
        return torch.softmax(self.loss_spec.scale * logits, dim=-1)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"index": batch["index"], "probs": self.probabilities(batch["image"])}

    def _log_split_accuracy(self, stage: str, metric: EvalMetrics) -> None:
        result = metric.compute()  # states already summed over ranks: identical everywhere
        metric.reset()
        # A labelled row (e.g. phase 1's "no training" row) is kept and logged beside the trained one.
        row, prefix = (f"{stage}: {self.eval_row}", f"{self.eval_row.replace(' ', '_')}/") if self.eval_row else (stage, "")
        self.results[row] = row_values(result) | taxonomy_values(result)
        values = log_values(self.results[row]) | taxonomy_log_values(self.results[row])
        self.log_dict({f"{prefix}{stage}/{k}": v for k, v in values.items()}, sync_dist=False)
        if stage in self.prior_shift:  # a test row takes tau from the val row of the same model
            val_row = row.replace("test", "val", 1) if stage == "test" else None
            record_prior_shift(self.results, row, self.prior_shift[stage], val_row, self.test_priors)

    def on_validation_epoch_end(self) -> None:
        self._log_split_accuracy("val", self.val_accuracy)

    def on_test_epoch_end(self) -> None:
        self._log_split_accuracy("test", self.test_accuracy)

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        spec = self.optim_spec
        if self.data_facts is None:
            raise ConfigError("the learning rate scales with the batch size of the data: attach it first "
                              "(lpt_lightning.data_facts.connect(model, datamodule))")
        global_batch = self.data_facts.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
        lr = spec.base_lr * global_batch / 256
        head = {id(p) for p in self.expert.head.parameters()}
        params = self.trainable_parameters()
        groups = [{"params": [p for p in params if id(p) not in head]},
                  {"params": [p for p in params if id(p) in head], "lr": lr * spec.head_lr_scale}]
        optimizer = torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=spec.momentum,
                                    weight_decay=spec.weight_decay)
        steps = self._scheduled_steps()
        self.schedule_steps = steps[0] if steps is not None else None
        if steps is None:  # bounded by max_epochs >= 2: SPEC 4's per-epoch schedule
            scheduler = _cosine_scheduler(optimizer, t_initial=max(self.trainer.max_epochs or 1, 1),
                                          lr_min=spec.min_lr, warmup_t=spec.warmup_epochs,
                                          warmup_lr_init=spec.warmup_lr, t_in_epochs=True)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        total, warmup = steps
        scheduler = _cosine_scheduler(optimizer, t_initial=total, lr_min=spec.min_lr, warmup_t=warmup,
                                      warmup_lr_init=spec.warmup_lr, t_in_epochs=False)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _scheduled_steps(self) -> tuple[int, int] | None:
        """(optimizer steps of the run, warm-up steps) for a run bounded by steps or by one epoch;
        None for a run bounded by ``max_epochs >= 2`` (scheduled per epoch, unchanged)."""
        trainer = self.trainer
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        max_steps = getattr(trainer, "max_steps", -1)
        max_steps = -1 if max_steps is None else max_steps
        warmup_epochs = self.optim_spec.warmup_epochs
        if max_epochs >= 2 and max_steps == -1:
            if warmup_epochs >= max_epochs:
                raise ConfigError(
                    f"optim.warmup_epochs={warmup_epochs} is as long as the run (trainer.max_epochs={max_epochs}): "
                    "the learning rate would never leave the warm-up; lower optim.warmup_epochs")
            return None
        bound = f"trainer.max_steps={max_steps}" if max_steps != -1 else f"trainer.max_epochs={max_epochs}"
        total = trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ConfigError("the learning-rate schedule needs the run's length: set trainer.max_epochs or "
                              "trainer.max_steps (a run bounded by max_time only has none)")
        total = int(total)
        if total <= 0:
            return None  # no training step (limit_train_batches: 0): nothing to schedule
        warmup = 0
        if warmup_epochs > 0:
            if trainer.train_dataloader is None:
                trainer.fit_loop.setup_data()  # what estimated_stepping_batches does for an epoch bound
            batches = trainer.num_training_batches
            if batches == float("inf"):
                raise ConfigError(f"optim.warmup_epochs={warmup_epochs} cannot be converted to steps: the training "
                                  f"loader has no length ({bound}); set optim.warmup_epochs: 0")
            warmup = warmup_epochs * math.ceil(batches / trainer.accumulate_grad_batches)
            if warmup >= total:
                raise ConfigError(
                    f"optim.warmup_epochs={warmup_epochs} ({warmup} optimizer steps) is as long as the run "
                    f"({bound}: {total} optimizer steps): the learning rate would never leave the warm-up; "
                    "lower optim.warmup_epochs (0 = none) or lengthen the run")
        return total, warmup

    def on_train_start(self) -> None:
        # A resumed run starts from the lr of its own schedule at the restored position, not the
        # checkpoint's last lr (another schedule's, e.g. a run bounded by steps resumed by epochs).
        # A fresh run per epoch is untouched (bit-identical to SPEC 4's schedule).
        scheduler = self.lr_schedulers()
        if scheduler is None or isinstance(scheduler, list):
            return
        if not scheduler.t_in_epochs:
            scheduler.step_update(num_updates=self.trainer.global_step)
        elif self.trainer.global_step > 0 or self.current_epoch > 0:
            scheduler.step(epoch=self.current_epoch)

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if not scheduler.t_in_epochs:
            # Per step: Lightning calls this after each optimizer step; global_step steps are done.
            scheduler.step_update(num_updates=self.trainer.global_step)
            return
        # timm schedulers are indexed by epoch; Lightning calls this at the end of an epoch.
        scheduler.step(epoch=self.current_epoch + 1)

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_saved_key(k)}
        checkpoint[META_KEY] = self.metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = {k for k in self.state_dict() if is_saved_key(k)}
        missing = sorted(expected - set(checkpoint.get("state_dict", {})))
        if missing:
            raise CheckpointError(
                f"checkpoint lacks {len(missing)} trained tensors of this {self.phase_name} model "
                f"(e.g. {missing[0]}): it was written by another phase or model configuration"
            )
        # The frozen backbone is rebuilt, not saved: its own tensors complete the state, so the
        # load is exact without a warning listing every backbone key.
        for key, value in self.state_dict().items():
            if not is_saved_key(key):
                checkpoint["state_dict"].setdefault(key, value)
        # Class counts describe the attached data (setup copied them before the restore): keep them,
        # so reports agree with the split metrics, also for checkpoints without real counts
        # (`lpt convert`).
        if self.data_facts is not None:
            checkpoint["state_dict"]["class_counts"] = self.class_counts.clone()

    def train(self, mode: bool = True) -> "ExpertPhase":
        super().train(mode)
        # Frozen parts stay in eval mode (no adapter dropout), so phase 2's frozen prefix is
        # deterministic and equals what phase 1 computes at evaluation.
        for module in self.frozen_modules():
            module.eval()
        return self

    def frozen_modules(self) -> list[nn.Module]:
        return [self.expert.backbone]


def check_cpu_compiler() -> None:
    """Inductor's CPU backend builds C++ kernels: say so up front, not at the first step."""
    from torch._inductor import config, cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as error:
        raise ConfigError(f"model.compile: true on the CPU needs a C++ compiler for torch.compile's inductor backend "
                          f"(looked for {[c for c in config.cpp.cxx if c]}): install g++ (Debian: apt-get install g++) or set "
                          "model.compile: false") from error


def _cosine_scheduler(optimizer: torch.optim.Optimizer, **kwargs: Any):
    """timm's ``CosineLRScheduler``, whose saved state a resumed run restores only where it fits.

    The schedule is a function of the epoch or step Lightning restores. A run scheduled per step
    keeps the length it is configured with now; a run scheduled per epoch restores an epoch
    schedule's state as before, never a per-step one (a checkpoint of a run bounded by steps).
    """
    from timm.scheduler import CosineLRScheduler

    class RunCosineScheduler(CosineLRScheduler):
        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            if self.t_in_epochs and state_dict.get("t_in_epochs", True):
                super().load_state_dict(state_dict)

    return RunCosineScheduler(optimizer, **kwargs)


def instance_weight(epoch: int, max_epochs: int | None, eta_max: float) -> float:
    """eta(e) = eta_max (E - e) / E: the instance batch's weight beside a class-balanced one (SPEC 4).

    ``epoch``/``max_epochs`` are optimizer steps in a run scheduled per step. Clamped to
    [0, eta_max] (never a negative weight, i.e. gradient ascent, past the end)."""
    epochs = max(max_epochs or 1, 1)
    return min(max(eta_max * (epochs - epoch) / epochs, 0.0), eta_max)


def _slice_output(out: ExpertOutput, start: int, size: int) -> ExpertOutput:
    s = slice(start, start + size)
    match = None
    if out.match is not None:
        m = out.match
        match = type(m)(prompts=m.prompts[s], indices=m.indices[s], similarity=m.similarity[s])
    return ExpertOutput(logits=out.logits[s], features=out.features[s], query=out.query[s], match=match)
