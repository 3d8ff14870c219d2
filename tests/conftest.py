import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run full-size parity for every variant")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="full-size large variant: run with `make test-all` (--run-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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
    return True
