"""DeepFloydIFGuidance on a tiny, randomly initialised IF stage-I pipeline saved to disk and loaded
the way a user's --model folder is (tests/tiny_if.py); nothing touches the network."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import time

import pytest
import torch
from tiny_if import build_tiny_if  # tests/ is on sys.path (rootdir-less test modules)

from dreamfusion.config import GUIDANCES, USER_GUIDANCES, FieldConfig, GuidanceConfig, OptimConfig, TrainConfig, resolve_guidance, with_settings
from dreamfusion.guidance import GuidanceError, load_guidance
from dreamfusion.guidance.base import TextCache

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def if_folder(tmp_path_factory):
    return build_tiny_if(tmp_path_factory.mktemp("tiny") / "if")


@pytest.fixture(scope="module")
def guidance(if_folder):
    return load_guidance(GuidanceConfig(name="deepfloyd-if", model=str(if_folder)), "cpu")


# ----------------------------------------------------------------------------- the registry


def test_registry_gives_if_the_peers_defaults():
    assert "deepfloyd-if" in USER_GUIDANCES and GUIDANCES["deepfloyd-if"].guidance_scale == 20.0
    g = resolve_guidance(GuidanceConfig(name="deepfloyd-if"))
    assert g.guidance_scale == 20.0 and (g.t_min, g.t_max, g.t_max_end, g.t_min_start) == (0.02, 0.98, None, None)
    assert g.weighting == "sds"  # the paper's w(t) = sigma_t^2
    assert resolve_guidance(g) == g
    # a setting given is kept; the other priors keep GuidanceConfig's schedule
    mine = resolve_guidance(GuidanceConfig(name="deepfloyd-if", t_max_end=0.5, guidance_scale=7.0))
    assert (mine.guidance_scale, mine.t_max_end, mine.t_min_start) == (7.0, 0.5, None)
    for name in ("embedded", "stable-diffusion"):
        other = resolve_guidance(GuidanceConfig(name=name))
        assert (other.t_max_end, other.t_min_start) == (GuidanceConfig().t_max_end, GuidanceConfig().t_min_start)
    cfg = with_settings(TrainConfig(), guidance="deepfloyd-if")
    assert cfg.guidance.name == "deepfloyd-if" and resolve_guidance(cfg.guidance).guidance_scale == 20.0


# ----------------------------------------------------------------------------- the components


def test_loads_a_frozen_stage_one(guidance):
    from dreamfusion.guidance.deepfloyd_if import DeepFloydIFGuidance

    assert isinstance(guidance, DeepFloydIFGuidance) and guidance.name == "deepfloyd-if"
    for module in (guidance.unet, guidance.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert guidance.image_size == 16 and guidance.max_tokens == 77 and guidance.dtype == torch.float32
    assert guidance.unet.config.in_channels == 3 and guidance.unet.config.out_channels == 6
    a = guidance.alphas_cumprod
    assert a.shape == (1000,) and torch.all(a[1:] < a[:-1]) and a[0] > 0.999 and a[-1] < 1e-3  # IF's cosine schedule
    assert next(guidance.text_encoder.parameters()).device.type == "cpu"


def test_texts_are_t5_states_with_the_padding_masked(guidance):
    cond = guidance.encode(["a red cube", "the cat and the dog"])
    assert cond.shape == (2, 77, 16) and torch.isfinite(cond).all() and not torch.allclose(cond[0], cond[1])
    tok = guidance.tokenizer(["a red cube"], padding="max_length", max_length=77, return_tensors="pt")
    assert tok.input_ids[0, 3] == guidance.tokenizer.eos_token_id and (tok.input_ids[0, 4:] == guidance.tokenizer.pad_token_id).all()
    with torch.no_grad():
        masked = guidance.text_encoder(tok.input_ids, attention_mask=tok.attention_mask)[0]
        unmasked = guidance.text_encoder(tok.input_ids)[0]
    torch.testing.assert_close(cond[:1], masked)
    assert not torch.allclose(masked, unmasked)  # the mask matters: IF's pipelines pass it
    torch.testing.assert_close(guidance.encode(["  A Red CUBE "]), guidance.encode(["a red cube"]))  # IF's text preprocessing
    assert guidance.truncation_note("a red cube") is None
    note = guidance.truncation_note("a red cube " + "and the dog " * 40)
    assert note is not None and "T5" in note and "77" in note and "a red cube" in note


def test_texts_are_encoded_once_per_prompt_and_kept_on_the_cpu(guidance, monkeypatch):
    from dreamfusion.trainer import graded_texts

    g = load_guidance(GuidanceConfig(name="deepfloyd-if", model=guidance.cfg.model))
    g.text_cache = TextCache()  # this copy's own, to count
    encoded = []
    real = g.encode
    monkeypatch.setattr(g, "encode", lambda texts: encoded.extend(texts) or real(texts))
    g.prepare(graded_texts("a red cube"))
    assert sorted(encoded) == sorted(["a red cube, front view", "a red cube, side view", "a red cube, back view", "a red cube, overhead view", ""])
    assert all(g.text_cache.get(t).device.type == "cpu" for t in encoded)
    cond = g.condition(["a red cube, side view", "", "a red cube, side view"])
    assert len(encoded) == 5 and cond.shape == (3, 77, 16) and cond.device == g.device
    torch.testing.assert_close(cond[0], cond[2])


def test_the_text_cache_is_bounded():
    cache = TextCache(size=2)
    for text in ("a", "b"):
        cache.put(text, torch.zeros(1))
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("c", torch.ones(1))
    assert cache.texts() == ["a", "c"] and "b" not in cache and len(cache) == 2
    with pytest.raises(ValueError):
        TextCache(size=0)


# ----------------------------------------------------------------------------- SDS


def test_renders_are_graded_as_pixels_at_the_models_size(guidance):
    big = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    x = guidance.model_input(big)
    want = torch.nn.functional.interpolate(big, size=(16, 16), mode="bilinear", align_corners=False) * 2 - 1
    assert x.shape == (2, 3, 16, 16)
    torch.testing.assert_close(x, want)
    assert x.min() >= -1 and x.max() <= 1


def test_sds_gradient_is_the_guided_noise_residual_on_the_pixels(guidance):
    """d loss / d images = 2 w(t) (eps_hat - eps) / B: the pixels are IF's input ([0, 1] -> [-1, 1]),
    eps_hat = (1 + w) eps(z_t; y) - w eps(z_t; "") with the U-Net's first three channels, w = 20."""
    texts, t_range, seed, b = ["a red cube", "the cat"], (0.02, 0.98), 7, 2
    images = torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = guidance.sds_loss(images, texts, t_range, generator=torch.Generator().manual_seed(seed))
    out["loss"].backward()

    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(20, 980, (b,), generator=gen)
    eps = torch.randn(b, 3, 16, 16, generator=gen)
    a = guidance.alphas_cumprod[t].view(-1, 1, 1, 1)
    x = images.detach() * 2 - 1
    z_t = a.sqrt() * x + (1 - a).sqrt() * eps
    with torch.no_grad():
        eps_c = guidance.unet(z_t, t, encoder_hidden_states=guidance.encode(texts)).sample[:, :3]
        eps_u = guidance.unet(z_t, t, encoder_hidden_states=guidance.encode([""] * b)).sample[:, :3]
    assert (eps_c - eps_u).abs().max() > 1e-4  # the unconditional branch is another prediction
    w = 20.0
    assert guidance.cfg.guidance_scale == w
    residual = (1 - a) * ((1 + w) * eps_c - w * eps_u - eps) / b
    assert torch.equal(out["t"], t)
    assert residual.abs().max() > 0.1
    # the U-Net sees both branches in one batch here and two there: rounding, amplified by w + 1
    torch.testing.assert_close(images.grad, 2 * residual, rtol=1e-4, atol=1e-4)
    assert out["grad_norm"] == pytest.approx(float(residual.norm()), rel=1e-4)


