"""``lare2 extract ... --submit slurm --array N``: the whole array job from one command.

It creates the store once (as ``--create-only``: the tasks then never race to build it), writes a
readable job script into ``<cache>.slurm/`` beside the cache, and submits it with
``sbatch --parsable``. The script holds the exact extract command the user typed, with
``--shard-index auto --num-shards N`` (``lare2.extract.array_env``), and asks for
``--array``, ``--requeue``, per-task logs (``logs/%A_%a.out``, appended across requeues) and a
``USR1`` to its shell 120 s before the time limit. The shell runs the extraction in the background,
so it can pass that on: the extractor gets ``TERM`` (on which it writes its finished blocks and
exits ``EXIT_PREEMPTED``; a kill loses at most the blocks in flight, as the rerun guarantee says),
and the task requeues itself to finish its shard. Under ``accelerate launch`` the launcher passes
the ``TERM`` on to every rank; the script signals only its direct child, never the process group,
so DataLoader workers are not killed under the extractor. The traps are set before the extraction
starts, so a signal at any moment reaches it. The task requeues itself only after that
``USR1``, and only when the extraction asks for it (``requeue_rule``): exit ``EXIT_PREEMPTED``, or,
under ``accelerate launch`` (which exits 1 when its ranks stop, whatever their codes), a non-zero
exit while the cache still holds pending blocks of the task's shard. ``scontrol requeue`` alone holds
the task ~120 s (SLURM sets that start time once the task has ended, unless its start time then lies
ahead), so the script follows it with ``StartTime=now+2`` (``now`` would be overwritten; slurmd
refuses a relaunch in the same whole second as the kill). A task cancelled or preempted gets
``TERM`` from SLURM; ``--requeue`` lets SLURM bring a preempted one back. Every rerun skips the
blocks already done. ``--only-missing`` submits only the
shards that still hold pending blocks, as one array of those indices (``--array=1,4-6``).
``--dry-run`` prints the script and writes and submits nothing.

Every value the script carries is checked first: a control character (a newline above all) would end
a ``#`` comment or an ``#SBATCH`` line and run the rest as shell, so it is refused; each
``--sbatch-arg`` must be one option; ``%`` in the log folder is written ``%%`` (sbatch's filename
patterns read ``%`` as a replacement symbol), and a backslash there, which turns the patterns off, is refused.

Plain ``sbatch`` rather than submitit. submitit (what much ML code uses for SLURM arrays) pickles a
Python callable and its arguments into a folder that the nodes must share, and its job script runs
``python -m submitit.core._submit FOLDER``: what ran is a pickle, not a command one can read, copy,
edit or rerun by hand; a pickle also binds the job to the exact objects and versions that wrote it.
Its requeue-on-preemption (``checkpoint()``) and per-task logs are what this script does in a few
lines of shell (``--signal``, ``scontrol requeue``, ``%A_%a``), and the extractor's resume needs no
pickled state: the cache's done marks are the checkpoint. ``accelerate launch`` inside a task (one
process per GPU of the node) is one line here, and would be a subprocess inside submitit's callable.
So the script kept beside the cache is the command that ran, and ``sbatch`` it again works.
"""

from __future__ import annotations

import datetime
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

from lare2.shared.cli_errors import EXIT_PREEMPTED
from lare2.shared.errors import InputError

SIGNAL_BEFORE_LIMIT_S = 120
"""The task's shell gets USR1 this many seconds before the time limit: time to finish the block in flight."""
REQUEUE_START_DELAY_S = 2
"""A task that requeues itself may start again this many seconds later (not in the same whole second as its kill,
which slurmd refuses; SLURM would otherwise hold it ~120 s)."""
SUBMIT_FLAGS = {"array": "--array", "sbatch_arg": "--sbatch-arg", "gpus_per_task": "--gpus-per-task",
                "only_missing": "--only-missing", "dry_run": "--dry-run"}
