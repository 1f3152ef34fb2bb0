"""Importing this module makes this process an emulated CUDA host (see ``cuda_emulation``)."""

import os

import torch

from tests.bench.cuda_emulation import CALLS, install

__all__ = ["CALLS"]
install()
if os.environ.get("INFERMATRIX_TEST_CUDA_POISON") == "1":
    torch.cuda.get_device_capability()  # what torchao 0.18 does while transformers imports it
