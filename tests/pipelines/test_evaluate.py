"""pipelines/evaluate.py, the evaluate command, on a tiny tinytasks build: tables and plots, bad tasks refused."""
from pipelines.evaluate import main
from suites.tinytasks import TinyTasksConfig, build

TINY = TinyTasksConfig(tasks=("reverse", "upper"), ranks=(4, 2), hidden=32, layers=1, adapter_first_layer=0, base_steps=30,
                       adapter_steps=15, lora_b_steps=15, batch=16, n_train=32, n_eval=4)


def test_the_evaluate_command_writes_tables_and_plots(tmp_path, capsys, local_ray):
    manifest = build(str(tmp_path / "tinytasks"), TINY)
    assert main(["--manifest", manifest, "--samples", "2", "--composite", "2", "--composite-count", "2",
                 "--out", str(tmp_path / "eval")]) == 0
    assert "| **mean** |" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "eval").iterdir()} >= {"results.json", "results.md", "accuracy.png", "routing.png"}
    assert main(["--manifest", manifest, "--tasks", "nope"]) == 2