def test_if_guidance_moves_a_scene(if_folder):
    """Through the trainer: the SDS gradient reaches the density grid, with IF's own timesteps."""
    from dreamfusion.trainer import Trainer

    cfg = TrainConfig(steps=3, render_size=32, views=1, preview_every=0, field=FieldConfig(resolution=16),
                      optim=OptimConfig(grad_norm_every=1), guidance=GuidanceConfig(name="deepfloyd-if", model=str(if_folder)))
    trainer = Trainer(cfg, "a red cube")
    assert (trainer.cfg.guidance.t_max_end, trainer.cfg.guidance.guidance_scale) == (None, 20.0)
    start = trainer.field.density_grid.detach().clone()
    trainer.run()
    last = trainer.history[-1]
    assert trainer.step_count == 3 and not last["skipped"] and last["t_max"] == 0.98
    assert all(m["grad_norms"]["guidance"]["density"] > 0 for m in trainer.history if "grad_norms" in m)
    assert (trainer.field.density_grid.detach() - start).abs().max() > 0


def test_low_vram_slices_attention_and_encodes_on_the_cpu(if_folder, guidance):
    from diffusers.models.attention_processor import SlicedAttnAddedKVProcessor

    low = load_guidance(GuidanceConfig(name="deepfloyd-if", model=str(if_folder), low_vram=True), "cpu", shared=False)
    assert all(isinstance(p, SlicedAttnAddedKVProcessor) for p in low.unet.attn_processors.values())
    assert not any(isinstance(p, SlicedAttnAddedKVProcessor) for p in guidance.unet.attn_processors.values())
    assert low.encoding_device().type == "cpu"
    x_t, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)), torch.tensor([100, 800])
    cond = guidance.encode(["a red cube", ""])
    with torch.no_grad():
        torch.testing.assert_close(low.predict_noise(x_t, t, cond), guidance.predict_noise(x_t, t, cond), rtol=1e-5, atol=1e-5)


