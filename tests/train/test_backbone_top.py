"""``lare2 train --train-backbone-top`` (docs/method.md §2.4): the tower's layer4 + attention pool as part of
the detector.

Caches are made by real extraction with the debug preset (tiny SD, the seeded ``tiny`` tower), so
they record a real backbone fingerprint.
"""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lare2.shared.cache import FeatureCache
from lare2.shared.clip_blocks import TOP_PREFIXES, BackboneTop, tiny_config
from lare2.shared.clip_weights import build_backbone, load_tower
from lare2.shared.config import debug
from tests.helpers.bad_images import good_rgb

pytestmark = pytest.mark.slow
COUNTS = {"train": 12, "val": 6, "test": 4}
TOP_LR_SCALE = 0.1


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> Path:
    """train / val / test caches of GenImage-style images, extracted with the debug preset (backbone ``tiny``)."""
    from lare2.extract.run import run_extraction
    from lare2.extract.tiny_models import save_tiny_sd
    from lare2.shared.manifest import build_folders, write_built

    root = tmp_path_factory.mktemp("top")
    sd = save_tiny_sd(root / "tiny-sd", seed=0)
    for split, count in COUNTS.items():
        for i in range(count):
            folder = root / "images/gen-x" / split / ("0_real" if i % 2 == 0 else "1_fake")
            folder.mkdir(parents=True, exist_ok=True)
            seed = zlib.crc32(f"{split}/{i}".encode()) % 1000
            (folder / f"{i % 5 + 1}_{split}_{i}.png").write_bytes(good_rgb(seed=seed, size=(32 + i, 40)))
    manifest = write_built(root / "manifest.parquet", build_folders(root / "images", progress=False))
    for split in COUNTS:
        run_extraction(debug(manifest=str(manifest), out=str(root / "cache" / split), split=split, sd=str(sd),
                             device="cpu", chunk_samples=4, ensemble=2))
    return root


def train_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "debug", "--model", "egre", "--train", str(root / "cache/train"), "--val",
            str(root / "cache/val"), "--out", str(out), "--epochs", "2", "--batch-size", "4", "--set", "progress=false",
            "--set", "head_dim=8", *extra]


@pytest.fixture(scope="module")
def run(caches) -> Path:
    from lare2.train.cli import main

    out = caches / "run-top"
    assert main(train_argv(caches, out, "--train-backbone-top")) == 0
    return out


def test_an_unstepped_top_recomputes_the_cached_pooled(caches) -> None:
    from lare2.train.backbone_top import load_top_weights
    from lare2.train.config import debug as train_debug
    from lare2.train.data import CacheSplit
    from lare2.train.models import build_model
    from lare2.train.trainer import model_config_for

    cfg = train_debug(train=str(caches / "cache/train"), train_backbone_top=True, head_dim=8)
    probe = CacheSplit(cfg.train, ())
    top = load_top_weights(cfg.clip, probe.cache.attrs, cfg.train)  # what run_training does before any step
    model = build_model(model_config_for(cfg, probe, top))
    model.backbone_top.load_state_dict(top.state)
    assert type(model).input_names == ("fmap", "lare")  # the cached pooled is not even read

    arrays = FeatureCache.open(caches / "cache/train").read(slice(None))
    assert arrays["fmap"].dtype == np.float16
    fmap, cached = torch.from_numpy(arrays["fmap"]), torch.from_numpy(arrays["pooled"].astype(np.float32))
    for mode in (True, False):  # BatchNorm statistics stay the tower's in training mode too
        model.train(mode)
        with torch.no_grad():
            recomputed = model.backbone_top(fmap)  # float16 in, cast to float32 inside
        assert recomputed.dtype == torch.float32
        # the cached pooled is the tower's float32 output rounded to float16, computed from the unrounded fmap:
        # they agree to about one float16 step (2**-10 relative) of the largest value
        scale = float(cached.abs().max())
        torch.testing.assert_close(recomputed, cached, rtol=2**-10, atol=scale * 2**-9)

    # exact on the tower's own float32 layer3 output: the top is the same function with the same weights
    tower, _ = load_tower("tiny")
    with torch.no_grad():
        out = tower.eval()(torch.randn(3, 3, 224, 224))
        torch.testing.assert_close(model.backbone_top(out.fmap), out.pooled, rtol=1e-6, atol=1e-6)


def test_training_moves_top_and_head_at_their_two_rates(caches, run) -> None:
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["train_backbone_top"] is True
    assert (config["model"]["backbone_top_depth"], config["model"]["backbone_top_heads"]) == (1, 4)  # tiny_config
    assert config["train"]["train_backbone_top"] is True and config["train"]["backbone_top_lr_scale"] == TOP_LR_SCALE

    state = torch.load(run / "resume.pt", map_location="cpu", weights_only=True)
    lr = config["train"]["lr"]
    groups = state["optimizer"]["param_groups"]
    assert [(g["name"], g["lr"]) for g in groups] == [("head", lr), ("backbone_top", pytest.approx(lr * TOP_LR_SCALE))]
    from lare2.train.models import ModelConfig, build_model

    model = build_model(ModelConfig.from_dict(config["model"]))
    top_params = [p for n, p in model.named_parameters() if n.startswith("backbone_top.")]
    assert len(groups[1]["params"]) == len(top_params) > 0
    assert len(groups[0]["params"]) == sum(p.requires_grad for p in model.parameters()) - len(top_params)

    saved = load_file(str(run / "model.safetensors"))
    tower_state = load_tower("tiny")[0].state_dict()
    top_keys = sorted(k for k in saved if k.startswith("backbone_top."))
    assert top_keys == sorted(f"backbone_top.{k}" for k in tower_state if k.startswith(TOP_PREFIXES))
    steps = state["step"]
    moved = {k: (saved[k] - tower_state[k.removeprefix("backbone_top.")]).abs().max().item() for k in top_keys}
    trained = [k for k in top_keys if k.endswith(("weight", "bias", "positional_embedding"))]
    assert max(moved[k] for k in trained) > 0  # the top learned
    # Adam moves each weight by about lr per step at most: the top at a tenth of the head's rate
    assert max(moved[k] for k in trained) <= 3.2 * steps * lr * TOP_LR_SCALE
    assert all(moved[k] == 0 for k in top_keys if "running_" in k)  # BatchNorm statistics frozen
    torch.manual_seed(config["train"]["seed"])  # the head's initial weights, as run_training drew them
    from lare2.train.models import EGREClassifier

    head_config = ModelConfig.from_dict({**config["model"], "train_backbone_top": False})
    initial = EGREClassifier(head_config).state_dict()
    assert (saved["fc.weight"] - initial["fc.weight"]).abs().max() > steps * lr * TOP_LR_SCALE * 3.2


