"""The Trainer: stepping, metrics and callbacks, the NaN guard, determinism, checkpoints (round
trip, exact resume, corrupt files), prompt refinement, driving from another thread, and config
validation. Everything runs on the tiny random prior of ``conftest.py`` at tiny sizes."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from dreamfusion.cameras import make_cameras
from dreamfusion.config import OptimConfig
from dreamfusion.field import FieldConfig
from dreamfusion.guidance import GuidanceConfig, load_guidance
from dreamfusion.render import RenderConfig
from dreamfusion.trainer import CHECKPOINT_VERSION, CheckpointError, Trainer, blob_scale, validate_config

PROMPT = "a red cube"


@pytest.fixture(scope="module")
def guidance(tiny_prior_dir):
    """One tiny prior shared by the module's trainers (loading it is the slow part)."""
    return load_guidance(GuidanceConfig(model=str(tiny_prior_dir)))


def grid(trainer: Trainer) -> torch.Tensor:
    return torch.cat([trainer.field.density_grid, trainer.field.albedo_grid], 1).detach().clone()


# ---------------------------------------------------------------------------- stepping


def test_steps_metrics_callbacks_and_preview(fast_config, guidance):
    cfg = dataclasses.replace(fast_config, steps=4, preview_every=2)
    seen: list[dict] = []
    trainer = Trainer(cfg, PROMPT, guidance=guidance, callbacks=[seen.append])
    assert trainer.step_count == 0 and not trainer.done
    before = grid(trainer)

    m = trainer.step()
    assert trainer.step_count == 1 and m["step"] == 1 and m["total_steps"] == 4
    assert isinstance(m["loss"], float) and m["loss"] == m["loss"]  # finite, not NaN
    assert m["seconds"] > 0 and m["skipped"] is False and m["prompt"] == PROMPT
    assert "preview" not in m  # step 1 is not a multiple of preview_every
    assert not torch.equal(grid(trainer), before), "an optimiser step should move the grid"

    trainer.run()
    assert trainer.step_count == 4 and trainer.done
    assert [r["step"] for r in seen] == [1, 2, 3, 4]
    assert seen[0] is m
    previews = {r["step"]: r["preview"] for r in seen if "preview" in r}
    assert set(previews) == {2, 4}
    for p in previews.values():
        assert p.shape == (3, 64, 64) and p.min() >= 0 and p.max() <= 1
    assert [h["step"] for h in trainer.history] == [1, 2, 3, 4]
    assert all("preview" not in h for h in trainer.history)
    json.dumps(trainer.history)  # the log rows are plain JSON

    trainer.run()  # already done: no more steps
    assert trainer.step_count == 4


