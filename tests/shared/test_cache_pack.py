"""`lare2 cache pack`: a finished cache copied into Zarr shard files of several blocks; every value, column
and attribute kept, far fewer files, verify and training read it as before, damage still caught."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lare2.cli import app
from lare2.shared.cache import ARRAY_NAMES, META_COLUMNS, CacheError, CacheExistsError, FeatureCache, pack_cache
from lare2.train.data import CacheSplit
from tests.helpers.caches import CHUNK, NUM_SAMPLES, PENDING_BLOCK, build_tiny_cache

runner = CliRunner()
PACK_BLOCKS = 4  # 6 blocks of 4 samples -> 2 packed files (Zarr shards) per array, the second one partial


def cache_cli(*args) -> tuple[int, str]:
    result = runner.invoke(app, ["cache", *map(str, args)])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """(source, packed) paths: a complete tiny cache and its packed copy made through the CLI."""
    tmp = tmp_path_factory.mktemp("pack")
    source = build_tiny_cache(tmp, complete=True).path
    code, out = cache_cli("pack", source, tmp / "packed", "--pack-blocks", PACK_BLOCKS, "--json")
    assert code == 0, out
    summary = json.loads(out)
    assert summary["samples"] == NUM_SAMPLES and summary["pack_blocks"] == PACK_BLOCKS
    return source, tmp / "packed", summary


def test_pack_keeps_every_value_column_and_attribute_in_fewer_files(packed):
    source, out, summary = packed
    assert summary["files_after"] < summary["files_before"] / 2, summary
    src, dst = FeatureCache.open(source), FeatureCache.open(out)
    assert dst.pack_blocks == PACK_BLOCKS and src.pack_blocks == 1
    assert dst.group["fmap"].shards[0] == PACK_BLOCKS * CHUNK and dst.group["fmap"].chunks[0] == CHUNK
    for name in ARRAY_NAMES:
        np.testing.assert_array_equal(dst.read(slice(None), [name])[name], src.read(slice(None), [name])[name])
    for column in META_COLUMNS:
        assert list(dst.column(column)) == list(src.column(column)), column
    np.testing.assert_array_equal(dst.done_blocks(), src.done_blocks())
    assert {k: v for k, v in dst.attrs.items() if k != "packed"} == src.attrs
    assert dst.attrs["packed"] == {"shard_blocks": PACK_BLOCKS, "source": str(source)}  # the name on disk
    code, info = cache_cli("info", out)
    assert code == 0 and f"in files of {PACK_BLOCKS * CHUNK}" in info
    code, info = cache_cli("info", out, "--json")
    arrays = {a["name"]: a for a in json.loads(info)["arrays"]}
    assert code == 0 and arrays["fmap"]["pack_file"][0] == PACK_BLOCKS * CHUNK and arrays["fmap"]["chunks"][0] == CHUNK
    code, info = cache_cli("info", source, "--json")
    assert code == 0 and all(a["pack_file"] is None for a in json.loads(info)["arrays"])
    # random access (as `cache show` and scoring do) reads the right rows
    rows = [21, 2, 13]
    np.testing.assert_array_equal(dst.read(rows, ["lare"])["lare"], src.read(rows, ["lare"])["lare"])


def test_training_batches_and_fingerprint_are_unchanged(packed):
    source, out, _ = packed
    a, b = CacheSplit(source, ("pooled", "fmap", "lare")), CacheSplit(out, ("pooled", "fmap", "lare"))
    assert a.fingerprint == b.fingerprint and a.num_ok == b.num_ok
    kwargs = dict(epoch=1, seed=3, batch_size=5, shuffle_blocks=2)
    for batch_a, batch_b in zip(a.epoch_batches(**kwargs), b.epoch_batches(**kwargs), strict=True):
        np.testing.assert_array_equal(batch_a.index, batch_b.index)
        for name in ("pooled", "fmap", "lare", "label"):
            assert torch.equal(getattr(batch_a, name), getattr(batch_b, name)), name


def test_verify_passes_the_packed_cache_and_catches_a_damaged_shard(packed, tmp_path):
    import shutil

    _, out, _ = packed
    code, report = cache_cli("verify", out, "--json")
    assert code == 0 and json.loads(report)["errors"] == [], report

    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    (damaged / "fmap" / "c" / "1" / "0" / "0" / "0").write_bytes(b"\x00garbage" * 64)
    (damaged / "lare" / "c" / "0" / "0" / "0" / "0").unlink()
    code, report = cache_cli("verify", damaged, "--json")
    errors = [item for f in json.loads(report)["errors"] if f["check"] == "chunks" for item in f["items"]]
    assert code == 1
    assert "lare/c/0/0/0/0" in errors  # the first shard: blocks 0-3
    assert any(item.startswith("fmap/c/1/0/0/0") for item in errors)  # the second shard: blocks 4-5


def test_a_packed_cache_refuses_writes(packed):
    _, out, _ = packed
    cache = FeatureCache.open(out, mode="r+")
    with pytest.raises(CacheError, match="read-only"):
        cache.write_block(0, lare=np.zeros((CHUNK, 4, 32, 32)), pooled=np.zeros((CHUNK, 16)),
                          fmap=np.zeros((CHUNK, 16, 14, 14)), seed=[0] * CHUNK, status=["ok"] * CHUNK,
                          error=[""] * CHUNK)
    with pytest.raises(CacheError, match="already packed"):
        pack_cache(out, out.parent / "twice", pack_blocks=2, progress=False)


def test_pack_refuses_an_unfinished_cache_and_an_existing_folder(tmp_path, packed):
    unfinished = build_tiny_cache(tmp_path).path  # block 5 pending
    code, out = cache_cli("pack", unfinished, tmp_path / "out")
    assert code == 2 and "pending" in out and "lare2 extract" in out
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.creating-*"))
    result = runner.invoke(app, ["cache", "pack", str(unfinished), str(tmp_path / "out")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # a usage error, not a traceback
    assert result.stderr.splitlines() == [
        (f"error: {unfinished}: 1 of 6 blocks are still pending (e.g. block {PENDING_BLOCK}); finish `lare2 extract` "
         "before packing (a packed cache cannot be appended to)")]
    with pytest.raises(CacheError, match="still pending") as raised:
        pack_cache(unfinished, tmp_path / "out", progress=False)
    assert type(raised.value) is CacheError and str(raised.value).startswith(f"{unfinished}: ")

    source, existing, _ = packed
    before = sorted(p.relative_to(existing) for p in existing.rglob("*"))
    code, out = cache_cli("pack", source, existing)
    assert code == 2 and "already exists" in out
    result = runner.invoke(app, ["cache", "pack", str(source), str(existing)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.stderr.splitlines() == [
        f"error: {existing}: already exists; choose a new folder for the packed cache"]
    with pytest.raises(CacheExistsError, match="already exists"):
        pack_cache(source, existing, progress=False)
    assert sorted(p.relative_to(existing) for p in existing.rglob("*")) == before  # left as it was


def test_the_old_spelling_shard_blocks_still_packs_and_stays_out_of_the_help(packed, tmp_path):
    source, _, _ = packed
    code, out = cache_cli("pack", source, tmp_path / "old", "--shard-blocks", 3, "--json")
    assert code == 0 and json.loads(out)["pack_blocks"] == 3, out
    assert FeatureCache.open(tmp_path / "old").pack_blocks == 3
    code, text = cache_cli("pack", "--help")
    assert code == 0 and "--pack-blocks" in text and "--shard-blocks" not in text
