"""MiniGenImage: photographs and their splits, the committed zoo, the benchmark builder.

The builder runs on the committed zoo with a few images per folder; a second build is compared
file by file, and the generated images are made again straight from the committed weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lare2.minigenimage.build import BuildConfig, build, fake_plan, png_bytes, preset
from lare2.minigenimage.build import SPLIT_POOL, real_images
from lare2.minigenimage.photos import (CLASS_NAMES, PHOTOS, file_sha256, photo_path, photos_of, random_crops,
                                      training_crops)
from lare2.minigenimage.pools import POOL_COLUMNS, POOLS, SUBJECT_GROUPS, assign_pools, read_pools
from lare2.minigenimage.sampling import CHUNK, load_sampler, sample
from lare2.minigenimage.zoo import GENERATORS, ZOO_DIR, read_record

TEST_COUNT = 4  # <= CHUNK: each generator's test split is one sampler call, remade exactly below
assert TEST_COUNT <= CHUNK


def tiny_config(out: Path) -> BuildConfig:
    return BuildConfig(out=str(out), train_count=6, val_count=3, test_count=TEST_COUNT)


def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.parquet"}


def decode(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("minigenimage") / "bench"
    build(tiny_config(out))
    return out


# --- photographs -------------------------------------------------------------------------------

def test_photos_are_on_disk_licensed_and_in_one_pool_each():
    assert len({p.name for p in PHOTOS}) == len(PHOTOS) >= 200
    for photo in PHOTOS:
        assert photo.licence and photo.credit and photo.pool in POOLS and photo.class_name in CLASS_NAMES
        assert file_sha256(photo_path(photo)) == photo.sha256, photo.name
    # no photograph (and no file: the same picture under two names) gives crops to two pools
    assert len({(p.package, p.file) for p in PHOTOS}) == len({p.sha256 for p in PHOTOS}) == len(PHOTOS)
    # each pool large enough that one photograph is a small share of its reals
    sizes = {pool: len(photos_of(pool)) for pool in POOLS}
    assert sizes["detector-train"] >= 30 and sizes["test"] >= 30 and sizes["val"] >= 20 and sizes["zoo"] >= 50, sizes
    # every class the detector's photographs show is one the generators were trained on
    zoo_classes = {p.class_name for p in photos_of("zoo")}
    assert zoo_classes == set(CLASS_NAMES)
    for pool in ("detector-train", "val", "test"):
        assert {p.class_name for p in photos_of(pool)} <= zoo_classes, pool
    with pytest.raises(ValueError, match="choose from"):
        photos_of("train")


def test_pools_table_is_what_the_seeded_stratified_rule_deals():
    rows = read_pools()
    assert tuple(rows[0]) == POOL_COLUMNS
    dealt = assign_pools({r["name"]: r["class_name"] for r in rows})
    assert {r["name"]: r["pool"] for r in rows} == dealt
    for group in set(SUBJECT_GROUPS.values()):  # photographs of one view share a pool
        assert len({dealt[n] for n, g in SUBJECT_GROUPS.items() if g == group}) == 1, group
    # stratified: each class with 20+ photographs is spread over every pool near the 7:5:3:5 shares
    by_class: dict[str, list[str]] = {}
    for name, pool in dealt.items():
        by_class.setdefault(next(r["class_name"] for r in rows if r["name"] == name), []).append(pool)
    for cls, pools in by_class.items():
        if len(pools) >= 20:
            for pool, share in (("zoo", 7), ("detector-train", 5), ("val", 3), ("test", 5)):
                assert abs(pools.count(pool) - len(pools) * share / 20) <= 1.5, (cls, pool, pools.count(pool))
    # another seed deals another table: the seed really is the rule's
    assert assign_pools({r["name"]: r["class_name"] for r in rows}, seed=1) != dealt


def test_the_zoo_trains_on_zoo_photographs_only():
    crops, classes = training_crops(2, 16, seed=0)
    assert len(crops) == 2 * len(photos_of("zoo"))
    expected = np.concatenate([random_crops(p, 2, 16, seed=0, flip=True) for p in photos_of("zoo")])
    np.testing.assert_array_equal(crops, expected)
    assert SPLIT_POOL == {"train": "detector-train", "val": "val", "test": "test"}


@pytest.mark.parametrize("seed", [0, 7, 11])
def test_real_crops_are_unique_whatever_the_seed(seed: int):
    taken: set[bytes] = set()
    names = []
    for generator in GENERATORS:
        for split, count in (("train", 240), ("val", 80), ("test", 120)):
            crops = real_images(generator, split, count, seed, taken)
            assert len(crops) == count
            assert {name for name, _, _ in crops} <= {p.name for p in photos_of(SPLIT_POOL[split])}
            names += [c.tobytes() for _, _, c in crops]
    assert len(set(names)) == len(names) == len(taken)


def test_a_square_photo_cropped_whole_twice_is_drawn_again():
    photo = next(p for p in PHOTOS if p.name == "chelsea")
    crops = random_crops(photo, 400, 8, seed=3)  # 8 px crops of one photo: repeats would be likely
    assert len({c.tobytes() for c in crops}) == 400


def test_random_crops_are_seeded_and_multiscale():
    photo = photos_of("zoo")[0]
    a, b = random_crops(photo, 5, 64, seed=1), random_crops(photo, 5, 64, seed=1)
    assert a.shape == (5, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, random_crops(photo, 5, 64, seed=2))
    assert len({crop.tobytes() for crop in a}) == 5


def test_unknown_generator_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="ldm-a"):
        BuildConfig(generators=["midjourney"])
    with pytest.raises(ValueError, match="tiny"):
        preset("huge")


# --- the committed zoo -------------------------------------------------------------------------

def test_zoo_weights_load_and_match_recorded_fingerprints():
    from safetensors.torch import load_file

    from lare2.shared.provenance import fingerprint_state_dict

    record = read_record()
    assert set(record) == set(GENERATORS)
    total = 0
    for generator in GENERATORS:
        files = record[generator]["files"]
        assert files, generator
        for rel, entry in files.items():
            path = ZOO_DIR / rel
            assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], rel
            assert fingerprint_state_dict(load_file(str(path))) == entry["fingerprint"], rel
            total += path.stat().st_size
    assert total < 25 * 2**20, f"zoo is {total / 2**20:.1f} MiB"
    # ldm-b shares ldm-a's VAE and text encoder (copies), but has its own UNet
    a, b = record["ldm-a"]["files"], record["ldm-b"]["files"]
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert a[f"ldm-a/{part}"]["fingerprint"] == b[f"ldm-b/{part}"]["fingerprint"]
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert a[f"ldm-a/{unet}"]["fingerprint"] != b[f"ldm-b/{unet}"]["fingerprint"]


def test_ldm_a_is_a_stable_diffusion_folder_with_sd_schedule():
    from diffusers import AutoencoderKL, DDPMScheduler

    folder = ZOO_DIR / "ldm-a"
    index = json.loads((folder / "model_index.json").read_text())
    for component in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        assert component in index and (folder / component).is_dir(), component
    scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    schedule = (scheduler.config.beta_schedule, scheduler.config.beta_start, scheduler.config.beta_end)
    assert schedule == ("scaled_linear", 0.00085, 0.012)
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"
    vae = AutoencoderKL.from_pretrained(str(folder / "vae")).eval()
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 4, 8, 8)


# --- the benchmark -----------------------------------------------------------------------------

def test_manifest_rows_match_files_and_splits_are_by_photograph(bench: Path):
    table = pq.read_table(bench / "manifest.parquet")
    assert table.schema.metadata[b"lare2.root"].decode() == str(bench.resolve())
    assert str(table.schema.field("label").type) == "int8"
    rows = table.to_pylist()
    assert len(rows) == 2 * (6 + 3) + 2 * TEST_COUNT * len(GENERATORS)
    for row in rows:
        data = (bench / row["path"]).read_bytes()
        assert row["sample_id"] == hashlib.sha256(data).hexdigest()[:32]
        assert (row["width"], row["height"], row["format"], row["error"]) == (64, 64, "PNG", "")
        folder = {"train": "train", "val": "train", "test": "val"}[row["split"]]
        assert row["path"].startswith(f"{row['generator']}/{folder}/{'ai' if row['label'] else 'nature'}/")
        if row["label"] == 0:  # a real crop names its photograph, which must belong to the row's split
            photo = Path(row["path"]).stem.split("_", 2)[2]  # <split>_<index>_<photo>
            assert photo in {p.name for p in photos_of(SPLIT_POOL[row["split"]])}, row["path"]
    train_rows = [r for r in rows if r["split"] in ("train", "val")]
    assert {r["generator"] for r in train_rows} == {"ldm-a"}
    assert {r["generator"] for r in rows if r["split"] == "test"} == set(GENERATORS)


@pytest.mark.slow
def test_rebuild_from_the_same_seed_is_byte_identical(bench: Path, tmp_path: Path):
    again = tmp_path / "again"
    build(tiny_config(again))
    assert file_hashes(again) == file_hashes(bench)
    first, second = pq.read_table(bench / "manifest.parquet"), pq.read_table(again / "manifest.parquet")
    assert first.replace_schema_metadata(None).equals(second.replace_schema_metadata(None))


@pytest.mark.parametrize("generator", GENERATORS)
def test_generated_images_come_from_the_committed_weights(bench: Path, generator: str):
    seeds, classes = fake_plan(generator, "test", TEST_COUNT, seed=0)
    files = [bench / generator / "val" / "ai" / f"test_{i:05d}_{CLASS_NAMES[c]}.png" for i, c in enumerate(classes)]
    sampler = load_sampler(generator)
    remade = sample(sampler, seeds, classes)
    for pixels, path in zip(remade, files):
        assert png_bytes(pixels) == path.read_bytes(), path

    # the same seeds through perturbed weights give other images: the pixels depend on the weights
    net = getattr(sampler, "unet", None) or sampler.net
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    perturbed = sample(sampler, seeds[:2], classes[:2])
    assert np.abs(perturbed.astype(int) - remade[:2].astype(int)).mean() > 1.0


def test_ldm_a_images_match_diffusers_own_pipeline(bench: Path):
    """An independent path: diffusers' StableDiffusionPipeline on the committed folder, same starting noise."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from lare2.minigenimage.sampling import DDIM_STEPS, start_noise
    from lare2.minigenimage.train_ldm import PROMPT_TEMPLATE

    pipe = StableDiffusionPipeline.from_pretrained(str(ZOO_DIR / "ldm-a"), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False)
    pipe.set_progress_bar_config(disable=True)
    seeds, classes = fake_plan("ldm-a", "test", TEST_COUNT, seed=0)
    images = pipe([PROMPT_TEMPLATE.format(CLASS_NAMES[c]) for c in classes], height=64, width=64,
                  num_inference_steps=DDIM_STEPS, guidance_scale=1.0, eta=0.0,
                  latents=start_noise(seeds, (4, 8, 8)), output_type="np").images
    for i, (image, c) in enumerate(zip(images, classes)):
        built = decode(bench / "ldm-a" / "val" / "ai" / f"test_{i:05d}_{CLASS_NAMES[c]}.png")
        assert np.abs(np.round(image * 255).astype(int) - built.astype(int)).max() <= 1


