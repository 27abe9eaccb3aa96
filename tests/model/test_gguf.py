"""A GGUF file as the base model: converted once into a cached transformers directory keyed by its sha256, equal to
transformers' own GGUF load, with its license beside it, referenced by checkpoints like any other base, and
converted whole in any process of a torch.distributed group (transformers' save_pretrained writes on rank 0 only)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from meteora_moe import MeteoraModel, load_base_model, load_tokenizer
from meteora_moe.model import model_dir
from meteora_moe.store import open_store
from tiny import make_adapter, random_ids, write_tiny_gguf


@pytest.fixture
def gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("METEORA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "published"
    folder.mkdir()
    (folder / "LICENSE").write_text("Apache License 2.0 (the model's own terms)\n")
    return write_tiny_gguf(folder / "tiny.gguf")


def test_a_gguf_base_is_converted_once_and_equals_transformers_own_load(gguf_file, tmp_path):
    directory = model_dir(gguf_file)
    assert directory.parent == tmp_path / "cache" / "gguf" and len(directory.name) == 64  # keyed by the sha256
    assert (directory / "LICENSE").read_text().startswith("Apache") and (directory / "model.safetensors").is_file()
    assert "quantization_config" not in (directory / "config.json").read_text()
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    ids = random_ids(vocab=reference.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(load_base_model(gguf_file)(ids).logits, reference(ids).logits, rtol=0, atol=0)
    stamps = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    assert model_dir(f"file://{gguf_file}") == directory  # a second load: the cache, not a new conversion
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == stamps
    tokenizer = load_tokenizer(gguf_file)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.chat_template


def test_a_checkpoint_references_the_gguf_file_and_reloads_onto_it(gguf_file, tmp_path):
    base = load_base_model(gguf_file)
    adapter = make_adapter(base, tmp_path / "adapter", 4, 8, ["q_proj", "up_proj"], seed=1)
    fused = MeteoraModel.from_adapters(str(gguf_file), {"a": adapter, "b": make_adapter(base, tmp_path / "b", 2, seed=2)})
    fused.save_pretrained(tmp_path / "ckpt")
    loaded = MeteoraModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.base_info.uri == str(gguf_file) and loaded.base_info.fingerprint.matches(fused.base_info.fingerprint)
    ids = random_ids(vocab=base.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, fused(ids).logits)


def test_a_gguf_base_on_s3_is_downloaded_with_its_license(gguf_file, s3_endpoint, tmp_path):
    import boto3

    boto3.client("s3").create_bucket(Bucket="models")
    store = open_store("s3://models/smol")
    for file in gguf_file.parent.iterdir():
        store.write_bytes(file.name, file.read_bytes())
    directory = model_dir("s3://models/smol/tiny.gguf")
    assert directory == model_dir(gguf_file) and (directory / "LICENSE").is_file()  # the same content, one conversion
    assert load_base_model("s3://models/smol/tiny.gguf").config.num_hidden_layers == 2


def _convert_on_rank(rank: int, port: int, gguf_file, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), METEORA_CACHE=str(root / f"cache-{rank}"))
    dist.init_process_group("gloo", rank=rank, world_size=2)  # as in a Ray Train worker: each node its own cache
    try:
        model_dir(gguf_file)
    finally:
        dist.destroy_process_group()


def test_every_rank_of_a_distributed_group_converts_a_whole_model(gguf_file, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_convert_on_rank, args=(port, gguf_file, tmp_path), nprocs=2)
    reference = load_base_model(gguf_file)  # converted in this process, no group
    for rank in (0, 1):
        (directory,) = [d for d in (tmp_path / f"cache-{rank}" / "gguf").iterdir() if d.name != "files"]
        assert (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()
        converted = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        for (name, a), (_, b) in zip(converted.state_dict().items(), reference.state_dict().items()):
            assert torch.equal(a, b), name
