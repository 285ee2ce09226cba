"""benchmarks/gpu_check.py: without a GPU it says so and checks nothing; ``--cpu`` runs the same
checks on the CPU (here with tiny Stable Diffusion and IF pipelines and a few steps), prints one
table, and exits non-zero when a check fails; bad arguments are one error line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny_if import build_tiny_if
from tiny_sd import build_tiny_sd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402

DRY = ["--cpu", "--no-tests", "--steps", "2", "--prior-steps", "2", "--sizes", "16", "--iters", "1", "--mesh-resolution", "32"]


def table_rows(out: str) -> dict[str, list[str]]:
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_without_a_gpu_it_says_so_and_checks_nothing(capsys):
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert "no GPU" in out and "nothing was checked" in out and "--cpu" in out and "|" not in out


def test_a_dry_run_on_the_cpu_prints_one_table_of_passes(tmp_path, capsys):
    sd, if_ = build_tiny_sd(tmp_path / "sd"), build_tiny_if(tmp_path / "if")
    assert gpu_check.main([*DRY, "--sd", str(sd), "--if", str(if_)]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert list(rows) == ["sampler", "embedded", "speed 16 px", "stable-diffusion", "deepfloyd-if"]
    assert all(cells[1] == "cpu" and cells[2] == "PASS" for cells in rows.values()), rows
    assert "2 steps" in rows["embedded"][3] and "first step's loss 0.0e+00 from the CPU's" in rows["embedded"][3]
    assert "it/s" in rows["speed 16 px"][3] and "float32" in rows["deepfloyd-if"][3]
    assert "all checks passed (a dry run on the CPU)" in out


def test_a_failed_check_is_a_row_and_a_non_zero_exit(tmp_path, capsys):
    empty = tmp_path / "not-if"
    empty.mkdir()
    assert gpu_check.main([*DRY, "--steps", "1", "--if", str(empty)]) == 1
    out = capsys.readouterr().out
    row = table_rows(out)["deepfloyd-if"]
    assert row[2] == "FAIL" and "GuidanceError" in row[3] and "no usable" in row[3]
    assert "FAILED: deepfloyd-if" in out


@pytest.mark.parametrize("args, message", [(["--sd", "/no/such/folder"], "--sd /no/such/folder: no such folder"),
                                           (["--sizes", "4"], "--sizes must be between 8 and 512"),
                                           (["--steps", "0"], "--steps must be positive")])
def test_bad_arguments_are_one_error_line(args, message, capsys):
    assert gpu_check.main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_the_sampler_comparison_tells_samplers_apart():
    """The check can fail: the dense sampler (every step in the box, occupied or not) is not the
    occupancy grid's."""
    scene = gpu_check.ball_scene("cpu", "torch", res=24)
    same = gpu_check.compare_samplers(scene, "torch", "torch", size=24)
    other = gpu_check.compare_samplers(scene, "torch", "dense", size=24)
    assert same["ok"] and same["max_image_diff"] == 0.0
    assert not other["ok"] and other["samples"][1] > 2 * other["samples"][0]
