"""WikiText-style tokenization of raw text, and an article in WikiText layout (pure; for wiki-offline and wiki3b)."""

from __future__ import annotations

import re

_PUNCT = re.compile(r"""([.,;:!?()\[\]{}"“”‘’«»…/—–])""")
_NUM_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NUM_DOT = re.compile(r"(?<=\d)\.(?=\d)")
_HYPHEN = re.compile(r"(?<=\w)-(?=\w)")
_APOSTROPHE = re.compile(r"(?<=\w)'(?=\w)")
_PROTECT = {"@,@": "\x00", "@.@": "\x01", "@-@": "\x02"}


def wikitext_tokenize(text: str) -> str:
    """Tokenize one paragraph the way WikiText is: punctuation split off, ``@-@``, ``@,@``, ``@.@``."""
    text = _NUM_COMMA.sub(" \x00 ", text)
    text = _NUM_DOT.sub(" \x01 ", text)
    text = _HYPHEN.sub(" \x02 ", text)
    text = _APOSTROPHE.sub(" '", text)
    text = _PUNCT.sub(r" \1 ", text)
    for marker, code in _PROTECT.items():
        text = text.replace(code, marker)
    return " ".join(text.split())


def article_lines(title: str, body: str) -> list[str]:
    """An article in WikiText layout: `` = Title = ``, blank lines `` ``, one line per paragraph."""
    lines = [" ", f" = {wikitext_tokenize(title)} = ", " "]
    for paragraph in body.split("\n"):
        tokens = wikitext_tokenize(paragraph)
        if tokens:
            lines += [f" {tokens} ", " "]
    return lines

