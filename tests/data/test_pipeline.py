"""Train iterator: determinism, per-epoch reshuffling, exact resume (incl. JSON state), process sharding; eval."""
import gin
import numpy as np
import pytest

from mosaicjax.data import pipeline

N_DOCS = 24


@pytest.fixture
def corpus(tmp_path):
    """N_DOCS text files of varied length; returns the DataConfig kwargs and the texts by file."""
    rng = np.random.default_rng(0)
    texts = {}
    for i in range(N_DOCS):
        words = " ".join(f"w{int(x)}" for x in rng.integers(0, 100, size=int(rng.integers(1, 30))))
        texts[f"doc{i:03d}"] = f"<doc {i:03d}> {words}\n"
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / f"doc{i:03d}.txt").write_text(texts[f"doc{i:03d}"])
    return {"paths": str(tmp_path / "**" / "*.txt")}, texts


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _iterator(cfg, tok, **kw):
    args = dict(batch_size=2, seq_len=32, seed=0)
    args.update(kw)
    return pipeline.make_train_iterator(cfg, tok, **args)


def test_batch_format(corpus, byte_tokenizer):
    cfg = pipeline.DataConfig(**corpus[0])
    b = next(_iterator(cfg, byte_tokenizer, batch_size=3, seq_len=16))
    assert set(b) == {"inputs", "targets", "segment_ids", "positions", "weights"}
    for k, v in b.items():
        assert v.shape == (3, 16), k
        assert v.dtype == (np.float32 if k == "weights" else np.int32), k


def test_same_seed_same_batches_different_seed_differs(corpus, byte_tokenizer):
    cfg = pipeline.DataConfig(**corpus[0])
    a = _take(_iterator(cfg, byte_tokenizer, seed=3), 6)
    b = _take(_iterator(cfg, byte_tokenizer, seed=3), 6)
    c = _take(_iterator(cfg, byte_tokenizer, seed=4), 6)
    _assert_batches_equal(a, b)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_epochs_cover_all_docs_and_reshuffle(corpus, byte_tokenizer, decode_docs):
    # Row-window shuffling off: this reads documents back in stream order to check the epoch permutations.
    cfg = pipeline.DataConfig(shuffle_window_rows=0, **corpus[0])
    docs = decode_docs(_take(_iterator(cfg, byte_tokenizer, batch_size=4, seq_len=64), 40), byte_tokenizer)
    assert len(docs) > 2 * N_DOCS
    texts = [byte_tokenizer.decode(d) for d in docs[:2 * N_DOCS]]
    epoch0, epoch1 = texts[:N_DOCS], texts[N_DOCS:]
    assert sorted(epoch0) == sorted(corpus[1].values()) == sorted(epoch1)  # every epoch is a permutation
    assert epoch0 != epoch1, "each epoch must be shuffled differently"
    assert epoch0 != sorted(epoch0)


def test_row_window_shuffle_mixes_documents_within_a_batch(corpus, byte_tokenizer):
    # seq_len 8 << document length: unshuffled, a batch of 4 consecutive rows comes from one or two documents.
    unshuffled = pipeline.DataConfig(shuffle_window_rows=0, **corpus[0])
    shuffled = pipeline.DataConfig(shuffle_window_rows=64, **corpus[0])
    a = _take(_iterator(unshuffled, byte_tokenizer, batch_size=4, seq_len=8), 20)
    b = _take(_iterator(shuffled, byte_tokenizer, batch_size=4, seq_len=8), 20)
    rows_a = [tuple(r) for x in a for r in x["inputs"].tolist()]
    rows_b = [tuple(r) for x in b for r in x["inputs"].tolist()]
    assert rows_a != rows_b, "the window shuffle must reorder rows"
    assert sorted(rows_a[:40]) != rows_a[:40] or sorted(rows_b) != rows_b


def test_no_shuffle_reads_in_path_order(corpus, byte_tokenizer, decode_docs):
    cfg = pipeline.DataConfig(shuffle=False, **corpus[0])
    docs = decode_docs(_take(_iterator(cfg, byte_tokenizer, batch_size=4, seq_len=64), 10), byte_tokenizer)
    texts = [byte_tokenizer.decode(d) for d in docs[:N_DOCS]]
    assert texts == [corpus[1][k] for k in sorted(corpus[1])]


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_resume_matches_uninterrupted(corpus, byte_tokenizer, json_roundtrip, k):
    cfg = pipeline.DataConfig(**corpus[0])
    # seq_len 8 << document length: most saved states are inside a document.
    uninterrupted = _take(_iterator(cfg, byte_tokenizer, seq_len=8), k + 10)
    first = _iterator(cfg, byte_tokenizer, seq_len=8)
    _take(first, k)
    state = json_roundtrip(first.get_state())
    resumed = _iterator(cfg, byte_tokenizer, seq_len=8)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 10), uninterrupted[k:])


