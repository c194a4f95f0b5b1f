"""Packing: segment ids, restarting positions, targets within documents, weights, exact state round trip."""
import json

import grain
import numpy as np
import pytest

from mosaicjax.data import packing

EOS = 2


def _docs(lengths, seed=0):
    """Documents of the given lengths (EOS included), tokens unique per document for easy checks."""
    rng = np.random.default_rng(seed)
    return [np.concatenate([rng.integers(10, 1000, size=n - 1), [EOS]]).astype(np.int32) for n in lengths]


def _packed(docs, seq_len):
    ds = grain.MapDataset.source(docs).to_iter_dataset()
    return packing.PackedIterDataset(ds, seq_len)


def test_small_example_exact():
    docs = [np.array([5, 6, 7, EOS], np.int32), np.array([8, EOS], np.int32), np.array([9, 10, 11, 12, EOS], np.int32)]
    rows = list(_packed(docs, 5))
    # pairs: doc1 3, doc2 1, doc3 4 -> 8 pairs -> rows of 5: [d1 d1 d1 d2 d3] [d3 d3 d3 pad pad]
    np.testing.assert_array_equal(rows[0]["inputs"], [5, 6, 7, 8, 9])
    np.testing.assert_array_equal(rows[0]["targets"], [6, 7, EOS, EOS, 10])
    np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 2, 3])
    np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 0, 0])
    np.testing.assert_array_equal(rows[0]["weights"], [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(rows[1]["inputs"], [10, 11, 12, 0, 0])
    np.testing.assert_array_equal(rows[1]["targets"], [11, 12, EOS, 0, 0])
    np.testing.assert_array_equal(rows[1]["segment_ids"], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(rows[1]["positions"], [0, 1, 2, 0, 0])
    np.testing.assert_array_equal(rows[1]["weights"], [1, 1, 1, 0, 0])
    assert len(rows) == 2
    for r in rows:
        assert r["inputs"].dtype == np.int32 and r["weights"].dtype == np.float32


def test_invariants_random_lengths():
    lengths = np.random.default_rng(1).integers(1, 40, size=200)  # includes 1-token docs (no pairs: dropped)
    docs = _docs(lengths)
    t = 16
    rows = list(_packed(docs, t))
    # Every pair of every document appears exactly once, in order.
    want_in = np.concatenate([d[:-1] for d in docs])
    want_tg = np.concatenate([d[1:] for d in docs])
    got_in = np.concatenate([r["inputs"][r["weights"] > 0] for r in rows])
    got_tg = np.concatenate([r["targets"][r["weights"] > 0] for r in rows])
    np.testing.assert_array_equal(got_in, want_in)
    np.testing.assert_array_equal(got_tg, want_tg)
    for r in rows[:-1]:
        assert (r["segment_ids"] > 0).all(), "only the stream's last row may be padded"
    for r in rows:
        seg, pos, w = r["segment_ids"], r["positions"], r["weights"]
        np.testing.assert_array_equal(w, (seg > 0).astype(np.float32))
        real = seg[seg > 0]
        assert real[0] == 1 and (np.diff(real) >= 0).all() and (np.diff(real) <= 1).all()  # 1..n in order
        for s in np.unique(real):
            np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))  # restart at 0
        assert (pos[seg == 0] == 0).all()
        # Targets never cross documents: within a segment, target[i] == input[i + 1].
        for i in range(t - 1):
            if seg[i] > 0 and seg[i + 1] == seg[i]:
                assert r["targets"][i] == r["inputs"][i + 1]
        # A segment that is followed by another one in the row ends its document: its last target is EOS.
        for i in range(t - 1):
            if seg[i] > 0 and seg[i + 1] != seg[i] and seg[i + 1] > 0:
                assert r["targets"][i] == EOS


def test_state_round_trip_mid_document():
    docs = _docs([50, 3, 70, 2, 9, 40, 33] * 3, seed=2)
    t = 8
    reference = list(_packed(docs, t))
    saw_mid_doc = False
    for k in range(len(reference)):
        it = iter(_packed(docs, t))
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # what Orbax's grain handler stores
        saw_mid_doc |= state["offset"] > 0
        fresh = iter(_packed(docs, t))
        fresh.set_state(state)
        rest = list(fresh)
        assert len(rest) == len(reference) - k
        for a, b in zip(rest, reference[k:]):
            for key in packing.FEATURES:
                np.testing.assert_array_equal(a[key], b[key])
    assert saw_mid_doc, "the test should cover states saved inside a document"


def test_state_is_stable_and_set_state_rewinds():
    docs = _docs([30] * 10)
    it = iter(_packed(docs, 7))
    next(it)
    s1 = it.get_state()
    assert it.get_state() == s1  # get_state has no side effects
    a = [next(it) for _ in range(5)]
    it.set_state(s1)
    b = [next(it) for _ in range(5)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_bad_seq_len():
    with pytest.raises(ValueError):
        _packed(_docs([3]), 0)
