import os

# Triton kernels run on CPU tensors only through the interpreter, and the flag is read when
# the kernels are decorated: set it before anything imports fastexit.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
