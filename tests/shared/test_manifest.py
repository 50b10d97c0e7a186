"""Manifests: class names from GenImage file names, the four builders, hold-out, duplicates,
tar members, the parquet round trip and the ``lare2 manifest`` commands."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lare2.shared import classnames
from lare2.shared.manifest import (
    MANIFEST_SCHEMA,
    ManifestError,
    build_folders,
    build_genimage,
    build_list,
    build_manifest,
    build_webdataset,
    holdout_score,
    print_build_report,
    read_image_bytes,
    read_manifest,
    read_manifest_metadata,
    select_rows,
    write_built,
    write_manifest,
)
from PIL import Image
from typer.testing import CliRunner

from lare2.cli import app
from tests.helpers.rich_tables import table_rows

# Entries of the authors' filename_to_folder.json (GitHub luo3300612/LaRE, f8b2966).
AUTHORS_VAL_SYNSETS = {
    "ILSVRC2012_val_00000001.JPEG": "n01751748",
    "ILSVRC2012_val_00000002.JPEG": "n09193705",
    "ILSVRC2012_val_00031765.JPEG": "n02814533",
    "ILSVRC2012_val_00050000.JPEG": "n02437616",
}


# ---- independent look-ups in the shipped data -------------------------------------------------
def _data(name: str) -> str:
    return resources.files("lare2.shared").joinpath("data", name).read_text(encoding="utf-8")


def _first_synonym(index: int) -> str:
    return json.loads(_data("idx_to_clsname.json"))[str(index)].split(",")[0].strip()


def _index_of_synset(synset: str) -> int:
    for line in _data("idx_to_folder.txt").splitlines():
        if line.endswith(f" {synset}/"):
            return int(line.split()[1].rstrip("/"))
    raise AssertionError(f"{synset} not in idx_to_folder.txt")


# ---- tiny image files ---------------------------------------------------------------------
def _image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (12, 8)) -> bytes:
    pixels_HW3 = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels_HW3).save(buf, format=fmt)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _sha_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _error_line(stderr: str) -> str:
    """The one ``error:`` line of a usage error (progress bars may precede it on stderr)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _genimage_tree(root: Path, train_per_class: int = 6) -> dict[str, bytes]:
    """Two generators, one with GenImage's subset level; returns relative path -> bytes."""
    files: dict[str, bytes] = {}
    seed = 0
    for generator, subset in (("stable_diffusion_v_1_4", "imagenet_ai_0419_sdv4"), ("ADM", None)):
        base = f"{generator}/{subset}" if subset else generator
        for split, n in (("train", train_per_class), ("val", 2)):
            for i in range(n):
                seed += 1
                files[f"{base}/{split}/ai/{371 + i}_sdv5_{seed:05d}.png"] = _image_bytes(seed)
                seed += 1
                real = f"ILSVRC2012_val_{i + 1:08d}.JPEG" if split == "val" else f"n01440764_{seed}.JPEG"
                files[f"{base}/{split}/nature/{real}"] = _image_bytes(seed, "JPEG", (10, 14))
    for rel, data in files.items():
        _write(root / rel, data)
    _write(root / "ADM/train/ai/notes.txt", b"not an image")
    _write(root / "ADM/train/ai/.DS_Store", b"\0\0")
    return files


# ---- class names --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "filename, expected_index",
    [
        ("371_sdv5_00145.png", 371),
        ("GLIDE_1000_200_08_808_glide_00000.png", 808),
        ("VQDM_1000_200_00_230_vqdm_00031.png", 230),
        ("000_biggan_00094.png", 0),
        ("ADM/train/ai/371_sdv5_00145.png", 371),
    ],
)
def test_class_index_from_numeric_fields(filename: str, expected_index: int) -> None:
    assert classnames.class_index_from_filename(filename) == expected_index
    assert classnames.class_name_from_filename(filename) == _first_synonym(expected_index)


