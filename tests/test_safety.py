"""Unsafe and damaged files: pickle payloads never run, corrupt checkpoints fail clearly.

Every loader of a checkpoint-like file (phase checkpoints, the phase-2 and phase-3 inputs, the
expert-output cache, backbone weights, exported .safetensors) must refuse a pickle payload
without executing it, and report truncated or random files as a CheckpointError naming the file.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lpt_lightning.checkpoints import expert_from_checkpoint, load_checkpoint_file
from lpt_lightning.cli import main
from lpt_lightning.errors import CacheError, CheckpointError
from lpt_lightning.data.cached_outputs import CachedSplit
from lpt_lightning.models.backbones import BackboneSpec, build_backbone
from lpt_lightning.safe_load import read_state_dict
from lpt_lightning.models.expert import ExpertSpec
from lpt_lightning.phases import AdaptPhase, GroupPromptPhase, MoEScorerPhase
from lpt_lightning.pipeline_plan import plan
from lpt_lightning.pipeline_state import finished
from tiny_models import CLIP_TINY, TIMM_TINY, tiny_backbone


class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def adapt_checkpoint(path: Path, kind: str = "visual", **extra) -> Path:
    phase = AdaptPhase(expert=ExpertSpec(kind=kind, backbone=tiny_backbone(kind), prompt_length=3), num_classes=5,
                       class_names=[f"c{i}" for i in range(5)])
    torch.save({"state_dict": phase.state_dict(), "lpt": phase.metadata(), **extra}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real (untrained) phase-1 checkpoint of the tiny visual expert."""
    return adapt_checkpoint(tmp_path_factory.mktemp("ckpt") / "phase1.ckpt")


@pytest.fixture()
def evil(tmp_path, checkpoint):
    """``evil(name)``: a copy of the real checkpoint carrying a payload; returns (path, marker)."""
    def make(name: str = "evil.ckpt", content=None) -> tuple[Path, Path]:
        marker = tmp_path / f"{name}.ran"
        path = tmp_path / name
        if content is None:
            content = dict(torch.load(checkpoint, weights_only=True), payload=Payload(marker))
        torch.save(content(marker) if callable(content) else content, path)
        return path, marker
    return make


def refused(path: Path, marker: Path, exc: pytest.ExceptionInfo) -> None:
    assert str(path) in str(exc.value), f"the error does not name {path}: {exc.value}"
    assert not marker.exists(), "the pickle payload ran"


# ------------------------------------------------------------------------------ pickle payloads


def test_the_payload_is_live(evil):
    """Control: an unsafe load does run the payload, so the refusals below are meaningful."""
    path, marker = evil()
    torch.load(path, weights_only=False)
    assert marker.read_text() == "payload ran"


def test_load_checkpoint_file_refuses_payload(evil):
    path, marker = evil()
    with pytest.raises(CheckpointError, match="cannot be loaded safely") as exc:
        load_checkpoint_file(path)
    refused(path, marker, exc)
    assert "pickled objects" in str(exc.value)


def test_payload_hidden_in_the_state_dict_is_refused(evil, checkpoint):
    def content(marker):
        data = torch.load(checkpoint, weights_only=True)
        data["state_dict"]["expert.head.weight"] = Payload(marker)
        return data
    path, marker = evil("nested.ckpt", content)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint_file(path)
    refused(path, marker, exc)


def test_group_prompt_phase_refuses_payload(evil):
    path, marker = evil()
    with pytest.raises(CheckpointError) as exc:
        GroupPromptPhase(phase1_checkpoint=str(path), num_classes=5)
    refused(path, marker, exc)


@pytest.mark.parametrize("which", ["visual", "vl"])
def test_moe_scorer_phase_refuses_payload(evil, checkpoint, which):
    path, marker = evil(f"{which}.ckpt")
    # the other input is a real checkpoint (the visual one is read first, so the vl case gets past it)
    paths = {"visual_checkpoint": str(checkpoint), "vl_checkpoint": str(checkpoint), f"{which}_checkpoint": str(path)}
    with pytest.raises(CheckpointError) as exc:
        MoEScorerPhase(**paths, num_classes=5)
    refused(path, marker, exc)


