"""Collecting adapters from a real S3 server (SeaweedFS on loopback) into registries, with real local Ray: what is
committed, what bad input leaves behind (nothing), and how a changed source is seen."""
import copy
import json
from pathlib import Path

import boto3
import pytest
import torch
import yaml

from meteora_moe import ManifestError, MeteoraModel
from meteora_moe.registry import Registry, load_manifest, read_samples, source_tags
from pipelines.collect_adapters import collect, main
from tiny import ALL_MODULES, make_adapter, random_ids, tiny_base

pytestmark = pytest.mark.usefixtures("local_ray")
RANKS = {"reverse": 4, "sort": 8, "upper": 16}


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3_endpoint):
    """A bucket holding a tiny base model, three adapters of different ranks with task data, and spares."""
    root = tmp_path_factory.mktemp("world")
    base = tiny_base()
    base.save_pretrained(root / "base")
    other_base = tiny_base(hidden=48)
    local = {name: make_adapter(base, root / name, rank, 2 * rank, ALL_MODULES if rank != 8 else ["q_proj", "v_proj"], seed=rank)
             for name, rank in RANKS.items()}
    local["reverse-v2"] = make_adapter(base, root / "reverse-v2", 4, 8, ALL_MODULES, seed=99)
    local["other-base"] = make_adapter(other_base, root / "other-base", 4, 8, ["q_proj"], seed=5)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="world")
    for path in (root / "base").iterdir():
        s3.upload_file(str(path), "world", f"base/{path.name}")
    for name, path in local.items():
        for file in path.iterdir():
            s3.upload_file(str(file), "world", f"adapters/{name}/{file.name}")
        for split in ("train", "eval"):
            lines = [json.dumps({"prompt": f"{name} {i}", "response": str(i)}) for i in range(3 if split == "eval" else 6)]
            s3.put_object(Bucket="world", Key=f"data/{name}/{split}.jsonl", Body="\n".join(lines).encode())
    return {"root": root, "base": base, "local": local, "s3": s3}


def entry(name, source=None, **extra):
    source = source or name
    return {"name": name, "uri": f"s3://world/adapters/{source}/", "description": f"the {name} task",
            "data": {"train": f"s3://world/data/{source}/train.jsonl", "eval": f"s3://world/data/{source}/eval.jsonl"},
            **extra}


def write_manifest(path: Path, entries, baselines=None) -> Path:
    document = {"apiVersion": "meteora/v1", "kind": "AdapterManifest",
                "base_model": {"name": "tiny-base", "uri": "s3://world/base/"}, "adapters": entries,
                **({"baselines": baselines} if baselines is not None else {})}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def collect_file(manifest_path, registry_uri: str, **options):
    return collect(load_manifest(manifest_path), registry_uri, **options)


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_collect_from_s3_register_more_later_and_load_a_model(world, tmp_path, capsys):
    registry_dir = tmp_path / "registry"
    first = write_manifest(tmp_path / "first.yaml", [entry(n) for n in RANKS])
    assert main(["--manifest", str(first), "--registry", str(registry_dir)]) == 0
    index = json.loads((registry_dir / "registry.json").read_text())
    assert list(index["adapters"]) == list(RANKS)
    assert [index["adapters"][n]["rank"] for n in RANKS] == list(RANKS.values())
    assert index["base_model"]["fingerprint"].startswith("sha256:")
    sha, directory = index["adapters"]["reverse"]["sha256"], index["adapters"]["reverse"]["content_sha256"]
    assert (registry_dir / "adapters" / directory / "adapter_model.safetensors").read_bytes() == \
        (world["local"]["reverse"] / "adapter_model.safetensors").read_bytes()
    assert (registry_dir / "data" / f"{index['adapters']['reverse']['data']['eval']}.jsonl").is_file()

    before = snapshot(registry_dir)
    outcome = collect_file(first, str(registry_dir))  # identical content: a no-op
    assert {r["status"] for r in outcome.rows} == {"unchanged"} and snapshot(registry_dir) == before

    second = write_manifest(tmp_path / "second.yaml", [entry("sort"), entry("reverse", source="reverse-v2"), entry("lower", source="upper")])
    outcome = collect_file(second, str(registry_dir))
    assert [(r["name"], r["status"]) for r in outcome.rows] == [("sort", "unchanged"), ("reverse", "new version"), ("lower", "added")]
    registry = Registry(registry_dir)
    assert registry.names == ["reverse", "sort", "upper", "lower"]  # existing entries stay
    assert registry.entry("reverse")["version"] == 2 and registry.entry("reverse")["previous"][0]["sha256"] == sha

    capsys.readouterr()
    assert main(["--registry", str(registry_dir), "--list"]) == 0
    listing = capsys.readouterr().out
    assert "reverse" in listing and "v2" in listing and "lower" in listing

    fused = MeteoraModel.from_adapters(copy.deepcopy(world["base"]), registry, top_k=2)
    direct = MeteoraModel.from_adapters(copy.deepcopy(world["base"]), {"upper": world["local"]["upper"]}, top_k=1)
    assert fused.expert_names == ["reverse", "sort", "upper", "lower"]
    with torch.no_grad(), fused.force_experts(["upper"]), direct.force_experts(["upper"]):  # one path: bit for bit
        assert torch.equal(fused(random_ids()).logits, direct(random_ids()).logits)

    before = snapshot(registry_dir)
    assert main(["--registry", str(registry_dir), "--remove", "sort", "nope"]) == 2  # an unknown name: nothing removed
    assert "no adapter 'nope'" in capsys.readouterr().err and snapshot(registry_dir) == before
    assert main(["--registry", str(registry_dir), "--remove", "sort"]) == 0
    assert Registry(registry_dir).names == ["reverse", "upper", "lower"]
    assert main(["--registry", str(registry_dir), "--remove", "reverse", "upper", "lower"]) == 0
    assert Registry(registry_dir).base_model is None  # emptied: adapters of another base may come


