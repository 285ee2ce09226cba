"""The shipped embedded prior: it loads offline, draws objects, and follows the text.

Thresholds: the issue asks for >= 80% noun and colour accuracy under a diffusion classifier.
The shipped weights measured 96% and 94% (docs/prior.md); the asserts hold them to the target.
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
    seeds = [0, 1, 2]
    prompts = ["a red cube, front view", "a green cube, front view"]  # the green cube is a held-out pair
    img = sample_images(unet, cfg, enc, [p for p in prompts for _ in seeds], seeds * len(prompts), steps=40)
    assert img.shape == (6, 3, 32, 32)
    corners = torch.stack([img[:, :, 0, 0], img[:, :, 0, -1], img[:, :, -1, 0], img[:, :, -1, -1]])
    # a light background (the shipped weights' samples are still grainy there: docs/prior.md)
    assert corners.mean() > 0.6
    red, green = img[:, :, 12:20, 12:20].mean(dim=(2, 3)).reshape(2, len(seeds), 3).mean(dim=1)  # mean centre colour
    assert red[0] > red[1] + 0.2 and red[0] > red[2] + 0.2, red
    assert green[1] > green[0] + 0.1 and green[1] > green[2] + 0.2, green


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
