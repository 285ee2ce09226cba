"""The reference guidance: a measuring instrument, not a prior.

Instead of asking a diffusion model what a render should look like, it renders the true object
of the prompt (``shared/world/SPEC.md``) with the world's exact renderer under the very cameras,
lights and shading modes of the batch, and returns a photometric loss against those renders. A
run with it shows what the engine can reach with a perfect teacher (the "ceiling"): whatever it
misses is the engine's fault, not the prior's. It is kept out of the app's menu.
"""

from __future__ import annotations

import torch

from ..prior.data import render_object
from ..prior.world import NOUNS, WorldObject, build_object, parse_prompt
from .base import Guidance, GuidanceConfig, GuidanceError, RenderBatch


def photometric_loss(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0.5 * sum of squared differences per image, averaged over the batch: its gradient with
    respect to a pixel is (image - target) / B, the same form as SDS's per-pixel gradient.
    (B, C, H, W) x 2 -> scalar."""
    return 0.5 * ((images - targets.detach()) ** 2).sum() / images.shape[0]


def reference_object(prompt: str) -> WorldObject:
    """The world object a prompt names (its view label, if any, is ignored); a
    :class:`GuidanceError` if it names none."""
    text = prompt.rsplit(",", 1)[0] if prompt.rstrip().endswith(" view") else prompt
    noun, colour = parse_prompt(text)
    if noun is None:
        raise GuidanceError(f"the reference guidance renders the world's own objects, and {text!r} names none of them "
                            f"(known: {', '.join(NOUNS)})")
    try:
        return build_object(noun, colour)
    except ValueError as exc:  # e.g. a primitive without a colour word
        raise GuidanceError(f"the reference guidance cannot build {text!r}: {exc}") from None


class ReferenceGuidance(Guidance):
    """Photometric loss on RGB against the world's exact renders (the renders' opacity is not
    graded: like a prior that sees pictures, the engine must carve from colour and shading)."""

    name = "reference"
    user_facing = False

    def __init__(self, cfg: GuidanceConfig, device: torch.device | str = "cpu"):
        super().__init__(cfg, device)
        self.supersample = 2  # antialiased, as the prior's training renders

    def check_prompt(self, prompt: str) -> None:
        reference_object(prompt)

    def truth(self, renders: RenderBatch, texts: list[str]) -> torch.Tensor:
        """The true object's renders (B, 3, H, W) under the batch's conditions."""
        if renders.cameras is None or renders.lights is None or renders.modes is None:
            raise GuidanceError("the reference guidance needs each render's camera, light and shading mode")
        size = renders.images.shape[-1]
        out = []
        cams, lights = renders.cameras.to("cpu"), renders.lights.to("cpu")
        for i, text in enumerate(texts):  # usually one object for the whole batch; rendered per view
            obj = reference_object(text)
            out.append(render_object(obj, cams[i], lights[i], [renders.modes[i]], size, self.supersample))
        return torch.cat(out).to(renders.images.device)

    def loss(self, renders: RenderBatch, texts: list[str], t_range: tuple[float, float], generator: torch.Generator | None = None) -> dict:
        images, targets = renders.images, self.truth(renders, texts)
        loss = photometric_loss(images, targets)
        return {"loss": loss, "t": torch.zeros(len(renders), dtype=torch.long), "grad_norm": float((images - targets).detach().norm() / len(renders))}
