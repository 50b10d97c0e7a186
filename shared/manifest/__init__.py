"""Manifests: what to process, one parquet row per image; ``from lare2.shared.manifest import X`` for any part.

- :mod:`.table`: the schema (the one place it is written), parquet IO, validation, selection.
- :mod:`.sources`: image bytes of a row (plain files, tar members), content ids, headers.
- :mod:`.builders`: the four layouts (genimage, folders, list, webdataset) -> :mod:`.built` results.
- :mod:`.report`: the rich report of a build.
- :mod:`.jpeg_header`: the JPEG quality (from the IJG tables) and chroma subsampling of a header.
- :mod:`.audit`: the bias audit (formats, sizes, JPEG quality; a metadata-only classifier).

The table names are imported here; the others on first use, so that the cache store, which
imports :mod:`.table`, does not load Pillow and the builders with it.
"""

from __future__ import annotations

import importlib

from lare2.shared.manifest import table as _table
from lare2.shared.manifest.table import *  # noqa: F403 (the names in table.__all__)

_LAZY = {
    "sources": ("IMAGE_EXTENSIONS", "SAMPLE_ID_HEX_CHARS", "TAR_EXTENSIONS", "TAR_MEMBER_SEPARATOR", "ImageHeader",
                "ImageRef", "content_id", "describe_bytes", "is_image_name", "no_content_id", "read_image_bytes",
                "split_tar_path"),
    "built": ("BuiltManifest", "DuplicateGroup", "holdout_score", "write_built"),
    "builders": ("BUILDERS", "FOLDER_LABELS", "GENIMAGE_LABELS", "GENIMAGE_SPLITS", "build_folders", "build_genimage",
                 "build_list", "build_manifest", "build_webdataset"),
    "report": ("MIN_SPLIT_IMAGES", "print_build_report", "split_warnings"),
    "jpeg_header": ("IJG_LUMINANCE", "estimate_jpeg_quality", "ijg_quantization_table", "jpeg_subsampling"),
    "audit": ("FEATURE_GROUPS", "SHORTCUT_AUC_BOUND", "AuditReport", "GroupStats", "ImageMeta", "ShortcutResult",
              "audit_manifest", "group_stats", "metadata_shortcut", "print_audit_report", "read_image_meta"),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


__all__ = sorted([*_table.__all__, *_MODULE_OF])
