"""The shipped embedded prior: it loads offline, draws objects, and follows the text.

Thresholds: >= 80% noun and colour accuracy under a diffusion classifier (the first issue's
target). The shipped weights (prior v2 at step 17,500) measured nouns 100% and colours 100% on 24
renders, and 54% / 72% with every candidate paraphrased in words never trained on, and its camera
classifier 77% top-1 on noise seed 0 (81% on seed 1; chance 12.5%), 86% within 45 degrees
(chance 37.5%) (docs/prior.md); the asserts hold the text and the camera classifier to issue
#10's targets (the camera's 75% top-1 on seed 0), the paraphrased classifier to well above chance.
"""

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from dreamfusion.cameras import sample_cameras, sample_lights
from dreamfusion.config import TRAINING_PRIOR_DIR, TrainConfig, TrainPriorConfig, validate_config
from dreamfusion.guidance import GuidanceConfig, RenderBatch, load_guidance
from dreamfusion.prior.evaluate import text_following
from dreamfusion.prior.model import (
    ASSET_DIR,
    RESUME_FILE,
    WEIGHTS_FILE,
    FrozenUNet,
    GraphCache,
    PriorConfig,
    RenderConditions,
    TextEncoder,
    load_unet,
    predict_noise,
)
from dreamfusion.prior.sampling import sample_images

NOUN_MIN = 0.8
COLOUR_MIN = 0.8
PARAPHRASE_MIN = 0.35


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
    # the shipped prior is a snapshot; training resumes from the prior in training, whose resume state
    # is of the shipped weights' step, so the shipped weights and config are its own (one copy of them)
    from dreamfusion.prior.train import resume_snapshot

    assert (TRAINING_PRIOR_DIR / RESUME_FILE).exists() and not (TRAINING_PRIOR_DIR / WEIGHTS_FILE).exists()
    assert resume_snapshot(TRAINING_PRIOR_DIR) == ASSET_DIR
    assert TrainPriorConfig().out == TRAINING_PRIOR_DIR


def test_samples_show_the_coloured_object_asked_for(shipped):
    """Samples of "a red cube" are redder against their own background than samples of "a green
    cube" (a held-out pair), and the other way round for green. A prior trained on white only
    draws on white; one trained on random solid backgrounds (v2 from step 2,500) draws on any
    colour, so the colour is read against each sample's corners."""
    unet, cfg, enc = shipped
    seeds = [0, 1, 2]
    prompts = ["a red cube, front view", "a green cube, front view"]  # the green cube is a held-out pair
    img = sample_images(unet, cfg, enc, [p for p in prompts for _ in seeds], seeds * len(prompts), steps=40)
    assert img.shape == (6, cfg.channels, 32, 32)
    img = img[:, :3]
    corners = torch.stack([img[:, :, 0, 0], img[:, :, 0, -1], img[:, :, -1, 0], img[:, :, -1, -1]])  # (4, B, 3)
    if cfg.random_background == 0:
        assert corners.mean() > 0.6  # a light background (still grainy there: docs/prior.md)
    contrast = img[:, :, 12:20, 12:20].mean(dim=(2, 3)) - corners.mean(dim=0)  # centre against background
    red, green = contrast.reshape(2, len(seeds), 3).mean(dim=1)
    assert red[0] > green[0] + 0.1, (red, green)
    assert green[1] > red[1] + 0.1, (red, green)


def test_the_prior_follows_text_under_a_diffusion_classifier(shipped):
    unet, cfg, enc = shipped
    report = text_following(unet, cfg, enc, n_images=24, held_out=8, seed=0)
    print(report)
    assert report.noun_accuracy >= NOUN_MIN, report
    assert report.colour_accuracy >= COLOUR_MIN, report


def test_the_prior_follows_paraphrases_it_never_trained_on(shipped):
    """Paraphrase robustness: the same diffusion classifier with every candidate worded in words
    and templates no training caption uses ("a teacup in ivory", "christmas tree"). Chance is 1 in
    16 nouns and 1 in 12 colours; the threshold asks for several times that."""
    unet, cfg, enc = shipped
    report = text_following(unet, cfg, enc, n_images=12, held_out=4, seed=0, paraphrase=True)
    print(report)
    assert report.n_images == 12 and report.n_colour_images > 0
    assert report.noun_accuracy >= PARAPHRASE_MIN, report
    assert report.colour_accuracy >= PARAPHRASE_MIN, report


