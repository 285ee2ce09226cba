"""The app's run manager without a browser, with real worker processes: controls that reach the
worker's Trainer, refinements that change nothing when rejected and continue a finished run from
its checkpoint, a killed worker that costs only its run, abandoned runs, a bounded queue, the
operator's allowlist of models, a gallery that names no run, and a restart after a crash."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from waiting import wait_for  # tests/ is on sys.path

from app.jobs import RunError, RunManager
from dreamfusion.checkpoint import read_checkpoint

OWNER = "browser:" + "o" * 20
EXPORTS = {"mesh_resolution": 24, "video_frames": 4, "video_size": 32}


def small(prior) -> dict:
    # a big blob that stays (20 / 0.5, no fade): the tiny random prior builds nothing, and a run of
    # hundreds of steps must still leave a scene to export
    return {"render_size": 32, "views": 1, "preview_every": 2, "guidance": {"model": str(prior)},
            "field": {"resolution": 24, "blob_density": 20.0, "blob_radius": 0.5, "blob_fade_steps": 0}}



def finished(run, timeout=120.0):
    wait_for(lambda: run.status in ("done", "stopped", "failed"), timeout)
    return run


@pytest.fixture(scope="module")
def manager(tmp_path_factory, tiny_prior_dir):
    """One worker process for the module's runs (each test its own owner)."""
    m = RunManager(tmp_path_factory.mktemp("runs"), small(tiny_prior_dir), max_concurrent=1, checkpoint_every=5, export_defaults=EXPORTS)
    assert m.wait_ready() == []
    yield m
    m.shutdown()


def test_pause_resume_stop_reach_the_worker(manager):
    owner = OWNER + "1"
    run = manager.submit(owner, "a red cube", steps=4000)
    wait_for(lambda: run.step >= 3)
    assert run.worker is not None and run.worker.pid != os.getpid()  # trained in another process
    manager.pause(owner)
    assert run.status == "paused"

    def settled():  # the step under way ends and its progress arrives; then nothing moves
        before = run.step
        time.sleep(0.5)
        return run.step == before

    wait_for(settled, timeout=30)
    frozen = run.step
    time.sleep(1.0)
    assert run.step == frozen
    manager.resume(owner)
    wait_for(lambda: run.step > frozen)
    manager.stop(owner)
    finished(run)
    assert run.status == "stopped" and run.step < 4000
    meta, _ = read_checkpoint(run.checkpoint)  # a stopped run keeps its checkpoint, at the step it stopped
    assert int(meta["step"]) == run.step and meta["prompt"] == "a red cube"
    assert (run.folder / "mesh.glb").stat().st_size > 0 and run.exports["glb"] == run.folder / "mesh.glb"
    assert json.loads((run.folder / "run.json").read_text())["status"] == "stopped"  # run.json follows the run


def test_refine_mid_run_and_after_it_finished(manager):
    owner = OWNER + "2"
    run = manager.submit(owner, "a red cube", steps=400)
    wait_for(lambda: run.step >= 2)
    manager.pause(owner)  # so the refinement lands mid-run however fast the tiny prior's steps are
    manager.refine(owner, "a blue cube", 6)
    assert run.total_steps == 406 and run.prompts[-1][1] == "a blue cube" and 0 < run.prompts[-1][0] < 400
    manager.stop(owner)
    finished(run)
    stopped_at = run.step
    assert run.status == "stopped" and stopped_at < 406
    meta, _ = read_checkpoint(run.checkpoint)
    assert meta["prompt"] == "a blue cube"  # the worker's trainer took the new prompt
    # a finished run continues from its checkpoint, in a worker, with the new prompt and its extra steps
    manager.refine(owner, "a green cube", 3)
    assert run.status in ("queued", "running") and run.total_steps == 409
    finished(run)
    assert run.status == "done" and run.step == 409, run.message
    meta, _ = read_checkpoint(run.checkpoint)
    assert (int(meta["step"]), meta["prompt"]) == (409, "a green cube")
    assert [p for _, p in run.prompts] == ["a red cube", "a blue cube", "a green cube"] and run.prompts[-1][0] == stopped_at
    # and it exports from its checkpoint (no worker trains it any more)
    written = manager.export(owner, ["ply"])
    assert written["ply"].stat().st_size > 0 and written["ply"].parent.parent == run.folder


def test_rejected_refine_changes_nothing(manager):
    owner = OWNER + "3"
    run = finished(manager.submit(owner, "a red cube", steps=3))
    before = (run.prompt, list(run.prompts), run.total_steps, run.status, run.checkpoint.stat().st_mtime_ns)
    with pytest.raises(RunError, match="extra steps"):
        manager.refine(owner, "a blue cube", 0)
    with pytest.raises(RunError, match="prompt is empty"):
        manager.refine(owner, "  ", 5)
    with pytest.raises(RunError, match="extra steps must be between"):
        manager.refine(owner, "a blue cube", -1)
    assert (run.prompt, list(run.prompts), run.total_steps, run.status, run.checkpoint.stat().st_mtime_ns) == before


