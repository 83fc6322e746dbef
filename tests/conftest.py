import os
from pathlib import Path

import pytest
import torch

# OMP_NUM_THREADS wins (several torch processes on 2 cores must not oversubscribe them)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_cifar() -> Path:
    if not (SHARED_DATA / "cifar-10-batches-py").is_dir():
        pytest.skip("../shared/data (the CIFAR-10 subset) is not beside the repository")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def bundled_splits():
    """A small real-image Splits (uint8) from the bundled CIFAR-10 subset: 96 train, 32 val, 32 test."""
    from clat.data.loader import load_bundled
    from clat.data.loader import Splits

    x_tr, y_tr, x_te, y_te = load_bundled()
    return Splits(x_tr[:96], y_tr[:96], x_tr[96:128], y_tr[96:128], x_te[:32], y_te[:32], 10, "bundled (test subset)")
