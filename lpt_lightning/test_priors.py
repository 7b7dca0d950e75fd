"""Accuracy under other test class distributions, with post-hoc logit adjustment (issue 25, item 4).

The SADE / BalPoE protocol: classes ranked by training count, most frequent first; a *forward*
long-tailed test distribution with imbalance rho gives class rank i (0-based, of C) the prior
pi(i) ∝ rho^(-i/(C-1)), a *backward* one the same in the reverse order, and *uniform* is the
balanced test set itself. Instead of resampling the test set, each figure is computed exactly:
the per-class recall on the test set weighted by the target prior (classes with no test sample
are left out and the prior renormalised over the rest), in percent.

Post-hoc logit adjustment for a target prior: score = log p(y|x) - tau (log pi_train(y) -
log pi_target(y)), tau from `TAU_GRID` (tau 0 = no adjustment), chosen on the held-out (val) split
re-weighted to the same prior, then reported on test; never chosen on test.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lpt_lightning.errors import ConfigError
from lpt_lightning.metrics import as_count_vector

__all__ = ["DEFAULT_IMBALANCES", "TAU_GRID", "PriorShiftAccuracy", "TestPriors", "imbalance_factors",
           "plot_test_priors", "prior_block", "prior_names", "prior_shift_metrics", "record_prior_shift",
           "select_tau", "target_priors", "tau_tuning_allowed"]

DEFAULT_IMBALANCES: tuple[float, ...] = (2, 5, 10, 25, 50)
TAU_GRID: tuple[float, ...] = tuple(0.25 * i for i in range(9))  # 0, 0.25, ..., 2.0
GRID_KEY = "test_priors_grid"  # a row's [priors, taus] accuracies (kept in memory, not written)
BLOCK_KEY = "test_priors"  # a test row's figures, written to metrics.json
_MIN_PROB = 1e-12  # log of a probability that underflowed to 0


@dataclass(frozen=True)
class TestPriors:
    """What `--report.test_priors` asks of a phase: the imbalance factors, and whether tau may be
    tuned on the val split (not when val or test is served by the other split)."""

    __test__ = False  # not a pytest class

    factors: tuple[float, ...]
    tune_tau: bool = True


def imbalance_factors(option: bool | Sequence[float] | None, where: str = "report.test_priors"
                      ) -> tuple[float, ...] | None:
    """The option's imbalance factors: None / false = off, true = `DEFAULT_IMBALANCES`."""
    if option is None or option is False:
        return None
    if option is True:
        return DEFAULT_IMBALANCES
    factors = tuple(sorted({float(f) for f in option}))
    if not factors or any(not math.isfinite(f) or f <= 1 for f in factors):
        raise ConfigError(f"{where}={list(option)}: give imbalance factors > 1 (e.g. [2, 5, 10, 25, 50]), or true "
                          "for those; the uniform test distribution is always included")
    return factors


def tau_tuning_allowed(datamodule: Any) -> bool:
    """True only where val is a split of its own beside the test split
    (`LongTailDataModule.val_is_held_out`): never where val reports test (``data.val_from_test``)
    or serves as test, nor for data that does not say."""
    return bool(getattr(datamodule, "val_is_held_out", False))


def prior_names(factors: Sequence[float]) -> list[str]:
    """backward_50 ... backward_2, uniform, forward_2 ... forward_50: the order of the plot's x axis."""
    factors = sorted(factors)
    return [*(f"backward_{f:g}" for f in reversed(factors)), "uniform", *(f"forward_{f:g}" for f in factors)]


def target_priors(train_counts: Tensor | Sequence[int], factors: Sequence[float]) -> dict[str, Tensor]:
    """{name: prior [C] (float64, sums to 1)} in `prior_names` order."""
    counts = as_count_vector(train_counts, name="train_counts", min_count=0, min_classes=2)
    c = counts.numel()
    # Ties in the training counts are ranked by class index (a stable sort), so the priors are
    # defined for any counts and the same in every run.
    order = torch.sort(-counts, stable=True).indices
    rank = torch.empty(c, dtype=torch.float64)
    rank[order] = torch.arange(c, dtype=torch.float64)
    priors = {}
    for name in prior_names(factors):
        if name == "uniform":
            weights = torch.ones(c, dtype=torch.float64)
        else:
            direction, rho = name.split("_")
            position = rank if direction == "forward" else (c - 1) - rank
            weights = float(rho) ** (-position / (c - 1))
        priors[name] = weights / weights.sum()
    return priors


