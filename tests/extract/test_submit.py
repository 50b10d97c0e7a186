"""``lare2 extract --submit slurm``: the job script, the options it passes on, what it refuses.

The scheduler itself is exercised in ``test_slurm.py``; here the script is checked as text, by
``bash -n``, and its signal handling by running it under bash with a stand-in extraction.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lare2.cli import app
from lare2.extract.submit import (REQUEUE_START_DELAY_S, SubmitError, job_folder, job_script, parse_array,
                                  shell_lines)
from lare2.shared.cache import FeatureCache
from lare2.shared.cli_errors import EXIT_PREEMPTED

TINY = ["--preset", "debug", "--device", "cpu", "--set", "chunk_samples=2", "--set", "image_size=64",
        "--set", "num_workers=0"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    from tests.conftest import build_manifest, write_image_tree

    folder = tmp_path_factory.mktemp("submit")
    return build_manifest(write_image_tree(folder / "images", n_good=8, with_bad=False), folder / "manifest.parquet")


def _extract(*args: str):
    return CliRunner().invoke(app, ["extract", *args])


def _task_command(script: str) -> list[str]:
    """The extraction command of a job script, as argv."""
    body = script.split("\n\n", 1)[1].split(" &\n", 1)[0]
    return shlex.split(body.replace("\\\n", " "))


def test_dry_run_prints_the_script_and_touches_nothing(manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cache" / "train"
    result = _extract("--manifest", str(manifest), "--out", "cache/train", *TINY, "--generator", "gen-x",
                      "--no-resume", "--submit", "slurm", "--array", "3%2", "--sbatch-arg=--time=1:00:00",
                      "--sbatch-arg", "--partition=gpu", "--dry-run")
    assert result.exit_code == 0, result.output
    script = result.output
    assert not out.exists() and not job_folder(out).exists()  # nothing created, written or submitted
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120",
                 "#SBATCH --open-mode=append",
                 f"#SBATCH --output={job_folder(out)}/logs/%A_%a.out", f"#SBATCH --chdir={tmp_path}",
                 "#SBATCH --time=1:00:00", "#SBATCH --partition=gpu", "lare2 cache progress"):
        assert line in script
    command = _task_command(script)
    assert command[:3] == [sys.executable, "-m", "lare2.extract"]
    # the user's options, paths made absolute, shards from the array; --no-resume and the submit options stay behind
    assert command[3:] == ["--manifest", str(manifest), "--out", str(out), "--generator", "gen-x", *TINY,
                           "--num-shards", "3", "--shard-index", "auto"]
    checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr


def test_accelerate_launch_per_node_gpus(manifest, tmp_path):
    result = _extract("--manifest", str(manifest), "--out", str(tmp_path / "c"), *TINY, "--submit", "slurm",
                      "--array", "4", "--gpus-per-task", "8", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "#SBATCH --gres=gpu:8" in result.output
    command = _task_command(result.output)
    assert command[command.index("--multi_gpu") + 1:][:2] == ["--num_processes", "8"]
    assert command[command.index("-m") + 1] == "lare2.extract"


def _write_zeros(cache: FeatureCache, block: int) -> None:
    n = len(range(*cache.block_slice(block).indices(len(cache))))
    arrays = {name: np.zeros((n, *cache.layout.sample_shape(name))) for name in cache.layout.array_names}
    cache.write_block(block, **arrays, seed=[1] * n, status=["ok"] * n, error=[""] * n)


def test_only_missing_submits_the_shards_with_pending_blocks(manifest, tmp_path):
    out = tmp_path / "partial"
    created = _extract("--manifest", str(manifest), "--out", str(out), *TINY, "--create-only")
    assert created.exit_code == 0, created.output
    cache = FeatureCache.open(out, mode="r+")
    assert cache.num_blocks == 4  # 8 images, 2 per block; shards of 3: {0, 3}, {1}, {2}
    for block in (0, 1, 3):
        _write_zeros(cache, block)
    args = ["--manifest", str(manifest), "--out", str(out), *TINY, "--submit", "slurm", "--array", "3",
            "--only-missing", "--dry-run"]
    result = _extract(*args)
    assert result.exit_code == 0, result.output
    assert "#SBATCH --array=2\n" in result.output and "--num-shards 3" in result.output
    _write_zeros(cache, 2)
    whole = _extract(*args)
    assert whole.exit_code == 0 and "every block is done; nothing to submit" in whole.output


@pytest.mark.parametrize("args,words", [
    (["--array", "3"], ["--array", "only with --submit slurm"]),
    (["--dry-run", "--only-missing"], ["--only-missing, --dry-run", "only with --submit"]),
    (["--submit", "pbs", "--array", "2"], ["--submit 'pbs'", "slurm"]),
    (["--submit", "slurm"], ["--array N"]),
    (["--submit", "slurm", "--array", "2", "--shard-index", "1"], ["--shard-index", "--shard-index auto"]),
    (["--submit", "slurm", "--array", "x"], ["--array 'x'", "N%K"]),
    (["--submit", "slurm", "--array", "2%0"], ["N and K must be >= 1"]),
    (["--submit", "slurm", "--array", "2", "--only-missing"], ["no cache there yet", "drop --only-missing"]),
    (["--submit", "slurm", "--array", "2", "--all-splits"], ["--all-splits", "--split SPLIT"]),
])
def test_refused_in_one_line(manifest, tmp_path, args, words):
    result = _extract("--manifest", str(manifest), "--out", str(tmp_path / "c"), *TINY, *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0]


def test_without_sbatch_the_store_is_made_and_the_error_names_the_script(manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))
    out = tmp_path / "made"
    result = _extract("--manifest", str(manifest), "--out", str(out), *TINY, "--submit", "slurm", "--array", "2")
    assert result.exit_code == 2, result.output
    assert "sbatch is not installed here" in result.output
    assert (out / "zarr.json").exists()  # created once, before any task
    assert FeatureCache.open(out).attrs["extract_config"]["num_shards"] == 2  # what `cache progress` reads
    scripts = list(job_folder(out).glob("extract-*.sbatch"))
    assert len(scripts) == 1 and str(scripts[0]) in result.output


def test_parse_array_and_shell_lines():
    assert parse_array("64") == (64, None) and parse_array("64%8") == (64, 8)
    assert shell_lines(["python", "-m", "x", "--a", "1", "--flag", "--b", "two words"], indent="") == (
        "python -m x \\\n--a 1 \\\n--flag \\\n--b 'two words'")


# ---- the script's signal handling, run under bash with a stand-in for the extraction ------------------
def _stand_in(exit_code: int) -> str:
    """An extraction that waits, and on TERM exits ``exit_code``."""
    return ("import signal, sys, time; "
            "signal.signal(signal.SIGTERM, lambda *_: (print('extraction: TERM', flush=True), "
            f"sys.exit({exit_code}))); "
            "print('extraction: ready', flush=True); time.sleep(120)")


def _run_script(tmp_path: Path, send: signal.Signals, exit_code: int, *, gpus_per_task: int = 0,
                out: Path | None = None, scontrol: str | None = None) -> tuple[int, str]:
    """Run a job script (task 1 of 2, cache ``out``) whose extraction is ``_stand_in(exit_code)`` under bash,
    send the shell ``send`` once it runs. ``scontrol``: the body of a bash stand-in for it (else none is found)."""
    text = job_script(out=out or tmp_path / "c", command=[sys.executable, "-c", _stand_in(exit_code)], array="0-1",
                      num_shards=2, throttle=None, sbatch_args=[], gpus_per_task=gpus_per_task, logs=tmp_path / "logs")
    programs = tmp_path / "bin"  # the script's helpers; scontrol only as a stand-in: no scheduler is touched from here
    programs.mkdir(exist_ok=True)
    if scontrol is not None:
        (programs / "scontrol").write_text(f"#!{shutil.which('bash')}\n{scontrol}\n")
        (programs / "scontrol").chmod(0o755)
    for name in ("hostname", "date"):
        if not (programs / name).exists():
            (programs / name).symlink_to(shutil.which(name))
    env = {**os.environ, "SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "1", "PATH": str(programs)}
    shell = subprocess.Popen([shutil.which("bash"), "-c", text], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in shell.stdout:
        lines.append(line)
        if "extraction: ready" in line:
            shell.send_signal(send)
    shell.wait(timeout=60)
    return shell.returncode, "".join(lines)


def test_usr1_before_the_time_limit_stops_the_extraction_and_requeues_the_task(tmp_path):
    status, output = _run_script(tmp_path, signal.SIGUSR1, EXIT_PREEMPTED)
    assert "extraction: TERM" in output  # passed on as TERM
    assert f"extraction exited with status {EXIT_PREEMPTED}" in output
    assert "requeueing this task" in output and "scontrol" in output  # not found here; test_slurm.py runs it for real


def test_usr1_then_a_failure_is_not_requeued(tmp_path):
    status, output = _run_script(tmp_path, signal.SIGUSR1, 3)
    assert "extraction: TERM" in output and status == 3
    assert "failed (status 3) after USR1; not requeued" in output and "requeueing" not in output


def test_under_accelerate_launch_the_cache_decides_the_requeue(manifest, tmp_path):
    """The launcher exits 1 whatever its ranks' codes: task 1 requeues while its shard has pending blocks."""
    out = tmp_path / "launched"
    created = _extract("--manifest", str(manifest), "--out", str(out), *TINY, "--create-only", "--num-shards", "2")
    assert created.exit_code == 0, created.output
    status, output = _run_script(tmp_path, signal.SIGUSR1, 1, gpus_per_task=2, out=out)
    assert status == 1 and "shard 1 still has pending blocks" in output and "requeueing this task" in output
    cache = FeatureCache.open(out, mode="r+")
    for block in (1, 3):  # shard 1 of 2: done; shard 0 still pending
        _write_zeros(cache, block)
    status, output = _run_script(tmp_path, signal.SIGUSR1, 1, gpus_per_task=2, out=out)
    assert status == 1 and "failed (status 1) after USR1; not requeued" in output and "requeueing" not in output


