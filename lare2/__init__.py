"""lare2: detect diffusion-generated images with LaRE^2 (Luo et al., CVPR 2024).

Sub-packages: ``lare2.shared`` (cache schema, configs, manifests), ``lare2.extract``
(stage 1: LaRE maps and backbone features), ``lare2.train`` (stage 2: EGRE, training,
evaluation), ``lare2.minigenimage`` (an offline CPU-sized benchmark).

``lare2.Detector`` and ``lare2.Result`` (``lare2.detect``) score new images; they are imported on
first access, so ``import lare2`` stays light (no torch).
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("lare2")  # the one place it is written: pyproject.toml
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Detector", "Result", "__version__"]
_LAZY = {"Detector": "lare2.detect", "Result": "lare2.detect"}

if TYPE_CHECKING:
    from lare2.detect import Detector, Result


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lare2' has no attribute {name!r}")
