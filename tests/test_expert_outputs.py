"""Phase 3 as three parts: the experts' outputs through the predict loop (sharded, memory-mapped),
the DataModule over them, and a scorer whose checkpoint and export stand alone."""
import builtins
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy

from lpt_lightning.callbacks import default_callbacks
from lpt_lightning.checkpoints import load_checkpoint_file
from lpt_lightning.cli import LPTCLI, main
from lpt_lightning.data import ClassAwareSampler, ImageFolderSource, InstanceSampler, LongTailDataModule
from lpt_lightning.data.cached_outputs import CachedOutputsDataModule, CachedSplit
from lpt_lightning.data.samplers import ShardedEvalSampler
from lpt_lightning.data_facts import connect
from lpt_lightning.errors import CacheError
from lpt_lightning.expert_cache_writer import ExpertCacheWriter, OutputsTarget
from lpt_lightning.expert_outputs import ExpertRowsPredictor, outputs_key, write_expert_outputs
from lpt_lightning.models.expert import ExpertSpec
from lpt_lightning.phases import AdaptPhase, MoEScorerPhase, OptimSpec
from lpt_lightning.phases.moe_scorer import scorer_fit_data
from tiny_models import tiny_backbone, tiny_image_folder

COUNTS = [30, 20, 12, 8]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_image_folder(tmp_path_factory.mktemp("data") / "imgs", COUNTS)


DATA = {"batch_size": 4, "eval_batch_size": 5, "num_workers": 0, "img_size": 32, "pin_memory": False,
        "sampling": "class_aware"}


def source_args(folder):
    return {"root": str(folder), "val_per_class": 3, "test_per_class": 2, "seed": 0, "name": "tiny"}


def images(folder, **kw) -> LongTailDataModule:
    return LongTailDataModule(ImageFolderSource(**source_args(folder)), **{**DATA, **kw})


