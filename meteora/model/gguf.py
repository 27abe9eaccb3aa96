"""A base model given as one GGUF file (llama.cpp's format, e.g. a quantized model shipped inside a Python package).

transformers reads GGUF through the `gguf` package and dequantizes the weights (fp32); the result is cached as a
plain transformers directory keyed by the file's sha256, so every later load is an ordinary safetensors load:

    <cache>/gguf/<sha256>/   config.json, model.safetensors, tokenizer files, chat template, and the license files
                             found beside the .gguf (LICENSE*, COPYING*, NOTICE*)
A file on S3 is downloaded into <cache>/gguf/files/ first. The conversion is written to a temporary directory and
renamed into place, so a reader never sees half of it.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..store import cache_dir, file_sha256, is_remote, open_store, split_uri

LICENSE_PREFIXES = ("license", "copying", "notice")


def is_gguf(uri: str | Path) -> bool:
    return str(uri).lower().endswith(".gguf")


def gguf_model_dir(uri: str | Path) -> Path:
    """The transformers directory of the GGUF file at `uri` (local, file:// or s3://), converted once per file content."""
    parent, name = split_uri(str(uri).removeprefix("file://"))
    folder = _local_folder(parent, name)
    target = cache_dir() / "gguf" / file_sha256(folder / name)
    if not _complete(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            converted = Path(tmp) / "model"
            _convert(folder, name, converted)
            if not _complete(converted):
                raise OSError(f"converting {folder / name} wrote no complete model directory ({sorted(os.listdir(converted))})")
            if target.exists() and not _complete(target):  # left incomplete by a process that died: replaced
                shutil.rmtree(target, ignore_errors=True)
            try:
                converted.rename(target)
            except OSError:  # another process finished the same conversion first
                pass
    return target


def _complete(model_dir: Path) -> bool:
    """Config, weights (one file or an index of shards) and tokenizer are all there."""
    weights = (model_dir / "model.safetensors").is_file() or (model_dir / "model.safetensors.index.json").is_file()
    return weights and (model_dir / "config.json").is_file() and (model_dir / "tokenizer_config.json").is_file()


def _local_folder(parent: str, name: str) -> Path:
    """A local folder holding the file and its license files (a download of them for S3)."""
    if not is_remote(parent):
        return Path(parent)
    store = open_store(parent)
    folder = cache_dir() / "gguf" / "files" / store.uri.removeprefix("s3://")
    for key in [name] + [k for k in store.list() if "/" not in k and k.lower().startswith(LICENSE_PREFIXES)]:
        if not (folder / key).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            store.download(key, folder / key)
    return folder


def _convert(folder: Path, name: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False)
    config = copy.deepcopy(loaded.config)
    del config.quantization_config  # the weights are plain fp32 now: no GGUF needed to read them again
    plain = type(loaded)(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any(not key.startswith("lm_head.") for key in missing):
        raise ValueError(f"base model {folder / name}: GGUF weights do not fit {type(loaded).__name__} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.tie_weights()
    # written here rather than by save_pretrained: in a process of a torch.distributed group (a Ray Train worker)
    # transformers writes the weights on rank 0 only, and rank 1 converting on its own node got no model
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items() if k not in tied}, out / "model.safetensors",
              metadata={"format": "pt"})
    plain.config.save_pretrained(out)
    plain.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for file in folder.iterdir():
        if file.is_file() and file.name.lower().startswith(LICENSE_PREFIXES):
            shutil.copyfile(file, out / file.name)

