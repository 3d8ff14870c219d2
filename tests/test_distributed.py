"""Multi-process training pieces on 2 CPU processes (gloo, 127.0.0.1): the engine's metrics cover the
whole validation set, DDP and FSDP2 (per block, activation checkpointing) end equal to one process
with the doubled batch, the EMA follows under FSDP, full state dicts load into the unsharded model and
back into a sharded one; plus the single-process identities and the option errors.

One `torch.multiprocessing.spawn` runs every multi-process check (torch starts in ~5 s per process).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import vitkit
from vitkit.data.datasets import TensorImageDataset
from vitkit.data.samplers import EvenBatchSampler, build_loader, even_batches
from vitkit.train import parallel as P
from vitkit.train.engine import evaluate
from vitkit.train.parallel import get_rank, get_world_size, is_distributed, is_main

WORLD = 2
BATCH = 2  # per process; the single-process reference uses WORLD * BATCH
STEPS = 3
TRAIN_SAMPLES = 16
EVAL_SAMPLES = 7  # odd: the ranks' shares differ by one image
# name -> (model, overrides): a depth-reduced ViT-H and Swin V2-G with tiny widths
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_h": ("vit_huge_patch14_224", dict(depth=2, embed_dim=64, num_heads=4, img_size=28)),
    "swinv2_g": (
        "swinv2_giant_window12_192",
        dict(
            depths=(1, 1, 2, 1),
            embed_dim=16,
            num_heads=(1, 2, 4, 8),
            window_size=4,
            img_size=64,
            extra_norm_every_n_blocks=2,
            drop_path_rate=0.0,
        ),
    ),
}


def _model(case: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    name, overrides = CASES[case]
    return vitkit.create_model(name, num_classes=5, in_chans=1, **overrides)


def _data(case: str, n: int, seed: int) -> TensorImageDataset:
    size = CASES[case][1]["img_size"]
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=gen)
    return TensorImageDataset(images, torch.randint(0, 5, (n,), generator=gen), transform=lambda x: x.float() / 255)


def _loader(case: str, *, train: bool, batch: int):
    data = _data(case, TRAIN_SAMPLES, seed=1) if train else _data(case, EVAL_SAMPLES, seed=2)
    loader = build_loader(
        data, train=train, batch_size=batch, seed=3, workers=0, rank=get_rank(), world_size=get_world_size()
    )
    if train:
        sampler: Any = loader.sampler  # the sharded training sampler
        sampler.set_epoch(1)
    return loader


def _train(model: torch.nn.Module, case: str, batch: int, ema: AveragedModel | None = None) -> torch.optim.Optimizer:
    """STEPS AdamW steps with gradient clipping on this process's share; the EMA follows each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for step, (x, y) in enumerate(_loader(case, train=True, batch=batch)):
        if step == STEPS:
            break
        F.cross_entropy(model(x), y).backward()
        P.clip_grad_norm(model, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(model)
    return opt


def _ema(model: torch.nn.Module) -> AveragedModel:
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)