def test_generated_images_are_not_real_crops(bench: Path):
    rows = pq.read_table(bench / "manifest.parquet").to_pylist()
    fakes = np.stack([decode(bench / r["path"]) for r in rows if r["label"] == 1]).astype(np.float32)
    reals = np.stack([decode(bench / r["path"]) for r in rows if r["label"] == 0])
    train_crops = np.concatenate([random_crops(p, 3, 64, seed=0) for p in photos_of("zoo")])
    reals = np.concatenate([reals, train_crops]).astype(np.float32)
    # RMS distance (0..255 scale) from each fake to its nearest real image
    d2 = ((fakes ** 2).sum((1, 2, 3))[:, None] + (reals ** 2).sum((1, 2, 3))[None]
          - 2 * np.einsum("nhwc,mhwc->nm", fakes, reals))
    nearest_rms = np.sqrt(np.maximum(d2.min(axis=1), 0) / fakes[0].size)
    assert nearest_rms.min() > 8.0, np.sort(nearest_rms)[:5]
    # and they are not all alike (a collapsed generator would repeat one image)
    assert len({f.tobytes() for f in fakes}) == len(fakes)


def test_cli_registers_build_and_zoo():
    import typer
    from typer.testing import CliRunner

    from lare2.minigenimage.cli import register

    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["minigenimage", "--help"], env={"COLUMNS": "200"})  # no wrapped descriptions
    assert result.exit_code == 0 and "build" in result.output and "zoo" in result.output
    # the rows of the Commands panel: exactly the five subcommands, each with its one-line description
    panel = result.output.split("─ Commands ─", 1)[1].split("╰", 1)[0].splitlines()[1:]
    listed = [line.strip().strip("│").split(None, 1) for line in panel]
    assert [name for name, _ in listed] == ["build", "zoo", "demo", "robustness", "views"]
    assert [description.strip() for _, description in listed] == [
        "Sample the zoo and crop the photographs into GenImage's layout, with a manifest.",
        "Train the generator zoo on the CPU (the VAE first: ldm-a and ldm-b decode with it).",
        "The whole method on MiniGenImage: build, extract with ldm-a, train 4 detectors "
        "(egre, linear, lare-only, egre-zero-lare), evaluate on 4 generators.",
        "After the demo: audit its manifest, extract its test split under each perturbation "
        "and evaluate every detector on them.",
        "After the demo (and robustness): train EGRE on augmented views, with and without the backbone top; "
        "compare with the demo's egre."]