def quiet_trainer(root, **kw):
    return L.Trainer(**{"accelerator": "cpu", "devices": 1, "precision": "32-true", "logger": False,
                        "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                        "num_sanity_val_steps": 0, "default_root_dir": str(root), **kw})


@pytest.fixture(scope="module")
def experts(folder, tmp_path_factory):
    """Trained phase-1 checkpoints of both experts on this data, in a directory of their own."""
    root = tmp_path_factory.mktemp("experts")
    paths = {}
    for kind in ("visual", "vl"):
        L.seed_everything(0)
        data = images(folder)
        spec = ExpertSpec(kind=kind, backbone=tiny_backbone(kind), prompt_length=2)
        # One epoch: no warm-up (a warm-up as long as the run is refused).
        module = AdaptPhase(expert=spec, num_classes=data.num_classes, class_names=data.class_names,
                            optim=OptimSpec(warmup_epochs=0))
        connect(module, data)
        trainer = quiet_trainer(root, max_epochs=1, callbacks=default_callbacks())
        trainer.fit(module, datamodule=data)
        paths[kind] = root / f"{kind}.ckpt"
        trainer.save_checkpoint(paths[kind])
    return paths


def scorer(experts, **kw):
    L.seed_everything(0)
    return MoEScorerPhase(visual_checkpoint=str(experts["visual"]), vl_checkpoint=str(experts["vl"]), num_classes=4,
                          scorer={"hidden_dim": 8}, **kw)


def facts(data):
    return {"class_counts": data.group_class_counts.tolist(), "class_names": data.class_names,
            "record": data.data_record()}


# ----------------------------------------------------------------------------- part 1: the prediction pass


class ThreadRanks:
    """The collectives of a strategy for ranks that are threads: ``barrier`` and the vote
    ``reduce_boolean_decision``, both real meeting points (a rank waiting for a rank that never
    comes fails after ``timeout`` seconds with BrokenBarrierError)."""

    def __init__(self, world: int, timeout: float = 20.0):
        self.meeting = threading.Barrier(world, timeout=timeout)
        self.votes: dict[int, bool] = {}
        self.collectives: list[str] = []

    def strategy(self, rank: int) -> SimpleNamespace:
        def barrier(name=None):
            self.meeting.wait()

        def reduce_boolean_decision(decision, all=True):
            self.votes[rank] = bool(decision)
            self.meeting.wait()
            outcome = builtins.all(self.votes.values()) if all else builtins.any(self.votes.values())
            self.meeting.wait()  # every rank has read the votes before the next vote
            if rank == 0:
                self.collectives.append("vote")
            return outcome

        return SimpleNamespace(barrier=barrier, reduce_boolean_decision=reduce_boolean_decision)


def rank_errors(module, data, split_name, directory, world, dtype, ranks: ThreadRanks | None = None):
    """The writer on ``world`` ranks without DDP (threads meeting in `ThreadRanks`); each feeds its
    own ShardedEvalSampler shard through predict_step, as the predict loop would. Each rank's error."""
    split = data.splits.val
    ranks = ranks or ThreadRanks(world)
    errors: dict[int, Exception] = {}

    def rank(r):
        trainer = SimpleNamespace(global_rank=r, world_size=world, is_global_zero=r == 0, strategy=ranks.strategy(r))
        writer = ExpertCacheWriter([OutputsTarget(split_name, directory, len(split), {"key": "k", "data": {}})],
                                     dtype)
        loader = torch.utils.data.DataLoader(data.split_dataloader("val").dataset, batch_size=1,
                                             sampler=ShardedEvalSampler(len(split), world, r))
        try:
            with torch.no_grad():
                for i, batch in enumerate(loader):
                    writer.write_on_batch_end(trainer, module, module.predict_step(batch, i), None, batch, i)
            writer.on_predict_epoch_end(trainer, module)
        except Exception as exc:  # reported by the main thread
            errors[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def simulate_ranks(module, data, split_name, directory, world, dtype):
    errors = rank_errors(module, data, split_name, directory, world, dtype)
    if errors:
        raise errors[min(errors)]
    return CachedSplit(directory)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_two_ranks_write_disjoint_shards_whose_union_is_the_one_rank_result(experts, folder, tmp_path, dtype):
    model = scorer(experts)
    data = images(folder)
    module = ExpertRowsPredictor(model.experts(), model.scales, [False]).eval()
    one = simulate_ranks(module, data, "val", tmp_path / "one", 1, dtype)
    two = simulate_ranks(module, data, "val", tmp_path / "two", 2, dtype)
    n = len(data.splits.val)
    shards = [np.load(tmp_path / "two" / f"rank{r}-of-2.index.npy") for r in range(2)]
    assert [s.tolist() for s in shards] == [list(range(0, n, 2)), list(range(1, n, 2))]  # disjoint, complete
    assert two.manifest["arrays"]["visual.logits"] == {"dtype": dtype, "shape": [4]}
    everything = np.arange(n)
    a, b = one.rows(everything), two.rows(everything)
    assert a.keys() == b.keys() == {"index", "label", "visual.logits", "visual.query", "vl.logits", "vl.query"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["label"].tolist() == data.splits.val.labels.tolist()
    # Stored in float32, the cache is exactly what the experts compute on the images.
    if dtype == "float32":
        model.eval()
        with torch.no_grad():
            direct = model.expert_rows(torch.stack([data.split_dataloader("val").dataset[i]["image"] for i in range(n)]))
        for key, value in direct.items():
            torch.testing.assert_close(a[key], value, rtol=0, atol=1e-6, msg=key)


def test_a_rank_that_cannot_see_the_others_files_is_told_why(experts, folder, tmp_path, monkeypatch):
    model = scorer(experts)
    data = images(folder)
    module = ExpertRowsPredictor(model.experts(), model.scales, [False]).eval()
    real_is_file = Path.is_file
    # Rank 0 on another node without shared storage: rank 1's record is not visible to it.
    monkeypatch.setattr(Path, "is_file", lambda p: False if p.name == "rank1-of-2.json" else real_is_file(p))
    with pytest.raises(CacheError, match=r"rank1-of-2.json: missing.*filesystem every node sees"):
        simulate_ranks(module, data, "val", tmp_path / "two", 2, "float16")
    assert not (tmp_path / "two" / "manifest.json").exists()


def test_a_write_error_on_one_rank_stops_every_rank_at_once(experts, folder, tmp_path, monkeypatch):
    """Rank 1 cannot write (a full disk): it raises its own error and rank 0 a CacheError, both
    after the same vote; neither waits at a barrier for a rank that is not coming."""
    model = scorer(experts)
    data = images(folder)
    module = ExpertRowsPredictor(model.experts(), model.scales, [False]).eval()
    real_open = np.lib.format.open_memmap

    def open_memmap(path, *args, **kwargs):
        if "rank1-of-2" in Path(path).name:
            raise OSError(28, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "open_memmap", open_memmap)
    ranks = ThreadRanks(2, timeout=10)
    errors = rank_errors(module, data, "val", tmp_path / "two", 2, "float16", ranks)
    assert isinstance(errors[1], OSError) and "No space left" in str(errors[1])
    assert isinstance(errors[0], CacheError) and "another rank failed writing its expert outputs" in str(errors[0])
    assert ranks.collectives == ["vote"]  # stopped at the first vote, nothing waited past it
    assert not (tmp_path / "two" / "manifest.json").exists()


def test_finished_outputs_are_reused_and_an_interrupted_pass_recomputed(experts, folder, tmp_path):
    model = scorer(experts)
    data = images(folder)
    digests = [model.expert_info[k]["digest"] for k in ("visual", "vl")]
    args = (model.experts(), model.scales, digests, data, {"val": False}, tmp_path, facts(data))
    first = write_expert_outputs(*args, quiet_trainer(tmp_path))["val"]
    manifest = first / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert write_expert_outputs(*args, quiet_trainer(tmp_path))["val"] == first and manifest.stat().st_mtime_ns == stamp
    manifest.unlink()  # as if the pass had been killed before its end
    assert write_expert_outputs(*args, quiet_trainer(tmp_path))["val"] == first and manifest.is_file()
    other = write_expert_outputs(*args, quiet_trainer(tmp_path), dtype="float32")["val"]
    assert other != first  # the key covers the storage dtype (and the experts and the split)


def test_test_time_views_are_averaged_into_a_cache_of_their_own(experts, folder, tmp_path):
    model = scorer(experts)
    digests = [model.expert_info[k]["digest"] for k in ("visual", "vl")]
    plain, flip = images(folder), images(folder, test_time={"augment": "flip"})
    found = {name: write_expert_outputs(model.experts(), model.scales, digests, data, {"val": False}, tmp_path,
                                        facts(data), quiet_trainer(tmp_path), dtype="float32")["val"]
             for name, data in (("none", plain), ("flip", flip))}
    assert found["flip"] != found["none"]  # a cache without the views is not reused
    assert outputs_key(digests, "split", 32, False, "float32") == outputs_key(digests, "split", 32, False, "float32",
                                                                             "none")
    cached = CachedSplit(found["flip"])
    assert cached.manifest["test_time_augment"] == "flip"
    rows = cached.rows(np.arange(3))
    batch = torch.stack([plain.split_dataloader("val").dataset[i]["image"] for i in range(3)])
    for kind, expert in model.experts().items():
        scale = model.scales[kind]
        with torch.no_grad():
            mean = (torch.softmax(scale * expert(batch).logits, -1)
                    + torch.softmax(scale * expert(batch.flip(-1)).logits, -1)) / 2
        torch.testing.assert_close(torch.softmax(scale * rows[f"{kind}.logits"].float(), -1), mean)


class RecordingStrategy(SingleDeviceStrategy):
    """A user's configured strategy: counts the writer's votes that run through it."""

    def __init__(self):
        super().__init__(device=torch.device("cpu"))
        self.votes = 0

    def reduce_boolean_decision(self, decision, all=True):
        self.votes += 1
        return super().reduce_boolean_decision(decision, all=all)


@pytest.mark.parametrize("learn_offset", [True, False])
def test_plain_python_fit_runs_the_outputs_pass_on_the_configured_trainer(experts, folder, tmp_path, monkeypatch,
                                                                          learn_offset):
    """``trainer.fit(model, datamodule=scorer_fit_data(model, images, trainer))``: the pass runs on the
    user's trainer (its strategy; no trainer of its own). ``learn_offset=false``, the searching-based
    scorer, fits without training anything: W_base is searched, evaluated and checkpointed."""
    strategy = RecordingStrategy()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = quiet_trainer(tmp_path, strategy=strategy, max_epochs=2, enable_checkpointing=True,
                            callbacks=[checkpoints, *default_callbacks()])
    monkeypatch.setattr(L.Trainer, "__init__", lambda *a, **k: pytest.fail("a second Trainer was built"))
    data = images(folder)
    L.seed_everything(0)
    model = MoEScorerPhase(visual_checkpoint=str(experts["visual"]), vl_checkpoint=str(experts["vl"]), num_classes=4,
                           scorer={"hidden_dim": 8, "lr": 0.05, "learn_offset": learn_offset})
    connect(model, data)
    offset = {k: v.clone() for k, v in model.scorer.offset.state_dict().items()}
    fit_data = scorer_fit_data(model, data, trainer)
    assert strategy.votes == 3  # the writer's votes ran on the configured strategy
    w_base = float(model.scorer.w_base)
    trainer.fit(model, datamodule=fit_data)
    assert [p.name.split("-")[0] for p in (tmp_path / "expert_cache").iterdir()] == ["val"]
    moved = any(not torch.equal(v, model.scorer.offset.state_dict()[k]) for k, v in offset.items())
    assert moved is learn_offset
    results = model.results  # the last validation: on the split W_base was searched on, named so
    assert set(results) == {f"fit split (val): {t}" for t in ("visual expert", "vision-language expert",
                                                               "W_base fusion", "LPT++ (scorer)")}
    if not learn_offset:
        assert results["fit split (val): LPT++ (scorer)"]["acc"] == results["fit split (val): W_base fusion"]["acc"]
    saved = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")
    assert float(saved["state_dict"]["scorer.w_base"]) == w_base == float(model.scorer.w_base)


# ----------------------------------------------------------------------------- part 2: the cached DataModule


@pytest.mark.parametrize("sampling", ["class_aware", "dual"])
def test_cached_batches_are_the_rows_the_image_data_samplers_draw(experts, folder, tmp_path, sampling):
    model = scorer(experts)
    data = images(folder, sampling=sampling, seed=5, images_per_class=2)
    digests = [model.expert_info[k]["digest"] for k in ("visual", "vl")]
    outputs = write_expert_outputs(model.experts(), model.scales, digests, data, {"val": False}, tmp_path, facts(data),
                                   quiet_trainer(tmp_path))
    cached = CachedOutputsDataModule(outputs, batch_size=4, sampling=sampling, images_per_class=2, seed=5)
    labels = data.splits.val.labels
    # The index-only loader of the image data: its samplers (Draw keys), batches of 4, drop_last.
    old = {"cb": ClassAwareSampler(labels, images_per_class=2, seed=5, draw_keys=True),
           "ib": InstanceSampler(labels, seed=5 + 1_000_003, draw_keys=True)}
    split = CachedSplit(outputs["val"])
    loader = cached.train_dataloader()  # one loader: a batch is {stream: rows}
    streams = ("cb", "ib") if sampling == "dual" else ("cb",)
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        for stream in streams:
            old[stream].set_epoch(epoch)
            drawn = [d.index for d in old[stream]]
            expected = [drawn[i:i + 4] for i in range(0, len(drawn) - 3, 4)]
            assert [b[stream]["index"].tolist() for b in batches] == expected
            for batch in (b[stream] for b in batches):
                rows = split.rows(batch["index"].numpy())
                assert all(torch.equal(batch[k], rows[k]) for k in rows)
                assert batch["label"].tolist() == labels[batch["index"].numpy()].tolist()
    assert cached.group_class_counts.tolist() == data.group_class_counts.tolist()
    assert cached.data_record() == data.data_record() and cached.class_names == data.class_names


# ----------------------------------------------------------------------------- part 3: artefacts that stand alone


@pytest.fixture(scope="module")
def fitted(experts, folder, tmp_path_factory):
    """``lpt fit`` of phase 3, its export, and then the phase-2 files deleted."""
    root = tmp_path_factory.mktemp("phase3")
    moved = root / "experts"
    shutil.copytree(experts["visual"].parent, moved)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_epochs": 2, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root / "run"),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(root / "run" / "checkpoints"), "save_last": True}}]},
        "model": {"class_path": "lpt_lightning.phases.MoEScorerPhase",
                  "init_args": {"visual_checkpoint": str(moved / "visual.ckpt"),
                                "vl_checkpoint": str(moved / "vl.ckpt"), "scorer": {"hidden_dim": 8, "lr": 0.05}}},
        "data": {"source": {"class_path": "lpt_lightning.data.ImageFolderSource", "init_args": source_args(folder)},
                 **DATA},
    }
    path = root / "phase3.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    export = root / "lptpp.safetensors"
    main(["export", str(ckpt), str(export)])
    with torch.no_grad():
        batch = torch.rand(3, 3, 32, 32)
        before = MoEScorerPhase.load_from_checkpoint(ckpt).eval()(batch)
    shutil.rmtree(moved)
    return SimpleNamespace(config=path, ckpt=ckpt, export=export, images=batch, probs=before,
                           counts=images(folder).group_class_counts.tolist())


def run(args):
    cli = LPTCLI(args=args, **LPTCLI.defaults())
    return cli.model.results


def test_phase3_checkpoint_and_export_test_and_predict_alike_without_the_phase2_files(fitted, tmp_path):
    config = ["--config", str(fitted.config)]
    from_ckpt = run(["test", *config, "--ckpt_path", str(fitted.ckpt)])
    from_export = run(["test", *config, f"--model.init_args.weights={fitted.export}"])
    assert set(from_ckpt) == {f"test: {r}" for r in ("visual expert", "vision-language expert", "W_base fusion",
                                                      "LPT++ (scorer)")}
    for row, values in from_ckpt.items():
        assert values.keys() == from_export[row].keys()
        for key, value in values.items():
            if value is None:  # a group without a tested class has no worst class
                assert from_export[row][key] is None, key
                continue
            torch.testing.assert_close(torch.as_tensor(from_export[row][key]), torch.as_tensor(value), rtol=0, atol=0,
                                       equal_nan=True)
    outputs = {}
    for name, source in (("ckpt", ["--ckpt_path", str(fitted.ckpt)]),
                         ("export", [f"--model.init_args.weights={fitted.export}"]),
                         ("export_as_ckpt_path", ["--ckpt_path", str(fitted.export)])):
        outputs[name] = tmp_path / f"{name}.csv"
        main(["predict", *config, *source, "--prediction.output", str(outputs[name])])
    text = outputs["ckpt"].read_text()
    assert len(text.splitlines()) == 1 + 2 * len(COUNTS)
    assert text == outputs["export"].read_text() == outputs["export_as_ckpt_path"].read_text()



def test_phase3_ckpt_path_last_tests_alike_without_the_phase2_files(fitted):
    """``--ckpt_path=last`` is the run's last.ckpt, read before the model is built: the same results as
    the explicit path, with the phase-2 files deleted."""
    config = ["--config", str(fitted.config)]
    from_last = run(["test", *config, "--ckpt_path=last"])
    from_ckpt = run(["test", *config, "--ckpt_path", str(fitted.ckpt)])
    assert from_last.keys() == from_ckpt.keys() and len(from_ckpt) == 4
    for row, values in from_ckpt.items():
        assert values.keys() == from_last[row].keys()
        for key, value in values.items():
            if value is None:  # a group without a tested class has no worst class
                assert from_last[row][key] is None, key
                continue
            torch.testing.assert_close(torch.as_tensor(from_last[row][key]), torch.as_tensor(value), rtol=0, atol=0,
                                       equal_nan=True)


def test_phase3_test_priors_choose_tau_on_the_fit_split_row_of_each_part(fitted):
    """``--report.test_priors``: every phase-3 row (each expert, W_base, the scorer) gets its block,
    tau chosen on the same part's ``fit split (val)`` row."""
    results = run(["test", "--config", str(fitted.config), "--ckpt_path", str(fitted.ckpt), "--report.test_priors=[10]"])
    titles = ("visual expert", "vision-language expert", "W_base fusion", "LPT++ (scorer)")
    assert set(results) == {f"{split}: {t}" for split in ("test", "fit split (val)") for t in titles}
    for title in titles:
        block = results[f"test: {title}"]["test_priors"]
        assert block["tau_chosen_on"] == f"fit split (val): {title}"
        assert list(block["priors"]) == ["backward_10", "uniform", "forward_10"]
        assert block["priors"]["uniform"]["acc"] == pytest.approx(results[f"test: {title}"]["balanced_acc"], abs=1e-3)

def test_load_from_checkpoint_rebuilds_the_whole_model_without_the_cli(fitted):
    model = MoEScorerPhase.load_from_checkpoint(fitted.ckpt).eval()
    with torch.no_grad():
        assert torch.equal(model(fitted.images), fitted.probs)
    saved = load_checkpoint_file(fitted.ckpt)
    assert not any("backbone." in k for k in saved["state_dict"])  # trained tensors and specs only
    assert set(saved["lpt"]["experts"]) == {"visual", "vl"} and saved["lpt"]["experts"]["vl"]["expert"]["kind"] == "vl"
    w_base = float(saved["state_dict"]["scorer.w_base"])
    assert float(model.scorer.w_base) == w_base and model.class_counts.tolist() == fitted.counts

