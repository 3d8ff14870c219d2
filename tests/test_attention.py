"""`vitkit attention`: recording leaves logits unchanged, rollout arithmetic and prefix tokens, maps of
a trained ViT sit on the object, Swin CAM is exact for its head, the CLI writes a PNG."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vitkit
from vitkit.cli import main
from vitkit.layers import kernels
from vitkit.layers.attention import set_attention_dtype
from vitkit.tools.attention_maps import (
    attention_map,
    class_activation_maps,
    record_attention,
    rollout,
    upsample,
)
from vitkit.weights.vitkit_format import save_model


@pytest.mark.parametrize(
    "name,extra",
    [
        ("deit_tiny_distilled_patch16_224", {}),
        ("vit_small_patch16_224", {"global_pool": "avg"}),
        ("deit3_small_patch16_224", {}),
    ],
)
def test_recording_leaves_logits_unchanged(name, extra):
    model = vitkit.create_model(name, depth=2, img_size=64, **extra).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
    logits, attns = record_attention(model, x)
    assert torch.equal(plain, logits)
    n = 16 + model.num_prefix_tokens
    assert len(attns) == 2 and attns[0].shape == (2, model.config.num_heads, n, n)
    assert torch.allclose(attns[0].sum(-1), torch.ones(2, model.config.num_heads, n))
    assert all(not m.record_attn and m.last_attn is None for m in model.attention_modules())  # switched off


def test_rollout_is_the_product_of_identity_mixed_layers():
    attns = [torch.rand(1, 3, 5, 5).softmax(-1) for _ in range(3)]
    expected = torch.eye(5)
    for a in attns:
        layer = 0.5 * a[0].mean(0) + 0.5 * torch.eye(5)  # rows of A sum to 1: (A + I) / 2
        expected = layer @ expected
    joint = rollout(attns)[0]
    assert torch.allclose(joint, expected, atol=1e-6)
    assert torch.allclose(joint.sum(-1), torch.ones(5))


def test_distilled_map_reads_both_prefix_tokens():
    model = vitkit.create_model("deit_tiny_distilled_patch16_224", depth=2, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    _, attns = record_attention(model, x)
    (amap,) = attention_map(model, x, "last")
    assert amap.heat.shape == (4, 4)  # 16 patches: both prefix tokens dropped
    rows = attns[-1][0].mean(0)[[0, 1], 2:].mean(0)  # class and distillation rows, patch columns
    assert torch.allclose(amap.heat.flatten(), rows / rows.sum(), atol=1e-6)


def _bright_object_images(n: int, seed: int, img: int = 16, side: int = 8):
    """Dark images of random brightness level with one square object: class 0 bright, class 1 dimmer.

    The background level varies more than the object's share of the mean, so the class can be read
    only from the object's own pixels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    r = torch.randint(0, img - side + 1, (n,), generator=g)
    c = torch.randint(0, img - side + 1, (n,), generator=g)
    ar = torch.arange(img)
    rows = (ar[None] >= r[:, None]) & (ar[None] < (r + side)[:, None])
    cols = (ar[None] >= c[:, None]) & (ar[None] < (c + side)[:, None])
    obj = rows[:, :, None] & cols[:, None, :]  # (n, img, img)
    level = 0.35 * torch.rand(n, 1, 1, 1, generator=g)
    x = level + 0.1 * torch.rand(n, 1, img, img, generator=g)
    x = torch.where(obj[:, None], torch.where(y == 0, 1.0, 0.65)[:, None, None, None], x)
    return (x - 0.25) / 0.35, y, obj


def _mass_on_object(model, x, obj, method) -> torch.Tensor:
    maps = attention_map(model, x, method)
    return torch.stack([(upsample(m.heat, obj.shape[-2:]) * o).sum() for m, o in zip(maps, obj)])


def test_trained_vit_looks_at_the_object():
    model = vitkit.create_model(
        "deit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        in_chans=1,
        num_classes=2,
        depth=2,
        embed_dim=64,
        num_heads=4,
    )
    x_test, y_test, obj = _bright_object_images(128, seed=1)
    area = obj.float().mean().item()  # 0.25
    before = {m: _mass_on_object(model, x_test, obj, m).mean().item() for m in ("rollout", "last")}

    x_train, y_train, _ = _bright_object_images(2048, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    model.train()
    for _ in range(150):
        idx = torch.randint(0, len(x_train), (64,))
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x_test).argmax(-1) == y_test).float().mean() > 0.95

    rollout_mass = _mass_on_object(model, x_test, obj, "rollout")
    last_mass = _mass_on_object(model, x_test, obj, "last")
    # untrained: about the object's share of the image; trained: well above it
    assert before["rollout"] < 1.3 * area and before["last"] < 1.3 * area
    assert last_mass.mean() > 0.5, f"last-layer map: {last_mass.mean():.2f} of its mass on the object"
    # (0.66 and 0.72 here; rollout is the more diffuse: identity mixing and patch-to-patch attention)
    assert rollout_mass.mean() > 1.8 * area, f"rollout: {rollout_mass.mean():.2f} on an object of area {area}"
    # the peak of the rollout map is on the object
    maps = attention_map(model, x_test, "rollout")
    frac = F.avg_pool2d(obj[:, None].float(), 4)[:, 0]  # object share of each patch
    on = torch.stack([f.flatten()[m.heat.flatten().argmax()] > 0.5 for m, f in zip(maps, frac)])
    assert on.float().mean() > 0.9


