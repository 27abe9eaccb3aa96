"""pipelines/train_gates.py with real Ray Train on a real local Ray: 2 CPU workers, checkpoints to loopback S3,
and a driver killed and restarted (a worker lost with its node, and `ray job submit` against `make cluster-up`:
tests/pipelines/test_cluster.py). The registry holds a tiny model and random adapters (fast):
the gates learn the task from the instruction, which is all these tests need."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meteora_moe import MeteoraModel
from meteora_moe.registry import Registry, load_manifest
from pipelines.collect_adapters import collect
from pipelines.config_files import ConfigError
from pipelines.train_config import load_train_config
from pipelines.train_gates import main, train
from tiny import write_world

pytestmark = pytest.mark.usefixtures("local_ray")
ROOT = Path(__file__).parents[2]
TASKS = {"reverse": 4, "upper": 8, "length": 2}  # expert -> rank


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-world")
    assert collect(load_manifest(write_world(root, TASKS)), str(root / "registry")).committed
    return str(root / "registry")


def settings(registry, tmp_path, name, **extra) -> list[str]:
    values = {"registry": registry, "storage_path": str(tmp_path / "runs"), "name": name, "num_workers": 2, "method": "sgd",
              "steps": 30, "batch": 8, "checkpoint_every": 10, "lr": 0.02, "eval_samples": 24, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def history_steps(summary) -> list[int]:
    return [record["step"] for record in summary["history"]]


def test_bad_config_is_refused_before_anything_starts(registry, tmp_path, capsys):
    with pytest.raises(ConfigError, match="nonsense"):
        load_train_config(None, ["nonsense=1"])
    with pytest.raises(ConfigError, match="steps"):
        load_train_config(None, ["steps=-3"])
    with pytest.raises(ConfigError, match="gate_weight must be >= 0, got -1"):
        load_train_config(None, ["gate_weight=-1"])
    with pytest.raises(ConfigError, match="multiple of num_workers"):
        load_train_config(None, ["batch=7", "num_workers=2"])
    with pytest.raises(ConfigError, match="freeze_old needs init_from"):
        load_train_config(None, ["freeze_old=true"])
    with pytest.raises(ConfigError, match="name"):
        load_train_config(None, ["name=../escape"])
    with pytest.raises(ConfigError, match="'gs://bucket/runs': unsupported URI scheme"):
        load_train_config(None, ["storage_path=gs://bucket/runs"])  # not a local directory "gs:"
    with pytest.raises(ConfigError, match="set its keys flat"):
        load_train_config(None, ["training={lr: 0.03}", "steps=3"])
    for argv, message in [(["experts=[reverse, nope]"], "nope"),
                          (["registry=" + str(tmp_path / "empty")], "holds no adapters"),
                          (["--init-from", str(tmp_path / "missing")], "not a MeteoRA checkpoint")]:
        assert main(settings(registry, tmp_path, "bad") + argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was started or written


def test_two_workers_fit_the_gates_then_train_them_with_checkpoints_on_s3(registry, tmp_path, s3_endpoint, monkeypatch,
                                                                          capsys):
    import boto3

    monkeypatch.setenv("METEORA_CACHE", str(tmp_path / "cache"))  # the workers read the registry from S3
    boto3.client("s3").create_bucket(Bucket="train")
    assert collect(load_manifest(Path(registry).parent / "manifest.yaml"), "s3://train/registry").committed
    summary = train(load_train_config(None, settings("s3://train/registry", tmp_path, "s3-run", storage_path="s3://train/runs",
                                                output="s3://train/models/tiny", method="fit+sgd", fit_samples=16)))
    assert summary["method"] == "fit+sgd" and summary["num_workers"] == 2
    assert history_steps(summary) == [0, 10, 20, 30] and summary["history"][0]["stage"] == "fit"
    fit = summary["fit"]
    assert fit["tokens"] > 0 and fit["eval_routing_accuracy"] > 0.5  # 3 experts: chance is 1/3
    assert summary["final"]["eval_routing_accuracy"] > 0.5 and summary["train_seconds"] > fit["seconds"]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="train")["Contents"]]
    assert any(k.startswith("runs/s3-run/checkpoint_") and k.endswith("train_state.safetensors") for k in keys)
    model = MeteoraModel.from_pretrained("s3://train/models/tiny")
    assert model.expert_names == list(TASKS) and model.training_summary["steps"] == 30
    assert fit["modules"] == len(model.layer_names)
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert progress and progress[-1].startswith("step     30/30  loss")  # printed by the driver, the last one surely


def test_a_run_depends_on_the_settings_its_method_reads(registry, tmp_path):
    experts = [(name, "sha") for name in TASKS]

    def fingerprint(method, **extra):
        return load_train_config(None, settings(registry, tmp_path, "m", method=method, **extra)).run_fingerprint(experts)

    assert fingerprint("fit") == fingerprint("fit", lr=0.5, steps=7) != fingerprint("fit", fit_l2=0.5)
    assert fingerprint("sgd") == fingerprint("sgd", fit_l2=0.5) != fingerprint("sgd", lr=0.5)
    assert fingerprint("fit+sgd", lr=0.5) != fingerprint("fit+sgd") != fingerprint("fit+sgd", fit_l2=0.5)


def _wait_for_checkpoint(runs: Path, timeout: float = 180) -> None:
    """Until Ray Train has registered a checkpoint of the run (its snapshot lists one): a checkpoint uploaded
    but not yet registered when a worker dies is, rightly, not resumed from."""
    snapshot = runs / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while not _registered(snapshot):
        assert time.monotonic() < deadline, "no checkpoint was registered"
        time.sleep(0.2)


def _registered(snapshot: Path) -> bool:
    try:
        return bool(json.loads(snapshot.read_text()).get("checkpoint_results"))
    except (OSError, ValueError):  # not there yet, or being written
        return False


def test_a_restarted_driver_resumes_the_run(registry, tmp_path, local_ray):
    argv = settings(registry, tmp_path, "restarted", steps=160, checkpoint_every=20)
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    driver = subprocess.Popen([sys.executable, str(ROOT / "pipelines" / "train_gates.py"), *argv], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(tmp_path / "runs" / "restarted")
    driver.kill()  # the driver dies; its job's Train controller and workers go with it
    driver.wait()
    summary = train(load_train_config(None, argv))
    resumed_at = summary["attempts"][-1]["started_after_step"]
    assert len(summary["attempts"]) >= 2 and resumed_at >= 20
    assert history_steps(summary) == list(range(20, 161, 20))


def test_a_run_name_is_not_reused_for_other_experts_or_settings(registry, tmp_path, capsys):
    storage = tmp_path / "runs" / "taken"
    storage.mkdir(parents=True)
    (storage / "meteora_run.json").write_text(json.dumps({"fingerprint": "other", "experts": ["x"]}))
    assert main(settings(registry, tmp_path, "taken")) == 2
    assert "already trains experts ['x']" in capsys.readouterr().err

    other = load_train_config(None, settings(registry, tmp_path, "taken", lr=0.05, checkpoint_every=5))
    experts = [(name, Registry(registry).entry(name)["sha256"]) for name in TASKS]
    (storage / "meteora_run.json").write_text(json.dumps({"fingerprint": other.run_fingerprint(experts),
                                                          "experts": list(TASKS), "settings": other.run_settings()}))
    assert other.run_fingerprint(experts) == load_train_config(None, settings(registry, tmp_path, "taken", lr=0.05)).run_fingerprint(experts)
    on_gpu = load_train_config(None, settings(registry, tmp_path, "taken", lr=0.05, use_gpu=True))
    assert on_gpu.run_fingerprint(experts) != other.run_fingerprint(experts)  # precision "auto" resolves by use_gpu
    assert main(settings(registry, tmp_path, "taken")) == 2  # lr 0.02: the finished run's gates would come back
    assert "other ['lr']" in capsys.readouterr().err

    (storage / "meteora_run.json").write_text("[not a record")
    assert main(settings(registry, tmp_path, "taken")) == 2
    assert "meteora_run.json is not a run record" in capsys.readouterr().err
