"""The deployment files are valid for the tools that read them: Ray's cluster-launcher schema, Ray Serve's config
schema and our own settings; the KubeRay manifest serves what configs/serve.yaml serves."""
import copy
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config  # private API: pinned by this test
from ray.serve.schema import ServeDeploySchema

import serve_app

ROOT = Path(__file__).parents[1]


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
