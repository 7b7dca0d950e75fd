"""Losses of LPT / LPT++ (SPEC section 3).

All classification losses take COSINE logits z in [-1, 1] of shape [B, C]; the scale s lives
here, not in the head. Class counts are the per-class TRAINING counts n_c (all >= 1).

- GCL perturbation (Keke921/GCLLoss): z~ = z - beta * |eps| * delta, eps ~ N(0, 1/3) clamped
  to [-1, 1]; then margin m off the target logit only; then scale by s.
- A-GCL (DongSky/LPT phase-2 loss): asymmetric (focal-style) weights on label-smoothed CE.
- Matching loss between query features and prompt keys.
- Logit-adjusted CE, for ablations.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lpt_lightning.errors import ConfigError
from lpt_lightning.metrics import as_count_vector

__all__ = [
    "AGCL_GAMMAS_CLASS_BALANCED",
    "AGCL_GAMMAS_INSTANCE",
    "GCL_NOISE_STD",
    "AGCLLoss",
    "LogitAdjustedCE",
    "as_class_counts",
    "gcl_class_offsets",
    "gcl_logits",
    "matching_loss",
    "sample_gcl_noise",
]

# (gamma_pos, gamma_neg) of A-GCL for the two batches of dual sampling (ref).
AGCL_GAMMAS_CLASS_BALANCED: tuple[float, float] = (0.0, 4.0)
AGCL_GAMMAS_INSTANCE: tuple[float, float] = (0.5, 8.0)

# The reference samples torch.distributions.Normal(0, 1/3): the second argument is the std.
GCL_NOISE_STD: float = 1.0 / 3.0


def as_class_counts(class_counts: Tensor | Sequence[float], *, min_classes: int = 1) -> Tensor:
    """Validate per-class training counts (every class >= 1 image) as a float64 CPU tensor [C]."""
    return as_count_vector(class_counts, name="class_counts", min_count=1, min_classes=min_classes,
                           hint="; drop empty classes or fix the annotation file")


def gcl_class_offsets(class_counts: Tensor | Sequence[float]) -> Tensor:
    """delta_c = (log n_max - log n_c) / (log n_max - log n_min), float32 [C] in [0, 1].

    0 for the head class, 1 for the rarest class; all-equal counts give zeros (the reference
    would divide by zero there).
    """
    log_n = as_class_counts(class_counts).log()
    gap = log_n.max() - log_n
    span = gap.max()
    if span <= 0:
        return torch.zeros_like(gap, dtype=torch.float32)
    return (gap / span).to(torch.float32)


def sample_gcl_noise(
    shape: Sequence[int] | torch.Size,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """eps ~ Normal(0, std=1/3), clamped to [-1, 1] (about 0.3% of draws are clipped).

    With a generator, draws happen on the generator's device (so a CPU generator stays
    reproducible) and are then moved to `device`.
    """
    gen_device = generator.device if generator is not None else (device or "cpu")
    eps = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype)
    eps = (eps * GCL_NOISE_STD).clamp_(-1.0, 1.0)
    return eps if device is None else eps.to(device)


def _at_least_fp32(x: Tensor) -> Tensor:
    # Losses run in float32 (or float64 if given) even under mixed precision.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def one_hot(targets: Tensor, num_classes: int) -> Tensor:
    """Bool [B, C]; F.one_hot reads the labels' min and max on the host (a device sync per step)."""
    return targets.long().unsqueeze(1) == torch.arange(num_classes, device=targets.device)


def gcl_logits(
    z: Tensor,
    targets: Tensor,
    offsets: Tensor,
    noise: Tensor | None,
    beta: float,
    margin: float,
    scale: float,
) -> Tensor:
    """Scaled GCL logits s * (z - beta*|eps|*delta - m*onehot(y)).

    `noise=None` skips the Gaussian perturbation (margin and scale still apply). Computed in
    float32 (float64 if given) so the loss is stable under mixed precision.
    """
    if z.dim() != 2:
        raise ConfigError(f"cosine logits must be [B, C], got shape {tuple(z.shape)}")
    x = _at_least_fp32(z)
    if noise is not None:
        if noise.shape != z.shape:
            raise ConfigError(f"GCL noise shape {tuple(noise.shape)} != logits shape {tuple(z.shape)}")
        # Rare classes (delta -> 1) get their logits pushed down the most: a larger implicit margin.
        x = x - beta * noise.to(x).abs() * offsets.to(x).unsqueeze(0)
    if margin != 0:
        x = x - margin * one_hot(targets, x.shape[1]).to(x)
    return scale * x