def test_a_top_run_scores_new_images_as_eval_scores_their_cache(caches, run, tmp_path) -> None:
    import pyarrow.parquet as pq

    from lare2.cli import app
    from lare2.train.checkpoint import load_detector

    model, _ = load_detector(run)
    assert isinstance(model.backbone_top, BackboneTop)  # rebuilt from the run's config and weights

    out = tmp_path / "rows.csv"
    result = CliRunner().invoke(app, ["score", str(run), str(caches / "images/gen-x/test"), "--device", "cpu",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as f:
        scored = {Path(r["path"]).name: float(r["p_fake"]) for r in csv.DictReader(f)}
    result = CliRunner().invoke(app, ["eval", str(run), "--test", str(caches / "cache/test"), "--report",
                                      str(tmp_path / "report"), "--device", "cpu", "--no-plots"])
    assert result.exit_code == 0, result.output
    predictions = pq.read_table(tmp_path / "report/predictions.parquet").to_pydict()
    evaluated = {Path(p).name: s for p, s in zip(predictions["path"], predictions["p_fake"])}
    assert sorted(scored) == sorted(evaluated) and len(scored) == COUNTS["test"]
    for name, p in scored.items():
        assert p == pytest.approx(evaluated[name], abs=1e-5), name

    # and neither path read the frozen pooled: replacing it changes nothing
    from lare2.train.scoring import score_features

    arrays = FeatureCache.open(caches / "cache/test").read(slice(None))
    with_pooled = score_features(model, arrays["pooled"], arrays["fmap"], arrays["lare"])
    without = score_features(model, None, arrays["fmap"], arrays["lare"])
    torch.testing.assert_close(with_pooled, without, rtol=0, atol=0)


def test_other_backbone_weights_are_refused(caches, tmp_path, capsys) -> None:
    from lare2.train.cli import main

    other = build_backbone(tiny_config(), seed=1)  # same config, another seed
    torch.save({f"visual.{k}": v for k, v in other.state_dict().items()}, tmp_path / "tiny-seed1.pt")
    recorded = FeatureCache.open(caches / "cache/train").attrs["fingerprints"]["backbone"]
    for clip in ("small", str(tmp_path / "tiny-seed1.pt")):
        fingerprint = load_tower(clip)[1]
        assert main(train_argv(caches, tmp_path / "run", "--train-backbone-top", "--clip", clip)) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: --clip {clip}: its fingerprint {fingerprint} differs from {recorded}, "
                               f"the backbone fingerprint {caches / 'cache/train'} records"), line
        assert line.endswith("pass --clip with the weights the cache was made with")
    assert main(train_argv(caches, tmp_path / "run", "--train-backbone-top", "--clip", "nothere.pt")) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: backbone 'nothere.pt' not found: no such file"), line
    assert main(train_argv(caches, tmp_path / "run", "--clip", "tiny")) == 2  # weights without the option
    assert "only --train-backbone-top reads backbone weights" in capsys.readouterr().err
    assert main([*train_argv(caches, tmp_path / "run", "--train-backbone-top"), "--model", "lare-only"]) == 2
    assert "the lare-only model reads no backbone features" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert main(train_argv(caches, tmp_path / "run", "--train-backbone-top", "--clip", "tiny")) == 0  # the cache's own


def test_reading_the_top_from_a_file_leaves_the_seeded_generator_alone(tmp_path: Path):
    # the head is built after the top is loaded: a weights file must not shift its initial weights
    from lare2.train.backbone_top import load_top_weights

    tower, fingerprint = load_tower("tiny")
    torch.save(tower.state_dict(), tmp_path / "tiny.pt")
    attrs = {"fingerprints": {"backbone": fingerprint}, "extract_config": {"backbone": "tiny"}}
    draws = []
    for clip in ("tiny", str(tmp_path / "tiny.pt")):
        torch.manual_seed(0)
        top = load_top_weights(clip, attrs, tmp_path)
        draws.append(torch.rand(3))
        assert top.fingerprint == fingerprint
    torch.manual_seed(0)
    torch.testing.assert_close(draws[0], torch.rand(3))
    torch.testing.assert_close(draws[1], draws[0])
    # the cache's recorded weights missing here: the error says to pass --clip
    attrs_elsewhere = {**attrs, "extract_config": {"backbone": str(tmp_path / "moved.pt")}}
    with pytest.raises(Exception, match="pass --clip with those weights"):
        load_top_weights("", attrs_elsewhere, tmp_path)
