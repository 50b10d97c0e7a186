"""lare2: detect diffusion-generated images with LaRE^2 (Luo et al., CVPR 2024).

Sub-packages: ``lare2.shared`` (cache schema, configs, manifests), ``lare2.extract``
(stage 1: LaRE maps and backbone features), ``lare2.train`` (stage 2: EGRE, training,
evaluation), ``lare2.minigenimage`` (an offline CPU-sized benchmark).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lare2")  # the one place it is written: pyproject.toml
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