"""``lare2 extract`` options that only mean something with ``--submit``."""
SUBMIT_ONLY_OPTIONS = {"submit", *SUBMIT_FLAGS, "shard_index", "num_shards", "create_only", "resume", "json_out",
                       "manifest", "out", "all_splits"}
"""``lare2 extract`` options not passed on to the tasks (``--manifest`` and ``--out`` go as absolute paths; the
tasks always resume)."""


class SubmitError(InputError):
    """The array cannot be submitted as asked: bad options, no sbatch, sbatch refused it, nothing extracted yet."""


@dataclass
class Submission:
    """What ``--submit slurm`` did."""

    cache: str
    num_shards: int
    shards: list[int]
    array: str
    """The ``--array=`` value submitted ("" when nothing was left to submit)."""
    script: str
    """The job script's path ("" for a dry run)."""
    text: str
    """The job script."""
    job_id: str = ""
    progress_command: str = ""


def job_folder(out: Path) -> Path:
    """Where the job scripts, the submit record and the task logs of the cache at ``out`` live: ``<out>.slurm``."""
    out = Path(out).absolute()
    return out.parent / f"{out.name}.slurm"


def parse_array(value: str) -> tuple[int, int | None]:
    """``--array N`` or ``N%K``: N shards, one task each, at most K at once -> (N, K or None)."""
    count, _, throttle = value.partition("%")
    try:
        numbers = int(count), int(throttle) if throttle else None
    except ValueError:
        raise SubmitError(f"--array {value!r}: expected the number of shards N (tasks 0..N-1), optionally N%K "
                          "to run at most K at once") from None
    if numbers[0] < 1 or (numbers[1] is not None and numbers[1] < 1):
        raise SubmitError(f"--array {value!r}: N and K must be >= 1")
    return numbers


def recorded_num_shards(out: Path) -> int | None:
    """The number of shards of the last submission for the cache at ``out`` (its submit record), if any."""
    record = job_folder(out) / "submissions.jsonl"
    if not record.is_file():
        return None
    lines = [(number, line) for number, line in enumerate(record.read_text(errors="replace").splitlines(), 1)
             if line.strip()]
    if not lines:
        return None
    number, line = lines[-1]
    try:
        num_shards = int(json.loads(line)["num_shards"])
    except (ValueError, TypeError, KeyError) as err:  # json.JSONDecodeError is a ValueError
        reason = "no num_shards field" if isinstance(err, KeyError) else " ".join(str(err).split())
        raise SubmitError(f"{record}:{number}: not a submit record ({reason}); give --array N, the number of "
                          "shards of the earlier submission") from None
    if num_shards < 1:
        raise SubmitError(f"{record}:{number}: num_shards {num_shards} is not >= 1; give --array N, the number of "
                          "shards of the earlier submission")
    return num_shards


def refuse_control_characters(what: str, value: str) -> None:
    """Refuse ``value`` (named ``what``) if it holds a control character: in the job script a newline would end a
    ``#`` comment or an ``#SBATCH`` line and run the rest as shell."""
    bad = next((char for char in value if ord(char) < 0x20 or ord(char) == 0x7F), None)
    if bad is not None:
        raise SubmitError(f"{what} {value!r}: holds the control character {bad!r}, which a job script cannot carry; "
                          "give it without control characters")


def check_sbatch_arg(arg: str) -> None:
    """One ``--sbatch-arg``: one sbatch option, its value joined by ``=``, no whitespace, no control character."""
    refuse_control_characters("--sbatch-arg", arg)
    if not arg.startswith("-") or any(char.isspace() for char in arg):
        raise SubmitError(f"--sbatch-arg {arg!r}: expected one sbatch option with its value joined by '=' and no "
                          "spaces; give one option per --sbatch-arg (--sbatch-arg=--time=12:00:00 "
                          "--sbatch-arg=--partition=gpu)")


