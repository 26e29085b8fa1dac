"""A pretrained LM's subword tokenizer behind the interface of :class:`~knnlm_jax.data.vocab.Vocab`.

The corpus is read line by line as everywhere else; each line is encoded with its line end
(``line + "\\n"``), so the newline token plays ``</s>``'s part: it ends every line and is the
token a stream starts after. A word-level corpus's word count (whitespace words plus one per
line, as :class:`Vocab` counts them) gives the per-word perplexity beside the per-token one.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from typing import Iterable, Iterator

import numpy as np

from knnlm_jax.data.vocab import CHUNK_LINES, CHUNK_TOKENS
from knnlm_jax.core.errors import InputError

LINE_END = "\n"


class SubwordVocab:
    """Token ids of a ``tokenizers.Tokenizer`` for a model whose output layer has ``size`` rows."""

    unk = None  # a byte-level tokenizer has no unknown token

    def __init__(self, tokenizer, size: int | None = None):
        self.tokenizer = tokenizer
        self.size = int(size or tokenizer.get_vocab_size(with_added_tokens=True))
        ids = tokenizer.encode(LINE_END, add_special_tokens=False).ids
        if len(ids) != 1:
            raise InputError(f"the tokenizer encodes a line end as {len(ids)} tokens, not one")
        self.eos = ids[0]
        self._words: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return self.size

    @property
    def words(self) -> tuple[str, ...]:
        """Each id's text (what it decodes to alone), for display."""
        if self._words is None:
            self._words = tuple(self.tokenizer.decode([i], skip_special_tokens=False) for i in range(self.size))
        return self._words

    @functools.cached_property
    def index(self) -> dict:
        """Token text -> id (display texts; a prompt goes through :meth:`encode_text`)."""
        return {w: i for i, w in enumerate(self.words)}

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, lines: Iterable[str]) -> np.ndarray:
        return np.concatenate([np.zeros(0, np.int32), *self.encode_chunks(lines)])

    def encode_chunks(self, lines: Iterable[str], chunk_lines: int = CHUNK_LINES,
                      chunk_tokens: int = CHUNK_TOKENS) -> Iterator[np.ndarray]:
        """int32 ids of a stream of lines, each encoded with its line end, in bounded chunks."""
        it = iter(lines)
        del chunk_tokens  # chunks are bounded by lines: a line's tokens are few
        while batch := list(itertools.islice(it, chunk_lines)):
            encoded = self.tokenizer.encode_batch([line + LINE_END for line in batch], add_special_tokens=False)
            yield np.fromiter(itertools.chain.from_iterable(e.ids for e in encoded), np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def count_words(self, ids_N) -> int:
        """Whitespace words plus line ends in the text of ``ids_N``: the word-level token count of that text."""
        text = self.decode(np.asarray(ids_N))
        return len(text.split()) + text.count(LINE_END)

    def fingerprint(self) -> str:
        """sha256 of the tokenizer's full definition (vocabulary, merges, pre-tokenizer) and the model's size."""
        return hashlib.sha256(f"{self.size}\n{self.tokenizer.to_str()}".encode("utf-8")).hexdigest()