def test_training_cameras_are_the_cameras_drawn(fast_config, guidance, monkeypatch):
    import dreamfusion.trainer as trainer_module
    from dreamfusion.trainer import CAMERA_HISTORY

    drawn = []
    real = trainer_module.sample_cameras
    monkeypatch.setattr(trainer_module, "sample_cameras", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    cfg = dataclasses.replace(fast_config, steps=CAMERA_HISTORY + 3, views=2)
    trainer = Trainer(cfg, PROMPT, guidance=guidance)
    assert trainer.training_cameras() == []
    trainer.step()
    poses = trainer.training_cameras()
    assert len(poses) == 2
    for i, (c2w, focal) in enumerate(poses):
        assert torch.equal(c2w, drawn[0].c2w[i]) and focal == pytest.approx(float(drawn[0].focal[i]))
    trainer.run()
    poses = trainer.training_cameras()
    assert len(poses) == 2 * CAMERA_HISTORY  # only the newest steps, newest last
    assert torch.equal(poses[-1][0], drawn[-1].c2w[1]) and torch.equal(poses[0][0], drawn[3].c2w[0])


def test_no_preview_when_disabled(fast_config, guidance):
    trainer = Trainer(dataclasses.replace(fast_config, steps=2), PROMPT, guidance=guidance)
    assert fast_config.preview_every == 0
    trainer.run()
    assert all("preview" not in h for h in trainer.history)
    assert trainer.preview(size=16).shape == (3, 16, 16)


def test_run_with_step_limit(fast_config, guidance):
    trainer = Trainer(fast_config, PROMPT, guidance=guidance)
    trainer.run(2)
    assert trainer.step_count == 2
    trainer.run(100)  # capped at the run's total
    assert trainer.step_count == fast_config.steps


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_nan_loss_skips_the_update(fast_config, guidance, monkeypatch, what):
    messages: list[str] = []
    trainer = Trainer(fast_config, PROMPT, guidance=guidance, on_message=messages.append)
    trainer.step()  # a normal step first, so Adam has state to protect
    original = trainer.guidance.sds_loss

    def nan_loss(*args, **kwargs):
        out = original(*args, **kwargs)
        if what == "loss":
            return {**out, "loss": out["loss"] * float("nan")}
        # a finite loss (+ sqrt(0) = 0) whose gradient is not: d sqrt(0 * g) / dg = 0 * inf = NaN
        corner = trainer.field.density_grid[0, 0, 0, 0, 0]
        loss = out["loss"] + torch.sqrt(corner * 0.0)
        assert torch.isfinite(loss)
        return {**out, "loss": loss}

    monkeypatch.setattr(trainer.guidance, "sds_loss", nan_loss)
    before = grid(trainer)
    adam_before = {k: v.clone() for k, v in trainer.optimizer.state[trainer.field.density_grid].items()}
    m = trainer.step()
    assert m["skipped"] is True
    assert trainer.step_count == 2, "a skipped step still counts"
    assert torch.equal(grid(trainer), before), "a NaN step must not touch the grid"
    for k, v in trainer.optimizer.state[trainer.field.density_grid].items():
        assert torch.equal(v, adam_before[k]), f"a NaN step must not touch Adam's {k}"
    assert len(messages) == 1
    assert "step 1" in messages[0] and "non-finite" in messages[0] and "skipped" in messages[0]

    monkeypatch.setattr(trainer.guidance, "sds_loss", original)
    m = trainer.step()
    assert m["skipped"] is False and not torch.equal(grid(trainer), before)
    assert len(messages) == 1


# ---------------------------------------------------------------------------- determinism


def test_same_seed_same_grid_different_seed_different(fast_config, guidance):
    cfg = dataclasses.replace(fast_config, steps=4)
    a = Trainer(cfg, PROMPT, guidance=guidance)
    b = Trainer(cfg, PROMPT, guidance=guidance)
    c = Trainer(dataclasses.replace(cfg, seed=1), PROMPT, guidance=guidance)
    for t in (a, b, c):  # interleaved on purpose: no trainer may depend on shared global state
        t.run(2)
    for t in (c, b, a):
        t.run()
    assert torch.equal(grid(a), grid(b))
    assert not torch.allclose(grid(a), grid(c))
    assert [h["mode"] for h in a.history] == [h["mode"] for h in b.history]


def test_the_occupancy_grid_is_first_refreshed_after_the_first_step(fast_config, guidance):
    """Until its first refresh every cell counts as occupied and a step marches densely: the grid is
    refreshed after step 1 (not only at the first multiple of occupancy_update_every), so step 2
    already skips the empty space around the blob."""
    cfg = dataclasses.replace(fast_config, steps=3, render=RenderConfig(occupancy_update_every=8))
    trainer = Trainer(cfg, "a red cube", guidance=guidance)
    first = trainer.step()
    assert first["occupancy"] < 0.5
    second = trainer.step()
    assert second["samples"] < first["samples"] / 2


def test_same_seed_same_grid_across_occupancy_updates(fast_config, guidance):
    """The occupancy grid is refreshed every few steps; that refresh draws random numbers too."""
    cfg = dataclasses.replace(fast_config, steps=6, render=RenderConfig(occupancy_update_every=2, occupancy_warmup=2))
    a = Trainer(cfg, PROMPT, guidance=guidance)
    b = Trainer(cfg, PROMPT, guidance=guidance)
    for _ in range(cfg.steps):
        a.step()
        torch.rand(5)  # someone else using torch's global RNG in between
        b.step()
    assert torch.equal(grid(a), grid(b))
    assert torch.equal(a.renderer.estimator.occs, b.renderer.estimator.occs)


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(fast_config, guidance, tmp_path):
    trainer = Trainer(fast_config, PROMPT, guidance=guidance)
    trainer.run(3)
    path = trainer.save_checkpoint(tmp_path / "sub" / "ckpt.safetensors")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))

    again = Trainer.from_checkpoint(path, guidance=guidance)
    assert again.step_count == 3
    assert again.total_steps == trainer.total_steps
    assert again.prompt == PROMPT
    assert torch.equal(grid(again), grid(trainer))
    assert torch.equal(again.renderer.estimator.binaries, trainer.renderer.estimator.binaries)
    assert torch.equal(again.renderer.estimator.occs, trainer.renderer.estimator.occs)
    assert again.cfg == trainer.cfg

    # overwriting an existing checkpoint works (atomic replace)
    trainer.step()
    trainer.save_checkpoint(path)
    assert Trainer.from_checkpoint(path, guidance=guidance).step_count == 4