@pytest.mark.device
def test_if_on_the_device(device, if_folder):
    """fp32 on the device grades as the CPU does (same draws); the default precision on the device
    (fp16 on CUDA) gives a finite gradient, and the text encoder is back on the CPU after encoding."""
    images = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    texts = ["a red cube, front view", "a red cube, back view"]
    results = []
    for where, half in (("cpu", False), (device, False), (device, True)):
        g = load_guidance(GuidanceConfig(name="deepfloyd-if", model=str(if_folder), half_precision=half), where, shared=False)
        x = images.to(where).requires_grad_(True)
        out = g.sds_loss(x, texts, (0.02, 0.98), torch.Generator().manual_seed(2))
        out["loss"].backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        assert next(g.text_encoder.parameters()).device.type == "cpu" and g.text_cache.get(texts[0]).device.type == "cpu"
        results.append((out["t"].cpu(), x.grad.cpu(), g.dtype))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][0], results[2][0])
    tol = 1e-6 if device.type == "cpu" else 2e-2
    torch.testing.assert_close(results[1][1], results[0][1], rtol=tol, atol=tol * 1e-2)
    assert results[2][2] == (torch.float16 if device.type == "cuda" else torch.float32)


# ----------------------------------------------------------------------------- without the weights: one line


def _assert_one_line_error(model, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(GuidanceError) as info:
        load_guidance(GuidanceConfig(name="deepfloyd-if", model=model), shared=False)
    msg = str(info.value)
    assert time.monotonic() - start < 5
    assert "\n" not in msg and msg.startswith("deepfloyd-if model") and repr(model or "DeepFloyd/IF-I-XL-v1.0") in msg and "--model" in msg
    assert match in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    return msg


def test_missing_folder_is_one_line(tmp_path, monkeypatch):
    _assert_one_line_error(str(tmp_path / "no-such-folder"), "no folder of that name", monkeypatch)


def test_offline_hub_id_is_one_line(monkeypatch):
    _assert_one_line_error("nobody-here/no-such-if", "HF_HUB_OFFLINE", monkeypatch)


def test_default_model_offline_is_one_line(monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("DeepFloyd/IF-I-XL-v1.0", "model_index.json"), str):
        pytest.skip("the default model is in the local cache")
    msg = _assert_one_line_error("", "HF_HUB_OFFLINE", monkeypatch)
    assert "licence" in msg


def test_incomplete_folder_names_the_missing_part(if_folder, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(if_folder, broken)
    shutil.rmtree(broken / "unet")
    assert "no usable unet/" in _assert_one_line_error(str(broken), "unet/", monkeypatch)


@pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is not None, reason="checks the message without the sentencepiece package")
def test_a_sentencepiece_tokenizer_without_the_package_says_what_to_install(if_folder, tmp_path, monkeypatch):
    """DeepFloyd's repositories ship the T5 tokenizer as spiece.model only."""
    from transformers.utils import sentencepiece_model_pb2_new as spm

    folder = tmp_path / "spm"
    shutil.copytree(if_folder, folder)
    (folder / "tokenizer" / "tokenizer.json").unlink()
    model = spm.ModelProto()
    for piece, kind in (("<pad>", 3), ("</s>", 3), ("<unk>", 2), ("\u2581a", 1)):
        p = model.pieces.add()
        p.piece, p.score, p.type = piece, 0.0, kind
    (folder / "tokenizer" / "spiece.model").write_bytes(model.SerializeToString())
    msg = _assert_one_line_error(str(folder), "pip install sentencepiece", monkeypatch)
    assert "no usable tokenizer/" in msg


def test_a_super_resolution_stage_is_refused(if_folder, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "stage2"
    shutil.copytree(if_folder, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    keep = {k: v for k, v in config.items() if not k.startswith("_")}
    UNet2DConditionModel(**{**keep, "in_channels": 6}).save_pretrained(folder / "unet")
    _assert_one_line_error(str(folder), "not IF's stage I", monkeypatch)


def test_the_command_line_says_one_line_without_the_weights(tmp_path, capsys, monkeypatch):
    from dreamfusion.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    args = ["generate", "a red cube", "--out", str(out), "--guidance", "deepfloyd-if", "--model", "/nonexistent", "--quiet", "--steps", "1"]
    assert main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "deepfloyd-if" in lines[0] and "/nonexistent" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_two_runs_share_one_loaded_pipeline(if_folder):
    from dreamfusion.guidance import release_shared
    from dreamfusion.trainer import Trainer

    release_shared()
    try:
        cfg = TrainConfig(steps=1, render_size=16, views=1, preview_every=0, field=FieldConfig(resolution=12),
                          guidance=GuidanceConfig(name="deepfloyd-if", model=str(if_folder)))
        a, b = Trainer(cfg, "a red cube"), Trainer(dataclasses.replace(cfg, seed=1), "a blue sphere")
        assert a.guidance is not b.guidance and a.guidance.unet is b.guidance.unet and a.guidance.text_cache is b.guidance.text_cache
    finally:
        release_shared()
