"""The local mirror of an S3 prefix follows the prefix: changed, added and removed objects."""
import boto3

from meteora_moe.store import local_dir, open_store


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
