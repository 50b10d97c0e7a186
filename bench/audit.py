"""The manifest audit's cost: ``lare2 manifest audit`` end to end on a manifest, and its metadata-only
classifier (``metadata_shortcut``) on synthetic GenImage-like header rows.

The synthetic rows copy GenImage's shape (Grommelt et al., arXiv 2403.17608): reals are ImageNet JPEGs
of many sizes (quality 75-96, mostly 4:2:0), fakes PNGs of a few fixed sizes, with a tenth of each class
drawn like the other so that the classifier has work to do. Header reading is not timed there (it is
I/O: ``reading headers`` in the end-to-end figure); the classifier's rows are capped at
``CLASSIFIER_MAX_ROWS`` whatever the manifest's size, so its time at that cap is its time on GenImage's
2.7 M headers.

    .venv/bin/python bench/audit.py --rows 10000 --manifest data/minigenimage/manifest.parquet

writes every figure, the machine's load and the command to ``--out`` (bench/results/audit.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root makes ``bench.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

REAL_SIZES = [(500, 375), (500, 333), (375, 500), (640, 480), (500, 500), (800, 600), (333, 500), (1024, 768)]
FAKE_SIZES = [(512, 512), (256, 256), (1024, 1024)]
MIXED_SHARE = 0.1
"""Share of each class whose file looks like the other class's (so the AUC is not trivially 1)."""


def synthetic_headers(rows: int, seed: int = 0) -> list:
    """``rows`` ``ImageMeta`` records, half real, half fake, GenImage-like (see the module doc)."""
    from lare2.shared.manifest.audit import ImageMeta

    rng = np.random.default_rng(seed)
    metas = []
    for i in range(rows):
        label = i % 2
        looks_real = (label == 0) != (rng.random() < MIXED_SHARE)
        if looks_real:
            width, height = REAL_SIZES[rng.integers(len(REAL_SIZES))]
            quality = int(rng.integers(75, 97))
            subsampling = "4:2:0" if rng.random() < 0.9 else "4:4:4"
            extra = {"format": "JPEG", "jpeg_quality": quality, "subsampling": subsampling,
                     "file_bytes": int(width * height * rng.uniform(0.15, 0.6))}
        else:
            width, height = FAKE_SIZES[rng.integers(len(FAKE_SIZES))]
            extra = {"format": "PNG", "file_bytes": int(width * height * rng.uniform(1.0, 2.2))}
        metas.append(ImageMeta(path=f"{label}/{i:07d}.img", label=label, generator="synthetic", split="train",
                               width=int(width), height=int(height), **extra))
    return metas


def time_classifier(rows: int, seed: int = 0) -> dict:
    """Seconds of ``metadata_shortcut`` on ``rows`` synthetic headers, and what it found."""
    from lare2.shared.manifest.audit import metadata_shortcut

    metas = synthetic_headers(rows, seed)
    started = time.perf_counter()
    result = metadata_shortcut(metas, seed=seed)
    seconds = time.perf_counter() - started
    return {"rows": rows, "classifier_rows": result.num_images, "seconds": round(seconds, 2), "auc": result.auc,
            "feature_aucs": {f.feature: round(f.auc, 4) for f in result.feature_aucs}, "classifier": result.classifier}


def time_audit(manifest: Path, seed: int = 0) -> dict:
    """Seconds of ``audit_manifest`` (header reading + classifier) on a manifest."""
    from lare2.shared.manifest.audit import audit_manifest

    started = time.perf_counter()
    report = audit_manifest(manifest, seed=seed, progress=False)
    seconds = time.perf_counter() - started
    return {"manifest": str(manifest), "images": report.num_images, "seconds": round(seconds, 2),
            "auc": report.classifier.auc if report.classifier else None}


def import_seconds() -> float:
    """Seconds to import what the classifier needs; paid once per command, kept out of the other figures."""
    started = time.perf_counter()
    import sklearn.ensemble  # noqa: F401
    import sklearn.feature_extraction  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import sklearn.model_selection  # noqa: F401
    import threadpoolctl  # noqa: F401

    return round(time.perf_counter() - started, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[10_000], help="Synthetic header counts to time.")
    parser.add_argument("--manifest", type=Path, help="A manifest to audit end to end (e.g. MiniGenImage's).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "audit.json")
    args = parser.parse_args(argv)
    figures: dict = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
                     "cpus": os.cpu_count(), "load_average": list(os.getloadavg()),
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "import_seconds": import_seconds(),
                     "classifier": [time_classifier(rows, args.seed) for rows in args.rows]}
    if args.manifest is not None:
        figures["audit"] = time_audit(args.manifest, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
