"""Shared pytest setup: a small thread budget and ``import mue_fairseq`` from the checkout."""
import os
import sys

# Subprocesses (CLI tests) inherit this; set before torch is imported anywhere.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python -m pytest` puts the cwd on sys.path, plain `pytest` does not: make the source
# checkout's mue_fairseq importable either way (it wins over an installed copy).
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT
