"""The base causal LM and its tokenizer, and the runtime they run with.

A base model is a transformers directory (config.json + safetensors + tokenizer; local, file:// or s3://) or
a GGUF file (meteora/model/gguf.py: converted once into such a directory in the cache). Only safetensors or
GGUF weights, never remote code: `load_base_model` and `load_tokenizer` are the one way the project loads them
(collection, gate training, evaluation and serving alike). A tokenizer without a pad token gets its EOS token
as pad (batches carry explicit attention masks and labels, so pad = eos is harmless).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from ..store import checked_uri, is_remote, local_dir
from .gguf import gguf_model_dir, is_gguf

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Precision = Literal["auto", "fast", "fp32", "bf16"]


def load_base_model(uri: str | Path, dtype: torch.dtype | None = None) -> "PreTrainedModel":
    """A transformers causal LM from a model directory, local or s3:// (mirrored into the cache first)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir(uri), dtype=dtype or torch.float32, use_safetensors=True, trust_remote_code=False, local_files_only=True
    )


def load_tokenizer(uri: str | Path) -> "PreTrainedTokenizerBase":
    """The tokenizer saved with the base model (no remote code); pad = eos when it has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir(uri), trust_remote_code=False, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_dir(uri: str | Path) -> Path:
    """A local directory holding the base model of `uri` (file://, a local path, or s3:// mirrored locally; a GGUF
    file converted into the cache)."""
    text = checked_uri(uri)
    if is_gguf(text):
        return gguf_model_dir(text)
    path = local_dir(text) if is_remote(text) else Path(text.removeprefix("file://"))
    if not (path / "config.json").is_file():
        raise ValueError(f"base model {str(path)!r} is not a model directory: config.json is missing")
    return path


def skeleton_from_config(config: dict) -> "PreTrainedModel":
    """The base model's modules and shapes without its weights (meta device): enough to validate adapters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError("base model config.json has no model_type")
    fields = {k: v for k, v in config.items() if k != "model_type"}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields), trust_remote_code=False)


def bf16_is_fast() -> bool:
    """Whether bf16 runs faster than fp32 here: on CUDA, and on CPUs with AMX tiles (1.9x fp32's speed training
    SmolLM2-135M); not on a Xeon with only AVX-512's bf16 instructions (0.68x:
    experiments/FINDINGS.md, precision.py). Other CPUs get fp32, the safe choice."""
    return torch.cuda.is_available() or _cpu_has_amx()


def _cpu_has_amx() -> bool:
    """Whether this CPU has AMX's bf16 tiles (read from /proc/cpuinfo; False where there is none)."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to tell here
        return False


def runtime(precision: Precision = "auto", threads: float = 1, use_gpu: bool | None = None) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype a process runs the base model: CUDA when there is one (or use_gpu says so). dtype:
    "auto" is bf16 on CUDA and fp32 on CPU; "fast" is bf16 wherever it runs faster (CUDA, a CPU with AMX), else
    fp32; "fp32" and "bf16" say it. `threads` intra-op threads for CPU work."""
    torch.set_num_threads(max(1, int(threads)))
    device = torch.device("cuda" if (torch.cuda.is_available() if use_gpu is None else use_gpu) else "cpu")
    bf16 = (precision == "bf16" or (precision in ("auto", "fast") and device.type == "cuda")
            or (precision == "fast" and _cpu_has_amx()))
    return device, torch.bfloat16 if bf16 else torch.float32
