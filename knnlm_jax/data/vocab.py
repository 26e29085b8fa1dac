"""Word-level dictionary as in fairseq's WikiText-103 setup.

Special symbols first (``<s>``, ``<pad>``, ``</s>``, ``<unk>``), then the training
words ordered by count (descending), ties broken alphabetically. Every line end is
the ``</s>`` token; unknown words map to ``<unk>``.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from knnlm_jax.core.errors import InputError

BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
SPECIALS = (BOS, PAD, EOS, UNK)
CHUNK_LINES = 65536  # lines per chunk when counting or encoding a stream
CHUNK_TOKENS = 1 << 20  # ... and at most about this many tokens per encoded chunk


def chunks(lines: Iterable[str], size: int | None = None) -> Iterator[list[str]]:
    """``lines`` in lists of at most ``size`` (default ``CHUNK_LINES``): the only lines held at once."""
    it = iter(lines)
    while chunk := list(itertools.islice(it, size or CHUNK_LINES)):
        yield chunk


def line_runs(lines: Iterable[str], size: int, fresh=lambda previous, line: True) -> Iterator[list[str]]:
    """``lines`` in runs of at least ``size`` (the last may be shorter), each run ending just before
    a line where ``fresh(previous line, line)``: where a vocabulary's encoding may start afresh (see
    ``starts_fresh``). A run grows without bound where no such line comes."""
    run: list[str] = []
    for line in lines:
        if len(run) >= size and fresh(run[-1], line):
            yield run
            run = []
        run.append(line)
    if run:
        yield run


class Vocab:
    """An immutable word <-> id mapping."""

    def __init__(self, words: Sequence[str], counts: Sequence[int] | None = None):
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise InputError(f"a vocabulary starts with the special symbols {SPECIALS}")
        self.words = tuple(words)
        self.counts = tuple(counts) if counts is not None else (0,) * len(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise InputError("a vocabulary has a repeated word")
        self.bos, self.pad, self.eos, self.unk = (self.index[s] for s in SPECIALS)

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.words == other.words

    @classmethod
    def build(cls, lines: Iterable[str], max_size: int = 0) -> "Vocab":
        """Count whitespace tokens (plus one ``</s>`` per line); keep ``max_size`` entries (0 = all).

        ``lines`` may be any iterable (a corpus stream): it is read in chunks, never held whole.
        """
        counter: collections.Counter = collections.Counter()
        n_lines = 0
        for chunk in chunks(lines):
            counter.update(itertools.chain.from_iterable(map(str.split, chunk)))
            n_lines += len(chunk)
        counter[EOS] += n_lines
        for special in SPECIALS:
            counter.setdefault(special, 0)
        specials = {s: counter.pop(s) for s in SPECIALS}
        ranked = sorted(counter.items(), key=lambda wc: (-wc[1], wc[0]))
        if max_size:
            ranked = ranked[: max(0, max_size - len(SPECIALS))]
        words = list(SPECIALS) + [w for w, _ in ranked]
        counts = [specials[s] for s in SPECIALS] + [c for _, c in ranked]
        return cls(words, counts)

    def encode_line(self, line: str) -> list[int]:
        """Ids of a line's whitespace tokens followed by ``</s>``."""
        get, unk = self.index.get, self.unk
        return [get(w, unk) for w in line.split()] + [self.eos]

    def encode(self, lines: Iterable[str]) -> np.ndarray:
        """int32 ids of a few lines (small inputs; a corpus goes through :meth:`encode_chunks`)."""
        ids: list[int] = []
        for line in lines:
            ids.extend(self.encode_line(line))
        return np.asarray(ids, dtype=np.int32)

    def encode_chunks(self, lines: Iterable[str], chunk_lines: int = CHUNK_LINES,
                      chunk_tokens: int = CHUNK_TOKENS) -> Iterator[np.ndarray]:
        """int32 ids of a stream of lines, as consecutive arrays of about ``chunk_tokens`` or fewer.

        The concatenation equals ``encode(lines)``; at most one chunk is held at a time.
        """
        get, unk, eos = self.index.get, self.unk, self.eos
        ids: list[int] = []
        n_lines = 0
        for line in lines:
            ids.extend([get(w, unk) for w in line.split()])
            ids.append(eos)
            n_lines += 1
            if n_lines >= chunk_lines or len(ids) >= chunk_tokens:
                yield np.asarray(ids, dtype=np.int32)
                ids, n_lines = [], 0
        if ids:
            yield np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.words[int(i)] for i in ids)

    @staticmethod
    def starts_fresh(previous: str, line: str) -> bool:
        """Every line is encoded on its own: an encoding may restart at any line."""
        return True

    def shown(self, ids: Iterable[int]) -> str:
        """Text for a reader: the words, spaced."""
        return self.decode(ids)

    def shown_token(self, i: int) -> str:
        return self.words[int(i)]

    def fingerprint(self) -> str:
        """sha256 of the ordered word list: identifies the vocabulary in manifests and caches."""
        return hashlib.sha256("\n".join(self.words).encode("utf-8")).hexdigest()

    def save(self, path: str) -> None:
        """Write ``word count`` lines (fairseq dict.txt style, specials included) atomically."""
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for w, c in zip(self.words, self.counts):
                f.write(f"{w} {c}\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Vocab":
        words, counts = [], []
        with open(path, encoding="utf-8") as f:
            for line in f:
                w, c = line.rstrip("\n").rsplit(" ", 1)
                words.append(w)
                counts.append(int(c))
        return cls(words, counts)
