"""Spawned by tests/test_datamodule.py: one gloo rank checking the images of a split with its
peers, as two phases of a pipeline do one after the other; logs every image it opens."""
import json
import os

import torch
import torch.distributed as dist


def run(rank: int, world_size: int, init_method: str, root: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import PIL.Image

    from lpt_lightning.data import AnnotationListSource, LongTailDataModule
    from lpt_lightning.errors import DataFormatError

    opened = []
    real_open = PIL.Image.open

    def logged_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    PIL.Image.open = logged_open

    def datamodule(train_list: str) -> LongTailDataModule:
        source = AnnotationListSource(root=root, train_list=train_list, val_list="val.txt")
        return LongTailDataModule(source, batch_size=2, num_workers=0, img_size=16, verify_images="header",
                                  verify_record_dir=os.path.join(out_dir, "verified"))

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        result = {}
        for phase in ("phase1", "phase2"):  # phase 2 finds phase 1's record
            opened.clear()
            datamodule("train.txt").setup("fit")
            result[phase] = list(opened)
        try:
            datamodule("bad.txt").setup("fit")  # the broken image is in the other rank's share
            result["error"] = None
        except DataFormatError as exc:
            result["error"] = str(exc)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(result, fh)
        dist.barrier()  # tear down together: gloo aborts a rank whose peer left mid-teardown
    finally:
        dist.destroy_process_group()
