"""The out-of-vocabulary note: prompts the embedded prior knows (and paraphrases of them) pass,
unrelated prompts get a note naming the nearest known phrase; the threshold sits between the two
measured groups."""

from __future__ import annotations

import pytest

from dreamfusion.prior.vocabulary import OOV_THRESHOLD, Vocabulary, known_phrases

KNOWN = ["a red cube", "a blue torus", "a snowman", "a photo of a green cube", "a 3d render of a tree", "a gray dumbbell"]
PARAPHRASES = ["a ruby-red box", "a sky blue ball", "a doughnut in blue", "a coffee cup that is white", "a cheeseburger",
               "a christmas tree", "a cube painted red", "a grey barbell", "a little snowman"]
UNRELATED = ["a DSLR photo of a squirrel", "an astronaut riding a horse", "a bowl of ramen", "a sports car", "a photo of a cat",
             "a teddy bear", "a banana", "a pizza"]


@pytest.fixture(scope="module")
def vocabulary():
    from dreamfusion.prior.model import ASSET_DIR, TextEncoder

    return Vocabulary(TextEncoder(24), ASSET_DIR)


def test_known_phrases_cover_the_world():
    phrases = known_phrases()
    assert "a red cube" in phrases and "a crimson box" in phrases and "a wooden chair" in phrases and "a snowman" in phrases
    assert "a red snowman" not in phrases  # fixed-colour objects take no colour word
    assert len(phrases) == len(set(phrases))


@pytest.mark.parametrize("prompt", KNOWN + PARAPHRASES)
def test_known_and_paraphrased_prompts_get_no_note(vocabulary, prompt):
    m = vocabulary.match(prompt)
    assert m.similarity >= OOV_THRESHOLD + 0.05, (prompt, m)  # with a margin
    assert m.note() is None


@pytest.mark.parametrize("prompt", UNRELATED)
def test_unrelated_prompts_get_a_note_naming_the_nearest_phrase(vocabulary, prompt):
    m = vocabulary.match(prompt)
    assert m.similarity <= OOV_THRESHOLD - 0.05, (prompt, m)
    note = m.note()
    assert note and prompt in note and m.nearest in note and "Stable Diffusion" in note
    assert "--" not in note  # no command-line flag: the page and the command line each add their own way


@pytest.mark.parametrize("prompt", ["a red cube, trending on artstation, 8k, unreal engine 🔥",
                                    "🚀🚀 a red cube 🚀 launching to the moon at night 🌙", "a red cube 🚀🔥🎉", "a burger 🍔"])
def test_a_known_phrase_among_emoji_and_extras_gets_no_note(vocabulary, prompt):
    """A prompt that names an object of the world word for word is known, whatever surrounds it: the
    first two scored 0.58 and 0.61 as whole sentences (below the threshold, 'likely a blob')."""
    m = vocabulary.match(prompt)
    assert m.known and m.note() is None, (prompt, m)


def test_the_shipped_vocabulary_file_matches_encoding_anew(vocabulary):
    from dreamfusion.prior.model import TextEncoder

    fresh = TextEncoder(24).condition(vocabulary.phrases[:50]).pooled
    assert (fresh - vocabulary.vectors[:50]).abs().max() < 2e-3  # stored in fp16
