import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers, one per core of the project's machine), each
    worker and every process its tests start share the cores out: a worker of two torch threads beside
    another would oversubscribe a 2-core machine, where OpenMP's threads spin at their barriers."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the processes the tests start
        torch.set_num_threads(threads)


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", help="run the slow cases (full-size parity, every variant, long loops)"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    for item in items:
        slow = item.get_closest_marker("slow")
        if slow is not None:
            why = slow.args[0] if slow.args else "slow case"
            item.add_marker(pytest.mark.skip(reason=f"{why}: run with `make test-all` (--run-slow)"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def built():
    """vitkit's kernels for this CPU, built (once per machine and source) and loaded; skips where none can be."""
    from vitkit.layers import kernels  # noqa: PLC0415

    if kernels.isa() is None:
        pytest.skip("vitkit's kernels need an x86 CPU with AVX2 and FMA")
    if kernels.compiler() is None:
        pytest.skip("no C++ compiler: vitkit's kernels cannot be built here")
    kernels.build()
    assert kernels.available(), kernels.status()
    # by default the models take the attention kernel for the head sizes where it pays on this build (ViT's
    # 64 not on AVX2); the tests that ask for the build check it through the models for every head size
    previous = kernels.set_attention_kernel(True)
    yield True
    kernels.set_attention_kernel(previous)


@pytest.fixture
def onednn_bf16():
    """oneDNN's bf16 linear path (vitkit's bf16 training and inference products); skips on a CPU without it
    (AVX2-only: oneDNN refuses bf16 there, and vitkit takes F.linear, tested in tests/test_linear.py)."""
    from vitkit.layers.linear import onednn_linear_supports  # noqa: PLC0415

    if not onednn_linear_supports(torch.bfloat16):
        pytest.skip("oneDNN's bf16 linear needs avx512bw/vl/dq or avx_ne_convert; this CPU has neither")
    return True
