"""The zoo's latent diffusion recipes: one preset form (plain functions), options given at construction."""

from __future__ import annotations

import pytest

from lare2.minigenimage.train_ldm import PRESETS, LdmTrainConfig, preset
from lare2.shared.errors import InputError
from lare2.shared.settings import SettingsError


def test_each_preset_is_its_model_and_takes_overrides_at_construction() -> None:
    assert sorted(PRESETS) == ["ldm-a", "ldm-b"]
    a, b = preset("ldm-a"), preset("ldm-b", zoo="elsewhere", steps=3)
    assert (a.name, a.width, a.seed, a.steps) == ("ldm-a", 32, 0, 6000)
    assert (b.name, b.width, b.seed, b.steps, b.zoo) == ("ldm-b", 24, 1, 3, "elsewhere")
    assert isinstance(b, LdmTrainConfig)


def test_an_unknown_preset_key_or_bad_value_is_a_user_error() -> None:
    with pytest.raises(SettingsError, match="preset 'ldm-c': choose from ldm-a, ldm-b"):
        preset("ldm-c")
    with pytest.raises(SettingsError, match="unknown setting 'widht'"):
        preset("ldm-a", widht=16)
    with pytest.raises(InputError, match="steps, batch_size and crops_per_photo must be >= 1"):
        preset("ldm-b", steps=0)  # checked, since the override goes through construction
