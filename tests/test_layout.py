"""The library's shape: `import meteora_moe` (the folder meteora/) stays light, code outside it uses only its public
API, no module imports itself back through others, and the distribution installs no top-level name another project
owns."""
import ast
import importlib
import subprocess
import tomllib
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
OPTIONAL = ("peft", "boto3", "yaml", "matplotlib", "tqdm", "ray")


def loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {OPTIONAL!r} if m in sys.modules))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_import_meteora_loads_none_of_the_optional_packages_itself():
    own = loaded_after("import torch, safetensors.torch")  # torch itself imports tqdm (torch.hub)
    assert loaded_after("import meteora_moe") == own
    assert not {"peft", "boto3", "yaml", "matplotlib", "ray"} & loaded_after("import meteora_moe")


def _imports_of(top_level: str, file: Path):
    """(module, names) for every import of `top_level` in a file: names None for `import top_level.x`."""
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == top_level:
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names if alias.name.split(".")[0] == top_level)


def _python_files() -> list[Path]:
    return [f for f in ROOT.rglob("*.py") if f.relative_to(ROOT).parts[0] not in (".venv", "build")]


def test_code_outside_the_library_uses_only_its_public_api():
    outside = [f for f in _python_files() if f.relative_to(ROOT).parts[0] != "meteora"]
    problems = []
    for file in outside:
        for module, names in _imports_of("meteora_moe", file):
            where = f"{file.relative_to(ROOT)}: {module}"
            if module.count(".") > 1:
                problems.append(f"{where} is a private module (import from {'.'.join(module.split('.')[:2])})")
                continue
            imported = importlib.import_module(module)
            public = getattr(imported, "__all__", None)
            if public is None:
                problems.append(f"{where} has no __all__")
                continue
            for name in names or []:
                subpackage = hasattr(getattr(imported, name, None), "__path__")  # e.g. meteora_moe.model's backends/
                if name not in public and not subpackage:
                    problems.append(f"{where} imports {name}, which is not in its __all__")
    assert not problems, "\n".join(problems)


PACKAGES = {"meteora": "meteora_moe", "pipelines": "pipelines", "serve_app": "serve_app", "suites": "suites",
            "kernels": "meteora_moe.kernels"}  # folder: its name as installed


def _module_files() -> dict[str, Path]:
    """Every module of the project by its dotted name as installed (a package by its __init__.py)."""
    files = {}
    for folder, package in PACKAGES.items():
        for file in (ROOT / folder).rglob("*.py"):
            parts = file.relative_to(ROOT / folder).with_suffix("").parts
            files[".".join((package, *parts[:-1]) if parts[-1] == "__init__" else (package, *parts))] = file
    return files


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports anywhere in its file (top level, functions, TYPE_CHECKING)."""
    files = _module_files()

    def known(name: str) -> str | None:  # the module a dotted name lives in (`meteora_moe.model.X` -> meteora_moe.model)
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, file in files.items():
        package = module if file.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                edges.update(known(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                source = ".".join(p for p in (base, node.module) if p)
                edges.update(known(f"{source}.{alias.name}") for alias in node.names)
        graph[module] = edges - {None, module}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    order, low, stack, circles = {}, {}, [], []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        for other in graph[module]:
            if other not in order:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], order[other])
        if low[module] == order[module]:
            group = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(group) > 1:
                circles.append(sorted(group))

    for module in graph:
        if module not in order:
            visit(module)
    return circles


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert graph["suites.chattasks.build"] >= {"suites.chattasks.config", "suites.chattasks.jobs"}  # edges are seen
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # circles are found
    assert import_circles(graph) == []


INSTALLED_NOT = {"pipelines"}  # run from the checkout (PyPI has a project `pipelines`)


def test_the_distribution_installs_every_package_under_its_name_and_nothing_under_a_folder_name_of_another():
    """pyproject lists every package folder under its installed name but pipelines/: meteora/ goes in as
    meteora_moe, kernels/ as meteora_moe.kernels. A top-level `meteora` or `kernels` would shadow the PyPI
    distribution of that name (a weather-station client; the package transformers imports when present)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {name for name, file in _module_files().items()
                if file.name == "__init__.py" and name.split(".")[0] not in INSTALLED_NOT}
    assert packages == set(setuptools["packages"])
    assert setuptools["package-dir"] == {"meteora_moe": "meteora", "meteora_moe.kernels": "kernels"}
    assert "py-modules" not in setuptools
    assert not {"meteora", "kernels"} & {name.split(".")[0] for name in setuptools["packages"]}
    installed = subprocess.run([sys.executable, "-c", "import meteora_moe, meteora_moe.kernels as k; print(meteora_moe.__file__, "
                                "k.__file__); import importlib.util as u; print(*map(u.find_spec, ('meteora', 'kernels', 'pipelines')))"],
                               capture_output=True, text=True, check=True, cwd="/").stdout.split()
    assert installed == [str(ROOT / "meteora" / "__init__.py"), str(ROOT / "kernels" / "__init__.py"), "None", "None", "None"]


def test_no_code_imports_a_folder_by_its_name_when_it_is_installed_under_another():
    """pytest and the Ray workers have the checkout on the path, where `import meteora` or `import kernels` would
    load the folder a second time under a name that an installed copy does not have."""
    problems = [f"{file.relative_to(ROOT)}: {module}" for file in _python_files()
                for folder in ("meteora", "kernels") for module, _ in _imports_of(folder, file)]
    assert not problems, "\n".join(problems)


def test_no_installed_top_level_name_is_a_project_on_the_package_index():
    """Every top-level name the distribution installs, looked up on the index pip installs from (PyPI): a project of
    that name there installs that package too (as `meteora`, `kernels` and `pipelines` do), and one would shadow the
    other."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    top_level = sorted({name.split(".")[0] for name in setuptools["packages"]})
    on_the_index = [name for name in top_level if subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True).returncode == 0]
    assert subprocess.run([sys.executable, "-m", "pip", "index", "versions", "kernels"],
                          capture_output=True).returncode == 0  # the lookup finds a project that exists
    assert on_the_index == []