@pytest.mark.parametrize("filename", sorted(AUTHORS_VAL_SYNSETS))
def test_class_of_imagenet_val_file_goes_through_its_synset(filename: str) -> None:
    index = _index_of_synset(AUTHORS_VAL_SYNSETS[filename])
    assert classnames.class_index_from_filename(filename) == index
    assert classnames.class_name_from_filename(filename) == _first_synonym(index)


def test_class_of_synset_named_file() -> None:
    index = _index_of_synset("n03594945")
    assert classnames.class_index_from_filename("n03594945_36929.JPEG") == index
    assert classnames.class_name_from_filename("n03594945_36929.JPEG") == _first_synonym(index)
    assert classnames.class_name(index) == _first_synonym(index)


@pytest.mark.parametrize(
    "filename",
    ["photo.png", "abcd_1.png", "x1_foo.png", "1000_sd_1.png", "ILSVRC2012_test_00000001.JPEG",
     "ILSVRC2012_val_00050001.JPEG", "GLIDE_short.png", "n99999999_1.JPEG", ""],
)
def test_names_without_a_class_yield_nothing(filename: str) -> None:
    assert classnames.class_index_from_filename(filename) is None
    assert classnames.class_name_from_filename(filename) == ""


def test_class_name_rejects_out_of_range_index() -> None:
    with pytest.raises(ValueError, match="1000"):
        classnames.class_name(1000)


@pytest.mark.skipif(not os.environ.get("LARE2_GENIMAGE_ANNS"), reason="set LARE2_GENIMAGE_ANNS to the authors' folder")
def test_derived_table_matches_authors_json() -> None:
    authors = json.loads((Path(os.environ["LARE2_GENIMAGE_ANNS"]) / "filename_to_folder.json").read_text())
    synsets = classnames._val_synsets()
    assert len(authors) == len(synsets)
    for name, synset in authors.items():
        assert synsets[int(name[len("ILSVRC2012_val_"):-len(".JPEG")]) - 1] == synset


# ---- builders -----------------------------------------------------------------------------
def test_genimage_rows_labels_splits_and_class_names(tmp_path: Path) -> None:
    files = _genimage_tree(tmp_path / "genimage")
    built = build_genimage(tmp_path / "genimage", val_fraction=0.3, workers=2, progress=False)
    rows = {r["path"]: r for r in built.table.to_pylist()}

    assert set(rows) == set(files)  # the .txt and the hidden file are skipped
    assert built.skipped == [str((tmp_path / "genimage/ADM/train/ai/notes.txt").resolve())]
    assert built.root == (tmp_path / "genimage").resolve()
    for rel, data in files.items():
        row = rows[rel]
        assert row["sample_id"] == _sha_id(data)
        assert row["label"] == (1 if "/ai/" in rel else 0)
        assert row["generator"] == rel.split("/")[0]
        genimage_split = rel.split("/")[-3]
        assert row["split"] == "test" if genimage_split == "val" else row["split"] in ("train", "val")
        assert row["class_name"] == classnames.class_name_from_filename(rel) != ""
        with Image.open(io.BytesIO(data)) as image:
            assert (row["width"], row["height"], row["format"]) == (*image.size, image.format)
        assert row["error"] == ""
    # a real image of a subset carries that subset's generator: both classes per generator and split
    per_generator = Counter((r["generator"], r["split"] == "test", r["label"]) for r in rows.values())
    assert all(per_generator[(g, t, lab)] > 0
               for g in ("ADM", "stable_diffusion_v_1_4") for t in (True, False) for lab in (0, 1))


