"""Shared fixtures and switches: ``--runslow`` for slow tests, GPU auto-skip, real-data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# `medseg predict` tunes glibc's allocator for its process (medseg.inference.process.tune_allocator);
# in the test process that would slow every later training test, so in-process CLI calls leave it
# alone. Tests that check the tuning run `medseg predict` in a subprocess without this variable.
os.environ["MEDSEG_MALLOC"] = "default"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--runslow") or os.environ.get("MEDSEG_RUN_SLOW") == "1"
    cuda = None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))
        if "gpu" in item.keywords:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Root of the shared real scans (``MEDSEG_TEST_DATA``); skips the test when unset."""
    root = os.environ.get("MEDSEG_TEST_DATA")
    if not root:
        pytest.skip("MEDSEG_TEST_DATA is not set (point it at the shared real scans)")
    path = Path(root)
    if not path.is_dir():
        pytest.skip(f"MEDSEG_TEST_DATA={root} is not a folder")
    return path


# --------------------------------------------------------------------------------------------
# shared factories (tests/factories.py; `pythonpath = ["tests"]` makes them importable everywhere)


@pytest.fixture(scope="session")
def plan_factory():
    """``plan_factory(**changes)`` -> a :class:`~medseg.data.plan.Plan` (see ``factories.build_plan``)."""
    from factories import build_plan

    return build_plan


@pytest.fixture(scope="session")
def save_run():
    """``save_run(folder, plan, channels=(4, 8, 16), seed=0, *, name, config)`` -> a run directory with
    random weights (see ``factories.write_run``)."""
    from factories import write_run

    return write_run