def test_term_is_passed_on_and_the_task_does_not_requeue_itself(tmp_path):
    status, output = _run_script(tmp_path, signal.SIGTERM, EXIT_PREEMPTED)
    assert "extraction: TERM" in output and status == EXIT_PREEMPTED
    assert "requeueing" not in output  # a cancelled task stays cancelled; SLURM requeues a preempted one


def test_the_requeue_survives_its_own_term_and_advances_the_restart(tmp_path):
    """SLURM's requeue kills the running task (TERM to its shell and every process in it, scontrol included):
    the script still sets the requeued task's start time, else SLURM would hold it ~120 s."""
    calls = tmp_path / "scontrol-calls"
    requeue_kills = f'[ "$1" = requeue ] && kill -TERM $PPID $$; echo "$*" >> {shlex.quote(str(calls))}'
    status, output = _run_script(tmp_path, signal.SIGUSR1, EXIT_PREEMPTED, scontrol=requeue_kills)
    assert status == EXIT_PREEMPTED and "requeueing this task" in output, output
    assert "failed" not in output, output
    assert calls.read_text().splitlines() == ["requeue 41_1",
                                              f"update JobId=41_1 StartTime=now+{REQUEUE_START_DELAY_S}"]


def test_traps_are_set_before_the_extraction_starts(tmp_path):
    """A signal between the launch and ``extraction=$!`` must not take bash's default action (which would end the
    shell and orphan the extraction): the traps come first, and the stop waits for the extraction's pid."""
    text = job_script(out=tmp_path / "c", command=["true"], array="0", num_shards=1, throttle=None, sbatch_args=[],
                      gpus_per_task=0, logs=tmp_path / "logs")
    lines = text.splitlines()
    launch = lines.index("true &")
    assert lines.index("trap 'time_limit=1; stop_extraction' USR1") < launch
    assert lines.index("trap 'stop_extraction' TERM") < launch
    assert 'if [ -n "${extraction:-}" ] && [ "$stopped" = 0 ]; then' in text
    assert lines[launch + 2].startswith('[ "$stop_asked" = 0 ] || stop_extraction')  # a signal before $! is passed on


