"""vitkit's own CPU kernels: C++ sources in `layers/csrc`, compiled once per machine and loaded as torch ops.

Swin's window attention, softmax(q k^T * scale + bias) v with each row's scores kept in L1 (see its
source for why), as three ops: `torch.ops.vitkit.window_attention` for inference, and for training
`window_attention_lse` (the same forward, also returning each row's log-sum-exp) with
`window_attention_backward`, which recomputes the probabilities from it instead of keeping a
(windows, heads, N, N) tensor between the passes. `window_attention_train` is the autograd function
over the two. Around the linear layers and norms (bf16 training, `csrc/linear_ops.cpp` and
`csrc/layer_norm.cpp`): `gelu_train_` / `gelu_backward` (GELU writing its slope; the backward a product
with the bias gradient summed in the same pass), `column_sums` (bias gradients in fp32), and
`layer_norm_forward` / `layer_norm_backward`, used by `layers.linear` and `layers.norm.LayerNorm`.

Build: `python -m vitkit.layers.kernels` (the Makefile runs it before the tests and the demo) compiles
the sources for this CPU's vector width (AVX-512 or AVX2) with the system's C++ compiler (`$CXX`, else
`c++`) against the installed torch, into `$VITKIT_CACHE/kernels` (default ~/.cache/vitkit/kernels).
The file name carries a hash of the source, the torch version and the instruction set, so a changed
source, another torch or another CPU never loads a stale build. No pip-time compilation: vitkit stays
a pure-Python package, and a machine without a compiler loses speed, not function.

Where no build is loadable (no compiler, a CPU without AVX2, `VITKIT_KERNELS=0`, or
`set_kernels(False)`) the models take their torch path, which agrees with the kernel to float
rounding (tests/test_kernels.py).

The sources are written once for the build's vector width: 16 fp32 lanes with AVX-512, 8 with AVX2 (as
16-lane vectors on AVX2, GCC took their shuffles lane by lane and the attention ran at up to 5x torch's
time, docs/PERFORMANCE.md items 20 and 23). By default the models take the attention kernel for every
head_dim it supports on AVX-512 builds, and for head_dim <= 32 (every Swin and Swin V2) on the AVX2
build, where it took 0.52-0.88x torch's time at Swin's windows and tied torch's at ViT's 197 tokens of 64
(`set_attention_kernel`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from vitkit.core.errors import VitkitError
from vitkit.core.files import atomic_path, cache_root
from vitkit.core.hardware import AVX512_FLAGS, cpu_info
from vitkit.layers.capture import capturing

_CSRC = Path(__file__).parent / "csrc"
SOURCES = (_CSRC / "window_attention.cpp", _CSRC / "linear_ops.cpp", _CSRC / "layer_norm.cpp")
HEADERS = (_CSRC / "vec.h",)  # included by the sources: hashed with them
# instruction sets, widest first: (name, the /proc/cpuinfo flags it needs, compiler flags)
_AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2", "-mprefer-vector-width=512")
ISAS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    # bf16 inputs: products by AVX512_BF16's pairwise dot product instead of widening to fp32 first
    (
        "avx512bf16",
        (*AVX512_FLAGS, "fma", "avx2", "avx512_bf16"),
        (*_AVX512, "-mavx512bf16"),
    ),
    (
        "avx512",
        (*AVX512_FLAGS, "fma", "avx2"),
        _AVX512,
    ),
    ("avx2", ("avx2", "fma"), ("-mavx2", "-mfma")),
)

_ENABLED = os.environ.get("VITKIT_KERNELS", "1") not in ("0", "false", "off")
_LOADED = False  # loaded in this process (looked for again on each call until it is)


def isa(info: dict | None = None) -> str | None:
    """The widest instruction set this CPU has that the kernels are built for (None: no x86 vector unit
    they support, e.g. an ARM CPU)."""
    flags = set((info or cpu_info())["flags"])
    for name, needs, _ in ISAS:
        if flags.issuperset(needs):
            return name
    return None


def cache_dir() -> Path:
    return cache_root() / "kernels"


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    digest = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def library_path(isa_name: str) -> Path:
    """Where the build for `isa_name` of the current sources and torch lives."""
    tag = f"{torch.__version__}-{isa_name}-{_source_digest()}".replace("+", "_")
    return cache_dir() / f"vitkit_kernels-{tag}.so"


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def build(force: bool = False, verbose: bool = False) -> Path:
    """Compile the kernels for this CPU (once: an existing build is reused unless `force`); returns the
    library's path. Raises VitkitError where no build is possible (no compiler, unsupported CPU)."""
    name = isa()
    if name is None:
        raise VitkitError("vitkit's kernels need an x86 CPU with AVX2 and FMA; the torch path is used instead")
    path = library_path(name)
    if path.exists() and not force:
        return path
    cxx = compiler()
    if cxx is None:
        raise VitkitError("no C++ compiler found for vitkit's kernels: install g++ (or set $CXX), then rerun the build")
    flags = next(f for n, _, f in ISAS if n == name)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    root = Path(torch.__file__).parent  # torch's headers and libraries (what torch.utils.cpp_extension uses)
    command = [
        cxx,
        "-O3",
        "-std=c++20",  # torch 2.14's headers use concepts
        "-shared",
        "-fPIC",
        "-fopenmp",  # at::parallel_for runs on OpenMP, which resolves to the libgomp torch already loaded
        "-fno-math-errno",  # sqrt and log as instructions, without a branch to set errno
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *flags,
        f"-I{root / 'include'}",
        f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        *(str(s) for s in SOURCES),
        f"-L{root / 'lib'}",
        "-lc10",
        "-ltorch_cpu",
        "-o",
    ]
    # compiled next to its destination, then renamed: a concurrent or interrupted build never leaves a
    # half-written library where the loader looks
    with atomic_path(path) as tmp:
        result = subprocess.run([*command, str(tmp)], capture_output=not verbose, text=True)
        if result.returncode != 0:
            tail = " | ".join((result.stderr or "").strip().splitlines()[-5:]) or "no output"
            raise VitkitError(
                f"building vitkit's kernels failed ({cxx}, exit {result.returncode}): {tail}; "
                "`python -m vitkit.layers.kernels --verbose` shows the compiler's whole output"
            )
    return path


