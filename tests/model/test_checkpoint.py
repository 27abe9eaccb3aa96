"""save_pretrained -> from_pretrained reproduces the model; checkpoints are small and refuse a foreign base."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from meteora_moe import CheckpointError, MeteoraModel
from meteora_moe.model import checkpoint_exists, read_checkpoint, read_checkpoint_config
from meteora_moe.store import open_store
from tiny import ALL_MODULES, make_adapter, random_ids, tiny_base

# the checkpoint's files, as DESIGN.md names them (a contract: written out here, not imported)
CONFIG_FILE, EXPERTS_FILE, GATES_FILE = "meteora_config.json", "experts.safetensors", "gates.safetensors"


@pytest.fixture
def saved(tmp_path):
    """A fused model with mixed ranks and target sets, its base saved as a model directory, and its checkpoint."""
    base = tiny_base(layers=3)
    base.save_pretrained(tmp_path / "base")
    specs = [(4, ALL_MODULES), (8, ["q_proj", "v_proj"]), (16, ["gate_proj", "up_proj", "down_proj"])]
    paths = {f"e{i}": make_adapter(base, tmp_path / f"e{i}", r, r, t, seed=i) for i, (r, t) in enumerate(specs)}
    model = MeteoraModel.from_adapters(tmp_path / "base", paths, top_k=2, temperature=2.0, seed=3)
    model.training_summary = {"steps": 5}
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path


def test_round_trip_reproduces_logits_exactly(saved):
    model, root = saved
    loaded = MeteoraModel.from_pretrained(root / "ckpt")  # the base model comes from the URI it records
    ids = random_ids(batch=2, length=16)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.expert_names == model.expert_names == ["e0", "e1", "e2"]
    assert loaded.layer_names == model.layer_names
    assert (loaded.routing.top_k, loaded.routing.temperature) == (2, 2.0)
    assert loaded.training_summary == {"steps": 5}


def test_checkpoint_holds_the_contract_fields_and_only_experts_and_gates(saved):
    model, root = saved
    config = json.loads((root / "ckpt" / CONFIG_FILE).read_text())
    assert config["format_version"] == 1
    assert {"name", "uri", "fingerprint"} <= set(config["base_model"])
    assert [e["rank"] for e in config["experts"]] == [4, 8, 16]
    assert {"name", "sha256", "rank", "alpha", "scaling", "target_modules"} <= set(config["experts"][0])
    assert config["target_modules"] == sorted(ALL_MODULES)
    adapter_bytes = sum((root / f"e{i}" / "adapter_model.safetensors").stat().st_size for i in range(3))
    gate_bytes = sum(g.nbytes for g in model.gate_parameters())
    tensor_bytes = sum((root / "ckpt" / f).stat().st_size for f in (EXPERTS_FILE, GATES_FILE))
    assert adapter_bytes + gate_bytes - 4096 < tensor_bytes < adapter_bytes + gate_bytes + 16384
    assert not list((root / "ckpt").glob("*.tmp")), "no temporary files are left behind"


def test_checkpoint_is_far_smaller_than_the_base_model(tmp_path):
    base = tiny_base(hidden=256)
    base.save_pretrained(tmp_path / "base")
    paths = {f"e{i}": make_adapter(base, tmp_path / f"e{i}", 4, 8, ALL_MODULES, seed=i) for i in range(4)}
    MeteoraModel.from_adapters(base, paths).save_pretrained(tmp_path / "ckpt")
    checkpoint_bytes = sum(f.stat().st_size for f in (tmp_path / "ckpt").iterdir())
    base_bytes = sum(f.stat().st_size for f in (tmp_path / "base").glob("*.safetensors"))
    assert checkpoint_bytes < base_bytes / 5


def test_base_loaded_in_another_dtype_still_matches(saved):
    _, root = saved
    loaded = MeteoraModel.from_pretrained(root / "ckpt", dtype=torch.bfloat16)
    assert loaded.base_model.dtype == torch.bfloat16


def test_a_different_base_model_is_refused(saved):
    _, root = saved
    with pytest.raises(CheckpointError, match="different model"):
        MeteoraModel.from_pretrained(root / "ckpt", base_model=tiny_base(layers=3, seed=1))
    with pytest.raises(CheckpointError, match="different model"):
        MeteoraModel.from_pretrained(root / "ckpt", base_model=tiny_base(layers=2))


def _edit_config(ckpt, change):
    config = json.loads((ckpt / CONFIG_FILE).read_text())
    (ckpt / CONFIG_FILE).write_text(json.dumps(change(config)))


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


LAYER = "model.layers.0.self_attn.q_proj"  # adapted by e0 (rank 4) and e1 (rank 8)


def _edit_tensors(ckpt, file, change):
    """Rewrite a checkpoint file's tensors with change(tensors) (and drop the config's file digests, which they
    no longer match)."""
    tensors = load_file(ckpt / file)
    change(tensors)
    save_file(tensors, ckpt / file)
    _edit_config(ckpt, lambda cfg: {k: v for k, v in cfg.items() if k != "files"})


def _edit_tensor(ckpt, file, key, change):
    _edit_tensors(ckpt, file, lambda tensors: tensors.update({key: change(tensors[key])}))


def _rename_expert(index, name):
    return lambda cfg: {**cfg, "experts": [{**e, "name": name} if i == index else e for i, e in enumerate(cfg["experts"])]}


DAMAGE = {  # name -> (how to damage a checkpoint directory, what the error must say)
    "missing_config": (lambda c: (c / CONFIG_FILE).unlink(), "is missing"),
    "missing_gates": (lambda c: (c / GATES_FILE).unlink(), "is missing"),
    "truncated_experts": (lambda c: _truncate(c / EXPERTS_FILE), "does not match the sha256"),
    "truncated_unhashed": (lambda c: (_edit_config(c, lambda cfg: {k: v for k, v in cfg.items() if k != "files"}),
                                      _truncate(c / EXPERTS_FILE)), "truncated or corrupt"),
    "wrong_version": (lambda c: _edit_config(c, lambda cfg: {**cfg, "format_version": 99}), "format_version 99"),
    "no_top_k": (lambda c: _edit_config(c, lambda cfg: {k: v for k, v in cfg.items() if k != "top_k"}), "'top_k'"),
    "top_k_true": (lambda c: _edit_config(c, lambda cfg: {**cfg, "top_k": True}), r"'top_k' must be .* got True"),
    "top_k_above_experts": (lambda c: _edit_config(c, lambda cfg: {**cfg, "top_k": 4}), r"number of experts \(3\), got 4"),
    "temperature_zero": (lambda c: _edit_config(c, lambda cfg: {**cfg, "temperature": 0}), "'temperature' must be a number > 0"),
    "no_experts": (lambda c: _edit_config(c, lambda cfg: {**cfg, "experts": []}), "'experts' is empty"),
    "path_as_name": (lambda c: _edit_config(c, _rename_expert(1, "../../etc")), r"experts\[1\]\.name: .*'\.\./\.\./etc' is invalid"),
    "duplicate_names": (lambda c: _edit_config(c, _rename_expert(1, "e0")), r"names \['e0'\] more than once"),
    "missing_tensor": (lambda c: _edit_tensors(c, EXPERTS_FILE, lambda tensors: tensors.pop(f"{LAYER}.ranks")),
                       rf"lacks tensors \['{LAYER}.ranks'\] of layer '{LAYER}'"),
    "b_t_rows": (lambda c: _edit_tensor(c, EXPERTS_FILE, f"{LAYER}.B_t", lambda t: t[1:]),
                 f"'{LAYER}.A' has 12 rows and '{LAYER}.B_t' 11, but .* add up to 12"),
    "one_dimensional_a": (lambda c: _edit_tensor(c, EXPERTS_FILE, f"{LAYER}.A", lambda t: t.reshape(-1)),
                          f"{EXPERTS_FILE}: tensor '{LAYER}.A' must be a 2-D float matrix"),
    "float_ranks": (lambda c: _edit_tensor(c, EXPERTS_FILE, f"{LAYER}.ranks", lambda t: t.float()),
                    f"'{LAYER}.ranks' must hold 3 integers .* got torch.float32"),
    "negative_rank": (lambda c: _edit_tensor(c, EXPERTS_FILE, f"{LAYER}.ranks", lambda t: t * torch.tensor([1, -1, 1])),
                      r"gives experts \['e1'\] a negative rank"),
    "gate_rows": (lambda c: _edit_tensor(c, GATES_FILE, f"{LAYER}.gate", lambda t: t[:2]),
                  rf"{GATES_FILE}: tensor '{LAYER}.gate' has shape \[2, 64\], not \[3, 64\]"),
}


def test_files_of_two_different_saves_are_refused(saved):
    model, root = saved
    with torch.no_grad():
        model.gate_parameters()[0].add_(1.0)
    model.save_pretrained(root / "other")
    (root / "ckpt" / GATES_FILE).write_bytes((root / "other" / GATES_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="different saves"):
        MeteoraModel.from_pretrained(root / "ckpt", base_model=tiny_base(layers=3))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_fails_clearly(saved, damage):
    _, root = saved
    mutate, message = DAMAGE[damage]
    mutate(root / "ckpt")
    with pytest.raises(CheckpointError, match=message):
        MeteoraModel.from_pretrained(root / "ckpt", base_model=tiny_base(layers=3))


def test_configured_changes_routing_inside_the_block_only(saved):
    """The evaluation's raised-temperature row must leave the checkpoint's own settings (here T=2) for the next rows."""
    model, _ = saved
    ids = random_ids(batch=1, length=8)
    with torch.no_grad():
        before = model(ids).logits
        with model.configured(top_k=1, temperature=0.5):
            assert (model.routing.top_k, model.routing.temperature) == (1, 0.5)
            assert not torch.allclose(model(ids).logits, before)
        with pytest.raises(RuntimeError), model.configured(temperature=4.0):
            raise RuntimeError("a failed row")
        assert (model.routing.top_k, model.routing.temperature) == (2, 2.0)
        assert torch.equal(model(ids).logits, before)


def test_a_bad_checkpoint_or_backend_fails_before_the_base_model_loads(saved, monkeypatch):
    _, root = saved
    monkeypatch.setattr("meteora_moe.model.meteora_model.load_base_model", lambda *a: pytest.fail("the base model was loaded"))
    with pytest.raises(ValueError, match="unknown backend"):
        MeteoraModel.from_pretrained(root / "ckpt", backend="cuda-magic")
    _edit_config(root / "ckpt", lambda cfg: {**cfg, "top_k": 4})
    with pytest.raises(CheckpointError, match="'top_k'"):
        MeteoraModel.from_pretrained(root / "ckpt")


def test_file_uris_read_and_write_the_directory_they_name(saved, tmp_path, monkeypatch):
    model, root = saved
    monkeypatch.chdir(tmp_path)  # a file:// URI taken for a relative path would land here, under "file:"
    uri = f"file://{root / 'copy'}"
    model.save_pretrained(uri)
    assert (root / "copy" / CONFIG_FILE).is_file() and checkpoint_exists(uri)
    assert read_checkpoint_config(uri).top_k == 2 and read_checkpoint(uri)[0].experts == model.experts
    loaded = MeteoraModel.from_pretrained(uri)
    ids = random_ids(batch=1, length=6)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_errors_of_an_s3_checkpoint_name_its_uri(saved, s3_endpoint):
    import boto3

    model, root = saved
    boto3.client("s3").create_bucket(Bucket="checkpoints")
    model.save_pretrained("s3://checkpoints/run")
    store = open_store("s3://checkpoints/run")
    store.write_bytes(GATES_FILE, (root / "ckpt" / EXPERTS_FILE).read_bytes())
    with pytest.raises(CheckpointError, match=f"^s3://checkpoints/run/{GATES_FILE} does not match the sha256"):
        read_checkpoint("s3://checkpoints/run/")
    config = json.loads(store.read_bytes(CONFIG_FILE))
    store.write_bytes(CONFIG_FILE, json.dumps({**config, "temperature": -1}).encode())
    with pytest.raises(CheckpointError, match=f"^s3://checkpoints/run/{CONFIG_FILE}: field 'temperature'"):
        read_checkpoint_config("s3://checkpoints/run")


def test_a_relative_base_path_is_recorded_absolute(tmp_path, monkeypatch):
    """A checkpoint loads its base from the URI it records, whatever the working directory of the loader."""
    base = tiny_base()
    base.save_pretrained(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "a", 4, seed=1)
    monkeypatch.chdir(tmp_path)
    by_path = MeteoraModel.from_adapters("base", {"a": adapter}, top_k=1)
    in_memory = MeteoraModel.from_adapters(type(base).from_pretrained("base"), {"a": adapter}, top_k=1)
    assert by_path.base_info.uri == in_memory.base_info.uri == str((tmp_path / "base").resolve())
    by_path.save_pretrained(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path / "a")
    assert MeteoraModel.from_pretrained(tmp_path / "ckpt").base_info.uri == by_path.base_info.uri
