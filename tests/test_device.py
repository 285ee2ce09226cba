"""Devices: one rule for random draws (made on the CPU from the run's generator, then moved), nerfacc's
CUDA sampler found where nerfacc 0.5 keeps it, the occupancy update's draws, and the tests marked
``device``: they run on the CPU here and on CUDA under ``benchmarks/gpu_check.py``
(DREAMFUSION_TEST_DEVICE=cuda), each comparing what the device computes with what the CPU does."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import sys
import types

import nerfacc
import pytest
import torch

from dreamfusion import render
from dreamfusion.cameras import CameraConfig, default_light, make_cameras, sample_cameras, sample_lights
from dreamfusion.config import RenderConfig
from dreamfusion.field import Background, FieldConfig, GridField
from dreamfusion.render import Renderer, occupancy_update
from dreamfusion.trainer import Trainer

BENCH = __import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402

#: how close a device's loss is to the CPU's: the same numbers on a CPU; on CUDA, rounding (TF32
#: convolutions on recent GPUs round to about 1e-3, and guidance multiplies differences by w + 1)
LOSS_RTOL = {"cpu": 1e-6, "cuda": gpu_check.LOSS_RTOL}


def ball_scene(device: torch.device | str = "cpu", sampler: str = "auto", res: int = 24) -> Renderer:
    """A lit ball, red on +X, with its occupancy grid filled in (draws from a seeded generator)."""
    return gpu_check.ball_scene(device, sampler, res)


# ----------------------------------------------------------------------------- nerfacc's CUDA extension


def test_nerfacc_keeps_its_cuda_extension_where_the_renderer_looks():
    """nerfacc 0.5.3's extension is ``nerfacc.cuda._backend._C``, loaded lazily by nerfacc's own
    functions; ``nerfacc.cuda._C`` (where the sampler detection used to look) does not exist."""
    assert importlib.util.find_spec(render.NERFACC_EXTENSION) is not None
    assert importlib.util.find_spec("nerfacc.cuda._C") is None
    assert "from ._backend import _C" in inspect.getsource(nerfacc.cuda)
    with open(importlib.util.find_spec(render.NERFACC_EXTENSION).origin) as f:  # read, not imported: importing builds it
        assert "_C = None" in f.read()


def test_cuda_sampler_available_reads_nerfaccs_backend_module(monkeypatch):
    """With a CUDA device and the extension loaded, the CUDA sampler is used; without the extension
    (nerfacc leaves ``_C`` None where no CUDA toolkit is found), or on a CPU, it is not."""
    backend = types.ModuleType(render.NERFACC_EXTENSION)
    backend._C = object()
    monkeypatch.setitem(sys.modules, render.NERFACC_EXTENSION, backend)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    render.nerfacc_extension.cache_clear()
    try:
        assert render.cuda_sampler_available(torch.device("cuda")) and render.cuda_sampler_available("cuda:0")
        assert not render.cuda_sampler_available("cpu")
        backend._C = None
        render.nerfacc_extension.cache_clear()
        assert not render.cuda_sampler_available("cuda")
    finally:
        render.nerfacc_extension.cache_clear()


def test_no_cuda_sampler_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("checks a machine without a GPU")
    assert not render.cuda_sampler_available("cuda") and not render.cuda_sampler_available("cpu")
    assert Renderer(GridField(FieldConfig(resolution=8)), Background())._sampler(torch.device("cpu")) == "torch"


# ----------------------------------------------------------------------------- the occupancy update's draws


def _ball_density(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.norm(dim=-1) < 0.9, 0.5, 1e-3 * x[:, 0].abs())


def test_occupancy_update_is_nerfaccs_bit_for_bit_with_its_draws_from_a_generator():
    """The same occupancy values and binary grid as nerfacc's own update under torch's global
    generator seeded alike, in the warm-up (every cell) and after it (a quarter of the cells drawn,
    and as many occupied ones drawn from more), without touching the global generator."""
    theirs = nerfacc.OccGridEstimator(roi_aabb=[-1, -1, -1, 1, 1, 1], resolution=16, levels=1)
    ours = nerfacc.OccGridEstimator(roi_aabb=[-1, -1, -1, 1, 1, 1], resolution=16, levels=1)
    for step, seed in ((0, 11), (100, 12), (101, 13)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            theirs._update(step=step, occ_eval_fn=_ball_density, occ_thre=0.01, warmup_steps=64)
        state = torch.get_rng_state()
        occupancy_update(ours, step, _ball_density, occ_thre=0.01, warmup_steps=64, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(ours.occs, theirs.occs) and torch.equal(ours.binaries, theirs.binaries)
    assert 4096 // 4 < int(ours.binaries.sum()) < 4096  # the branch that draws among the occupied cells ran


# ----------------------------------------------------------------------------- one rule for every draw


RANDOM_FUNCTIONS = ("rand", "randn", "randint", "randperm", "multinomial", "normal", "bernoulli", "poisson",
                    "rand_like", "randn_like", "randint_like")


def test_every_draw_of_training_is_made_on_the_cpu_from_the_runs_generator(fast_config, monkeypatch):
    """Steps with occupancy updates in and after the warm-up: every random draw passes a CPU
    generator (seeded from the run's) and asks for no other device (a CPU generator cannot draw on
    CUDA: such a draw fails on a GPU), and torch's global generator is left as it was."""
    cfg = dataclasses.replace(fast_config, steps=4, render=RenderConfig(occupancy_update_every=1, occupancy_warmup=2))
    trainer = Trainer(cfg, "a red cube")
    calls = []
    for name in RANDOM_FUNCTIONS:
        real = getattr(torch, name)

        def record(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, kwargs.get("generator"), kwargs.get("device")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, record)
    state = torch.get_rng_state()
    trainer.run()
    assert trainer.step_count == 4
    assert {"rand", "randn", "randint", "multinomial"} <= {name for name, _, _ in calls}
    for name, generator, device in calls:
        assert isinstance(generator, torch.Generator) and generator.device.type == "cpu", (name, generator)
        assert device is None or torch.device(device).type == "cpu", (name, device)
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------- on the device


