"""Tokenizers: SentencePiece training (lossless, token_bytes exact), HF tokenizer.json, load-or-train caching."""
import json
import os
import threading
import time

import numpy as np
import pytest

from mosaicjax.data import pipeline
from mosaicjax.data import sources
from mosaicjax.data import tokenizers

SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "class Foo:\n        pass\n\n\n",
    "  leading spaces, trailing spaces   \n",
    "tabs\tand\ttabs",
    "x",
    "",
    "digits 1234567890 and symbols !@#$%^&*()",
]
NON_ASCII = ["ünïcödé café", "日本語のテキスト", "emoji 🙂 and ∑", "ascii then ł"]


def _corpus(max_bytes=400_000):
    files = [p for p, _ in sources.expand_paths("{stdlib}/json/*.py,{stdlib}/email/*.py")]
    texts, total = [], 0
    for p in files:
        with open(p, encoding="utf-8") as f:
            texts.append(f.read())
        total += len(texts[-1])
        if total > max_bytes:
            break
    return texts


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("sp") / "tok")
    return tokenizers.train_sentencepiece(_corpus(), prefix, vocab_size=600, max_bytes=300_000)


def test_sentencepiece_training_lossless_and_token_bytes(sp_model):
    tok = tokenizers.SentencePieceTokenizer(sp_model)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert 300 < tok.vocab_size <= 600
    tb = tok.token_bytes()
    assert tb.shape == (tok.vocab_size,) and tb.dtype == np.int32
    assert tb[tok.bos_id] == tb[tok.eos_id] == tb[tok.pad_id] == tb[0] == 0
    for text in SAMPLES + NON_ASCII + _corpus(20_000)[:1]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text  # identity normalisation, no dummy prefix, spaces kept
        assert int(tb[ids].sum()) == len(text.encode("utf-8")), text  # holds for any text (byte fallback)
    assert 0 not in tok.encode("never-seen characters: ꙮ ᚠ")  # byte fallback, no <unk>
    # Even a 600-piece vocabulary (256 of them bytes) compresses the code it was trained on.
    code = _corpus(20_000)[0]
    assert len(code.encode()) / len(tok.encode(code)) > 1.5


def test_sentencepiece_meta_space_quirk(sp_model):
    """Documented limitation: a literal U+2581 in the input is read as a space."""
    tok = tokenizers.SentencePieceTokenizer(sp_model)
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


def _byte_level_bpe(tmp_path, add_config=False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_corpus(100_000), trainer)
    path = tmp_path / "tokenizer.json"
    tk.save(str(path))
    if add_config:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|pad|>", "pad_token": None}))
    return path


def test_hf_tokenizer_json(tmp_path):
    path = _byte_level_bpe(tmp_path)
    tok = tokenizers.HFTokenizer(str(path))
    assert tok.eos_id == 0 and tok.pad_id == 1 and tok.bos_id == -1
    assert tok.vocab_size == 400
    tb = tok.token_bytes()
    assert tb[0] == tb[1] == 0
    for text in SAMPLES + NON_ASCII:
        ids = tok.encode(text)
        assert tok.eos_id not in ids  # no special tokens added by encode
        assert tok.decode(ids) == text
        assert int(tb[ids].sum()) == len(text.encode("utf-8")), text
    # A folder works too, and tokenizer_config.json names the special tokens.
    (tmp_path / "folder").mkdir()
    path = _byte_level_bpe(tmp_path / "folder", add_config=True)
    tok2 = tokenizers.HFTokenizer(str(path.parent))
    assert tok2.eos_id == 1
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizers.HFTokenizer(str(path), eos_token="<nope>")


def test_hf_tokenizer_in_pipeline(tmp_path):
    path = _byte_level_bpe(tmp_path)
    (tmp_path / "docs").mkdir()
    for i in range(4):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n")
    tok = tokenizers.load_or_train_tokenizer(tokenizers.TokenizerConfig(kind="hf", path=str(path)), str(tmp_path), [])
    cfg = pipeline.DataConfig(paths=str(tmp_path / "docs" / "*.txt"))
    b = next(pipeline.make_train_iterator(cfg, tok, batch_size=2, seq_len=16, seed=0))
    assert (b["targets"] == tok.eos_id).any()


def test_load_or_train_caches_in_workdir(tmp_path):
    cfg = tokenizers.TokenizerConfig(vocab_size=400, train_max_bytes=100_000)
    calls = []

    def texts():
        calls.append(1)
        return iter(_corpus(100_000))

    tok = tokenizers.load_or_train_tokenizer(cfg, str(tmp_path), texts, process_index=0)
    assert os.path.exists(tmp_path / "tokenizer.model") and calls == [1]
    mtime = os.path.getmtime(tmp_path / "tokenizer.model")
    tok2 = tokenizers.load_or_train_tokenizer(cfg, str(tmp_path), texts, process_index=0)
    assert calls == [1] and os.path.getmtime(tmp_path / "tokenizer.model") == mtime
    assert tok.encode("def main():") == tok2.encode("def main():")


def test_other_processes_wait_for_process_zero(tmp_path, sp_model):
    cfg = tokenizers.TokenizerConfig(vocab_size=400)

    def never():
        raise AssertionError("only process 0 reads training data")

    with pytest.raises(TimeoutError, match="process 1 waited"):
        tokenizers.load_or_train_tokenizer(cfg, str(tmp_path), never, process_index=1, timeout_s=0.2)

    def write_later():
        time.sleep(0.5)
        with open(sp_model, "rb") as src, open(tmp_path / "tokenizer.model.tmp", "wb") as dst:
            dst.write(src.read())
        os.replace(tmp_path / "tokenizer.model.tmp", tmp_path / "tokenizer.model")

    thread = threading.Thread(target=write_later)
    thread.start()
    tok = tokenizers.load_or_train_tokenizer(cfg, str(tmp_path), never, process_index=1, timeout_s=30)
    thread.join()
    assert tok.vocab_size == tokenizers.SentencePieceTokenizer(sp_model).vocab_size


def test_pipeline_training_texts_respects_cap(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(30):
        (tmp_path / "d" / f"{i}.txt").write_text("abcdefghij" * 100)  # 1000 bytes each
    cfg = pipeline.DataConfig(paths=str(tmp_path / "d" / "*.txt"))
    texts = list(pipeline.training_texts(cfg, max_bytes=5_500))
    assert len(texts) == 6
    assert len(list(pipeline.training_texts(cfg))) == 30


def test_hf_metaspace_byte_fallback_token_bytes(tmp_path):
    """Llama-style tokenizer.json: '▁' for spaces, '<0xNN>' byte pieces for characters outside the vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in list("abcdefghijklmnopqrstuvwxyz,.") + ["\u2581", "\u2581t", "he", "\u2581the"]:
        vocab[piece] = len(vocab)
    model = models.BPE(vocab=vocab, merges=[("\u2581", "t"), ("h", "e"), ("\u2581t", "he")], unk_token="<unk>",
                       byte_fallback=True)
    tk = Tokenizer(model)
    tk.add_special_tokens(["</s>"])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = tokenizers.HFTokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.eos_id == 1
    tb = tok.token_bytes()
    assert tb[vocab["\u2581the"]] == 4 and tb[vocab["<0x41>"]] == 1 and tb[1] == 0
    for text in ["the cat, the hat.", "ünïcödé", "CAPS and 123"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert int(tb[ids].sum()) == len(text.encode("utf-8")), text
