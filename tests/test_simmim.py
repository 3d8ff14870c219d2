"""SimMIM: mask geometry and count, loss on masked pixels only, mask-token substitution, the saved
encoder, optimisation (schedule, layer decay) and a short pre-training that lowers the loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import vitkit
from vitkit.factory import load_model
from vitkit.pretrain import MaskGenerator, SimMIM, build_simmim, load_encoder, masked_l1_loss, save_encoder
from vitkit.pretrain.simmim import MaskedL1Metrics, masked_image_loss, save_reconstructions, upsample_mask
from vitkit.train.engine import evaluate, train_one_epoch
from vitkit.train.optim import build_adamw, layer_decay_groups, layer_id, warmup_schedule
from vitkit.weights.vitkit_format import read_metadata

# tiny encoders at 32x32: model patch 4, so an 8x8 mask patch covers 2x2 model patches
TINY = {
    "vit_tiny_patch16_224": dict(img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2),
    "deit_tiny_distilled_patch16_224": dict(img_size=32, patch_size=4, depth=1, embed_dim=32, num_heads=2),
    "swin_tiny_patch4_window7_224": dict(
        img_size=32, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4
    ),
    "swinv2_tiny_window8_256": dict(
        img_size=32, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4
    ),
}
HEAD_KEYS = {
    "vit_tiny_patch16_224": {"head.weight", "head.bias"},
    "deit_tiny_distilled_patch16_224": {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"},
    "swin_tiny_patch4_window7_224": {"head.fc.weight", "head.fc.bias"},
    "swinv2_tiny_window8_256": {"head.fc.weight", "head.fc.bias"},
}


# -- masks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "img, mask_patch, model_patch, ratio, cells, masked",
    [
        (192, 32, 4, 0.6, 36, 22),  # the paper's Swin setting: ceil(21.6)
        (224, 32, 16, 0.6, 49, 30),  # the paper's ViT setting: ceil(29.4)
        (32, 8, 4, 0.6, 16, 10),  # ceil(9.6)
        ((64, 160), 32, 4, 0.7, 10, 7),  # 0.7 x 10 is 7.000000000000001 in floats: still 7
        (32, 4, 4, 0.5, 64, 32),  # mask patch = model patch
    ],
)
def test_mask_count_and_geometry_exact(img, mask_patch, model_patch, ratio, cells, masked):
    gen = MaskGenerator(img, mask_patch, model_patch, ratio)
    assert (gen.num_cells, gen.num_masked) == (cells, masked)
    H, W = (img, img) if isinstance(img, int) else img
    mask = gen(16, torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (16, H // model_patch, W // model_patch)
    s = mask_patch // model_patch
    # each mask-patch cell is all masked or all visible
    blocks = mask.view(16, H // mask_patch, s, W // mask_patch, s)
    assert torch.equal(blocks.all(dim=(2, 4)), blocks.any(dim=(2, 4)))
    # exactly `masked` cells per image, and exactly masked / cells of the patches
    assert torch.equal(blocks.any(dim=(2, 4)).sum(dim=(1, 2)), torch.full((16,), masked))
    assert torch.equal(mask.sum(dim=(1, 2)), torch.full((16,), masked * s * s))
    # random per image, reproducible with a seeded generator
    assert len({tuple(m.flatten().tolist()) for m in mask}) > 1
    assert torch.equal(mask, gen(16, torch.Generator().manual_seed(1)))


def test_mask_positions_uniform():
    gen = MaskGenerator(32, 8, 4, 0.25)  # 4 of 16 cells
    freq = gen(4000, torch.Generator().manual_seed(0))[:, ::2, ::2].float().mean(0)
    assert (freq - 0.25).abs().max() < 0.04


@pytest.mark.parametrize(
    "args, message",
    [
        ((32, 6, 4, 0.6), "multiple of the model's patch size 4"),
        ((40, 16, 4, 0.6), "must divide the image size"),
        (((32, 48), 32, 4, 0.6), "must divide the image size"),
        ((32, 8, 4, 0.0), "mask ratio must be in"),
        ((32, 8, 4, 1.0), "mask ratio must be in"),
    ],
)
def test_mask_generator_rules(args, message):
    with pytest.raises(ValueError, match=message):
        MaskGenerator(*args)


# -- loss -------------------------------------------------------------------------------------------
def test_loss_ignores_unmasked_pixels():
    gen = MaskGenerator(32, 8, 4, 0.6)
    mask = gen(3, torch.Generator().manual_seed(0))
    target, pred = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    pixels = upsample_mask(mask, 4).expand_as(target)
    loss = masked_l1_loss(pred, target, mask, 4)
    # the paper's normalisation: sum over masked pixels and channels / (masked pixels x channels)
    expected = (pred - target).abs()[pixels].sum() / (mask.sum() * 16 * 3)
    torch.testing.assert_close(loss, expected)

    changed = pred.clone()
    changed[~pixels] = torch.randn(int((~pixels).sum())) * 100
    changed[0, 0, ~pixels[0, 0]] = float("inf")
    changed[1, 1, ~pixels[1, 1]] = float("nan")
    changed.requires_grad_(True)
    again = masked_l1_loss(changed, target, mask, 4)
    assert again.item() == loss.item()
    again.backward()
    assert torch.all(changed.grad[~pixels] == 0) and torch.all(changed.grad[pixels] != 0)

    # a change at a single masked pixel does change it
    i = pixels.nonzero()[0].tolist()
    pred[tuple(i)] += 1.0
    assert masked_l1_loss(pred, target, mask, 4).item() != loss.item()


# -- the model -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TINY))
def test_mask_token_replaces_masked_patches(name):
    model = build_simmim(name, in_chans=3, **TINY[name]).eval()
    gen = MaskGenerator(32, 8, 4, 0.6)
    x = torch.randn(2, 3, 32, 32)
    mask = gen(2, torch.Generator().manual_seed(0))
    pixels = upsample_mask(mask, 4).expand_as(x)
    with torch.no_grad():
        out = model(x, mask)
        assert out.shape == x.shape
        # masked pixels never reach the encoder; visible ones do
        noise = torch.randn_like(x) * 5
        assert torch.equal(model.encode(x, mask), model.encode(torch.where(pixels, noise, x), mask))
        assert not torch.allclose(model.encode(x, mask), model.encode(torch.where(pixels, x, noise), mask))
        # nothing masked: the encoder's own forward_features, untouched
        none = torch.zeros_like(mask)
        features = model.encoder.forward_features(x)
        if features.dim() == 3:  # ViT tokens: drop the prefix tokens, back to a (B, D, h, w) map
            grid = 32 // model.stride
            features = features[:, model.encoder.num_prefix_tokens :].transpose(1, 2).reshape(2, -1, grid, grid)
        else:
            features = features.permute(0, 3, 1, 2)
        assert torch.equal(model.encode(x, none), features)
    # the patch-embed hook does not outlive the call
    assert not model.encoder.patch_embed._forward_hooks
    # the mask token is learned
    masked_l1_loss(model.train()(x, mask), x, mask, 4).backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_geometry_and_errors():
    swin = build_simmim("swin_tiny_patch4_window7_224", **TINY["swin_tiny_patch4_window7_224"])
    vit = build_simmim("vit_tiny_patch16_224", **TINY["vit_tiny_patch16_224"])
    assert (swin.patch_size, swin.stride, vit.patch_size, vit.stride) == (4, 32, 4, 4)
    assert swin.decoder[0].out_channels == 32 * 32 * 3 and vit.decoder[0].out_channels == 4 * 4 * 3
    assert "mask_token" in swin.no_weight_decay()
    with pytest.raises(ValueError, match="multiple of the encoder's output stride 32"):
        build_simmim("swin_tiny_patch4_window7_224", **(TINY["swin_tiny_patch4_window7_224"] | {"img_size": 48}))
    with pytest.raises(ValueError, match="does not fit images"):
        vit(torch.randn(2, 3, 32, 32), torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs a vitkit ViT"):
        SimMIM(torch.nn.Linear(2, 2))


# -- the saved encoder -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TINY))
def test_saved_encoder_loads_with_only_the_head_missing(name, tmp_path):
    model = build_simmim(name, in_chans=1, **TINY[name])
    path = tmp_path / "encoder.safetensors"
    save_encoder(model, path)
    saved = load_file(str(path))
    assert not any(k.startswith(("mask_token", "decoder", "encoder.")) for k in saved)
    assert read_metadata(path)["model"] == name and read_metadata(path)["pretrained_with"] == "simmim"

    fresh = vitkit.create_model(name, num_classes=10, in_chans=1, **TINY[name])
    missing = load_encoder(fresh, path)
    assert set(missing) == HEAD_KEYS[name]
    for key, value in fresh.state_dict().items():
        if key in saved:
            assert torch.equal(value, saved[key]), key
    # the vitkit format alone rebuilds the headless encoder
    rebuilt = load_model(path)
    assert rebuilt.config == model.encoder.config

    other = vitkit.create_model(name, num_classes=10, in_chans=3, **TINY[name])
    with pytest.raises(ValueError, match="does not fit this model"):
        load_encoder(other, path)


# -- optimisation ----------------------------------------------------------------------------------
def test_schedule_warmup_cosine_and_multistep():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = warmup_schedule(opt, total_steps=20, warmup_steps=10, warmup_lr_ratio=0.1, min_lr_ratio=0.01)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.55) and lrs[10] == pytest.approx(1.0)
    assert lrs[15] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)

    opt = torch.optim.AdamW([p], lr=1.0)
    sched = warmup_schedule(opt, 10, 2, kind="multistep", milestones=(6, 8), gamma=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_layer_decay_groups():
    vit = vitkit.create_model("vit_tiny_patch16_224", **TINY["vit_tiny_patch16_224"], num_classes=10)
    cfg = vit.config  # depth 2: ids 0 (embedding), 1, 2 (blocks), 3 (norm, head)
    assert [layer_id(n, cfg) for n in ("cls_token", "pos_embed", "patch_embed.proj.weight")] == [0, 0, 0]
    assert [layer_id(n, cfg) for n in ("blocks.0.attn.qkv.weight", "blocks.1.norm1.weight")] == [1, 2]
    assert [layer_id(n, cfg) for n in ("norm.weight", "head.weight")] == [3, 3]
    swin_args = TINY["swin_tiny_patch4_window7_224"] | {"depths": (2, 2, 1, 1)}
    swin = vitkit.create_model("swin_tiny_patch4_window7_224", **swin_args)
    cfg = swin.config  # 6 blocks: ids 1..6; a merging shares the id of the block before it
    names = (
        "layers.0.blocks.1.mlp.fc1.weight",
        "layers.1.downsample.reduction.weight",
        "layers.1.blocks.0.norm1.weight",
    )
    assert [layer_id(n, cfg) for n in names] == [2, 2, 3]
    assert layer_id("layers.3.blocks.0.attn.qkv.weight", cfg) == 6 and layer_id("head.fc.weight", cfg) == 7

    opt = build_adamw(vit, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = dict(vit.named_parameters())
    assert lr_of[id(params["head.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(params["blocks.1.mlp.fc1.weight"])] == pytest.approx(5e-4)
    assert lr_of[id(params["blocks.0.mlp.fc1.weight"])] == pytest.approx(2.5e-4)
    assert lr_of[id(params["pos_embed"])] == pytest.approx(1.25e-4)
    assert decay_of[id(params["blocks.0.mlp.fc1.weight"])] == 0.05
    assert all(decay_of[id(params[n])] == 0.0 for n in ("pos_embed", "cls_token", "norm.weight", "head.bias"))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # the first group carries the peak lr
    # every parameter in exactly one group
    assert sum(len(g["params"]) for g in layer_decay_groups(vit, 0.05, 0.5)) == len(params)


# -- pre-training ----------------------------------------------------------------------------------
def _smooth_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """Random bilinear greyscale images (B, 1, 32, 32): predictable from their visible parts."""
    corners = torch.randn(n, 1, 2, 2, generator=generator)
    return torch.nn.functional.interpolate(corners, size=(32, 32), mode="bilinear", align_corners=True)


def test_pretraining_lowers_the_masked_loss(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    train = [_smooth_images(16, g) for _ in range(4)]
    val = [(_smooth_images(16, g), torch.zeros(16))]  # labelled batches work too: labels are ignored
    model = build_simmim("vit_tiny_patch16_224", in_chans=1, **TINY["vit_tiny_patch16_224"])
    masks = MaskGenerator(32, 8, 4, 0.6)
    epochs = 3
    opt = build_adamw(model, lr=2e-3, weight_decay=0.05)
    sched = warmup_schedule(opt, total_steps=epochs * len(train), warmup_steps=len(train), warmup_lr_ratio=0.01)
    cpu = torch.device("cpu")
    before = evaluate(model, val, device=cpu, metrics=MaskedL1Metrics(masks))["val_loss"]
    loss_fn = masked_image_loss(masks, g)
    history = [
        train_one_epoch(model, loss_fn, train, opt, device=cpu, scheduler=sched)["train_loss"] for _ in range(epochs)
    ]
    after = evaluate(model, val, device=cpu, metrics=MaskedL1Metrics(masks))["val_loss"]
    assert history[-1] < history[0] and after < 0.75 * before, (before, history, after)

    images, _ = val[0]
    mask = masks(4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        rebuilt = model.eval()(images[:4], mask)
    out = tmp_path / "reconstructions.png"
    save_reconstructions(out, images[:4], mask, rebuilt, model.patch_size, mean=(0.5,), std=(0.5,))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["reconstructions.png"]  # no temporary left over


# -- `vitkit pretrain` end to end ----------------------------------------------------------------------
def _write_unlabelled_folder(root, n: int = 40) -> None:
    """Greyscale PNGs of random sizes in nested folders, no class layout."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        size = 28 + 4 * (i % 3)
        img = _smooth_images(1, g)[0, 0]
        img = torch.nn.functional.interpolate(img[None, None], size=(size, size), mode="bilinear")[0, 0]
        pixels = ((img - img.min()) / (img.max() - img.min() + 1e-6) * 255).to(torch.uint8).numpy()
        path = root / f"part{i % 2}" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(path)


