"""The deployment files are valid for the tools that read them: Ray's cluster-launcher schema, Ray Serve's config
schema and our own settings; the KubeRay manifest serves what configs/serve.yaml serves."""
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config  # private API: pinned by this test
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

import serve_app
from pipelines import local_cluster
from pipelines.local_cluster import free_ports
from tiny import tiny_checkpoint

ROOT = Path(__file__).parents[2]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_cluster_yaml_passes_rays_schema_and_pins_this_ray():
    config = load("cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] >= 1
    assert any("pip install" in c and "~/meteora" in c for c in config["setup_commands"])
    wrong = {**copy.deepcopy(config), "max_workerz": 3}  # a typo must not pass
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(wrong))


def test_serve_config_is_a_valid_serve_config_with_valid_settings():
    config = load("configs/serve.yaml")
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "serve_app:app_builder"
    serve_app.ServeSettings.model_validate(app["args"])
    scaling = app["deployments"][0]["autoscaling_config"]
    assert app["deployments"][0]["max_ongoing_requests"] > scaling["target_ongoing_requests"]


def test_serve_settings_refuse_an_unknown_backend_naming_the_choices():
    args = {**load("configs/serve.yaml")["applications"][0]["args"], "backend": "trition"}
    with pytest.raises(ValidationError, match=r"backend[\s\S]*'trition'[\s\S]*'loop', 'torch', 'triton'"):
        serve_app.ServeSettings.model_validate(args)


def test_kuberay_rayservice_serves_the_same_application():
    manifest = load("configs/kuberay-rayservice.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)
    (app,) = served["applications"]
    (local,) = load("configs/serve.yaml")["applications"]
    serve_app.ServeSettings.model_validate(app["args"])
    assert {k: v for k, v in app["args"].items() if k != "checkpoint"} == {k: v for k, v in local["args"].items() if k != "checkpoint"}
    assert app["args"]["checkpoint"].startswith("s3://")
    (deployment,), (local_deployment,) = app["deployments"], local["deployments"]
    assert deployment["ray_actor_options"]["num_gpus"] == 1
    assert {k: v for k, v in deployment.items() if k != "ray_actor_options"} == \
        {k: v for k, v in local_deployment.items() if k != "ray_actor_options"}


def readme_block(language: str, containing: str) -> str:
    """The README's first code block in `language` that contains `containing`."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)
    return next(block for block in blocks if containing in block)


def wait_for(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not answer in {timeout_s} s")


def test_serve_run_and_serve_deploy_with_the_config_file_and_the_readme_clients(tmp_path, monkeypatch):
    """`serve run` / `serve deploy` of configs/serve.yaml (checkpoint and port changed) on a local cluster, then the
    README's curl command and openai snippet against it, with an API key."""
    monkeypatch.setenv("METEORA_API_KEY", "sk-readme")  # the cluster's processes, hence the replicas, get it
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    checkpoint = tiny_checkpoint(tmp_path / "assets", names=("reverse", "upper", "sort"))  # the README's examples' names
    port = free_ports(1)[0]
    config = load("configs/serve.yaml")
    config["http_options"].update(host="127.0.0.1", port=port)
    config["applications"][0]["args"]["checkpoint"] = str(checkpoint)
    config["applications"][0]["deployments"][0]["ray_actor_options"]["num_cpus"] = 0.5
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    bin_dir = Path(sys.executable).parent
    cluster = local_cluster.up(tmp_path / "cluster", num_cpus=2)
    try:
        runner = subprocess.Popen([str(bin_dir / "serve"), "run", str(tmp_path / "serve.yaml"), "--address",
                                   cluster["gcs_address"]], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_for(f"http://127.0.0.1:{port}/healthz")
            curl = readme_block("bash", "curl -s localhost:8000").replace("localhost:8000", f"127.0.0.1:{port}")
            reply = json.loads(subprocess.run(["bash", "-c", curl], capture_output=True, text=True, check=True).stdout)
            assert reply["choices"][0]["routing"] and reply["usage"]["completion_tokens"] >= 1
            snippet = readme_block("python", "from openai import OpenAI").replace("localhost:8000", f"127.0.0.1:{port}")
            exec(snippet, {"os": os})  # noqa: S102 - the README's own example, against this server
        finally:
            # serve run tears its application down on Ctrl-C, replicas draining for up to graceful_shutdown_timeout_s
            # (30 s); the test's point is what it served, so a slow teardown on a loaded machine is cut short
            runner.send_signal(signal.SIGINT)
            try:
                runner.wait(timeout=120)
            except subprocess.TimeoutExpired:
                runner.kill()
                runner.wait()
        subprocess.run([str(bin_dir / "serve"), "deploy", str(tmp_path / "serve.yaml"), "--address", cluster["address"]],
                       check=True, capture_output=True)
        wait_for(f"http://127.0.0.1:{port}/healthz")
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer sk-readme"}, timeout=30)
        assert [m["id"] for m in models.json()["data"]] == ["meteora", "meteora:reverse", "meteora:upper", "meteora:sort"]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).status_code == 401
        assert_missing_checkpoint_fails_once(config, tmp_path, bin_dir, cluster["address"])
    finally:
        local_cluster.down(tmp_path / "cluster")


def assert_missing_checkpoint_fails_once(config: dict, tmp_path: Path, bin_dir: Path, address: str) -> None:
    """A config whose checkpoint is not there: the application fails with one line that says what is missing and
    what to run, not a traceback (Serve retries a failed build 3 times, each with its traceback, unless it raises
    RayServeException)."""
    config["applications"][0]["args"]["checkpoint"] = str(tmp_path / "no-checkpoint")
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(config))
    subprocess.run([str(bin_dir / "serve"), "deploy", str(tmp_path / "missing.yaml"), "--address", address],
                   check=True, capture_output=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = subprocess.run([str(bin_dir / "serve"), "status", "--address", address], capture_output=True,
                                text=True, check=True).stdout
        app = yaml.safe_load(status)["applications"]["meteora"]
        if app["status"] == "DEPLOY_FAILED":
            break
        time.sleep(2)
    assert app["status"] == "DEPLOY_FAILED", status
    assert f"no MeteoRA checkpoint at {tmp_path / 'no-checkpoint'}" in app["message"] and "make demo" in app["message"]
    assert "Traceback" not in app["message"], app["message"]
