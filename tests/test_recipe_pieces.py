"""The DeiT / DeiT III recipe pieces, each shown to act on its own (issue 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import vitkit
from test_data import offline, write_idx  # noqa: F401  (offline is a fixture)
from vitkit.cli import main
from vitkit.data.augment_spec import RA_OPS, RandAugmentSpec
from vitkit.data.batch_augment import BatchAugment, apply_rand_op, batch_random_erasing, batch_three_augment
from vitkit.data.image_augment import RandAugmentNoise, image_augment, image_random_erasing, three_augment
from vitkit.data.mixup import MixupCutmix
from vitkit.data.repeated_aug import RepeatedAugSampler
from vitkit.data.transforms import Augment, BatchTrainTransform, ImageSpec, train_transform
from vitkit.train.distill import BinaryCrossEntropy, DistillationLoss, build_distillation, soft_distillation
from vitkit.train.losses import CrossEntropy
from vitkit.train.recipes import build_config
from vitkit.train.teacher import FrozenTeacher, TeacherInputs, load_teacher
from vitkit.weights.vitkit_format import save_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _images(b=16, c=3, h=24, w=24) -> torch.Tensor:
    """Smooth random images in [0, 1] with structure (a gradient plus blobs), so every op shows."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = (0.6 * xs + 0.3 * ys)[None, None]
    return (base + 0.4 * torch.rand(b, c, h, w)).clamp(0, 1)


# -- RandAugment ----------------------------------------------------------------------------------


def test_rand_augment_spec_parses_deit_string_and_rejects_junk():
    assert RandAugmentSpec.parse("rand-m9-mstd0.5-inc1") == RandAugmentSpec(9.0, 0.5, 2)
    assert RandAugmentSpec.parse("rand-m7-n3") == RandAugmentSpec(7.0, 0.5, 3)
    for bad in ("auto-m9", "rand-m9-x3", "rand-m11"):
        with pytest.raises(ValueError, match="auto_augment"):
            RandAugmentSpec.parse(bad)
    levels = RandAugmentSpec(9.0, 0.5).sample_levels(20_000)
    assert 0 <= levels.min() and levels.max() <= 10
    assert abs(levels.mean() - 9.0) < 0.05 and 0.4 < levels.std() < 0.55  # noise, clipped at 10


@pytest.mark.parametrize("op", RA_OPS)
def test_each_rand_op_keeps_range_and_acts(op):
    x = _images(8)
    y = apply_rand_op(x, op, torch.full((8,), 9.0))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert 0 <= y.min() and y.max() <= 1
    changed = (y - x).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert not changed.any() if op == "Identity" else changed.all()


def test_rand_op_level_zero_is_identity_for_geometry():
    x = _images(4)
    for op in ("ShearX", "TranslateY", "Rotate", "Brightness"):
        torch.testing.assert_close(apply_rand_op(x, op, torch.zeros(4)), x, atol=1e-5, rtol=0)


def test_per_image_rand_augment_on_uint8():
    img = (_images(1)[0] * 255).to(torch.uint8)
    out = RandAugmentNoise(RandAugmentSpec())(img)
    assert out.shape == img.shape and out.dtype == torch.uint8
    steps = image_augment(24, 3, auto_augment="rand-m9-mstd0.5", color_jitter=0.4)
    assert len(steps) == 1  # colour jitter is off while RandAugment is on (timm, DeiT)
    with pytest.raises(ValueError, match="not both"):
        image_augment(24, 3, auto_augment="rand-m9", three_aug=True)


# -- repeated augmentation ------------------------------------------------------------------------