def set_kernels(enabled: bool) -> bool:
    """Use vitkit's compiled kernels where built (default True, `VITKIT_KERNELS=0` turns them off);
    returns the previous setting."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    return previous


# None: the models take the attention kernel for the head sizes where it pays on this CPU's build
# (`_ATTENTION_HEAD_DIM`); True: for every head size on every build (tests through the models); False: never
_ATTENTION_KERNEL: bool | None = None
# the widest head_dim for which the kernel is the default, per build: every size it supports with AVX-512;
# with AVX2 up to Swin's 32 (at ViT's 197 tokens of 64 it tied torch's attention: docs/PERFORMANCE.md item 23)
_ATTENTION_HEAD_DIM = {"avx512bf16": 64, "avx512": 64, "avx2": 32}


def set_attention_kernel(enabled: bool | None) -> bool | None:
    """Whether the models take the window attention kernel: None (default) for the head sizes where it
    pays on this CPU's build, True for every head size wherever a build is loaded, False never; returns the
    previous setting. The other kernels and direct calls of the ops are not affected."""
    global _ATTENTION_KERNEL
    previous, _ATTENTION_KERNEL = _ATTENTION_KERNEL, enabled
    return previous


@functools.lru_cache(maxsize=1)
def _attention_head_dim() -> int:
    """The widest head_dim for which the models take the kernel by default on this CPU (0: none)."""
    return _ATTENTION_HEAD_DIM.get(isa() or "", 0)


def attention_kernel_chosen(head_dim: int = 64) -> bool:
    """Whether the models take the attention kernel for heads of `head_dim` on this CPU
    (`set_attention_kernel`), given a build."""
    return head_dim <= _attention_head_dim() if _ATTENTION_KERNEL is None else _ATTENTION_KERNEL


def available() -> bool:
    """Whether the kernels are on and loaded (loading the build for this CPU on the first call)."""
    global _LOADED
    if not _ENABLED:
        return False
    if not _LOADED:  # a build made later in the process (or a cache folder set later) is still found
        name = isa()
        if name is not None and (path := library_path(name)).exists():
            torch.ops.load_library(str(path))
            _LOADED = True
    return _LOADED


def _takes(x: torch.Tensor, head_dim: int) -> bool:
    """What both kernel paths need of the attention's input x: the CPU, fp32 or bf16 (bf16 autocast
    included), a head_dim of 16-64 in steps of 16, outside compilation, export and tracing, a build, and
    the attention kernel chosen for this CPU (`attention_kernel_chosen`)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or head_dim % 16 or head_dim > 64:
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return False  # q, k and v would come out of the projection in fp16
    return not capturing() and attention_kernel_chosen(head_dim) and available()