def test_checkpoint_loads_its_own_prior(fast_config, tmp_path):
    """Without ``guidance=``, the trainer loads the prior named in the saved config."""
    trainer = Trainer(dataclasses.replace(fast_config, steps=2), "a blue ball")
    trainer.run()
    again = Trainer.from_checkpoint(trainer.save_checkpoint(tmp_path / "c.safetensors"))
    assert again.prompt == "a blue ball" and again.step_count == 2 and again.done
    assert torch.equal(grid(again), grid(trainer))


@pytest.mark.parametrize("render", [RenderConfig(), RenderConfig(occupancy_update_every=2, occupancy_warmup=2)],
                         ids=["plain", "occupancy-updates"])
def test_resume_is_exact(fast_config, guidance, tmp_path, render):
    """A run of 6 steps == 3 steps, save, load, 3 more: optimiser state and RNG are restored."""
    cfg = dataclasses.replace(fast_config, steps=6, render=render)
    straight = Trainer(cfg, PROMPT, guidance=guidance)
    straight.run()

    first = Trainer(cfg, PROMPT, guidance=guidance)
    first.run(3)
    path = first.save_checkpoint(tmp_path / "half.safetensors")
    torch.rand(7)  # the global RNG moves on between save and load, as it would in another process
    resumed = Trainer.from_checkpoint(path, guidance=guidance)
    assert resumed.step_count == 3 and not resumed.done
    resumed.run()
    assert resumed.step_count == 6
    assert torch.allclose(grid(resumed), grid(straight), atol=1e-6)
    assert [h["mode"] for h in resumed.history] == [h["mode"] for h in straight.history[3:]]


def test_resume_without_optimiser_state_would_differ(fast_config, guidance, tmp_path):
    """Guards the test above: dropping Adam's moments does change the result."""
    cfg = dataclasses.replace(fast_config, steps=6)
    straight = Trainer(cfg, PROMPT, guidance=guidance)
    straight.run()
    first = Trainer(cfg, PROMPT, guidance=guidance)
    first.run(3)
    resumed = Trainer.from_checkpoint(first.save_checkpoint(tmp_path / "c.safetensors"), guidance=guidance)
    resumed.optimizer.state.clear()
    resumed.run()
    assert not torch.allclose(grid(resumed), grid(straight), atol=1e-6)


def _valid_checkpoint(fast_config, guidance, tmp_path):
    trainer = Trainer(fast_config, PROMPT, guidance=guidance)
    trainer.step()
    return trainer.save_checkpoint(tmp_path / "good.safetensors")


