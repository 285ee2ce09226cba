"""The app's run manager without a browser: one control path (the Trainer's own), refinements that
change nothing when rejected or arrive as a run ends, one shared prior per process, finished runs
that keep their scene and not their prior, and a gallery that lists only what can be fetched."""

from __future__ import annotations

import gc
import time
import weakref
from pathlib import Path

import pytest

from app.jobs import RunError, RunManager
from dreamfusion.guidance import release_shared, shared_priors

OWNER = "browser:" + "o" * 20


def small(prior) -> dict:
    return {"render_size": 32, "views": 1, "preview_every": 0, "field": {"resolution": 24}, "guidance": {"model": str(prior)}}


def wait_for(run, statuses=("done", "stopped", "failed"), timeout=120.0):
    deadline = time.time() + timeout
    while run.status not in statuses:
        assert time.time() < deadline, f"run stuck in {run.status}"
        time.sleep(0.02)


@pytest.fixture
def manager(tmp_path, tiny_prior_dir):
    release_shared()
    m = RunManager(tmp_path / "runs", small(tiny_prior_dir), export_defaults={"mesh_resolution": 24, "video_frames": 4, "video_size": 32})
    yield m
    m.shutdown()


def test_pause_resume_stop_act_on_the_trainer(manager):
    run = manager.submit(OWNER, "a red cube", steps=400)
    deadline = time.time() + 60
    while run.trainer is None or run.trainer.step_count < 2:
        assert time.time() < deadline
        time.sleep(0.01)
    manager.pause(OWNER)
    assert run.status == "paused" and run.trainer.paused
    time.sleep(0.2)
    frozen = run.trainer.step_count
    time.sleep(0.3)
    assert run.trainer.step_count <= frozen + 1  # at most the step that was under way
    manager.resume(OWNER)
    assert not run.trainer.paused
    manager.stop(OWNER)
    wait_for(run)
    assert run.status == "stopped" and run.trainer.stopped and run.trainer.step_count < 400


def test_rejected_refine_changes_nothing(manager):
    run = manager.submit(OWNER, "a red cube", steps=3)
    wait_for(run)
    before = (run.prompt, list(run.prompts), run.trainer.prompt, run.trainer.total_steps)
    with pytest.raises(RunError, match="extra steps"):
        manager.refine(OWNER, "a blue cube", 0)
    assert (run.prompt, list(run.prompts), run.trainer.prompt, run.trainer.total_steps) == before


def test_refine_that_arrives_as_the_run_ends_is_optimised(manager, monkeypatch):
    """The refinement lands after the trainer's loop returned but before the worker marks the run
    done: its extra steps must run (they were dropped, and the run marked done)."""
    from dreamfusion.trainer import Trainer

    original = Trainer.run
    fired = []

    def run_then_refine(self, steps=None):
        original(self, steps)
        if not fired:
            fired.append(True)
            manager.refine(OWNER, "a blue cube", 4)

    monkeypatch.setattr(Trainer, "run", run_then_refine)
    run = manager.submit(OWNER, "a red cube", steps=3)
    wait_for(run)
    assert fired and run.status == "done"
    assert run.trainer.step_count == 7 and run.trainer.prompt == "a blue cube"
    assert run.prompts == [(0, "a red cube"), (3, "a blue cube")]


def test_runs_share_one_prior_and_a_finished_run_keeps_only_its_scene(manager):
    first = manager.submit(OWNER, "a red cube", steps=2)
    wait_for(first)
    second = manager.submit("browser:" + "p" * 20, "a blue sphere", steps=2)
    deadline = time.time() + 60
    while second.trainer is None or second.trainer.guidance is None:
        assert time.time() < deadline and second.status != "failed"
        time.sleep(0.01)
    assert len(shared_priors()) == 1
    prior = shared_priors()[0]
    assert second.trainer.guidance.unet is prior.unet  # the same weights, not a second copy
    run_copy = weakref.ref(second.trainer.guidance)
    wait_for(second)
    gc.collect()
    # the finished run's handle on the prior is gone (found through the garbage collector) ...
    assert run_copy() is None
    assert not any(r is second.trainer for r in gc.get_referrers(prior))
    # ... while the process's prior stays loaded for the next visitor
    assert shared_priors() == [prior] and prior.unet is not None
    # nor does it keep what only training needs: gradients and Adam's moments (its checkpoint has them)
    assert len(second.trainer.optimizer.state) == 0
    assert all(p.grad is None for g in second.trainer.optimizer.param_groups for p in g["params"])
    # a finished run still refines (taking the shared prior again) and exports
    manager.refine("browser:" + "p" * 20, "a green sphere", 2)
    wait_for(second)
    assert second.trainer.step_count == 4 and second.status == "done"
    written = manager.export("browser:" + "p" * 20, ["ply"])
    assert written["ply"].stat().st_size > 0
    # and its default files were written when it finished, without an Export
    assert (second.folder / "mesh.glb").stat().st_size > 0 and (second.folder / "turntable.mp4").stat().st_size > 0


def test_gallery_lists_only_what_can_be_fetched(tmp_path, tiny_prior_dir):
    m = RunManager(tmp_path / "runs", small(tiny_prior_dir), max_runs_kept=2,
                   export_defaults={"mesh_resolution": 24, "video": "none", "video_frames": 4, "video_size": 32})
    try:
        runs = []
        for i in range(4):
            r = m.submit(f"browser:{'q' * 19}{i}", f"a red cube {i}", steps=2)
            wait_for(r)
            runs.append(r)
        listed = m.finished()
        assert 1 <= len(listed) <= 2
        import imageio.v3 as iio

        for entry in listed:
            # the gallery's own copy of the preview: the same image, a file that is never rewritten
            thumb = Path(entry["preview"])
            assert (iio.imread(thumb) == iio.imread(tmp_path / "runs" / entry["id"] / "preview.png")).all()
        stamps = {e["preview"]: Path(e["preview"]).stat().st_mtime_ns for e in listed}
        again = m.finished()
        assert {e["preview"]: Path(e["preview"]).stat().st_mtime_ns for e in again} == stamps  # listed again: not rewritten
        listed_ids = {e["id"] for e in listed}
        assert listed_ids <= {p.name for p in (tmp_path / "runs").iterdir()}
        # a page that listed a run can still fetch its thumbnail after the run is pruned
        for i in range(2):
            wait_for(m.submit(f"browser:{'r' * 19}{i}", f"a red cube {i}", steps=2))
        assert not listed_ids & {p.name for p in (tmp_path / "runs").iterdir()}
        assert all(Path(p).stat().st_size > 0 for p in stamps)
        listed = m.finished()
        # a run folder that loses its preview (pruned mid-listing, say) is skipped, not an error
        for e in listed:
            (tmp_path / "runs" / e["id"] / "preview.png").unlink()
        assert m.finished() == []
    finally:
        m.shutdown()
