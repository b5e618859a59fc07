import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Without a GPU, ul3d's Triton kernels (ul3d.networks.depthwise) are tested in Triton's interpreter on CPU tensors.
# It must be set before the kernels are first imported; with CUDA they compile for the GPU as in use.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
