"""pytest's setup for the suite: where packaged models go, one torch thread per worker, the
GPU mark, and the fixtures; the helpers tests import are in helpers.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Packaged pretrained models (kdcl/packaged.py) are extracted into one folder of the temporary
# directory, shared by test sessions, rather than into the user's ~/.cache.
os.environ.setdefault("KDCL_MODELS", str(Path(tempfile.gettempdir()) / "kdcl-test-models"))

# Under pytest-xdist (make test) each worker is one of several processes sharing the cores:
# one torch thread each, for this process and the processes its tests start.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from helpers import compose_config, run_cli  # noqa: E402  (after the environment above)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skipped without one (benchmarks/gpu_check.sh
    runs them on a GPU machine)."""
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture
def compose_cfg():
    return compose_config


@pytest.fixture
def cli(tmp_path):
    """Run the CLI from an empty temporary working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return lambda *args, **kw: run_cli(list(args), cwd, **kw)
