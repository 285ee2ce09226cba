"""``dreamfusion batch`` (dreamfusion/batch/): the prompt list, folder names, the manifest that tells
one batch from another, the cluster checks and the summary as pure functions; then whole batches
on a real local Ray (one session, 2 CPUs, shared by the module) with the shipped prior and a few
iterations: three prompts, failures that do not stop the rest, a rerun that skips what is done,
an interruption, a killed worker, and the bad input that must end in one ``error:`` line."""

from __future__ import annotations

import csv
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dreamfusion import files
from dreamfusion.batch import BatchError, manifest, summary, tasks
from dreamfusion.batch import prompts as prompt_list
from dreamfusion.batch import run as batch_run
from dreamfusion.batch.prompts import BatchPrompt
from dreamfusion.batch.tasks import ClusterOptions
from dreamfusion.cli import Generate, main, train_config

# a few iterations at small sizes; the fixed surface level finds a surface in a scene this young
FAST = ["--steps", "4", "--resolution", "32", "--quiet", "--advanced.field.resolution", "24", "--advanced.views", "1",
        "--export.mesh-resolution", "32", "--export.level", "fixed", "--export.video", "gif", "--export.video-frames", "2",
        "--export.video-size", "16"]
#: what ``dreamfusion generate`` writes with FAST's export options
RUN_FILES = {"checkpoint.safetensors", "config.json", "log.jsonl", "mesh.glb", "mesh.obj", "mesh.ply", "preview.png", "turntable.gif"}


