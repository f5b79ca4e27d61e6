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
