"""``--shard-index auto`` / ``--num-shards auto``: the shard of an array task from its scheduler's variables."""

from __future__ import annotations

import pytest

from lare2.extract.array_env import ArrayTaskError, array_task, resolve_shards, shard_settings
from lare2.shared.errors import UserError

SLURM_0_TO_3 = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_MAX": "3"}
SLURM_3_AND_7 = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "3",
                 "SLURM_ARRAY_TASK_MAX": "7"}  # sbatch --array=3,7: the shards left after a failure


@pytest.mark.parametrize("env,options,expected", [
    (SLURM_0_TO_3, ("auto", "auto"), (2, 4)),
    (SLURM_0_TO_3, ("auto", None), (2, 4)),  # the count comes with the index
    (SLURM_0_TO_3, ("auto", "8"), (2, 8)),  # an array of the first 4 of 8 shards
    (SLURM_0_TO_3, ("2", "4"), (2, 4)),  # a number that agrees
    (SLURM_3_AND_7, ("auto", "8"), (7, 8)),  # the task id IS the shard index
    ({"JOB_COMPLETION_INDEX": "5"}, ("auto", "6"), (5, 6)),
    ({"AWS_BATCH_JOB_ARRAY_INDEX": "1", "AWS_BATCH_JOB_ARRAY_SIZE": "3"}, ("AUTO", "auto"), (1, 3)),
    ({"SLURM_ARRAY_TASK_ID": "1", "JOB_COMPLETION_INDEX": "1"}, ("auto", "2"), (1, 2)),  # two that agree
    ({}, ("1", "3"), (1, 3)),  # plain numbers outside an array
    ({}, (None, None), (None, None)),  # nothing given: the config's defaults
])
def test_resolves_the_shard(env, options, expected):
    assert resolve_shards(*options, env=env) == expected


def test_num_shards_auto_takes_the_submit_record_when_the_array_does_not_say():
    assert resolve_shards("auto", "auto", env=SLURM_3_AND_7, recorded_num_shards=8) == (7, 8)
    assert resolve_shards("auto", "auto", env={"JOB_COMPLETION_INDEX": "0"}, recorded_num_shards=2) == (0, 2)


@pytest.mark.parametrize("env,options,words", [
    ({}, ("auto", "4"), ["no array task", "SLURM_ARRAY_TASK_ID", "--shard-index N"]),
    ({}, ("0", "auto"), ["no array task"]),
    (SLURM_3_AND_7, ("auto", "auto"), ["does not say how many shards", "SLURM_ARRAY_TASK_MIN=3", "--num-shards N"]),
    ({"JOB_COMPLETION_INDEX": "3"}, ("auto", "auto"), ["Kubernetes", "--num-shards N"]),
    (SLURM_0_TO_3, ("0", "4"), ["--shard-index 0", "array task 2", "--shard-index auto"]),
    (SLURM_0_TO_3, ("auto", "2"), ["has 4 tasks", "--num-shards 4"]),
    (SLURM_3_AND_7, ("auto", "5"), ["shard index 7", "SLURM_ARRAY_TASK_ID=7", "below --num-shards 5"]),
    ({"SLURM_ARRAY_TASK_ID": "1", "AWS_BATCH_JOB_ARRAY_INDEX": "2"}, ("auto", "4"), ["disagree",
                                                                                      "AWS_BATCH_JOB_ARRAY_INDEX=2"]),
    ({"SLURM_ARRAY_TASK_ID": "x"}, ("auto", "4"), ["SLURM_ARRAY_TASK_ID='x'", "whole number"]),
    ({}, ("first", "4"), ["--shard-index 'first'", "auto"]),
])
def test_refuses_with_one_clear_error(env, options, words):
    with pytest.raises(ArrayTaskError) as caught:
        resolve_shards(*options, env=env)
    assert isinstance(caught.value, UserError)  # one line on the command line, exit 2
    for word in words:
        assert word in str(caught.value)


def test_a_slurm_array_says_its_count_only_when_it_runs_every_shard():
    assert array_task(SLURM_0_TO_3).count == 4
    assert array_task(SLURM_3_AND_7).count is None
    assert array_task({**SLURM_0_TO_3, "SLURM_ARRAY_TASK_MIN": "1"}).count is None  # --array=1-4
    assert array_task({"SLURM_ARRAY_TASK_ID": "0"}).count is None  # an old SLURM without the count
    assert array_task({"SLURM_JOB_ID": "17"}) is None  # a plain job is no array task


def test_shard_settings_reads_the_submit_record_beside_the_cache(tmp_path):
    out = tmp_path / "cache" / "train"
    assert shard_settings(None, None, out=out, env={}) == {}
    assert shard_settings("auto", "3", out=out, env=SLURM_3_AND_7 | {"SLURM_ARRAY_TASK_ID": "2"}) == {
        "shard_index": 2, "num_shards": 3}
    with pytest.raises(ArrayTaskError):
        shard_settings("auto", "auto", out=out, env=SLURM_3_AND_7)  # no record yet
    record = tmp_path / "cache" / "train.slurm" / "submissions.jsonl"
    record.parent.mkdir(parents=True)
    record.write_text('{"job_id": "5", "num_shards": 4}\n{"job_id": "9", "num_shards": 9}\n')
    assert shard_settings("auto", "auto", out=out, env=SLURM_3_AND_7) == {"shard_index": 7, "num_shards": 9}
