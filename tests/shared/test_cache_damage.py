"""Absent chunks are never read as data: for each array and metadata column, one deleted chunk of a finished
cache is named by `verify` (with and without --manifest), refused by train, eval, export and pack, and
`cache repair` + rerunning the same extraction gives back the undamaged cache bit for bit. Also: packed
caches (an inner chunk gone from a shard), NaN in an ok sample, and older caches written without fill chunks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from lare2.cli import app
from lare2.shared.cache import ARRAY_NAMES, META_COLUMNS, CacheError, CacheLayout, FeatureCache
from tests.helpers.caches import write_synthetic_cache

runner = CliRunner()
THREADS = __import__("torch").get_num_threads()
NAMES = [*ARRAY_NAMES, *(f"meta/{c}" for c in META_COLUMNS)]


def invoke(*args) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def extract_args(manifest: Path, out: Path) -> list:
    """The extraction command; first undoes what `lare2 train --preset debug` did to this process (1 thread,
    denormals flushed), since bit-for-bit equality holds for the same thread count and float modes."""
    import torch

    torch.set_num_threads(THREADS)
    torch.set_flush_denormal(False)
    return ["extract", "--manifest", manifest, "--preset", "debug", "--out", out, "--device", "cpu",
            "--batch-size", "3", "--image-size", "64", "--set", "chunk_samples=4"]


def chunk_path(cache: Path, name: str, block: int) -> Path:
    arr = zarr.open_group(cache, mode="r")[name]
    return cache / name / arr.metadata.encode_chunk_key((block,) + (0,) * (arr.ndim - 1))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished cache extracted with tiny models, a val cache of the same extraction, a run trained on them."""
    from tests.conftest import build_manifest, write_image_tree

    tmp = tmp_path_factory.mktemp("damage")
    manifest = build_manifest(write_image_tree(tmp / "images"), tmp / "manifest.parquet")
    code, _, err = invoke(*extract_args(manifest, tmp / "pristine"))
    assert code == 0, err
    cache = FeatureCache.open(tmp / "pristine")
    status, labels = cache.column("status"), cache.column("label")
    # the block to damage holds ok samples of both classes: a lost label chunk would turn its fakes real
    block = next(b for b in range(cache.num_blocks)
                 if (status[cache.block_slice(b)] == "ok").any() and set(labels[cache.block_slice(b)]) == {0, 1})
    write_synthetic_cache(tmp / "val", num_samples=32, signal="lare", seed=5, layout=cache.layout,
                          identity=cache.attrs["identity"])
    code, _, err = invoke("train", "--preset", "debug", "--train", tmp / "pristine", "--val", tmp / "val",
                          "--out", tmp / "run", "--epochs", "1", "--set", "progress=false", "--set", "head_dim=8")
    assert code == 0, err
    return tmp, manifest, block


@pytest.mark.parametrize("name", NAMES)
def test_a_deleted_chunk_is_named_refused_and_repaired_bit_for_bit(world, tmp_path, name):
    tmp, manifest, block = world
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp / "pristine", damaged)
    chunk = chunk_path(damaged, name, block)
    chunk.unlink()
    key = f"{name}/{chunk.relative_to(damaged / name)}"

    for extra in ([], ["--manifest", manifest]):
        code, out, _ = invoke("cache", "verify", damaged, "--json", *extra)
        report = json.loads(out)
        missing = [f for f in report["errors"] if f["check"] == "chunks" and "missing" in f["message"]]
        assert code == 1 and missing and missing[0]["items"] == [key], report["errors"]
        assert name in report["damaged_blocks"][str(block)]

    refusals = {
        "train": invoke("train", "--preset", "debug", "--train", damaged, "--val", tmp / "val",
                        "--out", tmp_path / "run", "--epochs", "1", "--set", "progress=false", "--set", "head_dim=8"),
        "eval": invoke("eval", tmp / "run", "--test", damaged, "--report", tmp_path / "report", "--no-plots"),
        "export": invoke("cache", "export", damaged, "--out", tmp_path / "wds"),
        "pack": invoke("cache", "pack", damaged, tmp_path / "packed"),
    }
    for command, (code, _, err) in refusals.items():
        line = one_error_line(err)
        assert code == 2 and str(damaged) in line and f"block {block}" in line and name in line, (command, line)
        assert "lare2 cache repair" in line, (command, line)

    code, out, _ = invoke("cache", "repair", damaged, "--dry-run", "--json")
    assert code == 1 and json.loads(out)["reset"] == [] and str(block) in json.loads(out)["damaged"]
    code, out, _ = invoke("cache", "repair", damaged)
    assert code == 0 and f"reset block {block} (samples {4 * block}-{4 * block + 3}): " in out and name in out
    assert "1 blocks reset" in out
    repaired = FeatureCache.open(damaged)
    assert repaired.pending_blocks() == [block]
    code, _, _ = invoke("cache", "verify", damaged)
    assert code == 1  # pending until the extraction is rerun

    code, _, err = invoke(*extract_args(manifest, damaged))
    assert code == 0, err
    before, after = zarr.open_group(tmp / "pristine", mode="r"), zarr.open_group(damaged, mode="r")
    for array in [*NAMES, "block_done"]:
        a, b = before[array][:], after[array][:]
        assert a.dtype == b.dtype and a.shape == b.shape, array
        same = a.tobytes() == b.tobytes() if a.dtype.kind == "f" else (a == b).all()
        assert same, f"{array} differs after repair + rerun"
    assert FeatureCache.open(damaged).attrs["counts"] == FeatureCache.open(tmp / "pristine").attrs["counts"]
    code, _, _ = invoke("cache", "verify", damaged)
    code_diff, out, _ = invoke("cache", "diff", tmp / "pristine", damaged, "--json")
    assert code == 0 and code_diff == 0 and json.loads(out)["agree"]


