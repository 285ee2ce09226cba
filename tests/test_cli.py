"""The ``dreamfusion`` command line, in-process through ``dreamfusion.cli.main`` (plus one run of
the installed entry point): generate end to end on the tiny prior, export and render of its
checkpoint, the output-folder rules, and bad input ending in one ``error:`` line and exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dreamfusion.cli import main

# small everything: a run of a few iterations on the tiny prior, a coarse mesh, a short gif
FAST = ["--resolution", "32", "--quiet", "--advanced.field.resolution", "24", "--advanced.views", "1",
        "--export.mesh-resolution", "32", "--export.video", "gif", "--export.video-frames", "4", "--export.video-size", "32"]
CHEAP_EXPORT = ["--export.formats", "ply", "--export.video", "none"]


def error_line(capsys) -> str:
    """stderr must hold exactly one line, the error."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def generate_args(out: Path, prior: Path, *extra: str, prompt: str = "a red cube", steps: int = 4) -> list[str]:
    return ["generate", prompt, "--out", str(out), "--steps", str(steps), *FAST, "--model", str(prior), *extra]


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_prior_dir) -> Path:
    """One full generate run shared by the tests that read its output."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(generate_args(out, tiny_prior_dir)) == 0
    return out


# ---------------------------------------------------------------------------- generate


def test_generate_writes_a_complete_run(generated):
    import imageio.v3 as iio
    import trimesh

    names = {p.name for p in generated.iterdir()}
    assert {"mesh.glb", "mesh.obj", "mesh.ply", "turntable.gif", "checkpoint.safetensors", "config.json", "log.jsonl"} <= names
    assert not list(generated.parent.glob("*.partial")), "the staging folder was left behind"

    for fmt in ("glb", "obj", "ply"):
        mesh = trimesh.load(generated / f"mesh.{fmt}", force="mesh")
        assert len(mesh.vertices) > 0 and len(mesh.faces) > 0, fmt

    frames = iio.imread(generated / "turntable.gif", index=None)
    assert frames.shape[0] == 4 and frames.shape[1:3] == (32, 32)

    config = json.loads((generated / "config.json").read_text())
    assert config["prompt"] == "a red cube"
    assert config["train"]["steps"] == 4 and config["train"]["render_size"] == 32
    assert config["train"]["field"]["resolution"] == 24

    rows = [json.loads(line) for line in (generated / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    assert [r["step"] for r in rows[:4]] == [1, 2, 3, 4]
    assert all(r["prompt"] == "a red cube" and isinstance(r["loss"], float) for r in rows[:4])
    assert rows[4]["summary"]["iterations"] == 4 and rows[4]["summary"]["seconds"] > 0

    from dreamfusion.trainer import Trainer

    meta, _ = Trainer.read_checkpoint(generated / "checkpoint.safetensors")
    assert meta["prompt"] == "a red cube" and meta["step"] == "4"


def test_existing_folder_needs_overwrite(tmp_path, tiny_prior_dir, capsys):
    out = tmp_path / "run"
    out.mkdir()
    keep = out / "keep.txt"
    keep.write_text("an earlier run")

    assert main(generate_args(out, tiny_prior_dir, *CHEAP_EXPORT, steps=1)) == 2
    assert "already exists" in error_line(capsys)
    assert keep.read_text() == "an earlier run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    # --overwrite, but the run fails: the old folder is still untouched
    bad = ["--guidance", "stable-diffusion", "--model", str(tmp_path / "nonexistent"), "--overwrite"]
    assert main(["generate", "a red cube", "--out", str(out), "--steps", "1", *FAST, *CHEAP_EXPORT, *bad]) == 2
    error_line(capsys)
    assert keep.read_text() == "an earlier run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    assert main(generate_args(out, tiny_prior_dir, *CHEAP_EXPORT, "--overwrite", steps=1)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors", "config.json", "log.jsonl", "mesh.ply", "preview.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_existing_empty_folder_is_fine(tmp_path, tiny_prior_dir):
    out = tmp_path / "run"
    out.mkdir()
    assert main(generate_args(out, tiny_prior_dir, *CHEAP_EXPORT, steps=1)) == 0
    assert (out / "checkpoint.safetensors").is_file()


def test_out_is_a_file(tmp_path, tiny_prior_dir, capsys):
    out = tmp_path / "run"
    out.write_text("not a folder")
    assert main(generate_args(out, tiny_prior_dir, *CHEAP_EXPORT, steps=1)) == 2
    assert "not a folder" in error_line(capsys)
    assert out.read_text() == "not a folder"


def test_long_prompt_notes_truncation(tmp_path, tiny_prior_dir, capsys):
    prompt = " ".join(["a", "big", "shiny", "red", "cube", "on", "a", "small", "wooden", "table"] * 6)
    assert len(prompt.split()) == 60
    out = tmp_path / "run"
    assert main(generate_args(out, tiny_prior_dir, *CHEAP_EXPORT, prompt=prompt, steps=1)) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:") and "over the limit" in line]
    assert len(notes) == 1 and "only '" in notes[0]
    assert "error" not in err
    assert json.loads((out / "config.json").read_text())["prompt"] == prompt


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, expected",
    [
        (["generate", ""], "prompt is empty"),
        (["generate", "   \t "], "prompt is empty"),
        (["generate", "a red cube", "--steps", "0"], "steps must be positive, got 0"),
        (["generate", "a red cube", "--steps", "-5"], "steps must be positive, got -5"),
        (["generate", "a red cube", "--resolution", "100000"], "render size must be between"),
        (["generate", "a red cube", "--guidance", "nope"], "unknown guidance 'nope'"),
        (["generate", "a red cube", "--export.video", "avi"], "unknown video format 'avi'"),
        (["generate", "a red cube", "--export.formats", "stl"], "unknown mesh format 'stl'"),
    ],
    ids=["empty-prompt", "blank-prompt", "steps-0", "steps-negative", "resolution-huge", "guidance-unknown", "video-format",
         "mesh-format"],
)
def test_generate_rejects_bad_input(tmp_path, tiny_prior_dir, capsys, args, expected):
    out = tmp_path / "run"
    assert main([*args, "--out", str(out), "--model", str(tiny_prior_dir), "--quiet"]) == 2
    line = error_line(capsys)
    assert expected in line
    if "guidance" in expected:
        assert "embedded" in line and "stable-diffusion" in line
    assert list(tmp_path.iterdir()) == [], "nothing may be written on bad input"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_generate_cuda_without_gpu(tmp_path, tiny_prior_dir, capsys):
    assert main(["generate", "a red cube", "--out", str(tmp_path / "run"), "--device", "cuda", "--model", str(tiny_prior_dir)]) == 2
    line = error_line(capsys)
    assert "cuda" in line and "GPU" in line
    assert list(tmp_path.iterdir()) == []


def test_generate_stable_diffusion_missing_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    assert main(["generate", "a red cube", "--out", str(out), "--guidance", "stable-diffusion", "--model", "/nonexistent", "--quiet",
                 "--steps", "1"]) == 2
    line = error_line(capsys)
    assert "/nonexistent" in line and "--model" in line
    assert list(tmp_path.iterdir()) == []


def test_export_and_render_of_a_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    assert main(["export", str(missing), "--out", str(tmp_path / "exp")]) == 2
    assert "not found" in error_line(capsys)
    assert main(["render", str(missing), "--out", str(tmp_path / "renders" / "x.png")]) == 2
    assert "not found" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"\x10\x00\x00\x00\x00\x00\x00\x00{}"], ids=["empty", "garbage", "short-header"])
def test_export_and_render_of_a_corrupt_checkpoint(tmp_path, capsys, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    assert main(["export", str(bad), "--out", str(tmp_path / "exp")]) == 2
    assert str(bad) in error_line(capsys)
    assert main(["render", str(bad), "--out", str(tmp_path / "renders" / "x.png")]) == 2
    assert str(bad) in error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.safetensors"]


def test_render_rejects_bad_input(generated, tmp_path, capsys):
    ckpt = str(generated / "checkpoint.safetensors")
    cases = [
        (["--out", str(tmp_path / "renders" / "x.jpg")], "must end in .png, .mp4 or .gif"),
        (["--out", str(tmp_path / "renders" / "x.png"), "--mode", "shiny"], "unknown shading mode 'shiny'"),
        (["--out", str(tmp_path / "renders" / "x.png"), "--size", "4"], "size must be between"),
    ]
    for extra, expected in cases:
        assert main(["render", ckpt, *extra]) == 2
        assert expected in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_entry_point_error_is_one_line(tmp_path):
    exe = shutil.which("dreamfusion", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert exe, "the dreamfusion entry point is not installed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.run([exe, "generate", "   ", "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: the prompt is empty: describe an object, e.g. 'a red cube'"], proc.stderr
    assert proc.stdout == ""
    assert not out.exists()


# ---------------------------------------------------------------------------- export / render


def test_export_a_checkpoint(generated, tmp_path, capsys):
    import imageio.v3 as iio
    import trimesh

    out = tmp_path / "exp"
    args = ["export", str(generated / "checkpoint.safetensors"), "--out", str(out), "--export.mesh-resolution", "32",
            "--export.video", "gif", "--export.video-frames", "2", "--export.video-size", "16"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["mesh.glb", "mesh.obj", "mesh.ply", "turntable.gif"]
    assert not list(tmp_path.glob("*.partial"))
    original = trimesh.load(generated / "mesh.ply", force="mesh")
    again = trimesh.load(out / "mesh.ply", force="mesh")
    assert len(again.faces) > 0
    assert len(again.vertices) == len(original.vertices)  # same scene, same settings: same mesh
    assert iio.imread(out / "turntable.gif", index=None).shape[:3] == (2, 16, 16)

    capsys.readouterr()
    assert main(args) == 2  # a second time: the folder now exists
    assert "already exists" in error_line(capsys)
    assert main([*args, "--overwrite"]) == 0


def test_render_a_checkpoint(generated, tmp_path, capsys):
    import imageio.v3 as iio
    import numpy as np

    ckpt = str(generated / "checkpoint.safetensors")
    normals = tmp_path / "renders" / "normals.png"
    assert main(["render", ckpt, "--out", str(normals), "--mode", "normals", "--size", "32"]) == 0
    img = iio.imread(normals)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8

    side = tmp_path / "side.png"
    front = tmp_path / "front.png"
    assert main(["render", ckpt, "--out", str(side), "--mode", "textureless", "--light-azimuth", "90", "--size", "32"]) == 0
    assert main(["render", ckpt, "--out", str(front), "--mode", "textureless", "--size", "32"]) == 0
    side_img, front_img = iio.imread(side), iio.imread(front)
    assert side_img.shape == front_img.shape == (32, 32, 3)
    assert not np.array_equal(side_img, front_img), "moving the light should change a textureless render"
    assert not list(tmp_path.rglob("*.tmp*"))

    capsys.readouterr()
    assert main(["render", ckpt, "--out", str(side), "--mode", "textureless", "--size", "32"]) == 2
    assert "already exists" in error_line(capsys)
    assert np.array_equal(iio.imread(side), side_img)

    gif = tmp_path / "spin.gif"
    assert main(["render", ckpt, "--out", str(gif), "--frames", "3", "--size", "16"]) == 0
    assert iio.imread(gif, index=None).shape[:3] == (3, 16, 16)


# ----------------------------------------------------------------------------- consolidation (issue 11)


def test_advanced_settings_are_kept_unless_a_top_level_option_is_given(tiny_prior_dir):
    """``--advanced.steps 7`` must not be replaced by the top-level default (it was, silently)."""
    import tyro

    from dreamfusion.cli import Generate, train_config

    def parse(*argv):
        return train_config(tyro.cli(Generate, args=list(argv)))

    cfg = parse("a cube", "--advanced.steps", "7", "--advanced.seed", "3", "--advanced.render-size", "48",
                "--advanced.guidance.guidance-scale", "4.5", "--advanced.guidance.model", "/some/prior")
    assert (cfg.steps, cfg.seed, cfg.render_size, cfg.guidance.guidance_scale, cfg.guidance.model) == (7, 3, 48, 4.5, "/some/prior")
    cfg = parse("a cube", "--advanced.steps", "7", "--steps", "9", "--cfg", "2", "--model", "/other")
    assert (cfg.steps, cfg.guidance.guidance_scale, cfg.guidance.model) == (9, 2.0, "/other")
    assert parse("a cube").steps == 1200 and parse("a cube").guidance.guidance_scale is None  # the prior's own default, later


def test_guidance_defaults_come_from_one_registry():
    """The app, the command line and the benchmark all read each prior's default weight from
    the registry (they disagreed: 10 in the app, 100 on the command line)."""
    from dreamfusion.config import GUIDANCES, GuidanceConfig, resolve_guidance

    assert resolve_guidance(GuidanceConfig(name="stable-diffusion")).guidance_scale == GUIDANCES["stable-diffusion"].guidance_scale == 100.0
    assert resolve_guidance(GuidanceConfig(name="embedded")).guidance_scale == GUIDANCES["embedded"].guidance_scale
    assert resolve_guidance(GuidanceConfig(name="embedded", guidance_scale=3.0)).guidance_scale == 3.0
    from app.jobs import RunManager

    assert RunManager.guidance_choices() == ("embedded", "stable-diffusion", "deepfloyd-if")  # the reference is a measuring instrument, not offered


def test_help_is_fast_because_nothing_heavy_is_imported():
    """``dreamfusion --help`` parses before torch, diffusers or gradio are imported."""
    code = ("import sys, time; t = time.perf_counter(); from dreamfusion import cli; "
            "heavy = [m for m in ('torch', 'diffusers', 'gradio', 'transformers', 'nerfacc') if m in sys.modules]; "
            "assert not heavy, heavy; "
            "import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try: cli.main(['generate', '--help'])\n"
            "    except SystemExit: pass\n"
            "assert '--advanced.field.resolution' in out.getvalue()\n"
            "heavy = [m for m in ('torch', 'diffusers', 'gradio') if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_export_and_render_need_no_prior(generated, tmp_path, capsys, monkeypatch):
    """A checkpoint's scene is re-exported with no prior loadable at all (a Stable Diffusion run
    offline, say): loading a scene must not load a prior."""
    import dreamfusion.guidance as guidance

    def no_prior(*args, **kwargs):
        raise AssertionError("export/render loaded a prior")

    monkeypatch.setattr(guidance, "load_guidance", no_prior)
    monkeypatch.setattr("dreamfusion.trainer.load_guidance", no_prior)
    out = tmp_path / "re"
    assert main(["export", str(generated / "checkpoint.safetensors"), "--out", str(out), *CHEAP_EXPORT]) == 0
    assert (out / "mesh.ply").stat().st_size > 0
    png = tmp_path / "view.png"
    assert main(["render", str(generated / "checkpoint.safetensors"), "--out", str(png), "--size", "32"]) == 0
    assert png.stat().st_size > 0


def test_finished_files_get_ordinary_permissions(generated):
    """Files are staged with mkstemp (0600); finished ones must read like any file the user makes."""
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("mesh.glb", "mesh.obj", "mesh.ply", "turntable.gif", "checkpoint.safetensors"):
        mode = (generated / name).stat().st_mode & 0o777
        assert mode == 0o666 & ~mask, (name, oct(mode))