def test_corrupt_checkpoints(fast_config, guidance, tmp_path):
    good = _valid_checkpoint(fast_config, guidance, tmp_path)
    data = good.read_bytes()

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError, match="not found"):
        Trainer.from_checkpoint(missing, guidance=guidance)

    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        Trainer.from_checkpoint(noise, guidance=guidance)

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        Trainer.from_checkpoint(empty, guidance=guidance)

    for name, cut in (("header", 20), ("half", len(data) // 2), ("tail", len(data) - 10)):
        truncated = tmp_path / f"truncated-{name}.safetensors"
        truncated.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            Trainer.from_checkpoint(truncated, guidance=guidance)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a dreamfusion checkpoint"):
        Trainer.from_checkpoint(foreign, guidance=guidance)

    meta, tensors = Trainer.read_checkpoint(good)
    other_version = tmp_path / "v99.safetensors"
    save_file(tensors, str(other_version), metadata={**meta, "version": "99"})
    with pytest.raises(CheckpointError, match=f"version 99.*reads versions.*{CHECKPOINT_VERSION}"):
        Trainer.from_checkpoint(other_version, guidance=guidance)

    folder = tmp_path / "a_folder.safetensors"
    folder.mkdir()
    with pytest.raises(CheckpointError):
        Trainer.from_checkpoint(folder, guidance=guidance)


def test_checkpoint_with_incomplete_metadata(fast_config, guidance, tmp_path):
    """Our format and version but fields missing or mangled: still a CheckpointError, not a KeyError."""
    good = _valid_checkpoint(fast_config, guidance, tmp_path)
    meta, tensors = Trainer.read_checkpoint(good)
    for key in ("config", "prompt", "step"):
        bad = tmp_path / f"no-{key}.safetensors"
        save_file(tensors, str(bad), metadata={k: v for k, v in meta.items() if k != key})
        with pytest.raises(CheckpointError):
            Trainer.from_checkpoint(bad, guidance=guidance)
    bad_values = {"config": "{not json", "step": "three"}
    for key, value in bad_values.items():
        bad = tmp_path / f"bad-{key}.safetensors"
        save_file(tensors, str(bad), metadata={**meta, key: value})
        with pytest.raises(CheckpointError, match="corrupt metadata"):
            Trainer.from_checkpoint(bad, guidance=guidance)
    config = json.loads(meta["config"])
    config["field"]["from_the_future"] = 1
    bad = tmp_path / "unknown-setting.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(CheckpointError, match="from_the_future"):
        Trainer.from_checkpoint(bad, guidance=guidance)


def test_checkpoint_of_another_grid_size(fast_config, guidance, tmp_path):
    good = _valid_checkpoint(fast_config, guidance, tmp_path)
    with pytest.raises(CheckpointError, match="does not match"):
        Trainer.from_checkpoint(good, guidance=guidance, overrides={"render": {"occupancy_resolution": 16}})
    # the scene's grids come at the resolution they were saved with (a run may have grown them)
    t = Trainer.from_checkpoint(good, guidance=guidance, overrides={"field": {"resolution": 16}})
    assert t.field.resolution == fast_config.field.resolution
    # a compatible override is fine
    t = Trainer.from_checkpoint(good, guidance=guidance, overrides={"steps": 10})
    assert t.total_steps == 10 and t.step_count == 1


# ---------------------------------------------------------------------------- prompt


def test_set_prompt_mid_run_keeps_the_scene(fast_config, guidance, monkeypatch):
    trainer = Trainer(fast_config, PROMPT, guidance=guidance)
    calls: list[list[str]] = []
    original = trainer.guidance.sds_loss

    def spy(images, texts, *args, **kwargs):
        calls.append(list(texts))
        return original(images, texts, *args, **kwargs)

    monkeypatch.setattr(trainer.guidance, "sds_loss", spy)
    trainer.run(2)
    assert len(calls) == 2
    assert all(t.startswith(PROMPT + ", ") and t.endswith(" view") for c in calls for t in c)

    before, step = grid(trainer), trainer.step_count
    trainer.set_prompt("  a   blue\tball ")
    assert trainer.prompt == "a blue ball"  # whitespace normalised
    assert torch.equal(grid(trainer), before), "refining the prompt must not reset the scene"
    assert trainer.step_count == step

    trainer.step()
    assert all(t.startswith("a blue ball, ") for t in calls[-1])
    assert trainer.history[-1]["prompt"] == "a blue ball"

    for bad in ("", "   \n\t"):
        with pytest.raises(ValueError, match="empty"):
            trainer.set_prompt(bad)
    assert trainer.prompt == "a blue ball"

    with pytest.raises(ValueError, match="empty"):
        Trainer(fast_config, " ", guidance=guidance)


def test_long_prompt_gives_a_truncation_note(fast_config, guidance):
    messages: list[str] = []
    long_prompt = " ".join(["a shiny red cube"] * 15)
    trainer = Trainer(fast_config, long_prompt, guidance=guidance, on_message=messages.append)
    assert len(messages) == 1 and "over the limit" in messages[0]
    trainer.step()  # still trains
    messages.clear()
    trainer.set_prompt("a red cube")
    assert messages == []


def test_extend(fast_config, guidance):
    trainer = Trainer(dataclasses.replace(fast_config, steps=2), PROMPT, guidance=guidance)
    trainer.run()
    assert trainer.done
    trainer.extend(2)
    assert trainer.total_steps == 4 and not trainer.done
    trainer.run()
    assert trainer.step_count == 4 and trainer.done
    for bad in (0, -3):
        with pytest.raises(ValueError, match="positive"):
            trainer.extend(bad)
    assert trainer.total_steps == 4


# ---------------------------------------------------------------------------- threads


def _wait_for(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _settled_count(trainer: Trainer) -> int:
    """The step count once a step that was under way when pausing has finished: a step holds
    the trainer's lock, so taking it (after a moment for the loop to reach its next step) waits."""
    time.sleep(0.2)
    with trainer.lock:
        return trainer.step_count


def test_drive_from_another_thread(fast_config, guidance):
    cfg = dataclasses.replace(fast_config, steps=10_000)
    trainer = Trainer(cfg, PROMPT, guidance=guidance)
    errors: list[BaseException] = []

    def work():
        try:
            trainer.run()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        assert _wait_for(lambda: trainer.step_count >= 2), "training did not start"

        # viewing from this thread while it trains
        img = trainer.render_views(make_cameras(0.0, 10.0, 1.9, 1.1), size=16, mode="normals")
        assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()
        assert trainer.preview(size=16).shape == (3, 16, 16)

        trainer.pause()
        assert trainer.paused
        paused_at = _settled_count(trainer)
        time.sleep(0.6)
        assert trainer.step_count == paused_at, "steps continued while paused"
        assert thread.is_alive()
        # a paused trainer can be looked at, refined and saved
        assert trainer.render_views(make_cameras(90.0, 0.0, 1.9, 1.1), size=16).shape == (1, 3, 16, 16)
        trainer.set_prompt("a blue ball")

        trainer.resume()
        assert not trainer.paused
        assert _wait_for(lambda: trainer.step_count >= paused_at + 2), "steps did not resume"
        assert trainer.history[-1]["prompt"] == "a blue ball"
    finally:
        trainer.stop()
        thread.join(timeout=30)
    assert not thread.is_alive(), "run() did not return after stop()"
    assert errors == []
    stopped_at = trainer.step_count
    assert stopped_at < cfg.steps
    time.sleep(0.3)
    assert trainer.step_count == stopped_at


def test_stop_while_paused(fast_config, guidance):
    trainer = Trainer(dataclasses.replace(fast_config, steps=10_000), PROMPT, guidance=guidance)
    thread = threading.Thread(target=trainer.run, daemon=True)
    thread.start()
    assert _wait_for(lambda: trainer.step_count >= 1)
    trainer.pause()
    at = _settled_count(trainer)
    trainer.stop()  # must wake the paused loop and end it without another step
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert trainer.step_count == at


def test_stop_before_run_is_not_lost_and_extend_continues(fast_config, guidance):
    trainer = Trainer(fast_config, PROMPT, guidance=guidance)
    trainer.stop()  # e.g. the user pressed Stop before the training thread started
    trainer.run()
    assert trainer.step_count == 0
    trainer.extend(2)  # asking for more work un-stops the run
    trainer.run()
    assert trainer.step_count == fast_config.steps + 2


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(steps=0), "steps must be positive, got 0"),
        (dict(steps=-5), "steps must be positive"),
        (dict(render_size=4), "render size must be between 8 and .*got 4"),
        (dict(render_size=100000), "render size must be between .*got 100000"),
        (dict(views=0), "views"),
        (dict(device="tpu"), "unknown device 'tpu'"),
        (dict(field=FieldConfig(resolution=4)), "grid resolution"),
        (dict(guidance=GuidanceConfig(t_min=0.5, t_max=0.2)), "t_min"),
        (dict(guidance=GuidanceConfig(t_min=0.85)), "t_max_end"),
        (dict(guidance=GuidanceConfig(t_min_start=0.9)), "t_min_start"),
        (dict(guidance=GuidanceConfig(guidance_scale=float("nan"))), "guidance scale"),
        (dict(guidance=GuidanceConfig(camera_guidance_scale=-1.0)), "camera guidance scale"),
        (dict(guidance=GuidanceConfig(random_background=1.5)), "random-background fraction"),
        (dict(seed=-1), "seed must be a whole number from 0 to 2\\^63 - 1, got -1"),
        (dict(seed=2**63), "seed must be a whole number"),
        (dict(render=RenderConfig(occupancy_resolution=100000)), "occupancy grid resolution must be between 4 and 256"),
        (dict(render=RenderConfig(samples_per_ray=10**6)), "samples_per_ray must be between 1 and 1024"),
        (dict(render=RenderConfig(sampler="fast")), "unknown sampler 'fast'"),
        (dict(field=FieldConfig(background="green")), "unknown background 'green'"),
        (dict(guidance=GuidanceConfig(weighting="cubic")), "unknown SDS weighting 'cubic'"),
        (dict(steps=10**7), "steps must be between 1 and 1000000"),
        (dict(field=FieldConfig(sdf_fraction=1.5)), "sdf_fraction must be between 0 and 1"),
        (dict(field=FieldConfig(sdf_beta=0.0)), "sdf_beta must be between"),
        (dict(optim=OptimConfig(sdf_adam_eps=-1.0)), "sdf_adam_eps"),
        (dict(optim=OptimConfig(sdf_smoothness_weight=float("nan"))), "sdf_smoothness_weight"),
    ],
)
def test_validate_config_rejects(fast_config, change, message):
    with pytest.raises(ValueError, match=message):
        validate_config(dataclasses.replace(fast_config, **change))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_validate_config_cuda_without_gpu(fast_config):
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="no CUDA GPU"):
            validate_config(dataclasses.replace(fast_config, device=device))
    with pytest.raises(ValueError, match="no CUDA GPU"):
        Trainer(dataclasses.replace(fast_config, device="cuda"), PROMPT)


