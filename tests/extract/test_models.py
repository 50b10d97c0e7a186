"""Loading latent diffusion models: the tiny model, diffusers folders, shipped configs, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from lare2.extract.models import SD_V1_CONFIGS, ModelSourceError, load_latent_diffusion
from lare2.extract.tiny_models import save_tiny_sd


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model")


def sd_alphas_cumprod() -> torch.Tensor:
    """SD's training schedule written out: betas linear in sqrt space from 0.00085 to 0.012 over 1000 steps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def test_tiny_folder_round_trip_keeps_weights_and_freezes(tiny_folder: Path) -> None:
    in_memory = load_latent_diffusion("tiny")
    from_folder = load_latent_diffusion(tiny_folder)
    assert from_folder.fingerprint == in_memory.fingerprint
    assert from_folder.source == str(tiny_folder.resolve()) and in_memory.source == "tiny"
    for module in (from_folder.vae, from_folder.unet, from_folder.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    for name, value in in_memory.unet.state_dict().items():
        torch.testing.assert_close(from_folder.unet.state_dict()[name], value, rtol=0, atol=0)


def test_tiny_has_sd_geometry_and_schedule() -> None:
    model = load_latent_diffusion("tiny")
    assert model.prediction_type == "epsilon"
    assert model.vae.config.scaling_factor == pytest.approx(0.18215)
    torch.testing.assert_close(model.scheduler.alphas_cumprod.double(), sd_alphas_cumprod(), rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        latent = model.vae.encode(torch.zeros(1, 3, 64, 48)).latent_dist.mean
        assert latent.shape == (1, 4, 8, 6)  # x8 downsampling, 4 channels
        ids = model.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        text = model.text_encoder(ids)[0]
        assert text.shape == (1, 77, model.unet.config.cross_attention_dim)
        out = model.unet(torch.randn(2, 4, 32, 32), torch.tensor([200, 200]),
                         encoder_hidden_states=text.repeat(2, 1, 1))
        assert out.sample.shape == (2, 4, 32, 32)


def test_seed_changes_weights_and_dtype_keeps_fingerprint(tmp_path: Path) -> None:
    other = load_latent_diffusion(save_tiny_sd(tmp_path / "seed1", seed=1))
    assert other.fingerprint != load_latent_diffusion("tiny").fingerprint
    half = load_latent_diffusion("tiny", dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16
    assert half.fingerprint == load_latent_diffusion("tiny").fingerprint  # fingerprint of the stored weights


def test_any_scheduler_config_becomes_ddpm(tmp_path: Path, tiny_folder: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(tiny_folder, tmp_path / "pndm"))
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update({"_class_name": "PNDMScheduler", "skip_prk_steps": True, "set_alpha_to_one": False,
                   "prediction_type": "v_prediction"})
    config_path.write_text(json.dumps(config))
    model = load_latent_diffusion(folder)
    assert type(model.scheduler) is DDPMScheduler
    assert model.prediction_type == "v_prediction"
    torch.testing.assert_close(model.scheduler.alphas_cumprod.double(), sd_alphas_cumprod(), rtol=1e-6, atol=1e-7)


def test_shipped_sd_v1_configs_agree_with_each_other() -> None:
    unet = json.loads((SD_V1_CONFIGS / "unet" / "config.json").read_text())
    vae = json.loads((SD_V1_CONFIGS / "vae" / "config.json").read_text())
    text = json.loads((SD_V1_CONFIGS / "text_encoder" / "config.json").read_text())
    assert unet["cross_attention_dim"] == text["hidden_size"] == 768
    assert unet["in_channels"] == unet["out_channels"] == vae["latent_channels"] == 4
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8  # 256 px -> 32 x 32 latents
    tokenizer = json.loads((SD_V1_CONFIGS / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == text["max_position_embeddings"] == 77
    from lare2.extract.models import ddpm_scheduler_from

    scheduler = ddpm_scheduler_from(SD_V1_CONFIGS)
    assert scheduler.config.prediction_type == "epsilon"
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), sd_alphas_cumprod(), rtol=1e-6, atol=1e-7)


# ---- errors -------------------------------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    """Hub ids are off (HF_HUB_OFFLINE=1) and any attempt to reach a hub fails the test."""
    import urllib.request

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


REMEDY = ("pass a diffusers folder (vae/ unet/ text_encoder/ tokenizer/ scheduler/), a .safetensors/.ckpt file, "
          "or 'tiny'")


def one_line_error(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, ModelSourceError) and isinstance(error.value, ValueError)
    return message


def test_missing_path_names_what_was_expected(tmp_path: Path, no_network) -> None:
    with pytest.raises(FileNotFoundError, match=r"not a folder or file on disk.*unet/.*\.safetensors.*tiny") as info:
        load_latent_diffusion(tmp_path / "no_such_model")
    assert one_line_error(info) == (f"latent diffusion model {str(tmp_path / 'no_such_model')!r}: not a folder or file "
                                    "on disk; not a hub id either ('org/name', without a path prefix or file suffix); "
                                    f"{REMEDY}")


def test_hub_id_offline_is_one_clear_error(no_network) -> None:
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE.*diffusers folder") as info:
        load_latent_diffusion("someorg/some-model")
    assert one_line_error(info).startswith("latent diffusion model 'someorg/some-model': not a folder or file on disk")


def test_nonexistent_relative_path_is_not_retried_on_the_hub(tmp_path: Path, monkeypatch, no_network) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError) as info:  # `--sd models/sd15`: org/name-shaped, so a hub id were a hub on
        load_latent_diffusion("models/sd15")
    assert one_line_error(info) == (f"latent diffusion model 'models/sd15': not a folder or file on disk "
                                    f"(no {tmp_path.resolve() / 'models/sd15'}); as a hub id: HF_HUB_OFFLINE is set, "
                                    f"and not in the local hub cache; {REMEDY}")
    for path_like in ("./models/sd15", "models/sd15.safetensors", "~/models/sd15", "models/v1/sd15"):
        with pytest.raises(FileNotFoundError) as info:
            load_latent_diffusion(path_like)
        message = one_line_error(info)
        assert message.startswith(f"latent diffusion model {path_like!r}: not a folder or file on disk (no /")
        assert "not a hub id either" in message and message.endswith(REMEDY)


def test_unreachable_hub_is_one_attempt_and_one_line(monkeypatch) -> None:
    import urllib.error
    import urllib.request

    calls = []

    def unreachable(request, timeout):
        calls.append((request.full_url, timeout))
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(FileNotFoundError) as info:
        load_latent_diffusion("someorg/some-model")
    assert one_line_error(info) == ("latent diffusion model 'someorg/some-model': not a folder or file on disk "
                                    f"(no {Path('someorg/some-model').resolve()}); as a hub id: hub unreachable "
                                    "(https://hub.invalid: Name or service not known), and not in the local hub cache; "
                                    f"{REMEDY}")
    assert len(calls) == 1 and calls[0][1] <= 5  # one short probe, no retries


def test_a_hub_model_in_the_local_cache_loads_without_a_hub(tmp_path: Path, monkeypatch, no_network) -> None:
    """Offline, a hub id already downloaded into the hub cache loads from there (no network: no_network)."""
    from lare2.extract import models

    seen = []
    folder = save_tiny_sd(tmp_path / "cached")

    def from_cache(cls_method):
        def load(spec, subfolder=None, local_files_only=False, **kwargs):
            seen.append((subfolder, local_files_only))
            return cls_method(str(folder), subfolder=subfolder, **kwargs)
        return load

    import diffusers
    import transformers

    for owner, name in ((diffusers.AutoencoderKL, "from_pretrained"),
                        (diffusers.UNet2DConditionModel, "from_pretrained"),
                        (transformers.CLIPTextModel, "from_pretrained"),
                        (transformers.CLIPTokenizer, "from_pretrained")):
        monkeypatch.setattr(owner, name, from_cache(getattr(owner, name)))
    scheduler_from = models.ddpm_scheduler_from

    def scheduler_from_cache(spec, local_files_only=False, **kwargs):
        seen.append(("scheduler", local_files_only))
        return scheduler_from(folder, **kwargs)

    monkeypatch.setattr(models, "ddpm_scheduler_from", scheduler_from_cache)
    model = load_latent_diffusion("someorg/some-model")
    assert model.unet is not None and model.source == "someorg/some-model"
    assert sorted(seen) == sorted([(c, True) for c in ("vae", "unet", "text_encoder", "tokenizer", "scheduler")])


def test_folder_without_unet_names_the_missing_subfolder(tmp_path: Path, tiny_folder: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(tiny_folder, tmp_path / "no_unet"))
    shutil.rmtree(folder / "unet")
    with pytest.raises(FileNotFoundError, match=r"missing subfolder\(s\) unet/") as info:
        load_latent_diffusion(folder)
    assert str(folder) in str(info.value)
    assert one_line_error(info).startswith(f"{folder}: not a diffusers model folder, "
                                           "missing subfolder(s) unet/ (expected")

    (folder / "v1-5-pruned.safetensors").write_bytes(b"")  # the user meant the checkpoint inside
    shutil.rmtree(folder / "vae")
    with pytest.raises(ModelSourceError) as info:
        load_latent_diffusion(folder)
    message = one_line_error(info)
    assert "missing subfolder(s) vae/, unet/ " in message
    assert message.endswith("it holds v1-5-pruned.safetensors: pass that file instead")


def test_missing_or_unknown_backbone_names_the_argument_and_the_forms(tmp_path: Path, monkeypatch) -> None:
    from lare2.extract.clip_resnet import load_backbone

    forms = "pass an RN50.pt TorchScript archive, a state dict (.pt/.pth/.bin/.safetensors, keys visual.* or bare), " \
            "or one of 'random-rn50', 'tiny', 'small'"
    missing = tmp_path / "weights" / "RN50.pt"
    with pytest.raises(FileNotFoundError) as info:
        load_backbone(missing)
    assert one_line_error(info) == f"backbone {str(missing)!r} not found: no such file; {forms}"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError) as info:
        load_backbone("RN101")
    assert one_line_error(info) == (f"backbone 'RN101' not found: not a file on disk ({tmp_path.resolve() / 'RN101'}) "
                                    f"nor a named backbone; {forms}")
    with pytest.raises(ModelSourceError) as info:
        load_backbone("models/RN50.pt")
    assert one_line_error(info) == ("backbone 'models/RN50.pt' not found: "
                                    f"no such file ({tmp_path.resolve() / 'models/RN50.pt'}); {forms}")
    with pytest.raises(ModelSourceError) as info:
        load_backbone(tmp_path)
    assert one_line_error(info) == f"backbone {str(tmp_path)!r} not found: a folder, not a weight file; {forms}"


def test_wrong_file_type(tmp_path: Path) -> None:
    path = tmp_path / "model.txt"
    path.write_text("not a model")
    with pytest.raises(ValueError, match=r"model\.txt.*unsupported.*'\.txt'"):
        load_latent_diffusion(path)


def test_single_file_without_tokenizer_says_where_it_looked(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(1)}, str(path))
    with pytest.raises(FileNotFoundError, match=r"no CLIP tokenizer.*tokenizer=FOLDER"):
        load_latent_diffusion(path)