def test_repeated_augmentation_yields_k_different_views_of_one_image():
    data = (_images(10, c=1, h=28, w=28) * 255).to(torch.uint8)
    sampler = RepeatedAugSampler(len(data), repeats=3, seed=1)
    order = list(sampler)
    assert order[0] == order[1] == order[2] != order[3]
    batch = data[order[:3]]  # the three copies of one image, side by side as in a batch
    crop = BatchTrainTransform(ImageSpec(28, 1, (0.5,), (0.5,)), Augment(crop="rrc"))
    views = BatchAugment(auto_augment="rand-m9-mstd0.5")(crop(batch) * 0.5 + 0.5)  # [0, 1] pixels
    for i in range(3):
        for j in range(i + 1, 3):
            assert (views[i] - views[j]).abs().max() > 0.05


def test_sampler_shards_are_disjoint_and_cover_the_epoch():
    size, k, world = 10, 3, 4
    shards = [list(RepeatedAugSampler(size, repeats=k, seed=3, rank=r, world_size=world)) for r in range(world)]
    full = RepeatedAugSampler(size, repeats=k, seed=3).order()
    assert all(len(s) == len(shards[0]) for s in shards)  # DDP needs equal steps
    dealt = [full_pos for r in range(world) for full_pos in range(r, len(shards[0]) * world, world)]
    assert sorted(dealt) == list(range(len(shards[0]) * world))  # every position once: disjoint, covering
    counts = torch.bincount(torch.tensor(sum(shards, [])), minlength=size)
    assert counts.min() >= k and counts.sum() == len(shards[0]) * world  # every image k times (+ padding)
    assert sorted(full[: size * k]) == sorted(list(range(size)) * k)
    # without repetition the shards are disjoint sets of images covering the data set
    plain = [set(RepeatedAugSampler(12, repeats=1, rank=r, world_size=3)) for r in range(3)]
    assert set().union(*plain) == set(range(12)) and sum(map(len, plain)) == 12