def test_nan_in_an_ok_sample_is_refused_and_repaired(world, tmp_path):
    tmp, manifest, block = world
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp / "pristine", damaged)
    cache = FeatureCache.open(damaged)
    index = int(np.flatnonzero(cache.ok_mask())[0])
    zarr.open_group(damaged, mode="r+")["fmap"][index, 0, 0, 0] = np.nan
    code, _, err = invoke("cache", "export", damaged, "--out", tmp_path / "wds")
    assert code == 2 and "fmap holds NaN/Inf for 1 samples whose status is ok" in one_error_line(err)
    code, _, err = invoke("eval", tmp / "run", "--test", damaged, "--report", tmp_path / "report", "--no-plots")
    assert code == 2 and f"block {index // 4}: fmap holds NaN/Inf" in one_error_line(err)
    code, out, _ = invoke("cache", "repair", damaged, "--json")
    assert code == 0 and json.loads(out)["damaged"] == {str(index // 4): ["values"]}
    assert invoke(*extract_args(manifest, damaged))[0] == 0
    code, out, _ = invoke("cache", "diff", tmp / "pristine", damaged, "--json")
    assert code == 0 and json.loads(out)["agree"]


def _empty_inner_chunk(shard: Path, inner: int, per_shard: int) -> None:
    """Mark inner chunk ``inner`` of a shard file absent in its index (offset = nbytes = 2^64 - 1)."""
    data = bytearray(shard.read_bytes())
    start = len(data) - (per_shard * 16 + 4) + inner * 16
    data[start:start + 16] = b"\xff" * 16
    shard.write_bytes(bytes(data))


def test_a_packed_cache_missing_an_inner_chunk_is_refused(world, tmp_path):
    tmp, _, block = world
    packed = tmp_path / "packed"
    assert invoke("cache", "pack", tmp / "pristine", packed, "--pack-blocks", "2")[0] == 0
    assert invoke("cache", "verify", packed)[0] == 0
    _empty_inner_chunk(chunk_path(packed, "meta/label", block // 2), block % 2, 2)
    cache = FeatureCache.open(packed)
    with pytest.raises(CacheError, match=rf"block {block} .*meta/label/c/{block // 2} \(inner chunk {block % 2}\)"):
        cache.column("label")
    code, out, _ = invoke("cache", "verify", packed, "--json")
    assert code == 1 and f"meta/label/c/{block // 2} (inner chunk {block % 2})" in json.loads(out)["errors"][0]["items"]
    code, _, err = invoke("cache", "repair", packed)
    assert code == 2 and "a packed cache is read-only" in one_error_line(err)


def test_older_caches_without_fill_chunks_are_checked_for_what_they_must_hold(tmp_path):
    """Caches written before every chunk was stored: ids, statuses and ok blocks' arrays must be there."""
    layout = CacheLayout(pooled_dim=8, fmap_shape=(8, 4, 4), lare_shape=(4, 8, 8), chunk_samples=4)
    cache = write_synthetic_cache(tmp_path / "old", num_samples=12, signal="lare", seed=1, layout=layout)
    del zarr.open_group(cache.path, mode="r+").attrs["every_chunk_stored"]
    chunk_path(cache.path, "meta/error", 1).unlink()  # all "": zarr of old never wrote it
    assert FeatureCache.open(cache.path).column("error").tolist() == [""] * 12
    assert invoke("cache", "verify", cache.path)[0] == 0
    chunk_path(cache.path, "pooled", 2).unlink()  # block 2 holds ok samples: its arrays must be there
    with pytest.raises(CacheError, match="block 2 .*pooled"):
        FeatureCache.open(cache.path).read(slice(8, 12))