def cached_split(directory: Path, index: np.ndarray) -> Path:
    """A one-rank expert-output cache holding ``index`` (an object array carries a pickle)."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "rank0-of-1.index.npy", index, allow_pickle=True)
    manifest = {"format": 2, "num_rows": 3, "world_size": 1, "arrays": {"index": {"dtype": "int64", "shape": []}}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory / "rank0-of-1.index.npy"


def test_expert_cache_refuses_payload(tmp_path):
    marker = tmp_path / "ran"
    shard = cached_split(tmp_path / "val-abc", np.array([0, 1, Payload(marker)], dtype=object))
    with pytest.raises(CacheError, match="expert-output cache") as exc:
        CachedSplit(tmp_path / "val-abc")
    refused(shard, marker, exc)


@pytest.mark.parametrize("kind, suffix", [("visual", ".pth"), ("visual", ".bin"), ("vl", ".pt")])
def test_backbone_weights_refuse_payload(evil, kind, suffix):
    path, marker = evil(f"weights{suffix}", lambda m: {"state_dict": {"cls_token": torch.zeros(1)}, "x": Payload(m)})
    kwargs = dict(TIMM_TINY) if kind == "visual" else dict(CLIP_TINY)
    spec = BackboneSpec(name="vit_base_patch16_224" if kind == "visual" else None, pretrained=None,
                        checkpoint_path=str(path), model_kwargs=kwargs)
    with pytest.raises(CheckpointError) as exc:
        build_backbone(kind, spec)
    refused(path, marker, exc)


@pytest.mark.parametrize("loader", ["visual", "vl", "vl named"])
def test_backbone_weights_payload_is_reported_as_a_refusal(evil, loader):
    """Whichever loader reads a backbone's file (ours; open_clip's load_checkpoint; open_clip's
    create_model for a named architecture), a refused payload is reported as such, without torch's
    suggestion to load the file with weights_only=False."""
    path, marker = evil("weights.pt", lambda m: {"state_dict": {"cls_token": torch.zeros(1)}, "x": Payload(m)})
    spec = {"visual": BackboneSpec(name="vit_base_patch16_224", pretrained=None, checkpoint_path=str(path),
                                   model_kwargs=dict(TIMM_TINY)),
            "vl": BackboneSpec(pretrained=None, checkpoint_path=str(path), model_kwargs=dict(CLIP_TINY)),
            "vl named": BackboneSpec(name="ViT-B-16", pretrained="openai", checkpoint_path=str(path))}[loader]
    with pytest.raises(CheckpointError, match="cannot be loaded safely: .*carries pickled objects") as exc:
        build_backbone("visual" if loader == "visual" else "vl", spec)
    refused(path, marker, exc)
    assert "weights_only" not in str(exc.value)


def test_backbone_npz_refuses_pickled_object_array(tmp_path):
    marker = tmp_path / "npz.ran"
    path = tmp_path / "augreg.npz"
    np.savez(path, payload=np.array([Payload(marker)], dtype=object))
    spec = BackboneSpec(name="vit_base_patch16_224", pretrained=False, checkpoint_path=str(path),
                        model_kwargs=dict(TIMM_TINY))
    with pytest.raises(CheckpointError) as exc:
        build_backbone("visual", spec)
    refused(path, marker, exc)


# Checkpoints that unpickle safely but whose metadata or tensors are malformed (edited or foreign
# files) must fail with a CheckpointError naming the file, not a KeyError deep inside a phase.
MALFORMED = {
    "no_num_classes": lambda d: d["lpt"].pop("num_classes"),
    "no_expert": lambda d: d["lpt"].pop("expert"),
    "expert_not_a_dict": lambda d: d["lpt"].__setitem__("expert", "vit"),
    "unknown_expert_field": lambda d: d["lpt"]["expert"].__setitem__("bogus", 1),
    "backbone_not_a_dict": lambda d: d["lpt"]["expert"].__setitem__("backbone", 3),
    "unknown_group_field": lambda d: d["lpt"].__setitem__("group_prompts", {"bogus": 1}),
    "no_state_dict": lambda d: d.pop("state_dict"),
    "state_dict_not_a_dict": lambda d: d.__setitem__("state_dict", [1, 2]),
    "tensor_replaced_by_int": lambda d: d["state_dict"].__setitem__("expert.head.weight", 3),
}


@pytest.mark.parametrize("flaw", sorted(MALFORMED))
def test_malformed_checkpoint_contents_fail_clearly(tmp_path, checkpoint, flaw):
    data = torch.load(checkpoint, weights_only=True)
    MALFORMED[flaw](data)
    path = tmp_path / f"{flaw}.ckpt"
    torch.save(data, path)
    for load in (lambda: GroupPromptPhase(phase1_checkpoint=str(path), num_classes=5),
                 lambda: MoEScorerPhase(visual_checkpoint=str(path), vl_checkpoint=str(checkpoint), num_classes=5)):
        with pytest.raises(CheckpointError) as exc:
            load()
        assert str(path) in str(exc.value)


# ------------------------------------------------------------------------------ truncated and random files


def damaged(tmp_path: Path, source: Path) -> dict[str, Path]:
    data = source.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "random": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty": b"",
        "zip_header_only": data[:64],
    }
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name}{source.suffix}"
        out[name].write_bytes(content)
    return out


def test_damaged_checkpoints_fail_clearly(tmp_path, checkpoint):
    for name, path in damaged(tmp_path, checkpoint).items():
        with pytest.raises(CheckpointError, match="cannot be loaded safely") as exc:
            load_checkpoint_file(path)
        assert str(path) in str(exc.value), name
        with pytest.raises(CheckpointError) as exc:
            GroupPromptPhase(phase1_checkpoint=str(path), num_classes=5)
        assert str(path) in str(exc.value), name
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_file(tmp_path / "absent.ckpt")


def test_damaged_cache_and_weights_fail_clearly(tmp_path):
    shard = cached_split(tmp_path / "val-abc", np.arange(3))
    for name, path in damaged(tmp_path, shard).items():
        shard.write_bytes(path.read_bytes())
        with pytest.raises(CacheError, match="delete .* to recompute") as exc:
            CachedSplit(shard.parent)
        assert str(shard) in str(exc.value), name
    weights = tmp_path / "weights.pt"
    torch.save({"index": torch.arange(50), "label": torch.zeros(50, dtype=torch.long)}, weights)
    for name, path in damaged(tmp_path, weights).items():
        with pytest.raises(CheckpointError) as exc:
            read_state_dict(str(path))
        assert str(path) in str(exc.value), name


# ------------------------------------------------------------------------------ pipeline: corrupt final.ckpt


def one_run(tmp_path: Path):
    runs = plan(str(tmp_path / "run"), data={"batch_size": 4}, trainer=None, experts=["visual"], phase1=None,
                phase2=None, phase3=None, mixture=False, seed_everything=0)
    assert [r.name for r in runs] == ["phase1_visual", "phase2_visual"]
    return runs


def test_corrupt_final_checkpoint_means_unfinished(tmp_path, checkpoint, evil):
    run = one_run(tmp_path)[0]
    assert not finished(run)  # no final.ckpt yet
    run.final_checkpoint.parent.mkdir(parents=True)
    run.final_checkpoint.write_bytes(checkpoint.read_bytes())
    assert finished(run)
    run.final_checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    assert not finished(run)  # truncated: redo the phase
    run.final_checkpoint.write_bytes(b"\0" * 100)
    assert not finished(run)
    torch.save({"state_dict": {}}, run.final_checkpoint)  # loads, but is no phase checkpoint
    assert not finished(run)
    path, marker = evil()
    run.final_checkpoint.write_bytes(path.read_bytes())
    assert not finished(run) and not marker.exists()


def test_pipeline_redoes_only_the_phase_with_a_corrupt_final_checkpoint(tmp_path, checkpoint, monkeypatch):
    import lpt_lightning.pipeline as pipeline

    ran = []
    monkeypatch.setattr(pipeline, "_validate_configs", lambda runs, keep: None)
    monkeypatch.setattr(pipeline, "run_phase", lambda run, test, log_model, test_start: ran.append(run.name))
    phase1, phase2 = one_run(tmp_path)
    for run in (phase1, phase2):
        run.directory.mkdir(parents=True)
        run.final_checkpoint.write_bytes(checkpoint.read_bytes())
        pipeline.write_phase_config(run, run.directory / "config.yaml")  # the settings it was trained with
    phase2.final_checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    pipeline.run_pipeline(str(tmp_path / "run"), data={"batch_size": 4}, experts=["visual"], mixture=False)
    assert ran == ["phase2_visual"]


# ------------------------------------------------------------------------------ safetensors export


@pytest.fixture()
def exported(tmp_path, checkpoint) -> Path:
    out = tmp_path / "expert.safetensors"
    main(["export", str(checkpoint), str(out)])
    return out


def test_export_loads_back(exported, checkpoint):
    loaded, original = load_checkpoint_file(exported), load_checkpoint_file(checkpoint)
    assert loaded["lpt"] == original["lpt"]
    assert loaded["state_dict"] and all(not k.startswith("expert.backbone.") for k in loaded["state_dict"])
    for key, value in loaded["state_dict"].items():
        assert torch.equal(value, original["state_dict"][key]), key
    a = expert_from_checkpoint(original, checkpoint).eval()
    b = expert_from_checkpoint(loaded, exported).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(images).logits, b(images).logits)


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: dict | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def tampered_files(exported: Path) -> dict[str, bytes]:
    header, body = split_safetensors(exported)
    name = next(k for k in header if k != "__metadata__")

    def with_entry(**changes):
        h = json.loads(json.dumps(header))
        h[name].update(changes)
        return join_safetensors(h, body)

    begin, end = header[name]["data_offsets"]
    bad_meta = json.loads(json.dumps(header))
    bad_meta["__metadata__"]["lpt"] = "{not json"
    raw = json.dumps(header).encode()
    return {
        "offsets_past_end": with_entry(data_offsets=[begin, end + len(body) + 64]),
        "offsets_reversed": with_entry(data_offsets=[end, begin]),
        "shape_mismatch": with_entry(shape=[10**6, 10**6]),
        "unknown_dtype": with_entry(dtype="Q99"),
        "header_not_json": join_safetensors(raw.replace(b"{", b"[", 1), body),
        "header_length_huge": struct.pack("<Q", 2**62) + raw + body,
        "header_length_short": struct.pack("<Q", len(raw) - 7) + raw + body,
        "metadata_not_json": join_safetensors(bad_meta, body),
        "truncated": exported.read_bytes()[: exported.stat().st_size // 2],
    }


def test_tampered_safetensors_fail_clearly(exported, tmp_path):
    for name, content in tampered_files(exported).items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match="cannot be loaded safely") as exc:
            load_checkpoint_file(path)
        assert str(path) in str(exc.value), name
