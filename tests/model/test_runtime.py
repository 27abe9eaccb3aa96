"""Where and in which dtype a process runs the base model: meteora_moe.model.runtime."""
from pathlib import Path

import pytest
import torch

from meteora_moe.model import runtime


@pytest.mark.parametrize("precision, dtype", [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_cpu_runs_in_the_dtype_precision_names(precision, dtype):
    assert runtime(precision, threads=torch.get_num_threads(), use_gpu=False) == (torch.device("cpu"), dtype)


def test_fast_is_bf16_on_a_cpu_only_where_it_has_amx():
    amx = "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    assert runtime("fast", threads=torch.get_num_threads(), use_gpu=False)[1] == (torch.bfloat16 if amx else torch.float32)
