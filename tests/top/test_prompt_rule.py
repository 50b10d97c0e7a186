"""One prompt rule for extraction and scoring (docs/method.md §1.4): class prompts never fall back to the
empty prompt silently. ``lare2 extract`` refuses rows without an ImageNet class before any model loads
unless ``classless_prompt=empty`` says what they get; that setting travels into the run, and ``lare2 score``
and ``Detector`` give such an image the same prompt, hence the same p(fake) as ``extract`` + ``eval``."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lare2.cli import app
from lare2.shared.config import ClasslessError, ExtractConfig, debug, identity_fingerprint, paper
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


def test_classless_prompt_counts_in_the_identity_only_when_it_changes_a_prompt() -> None:
    before = {k: v for k, v in paper().to_dict().items() if k != "classless_prompt"}  # written before the field
    assert ExtractConfig.from_dict(before).identity(FINGERPRINTS) == paper().identity(FINGERPRINTS)
    assert "classless_prompt" not in paper().identity(FINGERPRINTS)
    assert "classless_prompt" not in paper(prompt_mode="empty", classless_prompt="empty").identity(FINGERPRINTS)
    chosen = paper(classless_prompt="empty").identity(FINGERPRINTS)
    assert chosen["classless_prompt"] == "empty"
    assert identity_fingerprint(chosen) != identity_fingerprint(paper().identity(FINGERPRINTS))


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


@pytest.mark.slow
def test_score_uses_the_prompt_rule_training_used(tmp_path) -> None:
    """Class prompts with ``classless_prompt=empty`` (the debug preset): every classless image gets the empty
    prompt in extraction and in scoring, a GenImage-named one its class; p(fake) equals extract + eval's."""
    import pyarrow.parquet as pq

    from lare2 import Detector
    from lare2.shared.errors import InputError

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

    rows_csv = tmp_path / "rows.csv"
    scored = runner.invoke(app, ["score", str(tmp_path / "run"), str(images / "test"), "--device", "cpu", "--workers",
                                 "0", "-o", str(rows_csv)])
    assert scored.exit_code == 0, scored.output  # every row scored: none refused for lack of a class
    with open(rows_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(expected) == 6
    for row in rows:
        relative = Path(row["path"]).relative_to(images / "test").as_posix()
        genimage = Path(row["path"]).name == GENIMAGE_NAME
        assert row["status"] == "ok" and row["prompt"] == ("a photo of a goldfish" if genimage else ""), row
        assert float(row["p_fake"]) == pytest.approx(expected[relative], abs=1e-6), row

    detector = Detector.from_run(tmp_path / "run", device="cpu", num_workers=0)
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

    again = runner.invoke(app, [*extract, "--split", "test", "--out", str(tmp_path / "cache/test"), "--json"])
    assert again.exit_code == 0, again.output  # a finished cache, same settings: nothing to do, no model loaded
    assert "no model loaded" in " ".join(again.stderr.split())
    assert json.loads(again.stdout)["computed"] == 0
