"""Bad invocations of every command, in one table: the exit code (2 bad usage or input, 1 problems
found), one ``error:`` line naming the offending path or value (parser errors too: no usage box),
and never a traceback. In-process through ``lare2.cli.app``; the fixtures are built once. A bug (a
plain ``ValueError``) is the exception: it propagates with its traceback."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from lare2.cli import app
from lare2.shared.cache import CacheLayout
from tests.helpers.caches import build_tiny_cache, ok_indices, write_synthetic_cache

LAYOUT = CacheLayout(pooled_dim=16, fmap_shape=(16, 7, 7), lare_shape=(4, 16, 16), chunk_samples=16)
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """Paths the cases refer to by name: caches, a run, a converted run, a manifest, damaged copies."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    tiny = build_tiny_cache(tmp / "tiny")
    other = build_tiny_cache(tmp / "other", seed=1, images=False)
    corrupt = tmp / "corrupt"
    shutil.copytree(tiny.path, corrupt)
    (corrupt / "zarr.json").write_text("this is not JSON {")
    damaged = tmp / "damaged"
    shutil.copytree(tiny.path, damaged)
    zarr.open_group(damaged, mode="r+")["lare"][ok_indices()[0]] = np.nan
    write_synthetic_cache(tmp / "train", num_samples=64, signal="lare", seed=1, layout=LAYOUT)
    write_synthetic_cache(tmp / "val", num_samples=32, signal="lare", seed=2, layout=LAYOUT)
    write_synthetic_cache(tmp / "stranger", num_samples=32, signal="lare", seed=3, layout=LAYOUT, identity={"seed": 9})
    shutil.copytree(tmp / "val", tmp / "testsplit")  # the val cache, relabelled as extracted from the test split
    zarr.open_group(tmp / "testsplit", mode="r+")["meta/split"][:] = np.array(["test"] * 32,
                                                                           dtype=np.dtypes.StringDType())
    shutil.copytree(tmp / "val", tmp / "badperturb")  # a recorded perturbation this lare2 cannot read
    bad_attrs = zarr.open_group(tmp / "badperturb", mode="r+").attrs
    bad_attrs["extract_config"] = {**bad_attrs.get("extract_config", {}), "perturb": "jpeg:500"}
    from lare2.shared.manifest import build_folders, write_built
    from tests.helpers.bad_images import good_rgb

    for i in range(2):  # images whose names carry no ImageNet class
        (tmp / "plain/train/0_real").mkdir(parents=True, exist_ok=True)
        (tmp / f"plain/train/0_real/holiday-{i}.png").write_bytes(good_rgb(seed=i, size=(24, 24)))
    classless = write_built(tmp / "classless.parquet", build_folders(tmp / "plain", progress=False))
    from lare2.shared.manifest import COLUMNS, write_manifest

    write_manifest(tmp / "empty.parquet", {column: [] for column in COLUMNS}, root=tmp, builder="folders")
    zarr.open_group(tmp / "foreign", mode="w").attrs["made_by"] = "another tool"  # a Zarr group, not a lare2 cache
    shutil.copytree(tmp / "val", tmp / "format9")
    zarr.open_group(tmp / "format9", mode="r+").attrs["lare2_cache_format"] = 9
    shutil.copytree(tmp / "val", tmp / "badlayout")  # a hand-edited layout attribute
    (tmp / "folder.csv").mkdir()  # a folder named like an --out file
    zarr.open_group(tmp / "badlayout", mode="r+").attrs["layout"] = {**LAYOUT.to_dict(), "feature_dtype": "int8"}
    run = tmp / "run"
    trained = invoke("train", "--preset", "debug", "--train", tmp / "train", "--val", tmp / "val", "--out", run,
                     "--epochs", "1", "--set", "progress=false", "--set", "head_dim=8")
    assert trained.exit_code == 0, trained.output

    import torch
    from safetensors.torch import load_file

    torch.save(dict(load_file(run / "model.safetensors")), tmp / "reference.pth")  # an EGRE head, reference-style keys
    converted = invoke("convert-reference", tmp / "reference.pth", "--out", tmp / "converted", "--lare-size", "16")
    assert converted.exit_code == 0, converted.output
    badweights = shutil.copytree(run, tmp / "badweights")  # the run with its weights file overwritten
    (badweights / "model.safetensors").write_bytes(b"not safetensors")
    return SimpleNamespace(badweights=badweights, tmp=tmp, missing=tmp / "no_such_thing", cache=tiny.path,
                           manifest=tiny.manifest, images=tiny.root, other=other.path, corrupt=corrupt, damaged=damaged,
                           train=tmp / "train", val=tmp / "val", stranger=tmp / "stranger", testsplit=tmp / "testsplit",
                           badperturb=tmp / "badperturb", run=run, converted=tmp / "converted",
                           ckpt=tmp / "reference.pth", classless=classless, empty=tmp / "empty.parquet",
                           foreign=tmp / "foreign", format9=tmp / "format9", badlayout=tmp / "badlayout")


