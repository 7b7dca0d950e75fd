"""Shared benchmark machinery: device and precision, interleaved timing, peak memory, FLOP counting,
ViT-B/16-shaped phase modules built from the real lpt_lightning classes.

Everything here measures the library's own code paths (``ExpertPhase.training_step``,
``LongTailExpert.forward``, ``MoEScorerPhase.forward`` / ``training_step``); the only things the
benchmarks replace are Lightning's trainer services (logging, the epoch counter), which a bare
step does not have.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never contact the hub
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Places-LT is the headline benchmark: its class count is the default head size.
PLACES_LT_CLASSES = 365
INAT_CLASSES = 8142


# --------------------------------------------------------------------------------------------
# Device and precision


@dataclass
class Env:
    device: torch.device
    precision: str  # "fp32" | "bf16-mixed"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)


def make_env(device: str, precision: str | None) -> Env:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if precision is None:
        # bf16 matmuls on this class of CPU are hundreds of times slower than fp32: fp32 there.
        precision = "bf16-mixed" if dev.type == "cuda" else "fp32"
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Env(dev, precision)


def machine_info(env: Env) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(env.device),
        "precision": env.precision,
    }
    if env.is_cuda:
        info["gpu"] = torch.cuda.get_device_name(env.device)
    try:
        import timm
        import open_clip

        info["timm"], info["open_clip"] = timm.__version__, open_clip.__version__
    except ImportError:
        pass
    return info


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# Timing


def time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int, env: Env) -> dict[str, list[float]]:
    """Wall-clock seconds of each function, ``rounds`` times, interleaved round-robin.

    Candidates run side by side (A, B, C, then B, C, A, ...) so that load from other processes
    hits all of them alike; the caller takes medians and per-round (paired) ratios.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    env.sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            env.sync()
            t0 = time.perf_counter()
            fns[name]()
            env.sync()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: list[float]) -> tuple[float, float]:
    return float(min(xs)), float(max(xs))


