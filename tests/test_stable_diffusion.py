"""StableDiffusionGuidance on a tiny, randomly initialised SD pipeline saved to disk and loaded the
way a user's --model folder is; nothing touches the network."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from tiny_sd import build_tiny_sd  # tests/ is on sys.path (rootdir-less test modules)

from dreamfusion.guidance import GuidanceConfig, GuidanceError, load_guidance

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="module")
def guidance(sd_folder):
    return load_guidance(GuidanceConfig(name="stable-diffusion", model=str(sd_folder), guidance_scale=7.5), "cpu")


def test_loads_frozen_components(guidance, sd_folder):
    from dreamfusion.guidance.stable_diffusion import StableDiffusionGuidance

    assert isinstance(guidance, StableDiffusionGuidance) and guidance.name == "stable-diffusion"
    for module in (guidance.unet, guidance.vae, guidance.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert guidance.max_tokens == 77
    assert guidance.alphas_cumprod.shape == (1000,)
    assert torch.all(guidance.alphas_cumprod[1:] < guidance.alphas_cumprod[:-1])
    assert guidance.vae_scale_factor == 2 and guidance.image_size == 16
    # half precision is a CUDA-only option: on the CPU the weights stay fp32
    half = load_guidance(GuidanceConfig(name="stable-diffusion", model=str(sd_folder), half_precision=True), "cpu")
    assert half.dtype == torch.float32 and next(half.unet.parameters()).dtype == torch.float32


def test_encode_shapes_and_cache(guidance):
    cond = guidance.encode(["the cube", "a cat and a dog"])
    assert cond.shape == (2, 77, 16) and torch.isfinite(cond).all()
    assert not torch.allclose(cond[0], cond[1])
    both = guidance.condition(["the cube", "", "the cube"])
    assert both.shape == (3, 77, 16)
    torch.testing.assert_close(both[0], cond[0])
    torch.testing.assert_close(both[2], cond[0])


def test_truncation_note(guidance):
    assert guidance.truncation_note("the cube") is None
    note = guidance.truncation_note("the cube " + "and " * 100)
    assert note is not None and "77" in note and "the cube" in note


def test_model_input_latents_and_resize(guidance):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    x = guidance.model_input(images)
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    (g,) = torch.autograd.grad(x.sum(), images)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # [0, 1] -> [-1, 1] -> the posterior's mean, times the VAE's scaling factor; no draw, so the
    # global generator's state does not matter
    torch.manual_seed(1)
    x = guidance.model_input(images)
    torch.manual_seed(2)
    with torch.no_grad():
        ref = guidance.vae.encode(images * 2 - 1).latent_dist.mean * guidance.vae.config.scaling_factor
    torch.testing.assert_close(x.detach(), ref)
    # other render sizes are resized bilinearly to the VAE's resolution
    big = torch.rand(1, 3, 40, 40)
    x = guidance.model_input(big)
    with torch.no_grad():
        small = torch.nn.functional.interpolate(big, size=(16, 16), mode="bilinear", align_corners=False)
        ref = guidance.vae.encode(small * 2 - 1).latent_dist.mean * guidance.vae.config.scaling_factor
    assert x.shape == (1, 4, 8, 8)
    torch.testing.assert_close(x, ref)


def test_sds_loss_gradient_reaches_images(guidance):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    out = guidance.sds_loss(images, ["the cube", "a cat"], (0.02, 0.98), generator=torch.Generator().manual_seed(0))
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert out["t"].shape == (2,) and ((out["t"] >= 20) & (out["t"] < 980)).all()
    out["loss"].backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def _expected_latent_grad(g, x, texts, t_range, seed):
    """w(t)(eps_hat - eps) / B, recomputed by hand with sds_loss's draws from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    b, n_t = x.shape[0], g.alphas_cumprod.shape[0]
    lo, hi = int(t_range[0] * n_t), max(int(t_range[0] * n_t) + 1, int(t_range[1] * n_t))
    t = torch.randint(lo, hi, (b,), generator=gen)
    eps = torch.randn(x.shape, generator=gen)
    a = g.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * x.detach() + (1 - a).sqrt() * eps
    with torch.no_grad():
        eps_c = g.unet(z_t, t, encoder_hidden_states=g.encode(texts)).sample
        eps_u = g.unet(z_t, t, encoder_hidden_states=g.encode([""] * b)).sample
    w = g.cfg.guidance_scale
    eps_hat = (1 + w) * eps_c - w * eps_u
    return (1 - a) * (eps_hat - eps) / b, t


def test_sds_gradient_equals_weighted_noise_residual(guidance):
    """d loss / d images = J_vae^T [w(t)(eps_hat - eps) / B]: the residual pulled back through the
    VAE encoder, with no U-Net Jacobian."""
    texts, t_range, seed = ["the cube", "a cat"], (0.02, 0.98), 7
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    torch.manual_seed(123)  # the VAE's latent sample draws from the global generator
    out = guidance.sds_loss(images, texts, t_range, generator=torch.Generator().manual_seed(seed))
    out["loss"].backward()

    torch.manual_seed(123)
    images2 = images.detach().clone().requires_grad_(True)
    x = guidance.model_input(images2)
    expected, t = _expected_latent_grad(guidance, x, texts, t_range, seed)
    assert torch.equal(t, out["t"])
    (want,) = torch.autograd.grad(x, images2, grad_outputs=expected)
    assert want.abs().max() > 1e-3
    # base.sds_loss's surrogate 0.5||x - sg(x - g)||^2 returns g as x - (x - g): exact only up to
    # float32 rounding of |x| (~1e-7 per unit), hence the absolute tolerance
    torch.testing.assert_close(images.grad, want, rtol=1e-4, atol=2e-6)
    assert out["grad_norm"] == pytest.approx(float((expected * 2).norm() / 2), rel=1e-4)


