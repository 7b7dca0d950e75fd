"""Spawned by tests/test_metrics.py and tests/test_test_priors.py: one gloo rank updating SplitAccuracy (or
EvalMetrics, PriorShiftAccuracy) with its shard."""
import os

import torch
import torch.distributed as dist


def run(rank: int, world_size: int, init_method: str, counts, preds, target, out_dir: str,
        metric_name: str = "SplitAccuracy") -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import importlib

    # "SplitAccuracy" (lpt_lightning.metrics) or "test_priors.PriorShiftAccuracy" (another lpt_lightning module).
    module, _, name = metric_name.rpartition(".")
    metric_class = getattr(importlib.import_module(f"lpt_lightning.{module or 'metrics'}"), name)

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        metric = metric_class(counts)
        # Interleaved shards of unequal length, updated in two batches each.
        p, t = preds[rank::world_size], target[rank::world_size]
        half = len(t) // 2
        metric.update(p[:half], t[:half])
        metric.update(p[half:], t[half:])
        result = metric.compute()
        torch.save({k: v.clone() for k, v in result.items()}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # tear down together: gloo aborts a rank whose peer left mid-teardown
    finally:
        dist.destroy_process_group()