def check_script_values(command: list[str], sbatch_args: list[str], logs: Path) -> None:
    """Refuse what a job script cannot carry safely: control characters in the task's command (the cache and
    manifest paths, the options given), the log folder or the working folder; malformed ``--sbatch-arg``s; a
    backslash in the log folder (it turns off sbatch's filename patterns, so ``%A_%a`` would not name the logs)."""
    for flag, word in zip(["", *command], command):
        refuse_control_characters(flag if flag.startswith("-") else "argument", word)
    refuse_control_characters("the log folder", str(logs))
    refuse_control_characters("the working folder", str(Path.cwd()))
    if "\\" in str(logs):
        raise SubmitError(f"{str(logs)!r}: a backslash in the log folder turns off sbatch's filename patterns "
                          "(%A_%a would not name the task logs); give --out a path without backslashes")
    for arg in sbatch_args:
        check_sbatch_arg(arg)


def given_options(ctx: typer.Context, leave_out: set[str] = SUBMIT_ONLY_OPTIONS) -> list[str]:
    """The options the user gave on the command line (not their defaults), as arguments again."""
    args: list[str] = []
    for param in ctx.command.params:
        if param.param_type_name != "option" or param.name in leave_out or not _given(ctx, param.name):
            continue
        value = ctx.params[param.name]
        flag = next(opt for opt in param.opts if opt.startswith("--"))
        if param.is_flag:
            if value or param.secondary_opts:
                args.append(flag if value else param.secondary_opts[0])
        elif param.multiple:
            args += [item for v in value for item in (flag, str(v))]
        elif value is not None:
            args += [flag, str(value)]
    return args


def extract_command(manifest: str, out: Path, options: list[str], num_shards: int, gpus_per_task: int) -> list[str]:
    """The extraction each task runs: this Python's ``lare2.extract`` (under ``accelerate launch`` with
    one process per GPU when ``gpus_per_task`` > 1), the user's options, ``--shard-index auto``."""
    python = Path(sys.executable)
    if gpus_per_task > 1:
        launcher = python.parent / "accelerate"
        start = ([str(launcher), "launch"] if launcher.exists() else [str(python), "-m", "accelerate.commands.launch"])
        start += ["--multi_gpu", "--num_processes", str(gpus_per_task)]
    else:
        start = [str(python)]
    return [*start, "-m", "lare2.extract", "--manifest", str(Path(manifest).absolute()), "--out", str(out),
            *options, "--num-shards", str(num_shards), "--shard-index", "auto"]


def shell_lines(command: list[str], indent: str = "    ") -> str:
    """A command quoted for bash, one option per line (``--name value``), joined with backslashes."""
    words = [shlex.quote(word) for word in command]
    lines, current = [], []
    for word in words:
        if word.startswith("--") and current:
            lines.append(" ".join(current))
            current = []
        current.append(word)
    lines.append(" ".join(current))
    return (" \\\n" + indent).join(lines)