def test_collect_into_an_s3_registry_and_load_from_it(world, tmp_path, monkeypatch):
    monkeypatch.setenv("METEORA_CACHE", str(tmp_path / "cache"))
    manifest = write_manifest(tmp_path / "m.yaml", [entry(n) for n in RANKS])
    assert collect_file(manifest, "s3://world/registry").committed
    keys = [o["Key"] for o in world["s3"].list_objects_v2(Bucket="world", Prefix="registry/")["Contents"]]
    assert "registry/registry.json" in keys and sum(k.endswith(".jsonl") for k in keys) == 6
    registry = Registry("s3://world/registry")
    assert registry.names == list(RANKS)
    assert registry.data_file("sort", "eval").read_text().startswith('{"prompt": "sort 0"')
    model = MeteoraModel.from_adapters(copy.deepcopy(world["base"]), registry)
    assert model.expert_names == list(RANKS)


def _bad_object(world, name, change):
    """Copy the 'reverse' adapter to adapters/<name>/ in the bucket with one change applied to its files."""
    files = {f.name: f.read_bytes() for f in world["local"]["reverse"].iterdir()}
    change(files)
    for file, data in files.items():
        world["s3"].put_object(Bucket="world", Key=f"adapters/{name}/{file}", Body=data)
    return entry("bad", source=name) | {"data": {"train": "s3://world/data/reverse/train.jsonl"}}


def _truncate(files):
    files["adapter_model.safetensors"] = files["adapter_model.safetensors"][:-64]


def _pickle_only(files):
    files["adapter_model.bin"] = files.pop("adapter_model.safetensors")


BAD = {  # case -> (manifest entries, raw text or {"baselines": entries}, message in the error / rejection)
    "malformed_yaml": ("adapters: [name: x\n", "not valid YAML"),
    "unknown_key": ([entry("reverse") | {"descripton": "typo"}], "unknown field(s) ['descripton']"),
    "bad_name": ([entry("Reverse!")], "field 'name'"),
    "escape_name": ([entry("../../escape")], "field 'name'"),
    "newline_name": ([entry("reverse\n")], "field 'name'"),  # `$` alone would let a final newline through
    "not_utf8_data": ([entry("reverse") | {"data": {"train": "s3://world/data/latin1.jsonl"}}], "is not UTF-8 text"),
    "duplicate_names": ([entry("reverse"), entry("reverse")], "duplicate adapter names"),
    "missing_object": ([entry("nowhere")], "cannot read"),
    "wrong_sha256": ([entry("reverse", sha256="0" * 64)], "the manifest says"),
    "other_base": ([entry("other-base")], "shape mismatch"),
    "broken_data_line": ([entry("reverse") | {"data": {"eval": "s3://world/data/broken.jsonl"}}], "line 2 is not valid JSON"),
    "empty_prompt": ([entry("reverse") | {"data": {"train": "s3://world/data/empty.jsonl"}}], "line 2 has an empty 'prompt'"),
    "truncated": (lambda w: [_bad_object(w, "truncated", _truncate)], "truncated or corrupt"),
    "pickle_only": (lambda w: [_bad_object(w, "pickled", _pickle_only)], "pickle"),
    "baseline_with_data": ({"baselines": [entry("lora-b", "sort")]}, "baselines[0] ('lora-b'): unknown field(s) ['data']"),
    "baseline_other_base": ({"baselines": [{"name": "lora-b", "uri": "s3://world/adapters/other-base/"}]}, "shape mismatch"),
    "duplicate_baselines": ({"baselines": [{"name": "b", "uri": "s3://world/adapters/sort/"}] * 2},
                            "duplicate baseline names"),
}


