import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

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