def _worker(rank: int, out: str, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    device = P.init_distributed("cpu")
    cpu = torch.device("cpu")
    results: dict[str, object] = {"rank": get_rank(), "world": get_world_size()}
    try:
        # the training shares: disjoint, covering the set
        shares: list[Any] = [None] * WORLD
        torch.distributed.all_gather_object(shares, list(_loader("vit_h", train=True, batch=BATCH).sampler))
        results["shares"] = shares
        # the engine's metrics over the whole validation set (plain model, the same on every rank)
        results["eval"] = evaluate(_model("vit_h"), _loader("vit_h", train=False, batch=2), device=cpu)
        # DDP (the default strategy)
        ddp = P.wrap(_model("vit_h"), device)
        _train(ddp, "vit_h", BATCH)
        results["ddp"] = P.full_model_state(ddp)
        # FSDP2 per block with activation checkpointing, for both families, with an EMA beside
        for case in CASES:
            model = _model(case)
            ema = _ema(model)
            if rank == 1:  # other local weights: wrapping must broadcast rank 0's
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1.0)
            model = P.wrap(model, device, "fsdp")
            P.wrap_ema(ema, device, "fsdp")
            results["checkpointing"] = all(getattr(m, "grad_checkpointing", True) for m in model.modules())
            opt = _train(model, case, BATCH, ema)
            state = P.full_model_state(model)
            optim_state = P.full_optimizer_state(model, opt)
            results[f"fsdp_{case}"] = state
            results[f"fsdp_{case}_optim"] = optim_state
            results[f"fsdp_{case}_ema"] = P.full_model_state(ema.module)
            # evaluation under FSDP: 7 images, batch 3: shares of 4 and 3 images both run 2 batches
            results[f"fsdp_{case}_eval"] = evaluate(
                model, even_batches(_loader(case, train=False, batch=3), P.get_world_size()), device=cpu
            )
            # resume: the full states load into a fresh sharded model (only rank 0 holds them)
            fresh = P.wrap(_model(case, seed=5), device, "fsdp")
            fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3, weight_decay=0.05)
            P.load_full_state(fresh, state, fresh_opt, optim_state)
            results[f"fsdp_{case}_reloaded"] = P.full_model_state(fresh)
            results[f"fsdp_{case}_reloaded_optim"] = P.full_optimizer_state(fresh, fresh_opt)
        name = "rank0.pt" if is_main() else "rank1.pt"
        torch.save(results if is_main() else {"rank": get_rank(), "state": results["ddp"]}, os.path.join(out, name))
        torch.distributed.barrier()
    finally:
        P.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dist")
    torch.multiprocessing.spawn(_worker, args=(str(out), _free_port()), nprocs=WORLD, join=True)
    results = torch.load(out / "rank0.pt", weights_only=True)
    results["rank1"] = torch.load(out / "rank1.pt", weights_only=True)
    return results


def _reference(case: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, AveragedModel]:
    """One process, batch WORLD * BATCH (the same samples per step as WORLD processes x BATCH)."""
    model = _model(case)
    ema = _ema(model)
    opt = _train(model, case, WORLD * BATCH, ema)
    return model, opt, ema


# 3 AdamW steps at lr 1e-3 move a weight by up to 3e-3; the two ranks' gradients are summed in another order
# than one process's, and Adam's normalised update carries that rounding into the weights: 1.3e-5 at most
# seen (patch_embed's convolution on an AVX2-only CPU, whose kernels block the reduction differently)
_TOL = 3e-5


def _assert_same(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tol: float = _TOL) -> None:
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        diff = (state[key].float() - value.float()).abs().max().item()
        assert diff <= tol, f"{key}: max abs diff {diff:.3g}"


def _eval_reference(model: torch.nn.Module, case: str) -> dict:
    loader = build_loader(_data(case, EVAL_SAMPLES, seed=2), train=False, batch_size=EVAL_SAMPLES, workers=0)
    return evaluate(model, loader, device=torch.device("cpu"))


def test_ranks_and_disjoint_shares(two_ranks):
    assert two_ranks["rank"] == 0 and two_ranks["world"] == WORLD
    assert two_ranks["rank1"]["rank"] == 1
    shares = two_ranks["shares"]
    assert set(shares[0]).isdisjoint(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(TRAIN_SAMPLES))
    assert two_ranks["rank1"]["state"] == {}  # full states live on rank 0 only


def test_metrics_cover_the_whole_validation_set(two_ranks):
    got, want = two_ranks["eval"], _eval_reference(_model("vit_h"), "vit_h")
    assert got["samples"] == want["samples"] == EVAL_SAMPLES
    assert got["top1"] == want["top1"] and got["top5"] == want["top5"]
    assert abs(got["loss"] - want["loss"]) < 1e-6