def test_validate_config_accepts_the_fast_config(fast_config):
    validate_config(fast_config)


def test_a_config_read_from_json_is_checked_for_types():
    """A config from a file (a checkpoint's, a run's config.json) gets the checks tyro gives the
    command line: the wrong type is a ValueError naming the setting, not a TypeError later."""
    import json

    from dreamfusion.config import TrainConfig, config_from_dict, config_to_dict

    data = json.loads(json.dumps(config_to_dict(TrainConfig())))
    assert config_from_dict(data) == TrainConfig()  # lists back to tuples, every default kept
    assert config_from_dict({"field": {"blob_density": 5}}).field.blob_density == 5.0  # a whole number where a float goes
    for bad, message in [({"steps": "4"}, "steps: expected int, got '4'"), ({"steps": True}, "steps: expected int, got True"),
                         ({"field": {"coarse_resolutions": [8, "16"]}}, r"field.coarse_resolutions\[1\]: expected int"),
                         ({"guidance": {"t_max_end": "0.8"}}, "guidance.t_max_end: expected float or null"),
                         ({"optim": {"lr": float("inf")}}, "optim.lr: expected a finite number"),
                         ({"camera": {"zoom_range": [0.6, 0.7, 0.8]}}, "camera.zoom_range: expected a list of 2 or null"),
                         ({"render": 3}, "render: expected RenderConfig, got 3"), ({"colour": "red"}, "unknown setting.*colour")]:
        with pytest.raises(ValueError, match=message):
            config_from_dict(bad)


