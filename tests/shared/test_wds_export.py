"""Zarr cache -> WebDataset shards -> read back with webdataset: same arrays, dtypes and metadata."""

from __future__ import annotations

import json
import tarfile

import pytest
import webdataset as wds
from typer.testing import CliRunner

from lare2.cli import app
from lare2.shared.cache import FeatureCache
from lare2.shared.cache.export import export_webdataset
from tests.helpers.caches import CHUNK, ERROR_INDICES, PENDING_BLOCK, build_tiny_cache, ok_indices

SHARD_SIZE = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory.mktemp("tiny"), images=False)


def read_back(out) -> list[dict]:
    shards = sorted(str(p) for p in out.glob("*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False).decode())


def test_export_ok_samples_round_trip(tiny, tmp_path):
    summary = export_webdataset(tiny.path, tmp_path / "wds", shard_size=SHARD_SIZE)
    cache = FeatureCache.open(tiny.path)
    expected = ok_indices()
    samples = read_back(tmp_path / "wds")

    assert [s["__key__"] for s in samples] == [tiny.ids[i] for i in expected]
    stored = cache.read(expected)
    metadata = cache.metadata().to_pylist()
    for row, sample in enumerate(samples):
        for name in ("lare", "pooled", "fmap"):
            value = sample[f"{name}.npy"]
            assert value.dtype == stored[name].dtype
            assert value.tobytes() == stored[name][row].tobytes()
        index = expected[row]
        assert sample["json"] == metadata[index]

    sizes = json.loads((tmp_path / "wds" / "sizes.json").read_text())
    assert sizes == summary["sizes"]
    assert sum(sizes.values()) == len(expected) and max(sizes.values()) == SHARD_SIZE
    for shard, count in sizes.items():  # sizes.json tells the truth about each tar
        with tarfile.open(tmp_path / "wds" / shard) as tar:
            assert len({m.name.split(".")[0] for m in tar.getmembers()}) == count
    assert json.loads((tmp_path / "wds" / "cache_attrs.json").read_text()) == cache.attrs
    assert summary["skipped"]["error"] == len([i for i in ERROR_INDICES if i // CHUNK != PENDING_BLOCK])


def test_export_all_adds_failed_samples_as_json_only(tiny, tmp_path):
    result = CliRunner().invoke(app, ["cache", "export", str(tiny.path), "--format", "webdataset", "--out",
                                      str(tmp_path / "wds"), "--shard-size", "4", "--status", "all", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    samples = {s["__key__"]: s for s in read_back(tmp_path / "wds")}
    failed = [i for i in ERROR_INDICES if i // CHUNK != PENDING_BLOCK]
    assert set(samples) == {tiny.ids[i] for i in ok_indices() + failed}  # pending samples never exported
    for i in failed:
        sample = samples[tiny.ids[i]]
        assert not any(k.endswith(".npy") for k in sample)
        assert sample["json"]["status"] == "error" and sample["json"]["error"].startswith("ImageError")
    assert summary["exported"] == {"ok": len(ok_indices()), "error": len(failed)}
    assert summary["skipped"]["pending"] == CHUNK


def test_export_refuses_bad_usage(tiny, tmp_path):
    runner = CliRunner()
    base = ["cache", "export", str(tiny.path), "--out", str(tmp_path / "wds")]

    def refused(*args: str) -> str:
        """The one `error:` line of a refused export (exit 2)."""
        result = runner.invoke(app, list(args))
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
        return result.stderr.rstrip("\n")

    assert refused(*base, "--format", "tfrecord") == "error: --format 'tfrecord': choose from ['webdataset']"
    assert refused(*base, "--status", "pending") == "error: status='pending': choose from ['ok', 'all']"
    assert refused(*base, "--shard-size", "0") == "error: shard_size must be >= 1, got 0"
    assert not (tmp_path / "wds").exists()
    assert runner.invoke(app, base).exit_code == 0
    written = sorted(p.name for p in (tmp_path / "wds").iterdir())
    again = runner.invoke(app, base)  # never mixes two exports in one folder
    assert again.exit_code == 2 and "holds an export already" in again.stderr
    assert again.stderr.splitlines() == [
        f"error: {tmp_path / 'wds'}: holds an export already (tar shards or sizes.json); choose an empty folder"]
    assert sorted(p.name for p in (tmp_path / "wds").iterdir()) == written
    assert refused("cache", "export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")) == (
        f"error: {tmp_path / 'missing'}: no such cache directory")
