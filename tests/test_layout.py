"""The library's shape: `import meteora` stays light, and code outside meteora/ uses only its public API."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
OPTIONAL = ("peft", "boto3", "yaml", "matplotlib", "tqdm", "ray")


def loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {OPTIONAL!r} if m in sys.modules))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_import_meteora_loads_none_of_the_optional_packages_itself():
    own = loaded_after("import torch, safetensors.torch")  # torch itself imports tqdm (torch.hub)
    assert loaded_after("import meteora") == own
    assert not {"peft", "boto3", "yaml", "matplotlib", "ray"} & loaded_after("import meteora")


def _imports_of_meteora(file: Path):
    """(module, names) for every import of meteora in a file: names None for `import meteora.x`."""
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "meteora":
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names if alias.name.split(".")[0] == "meteora")


def test_code_outside_the_library_uses_only_its_public_api():
    outside = [f for f in ROOT.rglob("*.py") if not f.relative_to(ROOT).parts[0] in ("meteora", ".venv", "build")]
    problems = []
    for file in outside:
        for module, names in _imports_of_meteora(file):
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
                subpackage = hasattr(getattr(imported, name, None), "__path__")  # e.g. meteora.model's backends/
                if name not in public and not subpackage:
                    problems.append(f"{where} imports {name}, which is not in its __all__")
    assert not problems, "\n".join(problems)
