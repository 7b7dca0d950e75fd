"""Worker for the 2-process gloo check in test_samplers.py (spawned by torch.multiprocessing).

Each rank builds its ClassAwareSampler from its own process-group rank, gathers every rank's
shard and rank 0 writes them (plus the single-process global sequence) to a JSON file.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch.distributed as dist


def run(rank: int, world_size: int, init_file: str, out_file: str, epoch: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from lpt_lightning.data.samplers import ClassAwareSampler

        labels = np.repeat(np.arange(5), [9, 6, 4, 2, 1])
        sampler = ClassAwareSampler(
            labels, images_per_class=2, seed=7, num_replicas=dist.get_world_size(), rank=dist.get_rank()
        )
        sampler.set_epoch(epoch)
        shards: list = [None] * world_size
        dist.all_gather_object(shards, list(sampler))
        if rank == 0:
            reference = ClassAwareSampler(labels, images_per_class=2, seed=7)
            reference.set_epoch(epoch)
            with open(out_file, "w") as fh:
                json.dump({"shards": shards, "global": reference.global_sequence().tolist(),
                           "labels": labels.tolist()}, fh)
        dist.barrier()  # tear down together: gloo aborts a rank whose peer left mid-teardown
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # manual use: python tests/ddp_sampler_worker.py OUT.json
    import tempfile

    import torch.multiprocessing as mp

    init = tempfile.mktemp(prefix="gloo-init-")
    mp.spawn(run, args=(2, init, sys.argv[1], 1), nprocs=2, join=True)