def test_demo_samples_and_extracts_with_the_zoo_it_is_given(tmp_path: Path, monkeypatch):
    import shutil

    import typer
    from typer.testing import CliRunner

    import lare2.extract.run
    import lare2.minigenimage.build
    from lare2.minigenimage.cli import register
    from lare2.minigenimage.demo import DemoConfig, run_demo

    app = typer.Typer()
    register(app)
    missing = CliRunner().invoke(app, ["minigenimage", "demo", "--zoo", str(tmp_path / "nowhere"),
                                       "--out", str(tmp_path / "run")])
    assert missing.exit_code != 0 and "no ldm-a/unet" in missing.output
    nowhere = str(tmp_path / "nowhere")
    assert missing.exit_code == 2 and missing.stderr.splitlines() == [  # one line naming the zoo and the way out
        f"error: zoo={nowhere!r}: no ldm-a/unet there; train one with `lare2 minigenimage zoo --zoo {nowhere}`"]
    assert not (tmp_path / "run").exists()

    zoo = tmp_path / "zoo"
    shutil.copytree(ZOO_DIR / "ldm-a", zoo / "ldm-a")
    seen = {}

    def fake_build(config):
        seen["build_zoo"] = config.zoo
        return tmp_path / "manifest.parquet"

    class Stop(Exception):
        pass

    def fake_extraction(config):
        seen["sd"] = config.sd
        raise Stop

    monkeypatch.setattr(lare2.minigenimage.build, "build", fake_build)
    monkeypatch.setattr(lare2.extract.run, "run_extraction", fake_extraction)
    with pytest.raises(Stop):
        run_demo(DemoConfig(out=str(tmp_path / "run"), zoo=str(zoo)))
    assert seen == {"build_zoo": str(zoo), "sd": str(zoo / "ldm-a")}
    with pytest.raises(Stop):
        run_demo(DemoConfig(out=str(tmp_path / "run2")))
    assert seen == {"build_zoo": str(ZOO_DIR), "sd": str(ZOO_DIR / "ldm-a")}


