"""Shared fixtures of the data tests: a byte tokenizer (instant, no training) and a packed-stream decoder."""
import json

import numpy as np
import pytest

from mosaicjax.data import sources
from mosaicjax.data import tokenizers


class ByteTokenizer(tokenizers.Tokenizer):
    """UTF-8 bytes shifted by 4: 0 pad, 1 bos, 2 eos, 3 unused."""

    vocab_size, pad_id, bos_id, eos_id = 260, 0, 1, 2

    def encode(self, text):
        return [b + 4 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 4 for i in ids if i >= 4).decode("utf-8", "replace")

    def _compute_token_bytes(self):
        return np.array([0] * 4 + [1] * 256, np.int32)


@pytest.fixture
def byte_tokenizer():
    return ByteTokenizer()


def _decode_docs(batches, tokenizer=None):
    """Rebuilds the documents (as token lists incl. EOS) from packed batches, in stream order.

    Walks the real (weight 1) pairs row by row: inputs accumulate, and a document ends where its target is EOS.
    A trailing unfinished document is returned too (last element may lack EOS).
    """
    eos = 2 if tokenizer is None else tokenizer.eos_id
    docs, cur = [], []
    for b in batches:
        for r in range(b["inputs"].shape[0]):
            for i, t, w in zip(b["inputs"][r], b["targets"][r], b["weights"][r]):
                if w == 0:
                    continue
                cur.append(int(i))
                if t == eos:
                    docs.append(cur + [eos])
                    cur = []
    if cur:
        docs.append(cur)
    return docs


@pytest.fixture
def decode_docs():
    return _decode_docs


@pytest.fixture
def json_roundtrip():
    return lambda state: json.loads(json.dumps(state))


@pytest.fixture(autouse=True)
def _reset_skip_counter():
    sources.reset_skipped_records()
    yield
    sources.reset_skipped_records()
