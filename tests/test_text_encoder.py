"""The embedded prior's text encoder keeps a bounded cache: a long-lived worker process sees ever
new prompts, and its memory must not grow with them."""

from __future__ import annotations

import torch


def test_the_text_cache_is_bounded_and_changes_no_encoding():
    from dreamfusion.prior.model import TextEncoder

    enc = TextEncoder(24)
    enc.CACHE_SIZE = 8
    first, first_mask = enc(["a red cube", "a blue torus"])
    enc([f"a cube number {i}" for i in range(20)])  # pushes the first two out
    assert len(enc._cache) == 8 and "a red cube" not in enc._cache
    again, again_mask = enc(["a red cube", "a blue torus", "a red cube"])  # encoded anew, a repeat within the call
    assert torch.equal(again[:2], first) and torch.equal(again_mask[:2], first_mask) and torch.equal(again[2], first[0])
    assert list(enc._cache)[-2:] == ["a red cube", "a blue torus"] and len(enc._cache) == 8
