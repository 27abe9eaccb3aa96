import os

import pytest
import torch

from pipelines.local_cluster import free_ports

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if not torch.cuda.is_available():  # run the Triton kernels through the interpreter (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def free_port() -> int:
    """A free loopback port below 32768 and outside Ray's worker range (10002-19999)."""
    return free_ports(1)[0]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server on loopback (SeaweedFS, its own process group), for the whole session."""
    from pipelines.local_s3 import LocalS3

    with LocalS3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_endpoint(s3_server):
    """S3 on loopback, with the environment boto3 (and Ray tasks) read: endpoint, keys, few retries."""
    saved = {key: os.environ.get(key) for key in s3_server.env}
    os.environ.update(s3_server.env)
    yield s3_server.endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path):
    """An empty store: a local directory, or a prefix of a bucket on the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    import boto3

    request.getfixturevalue("s3_endpoint")
    client = boto3.client("s3")
    if "stores" not in [bucket["Name"] for bucket in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket="stores")
    return f"s3://stores/{tmp_path.name}"