def paired_ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """Median, min and max over rounds of num[r] / den[r] (both timed in the same round)."""
    ratios = [a / b for a, b in zip(num, den)]
    return {"median": median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


# --------------------------------------------------------------------------------------------
# Peak memory


class _CpuTensorMemory(TorchDispatchMode):
    """Bytes of live tensor storage on the CPU, and its peak, while the mode is active.

    Every storage an operator returns is counted once, until it is freed (weakref finaliser).
    ``baseline`` tensors (weights, optimizer state, inputs) are counted from the start. This is
    the CPU counterpart of ``torch.cuda.max_memory_allocated``: tensor bytes, without allocator
    caching and without kernel-internal scratch buffers.
    """

    def __init__(self, baseline: list[torch.Tensor]):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0
        for t in baseline:
            self._track(t)
        self.baseline = self.current

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu" or t.is_meta:
            return
        st = t.untyped_storage()
        if st in self._seen:
            return
        nbytes = st.nbytes()
        self._seen[st] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def tensors_of(*objs: Any) -> list[torch.Tensor]:
    """Parameters, buffers, gradients and optimizer state of modules / optimizers / tensors."""
    out: list[torch.Tensor] = []
    for obj in objs:
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                out.append(p)
                if p.grad is not None:
                    out.append(p.grad)
            out.extend(obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                out.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        elif isinstance(obj, torch.Tensor):
            out.append(obj)
        elif isinstance(obj, dict):
            out.extend(tensors_of(*obj.values()))
        elif isinstance(obj, (list, tuple)):
            out.extend(tensors_of(*obj))
    return out


def peak_memory(fn: Callable[[], Any], env: Env, baseline: list[torch.Tensor]) -> dict[str, float]:
    """Peak tensor memory (GiB) of one call of ``fn``: total and above the resident baseline."""
    if env.is_cuda:
        env.sync()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(env.device)
        torch.cuda.reset_peak_memory_stats(env.device)
        fn()
        env.sync()
        peak = torch.cuda.max_memory_allocated(env.device)
    else:
        with _CpuTensorMemory(baseline) as mem:
            fn()
        base, peak = mem.baseline, mem.peak
    gib = 2.0 ** 30
    return {"peak_gib": peak / gib, "above_baseline_gib": (peak - base) / gib, "baseline_gib": base / gib}


# --------------------------------------------------------------------------------------------
# FLOPs


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                        out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _native_mha_flops(query_shape, key_shape, value_shape, embed_dim, num_head, *args, out_shape=None,
                      **kwargs) -> int:
    """nn.MultiheadAttention's fused fast path (open_clip towers without gradient): in-projection,
    attention and out-projection, which the fused kernel hides from the counter."""
    b, n, d = query_shape
    s = key_shape[1]
    proj = 2 * b * n * d * 3 * d + 2 * b * n * d * d
    attention = 2 * b * n * s * d * 2
    return proj + attention


def flop_counter():
    """FlopCounterMode that also counts the CPU flash-attention kernels and the fused
    multi-head-attention fast path (neither is in torch's table)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {aten._native_multi_head_attention: _native_mha_flops}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_attention_flops
        custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_attention_backward_flops
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    # Totals only: the per-module tracker trips over views of prompt parameters taken under no_grad.
    counter.mod_tracker = _GlobalOnly()
    return counter


class _GlobalOnly:
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def matmul_peak(env: Env, quick: bool = False) -> dict[str, Any]:
    """The machine's measured dense-matmul peak in FLOP/s (best of several sizes and runs):
    fp32 on the CPU, bf16 on the GPU (the precision the training steps run in)."""
    dtype = torch.bfloat16 if env.precision == "bf16-mixed" else torch.float32
    sizes = [8192] if env.is_cuda else ([1024, 2048] if quick else [1024, 2048, 3072])
    best = {"flops_per_s": 0.0}
    for n in sizes:
        a = torch.randn(n, n, device=env.device, dtype=dtype)
        b = torch.randn(n, n, device=env.device, dtype=dtype)
        reps = 20 if env.is_cuda else 3
        (a @ b)  # warm-up
        env.sync()
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            env.sync()
            rate = 2 * n ** 3 * reps / (time.perf_counter() - t0)
            if rate > best["flops_per_s"]:
                best = {"flops_per_s": rate, "n": n, "dtype": str(dtype).replace("torch.", "")}
    return best


def matmul_probe(env: Env) -> tuple[Callable[[], None], float]:
    """A fixed dense matmul workload (and its FLOPs) timed in the same rounds as a training step,
    so that MFU is a paired ratio: achieved FLOP/s of the step over the matmul FLOP/s measured
    moments apart, robust to load that comes and goes."""
    dtype = torch.bfloat16 if env.precision == "bf16-mixed" else torch.float32
    n, reps = (8192, 10) if env.is_cuda else (2048, 2)
    a = torch.randn(n, n, device=env.device, dtype=dtype)
    b = torch.randn(n, n, device=env.device, dtype=dtype)

    def probe() -> None:
        for _ in range(reps):
            a @ b

    return probe, 2.0 * n ** 3 * reps


# --------------------------------------------------------------------------------------------
# ViT-B/16-shaped phase modules (random weights, offline)


def class_counts(num_classes: int, n_max: int = 4980, n_min: int = 5) -> torch.Tensor:
    """A Places-LT-like exponential profile (4,980 ... 5 images per class)."""
    from lpt_lightning.data.long_tail import long_tail_counts

    counts = long_tail_counts(n_max, num_classes, n_max / n_min)
    return torch.as_tensor([max(int(c), 1) for c in counts], dtype=torch.long)


def expert_spec(kind: str, adapters: bool = True, model_kwargs: dict[str, Any] | None = None):
    """The reference architecture (SPEC 2) with random weights: timm ViT-B/16 or open_clip ViT-B-16
    (``model_kwargs``: timm architecture overrides, e.g. tiny shapes for a dry run)."""
    from lpt_lightning.models.backbones import BackboneSpec
    from lpt_lightning.models.expert import ExpertSpec

    if kind == "visual":
        # augreg_in21k's architecture
        backbone = BackboneSpec(name="vit_base_patch16_224", pretrained=False, model_kwargs=dict(model_kwargs or {}))
    else:
        backbone = BackboneSpec(name="ViT-B-16", pretrained=None)  # open_clip.create_model, no download
    # head_init random: the text-embedding init of a random text tower costs time and changes nothing here.
    return ExpertSpec(kind=kind, backbone=backbone, adapters=adapters, head_init="random")


def _bare_step_services(module, counts: torch.Tensor, max_epochs: int = 90) -> None:
    """What Lightning's Trainer would supply to ``training_step``: class counts, loss modules, a
    no-op ``log`` and the instance-stream weight eta(0) of a ``max_epochs`` schedule."""
    from lpt_lightning.phases.base import instance_weight

    module.class_counts.copy_(counts)
    module.stream_losses = nn.ModuleDict({s: module._make_loss(s, counts) for s in ("cb", "ib", "sqrt")})
    module.log = lambda *args, **kwargs: None
    eta = instance_weight(0, max_epochs, module.loss_spec.instance_weight)
    module.stream_weight = lambda stream, streams: eta if stream == "ib" and "cb" in streams else 1.0


def build_phase1(kind: str, counts: torch.Tensor, adapters: bool = True, model_kwargs: dict[str, Any] | None = None):
    from lpt_lightning.phases import AdaptPhase

    module = AdaptPhase(expert=expert_spec(kind, adapters, model_kwargs), num_classes=len(counts))
    _bare_step_services(module, counts)
    return module


def save_phase_checkpoint(module, path: Path) -> Path:
    """The hand-over checkpoint a phase writes (trained tensors + ``lpt`` metadata)."""
    from lpt_lightning.checkpoints import META_KEY, is_saved_key

    state = {k: v.detach().cpu() for k, v in module.state_dict().items() if is_saved_key(k)}
    torch.save({"state_dict": state, META_KEY: module.metadata()}, path)
    return path


def build_phase2(phase1_checkpoint: Path, counts: torch.Tensor):
    from lpt_lightning.phases import GroupPromptPhase

    module = GroupPromptPhase(phase1_checkpoint=str(phase1_checkpoint), num_classes=len(counts))
    _bare_step_services(module, counts)
    return module


def build_phase3(visual_checkpoint: Path, vl_checkpoint: Path, counts: torch.Tensor):
    from lpt_lightning.phases import MoEScorerPhase

    module = MoEScorerPhase(visual_checkpoint=str(visual_checkpoint), vl_checkpoint=str(vl_checkpoint),
                            num_classes=len(counts))
    module.class_counts.copy_(counts)
    module.log = lambda *args, **kwargs: None
    return module


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="lpt-bench-"))


# --------------------------------------------------------------------------------------------
# Steps


def dual_batch(per_stream: int, num_classes: int, img_size: int, device: torch.device,
               seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A dual-sampling batch: class-balanced and instance-balanced streams of ``per_stream``
    images each, float in [0, 1] (the backbone normalises)."""
    g = torch.Generator().manual_seed(seed)
    return {
        stream: {
            "image": torch.rand(per_stream, 3, img_size, img_size, generator=g).to(device),
            "label": torch.randint(0, num_classes, (per_stream,), generator=g).to(device),
        }
        for stream in ("cb", "ib")
    }


def sgd_for(module) -> torch.optim.Optimizer:
    """The phases' optimizer (SGD, momentum 0.9, wd 0.01) over trainable parameters only."""
    spec = module.optim_spec
    return torch.optim.SGD(module.trainable_parameters(), lr=spec.base_lr, momentum=spec.momentum,
                           weight_decay=spec.weight_decay)


def train_step_fn(module, optimizer: torch.optim.Optimizer, batch, env: Env) -> Callable[[], None]:
    """One optimisation step through the phase's own ``training_step``: forward over both
    streams, A-GCL (+ matching loss in phase 2), backward, SGD step."""

    def step() -> None:
        with env.autocast():
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def two_pass_forward(expert, images: torch.Tensor, use_group_prompts: bool = True):
    """The plain two-pass computation that prefix reuse replaces: a full query pass (shared
    prompt only), matching, then a full classification pass from the embedding with the matched
    group prompts from block K on (as in tests/test_models.py::test_prefix_reuse_equals_two_pass)."""
    from lpt_lightning.models.expert import ExpertOutput, LongTailExpert

    if expert.group_prompts is None or not use_group_prompts:
        return LongTailExpert.forward(expert, images, use_group_prompts=False)
    bb = expert.backbone
    with torch.set_grad_enabled(expert._query_needs_grad()):
        query = LongTailExpert.forward(expert, images, use_group_prompts=False).features
    match = expert.group_prompts.match(query.detach())
    x = expert.run_blocks(bb.embed(images), 0, expert.group_start)
    x = expert.run_blocks(x, expert.group_start, bb.num_blocks, match.prompts)
    features = bb.pool(x)
    return ExpertOutput(logits=expert.head(features), features=features, query=query, match=match)


@contextlib.contextmanager
def forward_replaced(expert, forward: Callable):
    """Temporarily route ``expert(...)`` through ``forward`` (the module's own code stays as is)."""
    expert.forward = types.MethodType(forward, expert)
    try:
        yield
    finally:
        del expert.forward


@contextlib.contextmanager
def small_op_threads(env: Env):
    """One torch thread for the small-tensor sections on the CPU: on a few cores shared with other
    jobs, 2-thread OpenMP makes every tiny op wait for a descheduled sibling thread (we saw 10-50x
    swings). No effect on GPU runs."""
    if env.is_cuda:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Page templates: benchmarks/templates/<page>.md holds a page's prose as named blocks, each opened
# by a line `<!-- block: NAME -->`, with `$name` placeholders filled from the stored results.


def template(page: str, block: str, /, **values: Any) -> str:
    import re
    import string

    text = (REPO / "benchmarks" / "templates" / f"{page}.md").read_text()
    parts = re.split(r"^<!-- block: (\w+) -->\n", text, flags=re.M)
    blocks = {name: body.rstrip("\n") for name, body in zip(parts[1::2], parts[2::2])}
    return string.Template(blocks[block]).substitute(values)
