"""The quality benchmark (benchmarks/quality.py) and CLIP R-Precision (benchmarks/clip_rprecision.py):
the prompt list, scoring, the targets' logic, a tiny end-to-end run and CLIP retrieval on a tiny
random CLIP."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import clip_rprecision  # noqa: E402
import quality  # noqa: E402
import scoring  # noqa: E402
import tables  # noqa: E402
from tiny_sd import write_vocab  # noqa: E402  (tests/ is on sys.path)

from dreamfusion.metrics import true_mesh  # noqa: E402
from dreamfusion.prior.world import ASYMMETRIC_NOUNS, is_held_out  # noqa: E402

BENCHMARK = quality.DEFAULT_PROMPTS
needs_benchmark = pytest.mark.skipif(not BENCHMARK.is_file(), reason=f"{BENCHMARK} not present")


# ----------------------------------------------------------------------------- prompt list


@needs_benchmark
def test_parse_benchmark_file():
    items = quality.parse_benchmark(BENCHMARK)
    assert len(items) == 15
    assert {it.prompt for it in items if it.held_out} == {"a green cube", "a blue torus", "a red chair"}
    assert {it.noun for it in items if it.colour is None} == {"snowman", "hamburger", "tree"}
    for it in items:  # the file's flag agrees with the world's held-out rule
        assert it.held_out == (it.colour is not None and is_held_out(it.colour, it.noun))
    assert {it.noun for it in items if it.asymmetric} == set(ASYMMETRIC_NOUNS)
    assert items[0] == quality.BenchmarkPrompt("a red cube", "cube", "red", False)


def test_parse_benchmark_rejects_bad_lines(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# comment\n\na red cube\tcube\tred\na tree\ttree\t-\na green cube\tcube\tgreen\theld-out\n")
    items = quality.parse_benchmark(good)
    assert [(i.noun, i.colour, i.held_out) for i in items] == [("cube", "red", False), ("tree", None, False), ("cube", "green", True)]
    for bad, message in (("a blob\tblob\tred\n", "unknown noun"), ("a cube\tcube\tmauve\n", "unknown colour"),
                         ("a cube\tcube\tred\tnew\n", "unknown flag"), ("a cube cube red\n", "expected")):
        path = tmp_path / "bad.txt"
        path.write_text(bad)
        with pytest.raises(ValueError, match=message):
            quality.parse_benchmark(path)
    with pytest.raises(FileNotFoundError):
        quality.parse_benchmark(tmp_path / "missing.txt")


def test_select_subsets(tmp_path):
    items = [quality.BenchmarkPrompt(p, n, c, False) for p, n, c in (("a red cube", "cube", "red"), ("a white mug", "mug", "white"),
                                                                      ("a tree", "tree", None))]
    assert [i for i, _ in quality.select(items)] == [1, 2, 3]
    assert [i for i, _ in quality.select(items, limit=2)] == [1, 2]
    assert [i for i, _ in quality.select(items, only="3,mug")] == [2, 3]
    assert [i for i, _ in quality.select(items, only="a red cube")] == [1]
    with pytest.raises(ValueError, match="matches no prompt"):
        quality.select(items, only="dragon")


# ----------------------------------------------------------------------------- scoring


def test_score_true_mesh_hits_and_wrong_mesh_misses():
    cube = quality.BenchmarkPrompt("a red cube", "cube", "red", False)
    snowman = quality.BenchmarkPrompt("a snowman", "snowman", None, False)
    for item in (cube, snowman):
        s = scoring.score_mesh(true_mesh(scoring.true_object(item), 64), item)
        assert s["iou"] > 0.9 and s["iou_scaled"] > 0.9 and s["hit"] and s["best_noun"] == item.noun
        assert s["colour_error"] < 0.02
        assert s["best_other_iou"] < s["iou"] and 0 < s["sphere_iou"] < 1
    assert scoring.score_mesh(true_mesh(scoring.true_object(snowman), 64), snowman)["colour_basis"] == "parts"

    # a blue sphere scored as "a red cube": a miss, and the colour is wrong
    sphere = true_mesh(scoring.true_object(quality.BenchmarkPrompt("a blue sphere", "sphere", "blue", False)), 64)
    s = scoring.score_mesh(sphere, cube)
    assert not s["hit"] and s["best_noun"] == "sphere" and s["colour_basis"] == "named"
    assert s["iou"] < 0.8 and s["colour_error"] > 0.3
    # a half-size cube: centred IoU punishes the size, scaled IoU forgives it
    small = true_mesh(scoring.true_object(cube), 64)
    small.apply_scale(0.5)
    s = scoring.score_mesh(small, cube)
    assert s["iou"] < 0.2 and s["iou_scaled"] > 0.9
    # a right cube facing 30 degrees off: a miss by the SPEC's IoU, the facing diagnostic says why
    turned = true_mesh(scoring.true_object(cube), 64)
    turned.apply_transform(trimesh.transformations.rotation_matrix(np.deg2rad(30.0), [0, 0, 1]))
    s = scoring.score_mesh(turned, cube)
    assert s["iou"] < 0.75 and s["facing_yaw"] == 30.0 and s["facing_iou"] > 0.9
    assert f"| HIT | {s['facing_iou']:.3f} (+30) | " in tables.markdown_table([{**_row(1), **s}])


def test_score_mesh_reports_how_clean_an_asset_is():
    cube = quality.BenchmarkPrompt("a red cube", "cube", "red", False)
    truth = true_mesh(scoring.true_object(cube), 64)
    s = scoring.score_mesh(truth, cube)
    assert s["surface_distance"] < 2e-3 and s["normal_error_median"] < 1.0 and s["colour_noise"] < 1e-9
    assert s["faces"] == len(truth.faces) and s["normal_error_p90"] >= s["normal_error_median"]
    # the same cube 0.02 larger all round and with speckled colours
    rough = truth.copy()
    rough.apply_scale(0.72 / 0.70)
    rng = np.random.default_rng(0)
    rgb = np.clip(rough.visual.vertex_colors[:, :3] / 255.0 + rng.normal(0, 0.03, (len(rough.vertices), 3)), 0, 1)
    rough.visual.vertex_colors = np.concatenate([np.round(rgb * 255), np.full((len(rgb), 1), 255)], axis=1).astype(np.uint8)
    s = scoring.score_mesh(rough, cube)
    assert s["surface_distance"] == pytest.approx(0.01, abs=2e-3) and s["colour_noise"] > 0.02


def _row(index, prompt="a red cube", noun="cube", iou=0.7, hit=True, colour=0.05, basis="named", held_out=False, seconds=100.0, status="ok"):
    row = {"index": index, "prompt": prompt, "noun": noun, "colour": "red", "held_out": held_out, "asymmetric": noun in ASYMMETRIC_NOUNS,
           "status": status, "colour_basis": basis, "iterations": 1200, "seconds": seconds, "export_seconds": 2.0,
           "total_seconds": seconds + 2.0, "notes": []}
    if status == "ok":
        row.update(iou=iou, iou_scaled=iou + 0.05, colour_error=colour, true_iou=iou, best_other_iou=0.5, best_noun=noun if hit else "sphere",
                   sphere_iou=0.6, hit=hit)
    else:
        row["error"] = "generation failed: RuntimeError: boom"
    return row


def test_summary_and_targets():
    rows = [_row(1), _row(2, "a white mug", "mug", iou=0.8), _row(3, "a green cube", iou=0.6, held_out=True),
            _row(4, "a tree", "tree", colour=0.5, basis="parts")]
    s = scoring.summarize(rows)
    assert s["all"]["n"] == 4 and s["held-out"]["n"] == 1 and s["seen"]["n"] == 3 and s["asymmetric"]["n"] == 1
    assert s["all"]["iou"] == pytest.approx(0.7)
    assert s["all"]["colour_error"] == pytest.approx(0.05)  # the parts-scored tree is not in the colour target
    assert s["all"]["colour_error_parts"] == pytest.approx(0.5)
    assert s["all"]["r_precision"] == 1.0
    targets = scoring.evaluate_targets(rows)
    assert [t["passed"] for t in targets] == [True, True, True, True]

    # one wrong shape, one slow prompt: R-Precision 75% and the time target are missed
    rows[1] = _row(2, "a white mug", "mug", iou=0.8, hit=False, seconds=700.0)
    t = {x["target"]: x for x in scoring.evaluate_targets(rows)}
    assert not t["geometric R-Precision"]["passed"] and t["geometric R-Precision"]["value"] == 0.75
    assert not t["max minutes per prompt"]["passed"] and t["mean IoU"]["passed"]

    # a failed prompt counts as IoU 0, a miss and colour error 1: nothing hides it
    rows = [_row(1, iou=0.9), _row(2, status="error")]
    s = scoring.summarize(rows)["all"]
    assert s["failed"] == 1 and s["iou"] == pytest.approx(0.45) and s["r_precision"] == 0.5 and s["colour_error"] == pytest.approx(0.525)
    assert not any(t["passed"] for t in scoring.evaluate_targets(rows))
    table = tables.markdown_table(rows)
    assert "FAILED: generation failed: RuntimeError: boom" in table
    assert not any(t["passed"] for t in scoring.evaluate_targets([]))


def test_asset_measures_are_averaged_over_meshes_and_shown():
    rows = [_row(1), _row(2), _row(3, status="error")]
    rows[0].update(surface_distance=0.004, normal_error_median=6.0, normal_error_p90=20.0, colour_noise=0.03, faces=30000, mesh_bytes=600000)
    rows[1].update(surface_distance=0.002, normal_error_median=2.0, normal_error_p90=10.0, colour_noise=0.01, faces=10000, mesh_bytes=200000)
    s = scoring.summarize(rows)["all"]  # a failed prompt has no mesh to measure: the means are over the two that do
    assert s["surface_distance"] == pytest.approx(0.003) and s["normal_error_median"] == pytest.approx(4.0)
    assert s["normal_error_p90"] == pytest.approx(15.0) and s["colour_noise"] == pytest.approx(0.02)
    assert s["faces"] == pytest.approx(20000) and s["mesh_bytes"] == pytest.approx(400000)
    table = tables.summary_table(scoring.summarize(rows))
    assert "| surface dist | normal err median | normal err p90 | colour noise | faces | mesh KB |" in table
    assert "| 0.0030 | 4.0 | 15.0 | 0.020 | 20,000 | 400 |" in table
    # rows scored before the measures existed: '-', not a crash
    assert "| - | - | - | - | - | - |" in tables.summary_table(scoring.summarize([_row(1)]))


def _earlier_run(tmp_path):
    """A run folder as quality.py leaves it: two prompts, the first with a mesh (the truth's own)
    and a time, the second failed."""
    prompts = tmp_path / "two.txt"
    prompts.write_text("a red cube\tcube\tred\na white mug\tmug\twhite\n")
    folder = tmp_path / "earlier"
    mesh_folder = folder / "meshes" / "01-a-red-cube"
    mesh_folder.mkdir(parents=True)
    true_mesh(scoring.true_object(quality.BenchmarkPrompt("a red cube", "cube", "red", False)), 48).export(mesh_folder / "mesh.ply")
    rows = [{**_row(1), "seconds": 123.0, "iou": 0.5, "mesh": "meshes/01-a-red-cube/mesh.ply"}, _row(2, "a white mug", "mug", status="error")]
    (folder / "results.json").write_text(json.dumps({"meta": {"steps": 1200}, "rows": rows}))
    return prompts, folder


def test_rescore_scores_an_earlier_runs_meshes_without_training(tmp_path, capsys):
    prompts, folder = _earlier_run(tmp_path)
    assert quality.main(["--prompts", str(prompts), "--rescore", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "re-scored 1 of 2" in out and "| 1 | a red cube |" in out
    data = json.loads((folder / "results.json").read_text())
    cube, mug = data["rows"]
    assert cube["status"] == "ok" and cube["iou"] > 0.9 and cube["seconds"] == 123.0  # fresh scores, the earlier time kept
    assert cube["surface_distance"] < 3e-3 and cube["mesh_bytes"] == (folder / "meshes/01-a-red-cube/mesh.ply").stat().st_size
    assert mug["status"] == "error" and "boom" in mug["error"]  # a failure stays a failure
    assert data["meta"]["steps"] == 1200 and data["meta"]["rescored_from"] == str(folder)
    with open(folder / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["surface_distance"]) == pytest.approx(cube["surface_distance"]) and row["faces"] == str(cube["faces"])
    # into another folder, and only the chosen prompts
    assert quality.main(["--prompts", str(prompts), "--rescore", str(folder), "--only", "1", "--out", str(tmp_path / "again")]) == 0
    assert len(json.loads((tmp_path / "again" / "results.json").read_text())["rows"]) == 1


def test_rescore_refuses_a_folder_without_meshes_or_of_another_list(tmp_path, capsys):
    prompts, folder = _earlier_run(tmp_path)
    assert quality.main(["--prompts", str(prompts), "--rescore", str(tmp_path / "nothing")]) == 2
    assert "holds no meshes" in capsys.readouterr().err
    other = tmp_path / "other.txt"
    other.write_text("a blue sphere\tsphere\tblue\n")
    assert quality.main(["--prompts", str(other), "--rescore", str(folder)]) == 2
    assert "01-a-red-cube is no prompt" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end


def _run(tmp_path, prompts, model, capsys, *extra):
    out = tmp_path / "results"
    rc = quality.main(["--prompts", str(prompts), "--steps", "3", "--model", str(model), "--grid-resolution", "24", "--render-size", "32",
                       "--mesh-resolution", "32", "--sheet-size", "48", "--out", str(out), *extra])
    return rc, out, capsys.readouterr()


def test_end_to_end_tiny(tmp_path, tiny_prior_dir, tiny_clip_dir, capsys):
    from PIL import Image

    prompts = tmp_path / "one.txt"
    prompts.write_text("a white mug\tmug\twhite\na red cube\tcube\tred\n")
    rc, out, cap = _run(tmp_path, prompts, tiny_prior_dir, capsys, "--limit", "1", "--clip", str(tiny_clip_dir), "--clip-views", "2")
    assert rc == 0, cap.err
    assert "| 1 | a white mug |" in cap.out and "targets (SUBSET" in cap.out
    assert cap.out.count("MISSED") + cap.out.count("PASS  ") == 4
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["prompt"] == "a white mug" and rows[0]["status"] == "ok", rows[0].get("error")
    assert rows[0]["iterations"] == "3" and 0 <= float(rows[0]["iou"]) <= 1
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["steps"] == 3 and data["meta"]["subset"] and len(data["targets"]) == 4
    assert data["rows"][0]["best_noun"] and isinstance(data["rows"][0]["hit"], bool)
    assert (out / data["rows"][0]["mesh"]).is_file()
    assert set(data["clip_r_precision"]) == {"lit", "textureless"} and 0 <= data["clip_r_precision"]["lit"] <= 1
    assert 0 <= data["rows"][0]["clip_r_precision"] <= 1 and "CLIP R-Precision among the 2 benchmark captions" in cap.out
    sheet = np.asarray(Image.open(out / "contact_sheet.png"))
    from dreamfusion.contact_sheet import PAD

    assert sheet.shape[1] == PAD + 4 * (48 + PAD) and sheet.shape[0] > 48  # the library's contact sheet: 4 tiles a prompt
    assert sheet.std() > 10  # not blank: truth and result frames are drawn


def test_jobs_run_prompts_in_worker_processes_in_order(tmp_path, tiny_prior_dir, capsys):
    prompts = tmp_path / "two.txt"
    prompts.write_text("a white mug\tmug\twhite\na red cube\tcube\tred\n")
    rc, out, cap = _run(tmp_path, prompts, tiny_prior_dir, capsys, "--jobs", "2")
    assert rc == 0, cap.err
    data = json.loads((out / "results.json").read_text())
    assert [r["prompt"] for r in data["rows"]] == ["a white mug", "a red cube"]
    assert all(r["status"] == "ok" for r in data["rows"]) and data["meta"]["jobs"] == 2 and not data["meta"]["subset"]
    assert cap.out.index("| 1 | a white mug |") < cap.out.index("| 2 | a red cube |")
    assert quality.main(["--prompts", str(prompts), "--jobs", "0"]) == 2


def test_failed_prompt_gets_a_row_and_misses(tmp_path, capsys):
    prompts = tmp_path / "one.txt"
    prompts.write_text("a red cube\tcube\tred\n")
    rc, out, cap = _run(tmp_path, prompts, tmp_path / "no-such-prior", capsys)
    assert rc == 0
    assert "FAILED: generation failed" in cap.out and "PASS  " not in cap.out
    data = json.loads((out / "results.json").read_text())
    assert data["rows"][0]["status"] == "error" and "not found" in data["rows"][0]["error"]
    assert (out / "contact_sheet.png").is_file()


def test_bad_arguments_end_with_one_error(tmp_path, capsys):
    assert quality.main(["--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "error: benchmark prompt list not found" in capsys.readouterr().err
    prompts = tmp_path / "one.txt"
    prompts.write_text("a red cube\tcube\tred\n")
    assert quality.main(["--prompts", str(prompts), "--steps", "0"]) == 2
    assert "steps must be positive" in capsys.readouterr().err
    assert quality.main(["--prompts", str(prompts), "--clip", str(tmp_path / "no-clip")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CLIP model folder" in err


# ----------------------------------------------------------------------------- CLIP R-Precision

CAPTIONS = ["a red cube", "a blue sphere", "a white mug", "a tree"]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny_clip")
    vocab_file, _ = write_vocab(root / "vocab")
    vocab = json.loads(vocab_file.read_text())
    tokenizer = CLIPTokenizer.from_pretrained(str(vocab_file.parent), model_max_length=77)
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"]}
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 77, **special},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32,
                       "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    folder = root / "clip"
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_loads_and_embeds(tiny_clip_dir):
    clip = clip_rprecision.load_clip(tiny_clip_dir)
    assert clip.image_size == 32
    text = clip_rprecision.text_embeddings(clip, CAPTIONS)
    assert text.shape == (4, 16) and torch.allclose(text.norm(dim=-1), torch.ones(4), atol=1e-5)
    images = torch.rand(3, 3, 48, 48)
    assert clip_rprecision.preprocess(clip, images).shape == (3, 3, 32, 32)
    assert clip_rprecision.image_embeddings(clip, images).shape == (3, 16)


def test_clip_r_precision_range_and_rigged(tiny_clip_dir, monkeypatch):
    clip = clip_rprecision.load_clip(tiny_clip_dir)
    views = [torch.rand(2, 3, 40, 40) for _ in CAPTIONS]
    res = clip_rprecision.clip_r_precision(clip, views, list(range(4)), CAPTIONS)
    assert 0.0 <= res["r_precision"] <= 1.0 and res["views"] == 8 and len(res["per_result"]) == 4
    assert res["similarity"][0].shape == (2, 4) and all(c in CAPTIONS for picks in res["retrieved"] for c in picks)

    # rig CLIP: each image embeds exactly as its own caption -> every retrieval is right
    text = clip_rprecision.text_embeddings(clip, CAPTIONS)
    for k, v in enumerate(views):
        v[:, 0, 0, 0] = k  # the image says which caption it is
    monkeypatch.setattr(clip_rprecision, "preprocess", lambda clip, images: images)
    monkeypatch.setattr(clip.model, "get_image_features", lambda pixel_values: text[pixel_values[:, 0, 0, 0].round().long()] * 3.0)
    res = clip_rprecision.clip_r_precision(clip, views, list(range(4)), CAPTIONS)
    assert res["r_precision"] == 1.0 and res["per_result"] == [1.0] * 4
    # the same rigged images scored against shifted truths: all wrong
    assert clip_rprecision.clip_r_precision(clip, views, [1, 2, 3, 0], CAPTIONS)["r_precision"] == 0.0


def test_clip_unavailable_is_one_clear_message(tmp_path):
    with pytest.raises(clip_rprecision.ClipUnavailable, match="not found"):
        clip_rprecision.load_clip(tmp_path / "nothing-here")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(clip_rprecision.ClipUnavailable, match="cannot load a CLIP model"):
        clip_rprecision.load_clip(empty)
    with pytest.raises(ValueError, match="out of range"):
        clip_rprecision.clip_r_precision(None, [torch.rand(1, 3, 8, 8)], [5], CAPTIONS)


def test_clip_cli_scores_the_truth(tmp_path, tiny_clip_dir, capsys):
    prompts = tmp_path / "two.txt"
    prompts.write_text("a red cube\tcube\tred\na tree\ttree\t-\n")
    assert clip_rprecision.main(["--clip", str(tiny_clip_dir), "--prompts", str(prompts), "--views", "2", "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "CLIP R-Precision of the TRUE objects (lit, 2 views each, 2 captions)" in out and "textureless" in out
    assert clip_rprecision.main(["--clip", str(tmp_path / "none"), "--prompts", str(prompts)]) == 2
    assert capsys.readouterr().err.startswith("error: CLIP model folder")


# ----------------------------------------------------------------------------- speed


def test_speed_splits_the_render_into_its_stages(fast_config):
    """Every stage of the renderer is measured, and the stages account for the forward pass."""
    import time

    import speed

    from dreamfusion.trainer import Trainer

    trainer = Trainer(fast_config, "a red cube")
    trainer.run(2)
    parts = speed.render_stage_times(trainer, 32, 3)
    assert set(parts) == set(speed.RENDER_STAGES)
    assert all(parts[k] > 0 for k in ("sampling", "field", "shading", "compositing", "background")), parts
    t0 = time.perf_counter()
    for _ in range(3):
        speed.stage_times(trainer, 32, 1)
    whole_ms = (time.perf_counter() - t0) / 3 * 1e3
    assert sum(parts.values()) < whole_ms  # a part of the iteration, not more


def test_speed_times_the_old_defaults_at_their_own_views(fast_config, capsys):
    """The old-beside-new table steps each row with its own views a step (the old defaults rendered
    two, today's four), in its own U-Net precision, and leaves the trainer's settings as they were."""
    import speed

    from dreamfusion.trainer import TrainConfig, Trainer

    trainer = Trainer(fast_config, "a red cube")
    trainer.run(2)
    batches = []
    render = trainer.renderer.render

    def recording(cameras, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        batches.append(len(cameras))
        return render(cameras, *args, **kwargs)

    trainer.renderer.render = recording
    before = trainer.guidance.cfg
    speed.old_and_new(trainer, 1)
    assert batches == [2] * 4 + [TrainConfig().views] * 4  # 3 warm-up steps and 1 timed, per row
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| old") or line.startswith("| new")]
    assert len(rows) == 2 and "of 2 views" in rows[0] and f"of {TrainConfig().views} views" in rows[1]
    assert trainer.cfg.views == fast_config.views and trainer.guidance.cfg == before


def test_grad_norms_summarise_by_hand_and_run_on_the_tiny_prior(tmp_path, tiny_prior_dir, capsys):
    import grad_norms

    history = [{"grad_norms": {"guidance": {"density": 1.0, "albedo": 2.0}, "opacity": {"density": 0.1, "albedo": 0.0}}},
               {"step": 2},  # a step without the extra backward
               {"grad_norms": {"guidance": {"density": 3.0, "albedo": 4.0}, "opacity": {"density": 0.3, "albedo": 0.0},
                               "orientation": {"density": 0.5, "albedo": 0.0}}}]
    med = grad_norms.summarise(history)
    assert list(med) == ["guidance", "opacity", "orientation"]
    assert med["guidance"] == {"density": 2.0, "albedo": 3.0} and med["opacity"]["density"] == pytest.approx(0.2)
    assert med["orientation"]["density"] == 0.5  # counted only where it had a gradient
    text = grad_norms.table({"a cube": med})
    assert "| a cube | SDS | 2 | 3 | 1 | 1 |" in text and "| a cube | opacity | 0.2 | 0 | 0.1 | 0 |" in text

    prompts = tmp_path / "one.txt"
    prompts.write_text("a red cube\tcube\tred\n")
    rc = grad_norms.main(["--prompts", str(prompts), "--only", "cube", "--steps", "4", "--every", "2", "--model", str(tiny_prior_dir),
                          "--set", "render_size=32", "--set", "field.resolution=24", "--set", "optim.entropy_weight=1"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = {line.split("|")[2].strip(): line for line in out.splitlines() if line.startswith("| a red cube")}
    assert {"SDS", "opacity", "entropy", "tv"} <= set(rows)
    assert float(rows["SDS"].split("|")[3]) > 0  # the prior's gradient reaches the density grid
    assert grad_norms.main(["--prompts", str(prompts), "--every", "0"]) == 2
    assert "--every must be positive" in capsys.readouterr().err
