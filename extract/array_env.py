"""``--shard-index auto`` / ``--num-shards auto``: an array task's shard from its scheduler's variables.

An array job runs one task per shard (``block % num_shards == shard_index``, ``lare2.extract.run``).
The task's index comes from the first of these that is set:

- SLURM (``sbatch --array``): ``SLURM_ARRAY_TASK_ID`` is the shard index. The number of shards is
  ``SLURM_ARRAY_TASK_COUNT`` only when the array is ``0..COUNT-1`` (``SLURM_ARRAY_TASK_MIN`` = 0,
  ``SLURM_ARRAY_TASK_MAX`` = COUNT - 1). An array such as ``--array=3,7`` (the shards left after a
  failure) has COUNT 2 but says nothing of how many shards the cache has: that number must come from
  ``--num-shards N`` (which ``lare2 extract --submit slurm`` always writes) or the submit record.
- A Kubernetes Indexed Job: ``JOB_COMPLETION_INDEX``; the count from ``--num-shards``.
- AWS Batch array jobs: ``AWS_BATCH_JOB_ARRAY_INDEX``; the count from ``AWS_BATCH_JOB_ARRAY_SIZE``
  when the job sets it, else ``--num-shards``.

An index given as a number must agree with the scheduler's when there is one, and an index must lie
in ``[0, num_shards)``: a task that would extract another task's shard, or none, is refused with one
:class:`ArrayTaskError` naming the variables and the remedy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from lare2.shared.errors import InputError

AUTO = "auto"
INDEX_VARIABLES = {"SLURM": "SLURM_ARRAY_TASK_ID", "Kubernetes": "JOB_COMPLETION_INDEX",
                   "AWS Batch": "AWS_BATCH_JOB_ARRAY_INDEX"}
"""Scheduler -> the variable holding an array task's index, in the order they are consulted."""


class ArrayTaskError(InputError):
    """The shard of this task cannot be told: no array variable, variables that disagree, or an index out of range."""


@dataclass(frozen=True)
class ArrayTask:
    """What the environment says about this array task."""

    scheduler: str
    index: int
    count: int | None
    """Tasks of an array that runs every shard ``0..count-1``; None when the variables do not say."""
    variables: str
    """The variables read, as ``NAME=value`` pairs, for messages."""


def _integer(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ArrayTaskError(f"{name}={value!r}: expected a whole number (set by the scheduler)") from None
    if number < 0:
        raise ArrayTaskError(f"{name}={value}: expected a number >= 0")
    return number


def _slurm(env: Mapping[str, str]) -> ArrayTask | None:
    index = _integer(env, "SLURM_ARRAY_TASK_ID")
    if index is None:
        return None
    count, low, high = (_integer(env, f"SLURM_ARRAY_TASK_{key}") for key in ("COUNT", "MIN", "MAX"))
    whole = count is not None and low == 0 and high == count - 1  # 0..COUNT-1: every shard is a task
    shown = [f"{name}={env[name]}" for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
                                                 "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX") if name in env]
    return ArrayTask("SLURM", index, count if whole else None, ", ".join(shown))


def _kubernetes(env: Mapping[str, str]) -> ArrayTask | None:
    index = _integer(env, "JOB_COMPLETION_INDEX")
    return None if index is None else ArrayTask("Kubernetes", index, None, f"JOB_COMPLETION_INDEX={index}")


def _aws_batch(env: Mapping[str, str]) -> ArrayTask | None:
    index = _integer(env, "AWS_BATCH_JOB_ARRAY_INDEX")
    if index is None:
        return None
    size = _integer(env, "AWS_BATCH_JOB_ARRAY_SIZE")
    shown = f"AWS_BATCH_JOB_ARRAY_INDEX={index}" + (f", AWS_BATCH_JOB_ARRAY_SIZE={size}" if size is not None else "")
    return ArrayTask("AWS Batch", index, size, shown)


