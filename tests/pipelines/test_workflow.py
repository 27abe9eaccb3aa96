"""pipelines/workflow.py on a real local Ray and Serve: stages skipped when their inputs are unchanged, a failed
training resumed at the train stage, and a manifest that adds an adapter trained incrementally and redeployed in
place while a client keeps sending requests, then refined by the loop and redeployed again."""
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from meteora_moe import MeteoraModel
from meteora_moe.registry import load_manifest
from pipelines.config_files import ConfigError
from pipelines.local_cluster import free_ports
from pipelines.workflow import StageFailed, _recorded_checkpoint, load_workflow_config, main, run
from pipelines.workflow_state import State, Trained
from tiny import assert_serves, write_world

pytestmark = pytest.mark.usefixtures("local_ray")


def workflow_settings(tmp_path, port: int) -> list[str]:
    return [f"registry={tmp_path / 'registry'}", f"work_dir={tmp_path / 'work'}", "train.steps=20", "train.batch=8",
            "train.checkpoint_every=10", "train.eval_samples=16", "train.lr=0.02", "train.cpus_per_worker=0.5",
            "evaluate.composite=[2]", "evaluate.composite_count=4", "evaluate.samples=4", f"deploy.http_port={port}",
            "deploy.app_name=workflow-test", "deploy.settings={max_tokens_limit: 16}"]


def stages_said(output: str) -> dict[str, str]:
    """{stage: "skipped" | "running"} from the workflow's progress lines."""
    return {line.split("]")[0][1:]: line.split("] ")[1].split(":")[0] for line in output.splitlines()
            if line.startswith("[") and ("skipped" in line or line.endswith("running"))}


def keep_asking(url: str, stop: threading.Event, results: list) -> None:
    while not stop.is_set():
        try:
            r = httpx.post(f"{url}/v1/completions", json={"model": "meteora", "prompt": "upper: ab\n", "max_tokens": 4},
                           timeout=60)
            results.append(r.status_code)
        except httpx.HTTPError as error:
            results.append(type(error).__name__)
        time.sleep(0.05)


def test_skips_unchanged_stages_resumes_a_failed_training_and_adds_adapters_in_place(tmp_path, capsys):
    from ray import serve

    world = tmp_path / "world"
    manifest = write_world(world, {"reverse": 4, "upper": 8})
    port = free_ports(1)[0]
    settings = workflow_settings(tmp_path, port)
    config = load_workflow_config(None, settings)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "runs").write_text("not a directory")  # the training's storage: the train stage fails
    with pytest.raises(StageFailed) as failed:
        run(load_manifest(manifest), config, can_deploy=True)
    assert failed.value.stage == "train"
    state = json.loads((tmp_path / "work" / "workflow_state.json").read_text())
    assert list(state) == ["collect"]  # only what succeeded is recorded

    (tmp_path / "work" / "runs").unlink()
    try:
        capsys.readouterr()
        first = run(load_manifest(manifest), config, can_deploy=True)
        output = capsys.readouterr().out
        assert stages_said(output) == {"collect": "skipped", "train": "running", "evaluate": "running", "deploy": "running"}
        assert "\n[evaluate] meteora top-2, composite-2: " in output  # streamed from its Ray task, worker logs off
        assert "\nfit done: " in output  # the fit's progress, printed by the driver
        assert not first["train"].incremental
        results = json.loads((Path(first["evaluate"].out_dir) / "results.json").read_text())
        assert set(results["per_task"]["meteora top-2"]) == {"reverse", "upper"}
        url = f"http://127.0.0.1:{port}"
        assert httpx.post(f"{url}/v1/completions", json={"model": "meteora", "prompt": "reverse: ab\n", "max_tokens": 3},
                          timeout=60).status_code == 200

        assert main(["--manifest", str(manifest), *settings]) == 0  # the command line, with the same inputs
        output = capsys.readouterr().out
        assert set(stages_said(output).values()) == {"skipped"} and first["train"].checkpoint in output

        bigger = write_world(tmp_path / "world2", {"length": 2})  # a third adapter, on the same base
        grown = yaml.safe_load(manifest.read_text())
        grown["adapters"].append(yaml.safe_load(bigger.read_text())["adapters"][0])
        grown_manifest = tmp_path / "grown.yaml"
        grown_manifest.write_text(yaml.safe_dump(grown, sort_keys=False))
        stop, answers = threading.Event(), []
        client = threading.Thread(target=keep_asking, args=(url, stop, answers))
        client.start()
        try:
            third = run(load_manifest(grown_manifest), config.model_copy(update={"refine_steps": 2}), can_deploy=True)
        finally:
            stop.set()
            client.join()
        output = capsys.readouterr().out
        assert stages_said(output) == {"collect": "running", "train": "running", "evaluate": "running",
                                       "deploy": "running", "refine": "running"}
        assert output.index("[deploy] running") < output.index("[refine] running") < output.rindex("[deploy] running")
        assert third["train"].incremental
        grown_model = MeteoraModel.from_pretrained(third["train"].checkpoint)
        assert grown_model.expert_names == ["reverse", "upper", "length"]
        training = grown_model.training_summary  # by default copied rows frozen, only the new expert's rows fitted
        assert training["freeze_old"] is True and training["method"] == "fit" and training["steps"] == 0
        assert training["fit"]["modules"] == len(grown_model.layer_names)
        first_model = MeteoraModel.from_pretrained(first["train"].checkpoint)
        for name, layer in grown_model.layers.items():  # reverse's and upper's rows as the first run left them
            assert torch.equal(layer.meteora_gate[:2], first_model.layers[name].meteora_gate), name
        refined = MeteoraModel.from_pretrained(third["refine"].checkpoint)  # the loop from the fit's start: fresh rows only
        assert refined.training_summary["method"] == "fit+sgd" and refined.training_summary["steps"] == 2
        assert refined.training_summary["warm_start"]["init_from"] == first["train"].checkpoint
        for name, layer in refined.layers.items():
            assert torch.equal(layer.meteora_gate[:2], first_model.layers[name].meteora_gate), name
        assert any(not torch.equal(layer.meteora_gate[2], grown_model.layers[name].meteora_gate[2])  # the loop moved them
                   for name, layer in refined.layers.items())
        assert third["deploy"].checkpoint == third["refine"].checkpoint  # what serves now
        assert Path(third["evaluate"].out_dir).name == Path(third["refine"].checkpoint).name
        models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
        assert [m["id"] for m in models][-1] == "meteora:length"  # the redeployed application serves the new model
        assert answers and all(status == 200 for status in answers), answers  # none failed during the update

        shrunk = {**grown, "adapters": [a for a in grown["adapters"] if a["name"] != "upper"]}  # upper removed
        shrunk_manifest = tmp_path / "shrunk.yaml"
        shrunk_manifest.write_text(yaml.safe_dump(shrunk, sort_keys=False))
        every_row = config.model_copy(update={"incremental_freeze_old": False,  # deploying and evaluating: shown above
                                              "evaluate": config.evaluate.model_copy(update={"enabled": False})})
        fourth = run(load_manifest(shrunk_manifest), every_row, can_deploy=False)
        output = capsys.readouterr().out
        assert fourth["train"].incremental and "rows dropped for ['upper']\n" in output
        shrunk_model = MeteoraModel.from_pretrained(fourth["train"].checkpoint)
        assert shrunk_model.expert_names == ["reverse", "length"] and not shrunk_model.training_summary["freeze_old"]
        warm = shrunk_model.training_summary["warm_start"]  # the kept experts' rows copied from the third run's
        assert warm["init_from"] == third["train"].checkpoint and set(warm["experts"].values()) == {"copied"}
        assert_serves(fourth["train"].checkpoint)

        other_l2 = every_row.model_copy(update={"train": {**every_row.train, "fit_l2": 0.03}})
        fifth = run(load_manifest(shrunk_manifest), other_l2, can_deploy=False)  # the same experts, another L2 weight
        assert stages_said(capsys.readouterr().out)["train"] == "running"
        assert not fifth["train"].incremental and fifth["train"].checkpoint != fourth["train"].checkpoint
    finally:
        serve.shutdown()  # Serve keeps its HTTP port for the Ray cluster's life: later tests start their own