@pytest.fixture
def populated(world, tmp_path):
    """A local registry that already holds one adapter."""
    registry_dir = tmp_path / "registry"
    assert collect_file(write_manifest(tmp_path / "seed.yaml", [entry("sort")]), str(registry_dir)).committed
    world["s3"].put_object(Bucket="world", Key="data/broken.jsonl", Body=b'{"prompt": "a", "response": "b"}\n{"prompt": \n')
    world["s3"].put_object(Bucket="world", Key="data/empty.jsonl", Body=b'{"prompt": "a", "response": "b"}\n{"prompt": "", "response": "b"}\n')
    world["s3"].put_object(Bucket="world", Key="data/latin1.jsonl", Body='{"prompt": "caf\u00e9", "response": "b"}\n'.encode("latin-1"))
    return registry_dir


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_rejected_and_the_registry_is_unchanged(world, populated, tmp_path, capsys, case):
    spec, message = BAD[case]
    manifest = tmp_path / "bad.yaml"
    if isinstance(spec, str):
        manifest.write_text(spec)
    elif isinstance(spec, dict):  # the adapters good, the baselines not
        write_manifest(manifest, [entry("upper")], spec["baselines"])
    else:
        spec = spec(world) if callable(spec) else spec
        write_manifest(manifest, [entry("upper")] + spec)  # a good adapter beside the bad one
    before = snapshot(populated)
    code = main(["--manifest", str(manifest), "--registry", str(populated)])
    captured = capsys.readouterr()
    assert code in (1, 2)
    assert message in captured.out + captured.err
    assert snapshot(populated) == before


def test_the_object_store_down_mid_collect_leaves_the_registry_unchanged_and_a_rerun_succeeds(world, populated, tmp_path,
                                                                                                s3_server):
    manifest = write_manifest(tmp_path / "m.yaml", [entry(n) for n in RANKS])
    before = snapshot(populated)
    try:  # the whole server stops after the first adapter is fetched, and comes back on the same ports and data
        outcome = collect_file(manifest, str(populated), parallel=1, on_fetched=lambda collected: s3_server.stop())
    finally:
        s3_server.start()
    statuses = [r["status"] for r in outcome.rows]
    assert statuses == ["not committed", "rejected", "rejected"] and "would be added" in outcome.rows[0]["detail"]
    assert "Could not connect to the endpoint" in outcome.rows[1]["detail"] and outcome.exit_code == 1
    assert snapshot(populated) == before
    assert collect_file(manifest, str(populated)).committed and set(Registry(populated).names) == {"sort", *RANKS}