def test_snapshot_is_a_copy_and_an_export_comes_from_one(fast_config, guidance, tmp_path, monkeypatch):
    import dreamfusion.export as export
    import dreamfusion.runs as runs

    trainer = Trainer(fast_config, PROMPT, guidance=guidance)
    trainer.run(3)
    cams = make_cameras([30.0, 200.0], [20.0, 5.0], 1.9, 1.1)
    snap = trainer.snapshot()
    before = trainer.render_views(cams, size=16, scene=snap)
    assert torch.equal(before, trainer.render_views(cams, size=16))
    with torch.no_grad():
        trainer.field.density_grid.add_(1.0)
    assert torch.equal(trainer.render_views(cams, size=16, scene=snap), before)  # a copy, not a view
    assert trainer.snapshot(snap) is snap and torch.equal(trainer.render_views(cams, size=16, scene=snap), trainer.render_views(cams, size=16))

    # a training step lands while the mesh is being extracted: the turntable still shows the
    # state the mesh came from, not the newer one
    state = trainer.snapshot()
    real_extract = export.extract_mesh
    seen = {}

    def extract_then_train(*args, **kwargs):
        mesh = real_extract(*args, **kwargs)
        trainer.step()
        return mesh

    def capture_turntable(render_fn, path, **kwargs):
        seen["frames"] = render_fn(cams)
        return path

    monkeypatch.setattr(export, "extract_mesh", extract_then_train)  # runs imports them when it exports (it imports no torch itself)
    monkeypatch.setattr(export, "save_turntable", capture_turntable)
    step = trainer.step_count
    runs.export_scene(trainer, tmp_path, runs.ExportOptions(formats=("ply",), video="gif", video_size=16, mesh_resolution=32))
    assert trainer.step_count == step + 1
    live = trainer.render_views(cams, size=16)
    assert torch.equal(seen["frames"], trainer.render_views(cams, size=16, scene=state))
    assert not torch.equal(seen["frames"], live)