def test_ddp_equals_one_process_with_the_doubled_batch(two_ranks):
    reference, _, _ = _reference("vit_h")
    _assert_same(two_ranks["ddp"], reference.state_dict())
    assert (two_ranks["ddp"]["head.weight"] - _model("vit_h").head.weight).abs().max() > 1e-4  # it trained


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_matches_one_process_and_loads_unsharded(two_ranks, case):
    assert two_ranks["checkpointing"] is True
    state = two_ranks[f"fsdp_{case}"]
    name, overrides = CASES[case]
    unsharded = vitkit.create_model(name, num_classes=5, in_chans=1, **overrides)
    unsharded.load_state_dict(state, strict=True)
    reference, opt, ema = _reference(case)
    _assert_same(state, reference.state_dict())
    _assert_same(two_ranks[f"fsdp_{case}_ema"], ema.module.state_dict())
    # evaluation of the sharded model with even batches: every image once
    got, want = two_ranks[f"fsdp_{case}_eval"], _eval_reference(unsharded, case)
    assert got["samples"] == EVAL_SAMPLES and got["top1"] == want["top1"]
    assert abs(got["loss"] - want["loss"]) < 1e-5
    # the optimizer state is keyed by parameter names: it fits any process count
    optim = two_ranks[f"fsdp_{case}_optim"]
    assert set(optim["state"]) == {n for n, _ in reference.named_parameters()}
    for n, p in reference.named_parameters():
        assert optim["state"][n]["step"].item() == STEPS
        _assert_same({n: optim["state"][n]["exp_avg"]}, {n: opt.state[p]["exp_avg"]})
    # and sharded again: the reloaded model and optimizer gather to the same states, bit for bit
    _assert_same(two_ranks[f"fsdp_{case}_reloaded"], state, tol=0.0)
    reloaded = two_ranks[f"fsdp_{case}_reloaded_optim"]["state"]
    for n in optim["state"]:
        _assert_same(reloaded[n], optim["state"][n], tol=0.0)


def test_single_process_helpers_are_identities():
    assert not is_distributed() and is_main() and get_world_size() == 1
    model = torch.nn.Linear(2, 2)
    assert P.wrap(model, torch.device("cpu")) is model
    assert P.full_model_state(model).keys() == model.state_dict().keys()
    assert P.rank_seed(7) == 7 and P.rank_seed(7, rank=3) == 10
    loader = build_loader(_data("vit_h", 5, seed=0), train=False, batch_size=2, workers=0)
    assert even_batches(loader, 1) is loader
    assert P.init_distributed("cpu") == torch.device("cpu") and not torch.distributed.is_initialized()


def test_even_batches_split_each_share_into_the_same_count():
    for total, world, batch in [(7, 2, 3), (9, 4, 2), (10, 3, 4), (64, 2, 32)]:
        counts = set()
        seen = []
        for rank in range(world):
            sampler = range(rank, total, world)
            batches = list(EvenBatchSampler(sampler, batch, total, world))
            counts.add(len(batches))
            assert all(0 < len(b) <= batch for b in batches)
            seen += [i for b in batches for i in b]
        assert len(counts) == 1 and sorted(seen) == list(range(total))
    with pytest.raises(ValueError, match="cannot give each of 4 processes"):
        EvenBatchSampler(range(3, 3, 4), 2, 3, 4)


def test_fsdp_shards_the_blocks_a_model_names_and_other_models_whole():
    class Named(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))

        def block_types(self) -> tuple[type, ...]:
            return (torch.nn.Linear,)

    named = Named()
    assert P.shard_units(named) == [named.blocks[0], named.blocks[2]]
    assert P.shard_units(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []  # e.g. a torchvision student: whole


def test_option_errors(monkeypatch):
    model = vitkit.create_model("vit_tiny_patch16_224", depth=1, img_size=32)
    with pytest.raises(ValueError, match="--fsdp-offload needs CUDA"):
        P.wrap(model, torch.device("cpu"), "fsdp", offload=True)
    with pytest.raises(ValueError, match="--fsdp-offload needs --fsdp"):
        P.wrap(model, torch.device("cpu"), "ddp", offload=True)
    with pytest.raises(RuntimeError, match="needs a process group"):
        P.wrap(model, torch.device("cpu"), "fsdp")
    with pytest.raises(ValueError, match="--nproc must be >= 1"):
        P.launch(0, ["train"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 must be in"):
        P.env_world()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP2's CPU offload needs CUDA; this machine has none")
def test_fsdp_offload_on_cuda(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    try:
        model = vitkit.create_model("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=3).cuda()
        model = P.wrap(model, torch.device("cuda"), "fsdp", offload=True)
        assert all(p.device.type == "cpu" for p in model.parameters())  # kept on the CPU between uses
        model(torch.randn(2, 3, 32, 32, device="cuda")).float().sum().backward()
        assert all(p.grad.device.type == "cpu" for p in model.parameters())
    finally:
        P.destroy()