TINY_VIT_ARGS = [
    "--model",
    "vit_tiny_patch16_224",
    "--img-size",
    "32",
    "--mask-patch-size",
    "8",
    "--set",
    "model_args={patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2}",
    "--batch-size",
    "8",
    "--seed",
    "0",
    "--threads",
    "1",
    "--workers",
    "0",
    "--set",
    "warmup_epochs=0.5",
    "--set",
    "crop_pct=1.0",
]


def test_pretrain_cli_runs_resumes_and_saves_the_encoder(tmp_path, capsys, monkeypatch):
    from vitkit.cli import main
    from vitkit.pretrain import pretraining
    from vitkit.train.run_folder import read_metrics

    data = tmp_path / "unlabelled"
    _write_unlabelled_folder(data)
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["pretrain", "--data", str(data), "--epochs", "2", *TINY_VIT_ARGS]
    assert main([*args, "--output", str(full)]) == 0
    out = capsys.readouterr().out
    assert "encoder:" in out and "reconstructions:" in out
    for name in (
        "config.yaml",
        "pretrain.yaml",
        "run.json",
        "metrics.jsonl",
        "state.pt",
        "curves.png",
        "encoder.safetensors",
        "reconstructions.png",
    ):
        assert (full / name).is_file(), name
    epochs = [r for r in read_metrics(full) if "step" not in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(k in epochs[0] for k in ("train_loss", "val_loss", "lr", "images_per_s"))

    # a run killed in epoch 2 (after its training steps), then resumed: the same encoder
    calls = []

    def killed(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return runner_evaluate(*a, **k)

    runner_evaluate = pretraining.evaluate
    monkeypatch.setattr(pretraining, "evaluate", killed)
    assert main([*args, "--output", str(part)]) == 130  # Ctrl-C: "interrupted", exit 130
    monkeypatch.setattr(pretraining, "evaluate", runner_evaluate)
    assert [r["epoch"] for r in read_metrics(part) if "step" not in r] == [1]
    assert main(["pretrain", "--resume", str(part), "--threads", "1"]) == 0
    a, b = load_file(str(full / "encoder.safetensors")), load_file(str(part / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [
        [(r["epoch"], r["train_loss"], r["val_loss"]) for r in read_metrics(d) if "step" not in r] for d in (full, part)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 2

    # the encoder fine-tunes: only the head is missing
    model = vitkit.create_model(
        "vit_tiny_patch16_224", num_classes=3, in_chans=1, img_size=32, patch_size=4, depth=1, embed_dim=32, num_heads=2
    )
    assert set(load_encoder(model, full / "encoder.safetensors")) == {"head.weight", "head.bias"}

    # a contradicting resume and a bad mask patch are one-line errors
    assert main(["pretrain", "--resume", str(full), "--mask-ratio", "0.4"]) == 2
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(data),
                "--output",
                str(tmp_path / "bad"),
                *TINY_VIT_ARGS,
                "--mask-patch-size",
                "6",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "contradict" in err and "multiple of the model's patch size 4" in err
    assert not (tmp_path / "bad" / "state.pt").exists()


def test_finetune_fields_rebuild_the_pretrained_architecture(tmp_path):
    from vitkit.train.finetune import finetune_fields, finetune_file, load_finetune_weights

    name = "swin_tiny_patch4_window7_224"
    model = build_simmim(name, in_chans=1, drop_path_rate=0.0, **TINY[name])
    save_encoder(model, tmp_path / "encoder.safetensors")
    fields = finetune_fields(tmp_path)
    assert fields == {
        "model": name,
        "model_args": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "window_size": 4},
        "img_size": 32,
        "in_chans": 1,
    }
    fresh = vitkit.create_model(
        fields["model"], num_classes=5, img_size=fields["img_size"], in_chans=fields["in_chans"], **fields["model_args"]
    )
    said = load_finetune_weights(fresh, tmp_path)
    assert all(k in said for k in HEAD_KEYS[name]) and "pre-trained encoder" in said
    assert finetune_file(tmp_path) == tmp_path / "encoder.safetensors"
    assert fresh.config.drop_path_rate == 0.1  # the variant's default: regularisation is not inherited
    with pytest.raises(FileNotFoundError, match="does not exist"):
        finetune_file(tmp_path / "missing")


def _write_labelled_folder(root, per_class: int = 8) -> None:
    """train/ and val/ with two classes of greyscale PNGs (dark and bright bilinear images)."""
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    for split in ("train", "val"):
        for label, name in enumerate(("dark", "bright")):
            for i in range(per_class):
                img = _smooth_images(1, g)[0, 0]
                img = (img - img.min()) / (img.max() - img.min() + 1e-6) * 0.5 + 0.5 * label
                path = root / split / name / f"{i:02d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((img * 255).to(torch.uint8).numpy(), mode="L").save(path)


def test_train_finetunes_a_pretrained_encoder_with_layer_decay(tmp_path, capsys):
    from safetensors.torch import load_file as load

    from vitkit.cli import main
    from vitkit.train.config import load_run_config

    data = tmp_path / "labelled"
    _write_labelled_folder(data)
    pre = tmp_path / "pre"
    # the train split of a labelled folder pre-trains too (labels unused)
    assert main(["pretrain", "--data", str(data), "--epochs", "1", "--output", str(pre), *TINY_VIT_ARGS]) == 0
    fine = tmp_path / "fine"
    # a vanishing lr: after one epoch the weights are still the encoder's, plus a head
    assert (
        main(
            [
                "train",
                "--finetune",
                str(pre),
                "--data",
                str(data),
                "--epochs",
                "1",
                "--output",
                str(fine),
                "--batch-size",
                "8",
                "--seed",
                "0",
                "--threads",
                "1",
                "--workers",
                "0",
                "--layer-decay",
                "0.75",
                "--lr",
                "1e-12",
                "--set",
                "warmup_lr=1e-12",
                "--set",
                "min_lr=0",
            ]
        )
        == 0
    )
    config = load_run_config(fine)
    assert (config.model, config.img_size, config.in_chans, config.layer_decay) == ("vit_tiny_patch16_224", 32, 1, 0.75)
    assert config.model_args == {"patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}
    encoder, tuned = load(str(pre / "encoder.safetensors")), load(str(fine / "last.safetensors"))
    assert set(tuned) - set(encoder) == {"head.weight", "head.bias"}
    for key, value in encoder.items():
        torch.testing.assert_close(tuned[key], value, atol=1e-6, rtol=0)
    assert "fine-tuning" in capsys.readouterr().out

    with pytest.raises(SystemExit):  # argparse: --layer-decay needs a number
        main(["train", "--finetune", str(pre), "--layer-decay", "x"])
    assert main(["train", "--finetune", str(tmp_path / "nowhere"), "--data", str(data)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_training_and_pretraining_recipes_are_kept_apart(tmp_path, capsys):
    from vitkit.cli import main
    from vitkit.pretrain.settings import PRETRAIN_FIELDS
    from vitkit.train.recipes import PRETRAIN_ONLY_FIELDS, list_recipes

    assert set(PRETRAIN_ONLY_FIELDS) == set(PRETRAIN_FIELDS)
    assert "simmim_fmnist" in list_recipes("pretrain") and "simmim_fmnist" not in list_recipes()
    assert main(["train", "--list-recipes"]) == 0
    assert "simmim_fmnist" not in capsys.readouterr().out
    assert main(["train", "--recipe", "simmim_fmnist", "--smoke"]) == 2
    assert "run it with `vitkit pretrain --recipe simmim_fmnist`" in capsys.readouterr().err
    assert main(["pretrain", "--recipe", "fmnist_demo", "--smoke"]) == 2
    assert "run it with `vitkit train --recipe fmnist_demo`" in capsys.readouterr().err
    own = tmp_path / "mine.yaml"
    own.write_text("model: vit_tiny_patch16_224\nmask_ratio: 0.5\n")
    assert main(["train", "--recipe", str(own), "--smoke"]) == 2
    assert "pre-training fields (mask_ratio)" in capsys.readouterr().err


def test_pretrain_with_two_processes_writes_one_run_and_an_encoder(tmp_path):
    import subprocess
    import sys

    from vitkit.train.run_folder import read_metrics

    data = tmp_path / "unlabelled"
    _write_unlabelled_folder(data)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitkit",
            "pretrain",
            "--nproc",
            "2",
            "--data",
            str(data),
            "--epochs",
            "1",
            "--output",
            "two",
            *TINY_VIT_ARGS,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("encoder:") == 1  # rank 0 reports
    run = tmp_path / "two"
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert [r["epoch"] for r in read_metrics(run) if "step" not in r] == [1]
    encoder = vitkit.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        in_chans=1,
        num_classes=10,
        patch_size=4,
        depth=1,
        embed_dim=32,
        num_heads=2,
    )
    assert set(load_encoder(encoder, run / "encoder.safetensors")) == {"head.weight", "head.bias"}


@pytest.mark.slow  # torch.compile takes about a minute on 2 cores
def test_compiled_pretraining_matches_eager(tmp_path):
    """The mask token enters through a forward hook on patch_embed: torch.compile must keep it."""
    from vitkit.cli import main
    from vitkit.train.run_folder import read_metrics

    data = tmp_path / "unlabelled"
    _write_unlabelled_folder(data)
    args = ["pretrain", "--data", str(data), "--epochs", "1", *TINY_VIT_ARGS]
    assert main([*args, "--output", str(tmp_path / "eager")]) == 0
    assert main([*args, "--output", str(tmp_path / "compiled"), "--compile"]) == 0
    eager, compiled = ([r for r in read_metrics(tmp_path / d) if "step" not in r][-1] for d in ("eager", "compiled"))
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)


def test_a_state_written_by_the_old_pretrain_runner_still_resumes():
    """Before the shared run skeleton, `vitkit pretrain` saved plain (position-keyed) model and optimizer
    states; the skeleton saves name-keyed full states. Both load."""
    from vitkit.train.run_loop import TrainingState

    def state(seed: int) -> TrainingState:
        torch.manual_seed(seed)
        model = build_simmim("vit_tiny_patch16_224", in_chans=1, **TINY["vit_tiny_patch16_224"])
        opt = build_adamw(model, lr=1e-3, weight_decay=0.05)
        sched = warmup_schedule(opt, total_steps=10, warmup_steps=2)
        return TrainingState(model, model, None, None, opt, sched, None)

    old = state(0)
    masks = MaskGenerator(32, 8, 4, 0.6)
    images = _smooth_images(4, torch.Generator().manual_seed(0))
    train_one_epoch(
        old.model,
        masked_image_loss(masks, torch.Generator().manual_seed(1)),
        [images],
        old.optimizer,
        device=torch.device("cpu"),
        scheduler=old.scheduler,
    )
    written = {
        "model": old.model.state_dict(),
        "optimizer": old.optimizer.state_dict(),
        "scheduler": old.scheduler.state_dict(),
        "epoch": 1,
        "global_step": 1,
    }
    for saved in (written, old.state_dict()):
        new = state(1)
        new.load_state_dict(saved)
        assert all(torch.equal(a, b) for a, b in zip(new.model.state_dict().values(), old.model.state_dict().values()))
        pairs = list(zip(new.model.parameters(), old.model.parameters()))
        assert all(torch.equal(new.optimizer.state[a]["exp_avg"], old.optimizer.state[b]["exp_avg"]) for a, b in pairs)
        assert new.scheduler.last_epoch == 1