def test_sampler_puts_copies_on_different_ranks_and_is_seeded_per_epoch():
    shards = [list(RepeatedAugSampler(8, repeats=2, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert sorted(shards[0]) == sorted(shards[1]) == list(range(8))  # one copy of each image per rank
    a = RepeatedAugSampler(50, repeats=3, seed=5)
    b = RepeatedAugSampler(50, repeats=3, seed=5)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    assert len(RepeatedAugSampler(50, repeats=3, world_size=2, epoch_size="dataset")) == 25
    with pytest.raises(ValueError, match="rank"):
        RepeatedAugSampler(5, rank=2, world_size=2)


# -- DeiT III: 3-Augment, simple random crop --------------------------------------------------------


def test_three_augment_applies_exactly_one_of_its_ops():
    x = _images(64)
    out, choice = batch_three_augment(x, return_choice=True)
    assert set(choice.tolist()) == {0, 1, 2}
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand_as(x)
    solar = torch.where(x >= 0.5, 1 - x, x)

    def tv(t):  # total variation: blur lowers it
        return (t.diff(dim=-1).abs().mean() + t.diff(dim=-2).abs().mean()).item()

    for i, c in enumerate(choice.tolist()):
        is_grey = torch.allclose(out[i], grey[i], atol=1e-6)
        is_solar = torch.allclose(out[i], solar[i], atol=1e-6)
        is_blur = not is_grey and not is_solar and tv(out[i]) < tv(x[i])
        assert [is_grey, is_solar, is_blur] == [c == 0, c == 1, c == 2]


def test_three_augment_per_image_is_one_op():
    img = (_images(1)[0] * 255).to(torch.uint8)
    choice = three_augment(24, 3)
    assert len(choice.transforms) == 3 and choice.p == [1 / 3] * 3
    out = choice(img)
    assert out.shape == img.shape and out.dtype == torch.uint8


def test_simple_random_crop_shape():
    spec, aug = ImageSpec(16, 3, (0.5,) * 3, (0.5,) * 3), Augment(crop="pad", crop_padding=4, pad_mode="reflect")
    batch = (torch.rand(5, 3, 20, 30) * 255).to(torch.uint8)  # short side 20 -> 16, then pad 4, crop 16
    out = BatchTrainTransform(spec, aug)(batch)
    assert out.shape == (5, 3, 16, 16)
    assert train_transform(spec, aug)(batch[0]).shape == (3, 16, 16)


def test_color_jitter_and_erasing_act_per_image():
    x = _images(32)
    jittered = BatchAugment(color_jitter=0.4)(x)
    assert ((jittered - x).abs().amax(dim=(1, 2, 3)) > 1e-3).all()
    z = torch.zeros(32, 3, 24, 24)
    erased = batch_random_erasing(z, 1.0) != 0
    area = erased[:, 0].float().mean(dim=(1, 2))
    assert (area > 0.01).all() and (area < 0.4).all()  # one box of 2-33% per image
    assert torch.equal(batch_random_erasing(z, 0.0), z)
    assert (image_random_erasing(1.0)(z[0]) != 0).any()


# -- Mixup / CutMix, losses --------------------------------------------------------------------------


@pytest.mark.parametrize("alphas", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_cutmix_targets_sum_to_one(alphas):
    images, labels = _images(32), torch.arange(32) % 10
    mixed, targets = MixupCutmix(10, *alphas)(images, labels)
    assert mixed.shape == images.shape and targets.shape == (32, 10)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(32))
    assert (targets.max(dim=1).values < 1).any()  # mixed, not one-hot


def test_bce_accepts_mixed_targets():
    logits = torch.randn(8, 5, requires_grad=True)
    _, mixed = MixupCutmix(5)(torch.rand(8, 3, 8, 8), torch.arange(8) % 5)
    loss = BinaryCrossEntropy()(logits, mixed)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, mixed))
    loss.backward()
    assert logits.grad is not None
    thresholded = BinaryCrossEntropy(threshold=0.0)(logits, mixed)  # DeiT III: present classes -> 1
    torch.testing.assert_close(thresholded, F.binary_cross_entropy_with_logits(logits, (mixed > 0).float()))
    hard = BinaryCrossEntropy(label_smoothing=0.1)(logits, torch.arange(8) % 5)
    target = F.one_hot(torch.arange(8) % 5, 5) * 0.9 + 0.02
    torch.testing.assert_close(hard, F.binary_cross_entropy_with_logits(logits, target))


# -- distillation -----------------------------------------------------------------------------------


class _Teacher(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, classes)
        self.drop = nn.Dropout(0.5)  # must stay off: a teacher is in eval mode

    def forward(self, x):
        return self.fc(self.drop(x.flatten(1)))


def test_hard_distillation_target_is_teacher_argmax():
    teacher, images, labels = _Teacher(), torch.randn(6, 3, 8, 8), torch.arange(6) % 4
    student = torch.randn(6, 4, requires_grad=True)
    loss = DistillationLoss(CrossEntropy(), teacher, "hard", alpha=1.0)(student, labels, images)
    torch.testing.assert_close(loss, F.cross_entropy(student, teacher.eval()(images).argmax(dim=1)))
    loss.backward()
    assert teacher.fc.weight.grad is None  # frozen, no gradients


def test_distilled_model_heads_learn_from_labels_and_teacher():
    model = vitkit.create_model(
        "deit_tiny_distilled_patch16_224", img_size=8, patch_size=4, depth=1, embed_dim=16, num_heads=2, num_classes=4
    )
    model.set_distilled_training(True)
    model.train()
    teacher, images, labels = _Teacher(), torch.randn(6, 3, 8, 8), torch.arange(6) % 4
    criterion = build_distillation(CrossEntropy(), teacher, "hard", alpha=0.5)
    criterion.train()  # the engine may call this; the teacher must stay in eval mode
    assert not criterion.teacher.model.training
    cls, dist = model(images)
    loss = criterion((cls, dist), labels, images)
    t = teacher(images).argmax(dim=1)
    torch.testing.assert_close(loss, 0.5 * F.cross_entropy(cls, labels) + 0.5 * F.cross_entropy(dist, t))
    # a plain model: its single output learns from both
    out = torch.randn(6, 4)
    torch.testing.assert_close(
        criterion(out, labels, images), 0.5 * F.cross_entropy(out, labels) + 0.5 * F.cross_entropy(out, t)
    )
    assert build_distillation(CrossEntropy(), None, "none").__class__ is CrossEntropy
    with pytest.raises(ValueError, match="needs a teacher"):
        build_distillation(CrossEntropy(), None, "soft")


def test_soft_distillation_is_scaled_kl():
    s, t, tau = torch.randn(5, 7), torch.randn(5, 7), 3.0
    expected = (F.softmax(t / tau, 1) * (F.log_softmax(t / tau, 1) - F.log_softmax(s / tau, 1))).sum() * tau**2 / 35
    torch.testing.assert_close(soft_distillation(s, t, tau), expected)
    assert soft_distillation(t, t, tau).abs() < 1e-6


# -- teachers ----------------------------------------------------------------------------------------


def _tiny_vit(classes=4):
    return vitkit.create_model(
        "vit_tiny_patch16_224",
        img_size=8,
        patch_size=4,
        depth=1,
        embed_dim=16,
        num_heads=2,
        num_classes=classes,
        in_chans=1,
    )


def test_load_teacher_from_file_and_run_dir(tmp_path):
    model = _tiny_vit()
    save_model(model, tmp_path / "best.safetensors")
    x = torch.randn(2, 1, 8, 8)
    for spec in (str(tmp_path / "best.safetensors"), str(tmp_path)):
        teacher = load_teacher(spec, num_classes=4, in_chans=1)
        teacher.train()
        assert not teacher.model.training
        assert all(not p.requires_grad for p in teacher.parameters())
        torch.testing.assert_close(teacher(x), model.eval()(x))
    with pytest.raises(ValueError, match="predicts 4 classes"):
        load_teacher(str(tmp_path), num_classes=10, in_chans=1)
    with pytest.raises(FileNotFoundError):
        load_teacher(str(tmp_path / "missing"), num_classes=4, in_chans=1)
    with pytest.raises(ValueError, match="not a file, a run folder"):
        load_teacher("no_such_model", num_classes=4, in_chans=1)


def test_frozen_teacher_converts_normalisation_and_size():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.mean(dim=(1, 2, 3))[:, None].repeat(1, 2)

    pixels = torch.rand(2, 1, 8, 8)
    student = (pixels - 0.3) / 0.2
    teacher = FrozenTeacher(Probe(), TeacherInputs(16, (0.5,), (0.25,)), (0.3,), (0.2,))
    teacher(student)
    assert seen["x"].shape == (2, 1, 16, 16)
    expected = F.interpolate((pixels - 0.5) / 0.25, size=(16, 16), mode="bilinear", antialias=True)
    torch.testing.assert_close(seen["x"], expected, atol=1e-5, rtol=0)


# -- LAMB (DeiT III's optimiser) -------------------------------------------------------------------


def test_lamb_matches_timm():
    timm_optim = pytest.importorskip("timm.optim")
    from vitkit.train.lamb import Lamb

    torch.manual_seed(0)
    ours, ref = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3)), nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    ref.load_state_dict(ours.state_dict())

    def groups(m):  # one group with weight decay, one without (trust ratio off there)
        return [
            {"params": [m[0].weight, m[1].weight], "weight_decay": 0.05},
            {"params": [m[0].bias, m[1].bias], "weight_decay": 0.0},
        ]

    opt_ours = Lamb(groups(ours), lr=4e-3, max_grad_norm=1.0)
    opt_ref = timm_optim.Lamb(groups(ref), lr=4e-3, max_grad_norm=1.0, foreach=False)
    for _ in range(5):
        x = torch.randn(8, 6) * 5  # large gradients: the global-norm clip acts
        for m, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# -- the recipes end to end, on tiny Fashion-MNIST IDX files the test writes ----------------------