def _small_swin() -> torch.nn.Module:
    return vitkit.create_model(
        "swin_tiny_patch4_window7_224",
        depths=(2, 1),
        num_heads=(3, 6),
        pretrained_window_sizes=(0, 0),
        img_size=56,
        num_classes=5,
    ).eval()


def test_swin_cam_is_exact_for_the_linear_head():
    model = _small_swin()
    x = torch.randn(2, 3, 56, 56)
    logits, cams = class_activation_maps(model, x)
    assert cams.shape == (2, 5, 7, 7)  # the last stage's map
    assert torch.allclose(cams.mean(dim=(2, 3)) + model.head.fc.bias, logits, atol=1e-5)
    maps = attention_map(model, x)  # cam is Swin's default
    assert maps[0].method == "cam" and maps[0].class_index == int(logits[0].argmax())
    assert torch.allclose(maps[0].heat.sum(), torch.tensor(1.0)) and (maps[0].heat >= 0).all()
    (third,) = attention_map(model, x[:1], "cam", class_index=3)
    expected = cams[0, 3].clamp(min=0)
    assert torch.allclose(third.heat, expected / expected.sum(), atol=1e-6)


def test_cli_writes_png(tmp_path, capsys):
    vit = vitkit.create_model("deit_tiny_distilled_patch16_224", depth=2, img_size=64, num_classes=3)
    save_model(vit, tmp_path / "vit.safetensors")
    save_model(_small_swin(), tmp_path / "swin.safetensors")
    Image.fromarray((torch.rand(80, 60, 3) * 255).byte().numpy()).save(tmp_path / "img.png")
    img = str(tmp_path / "img.png")

    for ckpt, method in (("vit", "rollout"), ("vit", "last"), ("swin", "cam")):
        out = tmp_path / f"{ckpt}_{method}.png"
        ckpt_file = str(tmp_path / f"{ckpt}.safetensors")
        argv = ["attention", img, "--checkpoint", ckpt_file, "--method", method, "--out", str(out)]
        assert main(argv) == 0
        assert f"{method} map of" in capsys.readouterr().out
        with Image.open(out) as png:
            assert png.format == "PNG" and png.size[0] > png.size[1] > 100  # two panels side by side

    swin = ["attention", img, "--checkpoint", str(tmp_path / "swin.safetensors")]
    assert main(swin + ["--method", "rollout", "--out", str(tmp_path / "x.png")]) == 2
    assert "use --method cam" in capsys.readouterr().err
    vit_args = ["attention", img, "--checkpoint", str(tmp_path / "vit.safetensors")]
    assert main(vit_args + ["--class-index", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "cam only" in capsys.readouterr().err
    assert main(["attention", str(tmp_path / "none.png"), "--checkpoint", str(tmp_path / "vit.safetensors")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "name,fields",
    [
        ("deit_small_patch16_224", dict(depth=2, img_size=64)),
        (
            "swin_tiny_patch4_window7_224",
            dict(depths=(2, 2), num_heads=(3, 6), embed_dim=48, img_size=56, pretrained_window_sizes=(0, 0)),
        ),
        (
            "swinv2_tiny_window8_256",
            dict(depths=(2, 2), num_heads=(3, 6), embed_dim=48, img_size=64, pretrained_window_sizes=(0, 0)),
        ),
    ],
)
def test_attention_in_bf16_inside_an_fp32_model(name, fields, request):
    """set_attention_dtype(model, bf16): fp32 in and out, bf16 attention within 2% of the fp32 model's
    largest logit; unchanged while gradients are needed (training never takes it); None restores fp32."""
    torch.manual_seed(0)
    # Swin's torch path: where vitkit's window kernel is built it takes Swin inference instead, in fp32
    # (tests/test_kernels.py)
    previous = kernels.set_kernels(False)
    request.addfinalizer(lambda: kernels.set_kernels(previous))
    model = vitkit.create_model(name, num_classes=10, **fields).eval()
    for p in model.parameters():  # weights away from the init, so attention is not near-uniform
        p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, *model.config.img_size)
    with torch.no_grad():
        ref = model(x)
    assert set_attention_dtype(model, torch.bfloat16) > 0
    with torch.no_grad():
        out = model(x)
    assert out.dtype == torch.float32 and not torch.equal(out, ref)
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()
    # gradients on: fp32 attention (the linear layers take their training path: equal to float rounding)
    torch.testing.assert_close(model(x).detach(), ref, rtol=1e-5, atol=1e-5)
    set_attention_dtype(model, None)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