@pytest.mark.device
def test_a_stratified_render_on_the_device_draws_what_the_cpu_draws(device):
    """The same stratified offsets on any device, from the same generator (consumed alike), and
    the same image up to float rounding."""
    cams = make_cameras([30.0, 200.0], [20.0, -10.0], 2.0, 1.0)
    lights = default_light(cams)
    want = ball_scene("cpu").render(cams, lights, 24, 24, "lit", stratified=True, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    got = ball_scene(device).render(cams.to(device), lights.to(device), 24, 24, "lit", stratified=True, generator=g)
    after = torch.Generator().manual_seed(5)
    torch.rand(2 * 24 * 24, 1, generator=after)
    assert torch.equal(g.get_state(), after.get_state())
    assert got["image"].device.type == device.type
    torch.testing.assert_close(got["image"].cpu(), want["image"], atol=2e-4, rtol=1e-3)
    assert abs(got["n_samples"] - want["n_samples"]) <= 0.002 * want["n_samples"]


@pytest.mark.device
def test_the_occupancy_update_on_the_device_makes_the_cpus_draws(device):
    grids = []
    for where in ("cpu", device):
        est = nerfacc.OccGridEstimator(roi_aabb=[-1, -1, -1, 1, 1, 1], resolution=16, levels=1).to(where)
        for step in (0, 100):
            occupancy_update(est, step, _ball_density, warmup_steps=64, generator=torch.Generator().manual_seed(step + 1))
        grids.append((est.occs.cpu(), est.binaries.cpu()))
    torch.testing.assert_close(grids[1][0], grids[0][0], atol=1e-6, rtol=1e-5)
    assert torch.equal(grids[1][1], grids[0][1])


@pytest.mark.device
def test_nerfaccs_cuda_sampler_gives_the_pytorch_samplers_samples(device):
    """Where nerfacc's CUDA sampler runs, it marches the same samples as the PyTorch sampler."""
    if not render.cuda_sampler_available(device):
        pytest.skip("nerfacc's CUDA sampler needs a CUDA device and its compiled extension")
    out = gpu_check.compare_samplers(ball_scene(device, "torch"), "nerfacc", "torch", size=32)
    assert out["ok"], out


@pytest.mark.device
def test_training_on_the_device_makes_the_cpu_runs_draws(device, fast_config):
    """Steps on the device draw the very cameras, shading modes and timesteps of the same seed on the
    CPU (one generator, consumed alike), and the first step's loss is the CPU's up to rounding; on
    the CPU the two runs are identical. Training leaves torch's global generators as they were."""
    cfg = dataclasses.replace(fast_config, steps=4, render=RenderConfig(occupancy_update_every=2, occupancy_warmup=2))
    runs = [Trainer(dataclasses.replace(cfg, device=str(where)), "a red cube") for where in ("cpu", device)]
    cpu_state = torch.get_rng_state()  # after loading the prior (its modules are built before their weights are read)
    cuda_state = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    metrics = [[run.step() for _ in range(4)] for run in runs]
    (a, b), (ma, mb) = runs, metrics
    assert [m["mode"] for m in ma] == [m["mode"] for m in mb] and [m["t_max"] for m in ma] == [m["t_max"] for m in mb]
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a.training_cameras(), b.training_cameras(), strict=True))
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert mb[0]["loss"] == pytest.approx(ma[0]["loss"], rel=LOSS_RTOL[device.type])
    grid_a, grid_b = a.field.density_grid.detach(), b.field.density_grid.detach().cpu()
    if device.type == "cpu":
        assert torch.equal(grid_a, grid_b)
    else:  # rounding grows through the steps; the scenes stay alike
        assert (grid_a - grid_b).abs().mean() < 0.2 * grid_a.abs().mean()
        assert torch.equal(torch.cuda.get_rng_state_all()[0], cuda_state[0])
    assert torch.equal(torch.get_rng_state(), cpu_state)


@pytest.mark.device
def test_sds_on_the_device_draws_the_cpus_timesteps_and_noise(device, tiny_prior_dir):
    from dreamfusion.guidance import GuidanceConfig, load_guidance

    cams = sample_cameras(CameraConfig(), 2, torch.Generator().manual_seed(0))
    lights = sample_lights(CameraConfig(), cams, torch.Generator().manual_seed(0))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    opacity = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    out = []
    for where in ("cpu", device):
        from dreamfusion.guidance import RenderBatch

        g = load_guidance(GuidanceConfig(model=str(tiny_prior_dir)), where)
        x = images.to(where).requires_grad_(True)
        res = g.sds_loss(RenderBatch(x, opacity.to(where), cams.to(where), lights.to(where), ["lit", "textureless"]),
                         ["a red cube, front view", "a red cube, side view"], (0.02, 0.98), torch.Generator().manual_seed(3))
        res["loss"].backward()
        out.append((res["t"].cpu(), float(res["loss"].detach()), x.grad.cpu()))
        assert all(v.device.type == "cpu" for v in (g.text_cache.get("a red cube, front view").states,))
    assert torch.equal(out[0][0], out[1][0])
    assert out[1][1] == pytest.approx(out[0][1], rel=LOSS_RTOL[device.type])
    torch.testing.assert_close(out[1][2], out[0][2], atol=1e-3 if device.type == "cuda" else 0.0, rtol=LOSS_RTOL[device.type])
