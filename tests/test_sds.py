"""SDS against hand computations, a stub noise predictor, and an exact denoiser."""

import torch

from dreamfusion.cameras import CameraConfig, sample_cameras, sample_lights
from dreamfusion.field import Background, FieldConfig, GridField
from dreamfusion.guidance.base import Guidance, GuidanceConfig
from dreamfusion.render import RenderConfig, Renderer
from dreamfusion.sds import (
    camera_guidance,
    classifier_free_guidance,
    noise_images,
    sds_gradient,
    sds_surrogate_loss,
    timestep_bounds,
    timestep_weight,
)


def test_classifier_free_guidance_matches_dreamfusion_form():
    ec, eu = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    # (1 + w) ec - w eu with w = 3: [4 - 1.5, -8 - 3]
    assert torch.allclose(classifier_free_guidance(ec, eu, 3.0), torch.tensor([2.5, -11.0]))
    assert torch.allclose(classifier_free_guidance(ec, eu, 0.0), ec)


def test_sds_gradient_and_weighting_by_hand():
    eps_hat = torch.ones(2, 1, 2, 2) * 3
    eps = torch.ones(2, 1, 2, 2)
    w = timestep_weight(torch.tensor([0.75, 0.1]))  # 1 - alpha_bar
    assert torch.allclose(w, torch.tensor([0.25, 0.9]))
    g = sds_gradient(eps_hat, eps, w)
    assert torch.allclose(g[0], torch.full((1, 2, 2), 0.5)) and torch.allclose(g[1], torch.full((1, 2, 2), 1.8))
    assert torch.allclose(timestep_weight(torch.tensor([0.3]), "uniform"), torch.ones(1))


def test_surrogate_loss_has_the_sds_gradient():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    grad = torch.randn(2, 3, 4, 4)
    sds_surrogate_loss(x, grad).backward()
    assert torch.allclose(x.grad, grad)


def test_camera_guidance_adds_what_the_conditions_add():
    # eps_hat 1, eps(y, c) 2, eps(y, {}) 0.5: 1 + 3 (2 - 0.5) = 5.5; -1 + 3 (0 - 1) = -4; w_c 0 leaves eps_hat
    eh, ec, enc = torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.0]), torch.tensor([0.5, 1.0])
    assert torch.allclose(camera_guidance(eh, ec, enc, 3.0), torch.tensor([5.5, -4.0]))
    assert torch.equal(camera_guidance(eh, ec, enc, 0.0), eh)


def test_noise_images_and_timestep_annealing():
    x, eps = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0)
    z = noise_images(x, eps, torch.tensor([0.36]))
    assert torch.allclose(z, torch.tensor(0.6 * 1 + 0.8 * 2.0))
    assert timestep_bounds(0, 101, 0.02, 0.98, 0.5) == (0.02, 0.98)
    lo, hi = timestep_bounds(50, 101, 0.02, 0.98, 0.5)
    assert abs(hi - 0.74) < 1e-6 and lo == 0.02
    assert timestep_bounds(100, 101, 0.02, 0.98, None) == (0.02, 0.98)
    # the lower bound falls from t_min_start to t_min: 0.5 at the start, 0.26 halfway, 0.02 at the end
    assert timestep_bounds(0, 101, 0.02, 0.98, None, 0.5) == (0.5, 0.98)
    lo, hi = timestep_bounds(50, 101, 0.02, 0.98, 0.8, 0.5)
    assert abs(lo - 0.26) < 1e-6 and abs(hi - 0.89) < 1e-6
    lo, hi = timestep_bounds(100, 101, 0.02, 0.98, 0.8, 0.5)
    assert abs(lo - 0.02) < 1e-6 and abs(hi - 0.8) < 1e-6


class StubGuidance(Guidance):
    """Pixel-space prior with a known noise predictor; conditions are floats per text."""

    name = "stub"

    def __init__(self, predictor, guidance_scale=7.0):
        super().__init__(GuidanceConfig(name="stub", guidance_scale=guidance_scale, weighting="sds"))
        self.alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
        self.predictor = predictor

    def encode(self, texts):
        return torch.tensor([0.0 if t == "" else 1.0 for t in texts])

    def concat(self, conds):
        return torch.cat(conds)

    def model_input(self, images):
        return images * 2 - 1

    def predict_noise(self, x_t, t, cond):
        return self.predictor(x_t, t, cond)


def replay_draws(guidance, images, seed, copies=1):
    """The (t, eps) that sds_loss drew for ``images`` (B, 3, H, W) with t_range (0.2, 0.6) from a
    generator seeded ``seed``, ``copies`` per render: t (B copies,), eps, alpha_bar_t (., 1, 1, 1)
    and z_t."""
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0] * copies
    t = torch.randint(200, 600, (n,), generator=g)
    eps = torch.randn(n, *images.shape[1:], generator=g)
    a = guidance.alphas_cumprod[t].view(-1, 1, 1, 1)
    x = (images.detach() * 2 - 1).repeat(copies, 1, 1, 1)
    return t, eps, a, a.sqrt() * x + (1 - a).sqrt() * eps