def test_blob_scale_by_hand():
    """Linear from 1 to 0 over the fraction of the run, or over the floor in steps where longer."""
    assert blob_scale(0, 400, 0.5, 150) == 1.0
    assert blob_scale(100, 400, 0.5, 150) == pytest.approx(0.5)  # over 200 steps
    assert blob_scale(300, 400, 0.5, 150) == 0.0
    assert blob_scale(30, 40, 0.5, 150) == pytest.approx(0.8)  # a short run: over the floor's 150
    assert blob_scale(600, 1200, 0.5, 150) == 0.0
    assert blob_scale(5, 10, 0.0, 0) == 1.0


def test_blob_fades_over_a_fraction_of_the_run_and_never_comes_back(fast_config, guidance):
    """The blob's inside fades over blob_fade_fraction of the run (never faster than over
    blob_fade_steps), so the schedule compresses with a shorter run; a run extended after the fade
    (Refine) does not get its blob back; blob_fade_steps 0 keeps it."""
    field = dataclasses.replace(fast_config.field, blob_fade_fraction=0.5, blob_fade_steps=2)
    cfg = dataclasses.replace(fast_config, steps=16, field=field)
    trainer = Trainer(cfg, "a red cube", guidance=guidance)
    assert float(trainer.field.blob_scale) == 1.0
    for _ in range(3):
        trainer.step()
    # set at the start of each step from the steps already taken: 1 - 2/8 during the third
    assert float(trainer.field.blob_scale) == pytest.approx(1 - 2 / 8)
    for _ in range(8):
        trainer.step()
    assert float(trainer.field.blob_scale) == 0.0
    trainer.extend(100)  # the fade's span is now 58 steps, of which 11 are taken: it must stay gone
    trainer.step()
    assert float(trainer.field.blob_scale) == 0.0
    still = dataclasses.replace(cfg, field=dataclasses.replace(cfg.field, blob_fade_steps=0))
    trainer = Trainer(still, "a red cube", guidance=guidance)
    trainer.step()
    trainer.step()
    assert float(trainer.field.blob_scale) == 1.0


