"""CLIP R-Precision, as DreamFusion reports it: render a result, and count how often CLIP retrieves
the right caption among the benchmark's captions (the distractors).

Each rendered view is one retrieval query: the caption with the highest cosine similarity between
CLIP's image embedding of the view and its text embedding of the caption is CLIP's pick, and the
R-Precision (R = 1) is the fraction of views whose pick is the prompt that made them. DreamFusion
reports it on shaded colour renders and, to measure geometry alone, on textureless renders; both
are supported through the renders you pass (see ``benchmarks/quality.py --clip``).

The CLIP model is optional and not shipped: pass a local folder holding a transformers
``CLIPModel`` with its tokenizer (and, optionally, image processor), e.g. one written by
``save_pretrained``, or a hub id when online.

    python benchmarks/clip_rprecision.py --clip PATH [--size 128 --views 4]

scores the TRUE objects' renders of the benchmark prompts: the ceiling of this score on this world
(CLIP was trained on photographs, not on these toy renders; read results beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers.utils import ModelOutput

    from dreamfusion.cameras import Cameras

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipUnavailable(RuntimeError):
    """No CLIP model could be loaded; the message says what to do, in one sentence."""


@dataclass
class Clip:
    """A CLIP model with what it needs to read captions and images."""

    model: object  # transformers.CLIPModel
    tokenizer: object
    image_size: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    device: torch.device = torch.device("cpu")


def _embeddings(out: torch.Tensor | ModelOutput) -> torch.Tensor:
    """transformers < 5 returns the projected features as a tensor, 5.x an output whose
    ``pooler_output`` holds them."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out[0]


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (saves half a minute of retries offline)."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return True
    except (OSError, ImportError, AttributeError, TypeError):
        return False


def load_clip(path: str | Path, device: str = "cpu") -> Clip:
    """Load a CLIP model from a local folder or hub id; :class:`ClipUnavailable` when it cannot be."""
    try:
        from transformers import AutoTokenizer, CLIPModel
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise ClipUnavailable(f"CLIP R-Precision needs transformers ({exc})") from None
    path = str(path)
    local = Path(path).expanduser().is_dir()
    looks_like_hub_id = not path.startswith((".", "/", "~")) and path.count("/") <= 1 and not Path(path).exists()
    if local:
        path = str(Path(path).expanduser())
    elif not looks_like_hub_id:
        raise ClipUnavailable(f"CLIP model folder {path!r} not found: pass a local folder holding a transformers CLIPModel")
    attempts = [True] if local or os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable() else [True, False]
    last: Exception | None = None
    for local_only in attempts:
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=local_only)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
            break
        except (OSError, ValueError, ImportError) as exc:
            last = exc
    else:
        first = str(last).strip().splitlines()[0] if last and str(last).strip() else type(last).__name__
        raise ClipUnavailable(f"cannot load a CLIP model from {path!r} ({first}); offline, pass a local folder "
                              "holding a transformers CLIPModel and its tokenizer (save_pretrained of e.g. openai/clip-vit-base-patch32)")
    image_size = int(model.config.vision_config.image_size)
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    try:  # the image processor's settings, read as JSON (its class would want torchvision)
        from transformers.utils import cached_file

        proc = json.loads(Path(cached_file(path, "preprocessor_config.json", local_files_only=True)).read_text())
        mean, std = tuple(proc.get("image_mean", mean)), tuple(proc.get("image_std", std))
        crop = proc.get("crop_size")
        if isinstance(crop, dict) and "height" in crop:
            image_size = int(crop["height"])
        elif isinstance(crop, int):
            image_size = crop
    except (OSError, ValueError, TypeError, AttributeError):
        pass  # no preprocessor_config.json: CLIP's own constants
    model.eval().to(device)
    return Clip(model, tokenizer, image_size, mean, std, torch.device(device))


