"""The embedded benchmark on a tiny instance: tasks, build (cached), manifest into the registry, the harness."""
import copy
import json
import logging
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from meteora_moe import MeteoraModel, load_tokenizer
from meteora_moe.evaluation import METRICS, CompositeSettings, evaluate, load_benchmark
from meteora_moe.prompts import composite
from meteora_moe.registry import METRICS as MANIFEST_METRICS
from meteora_moe.registry import Registry, load_manifest
from meteora_moe.training import GateTrainer, GateTrainingConfig, gate_batch, registry_samples, response_routing_accuracy
from pipelines.collect_adapters import collect
from suites.tinytasks import ALL_TASKS, DEFAULT_TASKS, TinyTasksConfig, build, char_tokenizer, split_samples

TINY = TinyTasksConfig(tasks=("reverse", "upper", "length"), ranks=(4, 8, 2), hidden=32, layers=1, adapter_first_layer=0, base_steps=30,
                       adapter_steps=15, lora_b_steps=15, batch=16, n_train=64, n_eval=8)


def test_bad_build_settings_are_refused():
    with pytest.raises(ValueError, match="must not learn benchmark tasks"):
        TinyTasksConfig(tasks=("reverse", "first"))
    with pytest.raises(ValueError, match="tasks must be"):
        TinyTasksConfig(tasks=("reverse", "nope"))
    with pytest.raises(ValueError, match=r"attention_only names unknown tasks \['lenght'\]"):
        TinyTasksConfig(attention_only=("lenght",))
    with pytest.raises(ValueError, match="ranks must be one or more positive integers"):
        TinyTasksConfig(ranks=())


def test_tasks_are_deterministic_disjoint_and_scorable():
    assert len(ALL_TASKS) == 28 and len(DEFAULT_TASKS) == 8
    train, evaluation = split_samples("sort", 50, 20, seed=3)
    assert (train, evaluation) == split_samples("sort", 50, 20, seed=3)
    assert not {s["prompt"] for s in train} & {s["prompt"] for s in evaluation}
    assert all(s["response"] == "".join(sorted(s["prompt"].split(": ")[1].strip())) for s in train)
    both = composite(evaluation[:2])
    assert both["prompt"] == evaluation[0]["prompt"] + evaluation[1]["prompt"] and both["response"].count("\n") == 1
    assert METRICS["exact_match"]("abc", "abc") == 1 and METRICS["rouge_l"]("a b c", "a c") == pytest.approx(0.8)
    assert 0 < METRICS["bleu"]("the cat sat on the mat", "the cat sat on a mat") < 1
    assert set(METRICS) == set(MANIFEST_METRICS), "every metric a manifest may name is scored"


def test_composite_tokens_are_labelled_per_segment():
    first, second = ({"prompt": "reverse: ab\n", "response": "ba"}, 0), ({"prompt": "upper: c\n", "response": "C"}, 1)
    batch = gate_batch(char_tokenizer(), [first, [first, second]])
    #          <s> reverse: ab\n  upper: c  \n  b  a  \n C </s>
    expected = [0] * 13 + [1] * 8 + [0] + [0, 0] + [1, 1, 1]  # <s>: the first problem's; the prompt's last \n and the
    assert batch["token_tasks"][1].tolist() == expected           # answers' \n: the next answer's task
    assert batch["token_tasks"][0].tolist() == [0] * 16 + [-100] * 11


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("tinytasks")
    return out, build(str(out), TINY)


