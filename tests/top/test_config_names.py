"""The extraction config's model fields are ``sd`` and ``clip`` (the ``--sd`` / ``--clip`` options); configs
written when they were ``sd_model`` and ``backbone`` (cache attributes, a run's config.json, ``--set``) still
load, with the same identity and fingerprint, so old caches and runs still resume, train and score. Those configs
predate ``classless_prompt`` too: they load with ``empty`` (what their classless rows got), which is no part of
the identity."""

from __future__ import annotations

import dataclasses
import json
import logging

from lare2.extract.plan import manifest_digest, plan_extraction
from lare2.shared.cache import FeatureCache
from lare2.shared.config import ExtractConfig, current_keys, debug, identity_fingerprint, paper
from lare2.shared.settings import parse_overrides
from lare2.train.checkpoint import DetectorConfig
from lare2.train.models import ModelConfig
from tests.helpers.caches import CHUNK, build_tiny_cache

FINGERPRINTS = {"sd": "5" * 16, "backbone": "b" * 16}  # the weights' fingerprints keep their hashed keys
# identity_fingerprint of each preset's identity with FINGERPRINTS, computed by lare2 before the fields were
# renamed (and before classless_prompt existed)
FINGERPRINT_BEFORE_RENAME = {"debug": "c9a40a6d0745fd4a", "paper": "b69db3404a4192b5"}
IDENTITY_KEYS_BEFORE_RENAME = ("timestep", "ensemble", "image_size", "prompt_mode", "prompt_template", "prompt_text",
                               "seed", "feature_dtype", "compute_dtype", "chunk_samples")


def old_keys(config: ExtractConfig) -> dict:
    """``config`` as a lare2 from before the rename stored it (which had no ``classless_prompt`` either)."""
    stored = config.to_dict()
    stored["sd_model"], stored["backbone"] = stored.pop("sd"), stored.pop("clip")
    del stored["classless_prompt"]
    return stored


def old_identity(config: ExtractConfig, fingerprints: dict[str, str]) -> dict:
    """The identity a lare2 from before the rename recorded in a cache (no perturb, normalize or views set)."""
    return {**{k: getattr(config, k) for k in IDENTITY_KEYS_BEFORE_RENAME},
            **{f"fingerprint.{k}": v for k, v in sorted(fingerprints.items())}}


def test_a_stored_config_with_the_old_keys_loads_with_the_same_identity() -> None:
    for name, preset in (("debug", debug), ("paper", paper)):
        config = preset()
        stored = json.loads(json.dumps(old_keys(config)))  # as read back from a cache's or run's JSON
        assert "sd" not in stored and "clip" not in stored
        assert "classless_prompt" not in stored
        loaded = ExtractConfig.from_dict(stored)
        assert (loaded.sd, loaded.clip) == (config.sd, config.clip)
        assert loaded == dataclasses.replace(config, classless_prompt="empty")  # what classless rows got then
        assert loaded.identity(FINGERPRINTS) == config.identity(FINGERPRINTS) == old_identity(config, FINGERPRINTS)
        assert identity_fingerprint(loaded.identity(FINGERPRINTS)) == FINGERPRINT_BEFORE_RENAME[name]
        assert identity_fingerprint(config.identity(FINGERPRINTS)) == FINGERPRINT_BEFORE_RENAME[name]
    assert current_keys({"backbone": "old.pt", "clip": "new.pt", "seed": 1}) == {"clip": "new.pt", "seed": 1}


def test_a_run_config_json_written_with_the_old_keys_loads() -> None:
    written = {"model": ModelConfig(kind="linear", pooled_dim=16, fmap_shape=(16, 14, 14)).to_dict(),
               "extraction_fingerprint": FINGERPRINT_BEFORE_RENAME["debug"],
               "extraction": old_keys(debug(sd="zoo/ldm-a", clip="small")), "threshold": 0.25}
    config = DetectorConfig.from_dict(json.loads(json.dumps(written)))
    assert (config.extraction.sd, config.extraction.clip) == ("zoo/ldm-a", "small")
    assert config.extraction.classless_prompt == "empty"
    assert identity_fingerprint(config.extraction.identity(FINGERPRINTS)) == config.extraction_fingerprint
    rewritten = config.to_dict()["extraction"]
    assert rewritten["sd"] == "zoo/ldm-a" and "sd_model" not in rewritten and "backbone" not in rewritten


def test_set_takes_an_old_name_as_the_new_one_and_says_so(caplog) -> None:
    lare2_logger = logging.getLogger("lare2")
    lare2_logger.addHandler(caplog.handler)
    try:
        overrides = parse_overrides(["sd_model=zoo/ldm-a", "backbone=small", "seed=3"], ExtractConfig)
    finally:
        lare2_logger.removeHandler(caplog.handler)
    assert overrides == {"sd": "zoo/ldm-a", "clip": "small", "seed": 3}
    warnings = [r.getMessage() for r in caplog.records]
    assert "--set sd_model: now called sd; use --set sd=zoo/ldm-a" in warnings
    assert "--set backbone: now called clip; use --set clip=small" in warnings


def test_a_cache_made_before_the_rename_resumes_with_the_same_models(tmp_path) -> None:
    cache = build_tiny_cache(tmp_path, complete=True)
    config = debug(manifest=str(cache.manifest), out=str(cache.path), chunk_samples=CHUNK)
    attrs = FeatureCache.open(cache.path, mode="r+").group.attrs
    attrs["extract_config"] = old_keys(config)
    attrs["identity"] = old_identity(config, attrs["fingerprints"])
    attrs["manifest"] = {**attrs["manifest"], "digest": manifest_digest(cache.ids)}  # as `lare2 extract` records
    plan = plan_extraction(config)
    assert plan.cache_exists and plan.same_models and plan.nothing_to_do
    plan = plan_extraction(debug(manifest=str(cache.manifest), out=str(cache.path), chunk_samples=CHUNK, clip="small"))
    assert not plan.same_models