# ---- what a job script cannot carry -----------------------------------------------------------------
def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("args,named", [
    (["--set", "prompt_text=a\nrm -rf ~"], "--set 'prompt_text=a\\nrm -rf ~'"),  # an option carried to the tasks
    (["--sbatch-arg=--comment=a\x7fb"], "--sbatch-arg '--comment=a\\x7fb'"),
    (["--sbatch-arg=--time=1:00:00\n#SBATCH --x"], "--sbatch-arg '--time=1:00:00\\n#SBATCH --x'"),
])
def test_control_characters_are_refused_naming_the_value(manifest, tmp_path, args, named):
    out = tmp_path / "c"
    line = _one_error_line(_extract("--manifest", str(manifest), "--out", str(out), *TINY, "--submit", "slurm",
                                    "--array", "2", *args))
    assert named in line and "control character" in line
    assert not out.exists() and not job_folder(out).exists()  # refused before the store is made


def test_a_newline_in_out_is_refused_before_anything_is_made(manifest, tmp_path):
    out = tmp_path / "c\necho injected"
    line = _one_error_line(_extract("--manifest", str(manifest), "--out", str(out), *TINY, "--submit", "slurm",
                                    "--array", "2"))
    assert f"--out {str(out)!r}" in line and "control character '\\n'" in line
    assert not out.exists() and not job_folder(out).exists()