def test_resume_across_epoch_boundary(corpus, byte_tokenizer, json_roundtrip):
    cfg = pipeline.DataConfig(**corpus[0])
    uninterrupted = _take(_iterator(cfg, byte_tokenizer, batch_size=4, seq_len=64), 30)
    first = _iterator(cfg, byte_tokenizer, batch_size=4, seq_len=64)
    _take(first, 20)  # past the first epoch (~10 batches)
    resumed = _iterator(cfg, byte_tokenizer, batch_size=4, seq_len=64)
    resumed.set_state(json_roundtrip(first.get_state()))
    _assert_batches_equal(_take(resumed, 10), uninterrupted[20:])


def test_process_shards_are_disjoint_and_cover(corpus, byte_tokenizer, decode_docs):
    cfg = pipeline.DataConfig(shuffle_window_rows=0, **corpus[0])  # documents read back in stream order
    seen = []
    for p in range(3):
        it = _iterator(cfg, byte_tokenizer, batch_size=2, seq_len=64, process_index=p, process_count=3)
        docs = decode_docs(_take(it, 12), byte_tokenizer)
        seen.append({byte_tokenizer.decode(d) for d in docs[:N_DOCS // 3]})
        assert len(seen[-1]) == N_DOCS // 3
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert set().union(*seen) == set(corpus[1].values())


def test_eval_split_is_held_out_and_deterministic(corpus, byte_tokenizer, decode_docs):
    cfg = pipeline.DataConfig(eval_fraction=0.3, eval_max_batches=None, shuffle_window_rows=0, **corpus[0])
    ev = pipeline.make_eval_batches(cfg, byte_tokenizer, batch_size=2, seq_len=32)
    ev2 = pipeline.make_eval_batches(cfg, byte_tokenizer, batch_size=2, seq_len=32)
    _assert_batches_equal(ev, ev2)
    eval_texts = {byte_tokenizer.decode(d) for d in decode_docs(ev, byte_tokenizer)}
    train_docs = decode_docs(_take(_iterator(cfg, byte_tokenizer, batch_size=4, seq_len=64), 20), byte_tokenizer)
    train_texts = {byte_tokenizer.decode(d) for d in train_docs[:-1]}
    assert eval_texts and train_texts
    assert not eval_texts & train_texts
    assert eval_texts | train_texts == set(corpus[1].values())


def test_eval_batches_sharded_by_process(corpus, byte_tokenizer):
    cfg = pipeline.DataConfig(eval_fraction=0.5, **corpus[0])
    full = pipeline.make_eval_batches(cfg, byte_tokenizer, batch_size=4, seq_len=16, max_batches=None)
    parts = [pipeline.make_eval_batches(cfg, byte_tokenizer, batch_size=2, seq_len=16, max_batches=None,
                                        process_index=p, process_count=2) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(full) > 0
    for g, a, b in zip(full, *parts):  # process p holds rows [2p, 2p+2) of each global batch
        for k in g:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k])
    limited = pipeline.make_eval_batches(cfg, byte_tokenizer, batch_size=4, seq_len=16, max_batches=2)
    _assert_batches_equal(limited, full[:2])


def test_no_eval_data_gives_empty_list(corpus, byte_tokenizer):
    cfg = pipeline.DataConfig(**corpus[0])
    assert pipeline.make_eval_batches(cfg, byte_tokenizer, batch_size=2, seq_len=16) == []


def test_explicit_eval_paths_excluded_from_training(corpus, byte_tokenizer, decode_docs, tmp_path):
    cfg = pipeline.DataConfig(eval_paths=str(tmp_path / "sub" / "doc00*.txt"), **corpus[0])
    ev = pipeline.make_eval_batches(cfg, byte_tokenizer, batch_size=2, seq_len=32)
    eval_texts = {byte_tokenizer.decode(d) for d in decode_docs(ev, byte_tokenizer)}
    assert eval_texts == {corpus[1][f"doc{i:03d}"] for i in range(10)}
    docs = decode_docs(_take(_iterator(cfg, byte_tokenizer, batch_size=4, seq_len=64), 8), byte_tokenizer)
    assert not {byte_tokenizer.decode(d) for d in docs[:-1]} & eval_texts


def test_gin_names():
    gin.clear_config()
    try:
        gin.parse_config("data.paths = 'x/*.txt'\ndata.on_error = 'skip'\ntokenizer.vocab_size = 4096")
        from mosaicjax.data import tokenizers

        assert pipeline.DataConfig().paths == "x/*.txt"
        assert pipeline.DataConfig().on_error == "skip"
        assert tokenizers.TokenizerConfig().vocab_size == 4096
    finally:
        gin.clear_config()


def test_config_validation():
    with pytest.raises(ValueError, match="source"):
        pipeline.DataConfig(source="parquet")
    with pytest.raises(ValueError, match="on_error"):
        pipeline.DataConfig(on_error="ignore")
    with pytest.raises(ValueError, match="eval_fraction"):
        pipeline.DataConfig(eval_fraction=1.5)
    with pytest.raises(ValueError, match="exclusive"):
        pipeline.DataConfig(eval_fraction=0.1, eval_paths="a/*.txt")
