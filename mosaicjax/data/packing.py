"""Packing token documents into fixed-length training rows, as a checkpointable grain IterDataset.

Each document (int32 token array, EOS already appended) of n tokens gives n-1 (input, target) pairs: target[i] is
the token after input[i] *in the same document*. Pairs are laid out back to back in rows of T; a document that
does not fit is continued at the start of the next row. Per row:

  inputs, targets  int32 [T]
  segment_ids      int32 [T]  1..n in order of appearance, 0 = padding (only the last row of a finite stream)
  positions        int32 [T]  0,1,2,... restarting at every segment start
  weights          float32 [T] 1 on every real pair (segment_ids > 0), else 0

A continued document restarts its positions at 0 in the next row: the model attends within a row only, so the
continuation cannot see its earlier part anyway, and with RoPE only relative positions matter; this keeps
positions < T. Splitting documents into (input, target) pairs *before* packing is what makes targets never cross
documents and never get lost at row boundaries (the last input of a row still has its true next token).

Why not grain.experimental.ConcatThenSplitIterDataset: its state holds tuples that come back from JSON (Orbax's
grain handler) as lists and then compare unequal to its sentinel, so a JSON round trip breaks resumption; and it
re-advances on restore. This iterator's state is {'parent': parent state before the current document,
'offset': pairs of that document already emitted, or -1}: plain JSON, restored by re-reading one document.
"""
from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np

FEATURES = ("inputs", "targets", "segment_ids", "positions", "weights")


class PackingDatasetIterator(grain.DatasetIterator):
    """Iterator of PackedIterDataset; see the module docstring."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, max_empty_streak: int | None = 10_000):
        super().__init__(parent)
        self._seq_len = int(seq_len)
        self._max_empty_streak = max_empty_streak
        self._doc: np.ndarray | None = None  # document being emitted
        self._doc_parent_state: dict | None = None  # parent state from just before that document was read
        self._offset = 0  # pairs of self._doc already emitted
        self._exhausted = False
        self._arange = np.arange(self._seq_len, dtype=np.int32)

    def _next_doc(self) -> bool:
        """Reads the next document with at least one pair; False at the end of the parent."""
        empty_streak = 0
        while True:
            state = copy.deepcopy(self._parent.get_state())
            try:
                doc = next(self._parent)
            except StopIteration:
                self._exhausted = True
                return False
            if doc is not None:  # None: a record dropped upstream (on_error='skip')
                doc = np.asarray(doc, np.int32).reshape(-1)
                if doc.shape[0] >= 2:  # a 1-token document has no (input, target) pair
                    self._doc, self._doc_parent_state, self._offset = doc, state, 0
                    return True
            # An infinite (repeated) stream of only empty or dropped records would otherwise spin forever.
            empty_streak += 1
            if self._max_empty_streak is not None and empty_streak >= self._max_empty_streak:
                raise ValueError(f"no usable document in {empty_streak} consecutive records: all are empty "
                                 "(fewer than 2 tokens) or were skipped as malformed (see skipped_records())")

    def __next__(self) -> dict[str, np.ndarray]:
        t = self._seq_len
        inputs = np.zeros([t], np.int32)
        targets = np.zeros([t], np.int32)
        segment_ids = np.zeros([t], np.int32)
        positions = np.zeros([t], np.int32)
        filled, segment = 0, 0
        while filled < t:
            if self._doc is None and (self._exhausted or not self._next_doc()):
                break
            doc, off = self._doc, self._offset
            k = min(doc.shape[0] - 1 - off, t - filled)  # pairs of this document that fit in the row
            segment += 1
            inputs[filled:filled + k] = doc[off:off + k]
            targets[filled:filled + k] = doc[off + 1:off + k + 1]  # next token, same document
            segment_ids[filled:filled + k] = segment
            positions[filled:filled + k] = self._arange[:k]
            filled += k
            self._offset = off + k
            if self._offset == doc.shape[0] - 1:
                self._doc, self._doc_parent_state = None, None
        if filled == 0:
            raise StopIteration
        return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids, "positions": positions,
                "weights": (segment_ids > 0).astype(np.float32)}

    def get_state(self) -> dict[str, Any]:
        if self._doc is None:
            return {"parent": copy.deepcopy(self._parent.get_state()), "offset": -1}
        return {"parent": copy.deepcopy(self._doc_parent_state), "offset": int(self._offset)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self._doc, self._doc_parent_state, self._offset = None, None, 0
        self._exhausted = False
        offset = int(state["offset"])
        if offset >= 0:
            if not self._next_doc():
                raise ValueError(f"cannot restore packing state {state}: the parent has no document there")
            if offset >= self._doc.shape[0] - 1:
                raise ValueError(f"cannot restore packing state {state}: the document there is too short")
            self._doc_parent_state = copy.deepcopy(state["parent"])
            self._offset = offset

    def __str__(self) -> str:
        return f"PackingDatasetIterator(seq_len={self._seq_len})"


class PackedIterDataset(grain.IterDataset):
    """Packs a stream of int32 token documents into rows of `seq_len` (see the module docstring).

    Parent elements may be None (records dropped upstream; use to_iter_dataset(allow_nones=True) so they reach
    the packer): they are skipped, and `max_empty_streak` consecutive None/empty documents raise instead of
    hanging on an infinite dataset with nothing usable in it (None: no limit, for finite streams).
    """

    def __init__(self, parent: grain.IterDataset, seq_len: int, max_empty_streak: int | None = 10_000):
        super().__init__(parent)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self._seq_len = int(seq_len)
        self._max_empty_streak = max_empty_streak

    def __iter__(self) -> PackingDatasetIterator:
        return PackingDatasetIterator(self._parent.__iter__(), self._seq_len, self._max_empty_streak)

    def __str__(self) -> str:
        return f"PackedIterDataset(seq_len={self._seq_len})"
