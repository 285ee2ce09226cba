"""DreamFusion's Lambertian shading, c = albedo * (l_p * max(0, n . (l - x)/|l - x|) + l_a), by hand."""

import math

import pytest
import torch

from dreamfusion.shading import SHADING_MODES, TRAINING_SHADING_MODES, lambertian, normals_to_rgb, shade

ALBEDO = torch.tensor([0.5, 1.0, 0.2])
NORMAL_Z = torch.tensor([0.0, 0.0, 1.0])
ORIGIN = torch.zeros(3)
L_P = torch.tensor(0.7)
L_A = torch.tensor(0.2)


def _lam(light, albedo=ALBEDO, normal=NORMAL_Z, point=ORIGIN, lp=L_P, la=L_A):
    return lambertian(albedo, normal, point, torch.as_tensor(light, dtype=torch.float32), lp, la)


def test_light_straight_above():
    # cos = 1: factor = 0.7 + 0.2 = 0.9
    out = _lam([0.0, 0.0, 2.0])
    assert out.shape == (3,)
    assert torch.allclose(out, torch.tensor([0.45, 0.9, 0.18]), atol=1e-6)


def test_light_at_45_degrees():
    # l - x = (1, 0, 1) -> cos 45 deg; distance does not matter
    f = 0.7 * math.cos(math.pi / 4) + 0.2
    expected = torch.tensor([0.5 * f, 1.0 * f, 0.2 * f])
    assert torch.allclose(_lam([1.0, 0.0, 1.0]), expected, atol=1e-6)
    assert torch.allclose(_lam([5.0, 0.0, 5.0]), expected, atol=1e-6)


def test_light_off_origin_point():
    # point (1, 2, 3), normal +X, light at (1 + 3, 2, 3 + 4): to-light (3, 0, 4)/5 -> cos = 0.6
    out = _lam([4.0, 2.0, 7.0], normal=torch.tensor([1.0, 0.0, 0.0]), point=torch.tensor([1.0, 2.0, 3.0]))
    f = 0.7 * 0.6 + 0.2
    assert torch.allclose(out, ALBEDO * f, atol=1e-6)


def test_light_behind_gives_ambient_only():
    assert torch.allclose(_lam([0.0, 0.0, -2.0]), ALBEDO * 0.2, atol=1e-7)
    # grazing light (in the tangent plane): cos = 0
    assert torch.allclose(_lam([3.0, 0.0, 0.0]), ALBEDO * 0.2, atol=1e-7)
    # slightly behind: still clamped at zero, never darker than ambient
    assert torch.allclose(_lam([3.0, 0.0, -0.1]), ALBEDO * 0.2, atol=1e-7)


def test_light_at_the_point_is_finite():
    out = _lam([0.0, 0.0, 0.0])
    assert torch.isfinite(out).all()
    assert torch.allclose(out, ALBEDO * 0.2, atol=1e-6)


def test_shade_lit_is_lambertian():
    light = torch.tensor([1.0, 0.0, 1.0])
    assert torch.equal(shade("lit", ALBEDO, NORMAL_Z, ORIGIN, light, L_P, L_A), lambertian(ALBEDO, NORMAL_Z, ORIGIN, light, L_P, L_A))


def test_shade_textureless_is_white_lambertian():
    light = torch.tensor([1.0, 0.0, 1.0])
    out = shade("textureless", ALBEDO, NORMAL_Z, ORIGIN, light, L_P, L_A)
    f = 0.7 * math.cos(math.pi / 4) + 0.2
    assert torch.allclose(out, torch.full((3,), f), atol=1e-6)
    assert torch.allclose(out, lambertian(torch.ones(3), NORMAL_Z, ORIGIN, light, L_P, L_A))


def test_shade_albedo_returns_albedo():
    light = torch.tensor([0.0, 0.0, -2.0])  # even unlit
    out = shade("albedo", ALBEDO, NORMAL_Z, ORIGIN, light, L_P, L_A)
    assert torch.equal(out, ALBEDO)


@pytest.mark.parametrize("mode", ["foo", "Lit", ""])
def test_shade_unknown_mode_raises(mode):
    with pytest.raises(ValueError) as err:
        shade(mode, ALBEDO, NORMAL_Z, ORIGIN, torch.tensor([0.0, 0.0, 1.0]), L_P, L_A)
    msg = str(err.value)
    assert repr(mode) in msg
    for valid in TRAINING_SHADING_MODES:
        assert valid in msg


def test_mode_lists():
    assert TRAINING_SHADING_MODES == ("lit", "textureless", "albedo")
    assert set(TRAINING_SHADING_MODES) <= set(SHADING_MODES)


def test_broadcasting_over_images():
    B, H, W = 2, 3, 4
    g = torch.Generator().manual_seed(0)
    albedo = torch.rand(B, H, W, 3, generator=g)
    normals = torch.nn.functional.normalize(torch.randn(B, H, W, 3, generator=g), dim=-1)
    points = torch.randn(B, H, W, 3, generator=g) * 0.3
    light_pos = torch.tensor([[2.0, 0.0, 1.0], [0.0, -3.0, 0.5]])[:, None, None, :]  # (B, 1, 1, 3)
    intensity = torch.tensor([0.6, 0.9])[:, None, None]  # (B, 1, 1)
    ambient = torch.tensor([0.1, 0.3])[:, None, None]
    for mode in TRAINING_SHADING_MODES:
        out = shade(mode, albedo, normals, points, light_pos, intensity, ambient)
        assert out.shape == (B, H, W, 3)
        for b in range(B):
            for h in range(H):
                for w in range(W):
                    n, x, a = normals[b, h, w], points[b, h, w], albedo[b, h, w]
                    light = light_pos[b, 0, 0]
                    cos = max(0.0, float((n * (light - x)).sum() / (light - x).norm()))
                    base = a if mode != "textureless" else torch.ones(3)
                    if mode == "albedo":
                        exp = a
                    else:
                        exp = base * (float(intensity[b, 0, 0]) * cos + float(ambient[b, 0, 0]))
                    assert torch.allclose(out[b, h, w], exp, atol=1e-5), (mode, b, h, w)


def test_scalar_light_parameters_broadcast():
    albedo = torch.rand(5, 3)
    normals = NORMAL_Z.expand(5, 3)
    points = torch.zeros(5, 3)
    out = lambertian(albedo, normals, points, torch.tensor([0.0, 0.0, 1.0]), torch.tensor(0.7), torch.tensor(0.2))
    assert torch.allclose(out, albedo * 0.9, atol=1e-6)


def test_normals_to_rgb():
    n = torch.tensor([[1.0, 0.0, -1.0]])
    assert torch.allclose(normals_to_rgb(n), torch.tensor([[1.0, 0.5, 0.0]]))
