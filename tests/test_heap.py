"""vitkit.core.heap: glibc's heap kept for reuse (CPU training), and handed back."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from vitkit.core import heap

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


def _faults_of_reallocating(n: int = 16 * 1024 * 1024) -> int:
    """Minor page faults of allocating, filling and freeing a 64 MiB tensor, the second time."""
    torch.ones(n).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(n).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc
def test_kept_heap_reuses_freed_blocks_and_restores_the_defaults():
    fresh = _faults_of_reallocating()
    assert fresh > 8000  # 64 MiB above the mmap threshold: new pages each time (16,384 of 4 KiB)
    with heap.heap_kept() as applied:
        assert applied
        kept = min(_faults_of_reallocating() for _ in range(4))  # once the heap has grown to hold it
    assert kept < fresh / 10
    assert _faults_of_reallocating() > 8000  # the defaults are back


def test_heap_kept_can_be_off():
    with heap.heap_kept(enabled=False) as applied:
        assert not applied


@glibc
def test_release_memory_reports_glibc():
    assert heap.release_memory()