def requeue_rule(out: Path, num_shards: int, launched: bool) -> str:
    """The job script's lines that decide, after the extraction has exited with ``$status``, whether a task
    stopped for its time limit (``$time_limit`` = 1) requeues itself (``$requeue`` = 1).

    Only ``EXIT_PREEMPTED`` means "stopped, resume me"; 0 means the shard is done and any other status
    from the extractor itself is a failure (requeueing would only repeat it). ``accelerate launch``
    (``launched``) exits 1 when its ranks stop, whatever their codes, so there the cache decides:
    ``lare2 cache progress --json`` lists the shards with pending blocks; the task's shard among them
    means the ranks stopped before finishing it."""
    python = shlex.quote(sys.executable)
    lines = ["# Requeue only a task stopped for its time limit (USR1) whose extraction asks for it: exit "
             f"{EXIT_PREEMPTED}", "# (EXIT_PREEMPTED: finished blocks written, \"stopped, resume me\"). "
             "0: the shard is done. Any other", "# status from the extractor itself is a failure: not requeued, "
             "the log says why."]
    if launched:
        progress = f"{python} -m lare2.cli cache progress {shlex.quote(str(out))} --num-shards {num_shards} --json"
        lines += ["# accelerate launch exits 1 when its ranks stop, whatever their codes: after USR1 a non-zero exit",
                  "# requeues when the cache still holds pending blocks of this task's shard (its done marks).",
                  "shard_pending() {",
                  f"    {progress} \\",
                  f"        | {python} -c 'import json, sys; sys.exit(int(sys.argv[1]) not in "
                  "json.load(sys.stdin)[\"missing_shards\"])' \"${SLURM_ARRAY_TASK_ID}\"",
                  "}"]
    lines += ["requeue=0",
              'if [ "$time_limit" = 1 ]; then',
              f'    if [ "$status" = {EXIT_PREEMPTED} ]; then',
              "        requeue=1"]
    if launched:
        lines += ['    elif [ "$status" != 0 ] && shard_pending; then',
                  '        echo "lare2: accelerate launch exited $status after USR1; shard ${SLURM_ARRAY_TASK_ID} '
                  'still has pending blocks"',
                  "        requeue=1"]
    lines += ['    elif [ "$status" != 0 ]; then',
              '        echo "lare2: the extraction failed (status $status) after USR1; not requeued (see above)"',
              "    fi",
              "fi"]
    return "\n".join(lines)


def job_script(*, out: Path, command: list[str], array: str, num_shards: int, throttle: int | None,
               sbatch_args: list[str], gpus_per_task: int, logs: Path) -> str:
    """The job script: ``#SBATCH`` lines, then the extraction run so that signals reach it (see the module doc).
    Refuses values it cannot carry safely (``check_script_values``)."""
    check_script_values(command, sbatch_args, logs)
    refuse_control_characters("--out", str(out))
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    log_pattern = str(logs).replace("%", "%%") + "/%A_%a.out"  # sbatch's filename patterns: "%%" is a literal %
    directives = [f"--job-name=lare2-extract-{out.name}", f"--array={array}" + (f"%{throttle}" if throttle else ""),
                  f"--output={log_pattern}", "--open-mode=append", "--requeue",
                  f"--signal=B:USR1@{SIGNAL_BEFORE_LIMIT_S}", f"--chdir={Path.cwd()}"]
    if gpus_per_task:
        directives.append(f"--gres=gpu:{gpus_per_task}")
    directives += sbatch_args
    sbatch_lines = "\n".join(f"#SBATCH {shlex.quote(d)}" for d in directives)
    return f"""#!/bin/bash
{sbatch_lines}
#
# lare2 extract as a SLURM array: task i extracts shard i of {num_shards} (the cache blocks b with
# b % {num_shards} == i) into {str(out)!r}. Written by `lare2 extract --submit slurm` on {made}.
# Every (re)run skips the blocks already done, so submitting this file again is safe: sbatch {{this file}}
# Progress: lare2 cache progress {shlex.quote(str(out))} --num-shards {num_shards}
#
# The extraction runs in the background so that this shell can pass signals on:
#   USR1 (from SLURM, {SIGNAL_BEFORE_LIMIT_S} s before the time limit): TERM to the extraction, which writes its
#        finished blocks and exits {EXIT_PREEMPTED}; then this task requeues itself to finish its shard
#        (the rule below).
#   TERM (scancel, preemption): passed on once; SLURM requeues a preempted task (--requeue).
# The traps are set before the extraction starts: a signal before that is passed on as soon as it runs.
# `scontrol requeue` alone holds a task ~120 s unless its start time lies ahead once it has ended: so it
# is followed by StartTime=now+{REQUEUE_START_DELAY_S} (slurmd refuses a relaunch in the same second as the kill).
set -u
run=$(( ${{SLURM_RESTART_COUNT:-0}} + 1 ))
echo "lare2: task ${{SLURM_ARRAY_TASK_ID}} of array ${{SLURM_ARRAY_JOB_ID}}, run $run, on $(hostname) at $(date -Is)"
time_limit=0
stop_asked=0
stopped=0
extraction=
stop_extraction() {{
    stop_asked=1
    if [ -n "${{extraction:-}}" ] && [ "$stopped" = 0 ]; then
        stopped=1
        kill -TERM "$extraction" 2>/dev/null
    fi
}}
trap 'time_limit=1; stop_extraction' USR1
trap 'stop_extraction' TERM

{shell_lines(command)} &
extraction=$!
[ "$stop_asked" = 0 ] || stop_extraction  # a signal came before $! was known: pass it on now
while :; do
    wait "$extraction"
    status=$?
    kill -0 "$extraction" 2>/dev/null || break  # a signal ends `wait` early: wait again
done
echo "lare2: extraction exited with status $status at $(date -Is)"
{requeue_rule(out, num_shards, launched=gpus_per_task > 1)}
if [ "$requeue" = 1 ]; then
    echo "lare2: stopped before the time limit; requeueing this task to finish its shard"
    trap '' TERM USR1  # the requeue kills this task: let scontrol finish
    task="${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
    scontrol requeue "$task" && scontrol update JobId="$task" StartTime=now+{REQUEUE_START_DELAY_S} \
        || echo "lare2: the requeue or its early restart failed (see above); a requeued task may wait ~120 s"
fi
exit "$status"
"""


