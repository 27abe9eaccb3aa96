"""Both stores, a local directory and an S3 prefix: an object's tag changes when it does, and the compare-and-swap
writes only over what was read."""
from meteora_moe.store import open_store


def test_a_local_objects_tag_changes_when_it_is_rewritten(tmp_path):
    store = open_store(tmp_path)
    assert store.tag("data/train.jsonl") is None and not store.exists("data/train.jsonl")
    store.write_bytes("data/train.jsonl", b"one line\n")
    first = store.tag("data/train.jsonl")
    assert first == store.tag("data/train.jsonl") and store.exists("data/train.jsonl")
    store.write_bytes("data/train.jsonl", b"one line\nanother\n")
    assert store.tag("data/train.jsonl") not in (None, first)


def test_write_if_unchanged_swaps_only_what_was_read(store_uri):
    store = open_store(store_uri)
    assert store.write_if_unchanged("index.json", b"1", None)
    assert not store.write_if_unchanged("index.json", b"2", None)  # it exists now
    assert not store.write_if_unchanged("index.json", b"2", b"0")  # a stale read
    assert store.read_bytes("index.json") == b"1"
    assert store.write_if_unchanged("index.json", b"2", b"1") and store.read_bytes("index.json") == b"2"
    assert not store.write_if_unchanged("gone/index.json", b"3", b"2") and not store.exists("gone/index.json")
