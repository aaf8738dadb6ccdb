"""A word-level tokenizer for ToyWorld's closed vocabulary.

Why not open_clip's BPE tokenizer? ToyWorld's language has about seventy words. A
49,408-entry BPE table would cost 6.3M embedding parameters at width 128 (seven times
the whole toy vision tower), nearly all of them never trained, and would split no word
that matters. A word-level table keeps the checkpoint small and every token meaningful.
The vocabulary includes the ``novel`` shapes (hexagon, ring, arrow) although pretraining
captions never use them: their embeddings stay at initialisation, which is exactly why a
zero-shot classifier is weak on that split and a few-shot cache must help.

Token ids follow CLIP's conventions so open_clip's text tower works unchanged: 0 is
padding, start-of-text is 1, and end-of-text has the largest id, so ``argmax`` pooling
finds it.
"""

from __future__ import annotations

import re

import torch

from labkit.data import toyworld as tw

PAD, SOT, UNK, EOT = "<pad>", "<sot>", "<unk>", "<eot>"


_TOKEN_RE = re.compile(r"[a-z]+|[^\sa-z]")


def toyworld_vocabulary() -> list[str]:
    """Every word ToyWorld's captions, questions and prompt templates can produce."""
    words = set(tw.BASE_SHAPES + tw.NOVEL_SHAPES) | set(tw.COLORS) | set(tw.COUNT_WORDS)
    for group in (tw._SYNONYMS.values(), (p.split() for p in tw.POSITIONS)):
        for synonyms in group:
            words.update(synonyms)
    text = " ".join(tw._SCENE_TEMPLATES + tw._POSITION_TEMPLATES) + (
        " and object objects shape size color colour photo what where how many is are the of a an yes no ? : ,")
    words.update(_TOKEN_RE.findall(text.lower().replace("{n}", "").replace("{}", "")))
    return sorted(words)


class WordTokenizer:
    """``tokenizer(texts) -> LongTensor [B, context_length]`` with ``<sot> words <eot>`` and zero padding."""

    def __init__(self, vocab: list[str], context_length: int = 32):
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocabulary has duplicate words")
        self.words = [PAD, SOT, UNK, *vocab, EOT]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        unk = self.ids[UNK]
        return [self.ids.get(w, unk) for w in _TOKEN_RE.findall(text.lower())]

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` outside the vocabulary (each would become ``<unk>``)."""
        return [w for w in _TOKEN_RE.findall(text.lower()) if w not in self.ids]

    def decode(self, ids) -> str:
        special = {self.ids[PAD], self.ids[SOT], self.ids[EOT]}
        return " ".join(self.words[int(i)] for i in ids if int(i) not in special)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.ids[SOT], *self.encode(text)][: length - 1] + [self.ids[EOT]]
            out[row, : len(ids)] = torch.tensor(ids)
        return out
