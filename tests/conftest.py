import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter without a GPU. The variable is read when a kernel is decorated,
    # at its module's import: set here, before any test module imports the engine or the 4-bit code.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models on a 2-core machine: one thread is many times faster than two fighting over small matmuls.
torch.set_num_threads(1)