def test_a_killed_worker_costs_only_its_run(tmp_path, tiny_prior_dir):
    """kill -9 of the worker mid-run: the run fails with a message and its last checkpoint on disk,
    a new worker takes the dead one's place and the next queued run completes."""
    m = RunManager(tmp_path / "runs", small(tiny_prior_dir), max_concurrent=1, checkpoint_every=5, export_defaults=EXPORTS)
    try:
        assert m.wait_ready() == []
        victim = m.submit(OWNER + "a", "a red cube", steps=5000)
        queued = m.submit(OWNER + "b", "a blue sphere", steps=3)
        assert queued.status == "queued" and m.queue_position(queued) == 1
        wait_for(lambda: victim.checkpoint_step >= 10)
        pid = victim.worker.pid
        os.kill(pid, signal.SIGKILL)
        finished(victim)
        assert victim.status == "failed" and "SIGKILL" in victim.message and "checkpoint" in victim.message
        meta, _ = read_checkpoint(victim.checkpoint)
        assert int(meta["step"]) == victim.checkpoint_step >= 10
        assert json.loads((victim.folder / "run.json").read_text())["status"] == "failed"
        finished(queued)
        assert queued.status == "done" and queued.step == 3 and queued.worker is None
        assert [w.pid for w in m.workers] != [pid] and len(m.workers) == 1
    finally:
        m.shutdown()


def test_stop_ends_a_run_whose_step_does_not_end(tmp_path, tiny_prior_dir):
    """Stop takes effect within the grace even when the worker cannot finish its step (here it is
    frozen with SIGSTOP, as a step that never ends): the worker is killed, the run ends stopped with
    its last checkpoint, its mesh is written from that checkpoint, and a new worker takes over."""
    m = RunManager(tmp_path / "runs", small(tiny_prior_dir), max_concurrent=1, checkpoint_every=5, export_defaults=EXPORTS, stop_grace=0.5)
    try:
        assert m.wait_ready() == []
        run = m.submit(OWNER + "s", "a red cube", steps=5000)
        wait_for(lambda: run.checkpoint_step >= 5)
        pid = run.worker.pid
        os.kill(pid, signal.SIGSTOP)
        m.stop(OWNER + "s")
        finished(run, timeout=30)
        assert run.status == "stopped" and "mid-step" in run.message and f"step {run.checkpoint_step}" in run.message
        meta, _ = read_checkpoint(run.checkpoint)
        assert int(meta["step"]) == run.checkpoint_step == run.step
        wait_for(lambda: "glb" in run.exports, timeout=120)
        assert run.exports["glb"].stat().st_size > 0 and run.exports["glb"].parent == run.folder
        assert len(m.workers) == 1 and m.workers[0].pid != pid
    finally:
        m.shutdown()


def test_an_abandoned_run_is_stopped_and_keeps_its_checkpoint(tmp_path, tiny_prior_dir):
    m = RunManager(tmp_path / "runs", small(tiny_prior_dir), max_concurrent=1, checkpoint_every=5, export_defaults=EXPORTS, abandon_after=2.0)
    try:
        assert m.wait_ready() == []
        keeper, leaver = OWNER + "k", OWNER + "l"
        run = m.submit(leaver, "a red cube", steps=5000)
        waiting = m.submit(keeper, "a blue cube", steps=3)
        wait_for(lambda: run.step >= 1)
        deadline = time.time() + 120
        while run.status != "stopped":  # the keeper's page polls, the leaver's is gone
            m.touch(keeper)
            assert time.time() < deadline
            time.sleep(0.2)
        assert "closed" in run.message and run.checkpoint.is_file()
        meta, _ = read_checkpoint(run.checkpoint)
        assert int(meta["step"]) == run.step > 0
        deadline = time.time() + 180
        while waiting.status != "done":
            m.touch(keeper)
            assert time.time() < deadline
            time.sleep(0.2)
    finally:
        m.shutdown()


def test_the_queue_is_bounded_and_a_visitor_has_one_run(tmp_path, tiny_prior_dir):
    m = RunManager(tmp_path / "runs", small(tiny_prior_dir), max_concurrent=0, max_queue=3)  # nothing trains: a queue that stays full
    try:
        for i in range(3):
            m.submit(f"browser:{'v' * 20}{i}", "a red cube", steps=10)
        with pytest.raises(RunError, match="still queued"):
            m.submit("browser:" + "v" * 20 + "0", "a red cube", steps=10)
        for i in range(3, 20):
            with pytest.raises(RunError, match=r"busy: 3 runs are waiting\. Please try again in about \d+ minute"):
                m.submit(f"browser:{'v' * 20}{i}", "a red cube", steps=10)
        assert len(m.queue) == 3 and len(list((tmp_path / "runs").iterdir())) == 3  # a refused visitor leaves nothing on disk
    finally:
        m.shutdown()


