"""Several processes, one run: torchrun's environment, DDP, FSDP2, even evaluation batches, full-state checkpoints.

Everything here is PyTorch's own stack (torch.distributed, DistributedDataParallel,
`torch.distributed.fsdp.fully_shard`, torch.distributed.checkpoint.state_dict); this module only
chooses and wires. In a single process every helper is the identity (rank 0 of 1, sums are the
values, unwrap returns the model), so the runner and the engine call them unconditionally. The
run folder, logs and progress bars belong to rank 0. The samplers that shard the data are in
`vitkit.data.samplers`.

Launch: `torchrun --nproc_per_node N -m vitkit train ...` (torchrun's rendezvous flags for several
machines), or `vitkit train --nproc N ...`, which starts the same through `torch.distributed.run`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

Strategy = Literal["ddp", "fsdp"]
T = TypeVar("T")


# -- rank basics --------------------------------------------------------------------------------
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return get_rank() == 0


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum `values` over all ranks, in place; returns `values`."""
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # type: ignore[assignment]  # Module types attributes as Tensor | Module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod  # type: ignore[assignment]  # Module types attributes as Tensor | Module
        else:
            return model


# -- process group ------------------------------------------------------------------------------
def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers (torchrun sets them): {err}") from err
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world}) (torchrun sets them)")
    return rank, world, local


def launched() -> bool:
    """True when started by torchrun with more than one process."""
    return env_world()[1] > 1


def resolve_device(choice: str) -> torch.device:
    """The device for `--device auto|cpu|cuda` ("auto": CUDA when available)."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available: use --device cpu")
    return torch.device(choice)


def check_offload(device: torch.device) -> None:
    """CPU offloading under FSDP moves each block to the GPU to compute: it needs CUDA."""
    if device.type != "cuda":
        raise ValueError(
            "--fsdp-offload needs CUDA (FSDP2 copies each block to the GPU to compute): "
            "drop --fsdp-offload on a CPU-only machine"
        )


def init_distributed(device: Literal["auto", "cpu", "cuda"] = "auto") -> torch.device:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) and return this rank's device.

    Without a torchrun environment (WORLD_SIZE unset or 1) nothing is initialised and the device is
    the one asked for ("auto": CUDA when available). Calling it twice is harmless.
    """
    rank, world, local = env_world()
    target = resolve_device(device)
    use_cuda = target.type == "cuda"
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local} has no GPU: this node has {torch.cuda.device_count()}; "
                "lower --nproc_per_node to the number of GPUs"
            )
        torch.cuda.set_device(local)
        target = torch.device("cuda", local)
    if world > 1 and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set: start the run with torchrun")
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=target if use_cuda else None)
    return target


def destroy() -> None:
    """Leave the process group (at the end of a run); a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_local_rank() -> int:
    return env_world()[2] if is_distributed() else 0


def rank_seed(seed: int, rank: int | None = None) -> int:
    """The seed of one rank: `seed + rank`, so rank 0 seeds like a single process."""
    return seed + (get_rank() if rank is None else rank)


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` from rank `src` on every rank (e.g. the run folder, a seed drawn on rank 0)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: object) -> list:
    """`obj` of every rank, in rank order, on every rank (`[obj]` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# -- wrapping -----------------------------------------------------------------------------------
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy `src`'s parameters and buffers to every rank (FSDP shards what each rank holds)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` (already on `device`); the model itself in one process."""
    if get_world_size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules `fully_shard` wraps one by one: the blocks the model names by `block_types()`
    (ViT, Swin); none for a model without that method (a torchvision student), which is sharded whole."""
    block_types = getattr(model, "block_types", None)
    if block_types is None:
        return []
    types = tuple(block_types())
    return [m for m in model.modules() if isinstance(m, types)]


def wrap_fsdp(
    model: nn.Module, device: torch.device, *, offload: bool = False, checkpointing: bool = True
) -> nn.Module:
    """Shard `model` with FSDP2: `fully_shard` on every block, then on the whole model.

    Activation checkpointing recomputes each block in the backward pass. On CUDA the parameters are
    computed in bf16 with fp32 gradient reduction; `offload` keeps parameters, gradients and optimizer
    state on the CPU between uses (FSDP2 needs CUDA for it). Rank 0's weights are broadcast first, so
    every rank shards the same model. Needs a process group (one process is fine).
    """
    from torch.distributed.fsdp import (  # noqa: PLC0415  over a second of import: only for FSDP runs
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    if offload:
        check_offload(device)
    if not dist.is_initialized():
        raise RuntimeError("--fsdp needs a process group: start the run with torchrun or `vitkit train --nproc N`")
    units = shard_units(model)  # none (a torchvision model): the whole model is one FSDP unit
    broadcast_module(model)
    if checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    kwargs: dict = {
        "mesh": init_device_mesh(device.type, (dist.get_world_size(),)),
        "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
    }
    if device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


def wrap(model: nn.Module, device: torch.device, strategy: Strategy = "ddp", *, offload: bool = False) -> nn.Module:
    """Wrap for training: DDP (default) or FSDP2; unchanged in a single process without FSDP."""
    if strategy == "fsdp":
        return wrap_fsdp(model, device, offload=offload)
    if offload:
        raise ValueError("--fsdp-offload needs --fsdp")
    return wrap_ddp(model, device)


def wrap_ema(ema: nn.Module | None, device: torch.device, strategy: Strategy = "ddp", *, offload: bool = False) -> None:
    """Under FSDP, shard an EMA copy (`AveragedModel`, made from the unsharded model) like the model.

    Its shards then sit beside the model's, so `ema.update_parameters(model)` is a shard-local lerp and
    evaluating the EMA runs the same collectives as the model. Under DDP the EMA stays a plain copy.
    """
    if ema is None or strategy != "fsdp":
        return
    from torch.distributed.tensor import DTensor  # noqa: PLC0415  loaded with FSDP: only for FSDP runs

    wrap_fsdp(ema.module, device, offload=offload, checkpointing=False)
    average = ema.multi_avg_fn
    if average is None:
        return

    def split_average(ema_tensors: list, model_tensors: list, num_averaged: torch.Tensor | int) -> None:
        # foreach ops refuse lists mixing sharded parameters (DTensor) and plain buffers
        for sharded in (True, False):
            pairs = [(e, m) for e, m in zip(ema_tensors, model_tensors) if isinstance(e, DTensor) == sharded]
            if pairs:
                average([e for e, _ in pairs], [m for _, m in pairs], num_averaged)

    ema.multi_avg_fn = split_average  # type: ignore[assignment]  # Module types attributes as Tensor | Module


def is_fsdp(model: nn.Module) -> bool:
    """True when `model` or a submodule is sharded by FSDP2 (e.g. the model inside an EMA wrapper)."""
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415  over a second of import: only when asked

    return any(isinstance(m, FSDPModule) for m in unwrap(model).modules())


# -- checkpoints --------------------------------------------------------------------------------
def _full_options(**extra):
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415  slow import: checkpoints only
        StateDictOptions,
    )

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights under their plain names, on the CPU, on rank 0 (empty elsewhere).

    A collective under FSDP: every rank must call it.
    """
    model = unwrap(model)
    if not is_fsdp(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if is_main() else {}
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415  slow import: checkpoints only
        get_model_state_dict,
    )

    # full_state_dict=True gives plain tensors; torch types the sharded cases too
    return get_model_state_dict(model, options=_full_options())  # type: ignore[return-value]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter names, unsharded, on rank 0 (empty elsewhere).

    Keyed by names rather than positions, it loads into a run with another process count or strategy.
    A collective under FSDP: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415  slow import: checkpoints only
        get_optimizer_state_dict,
    )

    state = get_optimizer_state_dict(unwrap(model), optimizer, options=_full_options())
    return state if is_main() else {}


