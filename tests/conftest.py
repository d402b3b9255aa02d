import os
import tempfile

import pytest
import torch

# Generated data (the synthetic demo set, checkpoint hashes) goes to a temporary folder, never ~/.cache.
os.environ.setdefault("SDVG_RT_CACHE", tempfile.mkdtemp(prefix="sdvg-rt-test-cache-"))
# Keep the suite fast and deterministic on 2-core CI machines.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Without a GPU the Triton kernels (sdvg_rt.models.dit_kernels) run in Triton's CPU interpreter; it must be
# chosen before the kernels are defined, i.e. before the first import of that module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
