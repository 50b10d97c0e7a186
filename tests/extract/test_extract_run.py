"""Stage 1 end to end with tiny models: round trip, bad images, batch independence, resume, guard."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lare2.extract.run import recompute_samples, run_extraction
from lare2.shared.cache import CacheError, FeatureCache
from lare2.shared.config import debug
from tests.helpers.bad_images import GALLERY


def _config(manifest: Path, out: Path, **overrides):
    return debug(**{"manifest": str(manifest), "out": str(out), "device": "cpu", "chunk_samples": 4, "batch_size": 3,
                    **overrides})


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def image_manifest(tmp_path_factory):
    from tests.conftest import build_manifest, write_image_tree

    folder = tmp_path_factory.mktemp("extract")
    return build_manifest(write_image_tree(folder / "images"), folder / "manifest.parquet")


@pytest.fixture(scope="module")
def extracted(image_manifest):
    cfg = _config(image_manifest, image_manifest.parent / "cache")
    return cfg, run_extraction(cfg)


def test_cache_holds_every_sample_config_and_bad_images_as_errors(extracted):
    cfg, summary = extracted
    cache = FeatureCache.open(cfg.out)
    meta = cache.metadata().to_pylist()
    by_name = {Path(row["path"]).name: row for row in meta}
    assert len(cache) == len(meta) == 10 + len(GALLERY) == summary.samples
    assert cache.pending_blocks() == []

    ok = cache.ok_mask()
    arrays = cache.read(slice(None))
    for name, (_, expected) in GALLERY.items():
        row = by_name[name]
        index = meta.index(row)
        if expected == "ok":
            assert row["status"] == "ok", (name, row["error"])
        else:
            assert row["status"] == "error" and expected in row["error"], (name, row["error"])
            # nothing is invented for a failed image
            assert all(np.isnan(arrays[a][index]).all() for a in ("lare", "pooled", "fmap"))
    assert all(np.isfinite(arrays[a][ok]).all() for a in ("lare", "pooled", "fmap"))
    assert summary.failed == int((~ok).sum()) == sum(e != "ok" for _, e in GALLERY.values())
    assert summary.counts == {"ok": int(ok.sum()), "error": int((~ok).sum()), "pending": 0}

    # shapes and dtypes follow the models: tiny SD at 256 px -> [4, 32, 32] float32 maps
    assert arrays["lare"].shape[1:] == (4, 32, 32) and arrays["lare"].dtype == np.float32
    assert arrays["pooled"].dtype == np.float16 and arrays["fmap"].ndim == 4

    attrs = cache.attrs
    assert attrs["extract_config"] == json.loads(json.dumps(cfg.to_dict()))
    assert attrs["identity"]["timestep"] == 200 and attrs["identity"]["ensemble"] == 4
    assert set(attrs["fingerprints"]) == {"sd", "backbone"}
    assert attrs["provenance"]["versions"]["torch"]
    # prompts come from the GenImage file-name rule; seeds are stored per sample
    assert {row["class_name"] for row in meta if row["path"].endswith("_img_000.png")} == {"goldfish"}
    assert len({row["seed"] for row in meta}) == len(meta)


def test_cache_round_trip_equals_recomputation(extracted):
    cfg, _ = extracted
    cache = FeatureCache.open(cfg.out)
    indices = [0, 5, len(cache) - 1]
    recomputed = recompute_samples(cfg.out, indices)
    stored = cache.read(indices)
    for name in ("lare", "pooled", "fmap"):
        np.testing.assert_array_equal(recomputed[name], stored[name])


def test_batch_size_does_not_change_any_map(image_manifest, tmp_path, extracted):
    """Same draws whatever the batching; only float rounding of batched kernels may differ."""
    cfg, _ = extracted
    other = _config(image_manifest, tmp_path / "cache_b1", batch_size=1, limit=8)  # two blocks suffice
    run_extraction(other)
    a, b = FeatureCache.open(cfg.out).read(slice(0, 8)), FeatureCache.open(other.out).read(slice(None))
    np.testing.assert_allclose(a["lare"], b["lare"], rtol=1e-5, atol=1e-6)
    for name in ("pooled", "fmap"):  # float16 storage: at most one unit in the last place apart
        np.testing.assert_allclose(a[name].astype(np.float32), b[name].astype(np.float32), rtol=2e-3, atol=1e-4)
    assert np.array_equal(np.isnan(a["lare"]), np.isnan(b["lare"]))


def test_rerun_resumes_and_changed_config_is_refused(image_manifest, extracted):
    cfg, first = extracted
    before = _tree_digest(Path(cfg.out))
    again = run_extraction(cfg)
    assert again.computed == 0 and again.skipped_blocks == FeatureCache.open(cfg.out).num_blocks

    changed = _config(image_manifest, Path(cfg.out), timestep=100, prompt_mode="empty")
    with pytest.raises(CacheError, match="timestep.*200.*100") as err:
        run_extraction(changed)
    assert "prompt_mode" in str(err.value)
    # each changed setting, with both values, and nothing else (the models and the selection are the same)
    assert str(err.value).startswith(f"{cfg.out}: refusing to extract into a cache made with another configuration "
                                     "(prompt_mode: cache has 'class', this run 'empty'; "
                                     "timestep: cache has 200, this run 100). ")
    assert _tree_digest(Path(cfg.out)) == before  # untouched (finalise rewrote identical counts)


def test_cli_extract_prints_a_summary(image_manifest, tmp_path):
    from lare2.cli import app

    out = tmp_path / "cli_cache"
    result = CliRunner().invoke(app, ["extract", "--manifest", str(image_manifest), "--out", str(out),
                                      "--preset", "debug", "--device", "cpu", "--limit", "5", "--set", "ensemble=2",
                                      "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["samples"] == 5 and summary["computed"] == 5
    assert FeatureCache.open(out).attrs["extract_config"]["ensemble"] == 2

    bad = CliRunner().invoke(app, ["extract", "--manifest", str(tmp_path / "missing.parquet"), "--out", str(out),
                                   "--preset", "debug"])
    assert bad.exit_code == 2 and "missing.parquet" in bad.output
    assert f"error: {tmp_path / 'missing.parquet'}: no such manifest file" in bad.output.splitlines()


def test_scoring_never_imports_the_extraction_job():
    """Scoring new images needs stage 1's features (``lare2.extract.features``), not its Accelerate job."""
    from tests.top.test_import_boundaries import imported_names

    repo = Path(__file__).resolve().parents[2]
    for module in ("lare2/detect.py", "lare2/heatmaps.py"):
        names = imported_names(repo / module)
        assert "lare2.extract.run" not in names, module
    assert "lare2.extract.features" in imported_names(repo / "lare2/detect.py")
