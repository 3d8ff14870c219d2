"""What the machine can do fast, and the mixed-precision choice that follows from it.

`cpu_info()` reads /proc/cpuinfo (no torch); `resolve_amp` turns `off | bf16 | auto` into a dtype plus
a record of why, for logs and run.json. auto = bf16 on CUDA, bf16 on a CPU with bf16 matrix units
(AMX) or bf16 dot-product instructions (AVX512_BF16), fp32 on any other CPU, where bf16 is emulated
and a step can be hundreds of times slower.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vitkit.core.errors import VitkitError

if TYPE_CHECKING:
    import torch

AmpChoice = Literal["off", "bf16", "auto"]
AMP_CHOICES: tuple[str, ...] = ("off", "bf16", "auto")
# the flags that make bf16 pay on a CPU, best first
BF16_FLAGS: tuple[str, ...] = ("amx_bf16", "amx_tile", "avx512_bf16")
# the flags that give int8 dot products with 32-bit sums (oneDNN's u8 x s8 kernels without saturation)
VNNI_FLAGS: tuple[str, ...] = ("amx_int8", "avx512_vnni", "avx_vnni")
# AVX-512 as oneDNN's avx512_core kernels and vitkit's AVX-512 kernel builds need it
AVX512_FLAGS: tuple[str, ...] = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
# other flags worth recording beside them (what the fp32 kernels use)
_REPORTED_FLAGS = BF16_FLAGS + ("avx512f", "avx512_vnni", "amx_int8", "avx2", "fma")
CPUINFO = Path("/proc/cpuinfo")


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """{"model": CPU model name, "flags": sorted feature flags} from /proc/cpuinfo's text (first CPU)."""
    model, flags = None, set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86, arm64
            flags = set(value.split())
    return {"model": model or platform.processor() or platform.machine() or "unknown", "flags": sorted(flags)}


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """This machine's CPU model and flags (empty flags where /proc/cpuinfo is missing, e.g. macOS)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text)


def _present(wanted: tuple[str, ...], info: dict[str, Any] | None) -> list[str]:
    flags = set((info or cpu_info())["flags"])
    return [f for f in wanted if f in flags]


def bf16_flags(info: dict[str, Any] | None = None) -> list[str]:
    """The CPU flags present that give bf16 hardware support (empty: bf16 is emulated)."""
    return _present(BF16_FLAGS, info)


def vnni_flags(info: dict[str, Any] | None = None) -> list[str]:
    """The CPU flags present that give int8 dot products with 32-bit sums (empty: no VNNI)."""
    return _present(VNNI_FLAGS, info)


def has_avx512(info: dict[str, Any] | None = None) -> bool:
    """Whether the CPU has AVX-512 (F, BW, VL and DQ: what oneDNN's AVX-512 kernels need)."""
    return len(_present(AVX512_FLAGS, info)) == len(AVX512_FLAGS)


def reported_flags(info: dict[str, Any] | None = None) -> list[str]:
    """The performance-relevant subset of the CPU flags, for reports."""
    return _present(_REPORTED_FLAGS, info)


def resolve_amp(
    amp: str, device: torch.device | str, info: dict[str, Any] | None = None
) -> tuple[torch.dtype | None, dict[str, Any]]:
    """`off | bf16 | auto` (or fp16, CUDA only) on `device` -> (the autocast dtype, None for fp32, and a
    record of the choice).

    The record: {"requested", "chosen" ("off" | "bf16" | "fp16"), "reason", "device", "cpu", "flags"} with the
    deciding CPU flags. `info` replaces the /proc/cpuinfo probe (tests).
    """
    import torch  # noqa: PLC0415  core imports no torch at import time (`vitkit --help` runs without it)

    if amp not in (*AMP_CHOICES, "fp16"):
        raise VitkitError(f"amp must be one of {', '.join(AMP_CHOICES)} (or fp16 on CUDA); got {amp!r}")
    device = torch.device(device)
    if amp == "fp16" and device.type != "cuda":
        raise VitkitError("amp=fp16 needs a CUDA device: use amp=bf16 or auto on the CPU, or amp=off")
    info = info or cpu_info()
    deciding = bf16_flags(info)
    if amp in ("off", "fp16"):
        chosen, reason = amp, "requested"
    elif amp == "bf16":
        chosen, reason = "bf16", "requested"
        if device.type == "cpu" and not deciding:
            reason = "requested (this CPU has no bf16 units: expect a much slower run than --amp off)"
    elif device.type == "cuda":
        chosen, reason = "bf16", "auto: CUDA device"
    elif device.type == "cpu" and deciding:
        chosen, reason = "bf16", f"auto: the CPU has {', '.join(deciding)}"
    elif device.type == "cpu":
        chosen, reason = "off", "auto: the CPU has no bf16 units (no AMX, no AVX512_BF16)"
    else:
        chosen, reason = "off", f"auto: fp32 on {device.type}"
    record = {
        "requested": amp,
        "chosen": chosen,
        "reason": reason,
        "device": str(device),
        "cpu": info["model"],
        "flags": deciding if device.type == "cpu" else [],
    }
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[chosen]
    return dtype, record


def describe_amp(record: dict[str, Any]) -> str:
    """One log line for a `resolve_amp` record."""
    dtype = {"off": "fp32"}.get(record["chosen"], record["chosen"])
    return f"amp {record['requested']} -> {dtype} on {record['device']} ({record['reason']}; cpu: {record['cpu']})"