def test_val_holdout_is_deterministic_disjoint_and_follows_the_hash(tmp_path: Path) -> None:
    _genimage_tree(tmp_path / "g", train_per_class=10)
    first = build_genimage(tmp_path / "g", val_fraction=0.4, workers=1, progress=False).table.to_pylist()
    again = build_genimage(tmp_path / "g", val_fraction=0.4, workers=3, progress=False).table.to_pylist()
    smaller = build_genimage(tmp_path / "g", val_fraction=0.1, workers=2, progress=False).table.to_pylist()
    none = build_genimage(tmp_path / "g", val_fraction=0.0, workers=2, progress=False).table.to_pylist()

    assert first == again
    genimage_train = {r["sample_id"] for r in none if r["split"] == "train"}
    val = {r["sample_id"] for r in first if r["split"] == "val"}
    train = {r["sample_id"] for r in first if r["split"] == "train"}
    assert val and train and not val & train and val | train == genimage_train
    assert val == {i for i in genimage_train if holdout_score(i) < 0.4}
    assert {r["sample_id"] for r in smaller if r["split"] == "val"} <= val
    assert ({r["sample_id"] for r in first if r["split"] == "test"}
            == {r["sample_id"] for r in none if r["split"] == "test"})


def test_holdout_score_is_uniform_enough() -> None:
    scores = np.array([holdout_score(f"{i:032x}") for i in range(4000)])
    assert scores.min() >= 0 and scores.max() < 1
    assert abs((scores < 0.05).mean() - 0.05) < 0.015


def test_genimage_rejects_bad_fraction(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="val_fraction"):
        build_genimage(tmp_path, val_fraction=1.0, progress=False)