def test_same_weights_with_another_alpha_is_another_adapter(world, tmp_path):
    files = {f.name: f.read_bytes() for f in world["local"]["reverse"].iterdir()}
    config = json.loads(files["adapter_config.json"])
    files["adapter_config.json"] = json.dumps({**config, "lora_alpha": 4 * config["lora_alpha"]}).encode()
    for name, data in files.items():
        world["s3"].put_object(Bucket="world", Key=f"adapters/reverse-alpha/{name}", Body=data)
    registry_dir = tmp_path / "registry"
    loud_spec = entry("loud", source="reverse-alpha") | {"data": entry("reverse")["data"]}
    assert collect_file(write_manifest(tmp_path / "a.yaml", [entry("reverse"), loud_spec]), str(registry_dir)).committed
    registry = Registry(registry_dir)
    same, loud = registry.entry("reverse"), registry.entry("loud")
    assert same["sha256"] == loud["sha256"] and same["content_sha256"] != loud["content_sha256"]
    assert registry.trained_on("reverse") != registry.trained_on("loud")  # gates trained on one are not the other's
    dirs = registry.adapter_dirs()
    assert json.loads((dirs["loud"] / "adapter_config.json").read_text())["lora_alpha"] == 4 * config["lora_alpha"]
    outcome = collect_file(write_manifest(tmp_path / "b.yaml", [loud_spec | {"name": "reverse"}]), str(registry_dir))
    assert [r["status"] for r in outcome.rows] == ["new version"]  # only the alpha changed: still a new version


def test_a_manifest_in_s3_with_relative_uris_is_collected(world, tmp_path):
    """Relative URIs in a manifest read from s3:// are taken from the manifest's own prefix."""
    document = {"apiVersion": "meteora/v1", "kind": "AdapterManifest", "base_model": {"name": "tiny-base", "uri": "base/"},
                "adapters": [{"name": "sort", "uri": "adapters/sort/",
                              "data": {"train": "data/sort/train.jsonl", "eval": "data/sort/eval.jsonl"}}]}
    world["s3"].put_object(Bucket="world", Key="manifests-relative.yaml", Body=yaml.safe_dump(document).encode())
    manifest = load_manifest("s3://world/manifests-relative.yaml")
    assert manifest.base_uri == "s3://world/base/" and manifest.adapters[0].data["eval"] == "s3://world/data/sort/eval.jsonl"
    assert collect_file("s3://world/manifests-relative.yaml", str(tmp_path / "registry")).committed
    climbing = {**document, "base_model": {"name": "tiny-base", "uri": "../base/"},
                "adapters": [{**document["adapters"][0], "uri": "./../adapters/sort/", "data": {"eval": "../data/sort/eval.jsonl"}}]}
    world["s3"].put_object(Bucket="world", Key="manifests/relative.yaml", Body=yaml.safe_dump(climbing).encode())
    manifest = load_manifest("s3://world/manifests/relative.yaml")  # "." and ".." folded into the keys
    assert (manifest.base_uri, manifest.adapters[0].uri) == ("s3://world/base/", "s3://world/adapters/sort/")
    assert manifest.adapters[0].data["eval"] == "s3://world/data/sort/eval.jsonl"
    world["s3"].put_object(Bucket="world", Key="manifests/out.yaml",
                           Body=yaml.safe_dump({**climbing, "base_model": {"name": "b", "uri": "../../base/"}}).encode())
    with pytest.raises(ManifestError, match="climbs out of the bucket"):
        load_manifest("s3://world/manifests/out.yaml")
    with pytest.raises(ManifestError, match="cannot be read"):
        load_manifest("s3://world/missing.yaml")


def test_source_tags_change_when_an_object_is_replaced_in_place(world, tmp_path):
    """What tells the workflow to collect again when the manifest is the same but an object it names is not."""
    for file in world["local"]["reverse"].iterdir():
        world["s3"].upload_file(str(file), "world", f"adapters/in-place/{file.name}")
    manifest = load_manifest(write_manifest(tmp_path / "m.yaml", [entry("reverse") | {"uri": "s3://world/adapters/in-place/"}]))
    before = source_tags(manifest)
    assert len(before[0]) == 4 and None not in before[0] and source_tags(manifest) == before
    world["s3"].upload_file(str(world["local"]["reverse-v2"] / "adapter_model.safetensors"), "world",
                            "adapters/in-place/adapter_model.safetensors")
    after = source_tags(manifest)
    assert after[0][1] != before[0][1] and after[0][0] == before[0][0]


def test_task_data_lines_end_at_newlines_only():
    """JSON strings may hold U+2028 or U+0085 unescaped: they are not line ends; a final newline and CRLF are."""
    text = json.dumps({"prompt": "a\u2028b\u0085c", "response": "d"}, ensure_ascii=False) + "\r\n"
    text += json.dumps({"prompt": "e", "response": "f"}) + "\n"
    assert [sample["prompt"] for sample in read_samples(text.encode(), "x")] == ["a\u2028b\u0085c", "e"]
