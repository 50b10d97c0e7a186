"""One prompt rule for extraction and scoring (docs/method.md §1.4): class prompts never fall back to the
empty prompt silently. ``lare2 extract`` refuses rows without an ImageNet class before any model loads
unless ``classless_prompt=empty`` says what they get; that setting travels into the run, and ``lare2 score``
and ``Detector`` give such an image the same prompt, hence the same p(fake) as ``extract`` + ``eval``. The setting
is no part of the identity, and configs stored before it existed (whose classless rows got the empty prompt) are
read as ``empty``."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from lare2.cli import app
from lare2.shared.config import ClasslessError, ExtractConfig, current_keys, debug, identity_fingerprint, paper
from tests.helpers.bad_images import good_rgb

FINGERPRINTS = {"sd": "5" * 16, "backbone": "b" * 16}
GENIMAGE_NAME = "1_sdv5_00001.png"
"""A GenImage-style name: ImageNet class 1, ``goldfish``."""


def write_images(root: Path, counts: dict[str, int]) -> Path:
    """``root/<split>/{0_real,1_fake}/``: plain names (no ImageNet class), and one GenImage-style name per split."""
    for split, count in counts.items():
        for i in range(count):
            folder = root / split / ("0_real" if i % 2 == 0 else "1_fake")
            folder.mkdir(parents=True, exist_ok=True)
            name = GENIMAGE_NAME if i == 1 else f"holiday-{i}.png"
            (folder / name).write_bytes(good_rgb(seed=100 * len(split) + i, size=(36 + i, 40)))
    return root


def build_manifest(images: Path, out: Path) -> Path:
    from lare2.shared.manifest import build_folders, write_built

    return write_built(out, build_folders(images, progress=False))


def test_prompt_for_never_falls_back_silently() -> None:
    assert paper().classless_prompt == "refuse" and paper().prompt_for("goldfish") == "a photo of a goldfish"
    with pytest.raises(ClasslessError, match="classless_prompt=empty"):
        paper().prompt_for("")
    assert paper(classless_prompt="empty").prompt_for("") == ""
    assert paper(prompt_mode="empty").prompt_for("") == "" and paper(prompt_mode="empty").prompt_for("goldfish") == ""
    # the debug preset keeps class prompts and says what classless rows get
    assert (debug().prompt_mode, debug().classless_prompt, debug().prompt_for("")) == ("class", "empty", "")


def test_classless_prompt_is_recorded_but_no_part_of_the_identity() -> None:
    # under refuse a cache holds no classless rows, so both values give the same features for the same rows
    refused, empty = paper(), paper(classless_prompt="empty")
    assert refused.identity(FINGERPRINTS) == empty.identity(FINGERPRINTS)
    assert "classless_prompt" not in empty.identity(FINGERPRINTS)
    assert identity_fingerprint(refused.identity(FINGERPRINTS)) == identity_fingerprint(empty.identity(FINGERPRINTS))
    assert empty.to_dict()["classless_prompt"] == "empty"  # recorded: score and Detector apply it
    assert ExtractConfig.from_dict(empty.to_dict()).classless_prompt == "empty"
    assert ExtractConfig.from_dict(refused.to_dict()).classless_prompt == "refuse"


def test_a_config_stored_before_classless_prompt_reads_as_empty() -> None:
    """Before the setting existed, class prompts silently gave classless rows the empty prompt: a stored config
    without the key (a cache's, a run's) keeps that behaviour; new configs refuse."""
    before = {k: v for k, v in paper().to_dict().items() if k != "classless_prompt"}
    loaded = ExtractConfig.from_dict(before)
    assert (loaded.prompt_mode, loaded.classless_prompt, loaded.prompt_for("")) == ("class", "empty", "")
    assert loaded.identity(FINGERPRINTS) == paper().identity(FINGERPRINTS)
    assert current_keys(before)["classless_prompt"] == "empty" and "classless_prompt" not in before
    assert ExtractConfig.from_dict({**before, "prompt_mode": "empty"}).prompt_for("") == ""
    assert current_keys({"clip": "RN50.pt"}) == {"clip": "RN50.pt"}  # a part of a config gains nothing
    assert paper().classless_prompt == debug(classless_prompt="refuse").classless_prompt == "refuse"


def test_a_resume_with_the_other_classless_prompt(tmp_path) -> None:
    """The same selection under either value: allowed when no row lacks a class (same features), and the cache
    keeps the value it was made with; once a row lacks a class, ``refuse`` is refused as for a new cache."""
    from lare2.extract.plan import manifest_digest, plan_extraction
    from lare2.shared.cache import FeatureCache
    from tests.helpers.caches import CHUNK, build_tiny_cache, manifest_rows, write_tiny_manifest

    cache = build_tiny_cache(tmp_path, complete=True)  # debug: classless_prompt=empty; every row has a class
    attrs = FeatureCache.open(cache.path, mode="r+").group.attrs
    attrs["manifest"] = {**attrs["manifest"], "digest": manifest_digest(cache.ids)}  # as `lare2 extract` records

    def plan(classless_prompt: str):
        return plan_extraction(debug(manifest=str(cache.manifest), out=str(cache.path), chunk_samples=CHUNK,
                                     classless_prompt=classless_prompt))

    assert plan("refuse").nothing_to_do and plan("empty").nothing_to_do
    assert FeatureCache.open(cache.path).attrs["extract_config"]["classless_prompt"] == "empty"

    rows = manifest_rows()
    rows["class_name"] = ["", *rows["class_name"][1:]]  # the same sample ids: the same selection
    write_tiny_manifest(cache.manifest, rows, tmp_path / "images")
    with pytest.raises(ClasslessError, match="1 of"):
        plan("refuse")
    assert plan("empty").nothing_to_do


def _extract_without_models(argv: list[str]) -> tuple[int, str, bool]:
    """(exit code, stderr, whether torch was imported) of ``lare2.extract.cli.main(argv)`` in a fresh process."""
    code = ("import sys; from lare2.extract.cli import main; code = main(sys.argv[1:]); "
            "print('torch' in sys.modules); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "COLUMNS": "300"})
    return done.returncode, done.stderr, done.stdout.strip() == "True"


def test_extract_refuses_classless_rows_before_any_model_loads(tmp_path) -> None:
    manifest = build_manifest(write_images(tmp_path / "images", {"train": 4}), tmp_path / "mine.parquet")
    # a model that does not exist: the refusal comes first, and torch is never imported
    code, stderr, torch_loaded = _extract_without_models([
        "--manifest", str(manifest), "--split", "train", "--preset", "paper", "--sd", str(tmp_path / "no-sd"),
        "--clip", "tiny", "--out", str(tmp_path / "cache"), "--device", "cpu"])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and not torch_loaded, stderr
    assert f"{manifest}: 3 of 4 selected rows (split train) have no ImageNet class" in errors[0]
    assert "--prompt-mode empty" in errors[0] and "--set classless_prompt=empty" in errors[0]
    assert not (tmp_path / "cache").exists()


def test_a_refused_mismatch_answers_before_any_model_loads(tmp_path) -> None:
    from tests.helpers.caches import build_tiny_cache

    tiny = build_tiny_cache(tmp_path)
    code, stderr, torch_loaded = _extract_without_models([
        "--manifest", str(tiny.manifest), "--split", "train", "--preset", "debug", "--out", str(tiny.path),
        "--device", "cpu", "--perturb", "jpeg:50"])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and not torch_loaded, stderr
    assert "perturb: cache has none, this run 'jpeg:50'" in errors[0], errors[0]


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory) -> SimpleNamespace:
    """Images with plain names (and one GenImage-style name per split) extracted with the debug preset (class
    prompts, ``classless_prompt=empty``), one epoch of training, and ``eval``'s p(fake) per test file."""
    import pyarrow.parquet as pq

    tmp_path = tmp_path_factory.mktemp("debug_run")
    images = write_images(tmp_path / "images", {"train": 8, "val": 6, "test": 6})
    manifest = build_manifest(images, tmp_path / "mine.parquet")
    runner = CliRunner()
    extract = ["extract", "--manifest", str(manifest), "--preset", "debug", "--device", "cpu", "--set", "ensemble=2",
               "--set", "chunk_samples=4"]
    extracted = runner.invoke(app, [*extract, "--all-splits", "--out", str(tmp_path / "cache")])
    assert extracted.exit_code == 0, extracted.output
    assert "7 of 8 selected rows have no ImageNet class and get the empty prompt" in " ".join(extracted.output.split())
    trained = runner.invoke(app, ["train", "--preset", "debug", "--train", str(tmp_path / "cache/train"), "--val",
                                  str(tmp_path / "cache/val"), "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert trained.exit_code == 0, trained.output
    evaluated = runner.invoke(app, ["eval", str(tmp_path / "run"), "--test", str(tmp_path / "cache/test"), "--report",
                                    str(tmp_path / "report"), "--device", "cpu", "--no-plots"])
    assert evaluated.exit_code == 0, evaluated.output
    predictions = pq.read_table(tmp_path / "report/predictions.parquet").to_pylist()
    expected = {Path(row["path"]).as_posix().split("test/", 1)[1]: row["p_fake"] for row in predictions}
    return SimpleNamespace(root=tmp_path, images=images, run=tmp_path / "run", extract=extract, expected=expected)


def score_rows(run: Path, folder: Path, out_csv: Path) -> list[dict]:
    """The rows of ``lare2 score RUN FOLDER -o out_csv``, every one asserted scored."""
    scored = CliRunner().invoke(app, ["score", str(run), str(folder), "--device", "cpu", "--workers", "0", "-o",
                                      str(out_csv)])
    assert scored.exit_code == 0, scored.output  # every row scored: none refused for lack of a class
    with open(out_csv, newline="") as f:
        return list(csv.DictReader(f))


def assert_training_prompts(rows: list[dict], images: Path, expected: dict[str, float]) -> None:
    """Each classless image scored with the empty prompt, the GenImage-named one with its class, and p(fake) as
    ``eval`` gave the same file."""
    assert len(rows) == len(expected) == 6
    for row in rows:
        relative = Path(row["path"]).relative_to(images / "test").as_posix()
        genimage = Path(row["path"]).name == GENIMAGE_NAME
        assert row["status"] == "ok" and row["prompt"] == ("a photo of a goldfish" if genimage else ""), row
        assert float(row["p_fake"]) == pytest.approx(expected[relative], abs=1e-6), row


@pytest.mark.slow
def test_score_uses_the_prompt_rule_training_used(debug_run, tmp_path) -> None:
    """Class prompts with ``classless_prompt=empty`` (the debug preset): every classless image gets the empty
    prompt in extraction and in scoring, a GenImage-named one its class; p(fake) equals extract + eval's."""
    from lare2 import Detector
    from lare2.shared.errors import InputError

    images, expected, extract, runner = debug_run.images, debug_run.expected, debug_run.extract, CliRunner()
    assert_training_prompts(score_rows(debug_run.run, images / "test", tmp_path / "rows.csv"), images, expected)

    detector = Detector.from_run(debug_run.run, device="cpu", num_workers=0)
    assert detector.extraction.classless_prompt == "empty"
    path = str(images / "test/0_real/holiday-0.png")
    one = detector.score(path)  # a str is one path, not a sequence of characters
    assert one.path == path and one.prompt == "" and one.p_fake == pytest.approx(expected["0_real/holiday-0.png"],
                                                                               abs=1e-6)
    assert [r.p_fake for r in detector.score([Path(path), Path(path).read_bytes()])] == pytest.approx([one.p_fake] * 2,
                                                                                                   abs=1e-6)
    with pytest.raises(TypeError, match="got a builtins.int"):
        detector.score(42)
    with pytest.raises(TypeError, match="input 1 is a builtins.float"):
        detector.score([path, 0.5])
    with pytest.raises(InputError, match="did you mean 'goldfish'"):
        detector.score(path, class_name="goldfsh")

    again = runner.invoke(app, [*extract, "--split", "test", "--out", str(debug_run.root / "cache/test"), "--json"])
    assert again.exit_code == 0, again.output  # a finished cache, same settings: nothing to do, no model loaded
    assert "no model loaded" in " ".join(again.stderr.split())
    assert json.loads(again.stdout)["computed"] == 0


@pytest.mark.slow
def test_a_run_recorded_before_classless_prompt_scores_classless_images_as_it_was_trained(debug_run, tmp_path) -> None:
    """A run whose config.json predates the setting (its classless training rows silently got the empty prompt)
    scores classless images with the empty prompt, not as error rows, and with eval's p(fake)."""
    from lare2.train.checkpoint import CONFIG_FILE, DetectorConfig

    old_run = shutil.copytree(debug_run.run, tmp_path / "old-run")
    stored = json.loads((old_run / CONFIG_FILE).read_text())
    del stored["extraction"]["classless_prompt"]
    (old_run / CONFIG_FILE).write_text(json.dumps(stored))
    assert DetectorConfig.from_dict(stored).extraction.classless_prompt == "empty"
    rows = score_rows(old_run, debug_run.images / "test", tmp_path / "rows.csv")
    assert_training_prompts(rows, debug_run.images, debug_run.expected)