def error_line(capsys) -> str:
    """stderr must hold exactly one line, the error."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def settings_of(args: list[str]) -> tuple:
    """(TrainConfig, ExportOptions) of command-line options, as ``dreamfusion batch`` builds them."""
    import tyro

    run = tyro.cli(Generate, args=args)
    return train_config(run), run.export


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- the prompt list


def test_text_file_one_prompt_a_line(tmp_path):
    path = write(tmp_path / "p.txt", "# my assets\n\na red cube\n   a  Blue   sphere \n# done\na red cube\n\t\n")
    prompts = prompt_list.read_prompts(path)
    assert [(p.line, p.prompt, p.seed, p.folder, p.error) for p in prompts] == [
        (3, "a red cube", None, "a-red-cube", None),
        (4, "a Blue sphere", None, "a-blue-sphere", None),
        (6, "a red cube", None, "a-red-cube-2", None),  # a repeat gets its own folder
    ]


def test_csv_and_tsv_with_seeds(tmp_path):
    path = write(tmp_path / "p.csv", 'prompt,notes,seed\na red cube,first,3\n"a mug, white",,\n# skipped,,\n,empty,4\na tree,,x\n'
                                     "a red cube,again,7\na red cube,same seed,3\n")
    got = [(p.line, p.prompt, p.seed, p.folder, p.error) for p in prompt_list.read_prompts(path)]
    assert got == [
        (2, "a red cube", 3, "a-red-cube-seed-3", None),
        (3, "a mug, white", None, "a-mug-white", None),
        (5, "", 4, "", "line 5: the prompt is empty"),
        (6, "a tree", None, "", "line 6: seed 'x' is not a whole number"),
        (7, "a red cube", 7, "a-red-cube-seed-7", None),
        (8, "a red cube", 3, "a-red-cube-seed-3-2", None),
    ]
    # no header: the second column is the seed; TSV the same with tabs
    plain = write(tmp_path / "q.tsv", "a red cube\t5\na tree\n\n")
    assert [(p.prompt, p.seed) for p in prompt_list.read_prompts(plain)] == [("a red cube", 5), ("a tree", None)]
    assert "seed must be a whole number from 0 to 2^63 - 1, got -1" in prompt_list.read_prompts(write(tmp_path / "r.csv", "a cube,-1\n"))[0].error


def test_missing_empty_and_unreadable_prompt_files(tmp_path):
    with pytest.raises(BatchError, match="prompt file not found"):
        prompt_list.read_prompts(tmp_path / "missing.txt")
    for name, text in (("empty.txt", ""), ("comments.txt", "# nothing\n\n   \n"), ("header.csv", "prompt,seed\n")):
        with pytest.raises(BatchError, match="holds no prompts"):
            prompt_list.read_prompts(write(tmp_path / name, text))
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00a red cube")
    with pytest.raises(BatchError, match="not a UTF-8 text file"):
        prompt_list.read_prompts(tmp_path / "binary.txt")


def test_slug():
    assert files.slug("A Red   Cube!") == "a-red-cube"
    assert files.slug("¿¡!") == "prompt"
    assert len(files.slug("word " * 40)) <= files.SLUG_LENGTH and not files.slug("word " * 40).endswith("-")


# ----------------------------------------------------------------------------- the manifest


SETTINGS = manifest.batch_settings({"steps": 4, "seed": 0, "device": "cpu", "field": {"resolution": 24}}, {"video": "gif"})


def manifest_of(prompts: list[BatchPrompt], settings: dict = SETTINGS) -> dict:
    prompts = prompt_list.assign_folders(prompts)
    return manifest.batch_manifest(prompts, [None if p.error else (p.seed or 0) for p in prompts], settings)


def make_batch_folder(out: Path, m: dict, finished: list[str]) -> None:
    manifest.prepare_batch_folder(out, m, "new")
    for folder in finished:
        (out / folder).mkdir()


def test_seed_and_device_are_not_settings():
    a = manifest.batch_settings({"steps": 4, "seed": 0, "device": "cpu"}, {})
    assert a == manifest.batch_settings({"steps": 4, "seed": 9, "device": "cuda"}, {})
    assert a != manifest.batch_settings({"steps": 5, "seed": 0, "device": "cpu"}, {})


def test_output_folder_new_resume_and_another_batch(tmp_path):
    cube, sphere, mug = BatchPrompt(1, "a red cube"), BatchPrompt(2, "a blue sphere"), BatchPrompt(3, "a white mug")
    first = manifest_of([cube, sphere, BatchPrompt(3, "", error="line 3: the prompt is empty")])
    out = tmp_path / "out"
    assert manifest.check_output(out, first, overwrite=False) == "new"
    out.mkdir()
    assert manifest.check_output(out, first, overwrite=False) == "new"  # empty
    make_batch_folder(out, first, ["a-red-cube"])

    assert manifest.check_output(out, manifest_of([cube, sphere]), overwrite=False) == "resume"
    # the empty line fixed and a prompt added: the finished run still belongs to the list
    assert manifest.check_output(out, manifest_of([cube, sphere, mug]), overwrite=False) == "resume"
    # a list without the finished prompt, or with another seed for it: another batch
    for other in ([sphere, mug], [BatchPrompt(1, "a red cube", 5), sphere]):
        with pytest.raises(BatchError, match="holds another batch: its run a-red-cube/"):
            manifest.check_output(out, manifest_of(other), overwrite=False)
        assert manifest.check_output(out, manifest_of(other), overwrite=True) == "replace"
    # other settings: the message says which
    other = manifest.batch_settings({"steps": 6, "seed": 0, "device": "cpu", "field": {"resolution": 24}}, {"video": "none"})
    with pytest.raises(BatchError, match=r"other settings \(export.video 'gif' -> 'none', steps 4 -> 6\)"):
        manifest.check_output(out, manifest_of([cube], other), overwrite=False)

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(BatchError, match="holds no batch"):
        manifest.check_output(stranger, first, overwrite=False)
    assert manifest.check_output(stranger, first, overwrite=True) == "replace"
    manifest.prepare_batch_folder(stranger, first, "replace")
    assert sorted(p.name for p in stranger.iterdir()) == ["batch.json"]
    with pytest.raises(BatchError, match="not a folder"):
        manifest.check_output(stranger / "batch.json", first, overwrite=True)


def test_prepare_removes_stale_staging_and_records_the_invocation(tmp_path):
    out = tmp_path / "out"
    m = manifest_of([BatchPrompt(1, "a red cube")])
    (out / "a-red-cube.partial").mkdir(parents=True)
    manifest.prepare_batch_folder(out, m, "new")
    assert not (out / "a-red-cube.partial").exists()
    assert manifest.sees_batch_folder(out, m["run_id"]) and not manifest.sees_batch_folder(out, "another") and not manifest.sees_batch_folder(
        tmp_path / "elsewhere", m["run_id"])
    saved = json.loads((out / "batch.json").read_text())
    assert saved["prompts"] == [{"line": 1, "prompt": "a red cube", "seed": 0, "folder": "a-red-cube"}]
    assert len(saved["prompts_sha256"]) == 64 and saved["settings"] == SETTINGS


# ----------------------------------------------------------------------------- the cluster


def test_resources_the_cluster_does_not_have():
    cpu_node, gpu_node = (2.0, 0.0), (8.0, 1.0)
    tasks.check_resources([cpu_node], 1, 0)
    tasks.check_resources([cpu_node], 2, 0)
    tasks.check_resources([cpu_node, gpu_node], 4, 0.5)
    with pytest.raises(BatchError, match=r"the cluster has no GPU but each run asks for 1 \(--cpus-per-run 1 --gpus-per-run 1\)"):
        tasks.check_resources([cpu_node], 1, 1)
    with pytest.raises(BatchError, match="no node of the cluster can give one run 3 CPUs and no GPU .* the largest has 2 CPUs and no GPU"):
        tasks.check_resources([cpu_node, cpu_node], 3, 0)  # 4 CPUs in all, but a run needs them on one node
    with pytest.raises(BatchError, match="can give one run 1 CPU and 2 GPUs"):
        tasks.check_resources([gpu_node], 1, 2)
    with pytest.raises(BatchError, match="no live node"):
        tasks.check_resources([], 1, 0)
    assert tasks.node_resources([{"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}, {"Alive": False, "Resources": {"CPU": 64.0}}]) == [
        (4.0, 1.0)]


def test_capacity_and_local_cpus():
    assert tasks.capacity([(2.0, 0.0)], 1, 0) == 2
    assert tasks.capacity([(8.0, 2.0), (4.0, 0.0)], 2, 1) == 2  # GPUs bound the first node, the second has none
    assert tasks.capacity([(8.0, 2.0)], 2, 0.5) == 4
    assert tasks.capacity([(1.0, 0.0)], 2, 0) == 1  # never zero: check_resources refuses what cannot run
    assert tasks.local_cpus(ClusterOptions(), cores=2) == 2
    assert tasks.local_cpus(ClusterOptions(max_parallel=4), cores=2) == 4  # asked for 4 at once: they share the cores
    assert tasks.local_cpus(ClusterOptions(cpus_per_run=3, max_parallel=2), cores=2) == 2  # a run bigger than the machine is refused


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_addresses():
    assert tasks.parse_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert tasks.parse_address("ray://head.example:10001") == ("head.example", 10001)
    for bad in ("nonsense", "host:", ":6379", "ray://host", "host:99999"):
        with pytest.raises(BatchError, match="cannot read the Ray address"):
            tasks.parse_address(bad)
    port = free_port()
    with pytest.raises(BatchError, match=rf"cannot reach a Ray cluster at ray://127.0.0.1:{port} \(.*\); start one with `ray start --head`"):
        tasks.probe_address(f"ray://127.0.0.1:{port}", timeout=2.0)
    for bad in (ClusterOptions(cpus_per_run=0), ClusterOptions(gpus_per_run=-1), ClusterOptions(max_parallel=-2)):
        with pytest.raises(BatchError):
            tasks.validate_cluster(bad)


# ----------------------------------------------------------------------------- the summary


def test_summary_files_and_contact_sheet(tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    (out / "a-red-cube").mkdir(parents=True)
    Image.new("RGB", (128, 128), (200, 30, 30)).save(out / "a-red-cube" / "preview.png")
    cube, bad = BatchPrompt(1, "a red cube", folder="a-red-cube"), BatchPrompt(2, "", error="line 2: the prompt is empty")
    rows = [summary.summary_row(cube, 0, "ok", 12.5, 100), summary.summary_row(bad, None, "failed", error=bad.error),
            summary.summary_row(BatchPrompt(3, "a tree", folder="a-tree"), 0, "cancelled", error="interrupted")]
    csv_path, json_path = summary.write_summary(out, rows, {"out": str(out)})
    assert [r["status"] for r in read_csv(csv_path)] == ["ok", "failed", "cancelled"]
    assert list(read_csv(csv_path)[0]) == list(summary.SUMMARY_FIELDS)
    assert read_csv(csv_path)[0]["folder"] == "a-red-cube" and read_csv(csv_path)[2]["folder"] == ""  # folders only of finished runs
    data = json.loads(json_path.read_text())
    assert data["counts"] == {"ok": 1, "skipped": 0, "failed": 1, "cancelled": 1} and data["rows"][1]["error"] == "line 2: the prompt is empty"

    sheet = np.asarray(Image.open(summary.contact_sheet(out, rows)))
    assert sheet.shape[1] == 6 + 3 * (128 + 6)
    tile = sheet[6:6 + 128, 6:6 + 128]
    assert np.abs(tile[64, 64].astype(int) - [200, 30, 30]).max() <= 2  # the finished run's preview
    assert (sheet[6 + 64, 6 + 134 + 100] == 205).all()  # a grey panel for the failed prompt
    assert not list(out.glob(".*"))  # written atomically: no temporary files left


def test_exit_status_counts_failures():
    ok = {"status": "ok"}
    assert summary.BatchResult([ok, ok], False, 1.0).exit_status == 0
    assert summary.BatchResult([ok, {"status": "failed"}, {"status": "failed"}, {"status": "failed"}], False, 1.0).exit_status == 3
    assert summary.BatchResult([{"status": "failed"}] * 300, False, 1.0).exit_status == 100
    assert summary.BatchResult([ok, {"status": "cancelled"}], True, 1.0).exit_status == 130


# ----------------------------------------------------------------------------- without Ray


def test_without_ray_one_line_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: import ray raises ImportError
    prompts = write(tmp_path / "p.txt", "a red cube\n")
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert "needs Ray" in line and 'pip install -e ".[cluster]"' in line
    assert not (tmp_path / "out").exists()


def test_a_worker_without_the_batch_folder_sends_the_files_back(tmp_path):
    """On a cluster without a shared filesystem a worker runs into a folder of its own and the
    driver writes the files it sends: the same files as a run straight into the folder."""
    from dreamfusion.config import ExportOptions

    cfg, _ = settings_of(FAST)
    run = batch_run.PromptRun("a red cube", cfg, ExportOptions(formats=("ply",), video="none", mesh_resolution=32, level="fixed"),
                              tmp_path / "b" / "a-red-cube", threads=1)
    result = batch_run.generate_task(run, str(tmp_path / "b"), "not-this-invocation")
    assert result["timing"]["iterations"] == 4
    assert set(result["files"]) == {"checkpoint.safetensors", "config.json", "log.jsonl", "mesh.ply", "preview.png"}
    assert not (tmp_path / "b").exists()  # the worker did not write where it could not see
    batch_run.write_sent_files(run.out, result["files"])
    assert manifest.run_complete(run.out) and manifest.run_timing(run.out)["iterations"] == 4
    assert not list((tmp_path / "b").glob("*.partial"))


# ----------------------------------------------------------------------------- on a real local Ray


def ray_processes() -> set[int]:
    """Processes of Ray's (core services and workers) on this machine."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"ray/core/src/ray" in cmd or b"ray::" in cmd or b"default_worker.py" in cmd:
                pids.add(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray with 2 CPUs for the module (it takes seconds to start); gone at the end."""
    ray = pytest.importorskip("ray")
    before = ray_processes()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()
    import time

    for _ in range(50):  # shutdown signals the processes; give them a moment to exit
        left = ray_processes() - before
        if not left:
            break
        time.sleep(0.2)
    assert not left, f"Ray left processes behind: {left}"


def batch_args(prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["batch", str(prompts), "--out", str(out), *FAST, *extra]


@pytest.fixture(scope="module")
def three(ray_session, tmp_path_factory):
    """One batch of three prompts (one repeated, so two share a slug), shared by the tests that read it."""
    root = tmp_path_factory.mktemp("batch")
    prompts = write(root / "prompts.txt", "# three objects\na red cube\n\na blue sphere\na red cube\n")
    out = root / "out"
    assert main(batch_args(prompts, out)) == 0
    return prompts, out


def test_three_prompts_make_three_complete_folders_and_a_summary(three):
    from PIL import Image

    _, out = three
    folders = ["a-red-cube", "a-blue-sphere", "a-red-cube-2"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*folders, "batch.json", "summary.csv", "summary.json", "contact_sheet.png"])
    for name in folders:  # the files of ``dreamfusion generate``, complete
        assert {p.name for p in (out / name).iterdir()} == RUN_FILES, name
        assert manifest.run_complete(out / name)
    configs = [json.loads((out / name / "config.json").read_text()) for name in folders]
    assert [c["prompt"] for c in configs] == ["a red cube", "a blue sphere", "a red cube"]
    assert all(c["train"]["steps"] == 4 and c["train"]["field"]["resolution"] == 24 and c["export"]["level"] == "fixed" for c in configs)

    rows = read_csv(out / "summary.csv")
    assert [(r["line"], r["prompt"], r["seed"], r["status"], r["iterations"], r["folder"], r["error"]) for r in rows] == [
        ("2", "a red cube", "0", "ok", "4", "a-red-cube", ""), ("4", "a blue sphere", "0", "ok", "4", "a-blue-sphere", ""),
        ("5", "a red cube", "0", "ok", "4", "a-red-cube-2", "")]
    assert all(float(r["seconds"]) > 0 for r in rows)
    data = json.loads((out / "summary.json").read_text())
    assert data["counts"]["ok"] == 3 and not data["interrupted"]
    # the same prompt and seed: the same object, whichever worker ran it
    assert (out / "a-red-cube" / "mesh.ply").read_bytes() == (out / "a-red-cube-2" / "mesh.ply").read_bytes()

    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB")).astype(float)
    assert sheet.shape[:2] == (6 + 128 + 28 + 6, 6 + 3 * (128 + 6))
    for k in range(3):  # each tile is a render of the object (a grey blob after 4 steps on white), not a blank panel
        tile = sheet[6:6 + 128, 6 + k * 134:6 + k * 134 + 128]
        assert tile.std() > 2 and tile.min() < 200


def test_a_rerun_skips_finished_prompts(three, capsys):
    prompts, out = three
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.parent != out or p.is_dir()}
    capsys.readouterr()
    assert main(batch_args(prompts, out)) == 0
    assert "3 finished before" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing was run or rewritten
    assert [r["status"] for r in read_csv(out / "summary.csv")] == ["skipped"] * 3
    assert [r["iterations"] for r in read_csv(out / "summary.csv")] == ["4"] * 3


def test_another_batch_in_the_folder_is_refused(three, tmp_path, capsys):
    prompts, out = three
    before = sorted(p.name for p in out.iterdir())
    assert main(["batch", str(prompts), "--out", str(out), *FAST[:-2], "--export.video-size", "32"]) == 2
    assert "holds a batch made with other settings (export.video_size 16 -> 32)" in error_line(capsys)
    other = write(tmp_path / "other.txt", "a white mug\n")
    assert main(batch_args(other, out)) == 2
    assert "holds another batch: its run a-red-cube/ ('a red cube', seed 0) is not in this prompt list" in error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == before


def test_failed_prompts_are_recorded_and_the_rest_runs(ray_session, tmp_path, capsys):
    """An empty prompt and a bad seed fail before they run; a prompt the run itself rejects (the
    reference guidance knows no dragon) fails in its worker; the exit status counts all three."""
    prompts = write(tmp_path / "p.csv", "prompt,seed\na red cube,1\n,2\na dragon,3\na blue sphere,one\na white mug,\n")
    out = tmp_path / "out"
    assert main(batch_args(prompts, out, "--guidance", "reference")) == 3
    captured = capsys.readouterr()
    rows = read_csv(out / "summary.csv")
    assert [(r["prompt"], r["seed"], r["status"]) for r in rows] == [
        ("a red cube", "1", "ok"), ("", "", "failed"), ("a dragon", "3", "failed"), ("a blue sphere", "", "failed"), ("a white mug", "0", "ok")]
    errors = [r["error"] for r in rows]
    assert errors[1] == "line 3: the prompt is empty" and errors[3] == "line 5: seed 'one' is not a whole number"
    assert errors[2].startswith("GuidanceError: the reference guidance renders the world's own objects, and 'a dragon' names none")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["a-red-cube-seed-1", "a-white-mug"]
    assert "3 failed" in captured.out and "failed: line 4 'a dragon': GuidanceError" in captured.out


def test_interruption_keeps_finished_folders_and_a_rerun_does_the_rest(ray_session, tmp_path):
    """Ctrl-C (here: KeyboardInterrupt once the first run is done) cancels the running and waiting
    runs; every folder left is a finished run, and the same command then runs only the rest."""

    prompts = prompt_list.read_prompts(write(tmp_path / "p.txt", "a red cube\na blue sphere\na white mug\na green cube\n"))
    cfg, export = settings_of(FAST)
    out = tmp_path / "out"

    def interrupt(row: dict) -> None:
        raise KeyboardInterrupt

    result = batch_run.run_batch(prompts, out, cfg, export, ClusterOptions(max_parallel=2), quiet=True, on_done=interrupt, log=lambda s: None)
    assert result.interrupted and result.exit_status == 130
    statuses = [r["status"] for r in result.rows]
    assert statuses[0] in ("ok", "cancelled") and statuses.count("ok") >= 1 and statuses[2:] == ["cancelled", "cancelled"]
    finished = {r["folder"] for r in result.rows if r["status"] == "ok"}
    assert {p.name for p in out.iterdir() if p.is_dir()} == finished  # no staging folder, no half-written run
    assert all(manifest.run_complete(out / f) for f in finished)
    assert [r["status"] for r in read_csv(out / "summary.csv")] == statuses

    again = batch_run.run_batch(prompts, out, cfg, export, ClusterOptions(max_parallel=2), quiet=True, log=lambda s: None)
    assert not again.interrupted and again.exit_status == 0
    assert [r["status"] for r in again.rows] == ["skipped" if s == "ok" else "ok" for s in statuses]
    assert all(manifest.run_complete(out / p.folder) for p in prompts)


def test_a_second_interrupt_while_winding_down_keeps_the_finished_result(ray_session):
    """Ctrl-C from on_done, and again when the task that finished meanwhile is reported: the batch
    still ends with both results kept and the third cancelled (a second KeyboardInterrupt escaped)."""
    def work(i: int) -> int:
        if i == 1:
            time.sleep(0.5)
        elif i == 2:
            time.sleep(60)
        return i * 10

    calls = []

    def interrupt(outcome) -> None:
        calls.append(outcome.index)
        if len(calls) == 1:
            time.sleep(3)  # task 1 finishes meanwhile
        raise KeyboardInterrupt

    outcomes = tasks.run_tasks(work, [(0,), (1,), (2,)], ClusterOptions(max_parallel=3), on_done=interrupt)
    assert [o.status for o in outcomes] == ["ok", "ok", "cancelled"] and [outcomes[0].value, outcomes[1].value] == [0, 10]
    assert calls == [0, 1]


def test_a_killed_worker_fails_its_task_only(ray_session):
    def work(i: int) -> int:
        if i == 1:
            os._exit(3)  # the worker dies mid-task, as under the OOM killer
        return i * 10

    seen = []
    outcomes = tasks.run_tasks(work, [(0,), (1,), (2,)], ClusterOptions(max_parallel=2), on_done=lambda o: seen.append(o.index))
    assert [o.status for o in outcomes] == ["ok", "failed", "ok"] and [outcomes[0].value, outcomes[2].value] == [0, 20]
    assert "died" in outcomes[1].error or "Crashed" in outcomes[1].error, outcomes[1].error
    assert sorted(seen) == [0, 1, 2]


def test_bad_input_ends_with_one_error_line(ray_session, tmp_path, capsys):
    prompts = write(tmp_path / "p.txt", "a red cube\n")
    out = tmp_path / "out"
    cases = [
        (["batch", str(tmp_path / "missing.txt"), "--out", str(out)], "prompt file not found"),
        (["batch", str(write(tmp_path / "empty.txt", "# nothing yet\n")), "--out", str(out)], "holds no prompts"),
        (batch_args(prompts, out, "--gpus-per-run", "1"), "the cluster has no GPU but each run asks for 1"),
        (batch_args(prompts, out, "--cpus-per-run", "3"), "no node of the cluster can give one run 3 CPUs"),
        (batch_args(prompts, out, "--address", f"127.0.0.1:{free_port()}"), "cannot reach a Ray cluster at 127.0.0.1:"),
        (batch_args(prompts, out, "--address", "not-an-address"), "cannot read the Ray address"),
        (batch_args(prompts, out, "--device", "cuda"), "needs --gpus-per-run"),
        (batch_args(prompts, out, "--steps", "0"), "steps must be positive"),
        (batch_args(prompts, out, "--max-parallel", "-1"), "--max-parallel must not be negative"),
    ]
    for args, expected in cases:
        assert main(args) == 2, args
        assert expected in error_line(capsys), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "p.txt"]  # nothing written


def test_benchmark_scores_through_the_batch_engine_match_scoring_each_folder(ray_session, tmp_path, capsys):
    """``benchmarks/quality.py --jobs 2`` runs its prompts as tasks of the batch engine (here on the
    module's Ray); the scores it reports are those of each run folder's mesh, scored directly."""
    import trimesh

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import quality
    import scoring

    prompts = write(tmp_path / "bench.txt", "a white mug\tmug\twhite\na red cube\tcube\tred\n")
    out = tmp_path / "results"
    assert quality.main(["--prompts", str(prompts), "--steps", "3", "--grid-resolution", "24", "--render-size", "32", "--mesh-resolution", "32",
                         "--sheet-size", "48", "--export-level", "fixed", "--out", str(out), "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert [r["prompt"] for r in data["rows"]] == ["a white mug", "a red cube"] and data["meta"]["jobs"] == 2
    for row, item in zip(data["rows"], quality.parse_benchmark(prompts), strict=True):
        assert row["status"] == "ok", row.get("error")
        assert f"[{row['index']}] {row['prompt']}: IoU {row['iou']:.3f}" in printed
        direct = scoring.score_mesh(trimesh.load(out / row["mesh"], process=False, force="mesh"), item)
        assert {k: row[k] for k in direct} == pytest.approx(direct)
    assert {r["prompt"]: r["status"] for r in read_csv(out / "results.csv")} == {"a white mug": "ok", "a red cube": "ok"}
