"""Sources: JSONL errors with path:line and skip counting, globs, held-out split, ArrayRecord, tfds data_source."""
import json

import numpy as np
import pytest

from mosaicjax.data import arrayrecord
from mosaicjax.data import pipeline
from mosaicjax.data import sources


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _take(it, n):
    return [next(it) for _ in range(n)]


def _good(i):
    return json.dumps({"text": f"record number {i} " * 3, "id": i})


def test_jsonl_random_access_knows_file_and_line(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [_good(0), "", _good(1)])  # blank line 2 is not a record
    (tmp_path / "b.jsonl").write_text(_good(2) + "\r\n" + _good(3))  # CRLF, no trailing newline
    src = sources.JsonlSource([str(a), str(tmp_path / "b.jsonl")])
    assert len(src) == 4
    assert [(r["path"], r["line"]) for r in (src[i] for i in range(4))] == [
        (str(a), 1), (str(a), 3), (str(tmp_path / "b.jsonl"), 1), (str(tmp_path / "b.jsonl"), 2)]
    assert [sources.record_text(src[i]) for i in (3, 0)] == ["record number 3 " * 3, "record number 0 " * 3]


@pytest.mark.parametrize("bad, what", [
    ('{"text": "unterminated', "bad JSON"),
    ('{"body": "no text field"}', "missing field 'text'"),
    ('{"text": 42}', "is int, expected a string"),
    ('["a", "list"]', "expected a JSON object"),
])
def test_jsonl_bad_record_names_path_and_line(tmp_path, byte_tokenizer, bad, what):
    path = _write_jsonl(tmp_path / "data.jsonl", [_good(0), _good(1), _good(2), bad, _good(4)])
    cfg = pipeline.DataConfig(source="jsonl", paths=str(path), shuffle=False)
    it = pipeline.make_train_iterator(cfg, byte_tokenizer, batch_size=1, seq_len=16, seed=0)
    with pytest.raises(ValueError) as e:
        _take(it, 50)
    assert f"{path}:4:" in str(e.value)
    assert what in str(e.value)


def test_jsonl_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(_good(0).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: invalid UTF-8"):
        sources.record_text(sources.JsonlSource([str(path)])[1])


def test_text_file_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"line one\nline two\nna\xefve\n")
    with pytest.raises(ValueError, match=f"{path}:3: invalid UTF-8"):
        sources.record_text(sources.TextFileSource([str(path)])[0])


def test_skip_mode_drops_and_counts(tmp_path, byte_tokenizer, decode_docs):
    lines = [_good(i) for i in range(10)]
    lines[2], lines[7] = "not json", '{"txt": "typo"}'
    path = _write_jsonl(tmp_path / "d.jsonl", lines)
    cfg = pipeline.DataConfig(source="jsonl", paths=str(path), on_error="skip", shuffle=False, read_threads=0)
    assert sources.skipped_records() == 0
    batches = _take(pipeline.make_train_iterator(cfg, byte_tokenizer, batch_size=2, seq_len=32, seed=0), 12)
    docs = [byte_tokenizer.decode(d) for d in decode_docs(batches, byte_tokenizer)[:8]]
    assert docs == ["record number %d " % i * 3 for i in range(10) if i not in (2, 7)]
    assert sources.skipped_records() >= 2  # 2 per epoch read so far
    assert pipeline.skipped_records() == sources.skipped_records()


def test_glob_matching_nothing_is_named(tmp_path, byte_tokenizer):
    pattern = str(tmp_path / "nope" / "*.jsonl")
    cfg = pipeline.DataConfig(source="jsonl", paths=f"{tmp_path}/*.none, {pattern}")
    with pytest.raises(FileNotFoundError, match="matches no files") as e:
        pipeline.make_train_iterator(cfg, byte_tokenizer, batch_size=1, seq_len=8, seed=0)
    assert "*.none" in str(e.value)


def test_stdlib_glob_expands_and_excludes_site_packages():
    files = sources.expand_paths("{stdlib}/json/*.py")
    rels = [r for _, r in files]
    assert "__init__.py" in rels and "decoder.py" in rels
    assert all(p.startswith(sources.stdlib_dir()) for p, _ in files)
    assert not any("site-packages" in p for p, _ in sources.expand_paths("{stdlib}/*/*.py"))


