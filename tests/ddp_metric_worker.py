"""Spawned by tests/test_metrics.py: one gloo rank updating SplitAccuracy (or EvalMetrics, and further metrics)
with its shard."""
import os

import torch
import torch.distributed as dist


def run(rank: int, world_size: int, init_method: str, counts, preds, target, out_dir: str,
        metric_name: str = "SplitAccuracy", also: tuple[str, ...] = ()) -> None:
    """``also``: further metrics updated alike in the same processes, by "module.Class" under
    lpt_lightning (e.g. "test_priors.PriorShiftAccuracy"); each result goes to ``rank{R}_{Class}.pt``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import importlib

    from lpt_lightning import metrics

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        built = {f"rank{rank}.pt": getattr(metrics, metric_name)(counts)}
        for path in also:
            module, _, name = path.rpartition(".")
            built[f"rank{rank}_{name}.pt"] = getattr(importlib.import_module(f"lpt_lightning.{module}"), name)(counts)
        # Interleaved shards of unequal length, updated in two batches each.
        p, t = preds[rank::world_size], target[rank::world_size]
        half = len(t) // 2
        for file, metric in built.items():
            metric.update(p[:half], t[:half])
            metric.update(p[half:], t[half:])
            result = metric.compute()
            torch.save({k: v.clone() for k, v in result.items()}, os.path.join(out_dir, file))
        dist.barrier()  # tear down together: gloo aborts a rank whose peer left mid-teardown
    finally:
        dist.destroy_process_group()