@pytest.fixture
def idx_data(offline, monkeypatch):  # noqa: F811
    folder = write_idx(offline / "idx", n_train=120, n_test=40)
    monkeypatch.setenv("VITKIT_DATA", str(folder))
    return folder


SMOKE = ["--data", "fashion-mnist", "--smoke", "--seed", "0", "--threads", "1"]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe", ["deit", "deit3"])
def test_recipe_smoke_run(recipe, idx_data, tmp_path):
    out = tmp_path / recipe
    assert main(["train", "--recipe", recipe, "--output", str(out), *SMOKE]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["recipe"] == recipe and config["repeated_aug"] == 3 and config["mixup"] == 0.8
    if recipe == "deit":
        assert config["auto_augment"].startswith("rand-m9") and config["reprob"] == 0.25 and config["ema"]
    else:
        assert config["three_augment"] and config["loss"] == "bce" and config["optimizer"] == "lamb"
        assert config["crop"] == "pad"
    assert "test_top1" in _records(out)[-1]


def test_distillation_smoke_run(idx_data, tmp_path):
    teacher = tmp_path / "teacher"
    assert main(["train", "--output", str(teacher), *SMOKE]) == 0
    student = tmp_path / "student"
    assert (
        main(
            [
                "train",
                "--model",
                "deit_tiny_distilled_patch16_224",
                "--patch-size",
                "7",
                "--output",
                str(student),
                *SMOKE,
                "--teacher",
                str(teacher),
                "--distillation",
                "hard",
                "--distill-alpha",
                "0.5",
            ]
        )
        == 0
    )
    config = yaml.safe_load((student / "config.yaml").read_text())
    assert (config["distillation"], config["teacher"]) == ("hard", str(teacher))
    assert "test_top1" in _records(student)[-1]
    with pytest.raises(ValueError, match="needs a teacher"):
        build_config("deit", {"distillation": "soft"})


def test_paper_recipes_resolve():
    for name in ("deit", "deit3", "swin"):
        config = build_config(name)
        assert config.recipe == name and config.lr_batch and config.data == "imagenet"
    assert build_config("swin").repeated_aug == 1 and build_config("swin").clip_grad == 5.0


def test_recipe_fields_reach_transforms_sampler_and_criterion():
    from vitkit.data.datasets import TensorImageDataset, augment
    from vitkit.data.samplers import build_loader
    from vitkit.train.losses import build_criterion

    config = build_config("deit3")
    aug = augment(config)
    assert aug.three_augment and aug.color_jitter == 0.3 and aug.crop == "pad"
    assert BatchTrainTransform(ImageSpec(28, 1, (0.5,), (0.5,)), aug).extra.active
    data = TensorImageDataset(torch.zeros(10, 1, 28, 28, dtype=torch.uint8), torch.zeros(10, dtype=torch.long))
    loader = build_loader(
        data, train=True, batch_size=4, repeats=config.repeated_aug, repeat_epoch=config.repeated_aug_epoch
    )
    assert isinstance(loader.sampler.sampler, RepeatedAugSampler) and len(loader.sampler) == 10  # in a ResumableSampler
    assert isinstance(build_criterion(config), BinaryCrossEntropy)
    assert augment(build_config("deit")).auto_augment == "rand-m9-mstd0.5-inc1"


def test_yaml_booleans_become_the_literal_they_spell():
    """YAML 1.1 reads `off` as False: `--set amp=off` and a recipe's `amp: off` still mean amp off."""
    from vitkit.train.fields import parse_set
    from vitkit.train.recipes import build_config

    assert build_config("fmnist_demo", parse_set(["amp=off"])).amp == "off"
    assert build_config("fmnist_demo", {"amp": False}).amp == "off"
