"""Test-time augmentation: the views of the eval transform and each expert's mean over them."""
import lightning as L
import pytest
import torch
from PIL import Image

from lpt_lightning.data import LongTailDataModule, TestTimeSpec, build_eval_transform
from lpt_lightning.data import ImageFolderSource
from lpt_lightning.errors import ConfigError
from lpt_lightning.models.expert import ExpertSpec
from lpt_lightning.phases import AdaptPhase
from tiny_models import tiny_backbone, tiny_image_folder


def symmetric_image() -> torch.Tensor:
    """uint8 [3, 32, 32], its own mirror image (the size the tiny expert takes, so no crop shifts it)."""
    g = torch.Generator().manual_seed(0)
    half = torch.randint(0, 256, (3, 32, 16), generator=g, dtype=torch.uint8)
    return torch.cat([half, half.flip(-1)], dim=-1)


def constant_image() -> Image.Image:
    return Image.new("RGB", (40, 40), (120, 30, 200))


@pytest.fixture(scope="module")
def phase():
    L.seed_everything(0)
    model = AdaptPhase(expert=ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=2),
                       num_classes=4)
    return model.eval()


def probs(phase, image, augment):
    view = build_eval_transform(32, augment)(image)
    with torch.no_grad():
        return phase.probabilities(view[None])  # a batch of one image (with its views)


def test_views_of_each_augmentation():
    image = Image.fromarray(torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8).numpy())
    none = build_eval_transform(32)(image)
    assert none.shape == (3, 32, 32)
    assert {a: tuple(build_eval_transform(32, a)(image).shape) for a in ("flip", "five_crop", "ten_crop")} == {
        "flip": (2, 3, 32, 32), "five_crop": (5, 3, 32, 32), "ten_crop": (10, 3, 32, 32)}
    flip = build_eval_transform(32, "flip")(image)
    assert torch.equal(flip[0], none) and torch.equal(flip[1], none.flip(-1))
    with pytest.raises(ConfigError, match="none, flip, five_crop, ten_crop"):
        TestTimeSpec("rotate")


def test_symmetric_image_gives_the_same_probabilities_with_flip(phase):
    image = symmetric_image()
    assert torch.equal(image, image.flip(-1))
    flip_views = build_eval_transform(32, "flip").transforms[-1]  # the step that adds the mirror image
    with torch.no_grad():
        none, flip = phase.probabilities(image[None]), phase.probabilities(flip_views(image)[None])
    assert none.shape == (1, 4) and none.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(flip, none, rtol=1e-5, atol=1e-6)
    # An asymmetric image does change: the flip is really averaged in.
    left = Image.fromarray(torch.cat([torch.zeros(40, 20, 3), torch.full((40, 20, 3), 255.0)], 1).byte().numpy())
    assert not torch.allclose(probs(phase, left, "flip"), probs(phase, left, "none"), atol=1e-3)


def test_five_crop_of_a_constant_image_equals_none(phase):
    image = constant_image()
    torch.testing.assert_close(probs(phase, image, "five_crop"), probs(phase, image, "none"), rtol=1e-5, atol=1e-6)


def test_datamodule_gives_views_to_evaluation_only(tmp_path):
    data = LongTailDataModule(ImageFolderSource(root=str(tiny_image_folder(tmp_path / "imgs")), val_per_class=3,
                                                test_per_class=2, seed=0, name="tiny"),
                              batch_size=4, num_workers=0, img_size=32, pin_memory=False,
                              test_time={"augment": "ten_crop"})
    data.setup("fit")
    assert data.hparams["test_time"] == {"augment": "ten_crop"}
    assert next(iter(data.val_dataloader()))["image"].shape == (4, 10, 3, 32, 32)
    assert next(iter(data.split_dataloader("train", views=False)))["image"].shape == (4, 3, 32, 32)
    train = next(iter(data.train_dataloader()))
    assert all(stream["image"].shape[1:] == (3, 32, 32) for stream in train.values())


def test_an_export_predicts_from_the_views_as_its_phase_does(tmp_path):
    """``lpt predict`` on an export with ``data.test_time.augment`` gets [B, V, 3, S, S] batches:
    the exported expert averages its views exactly as the phase module does."""
    from lpt_lightning.checkpoints import load_checkpoint_file
    from lpt_lightning.checkpoints.files import export_safetensors
    from lpt_lightning.prediction import ExportedExpert
    from test_safety import adapt_checkpoint

    checkpoint = adapt_checkpoint(tmp_path / "phase1.ckpt")
    exported = ExportedExpert(str(export_safetensors(checkpoint, tmp_path / "expert.safetensors"))).eval()
    phase = AdaptPhase(expert=ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=3),
                       num_classes=5)
    phase.load_state_dict(load_checkpoint_file(checkpoint)["state_dict"])
    phase.eval()
    views = torch.stack([build_eval_transform(32, "five_crop")(constant_image()),
                         build_eval_transform(32, "five_crop")(Image.new("RGB", (40, 40), (10, 200, 90)))])
    with torch.no_grad():
        probs_export = exported.predict_step({"image": views, "index": torch.arange(2)}, 0)["probs"]
        torch.testing.assert_close(probs_export, phase.probabilities(views), rtol=1e-5, atol=1e-6)
