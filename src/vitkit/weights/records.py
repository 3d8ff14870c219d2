"""Pretrained weight records: one default record per variant, the weights timm loads by default for
that name (its `default_cfgs`, first tag per architecture), with the preprocessing they expect.

`url` is the file downloaded: timm's HuggingFace hub copy (safetensors, timm names) unless the
authors' own file carries its hash in the name (DeiT, the original ViT ports), then that file.
`origin` is the authors' release of the same weights. `top1` is the ImageNet-1k top-1 (%) the
authors report for exactly these weights; None where they report none (ImageNet-21k pre-training)
or publish it only outside their paper / model card (AugReg: per-run CSV index).
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # Google's ViTs: pixels to [-1, 1]


@dataclass(frozen=True)
class WeightRecord:
    model: str  # vitkit / timm variant name
    tag: str  # timm's pretrained tag: <recipe>_<data>, e.g. augreg2_in21k_ft_in1k
    url: str
    format: str  # checkpoint format of the file at `url` (vitkit.weights.convert.FORMATS)
    num_classes: int
    input_size: tuple[int, int]
    crop_pct: float  # eval: resize the short side to size / crop_pct, then centre-crop `size`
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    top1: float | None
    license: str
    sha256: str | None = None  # full digest or a prefix of it (the hash torch.hub puts in file names)
    origin: str | None = None

    @property
    def name(self) -> str:
        return f"{self.model}.{self.tag}"

    @property
    def filename(self) -> str:
        """File name in the cache: the full name plus the downloaded file's suffix."""
        suffix = "." + self.url.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
        return self.name + suffix


def _hub(model: str, tag: str) -> str:
    return f"https://huggingface.co/timm/{model}.{tag}/resolve/main/model.safetensors"


_GOOGLE = "https://storage.googleapis.com/vit_models/"
_AUGREG = _GOOGLE + "augreg/"
_JX = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/"
_DEIT = "https://dl.fbaipublicfiles.com/deit/"
_SWIN = "https://github.com/SwinTransformer/storage/releases/download/"
_V1, _V2 = _SWIN + "v1.0.0/", _SWIN + "v2.0.0/"


def _vit(
    model: str,
    tag: str,
    size: int,
    crop: float,
    top1: float | None = None,
    origin: str | None = None,
    url: str | None = None,
    fmt: str = "timm",
    sha: str | None = None,
    classes: int = 1000,
) -> WeightRecord:
    return WeightRecord(model, tag, url or _hub(model, tag), fmt, classes, (size, size), crop, "bicubic",
                        INCEPTION_MEAN, INCEPTION_STD, top1, "apache-2.0", sha, origin)  # fmt: skip


def _fb(
    model: str,
    tag: str,
    size: int,
    top1: float | None,
    url: str | None = None,
    fmt: str = "timm",
    sha: str | None = None,
    origin: str | None = None,
) -> WeightRecord:
    crop = 0.9 if size == 224 else 1.0
    return WeightRecord(model, tag, url or _hub(model, tag), fmt, 1000, (size, size), crop, "bicubic",
                        IMAGENET_MEAN, IMAGENET_STD, top1, "apache-2.0", sha, origin)  # fmt: skip


def _ms(model: str, tag: str, size: int, top1: float, origin: str, classes: int = 1000) -> WeightRecord:
    crop = 1.0 if size == 384 else 0.9
    return WeightRecord(model, tag, _hub(model, tag), "timm", classes, (size, size), crop, "bicubic",
                        IMAGENET_MEAN, IMAGENET_STD, top1, "mit", None, origin)  # fmt: skip


_AUGREG_RUNS = {  # AugReg (Steiner et al. 2021, "How to train your ViT?") i21k -> i1k fine-tunes
    "vit_tiny_patch16": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
    "vit_small_patch16": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
    "vit_small_patch32": "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
    "vit_base_patch16": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
    "vit_base_patch32_224": "B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0",
    "vit_base_patch32_384": "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0",
    "vit_large_patch16": "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1",
}


def _augreg(model: str, size: int) -> WeightRecord:
    run = _AUGREG_RUNS.get(model.rsplit("_", 1)[0]) or _AUGREG_RUNS[model]
    lr = "0.01" if model.startswith(("vit_base_patch16", "vit_large")) else "0.03"
    origin = f"{_AUGREG}{run}--imagenet2012-steps_20k-lr_{lr}-res_{size}.npz"
    return _vit(model, "augreg_in21k_ft_in1k", size, 0.9 if size == 224 else 1.0, origin=origin)


