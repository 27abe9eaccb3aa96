import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if not torch.cuda.is_available():  # run the Triton kernels through the interpreter (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")
