import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton decides interpreted vs compiled when a kernel is decorated, i.e. when larosa.kernels is first
# imported (by any test module): set the interpreter here, before collection, on machines without a GPU
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def kernel_device(monkeypatch):
    """Tensors on the GPU where there is one (compiled kernels), else the CPU (Triton interpreter), and the
    Top-K kernels for up to 4 rows. Kernel test modules use it for every test (`pytest.mark.usefixtures`)."""
    monkeypatch.setenv("LAROSA_KERNEL_MAX_ROWS", "4")
    torch.set_default_device("cuda" if torch.cuda.is_available() else "cpu")
    yield
    torch.set_default_device("cpu")