def test_single_file_with_foreign_keys_is_refused(tmp_path: Path, tiny_folder: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=r"not a Stable Diffusion v1 single-file checkpoint.*model\.diffusion_model\."):
        load_latent_diffusion(path, tokenizer=tiny_folder / "tokenizer")


def test_pickled_code_in_ckpt_is_refused(tmp_path: Path, tiny_folder: Path) -> None:
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "callback": print}, path)
    (tmp_path / "tokenizer").symlink_to(tiny_folder / "tokenizer")  # found next to the checkpoint
    with pytest.raises(ValueError, match=r"unsafe\.ckpt: cannot read as a weights-only"):
        load_latent_diffusion(path)


# ---- single-file checkpoints --------------------------------------------------------------------
def to_ldm_layout(model) -> dict[str, torch.Tensor]:
    """An original-LDM single-file state dict of a diffusers SD model (the layout of v1-5-pruned.safetensors).

    UNet -> ``model.diffusion_model.*`` (input/middle/output blocks), VAE -> ``first_stage_model.*``
    (encoder.down / decoder.up reversed, 1x1-conv attention), CLIP -> ``cond_stage_model.transformer.*``.
    """
    out: dict[str, torch.Tensor] = {}

    def copy(state: dict, src: str, dst: str) -> None:
        for key, value in state.items():
            if key == src or key.startswith(src + "."):
                out[dst + key[len(src):]] = value

    unet, config = model.unet.state_dict(), model.unet.config
    u = "model.diffusion_model."

    def unet_resnet(src: str, dst: str) -> None:
        for ours, theirs in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                             ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
                             ("conv_shortcut", "skip_connection")):
            copy(unet, f"{src}.{ours}", f"{u}{dst}.{theirs}")

    for ours, theirs in (("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                         ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")):
        copy(unet, ours, u + theirs)
    levels, per_block, block = len(config.block_out_channels), config.layers_per_block, 1
    for i, kind in enumerate(config.down_block_types):
        for j in range(per_block):
            unet_resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{block}.0")
            if "CrossAttn" in kind:
                copy(unet, f"down_blocks.{i}.attentions.{j}", f"{u}input_blocks.{block}.1")
            block += 1
        if i < levels - 1:
            copy(unet, f"down_blocks.{i}.downsamplers.0.conv", f"{u}input_blocks.{block}.0.op")
            block += 1
    unet_resnet("mid_block.resnets.0", "middle_block.0")
    copy(unet, "mid_block.attentions.0", f"{u}middle_block.1")
    unet_resnet("mid_block.resnets.1", "middle_block.2")
    block = 0
    for i, kind in enumerate(config.up_block_types):
        for j in range(per_block + 1):
            unet_resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{block}.0")
            if "CrossAttn" in kind:
                copy(unet, f"up_blocks.{i}.attentions.{j}", f"{u}output_blocks.{block}.1")
            if j == per_block and i < levels - 1:
                upsampler = 2 if "CrossAttn" in kind else 1  # after the attention, when there is one
                copy(unet, f"up_blocks.{i}.upsamplers.0.conv", f"{u}output_blocks.{block}.{upsampler}.conv")
            block += 1

    vae, v = model.vae.state_dict(), "first_stage_model."

    def vae_resnet(src: str, dst: str) -> None:
        for ours, theirs in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                             ("conv_shortcut", "nin_shortcut")):
            copy(vae, f"{src}.{ours}", f"{v}{dst}.{theirs}")

    def vae_mid(side: str) -> None:
        vae_resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1")
        vae_resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2")
        for ours, theirs in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                             ("to_out.0", "proj_out")):
            for part in ("weight", "bias"):
                value = vae[f"{side}.mid_block.attentions.0.{ours}.{part}"]
                out[f"{v}{side}.mid.attn_1.{theirs}.{part}"] = value[..., None, None] if value.ndim == 2 else value

    levels = len(model.vae.config.block_out_channels)
    for side in ("encoder", "decoder"):
        copy(vae, f"{side}.conv_in", f"{v}{side}.conv_in")
        copy(vae, f"{side}.conv_out", f"{v}{side}.conv_out")
        copy(vae, f"{side}.conv_norm_out", f"{v}{side}.norm_out")
        vae_mid(side)
    for i in range(levels):
        for j in range(model.vae.config.layers_per_block):
            vae_resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        copy(vae, f"encoder.down_blocks.{i}.downsamplers.0.conv", f"{v}encoder.down.{i}.downsample.conv")
        for j in range(model.vae.config.layers_per_block + 1):
            vae_resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{levels - 1 - i}.block.{j}")
        copy(vae, f"decoder.up_blocks.{i}.upsamplers.0.conv", f"{v}decoder.up.{levels - 1 - i}.upsample.conv")
    copy(vae, "quant_conv", v + "quant_conv")
    copy(vae, "post_quant_conv", v + "post_quant_conv")

    for key, value in model.text_encoder.state_dict().items():
        out["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    return out


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_round_trip(tmp_path: Path, tiny_folder: Path, suffix: str) -> None:
    import shutil

    from safetensors.torch import save_file

    tiny = load_latent_diffusion("tiny")
    ldm = to_ldm_layout(tiny)
    assert len(ldm) == sum(len(m.state_dict()) for m in (tiny.vae, tiny.unet, tiny.text_encoder))  # each tensor once
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in ldm.items()}, str(path))
        loaded = load_latent_diffusion(path, tokenizer=tiny_folder / "tokenizer", config=tiny_folder)
    else:
        torch.save({"state_dict": ldm, "global_step": 1}, path)
        shutil.copytree(tiny_folder / "tokenizer", tmp_path / "tokenizer")  # found next to the checkpoint
        loaded = load_latent_diffusion(path, config=tiny_folder)
    assert loaded.fingerprint == tiny.fingerprint  # every weight arrived, unchanged
    assert loaded.source == str(path.resolve())
    assert loaded.tokenizer("a cat").input_ids == tiny.tokenizer("a cat").input_ids
