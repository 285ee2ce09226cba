"""What the embedded prior knows, and a check of whether a prompt is near it.

The prior was trained on captions of the world's 16 objects in 12 colours (and their synonyms).
A prompt far from every known phrase (cosine similarity of MiniLM sentence vectors, the encoder the
prior is conditioned on) gets a note before a run starts: the run goes on, but the user knows why a
squirrel comes out as a blob.

Threshold, measured (``docs/prior.md``): known phrases score 0.70-1.00 with their nearest
vocabulary phrase and paraphrases 0.73-1.00 ("a cube painted red" 0.89, "a cheeseburger" 0.74),
while unrelated prompts score 0.25-0.56 ("a pizza" 0.56, "a DSLR photo of a squirrel" 0.38);
the threshold sits between the two groups.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .model import TextEncoder
from .world import COLOUR_WORDS, FIXED_COMPOSITES, MATERIAL_WORDS, NOUN_WORDS, parse_prompt

OOV_THRESHOLD = 0.62
VOCABULARY_FILE = "vocabulary.safetensors"


def known_phrases() -> list[str]:
    """Every object word alone and, for objects that take a colour, with every colour word and
    material: 'a box', 'a crimson box', 'a wooden chair'..."""
    out = set()
    for noun, words in NOUN_WORDS.items():
        for w in words:
            out.add(f"a {w}")
            if noun not in FIXED_COMPOSITES:
                for colour, cws in COLOUR_WORDS.items():
                    for c in cws + MATERIAL_WORDS.get(colour, ()):
                        out.add(f"a {c} {w}")
    return sorted(out)


def plain_words(prompt: str) -> str:
    """The prompt's words, without emoji and symbols (which only pull its sentence vector away from
    the phrase it contains)."""
    return " ".join(re.sub(r"[^\w\s,'-]", " ", prompt).split())


@dataclass
class VocabularyMatch:
    prompt: str
    similarity: float
    nearest: str
    names: str | None = None
    """an object of the world that the prompt names word for word ('a red cube 🚀' names the cube)"""

    @property
    def known(self) -> bool:
        return self.similarity >= OOV_THRESHOLD or self.names is not None

    def note(self) -> str | None:
        """A sentence for the user when the prompt is far from what the prior knows (else None). It
        names no command-line flag or control: the command line and the page each say how to choose
        another prior in their own terms."""
        if self.known:
            return None
        return (f"the built-in prior knows 16 simple objects in 12 colours, and {self.prompt!r} is far from all of them "
                f"(nearest: {self.nearest!r}, similarity {self.similarity:.2f}); the result will likely be a blob. "
                "Open-ended prompts need a prior of the open world, such as Stable Diffusion (a GPU and its weights)")


class Vocabulary:
    """The known phrases' sentence vectors (from ``folder``'s vocabulary file when it matches the
    phrase list, else encoded once and cached per process)."""

    _cache: dict[str, torch.Tensor] = {}
    _lock = threading.Lock()

    def __init__(self, encoder: TextEncoder, folder: Path | None = None):
        self.encoder = encoder
        self.phrases = known_phrases()
        key = "|".join(self.phrases)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._load(folder) if folder is not None else None
                if self._cache[key] is None:
                    self._cache[key] = encoder.condition(self.phrases).pooled.float().cpu()
            self.vectors = self._cache[key]

    def _load(self, folder: Path) -> torch.Tensor | None:
        from safetensors import safe_open

        path = Path(folder) / VOCABULARY_FILE
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("phrases") != "\n".join(self.phrases):
                return None  # another phrase list: encode anew
            return f.get_tensor("pooled").float()

    def save(self, folder: Path) -> Path:
        from safetensors.torch import save_file

        from ..files import atomic_write

        tensors = {"pooled": self.vectors.to(torch.float16).contiguous()}
        return atomic_write(Path(folder) / VOCABULARY_FILE, lambda tmp: save_file(tensors, tmp, metadata={"phrases": "\n".join(self.phrases)}))

    def match(self, prompt: str) -> VocabularyMatch:
        words = plain_words(prompt) or prompt
        v = self.encoder.condition([words]).pooled.float().cpu()
        sims = (self.vectors @ v.T).squeeze(1)
        i = int(sims.argmax())
        return VocabularyMatch(prompt, float(sims[i]), self.phrases[i], parse_prompt(words)[0])