def write_script(folder: Path, text: str) -> Path:
    """The job script as ``folder/extract-<UTC time>.sbatch`` (never overwriting an earlier one); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path, number = folder / f"extract-{stamp}.sbatch", 1
    while path.exists():
        number += 1
        path = folder / f"extract-{stamp}-{number}.sbatch"
    path.write_text(text)
    path.chmod(0o755)
    return path


def run_sbatch(script: Path) -> str:
    """Submit ``script`` with ``sbatch --parsable``; the job id."""
    try:
        done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise SubmitError(f"{script}: sbatch is not installed here; submit from a SLURM login node "
                          "(the script is written; --dry-run only prints it)") from None
    if done.returncode != 0:
        reason = " ".join((done.stderr or done.stdout).split()) or f"exit status {done.returncode}"
        raise SubmitError(f"{script}: sbatch refused it ({reason}); change the #SBATCH lines with --sbatch-arg, "
                          f"or edit the script and run sbatch {script}")
    return done.stdout.strip().split(";")[0]  # "jobid" or "jobid;cluster"


def pending_shards(out: Path, num_shards: int) -> list[int]:
    """Shards of the cache at ``out`` that still hold pending blocks (``--only-missing``)."""
    from lare2.shared.cache import FeatureCache
    from lare2.shared.cache.progress import missing_shards

    return missing_shards(FeatureCache.open(out).done_blocks(), num_shards)


def submit_slurm(ctx: typer.Context, cfg, *, array: str | None, sbatch_args: list[str], gpus_per_task: int,
                 dry_run: bool, only_missing: bool) -> Submission:
    """Create the store (unless ``dry_run``), write the job script for the shards to run, submit it.

    ``cfg``: the ``ExtractConfig`` of the command line. The shards: all of ``--array N``, or with
    ``only_missing`` those with pending blocks (N from ``--array`` or the last submission's record).
    """
    import dataclasses

    from lare2.shared.cache.progress import array_spec

    out = Path(cfg.out).absolute()
    refuse_control_characters("--out", str(cfg.out))
    recorded = recorded_num_shards(out) if array is None and only_missing else None
    if array is not None:
        num_shards, throttle = parse_array(array)
    elif recorded:
        num_shards, throttle = recorded, None
    else:
        raise SubmitError("--submit slurm: give --array N, the number of shards (one array task each)"
                          + ("" if not only_missing else f"; {job_folder(out)} records no earlier submission"))
    if only_missing and not (out / "zarr.json").exists():
        raise SubmitError(f"{out}: no cache there yet, so no shard is known to be missing; submit the whole array "
                          "(drop --only-missing)")
    folder = job_folder(out)
    command = extract_command(cfg.manifest, out, given_options(ctx), num_shards, gpus_per_task)
    check_script_values(command, list(sbatch_args), folder / "logs")  # before the store is made
    if not dry_run:  # once, before the tasks: they then never race to build the store
        from lare2.extract.run import run_extraction

        run_extraction(dataclasses.replace(cfg, num_shards=num_shards, shard_index=0), create_only=True)
    shards = pending_shards(out, num_shards) if only_missing else list(range(num_shards))
    progress_command = f"lare2 cache progress {shlex.quote(str(out))} --num-shards {num_shards}"
    submission = Submission(cache=str(out), num_shards=num_shards, shards=shards, array=array_spec(shards),
                            script="", text="", progress_command=progress_command)
    if not shards:
        return submission
    submission.text = job_script(out=out, command=command, array=submission.array, num_shards=num_shards,
                                 throttle=throttle, sbatch_args=list(sbatch_args), gpus_per_task=gpus_per_task,
                                 logs=folder / "logs")
    if dry_run:
        return submission
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    script = write_script(folder, submission.text)
    submission.script, submission.job_id = str(script), run_sbatch(script)
    record = {"job_id": submission.job_id, "array": submission.array, "num_shards": num_shards,
              "script": str(script), "submitted": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    with open(folder / "submissions.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return submission


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (typer bundles its own click: its enums are compared by name)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def refuse_submit_options(ctx: typer.Context) -> None:
    """``--array``, ``--dry-run`` and the like without ``--submit``: refused rather than silently ignored."""
    given = [flag for name, flag in SUBMIT_FLAGS.items() if _given(ctx, name)]
    if given:
        raise SubmitError(f"{', '.join(given)}: only with --submit slurm (submit an array job); drop "
                          f"{'it' if len(given) == 1 else 'them'} to extract here")


def submit_from_cli(ctx: typer.Context, cfg, *, scheduler: str, array: str | None, sbatch_args: list[str],
                    gpus_per_task: int, only_missing: bool, dry_run: bool, all_splits: bool, json_out: bool) -> None:
    """``lare2 extract ... --submit slurm``: check the options, submit, and say what was done."""
    import dataclasses

    from lare2.shared.cli_errors import user_errors

    with user_errors():
        if scheduler != "slurm":
            raise SubmitError(f"--submit {scheduler!r}: the one scheduler supported is slurm")
        if all_splits:
            raise SubmitError("--submit with --all-splits: submit one array per split (--split SPLIT)")
        clashing = [flag for name, flag in (("shard_index", "--shard-index"), ("num_shards", "--num-shards"),
                                            ("create_only", "--create-only")) if _given(ctx, name)]
        if clashing:
            raise SubmitError(f"{', '.join(clashing)} with --submit: the job script creates the cache first and gives "
                              "each task --shard-index auto --num-shards N (N from --array); drop them")
        submission = submit_slurm(ctx, cfg, array=array, sbatch_args=sbatch_args, gpus_per_task=gpus_per_task,
                                  dry_run=dry_run, only_missing=only_missing)
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json(dataclasses.asdict(submission))
    elif not submission.shards:
        typer.echo(f"{submission.cache}: every block is done; nothing to submit")
    elif dry_run:
        typer.echo(submission.text, nl=False)
    else:
        typer.echo(f"submitted array job {submission.job_id}: --array={submission.array} of {submission.num_shards} "
                   f"shards, cache {submission.cache}")
        typer.echo(f"job script: {submission.script}")
        typer.echo(f"task logs: {job_folder(Path(submission.cache)) / 'logs'}/{submission.job_id}_<task>.out")
        typer.echo(f"progress: {submission.progress_command}")
