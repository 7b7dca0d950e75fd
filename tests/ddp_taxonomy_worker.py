"""Spawned by tests/test_taxonomy.py: one gloo rank updating TaxonomyEvalMetrics with its shard."""
import os

import torch
import torch.distributed as dist


def run(rank: int, world_size: int, init_method: str, counts, taxonomy, probs, target, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from lpt_lightning.taxonomy import TaxonomyEvalMetrics, taxonomy_values

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        metric = TaxonomyEvalMetrics(counts, taxonomy)
        metric.update(probs[rank::world_size], target[rank::world_size])  # interleaved shards of unequal length
        torch.save(taxonomy_values(metric.compute()), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # tear down together: gloo aborts a rank whose peer left mid-teardown
    finally:
        dist.destroy_process_group()