def test_build_is_loadable_offline_and_cached(built):
    out, manifest = built
    root = out / f"tinytasks-{TINY.key()}"
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    assert tokenizer.decode(tokenizer("reverse: abc\n")["input_ids"]) == "reverse: abc\n"
    assert model.config.vocab_size == len(tokenizer)
    configs = {t: json.loads((root / "adapters" / t / "adapter_config.json").read_text()) for t in TINY.tasks}
    assert [c["r"] for c in configs.values()] == [4, 8, 2]
    assert sorted(configs["length"]["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    report = json.loads((root / "build_report.json").read_text())
    assert set(report["accuracy"]) == {"base", "adapters", "lora-b", "merged"}
    start = time.perf_counter()
    assert build(str(out), TINY) == manifest and time.perf_counter() - start < 2, "a second build is a cache hit"


@pytest.fixture(scope="module")
def tiny_registry(built, tmp_path_factory, local_ray):
    _, manifest = built
    path = tmp_path_factory.mktemp("registry")
    outcome = collect(load_manifest(manifest), str(path))
    assert outcome.committed and [r["status"] for r in outcome.rows] == ["added"] * 5  # 3 adapters, 2 baselines
    return Registry(path)


def test_generated_manifest_is_accepted_by_the_registry_pipeline(tiny_registry):
    assert tiny_registry.names == list(TINY.tasks)
    assert tiny_registry.base_model["name"] == f"tinytasks-base-{TINY.key()}"
    assert list(tiny_registry.index["baselines"]) == ["lora-b", "merged"]


def test_gates_train_on_the_registry_data(tiny_registry):
    base_uri = tiny_registry.base_model["uri"]
    model = MeteoraModel.from_adapters(base_uri, tiny_registry, top_k=2)
    tokenizer = load_tokenizer(base_uri)
    samples = registry_samples(tiny_registry, model.expert_names, "train")
    evaluation = registry_samples(tiny_registry, model.expert_names, "eval")
    assert {task for _, task in samples} == {0, 1, 2} and len(samples) == 3 * TINY.n_train
    before = response_routing_accuracy(model, tokenizer, evaluation)
    trainer = GateTrainer(model, tokenizer, GateTrainingConfig(steps=150, batch=16, lr=1e-2, checkpoint_every=5))
    trainer.run(samples, evaluation)  # the production loop, in one process
    history = trainer.state["history"]
    after = response_routing_accuracy(model, tokenizer, evaluation)
    assert history[-1]["eval_routing_accuracy"] == pytest.approx(after)
    assert sum(h["gate_loss"] for h in history[-3:]) < sum(h["gate_loss"] for h in history[:3])
    assert after > before + 0.1, (before, after)  # this 1-layer, 32-wide instance plateaus near 0.6; the demo measures the real build


def test_merged_baseline_is_the_uniform_average_of_the_adapters(built):
    out, _ = built
    root = out / f"tinytasks-{TINY.key()}"
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    merged = PeftModel.from_pretrained(copy.deepcopy(base), root / "baselines" / "merged").eval()
    fused = MeteoraModel.from_adapters(copy.deepcopy(base), {t: root / "adapters" / t for t in TINY.tasks})
    ids = torch.randint(4, 40, (2, 12))
    with torch.no_grad(), fused.force_experts(list(TINY.tasks)):
        torch.testing.assert_close(fused(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-5)


def test_harness_runs_end_to_end_with_a_checkpoint(tiny_registry, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="meteora_moe.evaluation")
    bench = load_benchmark(tiny_registry, baselines=["lora-b", "merged"], samples=6)
    checkpoint = tmp_path / "ckpt"
    MeteoraModel.from_adapters(copy.deepcopy(bench.base), bench.adapters, top_k=2).save_pretrained(checkpoint)
    results = evaluate(bench, checkpoint, CompositeSettings(sizes=(2, 3), count=4, temperature=2.0), out_dir=tmp_path / "eval")
    assert set(results["per_task"]) == {"base", "lora-b", "merged", "meteora top-1", "meteora top-2", "own adapter"}
    assert set(results["composite"]) == set(results["per_task"]) | {"perfect routing", "meteora top-2 T=2"}
    assert 0 <= results["routing_accuracy"] <= 1
    assert all(0 <= v <= 1 for row in results["per_task"].values() for v in row.values())
    assert set(results["composite"]["meteora top-2"]) == {"2", "3"}
    assert all(0 <= r["3"]["summed"] <= 3 for r in results["composite"].values())
    assert len(results["composite"]["own adapter"]["3"]["per_position"]) == 3  # the oracle: sub-problems asked alone
    for file in ("results.json", "results.md", "accuracy.png", "routing.png"):
        assert (tmp_path / "eval" / file).stat().st_size > 0
    example = results["routing_example"]
    assert len(example["expert_weights"]) == len(example["tokens"]) and len(example["expert_weights"][0]) == 3
    summed = results["composite"]["perfect routing"]["3"]["summed"]  # progress: one line per variant scored
    assert f"perfect routing, composite-3: {summed:.3f} (" in caplog.text
    assert len([line for line in caplog.text.splitlines() if ", per task: " in line]) == len(results["per_task"])


def test_build_into_s3_then_the_cache_hits(s3_endpoint, local_ray, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("METEORA_CACHE", str(tmp_path / "cache"))
    boto3.client("s3").create_bucket(Bucket="tiny-build")
    manifest = build("s3://tiny-build/bench", TINY)
    assert manifest == f"s3://tiny-build/bench/tinytasks-{TINY.key()}/manifest.yaml"
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="tiny-build")["Contents"]]
    assert any(k.endswith("adapters/upper/adapter_model.safetensors") for k in keys)
    assert collect(load_manifest(manifest), "s3://tiny-build/registry").committed  # from S3 into S3
    bench = load_benchmark(Registry("s3://tiny-build/registry"), baselines=["lora-b", "merged"], samples=2)
    assert list(bench.eval_sets) == list(TINY.tasks) and set(bench.baselines) == {"lora-b", "merged"}
    start = time.perf_counter()
    assert build("s3://tiny-build/bench", TINY) == manifest and time.perf_counter() - start < 2


def test_a_relative_output_directory_gives_a_working_manifest(tmp_path, monkeypatch, local_ray):
    monkeypatch.chdir(tmp_path)
    manifest = build("relative-out", TINY)
    assert Path(manifest).is_absolute()
    assert collect(load_manifest(manifest), "registry").committed