@pytest.mark.parametrize("seed", [7, 11])
def test_every_split_has_unique_ids_whatever_the_seed(tmp_path: Path, seed: int):
    # seed 7 once built a test split holding two byte-identical crops, and stage 1 refused it
    out = tmp_path / f"seed{seed}"
    build(BuildConfig(out=str(out), seed=seed, train_count=24, val_count=8, test_count=TEST_COUNT))
    table = pq.read_table(out / "manifest.parquet").to_pylist()
    for split in ("train", "val", "test"):
        ids = [r["sample_id"] for r in table if r["split"] == split]
        assert ids and len(set(ids)) == len(ids), split
    assert len({r["sample_id"] for r in table}) == len(table)  # and no image serves two splits


def test_robustness_after_a_tiny_demo_perturbs_only_the_test_images(tmp_path: Path):
    import json

    from lare2.minigenimage.demo import DemoConfig, run_demo
    from lare2.minigenimage.robustness import run_robustness
    from lare2.shared.cache import FeatureCache

    out = tmp_path / "demo"
    run_demo(DemoConfig(out=str(out), build_preset="tiny", models=["egre"], epochs=2, clip="tiny"))
    results = run_robustness(out, ["jpeg:50", "blur:2"])
    table = results["egre"]
    assert [group["perturb"] for group in table["perturbations"]] == ["clean", "jpeg:50", "blur:2"]
    assert all(sorted(r["generator"] for r in group["rows"]) == sorted(GENERATORS) for group in table["perturbations"])
    clean, jpeg = FeatureCache.open(out / "cache" / "test"), FeatureCache.open(out / "cache" / "test-jpeg50")
    assert list(clean.column("sample_id")) == list(jpeg.column("sample_id"))
    assert list(clean.column("seed")) == list(jpeg.column("seed"))
    assert jpeg.attrs["extract_config"]["perturb"] == "jpeg:50"
    assert {k: v for k, v in jpeg.attrs["extract_config"].items() if k not in ("perturb", "out")} == \
        {k: v for k, v in clean.attrs["extract_config"].items() if k not in ("perturb", "out")}
    # every image of MiniGenImage is a 64 px PNG: format and size carry nothing (PNG bytes per pixel,
    # i.e. how compressible the pixels are, may: the README reads the audit)
    audit = json.loads((out / "audit.json").read_text())
    alone = {f["feature"]: f["auc"] for f in audit["classifier"]["feature_aucs"]}
    assert alone["format"] == alone["width"] == alone["height"] == 0.5
    assert (out / "egre" / "robustness" / "robustness.png").exists()

    # the command: with --json, stdout is one JSON document (the tables go to stderr); finished caches are reused
    import typer
    from typer.testing import CliRunner

    from lare2.minigenimage.cli import register

    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["minigenimage", "robustness", "--out", str(out), "--perturb", "jpeg:50",
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert [g["perturb"] for g in json.loads(result.stdout)["egre"]["perturbations"]] == ["clean", "jpeg:50"]

    # augmented views, with and without the trainable backbone top, against the demo's egre
    from lare2.minigenimage.views import run_views

    views = run_views(out, views=2)
    assert list(views) == ["egre", "egre-views2", "egre-views2-top"]
    assert all([g["perturb"] for g in report["perturbations"]] == ["clean", "jpeg:50", "blur:2"]
               for report in views.values())
    cache = FeatureCache.open(out / "cache" / "train-views2")
    assert cache.group["pooled_views"].shape[:2] == (len(cache), 2)
    top = json.loads((out / "egre-views2-top" / "config.json").read_text())
    assert top["model"]["train_backbone_top"] is True
