"""Memory and devices of the Stable Diffusion guidance (tests/tiny_sd.py): only the VAE's encoder
is kept, the text encoder stays in CPU memory and visits the run's device only to encode, encodings
are kept on the CPU, ``low_vram`` slices attention, and on a device SDS grades as on the CPU."""

from __future__ import annotations

import pytest
import torch
from tiny_sd import build_tiny_sd  # tests/ is on sys.path (rootdir-less test modules)

from dreamfusion.config import GuidanceConfig
from dreamfusion.guidance import load_guidance

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


def test_only_what_sds_uses_is_kept(sd_folder):
    g = load_guidance(GuidanceConfig(name="stable-diffusion", model=str(sd_folder)), "cpu", shared=False)
    assert g.vae.decoder is None and g.vae.encoder is not None
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert g.model_input(images).shape == (1, 4, 8, 8)  # the encoder alone makes the latents
    assert next(g.text_encoder.parameters()).device.type == "cpu" and g.encoding_device().type == "cpu"
    g.prepare(["a cube, front view", ""])
    assert all(g.text_cache.get(t).device.type == "cpu" for t in ("a cube, front view", ""))


def test_low_vram_slices_the_unets_attention(sd_folder):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    plain = load_guidance(GuidanceConfig(name="stable-diffusion", model=str(sd_folder)), "cpu", shared=False)
    low = load_guidance(GuidanceConfig(name="stable-diffusion", model=str(sd_folder), low_vram=True), "cpu", shared=False)
    assert all(isinstance(p, SlicedAttnProcessor) for p in low.unet.attn_processors.values())
    assert not any(isinstance(p, SlicedAttnProcessor) for p in plain.unet.attn_processors.values())
    x_t, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([50, 900])
    cond = plain.encode(["the cube", ""])
    with torch.no_grad():
        torch.testing.assert_close(low.predict_noise(x_t, t, cond), plain.predict_noise(x_t, t, cond), rtol=1e-5, atol=1e-5)


@pytest.mark.device
def test_stable_diffusion_on_the_device(device, sd_folder):
    """fp32 on the device grades as the CPU does (same draws); the default precision there (fp16 on
    CUDA) gives a finite gradient; the text encoder is back in CPU memory after encoding."""
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    texts = ["the cube", "a cat"]
    results = []
    for where, half in (("cpu", False), (device, False), (device, True)):
        g = load_guidance(GuidanceConfig(name="stable-diffusion", model=str(sd_folder), half_precision=half), where, shared=False)
        x = images.to(where).requires_grad_(True)
        out = g.sds_loss(x, texts, (0.02, 0.98), torch.Generator().manual_seed(3))
        out["loss"].backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        assert next(g.text_encoder.parameters()).device.type == "cpu" and next(g.unet.parameters()).device.type == torch.device(where).type
        results.append((out["t"].cpu(), x.grad.cpu(), next(g.unet.parameters()).dtype))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][0], results[2][0])
    tol = 1e-6 if device.type == "cpu" else 2e-2
    torch.testing.assert_close(results[1][1], results[0][1], rtol=tol, atol=tol * 1e-2)
    assert results[2][2] == (torch.float16 if device.type == "cuda" else torch.float32)


def test_the_text_encoder_visits_the_gpu_only_when_it_fits():
    from dreamfusion.guidance.pipeline import TEXT_ENCODER_HEADROOM, encoding_device

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    weights = 9 * 2**30  # IF's T5-XXL in fp16
    roomy = int(weights * (1 + TEXT_ENCODER_HEADROOM))
    assert encoding_device(gpu, False, roomy, weights) == gpu
    assert encoding_device(gpu, False, roomy - 1, weights) == cpu  # beside IF-I-XL on a 16 GB card: the CPU encodes
    assert encoding_device(gpu, True, 10 * roomy, weights) == cpu  # low_vram: never on the GPU
    assert encoding_device(cpu, False, 10 * roomy, weights) == cpu
