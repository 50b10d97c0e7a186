"""The demo's detectors under test-time damage, and the bias audit of its manifest.

After ``lare2 minigenimage demo --out OUT``: the test split is extracted again once per perturbation
(``OUT/cache/test-<name>``, same models, seeds and settings as ``OUT/cache/test``, only ``perturb``
differs), and every trained detector is evaluated with ``--robustness`` on the clean and perturbed
caches (``OUT/<model>/robustness/``). ``OUT/audit.json`` is ``lare2 manifest audit`` of the benchmark.

MiniGenImage's reals and fakes are all 64 px PNGs, so format and size carry no label; the audit
does flag PNG bytes per pixel (how compressible, i.e. how smooth, the pixels are: content, not the
file), which the README reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from lare2.shared.logs import console

PERTURBATIONS = ("jpeg:90", "jpeg:75", "jpeg:50", "blur:1", "blur:2", "resize:0.5")
"""The README's robustness table: JPEG 90/75/50, blur sigma 1/2, resize to half and back."""


def cache_name(perturbation: str) -> str:
    """``jpeg:75+resize:0.5`` -> ``test-jpeg75-resize0.5`` (a folder name)."""
    return "test-" + perturbation.replace(":", "").replace("+", "-")


def perturbed_test_caches(out: Path, perturbations: Sequence[str]) -> list[str]:
    """Extract ``OUT/cache/test`` again under each perturbation (resumes what exists); the cache paths, clean first."""
    from lare2.extract.run import run_extraction
    from lare2.shared.cache import FeatureCache
    from lare2.shared.config import ExtractConfig

    clean = out / "cache" / "test"
    recorded = FeatureCache.open(clean).attrs["extract_config"]
    paths = [str(clean)]
    for perturbation in perturbations:
        config = ExtractConfig.from_dict(recorded, perturb=perturbation,
                                         out=str(out / "cache" / cache_name(perturbation)))
        console.print(run_extraction(config).line())
        paths.append(config.out)
    return paths


def run_robustness(out: str | Path, perturbations: Sequence[str] = PERTURBATIONS,
                   models: Sequence[str] | None = None) -> dict:
    """Perturbed test caches, each model's robustness report and the manifest audit; {model: robustness}."""
    from lare2.shared.manifest.audit import audit_manifest, print_audit_report
    from lare2.train.report import evaluate

    out = Path(out)
    for needed in (out / "cache" / "test" / "zarr.json", out / "data" / "manifest.parquet"):
        if not needed.exists():
            raise FileNotFoundError(f"{needed.parent}: no test cache or manifest of a demo; "
                                    f"run `lare2 minigenimage demo --out {out}` first")
    models = list(models) if models else [p.name for p in sorted(out.iterdir()) if (p / "config.json").exists()]
    if not models:
        raise FileNotFoundError(f"{out}: no trained detectors (folders with config.json); run the demo first")
    console.rule("[bold]Bias audit of the benchmark's manifest")
    audit = audit_manifest(out / "data" / "manifest.parquet")
    print_audit_report(audit)
    (out / "audit.json").write_text(json.dumps(audit.to_json(), indent=2, default=str))

    console.rule(f"[bold]Test split under {len(perturbations)} perturbations: {', '.join(perturbations)}")
    tests = perturbed_test_caches(out, perturbations)
    results = {}
    for model in models:
        console.rule(f"[bold]{model}: generator x perturbation")
        report = evaluate(out / model, tests, report_dir=out / model / "robustness", robustness=True)
        results[model] = report["robustness"]
    (out / "robustness.json").write_text(json.dumps(results, indent=2, default=str))
    console.print(f"robustness tables in {out}/<model>/robustness, audit in {out / 'audit.json'}")
    return results
