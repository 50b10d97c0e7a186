"""README's "Your own images" walk-through, run as written: the bash block between the walkthrough markers is
read from README.md (never retyped here), run with ``bash -e`` in a fresh folder with the repo's ``.venv/bin``
first on PATH, and its outputs checked: files, exit codes, one p(fake) per scored image, from the prompt rule
training used, equal to what ``extract`` + ``eval`` gave the same files."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- walkthrough:begin -->", "<!-- walkthrough:end -->"

pytestmark = pytest.mark.slow


def walkthrough_script(readme: Path = REPO / "README.md") -> str:
    """The fenced ``bash`` blocks between the markers, joined."""
    text = readme.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "README: one walkthrough section, between its markers"
    section = text.split(BEGIN, 1)[1].split(END, 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, "README: no ```bash block between the walkthrough markers"
    return "\n".join(blocks)


def venv_bin() -> Path:
    venv = REPO / ".venv" / "bin"
    return venv if (venv / "lare2").exists() else Path(sys.executable).parent


def run_bash(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}", "COLUMNS": "200"}
    return subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1800)


def test_the_script_is_read_from_the_readme() -> None:
    script = walkthrough_script()
    for command in ("lare2 manifest build folders", "lare2 extract", "lare2 train", "lare2 eval", "lare2 calibrate",
                    "lare2 score", "Detector.from_run"):
        assert command in script, command


def test_the_readme_walkthrough_runs(tmp_path) -> None:
    import pyarrow.parquet as pq

    script = walkthrough_script()
    done = run_bash(script, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    assert (tmp_path / "my_images.parquet").is_file()
    for split in ("train", "val", "test"):
        assert (tmp_path / "my_cache" / split / "zarr.json").is_file(), split
    for name in ("model.safetensors", "config.json", "report/predictions.parquet", "report/metrics.json"):
        assert (tmp_path / "my_run" / name).is_file(), name
    assert "threshold" in done.stderr and "for 10% FPR" in done.stderr  # calibrate said what it set

    predictions = {row["path"]: row["p_fake"]
                   for row in pq.read_table(tmp_path / "my_run/report/predictions.parquet").to_pylist()}
    with open(tmp_path / "verdicts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    tests = sorted((tmp_path / "my_images/test").rglob("*.png"))
    assert len(rows) == len(tests) == len(predictions) > 0
    for row in rows:
        assert row["status"] == "ok" and row["error"] == "" and row["prompt"] == "", row  # the empty prompt, as trained
        relative = Path(row["path"]).relative_to("my_images").as_posix()
        eval_p = next(p for path, p in predictions.items() if Path(path).as_posix().endswith(relative))
        assert float(row["p_fake"]) == pytest.approx(eval_p, abs=1e-6), row  # extract + eval's p(fake)
        assert row["is_fake"] == str(float(row["p_fake"]) > float(row["threshold"]))
        assert (tmp_path / row["heatmap"]).is_file(), row
    assert len(list((tmp_path / "heatmaps").glob("*.png"))) == len(rows)

    printed = re.search(r"my_images/test/1_fake/image-18\.png: p\(fake\) = ([0-9.]+), fake: (True|False), "
                        r"prompt ''", done.stdout)
    assert printed, done.stdout[-3000:]
    csv_p = next(float(r["p_fake"]) for r in rows if r["path"] == "my_images/test/1_fake/image-18.png")
    assert float(printed.group(1)) == pytest.approx(csv_p, abs=1e-3)
    assert (tmp_path / "image-18-heatmap.png").is_file()

    # "Which prompt": the same extraction with class prompts is refused, in the words the README quotes
    extract_line = next(line for line in script.replace("\\\n", " ").splitlines()
                        if line.startswith("lare2 extract"))
    refused = run_bash(extract_line.replace("--prompt-mode empty", "--preset paper --sd tiny --clip tiny")
                       .replace("--out my_cache", "--out refused_cache"), tmp_path)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-3000:]
    quoted = re.search(r"\(`(error: my_images\.parquet: [^`]*?) \.\.\.`\)", " ".join((REPO / "README.md").read_text()
                                                                                        .split()))
    assert quoted and errors[0].startswith(quoted.group(1)), (quoted and quoted.group(1), errors[0])
    assert not (tmp_path / "refused_cache").exists()
