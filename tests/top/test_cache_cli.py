"""`lare2 cache ...` on a small cache: each command in rich and --json form, checked for content;
`verify` catching each kind of damage; the PNGs read back with Pillow."""

from __future__ import annotations

import ast
import json
import shutil

import numpy as np
import pytest
import zarr
from lare2.shared.cache import META_COLUMNS, FeatureCache, plots
from PIL import Image
from typer.testing import CliRunner

from lare2 import cache_cli
from lare2.cli import app
from tests.helpers.rich_tables import table_rows
from tests.helpers.caches import (
    CHUNK,
    ERROR_INDICES,
    NUM_SAMPLES,
    PENDING_BLOCK,
    build_tiny_cache,
    manifest_rows,
    ok_indices,
    write_tiny_manifest,
)

runner = CliRunner()
WIDE = {"COLUMNS": "200"}  # piped, the commands print 200 wide anyway; this keeps a forced terminal as wide


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["cache", *map(str, args)], env=WIDE)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def run_json(*args: str) -> tuple[int, dict]:
    code, out, _ = run(*args, "--json")
    return code, json.loads(out)


def lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


def error_line(err: str) -> str:
    """The one ``error:`` line a usage error prints on stderr (and nothing else there)."""
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err.rstrip("\n")


def size_text(n: int) -> str:
    """A byte count as `cache info` prints it, for sizes under 1 MiB: 602 B, 1.2 KiB."""
    assert n < 1024 ** 2
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny_copy(tiny, tmp_path):
    """A private copy of the tiny cache to damage; the manifest and images stay shared."""
    shutil.copytree(tiny.path, tmp_path / "cache")
    return tmp_path / "cache"


