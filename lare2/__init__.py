"""lare2: detect diffusion-generated images with LaRE^2 (Luo et al., CVPR 2024).

Sub-packages: ``lare2.shared`` (cache schema, configs, manifests), ``lare2.extract``
(stage 1: LaRE maps and backbone features), ``lare2.train`` (stage 2: EGRE, training,
evaluation), ``lare2.minigenimage`` (an offline CPU-sized benchmark).
"""

__version__ = "0.1.0"