def test_a_public_server_offers_only_the_operators_models(tmp_path, tiny_prior_dir):
    """A visitor cannot make the server open a folder or fetch a hub model: anything but the
    operator's model is refused before any worker sees it, with the same message whether the path
    exists or not."""
    m = RunManager(tmp_path / "runs", small(tiny_prior_dir), max_concurrent=0, public=True, models={"embedded": str(tiny_prior_dir)},
                   max_steps=500)
    try:
        assert m.offered_guidances() == ("embedded",) and m.defaults()["guidance_model"] == ""
        messages = set()
        for model in (str(tiny_prior_dir), "/etc", "/no/such/folder", "stabilityai/stable-diffusion-2-1"):
            if model == str(tiny_prior_dir):
                continue
            with pytest.raises(RunError) as exc:
                m.submit(OWNER + "p", "a red cube", guidance_model=model)
            messages.add(str(exc.value))
        assert len(messages) == 1 and "operator" in messages.pop()
        with pytest.raises(RunError, match="offers these priors: embedded"):
            m.submit(OWNER + "p", "a red cube", guidance_name="stable-diffusion")
        with pytest.raises(RunError, match="steps must be between 1 and 500"):
            m.submit(OWNER + "p", "a red cube", steps=501)
        assert m.runs == {} and not any((tmp_path / "runs").iterdir())
        run = m.submit(OWNER + "p", "a red cube", guidance_model=str(tiny_prior_dir))  # the operator's own model, named
        assert run.cfg.guidance.model == str(tiny_prior_dir)
        run2 = m.submit(OWNER + "q", "a red cube")  # or none: the operator's
        assert run2.cfg.guidance.model == str(tiny_prior_dir)
    finally:
        m.shutdown()


def test_gallery_names_no_run_and_lists_only_what_can_be_fetched(tmp_path):
    m = RunManager(tmp_path / "runs", max_concurrent=0, max_runs_kept=5)
    try:
        import imageio.v3 as iio
        import numpy as np

        for i, status in enumerate(("done", "stopped", "failed", "running")):
            folder = tmp_path / "runs" / f"20261207-00000{i}-abcdef"
            folder.mkdir(parents=True)
            (folder / "run.json").write_text(json.dumps({"id": folder.name, "prompt": f"a <b>cube</b> {i}", "status": status, "step": 5,
                                                         "created": i}))
            iio.imwrite(folder / "preview.png", np.full((8, 8, 3), 40 * i, np.uint8))
        listed = m.finished()
        assert [e["prompt"] for e in listed] == ["a <b>cube</b> 1", "a <b>cube</b> 0"]  # finished ones, newest first; the text as typed
        for e in listed:
            assert set(e) == {"preview", "prompt", "status", "step", "created"}
            assert "20261207" not in e["preview"] and Path(e["preview"]).parent == m.gallery_dir  # no run id, no run folder
        again = m.finished()
        assert [e["preview"] for e in again] == [e["preview"] for e in listed]  # listed again: the same files, not rewritten
        (tmp_path / "runs" / "20261207-000001-abcdef" / "preview.png").unlink()
        assert [e["prompt"] for e in m.finished()] == ["a <b>cube</b> 0"]  # a run that lost its preview is skipped
    finally:
        m.shutdown()


def test_a_restarted_server_ends_the_runs_it_left_active(tmp_path):
    """Killed mid-run, a server left run.json saying 'running': the next one says what happened,
    keeps the checkpoint, and lists the run."""
    folder = tmp_path / "runs" / "20261207-000000-abcdef"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"id": folder.name, "prompt": "a red cube", "status": "running", "step": 37,
                                                 "checkpoint_step": 30, "created": 1}))
    (folder / "checkpoint.safetensors").write_bytes(b"x")
    (folder / "preview.png").write_bytes(b"x")
    m = RunManager(tmp_path / "runs", max_concurrent=0)
    try:
        meta = json.loads((folder / "run.json").read_text())
        assert meta["status"] == "stopped" and meta["step"] == 30 and "server stopped" in meta["message"] and "step 30" in meta["message"]
        assert [e["prompt"] for e in m.finished()] == ["a red cube"]
    finally:
        m.shutdown()


def test_a_finished_run_writes_a_turntable_of_at_least_256_px(tmp_path, fast_config):
    """What a run writes without being asked (its GLB and turntable, the page's result): locally the
    turntable is read back from the file, at least 256 pixels a side; a public server writes 128 px
    (a quarter of the worker's time, which the queue's next visitor waits for)."""
    import dataclasses

    import imageio.v3 as iio

    from dreamfusion.runs import export_scene
    from dreamfusion.trainer import Trainer

    assert RunManager(tmp_path / "public", max_concurrent=0, public=True).finish_export().video_size == 128  # a public server's: cheaper
    opts = dataclasses.replace(RunManager(tmp_path / "runs", max_concurrent=0).finish_export(), mesh_resolution=24)
    trainer = Trainer(dataclasses.replace(fast_config, steps=1), "a red cube")
    trainer.run()
    written = export_scene(trainer, tmp_path, opts)
    frames = iio.imread(written["video"])
    assert frames.shape[0] >= 24 and min(frames.shape[1:3]) >= 256
    assert frames.std() > 0  # an object, not a blank
