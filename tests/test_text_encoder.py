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


def test_the_tokenizer_and_the_traced_encoder_are_transformers_bit_for_bit(tmp_path):
    """The tokenizers library's tokenizer gives transformers' ids, masks and token types on every
    phrase of the world's vocabulary and some odd prompts; the traced MiniLM gives transformers'
    token states bit for bit at several batch sizes; a second encoder with the same cache reads the
    graph back and never loads transformers' model."""
    from transformers import AutoModel, AutoTokenizer

    from dreamfusion.prior.model import TextEncoder, minilm_path
    from dreamfusion.prior.vocabulary import known_phrases

    reference = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    model = AutoModel.from_pretrained(minilm_path(), local_files_only=True).eval()
    enc = TextEncoder(24, cache_dir=tmp_path)
    odd = ["", "A RED CUBE!!", "a\tred\ncube", "  naïve café ünïcödé ", "a cheeseburger 🍔 on a plate, with a very long description "
           "of many words that goes on and on, and on: isn't it (really) long?"]
    texts = known_phrases() + odd
    ids, mask, types = enc.tokenize(texts)
    want = reference(texts, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"]) and torch.equal(types, want["token_type_ids"])
    assert [enc.token_count(t) for t in odd] == [len(reference(t)["input_ids"]) for t in odd]
    note = enc.truncation_note(odd[-1])
    assert note is not None and reference.decode(reference(odd[-1])["input_ids"][1:23]) in note
    with torch.no_grad():
        for batch in (texts[:1], texts[:5], texts[:37], odd):
            states, states_mask = enc(batch)
            t = reference(batch, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
            eager = model(**t).last_hidden_state
            assert torch.equal(states, eager * t["attention_mask"][..., None].bool()), len(batch)
            assert torch.equal(states_mask, t["attention_mask"].bool())

    again = TextEncoder(24, cache_dir=tmp_path)
    again._transformers_model = lambda: (_ for _ in ()).throw(AssertionError("the cached graph was not used"))
    assert torch.equal(again(odd)[0], enc(odd)[0])
