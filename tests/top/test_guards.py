"""Every command that reads splits guards them: ``calibrate --val`` refuses a test-split cache and the run's own
training samples as ``train`` does (``--allow-overlap`` to mean it); a refusal for another extraction, in
``train``, ``eval`` and ``calibrate``, names each setting that differs with both values."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from lare2.shared.cache import CacheLayout
from tests.helpers.caches import write_synthetic_cache
from tests.helpers.cli_results import error_line as one_error_line
from tests.helpers.cli_results import invoke

LAYOUT = CacheLayout(pooled_dim=16, fmap_shape=(16, 7, 7), lare_shape=(4, 16, 16), chunk_samples=16)
SYNTHETIC_IDENTITY = {"synthetic": True, "pattern_seed": 1234}  # write_synthetic_cache's default


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    return one_error_line(result)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A run trained on ``train`` (64 samples) and selected on ``val``; a copy of val relabelled as the test
    split; a cache holding 32 of the training samples; one extracted at another timestep."""
    root = tmp_path_factory.mktemp("guards")
    write_synthetic_cache(root / "train", num_samples=64, signal="lare", seed=1, layout=LAYOUT)
    write_synthetic_cache(root / "val", num_samples=48, signal="lare", seed=2, layout=LAYOUT)
    write_synthetic_cache(root / "part", num_samples=32, signal="lare", seed=1, layout=LAYOUT)  # ids s1-0..31
    write_synthetic_cache(root / "t100", num_samples=48, signal="lare", seed=3, layout=LAYOUT,
                          identity={**SYNTHETIC_IDENTITY, "timestep": 100})
    shutil.copytree(root / "val", root / "testsplit")
    zarr.open_group(root / "testsplit", mode="r+")["meta/split"][:] = np.array(["test"] * 48,
                                                                                dtype=np.dtypes.StringDType())
    result = invoke("train", "--preset", "debug", "--train", root / "train", "--val", root / "val", "--out",
                    root / "run", "--epochs", "1", "--set", "progress=false", "--set", "head_dim=8")
    assert result.exit_code == 0, result.output
    return root


def threshold(run) -> float:
    return json.loads((run / "config.json").read_text())["threshold"]


# ---- calibrate --val: the splits' guard -----------------------------------------------------------
def test_calibrate_refuses_a_test_split_cache(world):
    before = threshold(world / "run")
    line = error_line(invoke("calibrate", world / "run", "--val", world / "testsplit"))
    assert f"{world / 'testsplit'}: the calibration cache holds 48 samples of the test split" in line
    assert "extract --split val" in line and "--allow-overlap" in line
    assert threshold(world / "run") == before  # nothing written


def test_calibrate_refuses_the_runs_training_samples(world, tmp_path):
    line = error_line(invoke("calibrate", world / "run", "--val", world / "train"))
    assert f"{world / 'train'}: the calibration cache is the run's training cache (same sample ids)" in line
    line = error_line(invoke("calibrate", world / "run", "--val", world / "part"))
    assert f"shares 32 sample ids with the run's training cache {world / 'train'}" in line

    run = shutil.copytree(world / "run", tmp_path / "run")  # --allow-overlap rewrites the threshold
    result = invoke("calibrate", run, "--val", world / "train", "--allow-overlap", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["threshold"] == threshold(run)
    assert json.loads((run / "config.json").read_text())["val_cache"] == str(world / "train")


def test_calibrate_accepts_a_validation_cache_of_its_own(world, tmp_path):
    run = shutil.copytree(world / "run", tmp_path / "run")
    assert invoke("calibrate", run, "--val", world / "val").exit_code == 0


# ---- another extraction: the refusal names the settings -------------------------------------------
def test_train_names_the_setting_that_differs_between_train_and_val(world, tmp_path):
    line = error_line(invoke("train", "--preset", "debug", "--train", world / "train", "--val", world / "t100",
                             "--out", tmp_path / "r", "--epochs", "1"))
    assert f"{world / 't100'}: extraction fingerprint differs from {world / 'train'}'s (timestep: val has 100, " \
           "train none)" in line


@pytest.mark.parametrize("command", ["eval", "calibrate"])
def test_eval_and_calibrate_name_the_setting_that_differs_from_the_run(world, command, tmp_path):
    argv = ["--test", world / "t100", "--report", tmp_path / "r"] if command == "eval" else ["--val", world / "t100"]
    line = error_line(invoke(command, world / "run", *argv))
    assert f"{world / 't100'}: extraction fingerprint differs from the detector's (timestep: the cache has 100, " \
           "the run none)" in line


def test_a_run_without_a_recorded_identity_rebuilds_it_from_its_extraction_config():
    """Runs written before the identity was recorded: rebuilt from the extraction config and model
    fingerprints, and trusted only when that gives back the run's fingerprint."""
    from lare2.shared.config import debug, identity_fingerprint
    from lare2.train.checkpoint import DetectorConfig, identity_differences, run_identity
    from lare2.train.models import ModelConfig

    extraction, fingerprints = debug(), {"sd": "abc", "backbone": "def"}
    identity = extraction.identity(fingerprints)
    model = ModelConfig(kind="linear", pooled_dim=16, fmap_shape=(16, 7, 7), lare_shape=(4, 16, 16))
    old = DetectorConfig(model=model, extraction_fingerprint=identity_fingerprint(identity), extraction=extraction,
                         extra={"model_fingerprints": fingerprints})
    assert run_identity(old) == identity
    assert run_identity(DetectorConfig(model=model, extraction_fingerprint="0" * 16, extraction=extraction)) is None
    other = {**identity, "ensemble": 8, "perturb": "jpeg:50"}  # a test perturbation is no difference
    assert identity_differences(other, identity, ("the cache", "the run")) == "ensemble: the cache has 8, the run 4"