# ---- info / ls / show ---------------------------------------------------------------------------
def test_info_counts_arrays_config_and_provenance(tiny):
    code, report = run_json("info", tiny.path)
    assert code == 0
    done = [i for i in range(NUM_SAMPLES) if i // CHUNK != PENDING_BLOCK]
    assert report["num_samples"] == NUM_SAMPLES
    assert report["status_counts"] == {"ok": len(ok_indices()), "error": len(set(ERROR_INDICES) & set(done)),
                                       "pending": NUM_SAMPLES - len(done)}
    assert report["blocks"] == {"total": 6, "done": 5, "pending": 1}
    # one group: train x sdv14 x fake x ok, counted from the rows the cache was built from
    expected = sum(1 for i in ok_indices() if tiny.rows["generator"][i] == "sdv14" and tiny.rows["split"][i] == "train")
    group = [g for g in report["groups"]
             if (g["split"], g["generator"], g["label"], g["status"]) == ("train", "sdv14", 1, "ok")]
    assert group[0]["count"] == expected
    assert sum(g["count"] for g in report["groups"]) == NUM_SAMPLES

    arrays = {a["name"]: a for a in report["arrays"]}
    lare = arrays["lare"]
    assert (lare["shape"], lare["dtype"], lare["chunks"]) == ([NUM_SAMPLES, 4, 32, 32], "float32", [CHUNK, 4, 32, 32])
    on_disk = sum(f.stat().st_size for f in (tiny.path / "lare").rglob("*") if f.is_file())
    assert lare["bytes_on_disk"] == on_disk
    assert lare["compression_ratio"] == pytest.approx(NUM_SAMPLES * 4 * 32 * 32 * 4 / on_disk)
    assert arrays["pooled"]["dtype"] == "float16" and "meta/sample_id" in arrays
    assert report["fingerprints"] == {"backbone": "b" * 16, "sd": "5" * 16}
    assert report["extract_config"]["chunk_samples"] == CHUNK
    assert report["provenance"]["versions"]["zarr"] == zarr.__version__

    code, out, _ = run("info", tiny.path)
    assert code == 0
    for text in ("sdv14", "b" * 16, "ratio", zarr.__version__, "fmap"):
        assert text in out
    # the tables show the JSON's numbers
    counts = report["status_counts"]
    assert (f"{tiny.path}: {NUM_SAMPLES} samples, format {report['format']}, blocks 5/6 done; status {counts}"
            in lines(out))
    label_names = {0: "real", 1: "fake"}
    assert table_rows(out, 5) == [[g["split"], g["generator"], f"{g['label']} ({label_names[g['label']]})", g["status"],
                                   str(g["count"])] for g in report["groups"]]
    assert [str(expected)] == [r[4] for r in table_rows(out, 5) if r[:4] == ["train", "sdv14", "1 (fake)", "ok"]]
    shown = {r[0]: r[1:] for r in table_rows(out, 7)}
    assert shown == {a["name"]: [str(a["shape"]), a["dtype"], str(a["chunks"]),
                                 "-" if a["nbytes"] is None else size_text(a["nbytes"]), size_text(a["bytes_on_disk"]),
                                 "-" if a["compression_ratio"] is None else f"{a['compression_ratio']:.2f}"]
                     for a in report["arrays"]}
    assert shown["lare"][:5] == ["[24, 4, 32, 32]", "float32", "[4, 4, 32, 32]", "384.0 KiB", size_text(on_disk)]
    assert shown["meta/sample_id"][3] == "-" and shown["meta/sample_id"][5] == "-"  # strings: size unknown
    key_values = table_rows(out, 2)
    for key, value in (("chunk_samples", str(CHUNK)), ("backbone", "b" * 16), ("sd", "5" * 16),
                       ("zarr", zarr.__version__), ("created", report["provenance"]["created"])):
        assert [key, value] in key_values


def test_ls_filters_and_limit(tiny):
    code, listing = run_json("ls", tiny.path, "--generator", "sdv14", "--status", "ok", "--limit", "0")
    assert code == 0
    expected = [i for i in ok_indices() if tiny.rows["generator"][i] == "sdv14"]
    assert listing["matching"] == len(expected)
    assert [r["index"] for r in listing["rows"]] == expected
    assert all(r["generator"] == "sdv14" and r["status"] == "ok" for r in listing["rows"])

    code, listing = run_json("ls", tiny.path, "--label", "0", "--limit", "2")
    assert len(listing["rows"]) == 2 and listing["matching"] == tiny.rows["label"].count(0)
    assert {r["label"] for r in listing["rows"]} == {0}

    code, listing = run_json("ls", tiny.path, "--status", "error")
    assert {r["sample_id"] for r in listing["rows"]} == {
        tiny.ids[i] for i in ERROR_INDICES if i // CHUNK != PENDING_BLOCK}
    assert all(r["error"].startswith("ImageError") for r in listing["rows"])

    failed = [i for i in ERROR_INDICES if i // CHUNK != PENDING_BLOCK]
    code, out, _ = run("ls", tiny.path, "--status", "error")
    assert code == 0 and tiny.ids[ERROR_INDICES[0]] in out and "ImageError" in out
    shown = table_rows(out, 10)  # index + the 9 metadata columns
    assert [(r[0], r[1], r[8]) for r in shown] == [(str(i), tiny.ids[i], "error") for i in failed]
    assert all(r[9] == "ImageError: cannot identify image file" for r in shown)
    assert shown == [[str(r[c]) for c in ("index", *META_COLUMNS)] for r in listing["rows"]]  # as the JSON
    assert f"{len(failed)} of {len(failed)} matching samples" in out
    code, out, _ = run("ls", tiny.path, "--label", "0", "--limit", "2")
    real = [i for i in range(NUM_SAMPLES) if tiny.rows["label"][i] == 0]
    assert code == 0 and f"2 of {len(real)} matching samples" in out
    assert [(r[0], r[1], r[3]) for r in table_rows(out, 10)] == [(str(i), tiny.ids[i], "0") for i in real[:2]]
    code, _, err = run("ls", tiny.path, "--status", "done")
    assert code == 2 and "choose from" in err
    line = error_line(err)
    assert "'done'" in line.split("choose from")[0]
    assert sorted(ast.literal_eval(line.split("choose from", 1)[1].strip())) == ["error", "ok", "pending"]


def test_show_statistics_match_the_stored_arrays(tiny, tmp_path):
    index = ok_indices()[1]
    code, summary = run_json("show", tiny.path, tiny.ids[index][:8])  # a unique prefix is enough
    assert code == 0 and summary["index"] == index
    assert summary["metadata"]["sample_id"] == tiny.ids[index]
    arrays = FeatureCache.open(tiny.path).read([index])
    lare = arrays["lare"][0].astype(np.float64)
    for c, stats in enumerate(summary["lare"]["channels"]):
        assert stats["mean"] == pytest.approx(lare[c].mean())
        assert stats["max"] == pytest.approx(lare[c].max())
    assert summary["features"]["pooled_l2"] == pytest.approx(np.linalg.norm(arrays["pooled"][0].astype(np.float64)))

    png = tmp_path / "show.png"
    code, out, _ = run("show", tiny.path, tiny.ids[index], "--png", png)
    assert code == 0 and "LaRE" in out and str(png) in out
    # the tables print the stored arrays' statistics, 4 significant digits
    assert f"LaRE (mean {lare.mean():.4g})" in out
    assert table_rows(out, 5) == [
        [str(c), *(f"{v:.4g}" for v in (lare[c].mean(), lare[c].std(), lare[c].min(), lare[c].max()))]
        for c in range(4)]
    key_values = table_rows(out, 2)
    assert ["sample_id", tiny.ids[index]] in key_values and ["status", "ok"] in key_values
    assert ["generator", tiny.rows["generator"][index]] in key_values
    assert ["pooled_l2", f"{np.linalg.norm(arrays['pooled'][0].astype(np.float64)):.4g}"] in key_values
    assert ["fmap_l2", f"{np.linalg.norm(arrays['fmap'][0].astype(np.float64)):.4g}"] in key_values
    assert f"wrote {png} (1280x300 px)" in lines(out)
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert im.size == plots.show_figure_pixels(1 + 4) == (5 * 256, 300)  # image + 4 channels
        assert np.asarray(im.convert("L")).std() > 0  # drawn, not blank


def test_show_without_the_image_draws_lare_only_and_says_so(tiny, tmp_path):
    shutil.copytree(tiny.path, tmp_path / "cache")
    group = zarr.open_group(tmp_path / "cache", mode="r+")
    group.attrs["manifest"] = {"path": str(tiny.manifest), "root": str(tmp_path / "moved")}
    png = tmp_path / "lare_only.png"
    code, summary = run_json("show", tmp_path / "cache", tiny.ids[0], "--png", png)
    assert code == 0
    assert summary["png"]["image_shown"] is False and "image not found" in summary["png"]["image_note"]
    with Image.open(png) as im:
        assert im.size == (4 * 256, 300)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_show_png_of_an_error_sample_whose_file_is_corrupt_draws_the_reason(tmp_path, damage):
    """The image panel says why the file cannot be shown (written on it), the LaRE panels that there is no
    map; exit 0, like any other sample shown."""
    tiny = build_tiny_cache(tmp_path)
    index = ERROR_INDICES[0]
    image = tiny.root / tiny.rows["path"][index]
    image.write_bytes(b"this is not an image" if damage == "garbage" else image.read_bytes()[:60])
    png = tmp_path / "s.png"
    code, out, err = run("show", tiny.path, tiny.ids[index], "--png", png)
    assert code == 0 and "Traceback" not in out + err, out + err
    why = "not an image Pillow can identify" if damage == "garbage" else "cannot decode"
    shown = [line for line in lines(out) if line.startswith(f"wrote {png} (1280x300 px); image not shown: ")]
    assert len(shown) == 1 and f"{image.name}: {why}" in shown[0], out
    with Image.open(png) as im:
        panel_HW3 = np.asarray(im.convert("RGB"))[70:230, 165:325]  # inside the image panel
    assert (panel_HW3 == 48).all(axis=2).mean() > 0.5  # the dark square ...
    assert (panel_HW3 > 200).all(axis=2).sum() > 100  # ... with the reason written on it
    code, summary = run_json("show", tiny.path, tiny.ids[index], "--png", png)
    assert code == 0 and summary["png"]["image_shown"] is False and why in summary["png"]["image_note"]


def test_show_error_sample_and_unknown_id(tiny):
    code, summary = run_json("show", tiny.path, tiny.ids[ERROR_INDICES[0]])
    assert code == 0 and summary["lare"] is None and summary["metadata"]["status"] == "error"
    assert summary["metadata"]["error"] == "ImageError: cannot identify image file"
    code, out, _ = run("show", tiny.path, tiny.ids[ERROR_INDICES[0]])
    assert code == 0 and "no arrays: status error ImageError: cannot identify image file" in lines(out)
    assert "LaRE (mean" not in out and table_rows(out, 5) == []
    code, _, err = run("show", tiny.path, "not-an-id")
    assert code == 2 and "no sample with id" in err
    assert error_line(err) == f"error: {tiny.path}: no sample with id 'not-an-id'"
    prefix = next(p for p in (s[:1] for s in tiny.ids) if sum(s.startswith(p) for s in tiny.ids) > 1)
    code, _, err = run("show", tiny.path, prefix)
    matches = sum(s.startswith(prefix) for s in tiny.ids)
    assert code == 2 and error_line(err).startswith(
        f"error: {tiny.path}: id prefix {prefix!r} matches {matches} samples")


@pytest.mark.parametrize("command", ["info", "ls", "show", "verify", "stats", "diff"])
def test_missing_cache_is_a_usage_error(tmp_path, command):
    extra = {"show": ["abc"], "diff": [tmp_path / "nor_this"]}.get(command, [])
    code, _, err = run(command, tmp_path / "nothing_here", *extra)
    assert code == 2 and "no such cache" in err
    assert error_line(err) == f"error: {tmp_path / 'nothing_here'}: no such cache directory"


# ---- verify -------------------------------------------------------------------------------------
def test_verify_passes_an_intact_cache_and_warns_about_pending(tiny):
    code, report = run_json("verify", tiny.path, "--allow-pending")
    assert code == 0 and report["ok"] is True and report["errors"] == []
    (pending,) = [w for w in report["warnings"] if w["check"] == "status"]
    assert pending["items"] == [PENDING_BLOCK] and "incomplete" in pending["message"]
    assert report["checked"]["ok_samples_scanned"] == len(ok_indices())
    assert report["checked"]["manifest_rows"] == NUM_SAMPLES  # the recorded manifest was used
    # without --allow-pending, an unfinished cache is not whole: exit 1, naming the pending block and the way out
    code, strict = run_json("verify", tiny.path)
    (unfinished,) = strict["errors"]
    assert code == 1 and unfinished["check"] == "status" and unfinished["items"] == [PENDING_BLOCK]
    assert unfinished["message"].startswith(pending["message"]) and "--allow-pending" in unfinished["message"]
    code, out, _ = run("verify", tiny.path, "--allow-pending")
    assert code == 0 and "OK" in out
    shown = lines(out)
    assert shown[-1] == f"{tiny.path}: OK, {len(report['warnings'])} warnings" and len(report["warnings"]) == 1
    (warning,) = [i for i, line in enumerate(shown) if pending["message"] in line]
    assert shown[warning].startswith("warning") and shown[warning + 1] == f"    {PENDING_BLOCK}"
    key_values = table_rows(out, 2)
    for key in ("chunks_read", "ok_samples_scanned", "manifest_rows", "manifest"):
        assert [key, str(report["checked"][key])] in key_values
    assert ["ok_samples_scanned", str(len(ok_indices()))] in key_values
    assert ["manifest", str(tiny.manifest)] in key_values


def _errors(report: dict, check: str) -> list:
    return [item for f in report["errors"] if f["check"] == check for item in f["items"]]


def test_verify_catches_a_deleted_chunk(tiny_copy):
    (tiny_copy / "lare" / "c" / "0" / "0" / "0" / "0").unlink()
    code, report = run_json("verify", tiny_copy, "--allow-pending")
    assert code == 1 and report["ok"] is False
    assert _errors(report, "chunks") == ["lare/c/0/0/0/0"]
    # the block reads back as NaN: its ok samples are flagged too
    assert len(_errors(report, "values")) == len([i for i in ok_indices() if i < CHUNK])


def test_verify_catches_a_corrupted_chunk(tiny_copy):
    (tiny_copy / "fmap" / "c" / "1" / "0" / "0" / "0").write_bytes(b"\x00garbage" * 64)
    code, report = run_json("verify", tiny_copy, "--allow-pending")
    assert code == 1
    (unreadable,) = _errors(report, "chunks")
    assert unreadable.startswith("fmap/c/1/0/0/0")
    code, out, _ = run("verify", tiny_copy, "--allow-pending")
    assert code == 1 and "FAILED" in out and "fmap/c/1/0/0/0" in out
    shown = lines(out)
    assert shown[-1] == f"{tiny_copy}: FAILED ({len(report['errors'])} problems), {len(report['warnings'])} warnings"
    assert len(report["errors"]) == 1  # only the corrupt chunk: its samples read back as fill values, not flagged twice
    (finding,) = [i for i, line in enumerate(shown) if "1 chunks cannot be read (corrupt)" in line]
    assert shown[finding].startswith("error") and shown[finding + 1] == f"    {unreadable}"


def test_verify_text_names_the_check_of_each_finding(tiny_copy):
    (tiny_copy / "fmap" / "c" / "1" / "0" / "0" / "0").write_bytes(b"\x00garbage" * 64)
    code, out, _ = run("verify", tiny_copy, "--allow-pending")
    assert code == 1
    assert "error [chunks] 1 chunks cannot be read (corrupt)" in lines(out)
    assert "warning [status] incomplete: 1 of 6 blocks (4 samples) not extracted yet" in lines(out)


def test_verify_catches_a_corrupted_metadata_chunk(tiny_copy):
    (tiny_copy / "meta" / "generator" / "c" / "2").write_bytes(b"not zstd at all")
    code, report = run_json("verify", tiny_copy, "--allow-pending")
    assert code == 1 and _errors(report, "chunks")[0].startswith("meta/generator/c/2")


def test_verify_catches_nan_in_an_ok_sample(tiny_copy):
    index = ok_indices()[3]
    group = zarr.open_group(tiny_copy, mode="r+")
    group["pooled"][index, 2] = np.nan
    code, report = run_json("verify", tiny_copy, "--allow-pending")
    assert code == 1 and _errors(report, "values") == [FeatureCache.open(tiny_copy).column("sample_id")[index]]


def test_verify_catches_a_duplicate_id(tiny_copy, tiny):
    group = zarr.open_group(tiny_copy, mode="r+")
    group["meta/sample_id"][7] = tiny.ids[2]
    code, report = run_json("verify", tiny_copy, "--allow-pending")
    assert code == 1
    assert _errors(report, "ids") == [tiny.ids[2]]
    assert tiny.ids[7] in _errors(report, "manifest")  # now missing from the cache


def test_verify_catches_a_manifest_row_missing_from_the_cache(tiny, tmp_path):
    rows = {k: list(v) for k, v in tiny.rows.items()}
    rows["sample_id"].append("f" * 16)
    for column, value in (("path", "nature/extra.png"), ("label", 0), ("generator", "nature"), ("split", "train"),
                          ("class_name", "goldfish")):
        rows[column].append(value)
    manifest = tmp_path / "bigger.parquet"
    write_tiny_manifest(manifest, rows, tiny.root)
    code, report = run_json("verify", tiny.path, "--allow-pending", "--manifest", manifest)
    assert code == 1
    missing = [f for f in report["errors"] if f["check"] == "manifest"]
    assert len(missing) == 1 and missing[0]["items"] == ["f" * 16] and "missing from the cache" in missing[0]["message"]


def test_verify_catches_metadata_that_differs_from_the_manifest(tiny, tmp_path):
    rows = {k: list(v) for k, v in tiny.rows.items()}
    rows["label"][0] = 1 - rows["label"][0]
    manifest = tmp_path / "relabelled.parquet"
    write_tiny_manifest(manifest, rows, tiny.root)
    code, report = run_json("verify", tiny.path, "--allow-pending", "--manifest", manifest)
    assert code == 1 and _errors(report, "manifest") == [tiny.ids[0]]


def test_verify_catches_inconsistent_fingerprints(tiny_copy):
    group = zarr.open_group(tiny_copy, mode="r+")
    group.attrs["fingerprints"] = {**group.attrs["fingerprints"], "sd": "0" * 16}
    code, report = run_json("verify", tiny_copy, "--allow-pending")
    assert code == 1 and _errors(report, "fingerprints") == ["sd"]


def _fake_recompute(change_index: int | None = None):
    """Stands in for the extractor: returns what the cache holds, one sample's lare nudged."""
    calls = []

    def recompute(cache_path, indices, sd=None, clip=None, device="auto", compute_dtype=None):
        calls.append(list(indices))
        arrays = FeatureCache.open(cache_path).read(indices)
        arrays["pooled"] = arrays["pooled"].astype(np.float32)  # cast back to the stored dtype by verify
        if change_index is not None and change_index in indices:
            lare = arrays["lare"]
            row = list(indices).index(change_index)
            lare[row, 0, 0, 0] = np.nextafter(lare[row, 0, 0, 0], np.float32(np.inf))  # one ulp
        return arrays

    return recompute, calls


def test_verify_recompute_matches_bit_for_bit(tiny, monkeypatch):
    recompute, calls = _fake_recompute()
    monkeypatch.setattr(cache_cli, "_load_recompute_fn", lambda: recompute)
    code, report = run_json("verify", tiny.path, "--allow-pending", "--recompute", "5")
    assert code == 0 and report["ok"]
    assert len(calls[0]) == 5 and set(calls[0]) <= set(ok_indices())
    assert report["recompute"]["arrays"]["lare"] == {"compared": True, "mismatched": [], "max_abs_diff": 0.0}


def test_verify_recompute_catches_a_one_ulp_mismatch(tiny, monkeypatch):
    recompute, _ = _fake_recompute(change_index=ok_indices()[0])
    monkeypatch.setattr(cache_cli, "_load_recompute_fn", lambda: recompute)
    # all ok samples
    code, report = run_json("verify", tiny.path, "--allow-pending", "--recompute", str(len(ok_indices())))
    assert code == 1
    assert _errors(report, "recompute") == [tiny.ids[ok_indices()[0]]]
    assert 0 < report["recompute"]["arrays"]["lare"]["max_abs_diff"] < 1e-6
    assert report["recompute"]["arrays"]["fmap"]["mismatched"] == []
    # another device or dtype: a relative tolerance accepts rounding, not a real change
    code, report = run_json("verify", tiny.path, "--allow-pending", "--recompute", str(len(ok_indices())),
                            "--tolerance", "1e-4")
    assert code == 0 and report["recompute"]["tolerance"] == 1e-4


def test_verify_recompute_tolerance_still_catches_a_real_change(tiny, monkeypatch):
    def changed(cache_path, indices, **kwargs):
        arrays = FeatureCache.open(cache_path).read(indices)
        arrays["lare"][0] *= 1.05  # 5%: more than float16 rounding
        return arrays

    monkeypatch.setattr(cache_cli, "_load_recompute_fn", lambda: changed)
    code, report = run_json("verify", tiny.path, "--allow-pending", "--recompute", "3", "--tolerance", "0.01")
    assert code == 1 and len(_errors(report, "recompute")) == 1


def test_verify_recompute_is_skipped_without_the_extractor(tiny, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_extractor(name, *args, **kwargs):
        if name.startswith("lare2.extract"):
            raise ImportError("No module named 'diffusers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_extractor)
    code, report = run_json("verify", tiny.path, "--allow-pending", "--recompute", "2")
    assert code == 0
    (skipped,) = [w for w in report["warnings"] if w["check"] == "recompute"]
    assert skipped["message"].startswith("skipped:") and "diffusers" in skipped["message"]


@pytest.mark.slow
def test_verify_recompute_with_the_real_extractor(tmp_path):
    """Extract with tiny models, recompute every sample: bit-for-bit equal, until one value is changed."""
    from lare2.extract.run import run_extraction
    from lare2.shared.config import debug

    rows = manifest_rows(6)
    rng = np.random.default_rng(0)
    for rel in rows["path"]:
        (tmp_path / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / rel)
    write_tiny_manifest(tmp_path / "manifest.parquet", rows, tmp_path / "images")
    run_extraction(debug(manifest=str(tmp_path / "manifest.parquet"), out=str(tmp_path / "cache"), device="cpu",
                         image_size=64))

    code, report = run_json("verify", tmp_path / "cache", "--recompute", "6")
    assert code == 0 and report["checked"]["recomputed_samples"] == 6
    assert all(r["mismatched"] == [] and r["max_abs_diff"] == 0.0 for r in report["recompute"]["arrays"].values())

    group = zarr.open_group(tmp_path / "cache", mode="r+")
    group["fmap"][4, 0, 0, 0] = np.nextafter(group["fmap"][4, 0, 0, 0], np.float16(np.inf))
    code, report = run_json("verify", tmp_path / "cache", "--recompute", "6")
    assert code == 1 and _errors(report, "recompute") == [rows["sample_id"][4]]

    code, report = run_json("verify", tmp_path / "cache", "--recompute", "2", "--sd-model", tmp_path / "no_such_model")
    assert code == 0 and any(w["message"].startswith("skipped:")
                             for w in report["warnings"] if w["check"] == "recompute")

    # a cache computed in float16 (on a GPU): on this CPU, skipped with the way out;
    # recomputed in float32 within a tolerance
    group.attrs["extract_config"] = {**group.attrs["extract_config"], "compute_dtype": "float16"}
    code, report = run_json("verify", tmp_path / "cache", "--recompute", "2", "--device", "cpu")
    (skipped,) = [w for w in report["warnings"] if w["check"] == "recompute"]
    assert code == 0 and "needs a GPU" in skipped["message"] and "--compute-dtype float32" in skipped["message"]
    code, report = run_json("verify", tmp_path / "cache", "--recompute", "2", "--device", "cpu",
                            "--compute-dtype", "float32", "--tolerance", "0.01")
    assert code == 0 and report["checked"]["recomputed_samples"] == 2


# ---- diff ---------------------------------------------------------------------------------------
def test_diff_of_a_copy_agrees(tiny, tiny_copy):
    code, report = run_json("diff", tiny.path, tiny_copy)
    assert code == 0 and report["agree"] and report["compared"] == NUM_SAMPLES
    assert all(r["max_abs_diff"] == 0.0 for r in report["arrays"].values())


def test_diff_reports_the_differing_sample(tiny, tiny_copy):
    index, other = ok_indices()[2], ok_indices()[4]
    group = zarr.open_group(tiny_copy, mode="r+")
    group["lare"][index, 1, 5, 5] = group["lare"][index, 1, 5, 5] + 0.5
    group["pooled"][other] = np.nan
    code, report = run_json("diff", tiny.path, tiny_copy)
    assert code == 1 and not report["agree"]
    lare = report["arrays"]["lare"]
    assert lare["max_abs_diff"] == pytest.approx(0.5, abs=1e-6)
    assert lare["samples_differing"] == [tiny.ids[index]] and lare["worst_sample"] == tiny.ids[index]
    assert report["arrays"]["pooled"]["nan_on_one_side"] == [tiny.ids[other]]
    assert report["arrays"]["fmap"]["max_abs_diff"] == 0.0

    code, out, _ = run("diff", tiny.path, tiny_copy)
    assert code == 1 and "differ" in out and tiny.ids[index][:10] in out
    shown = {r[0]: r[1:] for r in table_rows(out, 5)}
    assert shown == {name: [f"{r['max_abs_diff']:.4g}", str(len(r["samples_differing"])),
                            str(len(r["nan_on_one_side"])), r["worst_sample"] or "-"]
                     for name, r in report["arrays"].items()}
    assert shown["lare"] == ["0.5", "1", "0", tiny.ids[index]]
    assert shown["pooled"][2] == "1" and shown["fmap"] == ["0", "0", "0", "-"]
    assert f"{NUM_SAMPLES} samples compared (atol 0)" in out and lines(out)[-1] == "the caches differ"


def test_diff_within_tolerance_and_of_independent_runs(tiny, tiny_copy, tmp_path):
    group = zarr.open_group(tiny_copy, mode="r+")
    group["lare"][ok_indices()[0], 0, 0, 0] += 1e-3
    code, report = run_json("diff", tiny.path, tiny_copy, "--atol", "0.01")
    assert code == 0 and report["agree"]

    other = build_tiny_cache(tmp_path / "other", seed=1, images=False)  # same ids, other draws
    code, report = run_json("diff", tiny.path, other.path)
    assert code == 1
    assert sorted(report["arrays"]["lare"]["samples_differing"]) == sorted(tiny.ids[i] for i in ok_indices())


# ---- stats --------------------------------------------------------------------------------------
def test_stats_groups_and_png(tiny, tmp_path):
    png = tmp_path / "stats.png"
    code, summary = run_json("stats", tiny.path, "--png", png)
    assert code == 0 and summary["ok_samples"] == len(ok_indices())
    cache = FeatureCache.open(tiny.path)
    means = {i: float(cache.read([i], names=("lare",))["lare"].astype(np.float64).mean()) for i in ok_indices()}
    groups = {(g["generator"], g["label"]): g for g in summary["groups"]}
    for generator in ("nature", "sdv14", "adm"):
        values = [m for i, m in means.items() if tiny.rows["generator"][i] == generator]
        label = 0 if generator == "nature" else 1
        assert groups[(generator, label)]["n"] == len(values)
        assert groups[(generator, label)]["mean"] == pytest.approx(np.mean(values))
    assert groups[("sdv14", 1)]["mean"] > groups[("nature", 0)]["mean"]  # the tiny cache's fakes err more
    with Image.open(png) as im:
        assert im.size == plots.stats_figure_pixels() == (1200, 500)
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 10

    code, out, _ = run("stats", tiny.path)
    assert code == 0 and "nature" in out and "fake" in out
    assert f"mean LaRE over {len(ok_indices())} ok samples" in out
    shown = table_rows(out, 8)
    assert shown == [[g["generator"], "real" if g["label"] == 0 else "fake", str(g["n"]),
                      *(f"{g[k]:.4g}" for k in ("mean", "std", "median", "q05", "q95"))] for g in summary["groups"]]
    by_generator = {r[0]: r for r in shown}
    for generator in ("nature", "sdv14", "adm"):  # the means of the stored arrays
        values = [m for i, m in means.items() if tiny.rows["generator"][i] == generator]
        assert by_generator[generator][2:4] == [str(len(values)), f"{np.mean(values):.4g}"]
        assert by_generator[generator][5] == f"{np.median(values):.4g}"


def test_counts_are_recorded_only_once_the_cache_is_finished(tmp_path):
    """Concurrent jobs each count when they end: a count taken before another job's last block must
    not be recorded, or it would stay stale after the other job's correct count (verify: counts)."""
    from tests.helpers.caches import LAYOUT

    cache = FeatureCache.open(build_tiny_cache(tmp_path, images=False).path, mode="r+")
    early = cache.finalize()  # job A ends while block PENDING_BLOCK is still being computed by job B
    assert early["pending"] == CHUNK and "counts" not in cache.attrs
    n = CHUNK
    cache.write_block(PENDING_BLOCK, lare=np.ones((n, *LAYOUT.lare_shape)), pooled=np.ones((n, LAYOUT.pooled_dim)),
                      fmap=np.ones((n, *LAYOUT.fmap_shape)), seed=range(n), status=["ok"] * n, error=[""] * n)
    final = cache.finalize()  # job B ends
    assert final["pending"] == 0 and FeatureCache.open(cache.path).attrs["counts"] == final
    code, report = run_json("verify", cache.path)
    assert not [f for f in report["errors"] if f["check"] == "counts"]
