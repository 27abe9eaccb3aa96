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


def start_s3_server():
    """A real S3 HTTP endpoint on loopback (moto's server mode, in a thread of this process)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def s3_endpoint():
    """S3 on loopback, with the environment boto3 (and Ray tasks) read: endpoint, dummy keys, few retries."""
    server, url = start_s3_server()
    settings = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "2"}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    yield url
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="session")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