def test_sds_loss_gradient_equals_weighted_residual_for_a_stub_predictor():
    predictor = lambda x_t, t, cond: 0.3 * x_t + cond.view(-1, 1, 1, 1)  # noqa: E731
    guidance = StubGuidance(predictor, guidance_scale=5.0)
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = guidance.sds_loss(images, ["a cube, front view", "a cube, side view"], (0.2, 0.6), torch.Generator().manual_seed(7))
    out["loss"].backward()
    t, eps, a, z = replay_draws(guidance, images, 7)
    eps_c, eps_u = 0.3 * z + 1.0, 0.3 * z
    eps_hat = 6.0 * eps_c - 5.0 * eps_u
    expected = (1 - a) * (eps_hat - eps)
    assert torch.equal(out["t"], t)
    # d loss / d images = d loss / d x * 2, and the loss is averaged over the batch
    assert torch.allclose(images.grad, expected * 2 / 2, atol=1e-5)


def test_several_draws_average_their_gradients():
    """draws=2: each render is graded under two independent (t, eps) draws and the gradient is
    the mean of the two single-draw gradients."""
    predictor = lambda x_t, t, cond: 0.3 * x_t + cond.view(-1, 1, 1, 1)  # noqa: E731
    guidance = StubGuidance(predictor, guidance_scale=5.0)
    guidance.cfg.draws = 2
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = guidance.sds_loss(images, ["a", "b"], (0.2, 0.6), torch.Generator().manual_seed(3))
    out["loss"].backward()
    t, eps, a, z = replay_draws(guidance, images, 3, copies=2)
    eps_hat = 6.0 * (0.3 * z + 1.0) - 5.0 * (0.3 * z)
    per_copy = (1 - a) * (eps_hat - eps)  # (4, ...): copies 0-1 are the first draw, 2-3 the second
    expected = (per_copy[:2] + per_copy[2:]) / 2 / 2 * 2  # mean over draws, mean over the batch, d x / d image = 2
    assert torch.equal(out["t"], t)
    assert torch.allclose(images.grad, expected, atol=1e-5)


def test_camera_guidance_adds_a_third_branch_without_the_render_conditions():
    """camera_guidance_scale w_c: eps_hat = (1 + w) eps(y, c) - w eps({}, c) + w_c (eps(y, c) - eps(y, {})),
    for a prior whose predictions depend on its render conditions (a float per render here, 0 when dropped)."""

    class WithConditions(StubGuidance):
        def render_features(self, renders):
            return torch.tensor([2.0, -1.0])

        def predict_noise(self, x_t, t, cond, features=None):
            f = torch.zeros(x_t.shape[0]) if features is None else features
            return 0.3 * x_t + cond.view(-1, 1, 1, 1) + f.view(-1, 1, 1, 1)

    guidance = WithConditions(None, guidance_scale=5.0)
    guidance.cfg.camera_guidance_scale = 2.0
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = guidance.sds_loss(images, ["a", "b"], (0.2, 0.6), torch.Generator().manual_seed(5))
    out["loss"].backward()
    _, eps, a, z = replay_draws(guidance, images, 5)
    f = torch.tensor([2.0, -1.0]).view(-1, 1, 1, 1)
    eps_c, eps_u, eps_nc = 0.3 * z + 1.0 + f, 0.3 * z + f, 0.3 * z + 1.0
    expected = (1 - a) * (6.0 * eps_c - 5.0 * eps_u + 2.0 * (eps_c - eps_nc) - eps)
    assert torch.allclose(images.grad, expected, atol=1e-5)  # mean over 2 renders, d x / d image = 2
    guidance.cfg.camera_guidance_scale = 0.0  # off: the two-branch gradient
    images.grad = None
    guidance.sds_loss(images, ["a", "b"], (0.2, 0.6), torch.Generator().manual_seed(5))["loss"].backward()
    assert torch.allclose(images.grad, (1 - a) * (6.0 * eps_c - 5.0 * eps_u - eps), atol=1e-5)


def test_sds_with_an_exact_denoiser_drives_renders_to_the_target():
    """With eps(z_t) = (z_t - alpha_t x*) / sigma_t the SDS gradient is proportional to x - x*:
    optimising a NeRF must bring its renders towards x*."""
    torch.manual_seed(0)
    target = torch.tensor([0.85, 0.1, 0.1]).view(1, 3, 1, 1) * 2 - 1  # red, in model space
    grey = torch.zeros(1, 3, 1, 1)

    class Exact(StubGuidance):
        def predict_noise(self, x_t, t, cond):
            a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            x_star = torch.where(cond.view(-1, 1, 1, 1) > 0, target, grey)
            return (x_t - a.sqrt() * x_star) / (1 - a).sqrt()

    guidance = Exact(None, guidance_scale=3.0)
    field = GridField(FieldConfig(resolution=16, bound=1.0, blob_density=12.0, blob_radius=0.5, density_activation="softplus"))
    renderer = Renderer(field, Background("white"), RenderConfig(samples_per_ray=48))
    opt = torch.optim.Adam(field.parameters(), lr=0.1)
    cam_cfg = CameraConfig()
    gen = torch.Generator().manual_seed(0)
    eval_cams = sample_cameras(cam_cfg, 4, torch.Generator().manual_seed(1))
    eval_lights = sample_lights(cam_cfg, eval_cams, torch.Generator().manual_seed(1))

    def distance():
        with torch.no_grad():
            img = renderer.render(eval_cams, eval_lights, 16, 16, "albedo")["image"] * 2 - 1
        return float((img - target).abs().mean())

    before = distance()
    for _ in range(60):
        cams = sample_cameras(cam_cfg, 2, gen)
        lights = sample_lights(cam_cfg, cams, gen)
        images = renderer.render(cams, lights, 16, 16, "albedo")["image"]
        loss = guidance.sds_loss(images, ["red", "red"], (0.02, 0.98), gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = distance()
    assert after < 0.6 * before, (before, after)