RECORDS: tuple[WeightRecord, ...] = (
    # -- ViT (Dosovitskiy et al. 2021; AugReg, Steiner et al. 2021) ------------------------------
    *(
        _augreg(f"vit_{s}_{p}_{i}", i)
        for s, p in (("tiny", "patch16"), ("small", "patch16"), ("small", "patch32"), ("large", "patch16"))
        for i in (224, 384)
    ),  # fmt: skip
    _augreg("vit_base_patch16_384", 384),
    _augreg("vit_base_patch32_224", 224),
    _augreg("vit_base_patch32_384", 384),
    # timm's own re-fine-tune of the AugReg in21k B/16 (timm's default for this name)
    _vit("vit_base_patch16_224", "augreg2_in21k_ft_in1k", 224, 0.9),
    # original ImageNet-21k releases without their classifier (timm: num_classes=0)
    _vit(
        "vit_large_patch32_224", "orig_in21k", 224, 0.9, classes=0, origin=_GOOGLE + "imagenet21k/ViT-L_32.npz"
    ),  # fmt: skip
    _vit(
        "vit_huge_patch14_224", "orig_in21k", 224, 0.9, classes=0, origin=_GOOGLE + "imagenet21k/ViT-H_14.npz"
    ),  # fmt: skip
    # the original fine-tune, ported by timm (file name carries its sha256 prefix)
    _vit(
        "vit_large_patch32_384",
        "orig_in21k_ft_in1k",
        384,
        1.0,
        url=_JX + "jx_vit_large_p32_384-9b920ba8.pth",
        sha="9b920ba8",
        origin=_GOOGLE + "imagenet21k+imagenet2012/ViT-L_32.npz",
    ),  # fmt: skip
    # ImageNet-21k pre-training with the tanh pre-logits layer and the 21843-way head (timm <= 0.6 ports)
    _vit(
        "vit_base_patch16_224_in21k",
        "orig_in21k",
        224,
        0.9,
        classes=21843,
        sha="e5005f0a",
        url=_JX + "jx_vit_base_patch16_224_in21k-e5005f0a.pth",
    ),  # fmt: skip
    _vit(
        "vit_base_patch32_224_in21k",
        "orig_in21k",
        224,
        0.9,
        classes=21843,
        sha="8db57226",
        url=_JX + "jx_vit_base_patch32_224_in21k-8db57226.pth",
    ),  # fmt: skip
    _vit(
        "vit_large_patch16_224_in21k",
        "orig_in21k",
        224,
        0.9,
        classes=21843,
        sha="606da67d",
        url=_JX + "jx_vit_large_patch16_224_in21k-606da67d.pth",
    ),  # fmt: skip
    _vit(
        "vit_large_patch32_224_in21k",
        "orig_in21k",
        224,
        0.9,
        classes=21843,
        sha="9046d2e7",
        url=_JX + "jx_vit_large_patch32_224_in21k-9046d2e7.pth",
    ),  # fmt: skip
    # too large for a GitHub release: Google's own npz
    _vit(
        "vit_huge_patch14_224_in21k",
        "orig_in21k",
        224,
        0.9,
        classes=21843,
        fmt="jax",
        url=_GOOGLE + "imagenet21k/ViT-H_14.npz",
    ),  # fmt: skip
    # -- DeiT: top-1 from facebookresearch/deit README_deit.md (the paper's Table 7 rounds differently)
    _fb(
        "deit_tiny_patch16_224", "fb_in1k", 224, 72.2, url=_DEIT + "deit_tiny_patch16_224-a1311bcf.pth", sha="a1311bcf"
    ),  # fmt: skip
    _fb(
        "deit_small_patch16_224",
        "fb_in1k",
        224,
        79.9,
        url=_DEIT + "deit_small_patch16_224-cd65a155.pth",
        sha="cd65a155",
    ),  # fmt: skip
    _fb(
        "deit_base_patch16_224", "fb_in1k", 224, 81.8, url=_DEIT + "deit_base_patch16_224-b5f2ef4d.pth", sha="b5f2ef4d"
    ),  # fmt: skip
    _fb(
        "deit_base_patch16_384", "fb_in1k", 384, 82.9, url=_DEIT + "deit_base_patch16_384-8de9b5d1.pth", sha="8de9b5d1"
    ),  # fmt: skip
    _fb(
        "deit_tiny_distilled_patch16_224",
        "fb_in1k",
        224,
        74.5,
        url=_DEIT + "deit_tiny_distilled_patch16_224-b40b3cf7.pth",
        sha="b40b3cf7",
    ),  # fmt: skip
    _fb(
        "deit_small_distilled_patch16_224",
        "fb_in1k",
        224,
        81.2,
        url=_DEIT + "deit_small_distilled_patch16_224-649709d9.pth",
        sha="649709d9",
    ),  # fmt: skip
    _fb(
        "deit_base_distilled_patch16_224",
        "fb_in1k",
        224,
        83.4,
        url=_DEIT + "deit_base_distilled_patch16_224-df68dfff.pth",
        sha="df68dfff",
    ),  # fmt: skip
    _fb(
        "deit_base_distilled_patch16_384",
        "fb_in1k",
        384,
        85.2,
        url=_DEIT + "deit_base_distilled_patch16_384-d0272ac0.pth",
        sha="d0272ac0",
    ),  # fmt: skip
    # -- DeiT III (ImageNet-1k): top-1 from facebookresearch/deit README_revenge.md; the medium
    # model is released without a reported accuracy
    _fb("deit3_small_patch16_224", "fb_in1k", 224, 81.4, origin=_DEIT + "deit_3_small_224_1k.pth"),
    _fb("deit3_small_patch16_384", "fb_in1k", 384, 83.4, origin=_DEIT + "deit_3_small_384_1k.pth"),
    _fb("deit3_medium_patch16_224", "fb_in1k", 224, None, origin=_DEIT + "deit_3_medium_224_1k.pth"),
    _fb("deit3_base_patch16_224", "fb_in1k", 224, 83.8, origin=_DEIT + "deit_3_base_224_1k.pth"),
    _fb("deit3_base_patch16_384", "fb_in1k", 384, 85.0, origin=_DEIT + "deit_3_base_384_1k.pth"),
    _fb("deit3_large_patch16_224", "fb_in1k", 224, 84.9, origin=_DEIT + "deit_3_large_224_1k.pth"),
    _fb("deit3_large_patch16_384", "fb_in1k", 384, 85.8, origin=_DEIT + "deit_3_large_384_1k.pth"),
    _fb("deit3_huge_patch14_224", "fb_in1k", 224, 85.2, origin=_DEIT + "deit_3_huge_224_1k.pth"),
    # -- Swin: top-1 from microsoft/Swin-Transformer MODELHUB.md --------------------------------
    _ms("swin_tiny_patch4_window7_224", "ms_in1k", 224, 81.2, _V1 + "swin_tiny_patch4_window7_224.pth"),
    _ms(
        "swin_small_patch4_window7_224",
        "ms_in22k_ft_in1k",
        224,
        83.2,
        _SWIN + "v1.0.8/swin_small_patch4_window7_224_22kto1k_finetune.pth",
    ),  # fmt: skip
    _ms(
        "swin_base_patch4_window7_224", "ms_in22k_ft_in1k", 224, 85.2, _V1 + "swin_base_patch4_window7_224_22kto1k.pth"
    ),  # fmt: skip
    _ms(
        "swin_base_patch4_window12_384",
        "ms_in22k_ft_in1k",
        384,
        86.4,
        _V1 + "swin_base_patch4_window12_384_22kto1k.pth",
    ),  # fmt: skip
    _ms(
        "swin_large_patch4_window7_224",
        "ms_in22k_ft_in1k",
        224,
        86.3,
        _V1 + "swin_large_patch4_window7_224_22kto1k.pth",
    ),  # fmt: skip
    _ms(
        "swin_large_patch4_window12_384",
        "ms_in22k_ft_in1k",
        384,
        87.3,
        _V1 + "swin_large_patch4_window12_384_22kto1k.pth",
    ),  # fmt: skip
    # -- Swin V2: same source -------------------------------------------------------------------
    _ms("swinv2_tiny_window8_256", "ms_in1k", 256, 81.8, _V2 + "swinv2_tiny_patch4_window8_256.pth"),
    _ms("swinv2_tiny_window16_256", "ms_in1k", 256, 82.8, _V2 + "swinv2_tiny_patch4_window16_256.pth"),
    _ms("swinv2_small_window8_256", "ms_in1k", 256, 83.7, _V2 + "swinv2_small_patch4_window8_256.pth"),
    _ms("swinv2_small_window16_256", "ms_in1k", 256, 84.1, _V2 + "swinv2_small_patch4_window16_256.pth"),
    _ms("swinv2_base_window8_256", "ms_in1k", 256, 84.2, _V2 + "swinv2_base_patch4_window8_256.pth"),
    _ms("swinv2_base_window16_256", "ms_in1k", 256, 84.6, _V2 + "swinv2_base_patch4_window16_256.pth"),
    _ms("swinv2_base_window12_192", "ms_in22k", 192, None, _V2 + "swinv2_base_patch4_window12_192_22k.pth", 21841),
    _ms(
        "swinv2_base_window12to16_192to256",
        "ms_in22k_ft_in1k",
        256,
        86.2,
        _V2 + "swinv2_base_patch4_window12to16_192to256_22kto1k_ft.pth",
    ),  # fmt: skip
    _ms(
        "swinv2_base_window12to24_192to384",
        "ms_in22k_ft_in1k",
        384,
        87.1,
        _V2 + "swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth",
    ),  # fmt: skip
    _ms("swinv2_large_window12_192", "ms_in22k", 192, None, _V2 + "swinv2_large_patch4_window12_192_22k.pth", 21841),
    _ms(
        "swinv2_large_window12to16_192to256",
        "ms_in22k_ft_in1k",
        256,
        86.9,
        _V2 + "swinv2_large_patch4_window12to16_192to256_22kto1k_ft.pth",
    ),  # fmt: skip
    _ms(
        "swinv2_large_window12to24_192to384",
        "ms_in22k_ft_in1k",
        384,
        87.6,
        _V2 + "swinv2_large_patch4_window12to24_192to384_22kto1k_ft.pth",
    ),  # fmt: skip
)
