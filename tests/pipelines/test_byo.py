"""Bring your own: an adapter trained outside the project with plain peft (examples/byo_adapter.py) on a GGUF base's
chat template, registered with its JSONL through a manifest, goes through collect -> train -> evaluate -> serve,
and the endpoint answers chat requests through the base's chat template."""
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import yaml

from meteora_moe import MeteoraModel
from meteora_moe.registry import load_manifest
from pipelines.local_cluster import free_ports
from pipelines.workflow import load_workflow_config, run
from tiny import write_tiny_gguf

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.usefixtures("local_ray")


def byo(base: Path, out: Path, name: str, targets: str) -> dict:
    command = [sys.executable, str(ROOT / "examples" / "byo_adapter.py"), "--base", str(base), "--out", str(out),
               "--name", name, "--targets", targets, "--steps", "2", "--batch", "4", "--rank", "2",
               "--train-samples", "16", "--eval-samples", "4"]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    return yaml.safe_load((out / "entry.yaml").read_text())


def test_a_peft_adapter_trained_elsewhere_is_registered_trained_evaluated_and_served(tmp_path, monkeypatch):
    from ray import serve

    monkeypatch.setenv("METEORA_CACHE", str(tmp_path / "cache"))
    base = write_tiny_gguf(tmp_path / "base" / "tiny.gguf")
    entries = [byo(base, tmp_path / "mine", "acronym", "gate_proj,up_proj,down_proj"),
               byo(base, tmp_path / "theirs", "acronym-q", "q_proj,v_proj")]
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"apiVersion": "meteora/v1", "kind": "AdapterManifest",
                                        "base_model": {"name": "tiny-gguf", "uri": str(base)}, "adapters": entries}))
    port = free_ports(1)[0]
    config = load_workflow_config(None, [
        f"registry={tmp_path / 'registry'}", f"work_dir={tmp_path / 'work'}", "train.steps=4", "train.batch=4",
        "train.checkpoint_every=2", "train.eval_samples=4", "train.cpus_per_worker=0.5", "evaluate.composite=[2]",
        "evaluate.composite_count=2", "evaluate.samples=2", f"deploy.http_port={port}", "deploy.app_name=byo-test"])
    try:
        outputs = run(load_manifest(manifest), config, can_deploy=True)
        model = MeteoraModel.from_pretrained(outputs["train"].checkpoint)
        assert model.expert_names == ["acronym", "acronym-q"] and model.prompt_format.name == "chat"
        assert model.base_info.uri == str(base)
        assert set(outputs["evaluate"].mean_accuracy) >= {"base", "own adapter", "meteora top-2"}
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["meteora", "meteora:acronym", "meteora:acronym-q"]
        reply = client.chat.completions.create(model="meteora", messages=[{"role": "user", "content": "Acronym: open source project"}],
                                               max_tokens=4, temperature=0, extra_body={"return_routing": True})
        choice = reply.choices[0]
        assert choice.finish_reason in ("stop", "length") and len(choice.routing) == reply.usage.completion_tokens
        assert all(set(step["experts"]) <= {"acronym", "acronym-q"} for step in choice.routing)
    finally:
        serve.shutdown()  # Serve keeps its HTTP port for the Ray cluster's life: later tests start their own
