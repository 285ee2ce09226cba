"""The shipped embedded prior: it loads offline, draws objects, and follows the text.

Thresholds: the issue asks for >= 80% noun and colour accuracy under a diffusion classifier.
The figures the shipped weights reach are in docs/prior.md; the asserts below hold the shipped
weights to what they were measured to do (NOUN_MIN, COLOUR_MIN), well above chance (1/16, 1/12).
"""

from pathlib import Path

import pytest
import torch

from dreamfusion.guidance import GuidanceConfig, load_guidance
from dreamfusion.prior.evaluate import text_following
from dreamfusion.prior.model import ASSET_DIR, RESUME_FILE, WEIGHTS_FILE, PriorConfig, TextEncoder, load_unet
from dreamfusion.prior.sampling import sample_images

NOUN_MIN = 0.8
COLOUR_MIN = 0.8


@pytest.fixture(scope="module")
def shipped():
    unet, cfg = load_unet(ASSET_DIR)
    return unet, cfg, TextEncoder(cfg.max_tokens)


def test_shipped_files_are_small_and_complete():
    files = {p.name: p.stat().st_size for p in Path(ASSET_DIR).iterdir()}
    assert WEIGHTS_FILE in files and "config.json" in files
    total = sum(files.values())
    assert total < 40 * 2**20, f"assets/prior is {total / 2**20:.1f} MiB"
    assert PriorConfig.load(ASSET_DIR).image_size == 32
    assert RESUME_FILE in files  # training can resume from the shipped state


def test_samples_show_a_coloured_object_on_white(shipped):
    unet, cfg, enc = shipped
    img = sample_images(unet, cfg, enc, ["a red cube, front view", "a blue sphere, front view"], [0, 0], steps=25)
    assert img.shape == (2, 3, 32, 32)
    corners = torch.stack([img[:, :, 0, 0], img[:, :, 0, -1], img[:, :, -1, 0], img[:, :, -1, -1]])
    assert corners.mean() > 0.85  # white background
    centre = img[:, :, 12:20, 12:20].mean(dim=(2, 3))  # (2, 3)
    assert centre[0, 0] > centre[0, 2] + 0.2  # the red cube is red
    assert centre[1, 2] > centre[1, 0] + 0.2  # the blue sphere is blue


def test_the_prior_follows_text_under_a_diffusion_classifier(shipped):
    unet, cfg, enc = shipped
    report = text_following(unet, cfg, enc, n_images=24, held_out=8, seed=0)
    print(report)
    assert report.noun_accuracy >= NOUN_MIN, report
    assert report.colour_accuracy >= COLOUR_MIN, report


def test_embedded_guidance_loads_offline_by_default():
    guidance = load_guidance(GuidanceConfig())
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    out = guidance.sds_loss(images, ["a red cube, front view", "a red cube, back view"], (0.02, 0.98), torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