class PriorShiftAccuracy(Metric):
    """Top-1 correct counts per (target prior, tau, class) of logit-adjusted predictions.

    States are integer per-class counts (sum reduction), so the DDP result is exactly the
    single-process one. Out-of-range labels are skipped here (EvalMetrics, updated beside it,
    refuses them). `update(probs, target)`: probs [B, C] class probabilities.
    `compute()` -> {"acc": [P, T] float64}: the test accuracy (%) re-weighted to each prior, per tau.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, train_counts: Tensor | Sequence[int], factors: Sequence[float] = DEFAULT_IMBALANCES,
                 taus: Sequence[float] = TAU_GRID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not taus or taus[0] != 0:
            raise ConfigError(f"PriorShiftAccuracy: the tau grid must start at 0 (no adjustment), got {list(taus)}")
        priors = target_priors(train_counts, factors)
        self.names, self.taus = list(priors), [float(t) for t in taus]
        self.num_classes = next(iter(priors.values())).numel()
        prior = torch.stack(list(priors.values()))  # [P, C]
        log_train = torch.log(as_count_vector(train_counts, name="train_counts", min_count=0).clamp(min=1))
        log_train = log_train - torch.logsumexp(log_train, 0)
        tau = torch.tensor(self.taus, dtype=torch.float64)
        # Subtracted from log p: tau (log pi_train - log pi_target), [P * T, C].
        offsets = tau[None, :, None] * (log_train[None, None] - prior.log()[:, None])
        self.register_buffer("prior", prior, persistent=False)
        self.register_buffer("offsets", offsets.reshape(-1, self.num_classes), persistent=False)
        k = len(self.names) * len(self.taus)
        self.add_state("correct", default=torch.zeros(k * self.num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        target = target.reshape(-1).long()
        valid = (target >= 0) & (target < self.num_classes)
        safe = torch.where(valid, target, 0)
        self.total.scatter_add_(0, safe, valid.long())
        # float64: distinct float32 probabilities keep distinct logs, so tau 0 predicts argmax p exactly.
        log_p = probs.double().clamp_min(_MIN_PROB).log()
        labels = torch.stack([(log_p - offset).argmax(1) for offset in self.offsets])  # [P * T, B]
        hits = (labels == safe[None]) & valid[None]
        index = torch.arange(len(self.offsets), device=safe.device)[:, None] * self.num_classes + safe[None]
        self.correct.scatter_add_(0, index.reshape(-1), hits.reshape(-1).long())

    def compute(self) -> dict[str, Tensor]:
        correct = self.correct.view(len(self.names), len(self.taus), self.num_classes).double()
        tested = self.total > 0
        recall = correct / self.total.clamp(min=1).double()
        weights = torch.where(tested, self.prior, torch.zeros_like(self.prior))
        weights = weights / weights.sum(1, keepdim=True)  # NaN when no class was tested
        return {"acc": 100 * (recall * weights[:, None]).sum(-1)}


def select_tau(val_acc: Tensor) -> Tensor:
    """Per prior, the index of the tau with the best val accuracy; a tie goes to the smaller tau,
    an undefined (NaN) accuracy to none (index 0)."""
    return val_acc.nan_to_num(-math.inf).argmax(dim=1)


def _rounded(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 4)


def prior_block(names: Sequence[str], taus: Sequence[float], test_acc: Tensor, val_acc: Tensor | None,
                val_row: str | None) -> dict[str, Any]:
    """A test row's figures: per prior `acc` (no adjustment), `acc_la` (adjusted with the tau
    chosen on ``val_acc``) and that `tau`; without a val row, tau = 0 (not tuned, said by
    `tau_chosen_on` = None)."""
    chosen = select_tau(val_acc) if val_acc is not None else torch.zeros(len(names), dtype=torch.long)
    return {"tau_chosen_on": val_row if val_acc is not None else None,
            "priors": {name: {"acc": _rounded(test_acc[p, 0]), "acc_la": _rounded(test_acc[p, int(chosen[p])]),
                              "tau": taus[int(chosen[p])]} for p, name in enumerate(names)}}


def prior_shift_metrics(train_counts: Tensor, request: TestPriors | None, keys: Sequence[str]) -> nn.ModuleDict:
    """One PriorShiftAccuracy per evaluated row key, or none when not asked. ``train_counts``: the
    dataset's training counts (those of the many/medium/few groups, the same for every phase's
    rows): they rank the classes and are pi_train."""
    if request is None:
        return nn.ModuleDict()
    return nn.ModuleDict({key: PriorShiftAccuracy(train_counts, request.factors) for key in keys})


def record_prior_shift(results: dict[str, dict[str, Any]], row: str, metric: PriorShiftAccuracy,
                       val_row: str | None, request: TestPriors) -> None:
    """Put the metric's accuracies into ``results[row]`` (and reset it); for a test row (``val_row``
    given) also its `BLOCK_KEY` figures, tau chosen on that val row when it was evaluated with the
    same priors and tuning is allowed."""
    grid = metric.compute()["acc"].cpu()
    metric.reset()
    results[row][GRID_KEY] = grid
    if val_row is None:
        return
    val_grid = results.get(val_row, {}).get(GRID_KEY) if request.tune_tau else None
    if val_grid is not None and val_grid.shape != grid.shape:
        val_grid = None  # evaluated with other priors
    results[row][BLOCK_KEY] = prior_block(metric.names, metric.taus, grid, val_grid, val_row)


def plot_test_priors(path, results: Mapping[str, Mapping[str, Any]], title: str) -> bool:
    """Accuracy against the test distribution (backward ... uniform ... forward) per row that has
    `BLOCK_KEY` figures: solid without, dashed with logit adjustment. False when no row has them."""
    rows = {row: v[BLOCK_KEY]["priors"] for row, v in results.items() if BLOCK_KEY in v}
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lpt_lightning.checkpoints.files import atomic_save

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row, priors in rows.items():
        names = list(priors)
        x = range(len(names))
        line, = ax.plot(x, [priors[n]["acc"] for n in names], marker="o", ms=3, label=row)
        ax.plot(x, [priors[n]["acc_la"] for n in names], ls="--", marker="x", ms=3, color=line.get_color())
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=45, fontsize=7)
    ax.set_xlabel("test class distribution (imbalance; backward = tail classes frequent)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{title} (dashed: post-hoc logit adjustment, tau chosen on val)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save(lambda tmp: fig.savefig(tmp, dpi=110, format="png"), path)
    plt.close(fig)
    return True