def array_task(env: Mapping[str, str] | None = None) -> ArrayTask | None:
    """This process's array task, or None outside an array; refuses schedulers whose indices disagree."""
    env = os.environ if env is None else env
    tasks = [task for task in (_slurm(env), _kubernetes(env), _aws_batch(env)) if task is not None]
    if len({task.index for task in tasks}) > 1:
        raise ArrayTaskError(f"the array variables disagree ({'; '.join(task.variables for task in tasks)}); "
                             "unset the stale ones, or pass --shard-index N")
    return tasks[0] if tasks else None


def parse_shard_option(value: str | None, flag: str) -> int | str | None:
    """``--shard-index`` / ``--num-shards`` as typed: None (not given), ``auto``, or a whole number."""
    if value is None:
        return None
    text = value.strip().lower()
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise ArrayTaskError(f"{flag} {value!r}: expected a whole number or 'auto' "
                             "(from the array job's variables)") from None


def resolve_shards(shard_index: str | None, num_shards: str | None, *, recorded_num_shards: int | None = None,
                   env: Mapping[str, str] | None = None) -> tuple[int | None, int | None]:
    """(shard index, number of shards) from the options and the environment; None where neither says.

    ``recorded_num_shards``: the number of shards of the last submission of this cache (the submit
    record), used by ``--num-shards auto`` when the array's variables do not say it.
    """
    index_opt = parse_shard_option(shard_index, "--shard-index")
    count_opt = parse_shard_option(num_shards, "--num-shards")
    task = array_task(env)
    if index_opt == AUTO and count_opt is None:  # an index alone cannot be checked: the count comes with it
        count_opt = AUTO
    if index_opt == AUTO or count_opt == AUTO:
        if task is None:
            names = ", ".join(INDEX_VARIABLES.values())
            raise ArrayTaskError(f"--shard-index/--num-shards auto: no array task here (none of {names} is set); "
                                 "run inside an array job, or pass --shard-index N --num-shards N")
    if index_opt == AUTO:
        index_opt = task.index
    elif index_opt is not None and task is not None and index_opt != task.index:
        raise ArrayTaskError(f"--shard-index {index_opt}, but this is array task {task.index} ({task.variables}); "
                             "pass --shard-index auto so that every task takes its own shard")
    if count_opt == AUTO:
        count_opt = task.count if task.count is not None else recorded_num_shards
        if count_opt is None:
            raise ArrayTaskError(f"--num-shards auto: the {task.scheduler} array ({task.variables}) does not say how "
                                 "many shards the cache has (its tasks are not 0..COUNT-1); pass --num-shards N")
    elif count_opt is not None and task is not None and task.count is not None and task.count > count_opt:
        raise ArrayTaskError(f"--num-shards {count_opt}, but the {task.scheduler} array has {task.count} tasks "
                             f"({task.variables}): tasks {count_opt}.. would have no shard; "
                             f"pass --num-shards {task.count}")
    if index_opt is not None and count_opt is not None and index_opt >= count_opt:
        where = f" ({task.variables})" if task is not None else ""
        raise ArrayTaskError(f"shard index {index_opt}{where} is not below --num-shards {count_opt}; the array's task "
                             f"ids must be shard indices in [0, {count_opt})")
    return index_opt, count_opt


def shard_settings(shard_index: str | None, num_shards: str | None, *, out: Path,
                   env: Mapping[str, str] | None = None) -> dict[str, int]:
    """The ``ExtractConfig`` fields ``shard_index`` / ``num_shards`` for the options as typed (``auto`` resolved);
    only those that were given. ``out``: the cache, whose submit record ``--num-shards auto`` may read."""
    recorded = None
    if AUTO in {(value or "").strip().lower() for value in (shard_index, num_shards)}:
        from lare2.extract.submit import recorded_num_shards

        recorded = recorded_num_shards(out)
    index, count = resolve_shards(shard_index, num_shards, recorded_num_shards=recorded, env=env)
    return {key: value for key, value in (("shard_index", index), ("num_shards", count)) if value is not None}
