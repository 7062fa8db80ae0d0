"""Bounds on a JSON request body measured while it streams in, before anything parses it.

A body can be small and still expensive to parse: `[[[[...` recurses once per level (the
standard library raises RecursionError deep down, json5 and naive validators fall over
earlier), and `["a","a",...]` turns every 4 bytes into a Python object of ~60 bytes. The
meter sees each chunk as it arrives and refuses the body as soon as

- the nesting of `[` / `{` outside strings passes `max_json_depth` (422), or
- its structural characters (quotes, commas, colons, opening brackets, backslashes) pass
  `max_json_tokens` (422) - an upper bound on the number of values the parser would build.

Counting is done with `bytes.count` (C speed); the depth scan visits only brackets, quotes
and backslashes, of which there are at most `max_json_tokens` - so the work per body is
bounded whatever it holds. Base64 image data contains none of these characters.
"""
from __future__ import annotations

import re

from pipelines.serve.limits import LimitExceeded

_COUNTED = (b'"', b",", b":", b"[", b"{", b"\\")
_SCANNED = re.compile(rb'[\[\]{}"\\]')
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")


class JsonMeter:
    """Feed the body's chunks in order; `feed` raises `LimitExceeded` naming the limit."""

    def __init__(self, max_depth: int, max_tokens: int):
        self.max_depth = int(max_depth)
        self.max_tokens = int(max_tokens)
        self.tokens = 0
        self.depth = 0
        self.deepest = 0
        self._offset = 0
        self._in_string = False
        self._escaped_at = -1  # absolute offset of the character a backslash escapes

    def feed(self, chunk: bytes) -> None:
        self.tokens += sum(chunk.count(c) for c in _COUNTED)
        if self.tokens > self.max_tokens:
            raise LimitExceeded("max_json_tokens", self.max_tokens, self.tokens,
                                "JSON structural characters (quotes, commas, colons, "
                                "brackets, backslashes) in the request body")
        for match in _SCANNED.finditer(chunk):
            at = self._offset + match.start()
            char = chunk[match.start()]
            if self._in_string:
                if at == self._escaped_at:
                    continue
                if char == _BACKSLASH:
                    self._escaped_at = at + 1
                elif char == _QUOTE:
                    self._in_string = False
            elif char == _QUOTE:
                self._in_string = True
            elif char in _OPEN:
                self.depth += 1
                if self.depth > self.max_depth:
                    raise LimitExceeded("max_json_depth", self.max_depth, f">{self.max_depth}",
                                        "nesting depth of the JSON request body")
                self.deepest = max(self.deepest, self.depth)
            elif char in _CLOSE:
                self.depth = max(0, self.depth - 1)
        self._offset += len(chunk)