def test_bad_config_or_manifest_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(ConfigError, match="nonsense"):
        load_workflow_config(None, ["nonsense=1", "registry=r", "work_dir=w"])
    with pytest.raises(ConfigError, match="set by the workflow"):
        load_workflow_config(None, ["train.init_from=x", "registry=r", "work_dir=w"])
    with pytest.raises(ConfigError, match="steps"):
        load_workflow_config(None, ["train.steps=-1", "registry=r", "work_dir=w"])
    with pytest.raises(ConfigError, match="settings.backend: .*unknown backend"):  # the serving settings too, before any stage
        load_workflow_config(None, ["deploy.settings={backend: tritn}", "registry=r", "work_dir=w"])
    with pytest.raises(ConfigError, match="deployment: .*num_replica"):
        load_workflow_config(None, ["deploy.deployment={num_replica: 2}", "registry=r", "work_dir=w"])
    (tmp_path / "bad.yaml").write_text("apiVersion: meteora/v1\nkind: AdapterManifest\nadapters: nope\n")
    assert main(["--manifest", str(tmp_path / "bad.yaml"), f"work_dir={tmp_path / 'w'}", f"registry={tmp_path / 'r'}"]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="unsupported URI scheme"):
        load_workflow_config(None, ["registry=S3://bucket/r", "work_dir=w"])  # not a local directory "S3:"


def test_a_corrupt_state_file_is_named_and_left_as_it_was(tmp_path, capsys):
    manifest = write_world(tmp_path / "world", {"reverse": 4})
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "workflow_state.json").write_text("{not json")
    assert main(["--manifest", str(manifest), f"work_dir={tmp_path / 'w'}", f"registry={tmp_path / 'r'}"]) == 2
    assert "workflow_state.json: not a workflow state file" in capsys.readouterr().err
    assert (tmp_path / "w" / "workflow_state.json").read_text() == "{not json"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("stage", ["train", "refine"])
def test_a_recorded_training_whose_checkpoint_is_gone_is_forgotten(tmp_path, stage):
    """So the stage trains again (and a refined checkpoint that is gone is not served) instead of being skipped."""
    kept, gone = tmp_path / "kept", tmp_path / "gone"
    kept.mkdir()
    (kept / "meteora_config.json").write_text("{}")
    state = State(tmp_path)
    state.record(stage, "inputs", Trained(str(kept), [("a", "0" * 64)], "base", False, 1.0, None))
    assert _recorded_checkpoint(state, stage, "inputs").checkpoint == str(kept)
    assert _recorded_checkpoint(state, stage, "other inputs") is None and stage in state.records
    state.record(stage, "inputs", Trained(str(gone), [("a", "0" * 64)], "base", False, 1.0, None))
    assert _recorded_checkpoint(state, stage, "inputs") is None and stage not in state.records