@torch.no_grad()
def text_embeddings(clip: Clip, captions: list[str]) -> torch.Tensor:
    """(C, D) unit-norm text embeddings."""
    tok = clip.tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt")
    tok = {k: v.to(clip.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
    emb = _embeddings(clip.model.get_text_features(**tok)).float()
    return F.normalize(emb, dim=-1)


def preprocess(clip: Clip, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1], square renders -> CLIP's pixel values: resized (bicubic) to its input
    size and normalised (for a square image this is what CLIPImageProcessor's resize + centre crop does)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
    x = F.interpolate(images.float(), size=(clip.image_size, clip.image_size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = x.new_tensor(clip.mean)[None, :, None, None]
    std = x.new_tensor(clip.std)[None, :, None, None]
    return (x - mean) / std


@torch.no_grad()
def image_embeddings(clip: Clip, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """(B, D) unit-norm image embeddings of renders (B, 3, H, W) in [0, 1]."""
    out = []
    for i in range(0, len(images), batch):
        pixels = preprocess(clip, images[i:i + batch]).to(clip.device)
        out.append(_embeddings(clip.model.get_image_features(pixel_values=pixels)).float())
    return F.normalize(torch.cat(out), dim=-1)


def clip_r_precision(clip: Clip, images: list[torch.Tensor], true_index: list[int], captions: list[str]) -> dict:
    """R-Precision of CLIP retrieval.

    ``images[k]``: the views (V_k, 3, H, W) in [0, 1] of result k; ``true_index[k]``: the index in
    ``captions`` of the prompt that made it; ``captions``: all captions (the right one and the
    distractors). Returns ``r_precision`` (fraction of all views whose best caption is the right
    one, in [0, 1]), ``per_result`` (that fraction per result), ``retrieved`` (per result, CLIP's
    pick per view) and ``similarity`` (per result, (V_k, C) cosine similarities)."""
    if len(images) != len(true_index):
        raise ValueError(f"{len(images)} results but {len(true_index)} true indices")
    if not captions:
        raise ValueError("no captions to retrieve from")
    bad = [i for i in true_index if not 0 <= i < len(captions)]
    if bad:
        raise ValueError(f"true caption index {bad[0]} out of range for {len(captions)} captions")
    text = text_embeddings(clip, captions)
    per_result, retrieved, similarity = [], [], []
    hits = total = 0
    for views, truth in zip(images, true_index, strict=True):
        views = views[None] if views.ndim == 3 else views
        sim = image_embeddings(clip, views) @ text.T  # (V, C)
        pick = sim.argmax(dim=-1)
        correct = int((pick == truth).sum())
        hits += correct
        total += len(views)
        per_result.append(correct / len(views))
        retrieved.append([captions[int(p)] for p in pick])
        similarity.append(sim.cpu())
    return {"r_precision": hits / max(total, 1), "per_result": per_result, "retrieved": retrieved, "similarity": similarity,
            "views": total, "captions": len(captions)}


def clip_views(views: int = 4, elevation: float = 20.0) -> Cameras:
    """The evaluation cameras: ``views`` azimuths evenly spaced from the three-quarter front view."""
    from dreamfusion.cameras import VIEW_DISTANCE, VIEW_FOCAL, make_cameras

    az = 30.0 + torch.arange(views, dtype=torch.float32) * (360.0 / views)
    return make_cameras(az, elevation, VIEW_DISTANCE, VIEW_FOCAL)


def render_truth(noun: str, colour: str | None, views: int = 4, size: int = 128, mode: str = "lit") -> torch.Tensor:
    """(V, 3, size, size) renders of the world's true object from :func:`clip_views`."""
    from dreamfusion.cameras import default_light
    from dreamfusion.prior.data import render_object
    from dreamfusion.prior.world import build_object

    cams = clip_views(views)
    return render_object(build_object(noun, colour), cams, default_light(cams), [mode] * len(cams), size)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from prompts import DEFAULT_PROMPTS, parse_benchmark

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", required=True, help="local folder (or hub id, online) of a transformers CLIPModel")
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        clip = load_clip(args.clip)
    except ClipUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    items = parse_benchmark(args.prompts)
    captions = [it.prompt for it in items]
    for mode in ("lit", "textureless"):
        renders = [render_truth(it.noun, it.colour, args.views, args.size, mode) for it in items]
        res = clip_r_precision(clip, renders, list(range(len(items))), captions)
        print(f"CLIP R-Precision of the TRUE objects ({mode}, {args.views} views each, {len(captions)} captions): {res['r_precision']:.1%}")
        for it, p, picks in zip(items, res["per_result"], res["retrieved"], strict=True):
            print(f"  {it.prompt:24s} {p:5.0%}  picks: {', '.join(picks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