def test_folders_with_generator_and_split_levels(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _write(root / "sdxl/train/0_real/a.png", _image_bytes(1))
    _write(root / "sdxl/test/1_fake/b.png", _image_bytes(2))
    _write(root / "dalle/val/1_fake/371_dalle_1.png", _image_bytes(3))
    _write(root / "dalle/val/1_fake/readme.md", b"skip me")
    rows = {r["path"]: r for r in build_folders(root, progress=False, workers=1).table.to_pylist()}
    assert {p: (r["generator"], r["split"], r["label"]) for p, r in rows.items()} == {
        "sdxl/train/0_real/a.png": ("sdxl", "train", 0),
        "sdxl/test/1_fake/b.png": ("sdxl", "test", 1),
        "dalle/val/1_fake/371_dalle_1.png": ("dalle", "val", 1),
    }
    assert rows["dalle/val/1_fake/371_dalle_1.png"]["class_name"] == _first_synonym(371)
    assert rows["sdxl/train/0_real/a.png"]["class_name"] == ""


def test_folders_split_level_and_flat_layout(tmp_path: Path) -> None:
    _write(tmp_path / "bysplit/train/1_fake/x.png", _image_bytes(4))
    rows = build_folders(tmp_path / "bysplit", progress=False).table.to_pylist()
    assert [(r["generator"], r["split"], r["label"]) for r in rows] == [("bysplit", "train", 1)]

    _write(tmp_path / "flat/0_real/r.jpg", _image_bytes(5, "JPEG"))
    _write(tmp_path / "flat/1_fake/f.png", _image_bytes(6))
    with pytest.raises(ManifestError, match="--split"):
        build_folders(tmp_path / "flat", progress=False)
    rows = build_folders(tmp_path / "flat", split="test", generator="mine", progress=False).table.to_pylist()
    assert sorted((r["path"], r["generator"], r["split"], r["label"]) for r in rows) == [
        ("0_real/r.jpg", "mine", "test", 0), ("1_fake/f.png", "mine", "test", 1)]


@pytest.mark.parametrize("separator", ["\t", ",", " "])
def test_list_relative_absolute_and_missing(tmp_path: Path, separator: str) -> None:
    inside_name = "lists/imgs/a b.png" if separator != " " else "lists/imgs/ab.png"
    inside = _write(tmp_path / inside_name, _image_bytes(7))
    outside = _write(tmp_path / "elsewhere/c.png", _image_bytes(8))
    lines = ["path" + separator + "label" if separator != " " else "# path label",
             f"imgs/{inside.name}{separator}1", f"{outside}{separator}real", f"imgs/missing.png{separator}0",
             f"imgs/notes.txt{separator}0", ""]
    list_file = _write(tmp_path / "lists/my_set.txt", "\n".join(lines).encode())

    built = build_list(list_file, split="val", progress=False)
    rows = {r["path"]: r for r in built.table.to_pylist()}
    assert built.root == tmp_path.resolve()  # the common folder, since one path lies outside the list's
    assert set(rows) == {f"lists/imgs/{inside.name}", "elsewhere/c.png", "lists/imgs/missing.png"}
    assert rows[f"lists/imgs/{inside.name}"]["label"] == 1 and rows["elsewhere/c.png"]["label"] == 0
    assert {r["generator"] for r in rows.values()} == {"my_set"} and {r["split"] for r in rows.values()} == {"val"}
    missing = rows["lists/imgs/missing.png"]
    assert "unreadable" in missing["error"] and missing["width"] == 0 and missing["format"] == ""
    assert rows["elsewhere/c.png"]["sample_id"] == _sha_id(outside.read_bytes())
    assert read_image_bytes(built.root, f"lists/imgs/{inside.name}") == inside.read_bytes()


def test_list_inside_its_folder_is_rooted_there(tmp_path: Path) -> None:
    _write(tmp_path / "l/x/1.png", _image_bytes(9))
    list_file = _write(tmp_path / "l/list.csv", b"x/1.png,fake\n")
    built = build_list(list_file, split="test", generator="g", progress=False)
    assert built.root == (tmp_path / "l").resolve()
    assert built.table.column("path").to_pylist() == ["x/1.png"]


def test_list_errors_name_the_line(tmp_path: Path) -> None:
    list_file = _write(tmp_path / "bad.txt", b"a.png\t1\nb.png\tmaybe\n")
    with pytest.raises(ManifestError, match=r"bad.txt:2"):
        build_list(list_file, split="test", progress=False)
    with pytest.raises(ManifestError, match="--split"):
        build_list(list_file, progress=False)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_members_labels_and_reading(tmp_path: Path) -> None:
    shards = tmp_path / "wds/shards"
    shards.mkdir(parents=True)
    images = {"000001.tar": {"s0.jpg": _image_bytes(10, "JPEG"), "371_sd_3.png": _image_bytes(11)},
              "000002.tar.gz": {"s2.webp": _image_bytes(12, "WEBP")}}
    with tarfile.open(shards / "000001.tar", "w") as tar:
        _tar_add(tar, "s0.jpg", images["000001.tar"]["s0.jpg"])
        _tar_add(tar, "s0.cls", b"0\n")
        _tar_add(tar, "371_sd_3.png", images["000001.tar"]["371_sd_3.png"])
        _tar_add(tar, "371_sd_3.json", json.dumps({"label": "fake", "generator": "sd", "split": "train"}).encode())
        _tar_add(tar, "371_sd_3.txt", b"caption")
    with tarfile.open(shards / "000002.tar.gz", "w:gz") as tar:
        _tar_add(tar, "s2.webp", images["000002.tar.gz"]["s2.webp"])
        _tar_add(tar, "s2.cls", b"1")

    built = build_webdataset(tmp_path / "wds", split="test", generator="web", progress=False)
    rows = {r["path"]: r for r in built.table.to_pylist()}
    assert {p: (r["label"], r["generator"], r["split"], r["format"]) for p, r in rows.items()} == {
        "shards/000001.tar::s0.jpg": (0, "web", "test", "JPEG"),
        "shards/000001.tar::371_sd_3.png": (1, "sd", "train", "PNG"),
        "shards/000002.tar.gz::s2.webp": (1, "web", "test", "WEBP"),
    }
    assert rows["shards/000001.tar::371_sd_3.png"]["class_name"] == _first_synonym(371)
    for path in rows:
        shard, member = path.split("::")
        data = images[Path(shard).name][member]
        assert read_image_bytes(built.root, path) == data
        assert rows[path]["sample_id"] == _sha_id(data)
    with pytest.raises(FileNotFoundError, match="000001.tar.*nope.jpg"):
        read_image_bytes(built.root, "shards/000001.tar::nope.jpg")
    with pytest.raises(FileNotFoundError, match="000009.tar"):
        read_image_bytes(built.root, "shards/000009.tar::s0.jpg")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image_bytes(built.root, "missing.png")


def test_webdataset_member_without_label_is_an_error(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        _tar_add(tar, "k.png", _image_bytes(13))
    with pytest.raises(ManifestError, match=r"a.tar::k.png: no label"):
        build_webdataset(tmp_path / "a.tar", split="test", progress=False)
    rows = build_webdataset(tmp_path / "a.tar", split="test", label=1, progress=False).table.to_pylist()
    assert [(r["path"], r["label"]) for r in rows] == [("a.tar::k.png", 1)]


def test_duplicates_dropped_within_a_split_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    same, other = _image_bytes(20), _image_bytes(21)
    root = tmp_path / "d"
    for rel in ("g/train/1_fake/a.png", "g/train/1_fake/b.png", "g/test/1_fake/c.png"):
        _write(root / rel, same)
    _write(root / "g/train/0_real/r.png", other)

    built = build_folders(root, progress=False)
    paths = built.table.column("path").to_pylist()
    assert sorted(paths) == ["g/test/1_fake/c.png", "g/train/0_real/r.png", "g/train/1_fake/a.png"]
    assert len(built.duplicates) == 1 and built.num_dropped == 1
    assert built.duplicates[0].dropped == ["g/train/1_fake/b.png"]
    assert sorted(built.duplicates[0].splits) == ["test", "train", "train"]
    assert built.duplicates[0].sample_id == _sha_id(same)
    monkeypatch.setenv("COLUMNS", "200")  # the log console: no folded cells
    print_build_report(built)
    err = capsys.readouterr().err
    assert "1 images occur more than once" in err
    assert "1 images occur more than once (1 copies dropped)" in err
    rows = table_rows(err, 4)  # sample_id, split(s), copies, dropped: one line per copy
    assert rows[0][:2] == [_sha_id(same)[:12], "test, train"] and all(r[:2] == ["", ""] for r in rows[1:])
    assert sorted(r[2] for r in rows) == ["g/test/1_fake/c.png", "g/train/1_fake/a.png", "g/train/1_fake/b.png"]
    assert [r[3] for r in rows if r[3]] == ["g/train/1_fake/b.png"]

    kept = build_folders(root, keep_duplicates=True, progress=False)
    assert kept.table.num_rows == 4 and kept.num_dropped == 0 and len(kept.duplicates) == 1


def test_unreadable_images_are_kept_with_an_error(tmp_path: Path) -> None:
    root = tmp_path / "e"
    _write(root / "test/1_fake/text.png", b"this is not a png\n")
    _write(root / "test/1_fake/empty1.png", b"")
    _write(root / "test/1_fake/empty2.png", b"")
    _write(root / "test/0_real/ok.png", _image_bytes(30))
    built = build_folders(root, generator="g", progress=False)
    rows = {r["path"].rsplit("/", 1)[1]: r for r in built.table.to_pylist()}
    assert built.num_errors == 3 and len(rows) == 4 and not built.duplicates
    assert "not an image" in rows["text.png"]["error"]
    assert rows["text.png"]["sample_id"] == _sha_id(b"this is not a png\n")
    assert rows["empty1.png"]["error"] == "empty file"
    assert rows["empty1.png"]["sample_id"] != rows["empty2.png"]["sample_id"]
    assert (rows["text.png"]["width"], rows["text.png"]["format"]) == (0, "")
    assert rows["ok.png"]["error"] == "" and rows["ok.png"]["width"] == 12


def test_empty_or_missing_sources_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such folder"):
        build_genimage(tmp_path / "nowhere", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no images found"):
        build_folders(tmp_path / "empty", split="test", progress=False)
    with pytest.raises(ValueError, match="genimage"):
        build_manifest("imagenet", tmp_path)


# ---- write, read, select ------------------------------------------------------------------
def test_round_trip_keeps_schema_root_and_builder(tmp_path: Path) -> None:
    _genimage_tree(tmp_path / "g", train_per_class=2)
    built = build_genimage(tmp_path / "g", val_fraction=0.2, progress=False)
    out = write_built(tmp_path / "m/manifest.parquet", built)

    table, root = read_manifest(out)
    assert table.schema.remove_metadata() == MANIFEST_SCHEMA
    assert table.to_pylist() == built.table.to_pylist()
    assert root == (tmp_path / "g").resolve()
    meta = read_manifest_metadata(out)
    assert meta["builder"] == "genimage" and meta["builder_args"]["val_fraction"] == 0.2
    assert "versions" in meta["provenance"]
    assert read_manifest(out, root=tmp_path / "moved")[1] == tmp_path / "moved"
    for row in table.slice(0, 3).to_pylist():
        assert _sha_id(read_image_bytes(root, row["path"])) == row["sample_id"]


def test_write_manifest_from_columns_casts_types(tmp_path: Path) -> None:
    columns = {name: ["x"] for name in MANIFEST_SCHEMA.names}
    columns.update(label=[1], width=[4], height=[3])
    table, root = read_manifest(write_manifest(tmp_path / "c.parquet", columns, root=tmp_path, builder="test"))
    assert table.schema.field("label").type == pa.int8() and table.schema.field("width").type == pa.int32()
    with pytest.raises(ManifestError, match="lack the manifest columns"):
        write_manifest(tmp_path / "bad.parquet", {"path": ["x"]}, root=tmp_path, builder="test")


def test_read_rejects_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.parquet"):
        read_manifest(tmp_path / "absent.parquet")
    pq.write_table(pa.table({"path": ["a.png"]}), tmp_path / "foreign.parquet")
    with pytest.raises(ManifestError, match="foreign.parquet: not a lare2 manifest"):
        read_manifest(tmp_path / "foreign.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ManifestError, match="junk.parquet"):
        read_manifest(tmp_path / "junk.parquet")


def test_select_rows(tmp_path: Path) -> None:
    _genimage_tree(tmp_path / "g", train_per_class=3)
    table = build_genimage(tmp_path / "g", progress=False).table
    test_adm = select_rows(table, split="test", generators=["ADM"])
    assert test_adm.num_rows == 4
    assert set(test_adm.column("split").to_pylist()) == {"test"}
    assert set(test_adm.column("generator").to_pylist()) == {"ADM"}
    assert select_rows(table, limit=5).column("path").to_pylist() == table.column("path").to_pylist()[:5]
    assert select_rows(table).num_rows == table.num_rows
    with pytest.raises(ValueError, match="not in the manifest"):
        select_rows(table, generators=["midjourney"])
    with pytest.raises(ValueError, match="choose from"):
        select_rows(table, split="validation")


# ---- commands -----------------------------------------------------------------------------
def test_cli_build_then_show_json(tmp_path: Path) -> None:
    _genimage_tree(tmp_path / "g", train_per_class=3)
    out = tmp_path / "m.parquet"
    runner = CliRunner()
    result = runner.invoke(app, ["manifest", "build", "genimage", str(tmp_path / "g"), "-o", str(out),
                                 "--val-fraction", "0.5", "--workers", "2"])
    assert result.exit_code == 0, result.output
    rows = read_manifest(out)[0].to_pylist()

    result = runner.invoke(app, ["manifest", "show", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["root"] == str((tmp_path / "g").resolve()) and summary["builder"] == "genimage"
    assert summary["num_rows"] == len(rows) and summary["num_errors"] == 0
    expected = Counter((r["split"], r["generator"], r["label"]) for r in rows)
    assert {(c["split"], c["generator"], c["label"]): c["count"] for c in summary["counts"]} == expected

    table_view = runner.invoke(app, ["manifest", "show", str(out)], env={"COLUMNS": "200"})
    assert table_view.exit_code == 0 and "stable_diffusion_v_1_4" in table_view.stdout
    # one row per split x generator: real, fake and unreadable counts of the manifest's rows
    shown = {(r[0], r[1]): r[2:] for r in table_rows(table_view.stdout, 5)}
    assert len(table_rows(table_view.stdout, 5)) == len(shown)
    assert shown == {(s, g): [str(expected[(s, g, 0)]), str(expected[(s, g, 1)]),
                              str(sum(1 for r in rows if (r["split"], r["generator"]) == (s, g) and r["error"]))]
                     for s, g, _ in expected}
    assert all(v != ["0", "0", "0"] for v in shown.values())
    assert f"{len(rows)} images, 0 errors (genimage)" in " ".join(table_view.stdout.split())  # the title may wrap


def test_cli_fails_clearly(tmp_path: Path) -> None:
    # bad input exits 2 with one `error:` line, as every lare2 command (it exited 1 before the common CLI grammar)
    runner = CliRunner()
    missing = tmp_path / "no_such_dataset"
    result = runner.invoke(app, ["manifest", "build", "folders", str(missing), "-o", str(tmp_path / "m.parquet")])
    assert result.exit_code == 2 and f"{missing}: no such folder" in result.output
    assert _error_line(result.stderr) == f"error: {missing}: no such folder"
    assert not (tmp_path / "m.parquet").exists()

    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["manifest", "build", "genimage", str(tmp_path / "empty"),
                                 "-o", str(tmp_path / "m.parquet")])
    assert result.exit_code == 2 and "no images found" in result.output
    assert _error_line(result.stderr).startswith(f"error: {tmp_path / 'empty'}: no images found (genimage layout")

    result = runner.invoke(app, ["manifest", "build", "imagenet", str(tmp_path), "-o", str(tmp_path / "m.parquet")])
    assert result.exit_code == 2 and "choose from" in result.output
    named, choices = _error_line(result.stderr).split("choose from", 1)
    assert "'imagenet'" in named
    assert sorted(ast.literal_eval(choices.strip())) == ["folders", "genimage", "list", "webdataset"]

    result = runner.invoke(app, ["manifest", "show", str(tmp_path / "absent.parquet")])
    assert result.exit_code == 2 and "absent.parquet: no such manifest file" in result.output
    assert _error_line(result.stderr) == f"error: {tmp_path / 'absent.parquet'}: no such manifest file"
    assert not (tmp_path / "m.parquet").exists()


def test_cli_refuses_options_that_do_not_apply(tmp_path: Path) -> None:
    _write(tmp_path / "g/ADM/train/ai/1_adm_1.png", _image_bytes(40))
    result = CliRunner().invoke(app, ["manifest", "build", "genimage", str(tmp_path / "g"),
                                      "-o", str(tmp_path / "m.parquet"), "--split", "test"])
    assert result.exit_code == 2 and "--split" in result.output and not (tmp_path / "m.parquet").exists()
    assert _error_line(result.stderr) == ("error: --split do(es) not apply to the genimage builder "
                                          "(it takes --val-fraction)")

    result = CliRunner().invoke(app, ["manifest", "build", "folders", str(tmp_path / "g"),
                                      "-o", str(tmp_path / "m.parquet"), "--val-fraction", "0.2", "--label", "1"])
    assert result.exit_code == 2 and not (tmp_path / "m.parquet").exists()
    assert _error_line(result.stderr) == ("error: --label, --val-fraction do(es) not apply to the folders builder "
                                          "(it takes --generator, --split)")