def test_sds_gradient_in_latent_space(sd_folder):
    """With the latents as the input, the gradient is the residual itself."""
    from dreamfusion.guidance.stable_diffusion import StableDiffusionGuidance

    class LatentInput(StableDiffusionGuidance):
        def model_input(self, images):
            return images

    g = LatentInput(GuidanceConfig(name="stable-diffusion", model=str(sd_folder), guidance_scale=20.0, weighting="sds"))
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    texts = ["the cube", "a cat", "the cube"]
    out = g.sds_loss(latents, texts, (0.3, 0.7), generator=torch.Generator().manual_seed(5))
    out["loss"].backward()
    expected, t = _expected_latent_grad(g, latents, texts, (0.3, 0.7), 5)
    assert torch.equal(t, out["t"])
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(latents.grad, expected, rtol=1e-4, atol=1e-5)


def test_optimising_an_image(guidance):
    image = torch.nn.Parameter(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)))
    start = image.detach().clone()
    opt = torch.optim.Adam([image], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        out = guidance.sds_loss(image.clamp(0, 1), ["the cube"], (0.02, 0.98), generator=gen)
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
        assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
        opt.step()
    assert torch.isfinite(image).all()
    assert (image.detach() - start).abs().max() > 0.05


def test_v_prediction_is_converted_to_eps(guidance, sd_folder, tmp_path):
    v_folder = tmp_path / "sd-v"
    shutil.copytree(sd_folder, v_folder)
    config = v_folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    g = load_guidance(GuidanceConfig(name="stable-diffusion", model=str(v_folder)))
    assert guidance.prediction_type == "epsilon" and g.prediction_type == "v_prediction"
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    cond = g.encode(["the cube", "a cat"])
    with torch.no_grad():
        v = g.unet(x_t, t, encoder_hidden_states=cond).sample
        torch.testing.assert_close(guidance.predict_noise(x_t, t, cond), v)
        a = g.alphas_cumprod[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(g.predict_noise(x_t, t, cond), a.sqrt() * v + (1 - a).sqrt() * x_t)


def _assert_one_line_error(model, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(GuidanceError) as info:
        load_guidance(GuidanceConfig(name="stable-diffusion", model=model))
    elapsed = time.monotonic() - start
    msg = str(info.value)
    assert elapsed < 5, elapsed
    assert "\n" not in msg and repr(model or "stabilityai/stable-diffusion-2-1-base") in msg and "--model" in msg
    assert match in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    return msg


def test_missing_folder_fails_fast(tmp_path, monkeypatch):
    _assert_one_line_error(str(tmp_path / "no-such-folder"), "no folder of that name", monkeypatch)


def test_offline_hub_id_fails_fast(monkeypatch):
    _assert_one_line_error("nobody-here/no-such-model", "HF_HUB_OFFLINE", monkeypatch)


def test_default_model_offline_fails_fast(monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("stabilityai/stable-diffusion-2-1-base", "model_index.json"), str):
        pytest.skip("the default model is in the local cache")
    _assert_one_line_error("", "HF_HUB_OFFLINE", monkeypatch)


def test_incomplete_folder_names_the_missing_part(sd_folder, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    shutil.rmtree(broken / "unet")
    msg = _assert_one_line_error(str(broken), "unet/", monkeypatch)
    assert "no usable unet/" in msg


def test_two_runs_load_the_pipeline_once(sd_folder, monkeypatch):
    """Two Trainers on the same Stable Diffusion folder: the pipeline is loaded once and both
    runs use the same weights (on a GPU Space a copy per visitor would run it out of memory)."""
    import dataclasses

    from dreamfusion.config import FieldConfig
    from dreamfusion.guidance import release_shared, shared_priors
    from dreamfusion.guidance.stable_diffusion import StableDiffusionGuidance
    from dreamfusion.trainer import TrainConfig, Trainer

    release_shared()
    loads = []
    init = StableDiffusionGuidance.__init__

    def counting(self, *args, **kwargs):
        loads.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionGuidance, "__init__", counting)
    try:
        cfg = TrainConfig(steps=2, render_size=32, views=1, preview_every=0, field=FieldConfig(resolution=16),
                          guidance=GuidanceConfig(name="stable-diffusion", model=str(sd_folder)))
        a = Trainer(cfg, "a red cube")
        b = Trainer(dataclasses.replace(cfg, seed=1), "a blue sphere")
        a.run()
        b.run()
        assert len(loads) == 1
        assert a.guidance is not b.guidance and a.guidance.unet is b.guidance.unet and a.guidance.vae is b.guidance.vae
        assert len([p for p in shared_priors() if isinstance(p, StableDiffusionGuidance)]) == 1
        assert a.step_count == b.step_count == 2
    finally:
        release_shared()