def full_weights(model: nn.Module, plain: nn.Module | None) -> nn.Module | None:
    """A plain module holding `model`'s full weights on rank 0 (None elsewhere), to save or evaluate.

    Under FSDP `plain` is a CPU copy made before sharding (`copy.deepcopy` on rank 0), filled from the
    gathered state: a collective, every rank calls it. Otherwise the unwrapped model itself.
    """
    if not is_fsdp(model):
        return unwrap(model) if is_main() else None
    state = full_model_state(model)
    if not is_main():
        return None
    if plain is None:
        raise RuntimeError("full_weights needs rank 0's unsharded copy of an FSDP model")
    plain.load_state_dict(state)
    return plain


def load_full_state(
    model: nn.Module,
    model_state: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state: dict | None = None,
) -> None:
    """Load full (unsharded) states into a plain, DDP or FSDP model and its optimizer.

    Under FSDP the states need only be present on rank 0 (others may pass empty dicts): rank 0
    broadcasts and every rank keeps its shard.
    """
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415  slow import: checkpoints only
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = unwrap(model)
    options = _full_options(broadcast_from_rank0=is_fsdp(model) and is_distributed())
    # the setters replace entries of the dicts they get (with shards): give them copies
    if model_state is not None:
        set_model_state_dict(model, _copy_containers(model_state), options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, _copy_containers(optimizer_state), options=options)


def _copy_containers(tree):
    if isinstance(tree, dict):
        return {k: _copy_containers(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copy_containers(v) for v in tree]
    return tree


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (over all shards under FSDP) and return it as a plain tensor."""
    norm = nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    # under FSDP2 the norm is a DTensor whose value is already reduced over the shards
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# -- launching ----------------------------------------------------------------------------------
def launch(nproc: int, argv: Sequence[str], module: str = "vitkit") -> int:
    """Start `nproc` processes on this machine running `python -m vitkit ARGV` through torchrun.

    Returns 0 when every process succeeded; the processes print their own errors, and a failure
    raises a one-line RuntimeError naming the first failed rank.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if launched():
        raise RuntimeError("--nproc given inside a torchrun launch: use one or the other")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: PLC0415  only for --nproc
    from torch.distributed.run import get_args_parser, run  # noqa: PLC0415  only for --nproc

    args = get_args_parser().parse_args(
        ["--standalone", "--nnodes", "1", "--nproc_per_node", str(nproc), "--module", module, *argv]
    )
    from torch.distributed.elastic.multiprocessing.api import SignalException  # noqa: PLC0415  only for --nproc

    os.environ["VITKIT_NPROC"] = str(nproc)  # the workers' resume hint repeats --nproc
    try:
        run(args)
    except SignalException as err:  # torchrun relayed SIGTERM / Ctrl-C to the workers, which saved and left
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        raise RuntimeError(f"process {rank} of {nproc} failed with exit code {failure.exitcode}") from None
    return 0