def test_embedded_guidance_loads_offline_by_default():
    """The shipped prior loads with no network and grades renders: colour and, for a prior with
    an opacity channel, the opacity too (it needs them: one clear error without)."""
    from dreamfusion.cameras import make_cameras, sample_lights
    from dreamfusion.guidance import GuidanceError

    guidance = load_guidance(GuidanceConfig())
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    opacity = torch.rand(2, 1, 64, 64, requires_grad=True)
    cams = make_cameras(torch.tensor([0.0, 180.0]), 20.0, 1.9, 1.27)
    renders = RenderBatch(images, opacity, cams, sample_lights(guidance.camera_config(), cams, torch.Generator().manual_seed(0)), ["lit", "lit"])
    out = guidance.sds_loss(renders, ["a red cube, front view", "a red cube, back view"], (0.02, 0.98), torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    if guidance.prior_cfg.channels == 4:
        assert torch.isfinite(opacity.grad).all() and opacity.grad.abs().sum() > 0
        with pytest.raises(GuidanceError, match="opacity"):
            guidance.sds_loss(images.detach(), ["a red cube, front view"] * 2, (0.02, 0.98), torch.Generator().manual_seed(0))


def test_v2_framing_fills_more_of_the_frame_and_never_touches_its_edge():
    """docs/prior.md's coverage table: under v2's framing every object stays inside the frame and
    fills more of it than under v1's (median of the per-object medians)."""
    import statistics

    from dreamfusion.config import LEGACY_CAMERA, CameraConfig
    from dreamfusion.prior.evaluate import frame_coverage

    v1, v2 = frame_coverage(LEGACY_CAMERA, n=24), frame_coverage(CameraConfig(), n=24)
    assert [c.noun for c in v1] == [c.noun for c in v2] and len(v2) == 16
    assert all(c.touching_edge == 0.0 for c in v2), [c.noun for c in v2 if c.touching_edge]
    assert all(0.0 < c.minimum <= c.median <= c.maximum < 1.0 for c in v1 + v2)
    assert statistics.median(c.median for c in v2) > 1.15 * statistics.median(c.median for c in v1)


def test_camera_classifier_needs_render_conditions_and_reports_per_noun(shipped):
    """The camera classifier refuses a text-only prior (v1) in one clear error; on a camera-aware
    prior (here untrained, so no accuracy is asserted) it ranks every view of every noun."""
    from dreamfusion.prior.evaluate import camera_following

    unet, cfg, enc = shipped
    if not cfg.condition_features and not cfg.ray_channels:
        with pytest.raises(ValueError, match="render conditions"):
            camera_following(unet, cfg, enc)
    v2 = PriorConfig()
    torch.manual_seed(0)
    report = camera_following(v2.unet().eval(), v2, enc, nouns=("mug",), views=8, elevations=(10.0,), timesteps=(300,))
    assert report.n_images == 8 and set(report.per_noun) == {"mug"}
    assert 0.0 <= report.top1 <= report.within_45 <= 1.0


def test_denoising_errors_draw_fresh_noise_per_repeat(tiny_prior_dir):
    """``noises`` repeats the timestep list with fresh noise per repeat: noises=2 over [t] is the
    same estimate as noises=1 over [t, t], noises=1 is the default, and a second draw changes the
    estimate (it is Monte Carlo, not the same draw counted twice)."""
    from dreamfusion.prior.evaluate import denoising_errors

    unet, cfg = load_unet(tiny_prior_dir)
    enc = TextEncoder(cfg.max_tokens)
    image = torch.rand(cfg.channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(3))
    caps = ["a red cube", "a blue sphere", "a mug"]
    one = denoising_errors(unet, cfg, enc, image, caps, [400], seed=5)
    assert torch.equal(one, denoising_errors(unet, cfg, enc, image, caps, [400], seed=5, noises=1))
    two = denoising_errors(unet, cfg, enc, image, caps, [400], seed=5, noises=2)
    assert two.shape == (3,) and torch.isfinite(two).all()
    assert torch.equal(two, denoising_errors(unet, cfg, enc, image, caps, [400, 400], seed=5))
    assert not torch.equal(one, two)


def test_shipped_prior_tells_cameras_apart(shipped):
    """The camera classifier on the shipped prior (the asymmetric objects, 8 azimuths at 2
    elevations, 64 renders): the true azimuth wins at least 75% of the time (issue #10's target;
    chance 1/8; step 17,500 measured 77%, 49 of 64), and lands within one 45-degree step of the
    truth at least 80% of the time (measured 86%; chance 3/8). Every noun is above chance."""
    from dreamfusion.prior.evaluate import camera_following

    unet, cfg, enc = shipped
    report = camera_following(unet, cfg, enc, seed=0)
    assert report.n_images == 64
    assert report.top1 >= 0.75, report
    assert report.within_45 >= 0.80, report
    assert min(report.per_noun.values()) > 1 / 8, report


def test_condition_use_is_zero_when_every_render_has_the_same_camera(tiny_prior_dir):
    """condition_use compares the loss under each render's own conditions with the loss under
    another render's camera: when all renders share one camera the two are the same inputs, so the
    gain is exactly 0; dropping the conditions (zeros) does change a random prior's output."""
    from dreamfusion.cameras import make_cameras
    from dreamfusion.prior.evaluate import condition_use

    unet, cfg = load_unet(tiny_prior_dir)
    enc = TextEncoder(cfg.max_tokens)
    n = 6
    same = make_cameras(torch.full((n,), 40.0), 25.0, 1.9, 1.27)
    report = condition_use(unet, cfg, enc, n_images=n, timesteps=(500,), cameras=same)
    assert report.n_images == n and report.loss > 0
    assert report.gain_over_shuffled == 0.0
    assert report.gain_over_dropped != 0.0
    free = condition_use(unet, cfg, enc, n_images=n, timesteps=(500,))
    assert free.gain_over_shuffled != 0.0 and abs(free.gain_over_shuffled) < 1
    with pytest.raises(ValueError, match="no render conditions"):
        condition_use(unet, PriorConfig(condition_features=0, ray_channels=0), enc)


def test_ray_map_kind_is_part_of_the_prior_config(tmp_path):
    """A prior's ray channels hold what its config names: RenderConditions.of gives the "nearest"
    map to a prior trained on it and the Plücker map to one whose config.json predates the field."""
    import json
    from dataclasses import asdict

    from dreamfusion.cameras import default_light, make_cameras, ray_condition_maps
    from dreamfusion.prior.model import RenderConditions

    cams = make_cameras([0.0, 135.0], 20.0, 1.9, 1.27)
    lights, modes = default_light(cams), ["lit", "albedo"]
    nearest = PriorConfig(ray_map="nearest")
    assert torch.equal(RenderConditions.of(nearest, cams, lights, modes).rays, ray_condition_maps(cams, 32, "nearest"))
    old = asdict(PriorConfig())
    del old["ray_map"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = PriorConfig.load(tmp_path)
    assert loaded.ray_map == "plucker"
    assert torch.equal(RenderConditions.of(loaded, cams, lights, modes).rays, ray_condition_maps(cams, 32))
    nearest.save(tmp_path)
    assert PriorConfig.load(tmp_path).ray_map == "nearest"


def test_condition_weights_are_the_first_layers_weight_norms_per_input():
    """condition_weights reads conv_in and the class embedding's first linear layer: with weights
    set by hand (image channels all 2, ray channels all 0.5; text columns all 0.1, each feature
    group's columns a different constant), each figure is the constant times sqrt(fan): the L2 norm
    of a channel of 32 x 3 x 3 equal weights, and of a column of 128 equal weights."""
    from dreamfusion.cameras import RENDER_CONDITION_FEATURES, RENDER_CONDITION_GROUPS
    from dreamfusion.prior.evaluate import condition_weights

    covered = sorted(i for sl in RENDER_CONDITION_GROUPS.values() for i in range(sl.start, sl.stop))
    assert covered == list(range(RENDER_CONDITION_FEATURES))  # every feature in exactly one group

    cfg = PriorConfig()
    unet = cfg.unet()
    with torch.no_grad():
        w_in = unet.conv_in.weight  # (32, 4 + 6, 3, 3)
        w_in[:, :cfg.channels] = 2.0
        w_in[:, cfg.channels:] = 0.5
        lin = unet.class_embedding.linear_1.weight  # (128, 384 + 17)
        lin[:, :cfg.text_dim] = 0.1
        for k, sl in enumerate(RENDER_CONDITION_GROUPS.values()):
            lin[:, cfg.text_dim + sl.start:cfg.text_dim + sl.stop] = 0.01 * (k + 1)
    out_ch, hidden = w_in.shape[0], lin.shape[0]
    w = condition_weights(unet, cfg)
    assert w.image == pytest.approx(2.0 * math.sqrt(out_ch * 9), rel=1e-5)
    assert w.rays == pytest.approx(0.5 * math.sqrt(out_ch * 9), rel=1e-5)
    assert w.text == pytest.approx(0.1 * math.sqrt(hidden), rel=1e-5)
    assert list(w.features) == list(RENDER_CONDITION_GROUPS)
    for k, name in enumerate(RENDER_CONDITION_GROUPS):
        assert w.features[name] == pytest.approx(0.01 * (k + 1) * math.sqrt(hidden), rel=1e-5)
    # a text-only prior: no ray channels, no feature columns
    v1 = PriorConfig(channels=3, condition_features=0, ray_channels=0)
    plain = condition_weights(v1.unet(), v1)
    assert plain.rays is None and plain.features == {} and plain.image > 0 and plain.text > 0


def test_guided_colour_reads_the_true_colour_and_is_linear_in_the_weight(tiny_prior_dir):
    """guided_colour's truth is the named colour on fully covered albedo pixels; its estimate is
    x0_hat of SDS's guided noise, which is affine in the weight w (no clamping), so the estimate at
    w = 5 is the one at 0 plus 5 times the step from 0 to 1; error() is the mean |RGB - truth|."""
    from dreamfusion.prior.evaluate import guided_colour

    unet, cfg = load_unet(tiny_prior_dir)
    enc = TextEncoder(cfg.max_tokens)
    r = guided_colour(unet, cfg, enc, "cube", "green", weights=(0.0, 1.0, 5.0), mode="albedo", n_views=4, timestep=400)
    assert r.truth == pytest.approx((0.10, 0.70, 0.20), abs=1e-4)
    e0, e1, e5 = (torch.tensor(r.estimates[w]) for w in (0.0, 1.0, 5.0))
    assert torch.allclose(e5, e0 + 5 * (e1 - e0), atol=1e-4)
    assert r.error(5.0) == pytest.approx(float((e5 - torch.tensor(r.truth)).abs().mean()), abs=1e-6)
    lit = guided_colour(unet, cfg, enc, "cube", "green", weights=(0.0,), mode="lit", n_views=4)
    assert lit.truth[1] < 0.70 and lit.truth[1] > lit.truth[0]  # shaded darker, still green


def test_the_shipped_prior_knows_the_colour_of_a_lit_render(shipped):
    """Unguided (w = 0), the shipped prior's estimate of a lit green cube keeps its colour (measured
    0.008 at v2 step 3,250); it is guidance that saturates it (docs/ablations.md)."""
    from dreamfusion.prior.evaluate import guided_colour

    unet, cfg, enc = shipped
    r = guided_colour(unet, cfg, enc, "cube", "green", weights=(0.0,), n_views=8)
    assert r.error(0.0) < 0.05


def test_prior_weights_get_ordinary_permissions(tiny_prior_dir):
    """The prior's weights are written atomically and read like any file the user makes (they
    were 0600, which a web server or another user of a shared prior folder cannot read)."""
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    for name in (WEIGHTS_FILE, "config.json"):
        mode = (tiny_prior_dir / name).stat().st_mode & 0o777
        assert mode == 0o666 & ~mask, (name, oct(mode))
    assert not [p.name for p in tiny_prior_dir.iterdir() if p.name.startswith(".")]  # no temporary left


def test_high_t_fraction_draws_that_share_of_timesteps_from_the_upper_half():
    from dreamfusion.prior.train import sample_timesteps

    n, T = 20000, 1000
    uniform = sample_timesteps(n, T, 0.0, torch.Generator().manual_seed(0))
    assert uniform.min() >= 0 and uniform.max() < T
    # with no emphasis the draw is the plain uniform one (resumed runs keep their random stream)
    assert torch.equal(uniform, torch.randint(0, T, (n,), generator=torch.Generator().manual_seed(0)))
    upper = sample_timesteps(n, T, 1.0, torch.Generator().manual_seed(0))
    assert upper.min() >= T // 2 and upper.max() < T
    half = sample_timesteps(n, T, 0.5, torch.Generator().manual_seed(0))
    # by hand: P(t >= T/2) = 0.5 * 1 + 0.5 * 0.5 = 0.75
    assert abs(float((half >= T // 2).float().mean()) - 0.75) < 0.015
    with pytest.raises(ValueError, match="high_t_fraction"):
        sample_timesteps(4, T, 1.5, torch.Generator())


def test_diffusion_loss_weights_by_hand():
    from dreamfusion.prior.train import diffusion_loss

    noise = torch.zeros(3, 1, 2, 2)
    pred = torch.ones(3, 1, 2, 2) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1)  # per-image MSE 1, 4, 9
    ab = torch.tensor([0.9, 0.5, 0.01])  # SNR 9, 1, 1/99
    assert float(diffusion_loss(pred, noise, ab)) == pytest.approx((1 + 4 + 9) / 3)
    # min-SNR-5: weights 5/9, 1, 1
    assert float(diffusion_loss(pred, noise, ab, min_snr=5.0)) == pytest.approx((5 / 9 + 4 + 9) / 3)
    # and 1/alpha_bar capped at 20: 1/0.9, 2, 20
    assert float(diffusion_loss(pred, noise, ab, min_snr=5.0, high_t_cap=20.0)) == pytest.approx((5 / 9 / 0.9 + 4 * 2 + 9 * 20) / 3)


def test_paraphrases_are_worded_by_hand_and_never_trained_on():
    """The paraphrase classifier's words and templates are ones no training caption uses (else it
    would measure recall, not robustness): checked against the caption tables and 3,000 drawn
    training captions (synonyms on, as prior v2 trains)."""
    import random
    import re

    from dreamfusion.prior import world
    from dreamfusion.prior.evaluate import PARAPHRASE_COLOURS, PARAPHRASE_NOUNS, PARAPHRASE_TEMPLATES, candidate_phrase

    assert set(PARAPHRASE_NOUNS) == set(world.NOUNS) and set(PARAPHRASE_COLOURS) == set(world.COLOUR_NAMES)
    trained_words = {w for t in (world.NOUN_WORDS, world.COLOUR_WORDS, world.MATERIAL_WORDS) for ws in t.values() for w in ws}
    para_words = set(PARAPHRASE_NOUNS.values()) | set(PARAPHRASE_COLOURS.values())
    assert not para_words & trained_words
    trained_templates = set(world.PHRASE_TEMPLATES_COLOURED + world.PHRASE_TEMPLATES_PLAIN + world.PHRASE_TEMPLATES_MATERIAL)
    assert not {t for pair in PARAPHRASE_TEMPLATES for t in pair} & trained_templates
    rng = random.Random(0)
    captions = {world.draw_example(rng, synonyms=True).phrase for _ in range(3000)}
    for word in para_words:
        assert not [c for c in captions if re.search(rf"\b{re.escape(word)}\b", c)], word
    # by hand: the plain phrase is the world's own, the paraphrase picks template i mod 5
    assert candidate_phrase("cube", "orange", 3, paraphrase=False) == "an orange cube"
    assert candidate_phrase("mug", "white", 0, paraphrase=True) == "a teacup in ivory"
    assert candidate_phrase("cube", "orange", 5, paraphrase=True) == "a cuboid in tangerine"
    assert candidate_phrase("tree", None, 1, paraphrase=True) == "christmas tree"
    assert candidate_phrase("torus", "red", 4, paraphrase=True) == "a ruby-coloured doughnut"
    assert candidate_phrase("house", None, 2, paraphrase=True) == "a picture of a cabin"


def test_train_prior_runs_checkpoints_and_resumes_with_asymmetric_share(tmp_path):
    """A tiny prior trained for two steps with half of its images of the asymmetric objects writes
    its EMA weights, resume state (with the step) and loss log, and resumes from them; a share
    outside [0, 1] is one clear error before anything is written."""
    from safetensors import safe_open

    from dreamfusion.prior.train import train_prior

    tiny = PriorConfig(image_size=16, block_out_channels=(16, 32), attention_head_dim=4)
    bad = TrainPriorConfig(out=tmp_path / "bad", steps=1, batch=2, asymmetric_fraction=1.5)
    with pytest.raises(ValueError, match="asymmetric_fraction"):
        train_prior(bad, tiny, on_log=lambda _: None)
    assert not (tmp_path / "bad").exists()
    cfg = TrainPriorConfig(out=tmp_path / "p", steps=2, batch=4, warmup=1, checkpoint_every=2, grid_every=10**6,
                           asymmetric_fraction=0.5)
    logs = []
    out = train_prior(cfg, tiny, on_log=logs.append)
    for name in (WEIGHTS_FILE, RESUME_FILE, "config.json", "train_log.jsonl"):
        assert (out / name).exists(), name
    with safe_open(str(out / RESUME_FILE), "pt") as f:
        assert f.metadata()["step"] == "2"
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2
    train_prior(dataclasses.replace(cfg, steps=3), on_log=logs.append)
    assert "resumed from step 2" in logs
    with safe_open(str(out / RESUME_FILE), "pt") as f:
        assert f.metadata()["step"] == "3"
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)


def test_a_resume_state_alone_pairs_with_weights_of_its_own_step_only(tmp_path):
    """A training folder that holds only its resume state continues with the shipped folder's EMA
    weights and config, and only when they are of the same step; with its own weights, its own."""
    from dreamfusion.prior.train import resume_snapshot, train_prior

    tiny = PriorConfig(image_size=16, block_out_channels=(16, 32), attention_head_dim=4)
    cfg = TrainPriorConfig(out=tmp_path / "shipped", steps=2, batch=2, warmup=1, checkpoint_every=2, grid_every=10**6)
    shipped = train_prior(cfg, tiny, on_log=lambda _: None)
    training = tmp_path / "training"
    training.mkdir()
    shutil.move(shipped / RESUME_FILE, training / RESUME_FILE)
    assert resume_snapshot(training, shipped) == shipped
    train_prior(dataclasses.replace(cfg, out=tmp_path / "further", steps=3), tiny, on_log=lambda _: None)
    with pytest.raises(ValueError, match="is of step 2 but .* has no EMA weights of its own and the shipped prior .* is of step 3"):
        resume_snapshot(training, tmp_path / "further")
    shutil.copy(shipped / WEIGHTS_FILE, training / WEIGHTS_FILE)
    assert resume_snapshot(training, tmp_path / "further") == training


def test_learning_rate_warms_up_stays_and_cools_down_by_hand():
    """Warm-up over 4 steps from the (re)start, then constant, then a linear fall to 0 over the last
    ``cooldown`` steps before ``steps``; without a cool-down the rate stays at ``lr``."""
    from dreamfusion.prior.train import learning_rate

    cfg = TrainPriorConfig(lr=1e-3, warmup=4, steps=100, cooldown=20)
    assert learning_rate(cfg, 0, 0) == pytest.approx(0.25e-3)  # first step: 1/4 of the way up
    assert learning_rate(cfg, 3, 0) == pytest.approx(1e-3)
    assert learning_rate(cfg, 50, 0) == pytest.approx(1e-3)
    assert learning_rate(cfg, 80, 0) == pytest.approx(1e-3)  # (100 - 80) / 20 = 1: the fall starts here
    assert learning_rate(cfg, 90, 0) == pytest.approx(0.5e-3)
    assert learning_rate(cfg, 99, 0) == pytest.approx(0.05e-3)
    # resumed at 90: warm-up again from there, times the cool-down factor
    assert learning_rate(cfg, 90, 90) == pytest.approx(1e-3 * 0.25 * 0.5)
    assert learning_rate(dataclasses.replace(cfg, cooldown=0), 99, 0) == pytest.approx(1e-3)


def test_train_prior_logs_the_cooled_learning_rate_and_refuses_a_negative_cooldown(tmp_path):
    from dreamfusion.prior.train import train_prior

    tiny = PriorConfig(image_size=16, block_out_channels=(16, 32), attention_head_dim=4)
    with pytest.raises(ValueError, match="cooldown"):
        train_prior(TrainPriorConfig(out=tmp_path / "bad", steps=1, batch=2, cooldown=-1), tiny, on_log=lambda _: None)
    assert not (tmp_path / "bad").exists()
    cfg = TrainPriorConfig(out=tmp_path / "p", lr=1e-3, steps=3, batch=2, warmup=1, cooldown=2, checkpoint_every=10, grid_every=10**6)
    out = train_prior(cfg, tiny, on_log=lambda _: None)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3, 0.5e-3])


def test_training_captions_drop_the_view_label_only_when_asked():
    """``view_label_dropout`` 1: every non-empty caption is the phrase alone; 0: the caption drawn
    (and the random stream) as before, one draw per caption."""
    import random

    from dreamfusion.prior.data import render_batch
    from dreamfusion.prior.train import training_captions

    batch = render_batch(6, 8, random.Random(0), torch.Generator().manual_seed(0), supersample=1)
    for cap, phrase_only in zip(batch.captions, batch.phrases, strict=True):
        label = cap.rsplit(", ", 1)[1]
        assert cap == f"{phrase_only}, {label}" and label.endswith("view")
    no_labels = training_captions(batch, TrainPriorConfig(caption_dropout=0.0, view_label_dropout=1.0), random.Random(1))
    assert no_labels == batch.phrases
    rng = random.Random(1)
    as_before = training_captions(batch, TrainPriorConfig(caption_dropout=0.5), rng)
    ref = random.Random(1)
    assert as_before == ["" if ref.random() < 0.5 else c for c in batch.captions]
    assert rng.random() == ref.random()  # no extra draws


def _unet_batch(cfg: PriorConfig, encoder: TextEncoder, n: int, seed: int = 0):
    """n noisy images of the prior's shape with texts, timesteps and render conditions."""
    g = torch.Generator().manual_seed(seed)
    cams = sample_cameras(cfg.camera_config(), n, g)
    conditions = RenderConditions.of(cfg, cams, sample_lights(cfg.camera_config(), cams, g), (["lit", "textureless", "albedo"] * n)[:n])
    x = torch.randn(n, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(20, 980, (n,), generator=g)
    return x, t, encoder.condition((["a red mug, side view", "", "a tree, back view"] * n)[:n]), conditions


def test_frozen_unet_gives_the_eager_numbers_bit_for_bit(shipped):
    """SDS runs the prior's U-Net as a frozen TorchScript graph (GuidanceConfig.frozen_unet): the
    same numbers as eager PyTorch, bit for bit, one graph per input shape, and the eager U-Net
    wherever a gradient is needed (the prior's own training)."""
    unet, cfg, encoder = shipped
    frozen = FrozenUNet(unet)
    x, t, cond, conditions = _unet_batch(cfg, encoder, 4)
    with torch.no_grad():
        eager = predict_noise(unet, x, t, cond, conditions)
        assert torch.equal(predict_noise(unet, x, t, cond, conditions, frozen), eager)
        # new values, the same shapes: the same graph, still the eager numbers
        assert torch.equal(predict_noise(unet, x * 0.5, t // 2, cond, conditions, frozen), predict_noise(unet, x * 0.5, t // 2, cond, conditions))
        assert len(frozen._graphs) == 1
        x2, t2, cond2, conditions2 = _unet_batch(cfg, encoder, 2, seed=1)
        assert torch.equal(predict_noise(unet, x2, t2, cond2, conditions2, frozen), predict_noise(unet, x2, t2, cond2, conditions2))
        assert len(frozen._graphs) == 2
    x.requires_grad_(True)
    predict_noise(unet, x, t, cond, conditions, frozen).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, "with gradients on, the eager U-Net runs"
    assert len(frozen._graphs) == 2


def test_frozen_unet_in_bfloat16_is_close_to_float32_and_keeps_the_weights(shipped):
    """GuidanceConfig.cpu_bfloat16: the frozen graph of a bfloat16 copy of the U-Net, float32 in and
    out, close to the float32 numbers (relative to eps's own scale); the float32 U-Net is untouched."""
    unet, cfg, encoder = shipped
    frozen = FrozenUNet(unet)
    x, t, cond, conditions = _unet_batch(cfg, encoder, 4)
    with torch.no_grad():
        full = predict_noise(unet, x, t, cond, conditions, frozen)
        half = predict_noise(unet, x, t, cond, conditions, frozen, dtype=torch.bfloat16)
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert not torch.equal(half, full), "the bfloat16 graph ran"
    assert (half - full).abs().mean() < 0.02 * full.abs().mean()
    assert next(unet.parameters()).dtype == torch.float32
    assert {key[0][1] for key in frozen._graphs} == {torch.float32, torch.bfloat16}


def test_the_noise_schedule_by_hand_is_diffusers_bit_for_bit():
    for schedule in ("squaredcos_cap_v2", "linear"):
        cfg = PriorConfig(beta_schedule=schedule)
        assert torch.equal(cfg.alphas_cumprod(), cfg.scheduler().alphas_cumprod), schedule
    cosine = PriorConfig().alphas_cumprod()  # by hand: alpha_bar(t) = cos^2((t + 0.008) / 1.008 pi / 2), normalised
    f = lambda x: math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cosine[499] == pytest.approx(f(0.5) / f(0.0), rel=1e-4)


def test_a_cached_graph_gives_the_same_numbers_without_building_the_unet(tiny_prior_dir, tmp_path):
    """FrozenUNet with a GraphCache: the first traces and writes the graph; a second (another
    process's) reads it back and never builds the U-Net, with the same numbers bit for bit. A file
    that cannot be read is traced again; other weights never read a graph of these."""
    unet, cfg = load_unet(tiny_prior_dir)
    encoder = TextEncoder(cfg.max_tokens)
    x, t, cond, conditions = _unet_batch(cfg, encoder, 2)
    cache = GraphCache.of_prior(tmp_path / "cache", tiny_prior_dir)
    assert not cache.any_graph()
    with torch.no_grad():
        first = predict_noise(cfg, x, t, cond, conditions, FrozenUNet(unet, cache))
        assert torch.equal(first, predict_noise(unet, x, t, cond, conditions))
    assert cache.any_graph() and len(list((tmp_path / "cache").glob("unet-*.pt"))) == 1

    def no_unet():
        raise AssertionError("the U-Net was built although its graph is cached")

    again = FrozenUNet(no_unet, GraphCache.of_prior(tmp_path / "cache", tiny_prior_dir))
    with torch.no_grad():
        assert torch.equal(predict_noise(cfg, x, t, cond, conditions, again), first)

    path = next((tmp_path / "cache").glob("unet-*.pt"))
    path.write_bytes(b"not a graph")
    built = []
    retrace = FrozenUNet(lambda: built.append(1) or unet, GraphCache.of_prior(tmp_path / "cache", tiny_prior_dir))
    with torch.no_grad():
        assert torch.equal(predict_noise(cfg, x, t, cond, conditions, retrace), first)
    assert built == [1] and path.stat().st_size > 1000  # traced again, and the file mended

    other = tmp_path / "other_prior"
    shutil.copytree(tiny_prior_dir, other)
    data = bytearray((other / WEIGHTS_FILE).read_bytes())
    data[-2:] = b"\x00\x3c"  # the last fp16 weight set to 1.0
    (other / WEIGHTS_FILE).write_bytes(bytes(data))
    assert GraphCache.of_prior(tmp_path / "cache", other).key != cache.key
    assert not GraphCache.of_prior(tmp_path / "cache", other).any_graph()


def test_the_cache_keeps_the_most_recently_used_graphs_of_a_kind(tmp_path):
    import time as clock

    from dreamfusion.prior.model import GRAPHS_KEPT

    folder = tmp_path / "cache"
    folder.mkdir()
    (tmp_path / "w").write_bytes(b"weights")
    cache = GraphCache(folder, "unet", [tmp_path / "w"])
    old = [folder / f"unet-{i:024d}-0000000000000000.pt" for i in range(GRAPHS_KEPT + 2)]
    for i, path in enumerate(old):
        path.write_bytes(b"x")
        os.utime(path, ns=(clock.time_ns(), 1_000_000_000 * (i + 1)))  # older the lower i
    other_kind = folder / "minilm-000-000.pt"
    other_kind.write_bytes(b"x")
    removed = cache.prune()
    assert sorted(removed) == sorted(old[:2]) and not old[0].exists() and old[-1].exists() and other_kind.exists()


def test_an_unwritable_cache_still_gives_the_graph(tiny_prior_dir, tmp_path):
    unet, cfg = load_unet(tiny_prior_dir)
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way of the cache folder")
    frozen = FrozenUNet(unet, GraphCache.of_prior(blocker / "cache", tiny_prior_dir))
    x, t, cond, conditions = _unet_batch(cfg, TextEncoder(cfg.max_tokens), 2)
    with torch.no_grad():
        assert torch.equal(predict_noise(cfg, x, t, cond, conditions, frozen), predict_noise(unet, x, t, cond, conditions))
    assert len(frozen._graphs) == 1 and next(iter(frozen._graphs.values())) is not None


def test_a_run_with_cached_graphs_never_imports_diffusers_or_transformers(tiny_prior_dir, tmp_path):
    """Start-up: diffusers' and transformers' imports (about 2.5 s and 2.3 s), the text encoder's
    checkpoint and the tracing are paid by the first run only."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from dreamfusion.trainer import Trainer, TrainConfig\n"
        "from dreamfusion.field import FieldConfig\n"
        "from dreamfusion.guidance import GuidanceConfig\n"
        f"cfg = TrainConfig(steps=2, render_size=32, views=1, preview_every=0, field=FieldConfig(resolution=16), "
        f"guidance=GuidanceConfig(model={str(tiny_prior_dir)!r}))\n"
        "tr = Trainer(cfg, 'a red cube')\n"
        "tr.run()\n"
        "print('diffusers' in sys.modules or 'transformers' in sys.modules, float(tr.field.density_grid.detach().sum()))\n"
    )
    env = {**os.environ, "DREAMFUSION_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    (first_imported, first_sum), (second_imported, second_sum) = (run.stdout.split() for run in runs)
    assert first_imported == "True" and second_imported == "False"
    assert first_sum == second_sum  # the same run, bit for bit


def test_bfloat16_is_used_where_asked_and_on_a_cpu_only():
    from dreamfusion.guidance.embedded import cpu_has_native_bfloat16, uses_bfloat16

    assert uses_bfloat16("on", "cpu") and not uses_bfloat16("off", "cpu")
    assert uses_bfloat16("auto", "cpu") == cpu_has_native_bfloat16()
    assert not uses_bfloat16("on", "meta")  # not a CPU: never
    with pytest.raises(ValueError, match="cpu_bfloat16"):
        validate_config(TrainConfig(guidance=GuidanceConfig(cpu_bfloat16="yes")))


def test_frozen_unet_falls_back_to_eager_once_when_tracing_fails(tiny_prior_dir, monkeypatch, capsys):
    unet, cfg = load_unet(tiny_prior_dir)
    encoder = TextEncoder(cfg.max_tokens)
    frozen = FrozenUNet(unet)

    def refuse(*args, **kwargs):
        raise RuntimeError("this graph cannot be traced")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    x, t, cond, conditions = _unet_batch(cfg, encoder, 2)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(predict_noise(unet, x, t, cond, conditions, frozen), predict_noise(unet, x, t, cond, conditions))
    printed = capsys.readouterr().out
    assert printed.count("runs eagerly") == 1 and "this graph cannot be traced" in printed


def test_embedded_guidance_uses_the_frozen_unet_only_when_asked(tiny_prior_dir):
    """The same SDS loss and gradient with and without ``frozen_unet``; only the frozen one builds graphs."""
    results = {}
    for frozen in (True, False):
        g = load_guidance(GuidanceConfig(model=str(tiny_prior_dir), frozen_unet=frozen, cpu_bfloat16="off"), shared=False)
        cfg = g.prior_cfg
        cams = sample_cameras(cfg.camera_config(), 2, torch.Generator().manual_seed(0))
        images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1), requires_grad=True)
        opacity = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(2))
        batch = RenderBatch(images, opacity, cams, sample_lights(cfg.camera_config(), cams, torch.Generator().manual_seed(4)), ["lit", "albedo"])
        out = g.sds_loss(batch, ["a red cube, front view", "a red cube, side view"], (0.02, 0.98), torch.Generator().manual_seed(3))
        out["loss"].backward()
        results[frozen] = (out["loss"].detach(), images.grad)
        assert len(g.frozen_unet._graphs) == (1 if frozen else 0)
    assert torch.equal(results[True][0], results[False][0]) and torch.equal(results[True][1], results[False][1])