def test_job_script_refuses_a_newline_in_the_manifest_path(tmp_path):
    command = [sys.executable, "-m", "lare2.extract", "--manifest", str(tmp_path / "m\nx.parquet"), "--out", "c"]
    with pytest.raises(SubmitError, match=r"--manifest '.*m\\nx\.parquet': holds the control character"):
        job_script(out=tmp_path / "c", command=command, array="0", num_shards=1, throttle=None, sbatch_args=[],
                   gpus_per_task=0, logs=tmp_path / "logs")


def test_paths_in_comments_are_shown_as_repr_and_the_script_parses(manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "it's $(touch pwned) `x`" / "train"
    result = _extract("--manifest", str(manifest), "--out", str(out), *TINY, "--submit", "slurm", "--array", "2",
                      "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"# b % 2 == i) into {str(out)!r}. Written by" in result.output
    checked = subprocess.run(["bash", "-n"], input=result.output, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr
    assert _task_command(result.output)[3:7] == ["--manifest", str(manifest), "--out", str(out)]


def test_a_percent_in_the_cache_path_is_escaped_in_the_log_pattern(manifest, tmp_path):
    out = tmp_path / "50%A_done" / "train"
    result = _extract("--manifest", str(manifest), "--out", str(out), *TINY, "--submit", "slurm", "--array", "2",
                      "--dry-run")
    assert result.exit_code == 0, result.output
    # sbatch's filename patterns: "%%" is a literal %, so only the final %A_%a name the task's log
    assert f"#SBATCH --output={tmp_path}/50%%A_done/train.slurm/logs/%A_%a.out\n" in result.output


def test_a_backslash_in_the_cache_path_is_refused(manifest, tmp_path):
    out = tmp_path / "a\\b" / "train"
    line = _one_error_line(_extract("--manifest", str(manifest), "--out", str(out), *TINY, "--submit", "slurm",
                                    "--array", "2", "--dry-run"))
    assert "backslash" in line and "filename patterns" in line


@pytest.mark.parametrize("arg", ["--partition gpu", "time=1:00:00", "", "--time=1:00:00 --mem=4G"])
def test_each_sbatch_arg_is_one_option(manifest, tmp_path, arg):
    line = _one_error_line(_extract("--manifest", str(manifest), "--out", str(tmp_path / "c"), *TINY, "--submit",
                                    "slurm", "--array", "2", "--sbatch-arg", arg, "--dry-run"))
    assert f"--sbatch-arg {arg!r}" in line and "one option per --sbatch-arg" in line


@pytest.mark.parametrize("record,line_number,reason", [
    ('{"num_shards": 2}\nnot json\n\n', 2, "Expecting value"),
    ('{"job_id": "7"}\n', 1, "no num_shards field"),
    ("[1]\n", 1, "list indices"),
    ('{"num_shards": "two"}\n', 1, "invalid literal"),
    ('{"num_shards": 0}\n', 1, "num_shards 0 is not >= 1"),
])
def test_a_damaged_submit_record_is_named_with_its_line(manifest, tmp_path, record, line_number, reason):
    out = tmp_path / "c"
    assert _extract("--manifest", str(manifest), "--out", str(out), *TINY, "--create-only").exit_code == 0
    job_folder(out).mkdir()
    (job_folder(out) / "submissions.jsonl").write_text(record)
    line = _one_error_line(_extract("--manifest", str(manifest), "--out", str(out), *TINY, "--submit", "slurm",
                                    "--only-missing", "--dry-run"))
    assert f"submissions.jsonl:{line_number}: " in line and reason in line and "give --array N" in line


def test_the_submit_record_gives_the_shard_count(manifest, tmp_path):
    out = tmp_path / "c"
    assert _extract("--manifest", str(manifest), "--out", str(out), *TINY, "--create-only").exit_code == 0
    job_folder(out).mkdir()
    (job_folder(out) / "submissions.jsonl").write_text('not json\n{"num_shards": 3}\n')  # only the last line counts
    result = _extract("--manifest", str(manifest), "--out", str(out), *TINY, "--submit", "slurm", "--only-missing",
                      "--dry-run")
    assert result.exit_code == 0, result.output
    assert "#SBATCH --array=0-2\n" in result.output and "--num-shards 3" in result.output
