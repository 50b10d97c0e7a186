"""The LaRE separation study: AUC on planted scores, refusal of the test pool, a tiny run on the committed zoo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lare2.minigenimage.study import StudyConfig, StudySampler, main, run_study, separation_auc
from lare2.minigenimage.zoo import ZOO_DIR
from lare2.shared.errors import InputError


def test_separation_auc_counts_fakes_below_reals() -> None:
    assert separation_auc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0  # every fake reconstructs better
    assert separation_auc(np.array([0.3, 0.4]), np.array([0.1, 0.2])) == 0.0
    # pairs (fake < real): 0.1<0.2, 0.1<0.4, 0.3<0.4 hold, 0.3<0.2 does not -> 3 of 4
    assert separation_auc(np.array([0.1, 0.3]), np.array([0.2, 0.4])) == 0.75
    assert separation_auc(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.5  # ties count half


@pytest.mark.parametrize("split", ["test", "train"])
def test_refuses_every_split_but_val(split: str) -> None:
    with pytest.raises(InputError, match=f"split='{split}'.*validation data only"):
        StudyConfig(split=split)


def test_command_line_refuses_the_test_pool_in_one_line(capsys, tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(["--split", "test", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: split='test'") and "'test' pool" in err and "\n" not in err
    assert not out.exists()


def test_tiny_run_writes_one_row_per_setting(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    cfg = StudyConfig(count=2, timesteps=[50], draws=[1, 2], ddim_steps=2, eta=1.0, out=str(out))
    rows = run_study(cfg)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == rows and [(r["timestep"], r["draws"]) for r in rows] == [(50, 1), (50, 2)]
    for row in rows:
        assert row["auc"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 2 x 2 pairs
        assert row["mean_lare_fake"] > 0 and row["mean_lare_real"] > 0
        assert row["unet_steps"] == 6000 and row["unet_width"] == 32  # the committed ldm-a's recipe


def test_ancestral_sampler_is_seeded_per_image() -> None:
    ancestral = StudySampler(ZOO_DIR / "ldm-a", steps=2, eta=1.0)
    pair = ancestral([11, 12], [0, 1])
    assert np.array_equal(ancestral([11, 12], [0, 1]), pair)
    alone = ancestral([11], [0])[0].astype(int)
    assert np.abs(alone - pair[0]).max() <= 1  # the step noise is the image's own, not its batch's (rounding aside)
    deterministic = StudySampler(ZOO_DIR / "ldm-a", steps=2, eta=0.0)([11], [0])[0].astype(int)
    assert np.abs(deterministic - alone).mean() > 1  # eta 1 draws noise at each step
