"""A resumable stream of packed token windows in a fixed order.

Documents are tokenized one at a time, joined with EOS and cut into windows of `seq_len` tokens. The position is
small whatever the document sizes: (epoch, documents read, the carry-over of fewer than seq_len tokens that
preceded the current document, tokens of carry + current document already emitted). A resumed stream skips the
documents read before the current one without tokenizing them, re-tokenizes the current one and continues, so it
yields exactly the windows an uninterrupted stream would have. When the data runs out the stream starts over at
`start` (so the held-out windows taken from the head of the data are never trained on).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from minipuzzle.data import iter_documents, tokenize_document
from minipuzzle.errors import UserError


@dataclass
class Position:
    docs: int = 0  # documents read, the current one included
    carry: list[int] = field(default_factory=list)  # tokens before the current document (< seq_len of them)
    offset: int = 0  # tokens of carry + current document already emitted

    def as_dict(self) -> dict:
        return {"docs": self.docs, "carry": list(self.carry), "offset": self.offset}


@dataclass
class StreamState:
    epoch: int = 0
    pos: Position = field(default_factory=Position)
    start: Position = field(default_factory=Position)  # where each later epoch begins


class WindowStream:
    """Windows of `seq_len` tokens from `source`, in document order: `take(n)` -> LongTensor [n, seq_len]."""

    def __init__(
        self,
        source: str,
        tokenizer,
        seq_len: int,
        *,
        split: str = "train",
        column: str = "text",
        streaming: bool = False,
        state: StreamState | None = None,
    ):
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.split, self.column, self.streaming = split, column, streaming
        self.state = state or StreamState()
        self._docs: Iterator[str] | None = None
        self._buf: list[int] | None = None  # carry + current document's tokens
        self._emitted = False
        # A pass that started at the epoch start and emitted nothing means the data is too short (a resumed
        # stream may legitimately reach the end of its first, partial pass without a window).
        self._full_pass = self.state.pos == self.state.start

    def _tokens(self, doc: str) -> list[int]:
        # The pieces data.head_split tokenizes in: the head it holds out is exactly our first windows.
        return tokenize_document(self.tokenizer, doc)

    def _open(self) -> None:
        """Position the document iterator after `pos.docs` documents and rebuild the current buffer."""
        pos = self.state.pos
        docs = iter_documents(self.source, self.split, self.column, streaming=self.streaming)
        if pos.docs == 0:
            self._docs, self._buf = docs, list(pos.carry)
            return
        self._docs = itertools.islice(docs, pos.docs - 1, None)
        current = next(self._docs, None)
        if current is None:
            raise UserError(f"data {self.source} has fewer documents than the checkpoint's position: did it change?")
        self._buf = pos.carry + self._tokens(current)

    def take(self, n: int) -> torch.Tensor:
        """The next n windows [n, seq_len] (int64); wraps to a new epoch at the end of the data."""
        out: list[list[int]] = []
        T = self.seq_len
        while len(out) < n:
            if self._buf is None:
                self._open()
            pos = self.state.pos
            while len(self._buf) - pos.offset >= T and len(out) < n:
                out.append(self._buf[pos.offset : pos.offset + T])
                pos.offset += T
                self._emitted = True
            if len(out) == n:
                break
            doc = next(self._docs, None)
            if doc is None:
                if not self._emitted and self._full_pass:
                    after = " after the held-out windows" if self.state.start.docs else ""
                    raise UserError(f"data {self.source} has less than one window of {T} tokens{after} to train on")
                self.state.epoch += 1
                self.state.pos = copy.deepcopy(self.state.start)
                self._buf, self._docs = None, None
                self._emitted, self._full_pass = False, True
                continue
            carry = self._buf[pos.offset :]
            self._buf = carry + self._tokens(doc)
            self.state.pos = Position(pos.docs + 1, carry, 0)
        return torch.tensor(out, dtype=torch.long).reshape(n, T)

    def mark_start(self) -> None:
        """Make the current position the start of every later epoch (after the held-out windows)."""
        self.state.start = copy.deepcopy(self.state.pos)
        self._emitted, self._full_pass = False, True

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "pos": self.state.pos.as_dict(), "start": self.state.start.as_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.state = self.state_from(d)
        self._buf, self._docs = None, None
        self._emitted, self._full_pass = False, self.state.pos == self.state.start

    @staticmethod
    def state_from(d: dict) -> StreamState:
        return StreamState(d["epoch"], Position(**d["pos"]), Position(**d["start"]))