def test_a_parked_run_drops_what_only_training_needs_and_resumes_exactly(fast_config, guidance, tmp_path):
    """park() (what the app does to a finished run) drops the prior, the gradients and Adam's
    moments; a run that resumes reads the moments back from its checkpoint and ends exactly where
    a run that was never parked ends. A checkpoint written while parked still holds them."""
    cfg = dataclasses.replace(fast_config, steps=4)
    kept = Trainer(cfg, "a red cube", guidance=guidance)
    kept.run()
    kept.extend(3)
    kept.run()

    parked = Trainer(cfg, "a red cube", guidance=guidance)
    parked.run()
    ckpt = parked.save_checkpoint(tmp_path / "checkpoint.safetensors")
    before = {k: v.clone() for k, v in parked.state_tensors().items() if k.startswith("optim.")}
    assert before
    parked.park(ckpt)
    assert parked.guidance is None and len(parked.optimizer.state) == 0
    assert all(p.grad is None for g in parked.optimizer.param_groups for p in g["params"])
    again = parked.state_tensors()  # e.g. a checkpoint written while it is parked
    assert all(torch.equal(again[k], v) for k, v in before.items())
    parked.attach_guidance(guidance)
    parked.extend(3)
    parked.run()
    assert parked.step_count == kept.step_count == 7
    assert torch.equal(grid(parked), grid(kept))

    # without its checkpoint Adam restarts (the scene is whole), and the run says so
    notes = []
    lost = Trainer(cfg, "a red cube", guidance=guidance, on_message=notes.append)
    lost.run()
    lost.park(tmp_path / "gone.safetensors")
    lost.attach_guidance(guidance)
    lost.extend(3)
    lost.run()
    assert lost.step_count == 7 and any("optimiser restarted" in n for n in notes)
    assert not torch.equal(grid(lost), grid(kept))


def _graded_backgrounds(trainer: Trainer, monkeypatch, steps: int = 3) -> list[torch.Tensor]:
    """The colour of each graded render where it is empty (opacity ~ 0), per step (views x 3)."""
    seen = []
    original = trainer.guidance.loss

    def spy(renders, *args, **kwargs):
        empty = renders.opacity.detach() < 1e-4  # (B, 1, H, W)
        seen.append(torch.stack([renders.images.detach()[i][:, empty[i, 0]].mean(1) for i in range(len(renders))]))
        return original(renders, *args, **kwargs)

    monkeypatch.setattr(trainer.guidance, "loss", spy)
    for _ in range(steps):
        trainer.step()
    return seen


def test_a_prior_trained_on_random_backgrounds_grades_renders_on_them(fast_config, tiny_prior_dir, tmp_path, monkeypatch):
    """The tiny prior's config says it was trained on random solid backgrounds (the default of a
    new prior): SDS renders then stand on random colours, one per view; a prior trained on white
    only (v1's config) is graded on the scene's white, and so is everything with the fraction 0."""
    from dreamfusion.prior.model import PriorConfig

    cfg = dataclasses.replace(fast_config, views=2)
    assert PriorConfig.load(tiny_prior_dir).random_background > 0
    coloured = _graded_backgrounds(Trainer(cfg, PROMPT), monkeypatch)
    colours = torch.cat(coloured)
    assert colours.shape == (6, 3)
    assert ((colours - 1).abs().amax(dim=1) > 0.05).all(), colours  # none of them white
    assert (colours[0] - colours[1]).abs().max() > 0.05  # one colour per view

    off = dataclasses.replace(cfg, guidance=dataclasses.replace(cfg.guidance, random_background=0.0))
    assert torch.allclose(torch.cat(_graded_backgrounds(Trainer(off, PROMPT), monkeypatch)), torch.ones(6, 3), atol=1e-4)

    white_only = tmp_path / "white_only"
    white_only.mkdir()
    for f in tiny_prior_dir.iterdir():
        (white_only / f.name).write_bytes(f.read_bytes())
    config = json.loads((white_only / "config.json").read_text())
    config.pop("random_background")  # a folder from before random backgrounds: trained on white
    (white_only / "config.json").write_text(json.dumps(config))
    old = dataclasses.replace(cfg, guidance=dataclasses.replace(cfg.guidance, model=str(white_only)))
    assert torch.allclose(torch.cat(_graded_backgrounds(Trainer(old, PROMPT), monkeypatch)), torch.ones(6, 3), atol=1e-4)
