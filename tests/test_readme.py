"""Every command the README shows is exercised somewhere, and this file says where: a command added to the README
without an entry here fails, and so does an entry naming a test that does not exist. The Python entry points the
README runs must at least start (`--help`). The README stays a user's page: under 20 KB, operations in docs/."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

# (pattern a README command starts with, where it is exercised: "tests/<file>::<test>" or what else)
COVERAGE = [
    (r"make demo", "make demo itself (examples/demo.py), run before every release of this README"),
    (r"make test", ".ci/run (CI)"),
    (r"make bench-real", "benchmarks/bench_chattasks.py, its results committed in benchmarks/results/chattasks/"),
    (r"python pipelines/workflow\.py --manifest demo-output", "tests/pipelines/test_workflow.py::test_skips_unchanged_stages_resumes_a_failed_training_and_adds_adapters_in_place"),
    (r"python pipelines/collect_adapters\.py", "tests/registry/test_collection.py::test_collect_from_s3_register_more_later_and_load_a_model"),
    (r"python pipelines/train_gates\.py --init-from", "tests/pipelines/test_init_from.py::test_new_modules_and_an_updated_adapter_start_from_the_earlier_checkpoint"),
    (r"python pipelines/train_gates\.py", "tests/pipelines/test_train_gates.py::test_two_workers_fit_the_gates_then_train_them_with_checkpoints_on_s3"),
    (r"make cluster-(up|down)", "tests/pipelines/test_cluster.py::test_make_cluster_up_makes_a_token_on_a_machine_without_one_and_its_job_api_asks_for_it"),
    (r"RAY_AUTH_MODE=token ray job submit .* python pipelines/train_gates\.py", "tests/pipelines/test_cluster.py::test_a_node_killed_mid_training_resumes_from_s3_checkpoints_to_the_same_gates"),
    (r"METEORA_API_KEY=sk-\.\.\. serve run configs/serve\.yaml", "tests/pipelines/test_deploy_configs.py::test_serve_run_and_serve_deploy_with_the_config_file_and_the_readme_clients"),
    (r"serve deploy configs/serve\.yaml", "tests/pipelines/test_deploy_configs.py::test_serve_run_and_serve_deploy_with_the_config_file_and_the_readme_clients"),
    (r"curl -s localhost:8000", "tests/pipelines/test_deploy_configs.py::test_serve_run_and_serve_deploy_with_the_config_file_and_the_readme_clients"),
    (r"ray up cluster\.yaml", "not runnable here (a cloud account): tests/pipelines/test_deploy_configs.py::test_cluster_yaml_passes_rays_schema_and_pins_this_ray"),
    (r"ray job submit --address http://HEAD:8265 .* python pipelines/workflow\.py", "not runnable here (a GPU cluster); the same entry point: tests/pipelines/test_workflow.py::test_skips_unchanged_stages_resumes_a_failed_training_and_adds_adapters_in_place"),
    (r"python pipelines/build_tinytasks\.py", "the same build() as make demo; cached builds: tests/suites/test_tinytasks.py::test_build_is_loadable_offline_and_cached"),
    (r"python pipelines/evaluate\.py", "tests/pipelines/test_evaluate.py::test_the_evaluate_command_writes_tables_and_plots"),
    (r"python pipelines/local_s3\.py", "tests/pipelines/test_local_cluster.py::test_the_s3_server_command_starts_one_and_stops_it"),
    (r"python pipelines/local_cluster\.py kill-node", "tests/pipelines/test_cluster.py::test_a_node_killed_mid_training_resumes_from_s3_checkpoints_to_the_same_gates"),
    (r"make chaos", "benchmarks/chaos_cluster.py, its results committed in benchmarks/results/cluster/"),
    (r"RAY_AUTH_MODE=token ray job submit .* python pipelines/workflow\.py", "make chaos (benchmarks/chaos_cluster.py submits it)"),
]


def readme_commands() -> list[str]:
    """Shell commands of the README's bash blocks (continuation lines joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = command.split("  #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_every_readme_command_is_exercised_somewhere():
    uncovered = [c for c in readme_commands() if not any(re.match(pattern, c) for pattern, _ in COVERAGE)]
    assert not uncovered, f"README commands with no entry in COVERAGE: {uncovered}"
    for _, where in COVERAGE:
        for file, test in re.findall(r"(tests/[\w/]+\.py)::(\w+)", where):
            assert re.search(rf"^def {test}\(", (ROOT / file).read_text(), flags=re.M), f"{file}::{test} does not exist"


@pytest.mark.parametrize("script", sorted({m for c in readme_commands() for m in re.findall(r"python (pipelines/\w+\.py)", c)}))
def test_the_readme_entry_points_start(script):
    assert subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, timeout=120).returncode == 0


def test_the_readme_stays_under_20_kb_and_links_the_operations_page():
    assert len((ROOT / "README.md").read_bytes()) < 20_000
    assert "(docs/operations.md)" in (ROOT / "README.md").read_text() and (ROOT / "docs" / "operations.md").is_file()
