"""The local mirror of an S3 prefix follows the prefix (changed, added and removed objects), atomic writes give
files the mode any new file gets, and an object's tag changes when it does."""
import hashlib
import os

import boto3

from meteora.store import atomic_write, file_sha256, local_dir, open_store


def test_the_mirror_of_an_s3_prefix_follows_what_the_prefix_holds(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("METEORA_CACHE", str(tmp_path / "cache"))
    boto3.client("s3").create_bucket(Bucket="mirrored")
    store = open_store("s3://mirrored/base")
    store.write_bytes("config.json", b"{}")
    store.write_bytes("model.safetensors", b"old weights")
    mirror = local_dir("s3://mirrored/base")
    assert sorted(p.name for p in mirror.iterdir()) == ["config.json", "model.safetensors"]

    store.write_bytes("model.safetensors", b"new weights")  # replaced under the same key
    store.write_bytes("shards/extra.bin", b"x")
    boto3.client("s3").delete_object(Bucket="mirrored", Key="base/config.json")
    assert local_dir("s3://mirrored/base") == mirror
    assert (mirror / "model.safetensors").read_bytes() == b"new weights" and (mirror / "shards/extra.bin").is_file()
    assert not (mirror / "config.json").exists()

    stamp = (mirror / "model.safetensors").stat().st_mtime_ns
    local_dir("s3://mirrored/base")  # nothing changed: nothing fetched again
    assert (mirror / "model.safetensors").stat().st_mtime_ns == stamp
    (mirror / "model.safetensors").unlink()  # a file lost from the cache is fetched again
    assert (local_dir("s3://mirrored/base") / "model.safetensors").read_bytes() == b"new weights"


def test_atomic_writes_get_the_umasks_mode_and_leave_no_temporary_file(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "registry.json", b"{}")
        atomic_write(tmp_path / "weights.bin", lambda path: open(path, "wb").write(b"w"))
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in sorted(tmp_path.iterdir())] == ["0o644", "0o644"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.json", "weights.bin"]


def test_a_local_objects_tag_changes_when_it_is_rewritten(tmp_path):
    store = open_store(tmp_path)
    assert store.tag("data/train.jsonl") is None and not store.exists("data/train.jsonl")
    store.write_bytes("data/train.jsonl", b"one line\n")
    first = store.tag("data/train.jsonl")
    assert first == store.tag("data/train.jsonl") and store.exists("data/train.jsonl")
    store.write_bytes("data/train.jsonl", b"one line\nanother\n")
    assert store.tag("data/train.jsonl") not in (None, first)

def test_file_sha256_streams_the_file(tmp_path):
    data = bytes(range(256)) * 5000  # over one 1 MiB block
    (tmp_path / "blob").write_bytes(data)
    assert file_sha256(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