def _extract(*args: str) -> list[str]:
    return ["extract", "--manifest", "{manifest}", "--split", "train", "--preset", "debug", "--out", "{tmp}/extracted",
            "--device", "cpu", *args]


def _train(*args: str) -> list[str]:
    return ["train", "--preset", "debug", "--train", "{train}", "--val", "{val}", "--out", "{tmp}/new_run", *args]


# (id, argv with {name} placeholders from `world`, exit code, what the message must name)
CASES = [
    # manifest
    ("manifest-build-missing-src", ["manifest", "build", "folders", "{missing}", "-o", "{tmp}/m.parquet"],
     2, "{missing}"),
    ("manifest-build-unknown-kind", ["manifest", "build", "imagenet", "{tmp}", "-o", "{tmp}/m.parquet"], 2, "imagenet"),
    ("manifest-build-stray-option", ["manifest", "build", "genimage", "{images}", "-o", "{tmp}/m.parquet", "--split",
                                     "test"], 2, "--split"),
    ("manifest-show-missing", ["manifest", "show", "{missing}"], 2, "{missing}"),
    ("manifest-show-a-cache", ["manifest", "show", "{cache}"], 2, "{cache}"),
    ("manifest-audit-missing", ["manifest", "audit", "{missing}"], 2, "{missing}"),
    ("manifest-audit-a-cache", ["manifest", "audit", "{cache}"], 2, "{cache}"),
    ("manifest-audit-bad-split", ["manifest", "audit", "{manifest}", "--split", "dev"], 2, "dev"),
    ("manifest-audit-absent-split", ["manifest", "audit", "{manifest}", "--split", "test"], 2, "'test'"),
    ("manifest-audit-bound-range", ["manifest", "audit", "{manifest}", "--bound", "1.5"], 2, "--bound"),
    ("manifest-build-out-a-folder", ["manifest", "build", "folders", "{images}", "-o", "{tmp}"],
     2, "--out {tmp}: a folder"),
    ("manifest-show-empty", ["manifest", "show", "{empty}"], 2, "{empty}: an empty manifest (0 rows); build it again"),
    ("manifest-audit-empty", ["manifest", "audit", "{empty}"], 2, "{empty}: an empty manifest (0 rows)"),
    ("manifest-build-not-a-tar", ["manifest", "build", "webdataset", "{manifest}", "-o", "{tmp}/m.parquet", "--split",
                                  "train"], 2, "{manifest}: not a readable tar shard"),
    # extract
    ("extract-missing-manifest", ["extract", "--manifest", "{missing}", "--preset", "debug", "--out", "{tmp}/x"],
     2, "{missing}"),
    ("extract-cache-as-manifest", ["extract", "--manifest", "{cache}", "--preset", "debug", "--out", "{tmp}/x"],
     2, "{cache}"),
    ("extract-bad-set-key", _extract("--set", "colour=blue"), 2, "colour"),
    ("extract-set-seed-x", _extract("--set", "seed=x"), 2, "seed=x"),
    ("extract-set-image-size-abc", _extract("--set", "image_size=abc"), 2, "image_size=abc"),
    ("extract-set-image-size-0", _extract("--set", "image_size=0"), 2, "image_size=0"),
    ("extract-image-size-not-8k", _extract("--image-size", "12"), 2, "image_size=12"),
    ("extract-set-bad-choice", _extract("--set", "compute_dtype=float8"), 2, "float8"),
    ("extract-bad-prompt-mode", _extract("--prompt-mode", "poem"), 2, "poem"),
    ("extract-timestep-range", _extract("--timestep", "1000"), 2, "timestep=1000"),
    ("extract-timestep-not-int", _extract("--timestep", "abc"), 2, "Invalid value for '--timestep'"),
    ("extract-bad-preset", ["extract", "--manifest", "{manifest}", "--preset", "huge"], 2, "huge"),
    ("extract-missing-sd", _extract("--sd", "{missing}", "--clip", "tiny"), 2, "{missing}"),
    ("extract-missing-clip", _extract("--sd", "tiny", "--clip", "{missing}"), 2, "{missing}"),
    ("extract-no-resume-existing", ["extract", "--manifest", "{manifest}", "--split", "train", "--preset", "debug",
                                    "--out", "{cache}", "--no-resume"], 2, "{cache}"),
    ("extract-several-splits-no-split", ["extract", "--manifest", "{manifest}", "--preset", "debug", "--out",
                                         "{tmp}/x"], 2, "pass --split SPLIT"),
    ("extract-split-and-all-splits", _extract("--all-splits"), 2, "--all-splits"),
    ("extract-cuda", _extract("--device", "cuda"), 2, "cuda"),
    ("extract-perturb-bad-quality", _extract("--perturb", "jpeg:500"), 2, "--perturb 'jpeg:500': bad part 'jpeg:500'"),
    ("extract-perturb-unknown-kind", _extract("--perturb", "jpeg:75+sharpen:2"), 2, "bad part 'sharpen:2'"),
    ("extract-perturb-size-is-normalize", _extract("--perturb", "size:256"),
     2, "size:N is a normalisation (--normalize)"),
    ("extract-normalize-unknown-kind", _extract("--normalize", "png:9"), 2, "--normalize 'png:9': bad part 'png:9'"),
    ("extract-normalize-size-too-small", _extract("--normalize", "size:4"), 2, "an integer >= 8"),
    ("extract-views-negative", _extract("--views", "-1"), 2, "views=-1: expected >= 0"),
    ("extract-views-into-plain-cache", ["extract", "--manifest", "{manifest}", "--split", "train", "--preset", "debug",
                                        "--out", "{cache}", "--device", "cpu", "--views", "2"],
     2, "views: cache has none, this run 2"),
    ("extract-perturb-into-clean-cache", ["extract", "--manifest", "{manifest}", "--split", "train", "--preset",
                                          "debug", "--out", "{cache}", "--device", "cpu", "--perturb", "jpeg:50"],
     2, "perturb: cache has none, this run 'jpeg:50'"),
    ("extract-classless-rows", ["extract", "--manifest", "{classless}", "--preset", "paper", "--sd", "tiny", "--clip",
                                "tiny", "--out", "{tmp}/cl", "--device", "cpu"],
     2, "{classless}: 2 of 2 selected rows have no ImageNet class for prompt_mode=class"),
    ("extract-classless-remedy", ["extract", "--manifest", "{classless}", "--sd", "tiny", "--clip", "tiny", "--out",
                                  "{tmp}/cl", "--device", "cpu", "--set", "classless_prompt=refuse", "--preset",
                                  "debug"],
     2, "or --set classless_prompt=empty to give only those rows the empty prompt"),
    ("extract-set-classless-bad-choice", _extract("--set", "classless_prompt=guess"), 2, "guess"),
    ("extract-out-is-a-file", ["extract", "--manifest", "{manifest}", "--split", "train", "--preset", "debug", "--out",
                               "{manifest}", "--device", "cpu"], 2, "{manifest}: a file, not a cache folder"),
    ("extract-out-holds-other-files", ["extract", "--manifest", "{manifest}", "--split", "train", "--preset", "debug",
                                       "--out", "{images}", "--device", "cpu"],
     2, "{images}: a folder holding other files"),
    ("extract-out-under-a-file", ["extract", "--manifest", "{manifest}", "--split", "train", "--preset", "debug",
                                  "--out", "{manifest}/cache", "--device", "cpu"], 2, "is a file, not a folder"),
    ("extract-empty-manifest", ["extract", "--manifest", "{empty}", "--preset", "debug", "--out", "{tmp}/x", "--device",
                                "cpu"], 2, "{empty}: an empty manifest (0 rows)"),
    ("extract-set-perturb-bad", _extract("--set", "perturb=blur:0"), 2, "perturb 'blur:0'"),
    # cache
    ("cache-info-missing", ["cache", "info", "{missing}"], 2, "{missing}"),
    ("cache-info-parquet", ["cache", "info", "{manifest}"], 2, "{manifest}"),
    ("cache-info-a-run", ["cache", "info", "{run}"], 2, "{run}"),
    ("cache-info-corrupt", ["cache", "info", "{corrupt}"], 2, "{corrupt}"),
    ("cache-info-foreign-zarr", ["cache", "info", "{foreign}"], 2,
     "{foreign}: a Zarr store but not a lare2 cache (its zarr.json records no lare2_cache_format); pass a cache"),
    ("cache-info-other-format", ["cache", "info", "{format9}"], 2,
     "{format9}: cache format 9, written by another lare2 version; this lare2 reads format 1: re-extract it"),
    ("cache-info-bad-layout", ["cache", "info", "{badlayout}"], 2,
     "{badlayout}: damaged cache, its 'layout' attribute (zarr.json) cannot be read"),
    ("cache-ls-bad-status", ["cache", "ls", "{cache}", "--status", "bogus"], 2, "bogus"),
    ("cache-show-unknown-id", ["cache", "show", "{cache}", "nosuchid"], 2, "nosuchid"),
    ("cache-stats-corrupt", ["cache", "stats", "{corrupt}"], 2, "{corrupt}"),
    ("cache-verify-corrupt", ["cache", "verify", "{corrupt}"], 2, "{corrupt}"),
    ("cache-verify-finds-nan", ["cache", "verify", "{damaged}"], 1, "FAILED"),
    ("cache-verify-pending", ["cache", "verify", "{cache}"], 1, "1 of 6 blocks (4 samples) not extracted yet"),
    ("cache-repair-missing", ["cache", "repair", "{missing}"], 2, "{missing}"),
    ("cache-repair-dry-run-finds-damage", ["cache", "repair", "{damaged}", "--dry-run"], 1, "would reset block 0"),
    ("cache-verify-cuda", ["cache", "verify", "{cache}", "--recompute", "1", "--device", "cuda"], 2, "cuda"),
    ("cache-diff-missing", ["cache", "diff", "{cache}", "{missing}"], 2, "{missing}"),
    ("cache-diff-differs", ["cache", "diff", "{cache}", "{other}"], 1, "differ"),
    ("cache-export-bad-format", ["cache", "export", "{cache}", "--out", "{tmp}/wds", "--format", "zip"], 2, "zip"),
    ("cache-export-parquet", ["cache", "export", "{manifest}", "--out", "{tmp}/wds"], 2, "{manifest}"),
    ("cache-export-out-a-file", ["cache", "export", "{cache}", "--out", "{manifest}"], 2,
     "--out {manifest}: a file, not a folder; the export needs a folder: choose another --out"),
    ("cache-export-out-under-a-file", ["cache", "export", "{cache}", "--out", "{manifest}/wds"], 2,
     "--out {manifest}/wds: under {manifest}, which is a file, not a folder"),
    ("cache-pack-pending", ["cache", "pack", "{cache}", "{tmp}/packed"], 2, "{cache}"),
    ("cache-pack-missing", ["cache", "pack", "{missing}", "{tmp}/packed"], 2, "{missing}"),
    ("cache-progress-missing", ["cache", "progress", "{missing}"], 2, "{missing}"),
    ("cache-progress-a-manifest", ["cache", "progress", "{manifest}"], 2, "{manifest}"),
    # train
    ("train-missing-cache", ["train", "--preset", "debug", "--train", "{missing}", "--val", "{val}", "--out",
                             "{tmp}/r"], 2, "{missing}"),
    ("train-parquet-as-cache", ["train", "--preset", "debug", "--train", "{manifest}", "--val", "{val}", "--out",
                                "{tmp}/r"], 2, "{manifest}"),
    ("train-run-as-cache", ["train", "--preset", "debug", "--train", "{train}", "--val", "{run}", "--out", "{tmp}/r"],
     2, "{run}"),
    ("train-corrupt-cache", ["train", "--preset", "debug", "--train", "{corrupt}", "--val", "{val}", "--out",
                             "{tmp}/r"], 2, "{corrupt}"),
    ("train-incompatible-val", ["train", "--preset", "debug", "--train", "{train}", "--val", "{stranger}", "--out",
                                "{tmp}/r"], 2, "{stranger}"),
    ("train-bad-set-key", _train("--set", "colour=blue"), 2, "colour"),
    ("train-set-seed-x", _train("--set", "seed=x"), 2, "seed=x"),
    ("train-set-bad-choice", _train("--set", "select_metric=f1"), 2, "f1"),
    ("train-bad-model", _train("--model", "resnet"), 2, "resnet"),
    ("train-bad-preset", _train("--preset", "huge"), 2, "huge"),
    ("train-no-resume-existing", ["train", "--preset", "debug", "--train", "{train}", "--val", "{val}", "--out",
                                  "{run}", "--no-resume"], 2, "{run}"),
    ("train-cuda", _train("--device", "cuda"), 2, "cuda"),
    ("train-out-a-file", ["train", "--preset", "debug", "--train", "{train}", "--val", "{val}", "--out", "{manifest}"],
     2,
     "--out {manifest}: a file, not a folder; the run needs a folder: choose another --out"),
    ("train-out-under-a-file", ["train", "--preset", "debug", "--train", "{train}", "--val", "{val}", "--out",
                                "{manifest}/run"], 2, "--out {manifest}/run: under {manifest}, which is a file"),
    ("train-val-is-train", ["train", "--preset", "debug", "--train", "{train}", "--val", "{train}", "--out", "{tmp}/r"],
     2, "shares 64 sample ids with the training cache"),
    ("train-test-split-as-val", ["train", "--preset", "debug", "--train", "{train}", "--val", "{testsplit}", "--out",
                                 "{tmp}/r"], 2, "{testsplit}: the validation cache holds 32 samples of the test split"),
    ("train-pending-cache", ["train", "--preset", "debug", "--train", "{cache}", "--val", "{val}", "--out", "{tmp}/r"],
     2, "--allow-pending"),
    ("train-top-lare-only", _train("--train-backbone-top", "--model", "lare-only"),
     2, "the lare-only model reads no backbone features"),
    ("train-clip-without-top", _train("--clip", "tiny"),
     2, "--clip tiny: only --train-backbone-top reads backbone weights"),
    ("train-top-lr-scale-0", _train("--train-backbone-top", "--set", "backbone_top_lr_scale=0"),
     2, "backbone_top_lr_scale=0.0"),
    ("train-top-synthetic-cache", _train("--train-backbone-top"), 2, "{train}: records no backbone fingerprint"),
    ("train-top-other-weights", ["train", "--preset", "debug", "--train", "{cache}", "--val", "{cache}", "--out",
                                 "{tmp}/r", "--allow-pending", "--train-backbone-top", "--clip", "small"],
     2, "--clip small: its fingerprint"),
    # eval
    ("eval-missing-run", ["eval", "{missing}", "--test", "{val}"], 2, "{missing}"),
    ("eval-cache-as-run", ["eval", "{cache}", "--test", "{val}"], 2, "{cache}"),
    ("eval-missing-test", ["eval", "{run}", "--test", "{missing}"], 2, "{missing}"),
    ("eval-parquet-as-test", ["eval", "{run}", "--test", "{manifest}"], 2, "{manifest}"),
    ("eval-incompatible-test", ["eval", "{run}", "--test", "{stranger}"], 2, "{stranger}"),
    ("eval-other-dims", ["eval", "{run}", "--test", "{cache}", "--allow-pending"], 2, "{cache}"),
    ("eval-pending-test", ["eval", "{run}", "--test", "{cache}"], 2, "--allow-pending"),
    ("eval-glob-matches-nothing", ["eval", "{run}", "--test", "{tmp}/nomatch_*"], 2, "nomatch_*"),
    ("eval-no-test", ["eval", "{run}"], 2, "--test"),
    ("eval-uncalibrated", ["eval", "{converted}", "--test", "{val}"], 2, "{converted}"),
    ("eval-report-a-file", ["eval", "{run}", "--test", "{val}", "--report", "{manifest}"], 2,
     "--report {manifest}: a file, not a folder; the report needs a folder: choose another --report"),
    ("eval-cuda", ["eval", "{run}", "--test", "{val}", "--device", "cuda"], 2, "cuda"),
    ("eval-metric-without-robustness", ["eval", "{run}", "--test", "{val}", "--metric", "ap"], 2,
     "--metric ap: only the robustness table has a shown metric; add --robustness"),
    ("eval-unknown-metric", ["eval", "{run}", "--test", "{val}", "--robustness", "--metric", "f1"], 2,
     "--metric f1: choose from auc, acc, acc@thr, ap"),
    ("eval-bad-recorded-perturb", ["eval", "{run}", "--test", "{badperturb}"],
     2, "{badperturb}: extract_config perturb 'jpeg:500'"),
    # convert-reference / calibrate
    ("convert-missing-ckpt", ["convert-reference", "{missing}", "--out", "{tmp}/c"], 2, "{missing}"),
    ("convert-parquet-as-ckpt", ["convert-reference", "{manifest}", "--out", "{tmp}/c"], 2, "{manifest}"),
    ("convert-old-val-option", ["convert-reference", "{ckpt}", "--out", "{tmp}/c", "--val", "{val}"],
     2, "lare2 calibrate"),
    ("calibrate-missing-run", ["calibrate", "{missing}", "--val", "{val}"], 2, "{missing}"),
    ("calibrate-cache-as-run", ["calibrate", "{cache}", "--val", "{val}"], 2, "{cache}"),
    ("calibrate-parquet-as-val", ["calibrate", "{run}", "--val", "{manifest}"], 2, "{manifest}"),
    ("calibrate-incompatible-val", ["calibrate", "{run}", "--val", "{stranger}"], 2, "{stranger}"),
    ("calibrate-other-dims", ["calibrate", "{converted}", "--val", "{cache}", "--allow-pending"], 2, "{cache}"),
    ("calibrate-bad-fpr", ["calibrate", "{run}", "--val", "{val}", "--target-fpr", "2"], 2, "--target-fpr"),
    ("calibrate-test-split-val", ["calibrate", "{run}", "--val", "{testsplit}"], 2,
     "{testsplit}: the calibration cache holds 32 samples of the test split"),
    ("calibrate-training-cache-as-val", ["calibrate", "{run}", "--val", "{train}"], 2,
     "{train}: the calibration cache is the run's training cache"),
    ("cache-show-png-no-folder", ["cache", "show", "{cache}", "0", "--png", "{missing}/s.png"], 2, "{missing}"),
    ("cache-stats-png-no-folder", ["cache", "stats", "{cache}", "--png", "{missing}/s.png"], 2, "{missing}"),
    ("cache-show-png-not-png", ["cache", "show", "{cache}", "0", "--png", "{tmp}/s.txt"],
     2, "--png {tmp}/s.txt: not a .png"),
    ("cache-show-png-a-folder", ["cache", "show", "{cache}", "0", "--png", "{tmp}"], 2, "--png {tmp}: a folder"),
    ("cache-stats-png-not-png", ["cache", "stats", "{cache}", "--png", "{tmp}/s.pdf"],
     2, "--png {tmp}/s.pdf: not a .png"),
    ("cache-verify-negative-recompute", ["cache", "verify", "{cache}", "--recompute", "-1"], 2,
     "Invalid value for '--recompute'"),
    ("cache-diff-negative-atol", ["cache", "diff", "{cache}", "{other}", "--atol", "-1"],
     2, "Invalid value for '--atol'"),
    ("eval-corrupt-weights", ["eval", "{badweights}", "--test", "{val}"], 2,
     "{badweights}/model.safetensors: not readable safetensors"),
    ("calibrate-corrupt-weights", ["calibrate", "{badweights}", "--val", "{val}"], 2,
     "{badweights}/model.safetensors: not readable safetensors"),
    # score
    ("score-missing-run", ["score", "{missing}", "{manifest}"], 2, "{missing}"),
    ("score-cache-as-run", ["score", "{cache}", "{manifest}"], 2, "{cache}"),
    ("score-missing-image", ["score", "{run}", "{tmp}/no_such_image.png"], 2, "no_such_image.png"),
    ("score-uncalibrated", ["score", "{converted}", "{manifest}"], 2, "{converted}"),
    ("score-cuda", ["score", "{run}", "{manifest}", "--device", "cuda"], 2, "cuda"),
    ("score-out-no-folder", ["score", "{run}", "{manifest}", "-o", "{tmp}/nodir/v.csv"], 2, "nodir/v.csv"),
    ("score-out-a-folder", ["score", "{run}", "{manifest}", "-o", "{tmp}/folder.csv"], 2,
     "{tmp}/folder.csv: --out is a folder"),
    ("score-out-bad-suffix", ["score", "{run}", "{manifest}", "-o", "{tmp}/v.xlsx"], 2, "v.xlsx"),
    ("score-heatmaps-under-a-file", ["score", "{run}", "{manifest}", "--heatmaps", "{manifest}/heat"], 2, "heat"),
    ("score-no-image-files", ["score", "{run}", "{cache}"], 2, "no image files"),
    ("score-class-name-unknown", ["score", "{run}", "{manifest}", "--class-name", "goldfsh"], 2,
     "--class-name 'goldfsh': not an ImageNet class name (the first synonym of one of the 1000 classes, as prompts use "
     "it); did you mean 'goldfish'"),
    ("score-threshold-range", ["score", "{run}", "{manifest}", "--threshold", "2"], 2,
     "Invalid value for '--threshold'"),
    # minigenimage
    ("minigenimage-build-bad-preset", ["minigenimage", "build", "--preset", "huge", "--out", "{tmp}/mg"], 2, "huge"),
    ("minigenimage-zoo-bad-family", ["minigenimage", "zoo", "--family", "vqgan"], 2, "vqgan"),
    ("minigenimage-demo-bad-prompt-mode", ["minigenimage", "demo", "--prompt-mode", "poem", "--out", "{tmp}/demo"],
     2, "poem"),
    ("minigenimage-robustness-no-demo", ["minigenimage", "robustness", "--out", "{missing}"],
     2, "{missing}: no such folder"),
    ("minigenimage-robustness-bad-perturb", ["minigenimage", "robustness", "--out", "{tmp}", "--perturb", "jpeg:0"],
     2, "jpeg:0"),
    ("minigenimage-robustness-not-a-demo", ["minigenimage", "robustness", "--out", "{tmp}"],
     2, "no test cache or manifest of a demo"),
    ("minigenimage-views-zero", ["minigenimage", "views", "--out", "{tmp}", "--views", "0"],
     2, "--views 0: expected >= 1"),
    ("minigenimage-views-not-a-demo", ["minigenimage", "views", "--out", "{tmp}"], 2, "run `lare2 minigenimage demo"),
    ("minigenimage-demo-missing-zoo", ["minigenimage", "demo", "--zoo", "{missing}", "--out", "{tmp}/demo"],
     2, "{missing}"),
    # serve (--port 0: any free port, so that no test depends on 8000 being free)
    ("serve-missing-run", ["serve", "{missing}", "--port", "0"], 2, "{missing}"),
    ("serve-missing-token-file", ["serve", "{run}", "--token-file", "{missing}", "--port", "0"], 2,
     "{missing}: no such token file"),
    ("serve-port-range", ["serve", "{run}", "--port", "70000"], 2, "Invalid value for '--port'"),
    ("serve-max-upload-zero", ["serve", "{run}", "--port", "0", "--max-upload-mb", "0"], 2,
     "--max-upload-mb 0: expected > 0"),
    ("serve-inflight-below-upload", ["serve", "{run}", "--port", "0", "--max-inflight-mb", "5"], 2,
     "--max-inflight-mb 5: below --max-upload-mb 20"),
    # parser errors: one line naming the command, the option or argument, and where the help is
    ("parser-unknown-command", ["cahce", "info", "{cache}"], 2, "lare2: No such command 'cahce'"),
    ("parser-unknown-subcommand", ["cache", "inf", "{cache}"], 2, "lare2 cache: No such command 'inf'"),
    ("parser-misspelled-option", ["cache", "info", "{cache}", "--jsno"], 2, "lare2 cache info: No such option: --jsno"),
    ("parser-misspelled-root-option", ["--verison"], 2, "lare2: No such option: --verison"),
    ("parser-value-out-of-range", ["score", "{run}", "{manifest}", "--workers", "-1"], 2,
     "Invalid value for '--workers'"),
    ("parser-value-not-a-number", ["cache", "diff", "{cache}", "{other}", "--atol", "tiny"], 2,
     "Invalid value for '--atol'"),
    ("parser-missing-argument", ["cache", "diff", "{cache}"], 2, "lare2 cache diff: Missing argument 'b'"),
    ("parser-missing-option", ["extract", "--split", "train"], 2, "lare2 extract: Missing option '--manifest'"),
    ("parser-option-without-value", ["train", "--epochs"], 2, "Option '--epochs' requires an argument"),
    ("parser-names-the-help", ["manifest", "audit", "{manifest}", "--bound", "x"], 2,
     "; see 'lare2 manifest audit --help'"),
]
NEEDS_NO_CUDA = {case[0] for case in CASES if case[0].endswith("-cuda")}


