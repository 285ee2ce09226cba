"""benchmarks/export_ab.py: export variants of trained runs, parsed as ``dreamfusion export`` parses
them, end to end on a real run folder made by ``dreamfusion generate`` on the tiny prior."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import trimesh

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import export_ab  # noqa: E402

from dreamfusion.cli import main as dreamfusion  # noqa: E402

needs_benchmark = pytest.mark.skipif(not export_ab.DEFAULT_PROMPTS.is_file(), reason=f"{export_ab.DEFAULT_PROMPTS} not present")


def test_variants_are_parsed_as_the_export_command_parses_them():
    variant = export_ab.parse_variant("lean=--export.refine-steps 3 --export.faces 20000 --export.formats glb ply --export.texture")
    assert variant.name == "lean" and variant.options == "--export.refine-steps 3 --export.faces 20000 --export.formats glb ply --export.texture"
    assert (variant.export.refine_steps, variant.export.faces, variant.export.formats, variant.export.texture) == (3, 20000, ("glb", "ply"), True)
    assert variant.export.video == "none"  # the base: no turntable unless asked for
    assert export_ab.parse_variant("base=").export == export_ab.ExportOptions(video="none")
    assert export_ab.parse_variant("turn=--export.video gif").export.video == "gif"
    for text, message in (("x=--export.refine-step 3", r"Unrecognized options: --export.refine-step, 3 \(did you mean --export.refine-steps\?\)"),
                          ("x=--export.faces many", "--export.faces"),
                          ("x=--export.faces 50", "faces .* must be between 100"),
                          ("x=--export.level 'odd", "No closing quotation"),
                          ("no options", "NAME=OPTIONS"), ("a/b=", "NAME=OPTIONS")):
        with pytest.raises(ValueError, match=message) as caught:
            export_ab.parse_variant(text)
        assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="given twice"):
        export_ab.parse_variants(["a=", "a=--export.faces 200"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_prior_dir) -> Path:
    """A folder of two runs: one real run of a benchmark prompt, made by ``dreamfusion generate``
    on the tiny prior (a density throughout: four steps of a random prior leave a soft blob, which a
    24^3 signed distance would outline coarsely), and a copy of it whose config.json names a prompt
    of no benchmark."""
    folder = tmp_path_factory.mktemp("export_ab") / "runs"
    run = folder / "01-a-red-cube"
    assert dreamfusion(["generate", "a red cube", "--out", str(run), "--steps", "4", "--resolution", "32", "--quiet",
                        "--advanced.field.resolution", "24", "--advanced.views", "1", "--model", str(tiny_prior_dir),
                        "--export.mesh-resolution", "32", "--export.formats", "ply", "--export.video", "none",
                        "--advanced.field.sdf-fraction", "0"]) == 0
    other = folder / "02-a-purple-blob"
    shutil.copytree(run, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "prompt": "a purple blob"}))
    return folder


@needs_benchmark
def test_export_ab_end_to_end(runs, tmp_path, capsys):
    out = tmp_path / "ab"
    argv = [str(runs), "--out", str(out), "--views", "4", "--view-size", "32", "--threads", "1",
            "--variant", "base=--export.mesh-resolution 32",
            "--variant", "lean=--export.mesh-resolution 32 --export.refine-steps 2 --export.faces 300 --export.colour-smoothing 2 "
                         "--export.texture --export.texture-size 64"]
    assert export_ab.main(argv) == 0
    captured = capsys.readouterr()
    assert "02-a-purple-blob: 'a purple blob' is not a benchmark prompt; left out" in captured.err

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["run"], r["status"]) for r in rows] == [("base", "01-a-red-cube", "ok"), ("lean", "01-a-red-cube", "ok")]
    assert rows[0]["prompt"] == "a red cube" and rows[0]["index"] == "1" and rows[0]["options"] == "--export.mesh-resolution 32"
    for row in rows:
        folder = out / row["variant"] / "01-a-red-cube"
        assert sorted(p.name for p in folder.iterdir()) == sorted(["mesh.glb", "mesh.obj", "mesh.ply"]
                                                                 + (["mesh_textured.glb"] if row["variant"] == "lean" else []))
        assert int(row["glb_bytes"]) == (folder / "mesh.glb").stat().st_size
        assert int(row["faces"]) == len(trimesh.load(folder / "mesh.ply", process=False).faces)  # the scores are the written mesh's
        assert float(row["export_seconds"]) > 0
        for key in ("iou", "colour_error", "surface_distance", "normal_error_median", "normal_error_p90", "colour_noise"):
            assert float(row[key]) >= 0, key
        assert row["hit"] in ("True", "False")
        # the tiny run is a soft blob: its mesh at the silhouette level outlines what its renders show
        assert 0.8 < float(row["render_silhouette_iou"]) <= 1.0
        assert 0.0 <= float(row["render_colour_diff"]) < 0.2
    assert int(rows[1]["faces"]) <= 300 < int(rows[0]["faces"])
    assert rows[1]["textured_glb_bytes"] and not rows[0]["textured_glb_bytes"]
    assert "decimated to" in rows[1]["notes"]

    summary = (out / "summary.md").read_text()
    for text in ("| variant | runs | failed | IoU | R-Precision |", "silhouette IoU | render colour diff", "| base | 1 | 0 |", "| lean | 1 | 0 |",
                 "`--export.mesh-resolution 32 --export.refine-steps 2"):
        assert text in summary, text
    assert "| base | 1 | 0 |" in captured.out and "| lean | 1 | 0 |" in captured.out

    # the exports are kept: a second run into the same folder asks for --overwrite, in one line
    assert export_ab.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "--overwrite" in err[0]


@needs_benchmark
def test_export_ab_refuses_bad_input_in_one_line(runs, tmp_path, capsys):
    for argv, message in (([str(runs), "--out", str(tmp_path / "x"), "--variant", "a=--export.refine-step 3"], "did you mean --export.refine-steps"),
                          ([str(runs), "--out", str(tmp_path / "x")], "at least one --variant"),
                          ([str(tmp_path), "--out", str(tmp_path / "x"), "--variant", "a="], "no run folder"),
                          ([str(runs), "--out", str(tmp_path / "x"), "--variant", "a=", "--only", "07-nothing"], "no run folder")):
        assert export_ab.main(argv) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "x").exists()


@needs_benchmark
def test_a_run_without_config_json_is_found_by_its_checkpoints_prompt(runs, tmp_path):
    """A quality benchmark's run folders (``--turntables``) hold a checkpoint and no config.json."""
    shutil.copytree(runs / "01-a-red-cube", tmp_path / "05-from-the-checkpoint")
    (tmp_path / "05-from-the-checkpoint" / "config.json").unlink()
    items = export_ab.parse_benchmark(export_ab.DEFAULT_PROMPTS)
    [run] = export_ab.find_runs(tmp_path, items)
    assert (run.name, run.index, run.item.prompt) == ("05-from-the-checkpoint", 1, "a red cube")