def window_attention_applies(x: torch.Tensor, head_dim: int) -> bool:
    """Whether `window_attention` takes attention over x (its input): CPU inference without gradients,
    fp32 or bf16, a head_dim of 16-64 in steps of 16, outside compilation, export and tracing."""
    return not (torch.is_grad_enabled() and x.requires_grad) and _takes(x, head_dim)


def _require() -> None:
    if available():
        return
    if not _ENABLED:
        fix = "set_kernels(True) (or VITKIT_KERNELS unset) turns them on"
    else:
        fix = "`python -m vitkit.layers.kernels` builds them for this CPU"
    raise VitkitError(f"{status()}: {fix}; where `available()` is False, take the torch path instead")


def window_attention_trains(x: torch.Tensor, head_dim: int) -> bool:
    """Whether `window_attention_train` takes attention over x where gradients may be needed: the CPU,
    fp32 or bf16 (autocast included, fp16 autocast not), a head_dim of 16-64 in steps of 16, outside
    compilation, export, tracing and dispatch modes (FLOP counting)."""
    return _get_current_dispatch_mode() is None and _takes(x, head_dim)


def window_attention_reference(
    qkv: torch.Tensor, bias: torch.Tensor, scale: float, rows: torch.Tensor, cosine: torch.Tensor | None = None
) -> torch.Tensor:
    """`window_attention_train`'s result by differentiable torch ops (windows gathered from the map,
    attention, scattered back): the backward's path for a second derivative (create_graph=True)."""
    B, T, _, H, D = qkv.shape
    nW, N = rows.shape
    index = rows.flatten()
    q, k, v = qkv[:, index].view(B, nW, N, 3, H, D).permute(3, 0, 1, 4, 2, 5).unbind(0)  # (B, nW, H, N, D)
    if cosine is not None:
        q, k = F.normalize(q, dim=-1) * cosine.view(H, 1, 1).to(q.dtype), F.normalize(k, dim=-1)
    G = bias.shape[0]
    if nW == 1:  # each image one window, the bias cycling with the images
        b = bias.repeat(B // G, 1, 1, 1).view(B, 1, H, N, N)
    else:
        b = bias.repeat(nW // G, 1, 1, 1)[None]
    scores = (q @ k.transpose(-2, -1)).to(torch.promote_types(q.dtype, torch.float32))  # bf16: softmax in fp32
    attn = (scores * scale + b).softmax(-1)
    windows = (attn.to(v.dtype) @ v).permute(0, 1, 3, 2, 4).reshape(B, nW * N, H, D)
    return windows[:, torch.argsort(index)]  # each token back in its place


class _WindowAttentionTrain(torch.autograd.Function):
    """`window_attention` in map layout with a backward: the forward keeps each row's log-sum-exp
    (windows, heads, N) fp32, the backward recomputes the probabilities from it. A backward that must
    itself be differentiable (create_graph=True) recomputes through `window_attention_reference`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, qkv: torch.Tensor, bias: torch.Tensor, scale: float, rows: torch.Tensor, cosine: torch.Tensor | None
    ) -> torch.Tensor:
        q, k, v = qkv.unbind(2)
        out, lse = torch.ops.vitkit.window_attention_lse(q, k, v, bias, scale, cosine, rows)
        ctx.save_for_backward(qkv, bias, out, lse, rows, cosine)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        qkv, bias, out, lse, rows, cosine = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops, for a second backward
            inputs = [t for t, n in ((qkv, need[0]), (bias, need[1]), (cosine, need[4])) if n and t is not None]
            ref = window_attention_reference(qkv, bias, ctx.scale, rows, cosine)
            grads = iter(torch.autograd.grad(ref, inputs, grad, create_graph=True))
            return tuple(
                next(grads) if n and t is not None else None for t, n in zip((qkv, bias, None, None, cosine), need)
            )
        q, k, v = qkv.unbind(2)
        grad = grad.to(out.dtype).contiguous()
        dqkv, dbias, dcos = torch.ops.vitkit.window_attention_backward(
            grad, q, k, v, out, lse, bias, ctx.scale, cosine, rows
        )
        return dqkv, dbias if need[1] else None, None, None, dcos if cosine is not None and need[4] else None


def window_attention_train(
    qkv: torch.Tensor, bias: torch.Tensor, scale: float, rows: torch.Tensor, cosine: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v per window and head, differentiable in qkv, bias and cosine.

    qkv: (B, T, 3, heads, head_dim), fp32 or bf16, unit last stride (the qkv projection's output as a
    view); rows: (nW, N) int64, each image's token indices per window (window b * nW + n gathers image
    b's tokens rows[n]; (1, T) with T = N: each image is one window). bias: (G, heads, N, N) float32,
    window w adding bias[w % G]. `cosine` (heads,) float32: Swin V2's cosine attention, q and k
    L2-normalised first and head h's scores multiplied by cosine[h] too. Returns (B, T, heads, head_dim)
    with every token in its place. The gradient of qkv comes back as one (B, T, 3, heads, head_dim)
    tensor; a second derivative (create_graph=True) goes through `window_attention_reference`.
    """
    _require()
    return _WindowAttentionTrain.apply(qkv, bias, scale, rows, cosine)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    cosine: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v per window and head; accumulation in fp32.

    q, k, v: views of one projection with a unit last stride, fp32 or bf16 alike. Without `rows`:
    (windows, heads, N, head_dim), returning (windows, N, heads, head_dim). With `rows` (nW, N) int64,
    each image's token indices per window: (B, T, heads, head_dim) maps, window b * nW + n gathering
    image b's tokens rows[n], returning (B, T, heads, head_dim) with every token back in its place.
    bias: (G, heads, N, N) float32, window w adding bias[w % G]. `cosine` (heads,) float32: Swin V2's
    cosine attention, q and k L2-normalised first and head h's scores multiplied by cosine[h] too.
    """
    _require()
    return torch.ops.vitkit.window_attention(q, k, v, bias, scale, cosine, rows)


def status() -> str:
    """One line for logs and benchmarks: which kernels run here, or why none do."""
    if not _ENABLED:
        return "vitkit kernels: off"
    if available():
        if attention_kernel_chosen(64):
            attention = ""
        elif attention_kernel_chosen(16):  # the default, with a limit below 64 on this build
            attention = f"; attention: the kernel up to head_dim {_attention_head_dim()}, torch's above"
        else:
            attention = "; attention: torch's"
        return f"vitkit kernels: {isa()} ({library_path(isa() or '').name}{attention})"
    if isa() is None:
        return "vitkit kernels: none for this CPU (torch path)"
    return "vitkit kernels: not built (torch path; `python -m vitkit.layers.kernels` builds them)"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        path = build(force="--force" in args, verbose="--verbose" in args)
    except VitkitError as err:
        print(f"{err}", file=sys.stderr)
        return 1
    print(f"vitkit kernels: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