@pytest.mark.parametrize(("argv", "code", "names"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_invocation_fails_in_one_line(world, request, argv: list[str], code: int, names: str) -> None:
    if request.node.callspec.id in NEEDS_NO_CUDA and _has_cuda():
        pytest.skip("CUDA is present: --device cuda is valid here")
    paths = {k: str(v) for k, v in vars(world).items()}
    result = invoke(*(a.format(**paths) for a in argv))
    output = result.output
    assert result.exit_code == code, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output and "Usage:" not in output, output
    wanted = names.format(**paths)
    if code == 2:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output
        assert wanted in errors[0], (wanted, errors[0])
        assert "None" not in errors[0], errors[0]  # a value the input lacks is named, never printed as None
    else:  # found problems: the report says so
        assert wanted in output


@pytest.mark.parametrize("bad_run", ["missing", "badweights"])
def test_a_failed_score_leaves_the_previous_out_whole(world, tmp_path, bad_run: str) -> None:
    """--out is opened only once the detector has loaded: a bad run keeps the rows of the last good one."""
    previous = tmp_path / "scores.csv"
    previous.write_text("path,p_fake\na.png,0.9\n")
    result = invoke("score", getattr(world, bad_run), world.images, "-o", previous)
    assert result.exit_code == 2, result.output
    assert previous.read_text() == "path,p_fake\na.png,0.9\n"


def test_every_command_is_in_the_table() -> None:
    """A new command gets its bad invocations into CASES."""
    import typer.main

    commands = set()
    for name, command in typer.main.get_command(app).commands.items():
        commands |= {f"{name} {sub}" for sub in command.commands} if hasattr(command, "commands") else {name}
    groups = {c.split()[0] for c in commands if " " in c}
    tested = {" ".join(argv[:2]) if argv[0] in groups else argv[0] for case_id, argv, _, _ in CASES
              if not case_id.startswith("parser-")}
    assert sorted(commands - tested) == []


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("lare2 "), result.output


@pytest.mark.parametrize("argv", [["--help"], ["cache", "--help"], ["cache", "diff", "--help"], ["score", "--help"],
                                  ["minigenimage", "demo", "--help"]])
def test_help_still_shows_usage(argv: list[str]) -> None:
    result = invoke(*argv)
    assert result.exit_code == 0 and "Usage:" in result.stdout and not result.stderr, result.output


def test_a_bare_group_shows_its_help() -> None:
    result = invoke("cache")
    assert result.exit_code == 2 and "Usage:" in result.output, result.output
    assert not any(line.startswith("error:") for line in result.output.splitlines()), result.output


def test_main_returns_the_exit_code_with_one_error_line(world, capsys) -> None:
    """``main(argv)`` of a command module: the same grammar without the console script."""
    from lare2 import cache_cli, cli
    from lare2.train import cli as train_cli

    assert cli.main(["cache", "info", str(world.cache), "--bogus"]) == 2
    expected = "error: lare2 cache info: No such option: --bogus; see 'lare2 cache info --help'\n"
    assert capsys.readouterr().err == expected
    assert cache_cli.main(["cache", "info", str(world.missing)]) == 2
    assert capsys.readouterr().err == f"error: {world.missing}: no such cache directory\n"
    assert train_cli.main(["eval", str(world.run), "--batch-size", "many"]) == 2
    assert capsys.readouterr().err.startswith("error: lare2 eval: Invalid value for '--batch-size'")
    assert cache_cli.main(["cache", "info", str(world.cache), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] > 0


def test_a_bug_shows_its_traceback_not_an_error_line(world, monkeypatch, capsys) -> None:
    """A plain ValueError from inside a command (a bug, e.g. deep in numpy) propagates; a UserError is one line."""
    import lare2.shared.cache.summary
    from lare2 import cache_cli
    from lare2.shared.errors import InputError

    def planted(exception: Exception):
        def cache_info(cache):
            raise exception
        return cache_info

    monkeypatch.setattr(lare2.shared.cache.summary, "cache_info", planted(ValueError("planted bug: shapes (3,) (4,)")))
    result = invoke("cache", "info", world.cache)
    assert isinstance(result.exception, ValueError) and "planted bug" in str(result.exception), result.output
    assert result.exit_code == 1 and "error:" not in result.output, result.output
    with pytest.raises(ValueError, match="planted bug"):  # main(argv): the traceback reaches the caller
        cache_cli.main(["cache", "info", str(world.cache)])
    assert "error:" not in capsys.readouterr().err

    monkeypatch.setattr(lare2.shared.cache.summary, "cache_info", planted(InputError("a value you gave: the remedy")))
    result = invoke("cache", "info", world.cache)
    assert result.exit_code == 2 and result.stderr == "error: a value you gave: the remedy\n", result.output


@pytest.mark.parametrize(("stage", "pair", "expected"), [
    ("extract", "seed=3", {"seed": 3}),
    ("extract", "limit=none", {"limit": None}),
    ("extract", "generators=sdv14,adm", {"generators": ["sdv14", "adm"]}),
    ("extract", "prompt_mode=empty", {"prompt_mode": "empty"}),
    ("extract", "prompt_text=a photo", {"prompt_text": "a photo"}),
    ("train", "deterministic=yes", {"deterministic": True}),
    ("train", "lr=1e-3", {"lr": 1e-3}),
    ("train", "stop-after-steps=5", {"stop_after_steps": 5}),
])
def test_set_values_are_converted_by_the_fields_type(stage: str, pair: str, expected: dict) -> None:
    from lare2.shared.config import ExtractConfig
    from lare2.shared.settings import parse_overrides
    from lare2.train.config import TrainConfig

    assert parse_overrides([pair], ExtractConfig if stage == "extract" else TrainConfig) == expected


@pytest.fixture
def modules_restored(monkeypatch):
    """``sys.modules`` (and the packages' submodule attributes) exactly as before the test: modules first
    imported while diffusers was hidden bind other module objects, and must not outlive the test."""
    import sys

    before = dict(sys.modules)
    attributes = {name: getattr(module, "__dict__", {}).copy()
                  for name, module in before.items() if name.startswith("lare2")}
    yield monkeypatch
    monkeypatch.undo()
    for name in [m for m in sys.modules if m not in before]:
        del sys.modules[name]
    sys.modules.update(before)
    for name, saved in attributes.items():
        before[name].__dict__.update({k: v for k, v in saved.items() if isinstance(v, type(sys))})


def test_a_missing_extra_is_named_with_its_install_command(world, modules_restored) -> None:
    import sys

    monkeypatch = modules_restored
    for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails as if not installed
    for module in ("lare2.extract.models", "lare2.extract.tiny_models"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    result = invoke("extract", "--manifest", world.manifest, "--split", "train", "--preset", "debug",
                    "--out", f"{world.tmp}/no-diffusers", "--device", "cpu")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: this command needs diffusers, which is not installed: pip install 'lare2[extract]'"], result.output


@pytest.mark.slow
def test_ctrl_c_exits_130_saying_what_was_kept(world, tmp_path) -> None:
    """SIGINT (Ctrl-C) in the middle of an extraction: exit 130 and one line saying what was kept and how to go on."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "slow-cache"
    # a long extraction (64 draws of 512 px per image), so that the signal lands while it computes
    process = subprocess.Popen(
        [sys.executable, "-m", "lare2.extract", "--manifest", str(world.manifest), "--split", "train",
         "--preset", "debug", "--out", str(out), "--device", "cpu", "--ensemble", "64", "--image-size", "512"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "300"},
        # a test run started in the background ignores SIGINT, and children inherit that: give the command
        # the default disposition, as a terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not (out / "zarr.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert process.returncode == 130 and len(errors) == 1, stderr
    assert errors[0].startswith(f"error: {out}: interrupted (Ctrl-C); the ") and (
        "blocks marked done are kept; rerun the same command to compute the rest" in errors[0]), errors[0]
    assert "Traceback" not in stderr, stderr