class AGCLLoss(nn.Module):
    """Asymmetric GCL loss of LPT (label smoothing + asymmetric focusing on the GCL logits).

    With p = softmax(s z~) and smoothed targets t = (1 - smoothing) onehot + smoothing / C:
        w_y = (1 - p_y) ** gamma_pos,   w_c = p_c ** gamma_neg  (c != y)   -- not detached
        loss = - mean_b sum_c t_c w_c log p_c
    Presets: AGCL_GAMMAS_CLASS_BALANCED = (0, 4), AGCL_GAMMAS_INSTANCE = (0.5, 8).

    Noise: `forward(..., noise=None)` samples fresh eps in training mode and applies none in eval
    mode (deterministic validation loss); an explicit `noise` is always used. `perturb=False`
    disables the perturbation entirely. The margin applies in both modes.
    """

    def __init__(
        self,
        class_counts: Tensor | Sequence[float],
        scale: float = 20.0,
        margin: float = 0.1,
        beta: float = 0.5,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        smoothing: float = 0.1,
        perturb: bool = True,
    ) -> None:
        super().__init__()
        counts = as_class_counts(class_counts, min_classes=2)
        if scale <= 0:
            raise ConfigError(f"AGCLLoss scale must be > 0, got {scale}")
        if gamma_pos < 0 or gamma_neg < 0:
            raise ConfigError(f"AGCLLoss gammas must be >= 0, got gamma_pos={gamma_pos}, gamma_neg={gamma_neg}")
        if not 0.0 <= smoothing < 1.0:
            raise ConfigError(f"AGCLLoss smoothing must be in [0, 1), got {smoothing}")
        if beta < 0:
            raise ConfigError(f"AGCLLoss beta must be >= 0, got {beta}")
        self.scale, self.margin, self.beta = float(scale), float(margin), float(beta)
        self.gamma_pos, self.gamma_neg = float(gamma_pos), float(gamma_neg)
        self.smoothing, self.perturb = float(smoothing), bool(perturb)
        # Non-persistent: derived from the dataset at construction, kept out of checkpoints.
        self.register_buffer("class_counts", counts.to(torch.float32), persistent=False)
        self.register_buffer("offsets", gcl_class_offsets(counts), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.class_counts.numel()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, scale={self.scale}, margin={self.margin}, beta={self.beta}, "
            f"gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, smoothing={self.smoothing}, "
            f"perturb={self.perturb}"
        )

    def forward(self, cos_logits: Tensor, targets: Tensor, noise: Tensor | None = None) -> Tensor:
        if cos_logits.dim() != 2 or cos_logits.shape[1] != self.num_classes:
            raise ConfigError(
                f"AGCLLoss expects cosine logits [B, {self.num_classes}], got {tuple(cos_logits.shape)}"
            )
        if not self.perturb:
            noise = None
        elif noise is None and self.training:
            noise = sample_gcl_noise(cos_logits.shape, device=cos_logits.device)
        x = gcl_logits(cos_logits, targets, self.offsets, noise, self.beta, self.margin, self.scale)
        is_target = one_hot(targets, self.num_classes)
        onehot = is_target.to(x)
        log_p = F.log_softmax(x, dim=-1)
        # log of the focusing base: log(1 - p_y) for the target, log p_c elsewhere. log(1 - p_y)
        # = logsumexp over the non-target logits - logsumexp over all: finite even when p_y
        # rounds to 1, where (1 - p_y) ** 0.5 would have an infinite gradient.
        log_not_y = x.masked_fill(is_target, float("-inf")).logsumexp(-1) - x.logsumexp(-1)
        log_base = torch.where(is_target, log_not_y.unsqueeze(1), log_p)
        gamma = self.gamma_pos * onehot + self.gamma_neg * (1.0 - onehot)
        weights = torch.exp(gamma * log_base)  # == base ** gamma; gradient flows through it
        t = onehot * (1.0 - self.smoothing) + self.smoothing / self.num_classes
        return -(t * weights * log_p).sum(-1).mean()


def matching_loss(query: Tensor, keys: Tensor, topk_indices: Tensor) -> Tensor:
    """L = -(1/B) sum_b sum_{i in topk(b)} cos(q_b, k_i).

    query [B, d], keys [m, d], topk_indices [B, k] (long). Gradient reaches both query and keys;
    detach the query at the call site so only the keys learn from it.
    """
    if query.dim() != 2 or keys.dim() != 2 or query.shape[1] != keys.shape[1]:
        raise ConfigError(f"matching_loss needs query [B, d] and keys [m, d], got {tuple(query.shape)} / {tuple(keys.shape)}")
    if topk_indices.dim() != 2 or topk_indices.shape[0] != query.shape[0]:
        raise ConfigError(f"topk_indices must be [B, k] with B={query.shape[0]}, got {tuple(topk_indices.shape)}")
    dtype = torch.promote_types(torch.promote_types(query.dtype, keys.dtype), torch.float32)
    with torch.autocast(device_type=query.device.type, enabled=False):  # keep the cosine in fp32 under AMP
        cos = F.normalize(query.to(dtype), dim=-1) @ F.normalize(keys.to(dtype), dim=-1).t()  # [B, m]
    return -cos.gather(1, topk_indices.long()).sum(1).mean()


class LogitAdjustedCE(nn.Module):
    """Cross-entropy on s * z + tau * log(prior), prior_c = n_c / sum n (logit adjustment)."""

    def __init__(self, class_counts: Tensor | Sequence[float], tau: float = 1.0, scale: float = 20.0) -> None:
        super().__init__()
        counts = as_class_counts(class_counts, min_classes=2)
        if scale <= 0:
            raise ConfigError(f"LogitAdjustedCE scale must be > 0, got {scale}")
        self.tau, self.scale = float(tau), float(scale)
        self.register_buffer("log_prior", (counts / counts.sum()).log().to(torch.float32), persistent=False)

    def extra_repr(self) -> str:
        return f"num_classes={self.log_prior.numel()}, tau={self.tau}, scale={self.scale}"

    def forward(self, cos_logits: Tensor, targets: Tensor, noise: Tensor | None = None) -> Tensor:
        # `noise` is accepted (and ignored) so the phases can swap this in for AGCLLoss.
        if cos_logits.dim() != 2 or cos_logits.shape[1] != self.log_prior.numel():
            raise ConfigError(
                f"LogitAdjustedCE expects cosine logits [B, {self.log_prior.numel()}], got {tuple(cos_logits.shape)}"
            )
        x = self.scale * _at_least_fp32(cos_logits)
        x = x + self.tau * self.log_prior.to(x.dtype)
        return F.cross_entropy(x, targets.long())