def test_jsonl_eval_fraction_split_is_deterministic_and_disjoint(tmp_path):
    for name in ("x.jsonl", "y.jsonl"):
        _write_jsonl(tmp_path / name, [_good(i) for i in range(200)])
    cfg = pipeline.DataConfig(source="jsonl", paths=str(tmp_path / "*.jsonl"), eval_fraction=0.25)
    keys = {}
    for split in ("train", "eval"):
        src = sources.build_source(cfg, split)
        keys[split] = {(src[i]["path"], src[i]["line"]) for i in range(len(src))}
    assert not keys["train"] & keys["eval"]
    assert len(keys["train"] | keys["eval"]) == 400
    assert 60 <= len(keys["eval"]) <= 140  # ~25% of 400
    src2 = sources.build_source(cfg, "eval")
    assert {(src2[i]["path"], src2[i]["line"]) for i in range(len(src2))} == keys["eval"]
    # The key is the *relative* path: a copy of the corpus elsewhere splits identically.
    other = tmp_path / "copy"
    other.mkdir()
    for name in ("x.jsonl", "y.jsonl"):
        (other / name).write_text((tmp_path / name).read_text())
    cfg2 = pipeline.DataConfig(source="jsonl", paths=str(other / "*.jsonl"), eval_fraction=0.25)
    src3 = sources.build_source(cfg2, "eval")
    assert {(src3[i]["path"].replace("/copy", ""), src3[i]["line"]) for i in range(len(src3))} == keys["eval"]


def test_array_record_round_trip(tmp_path, byte_tokenizer, decode_docs):
    texts = [f"plain text record {i}\nwith two lines, ünïcödé" for i in range(5)]
    objs = [{"text": f"json record {i}", "meta": i} for i in range(5)]
    assert arrayrecord.write_array_record(str(tmp_path / "a.array_record"), texts) == 5
    assert arrayrecord.write_array_record(str(tmp_path / "b.array_record"), objs) == 5
    src = sources.ArrayRecordSource([str(tmp_path / "a.array_record"), str(tmp_path / "b.array_record")])
    assert len(src) == 10
    assert [sources.record_text(src[i]) for i in range(10)] == texts + [o["text"] for o in objs]
    assert (src[7]["path"], src[7]["line"]) == (str(tmp_path / "b.array_record"), 3)
    # Through the pipeline, unshuffled: documents come back in order.
    cfg = pipeline.DataConfig(source="array_record", paths=str(tmp_path / "*.array_record"), shuffle=False)
    batches = _take(pipeline.make_train_iterator(cfg, byte_tokenizer, batch_size=2, seq_len=64, seed=0), 6)
    got = [byte_tokenizer.decode(d) for d in decode_docs(batches, byte_tokenizer)[:10]]
    assert got == texts + [o["text"] for o in objs]


def test_array_record_json_format_errors(tmp_path):
    path = str(tmp_path / "c.array_record")
    arrayrecord.write_array_record(path, ['{"text": "ok"}', "not json"])
    src = sources.ArrayRecordSource([path], fmt="json")
    assert sources.record_text(src[0]) == "ok"
    with pytest.raises(ValueError, match=f"{path}:2: bad JSON"):
        sources.record_text(src[1])
    assert sources.record_text(sources.ArrayRecordSource([path], fmt="auto")[1]) == "not json"


def test_tfds_data_source_with_mock_data(byte_tokenizer, decode_docs):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        cfg = pipeline.DataConfig(source="tfds", tfds_name="lm1b", tfds_split="train", eval_fraction=0.25)
        train, held = sources.build_source(cfg, "train"), sources.build_source(cfg, "eval")
        assert len(train) + len(held) == 40 and 0 < len(held) < 20
        assert isinstance(sources.record_text(train[0]), str)
        it = pipeline.make_train_iterator(cfg, byte_tokenizer, batch_size=2, seq_len=16, seed=0)
        batches = _take(it, 3)
        assert batches[0]["inputs"].shape == (2, 16) and batches[0]["weights"].sum() > 0
        state = it.get_state()
        more = _take(it, 2)
        it2 = pipeline.make_train_iterator(cfg, byte_tokenizer, batch_size=2, seq_len=16, seed=0)
        it2.set_state(json.loads(json.dumps(state)))
        for a, b in zip(_take(it2, 2), more):
            np.testing.assert_array_equal(a["inputs"], b["inputs"])
        ev = pipeline.make_eval_batches(cfg, byte_tokenizer, batch_size=2, seq_len=16, max_batches=4)
        assert 0 < len(ev) <= 4
        # An explicit eval split instead of a fraction.
        cfg2 = pipeline.DataConfig(source="tfds", tfds_name="lm1b", tfds_eval_split="test")
        assert len(sources.build_source(cfg2, "eval")) == 40
        assert pipeline.make_eval_batches(cfg2, byte_tokenizer, batch_size=2, seq_len=16, max_batches=2)


def test_all_records_skipped_raises_instead_of_hanging(tmp_path, byte_tokenizer):
    path = _write_jsonl(tmp_path / "bad.jsonl", ["nope"] * 3)
    # shuffle=False: grain's index_shuffle costs ~ms per index on a 3-record dataset (fine on real ones).
    cfg = pipeline.DataConfig(source="jsonl", paths=str(path), on_error="skip", shuffle=False)
    it = pipeline.make_train_iterator(cfg, byte_tokenizer, batch_size=1, seq_len=8, seed=0)
    with pytest.raises(ValueError, match="no usable document"):
        next(it)
    assert sources.skipped_records() >= 10_000
