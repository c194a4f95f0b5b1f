"""CLIP tokenizer: exact ids against transformers' CLIPTokenizer on a tiny BPE trained here, in the Hub's file
layouts (vocab.json + merges.txt, tokenizer.json), with SD1 (eos) and SD2/SDXL ('!' = id 0) padding."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import transformers

from mosaicjax.data import clip_tokenizer as ct

CORPUS = [
    "a photo of an astronaut riding a horse on the moon",
    "A painting of a dog, trending on artstation, 4k, highly detailed!!",
    "the quick brown fox jumps over the lazy dog's back; it's 12345 o'clock",
    "cats and dogs and photographs of landscapes at sunset, oil on canvas",
    "portrait of a woman, studio lighting, bokeh... (masterpiece:1.2) [best quality]",
    "we'll see what they've done, I'm sure you'd like it",
    "café au lait, naïve résumé, straße, Ελληνικά, русский текст",
] * 3

PROMPTS = [
    "a photo of an astronaut riding a horse",
    "",
    "   ",
    "  A  Photo\tOF\n\nthe MOON!!  ",
    "it's 12345 o'clock, isn't it? I'LL go; we've won, you'd see",
    "Über café naïve ΟΔΟΣ İstanbul straße",
    "日本語のテキスト 中文字符 한국어",
    "emoji 🐱‍👤 cat 👍🏽 flag 🇯🇵",
    "x<|endoftext|>y <|startoftext|>z",
    "<|ENDOFTEXT|> <|endoftext",
    "a " * 100,
    "masterpiece, " * 40,
    "don't ''s '''s 's'll 'S 'LL",
    "ﬁ ligature ①②③ ½ Ⅻ ²³ ٣٤٥",
    "\x00\x1c\x1f control\u200b zero\u200dwidth\ufeff",
    "tab\u3000ideographic\u00a0nbsp\u2028line\u0085next",
    "e\u0301 (decomposed) vs \u00e9; A\u030a",
    "hello!!! ??? ... --- ((( )))",
    "(masterpiece:1.2), [best quality], {ultra-detailed}, <lora:foo:0.7>",
    "1234567890 3.14159 1e-5 0x1F",
]


def _random_prompts(n, seed=0):
    rng = random.Random(seed)
    alphabet = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") + list(" \t\n  ") * 3
                + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
                + ["'s", "'ll", "'re", "<|endoftext|>", "<|startoftext|>"]
                + list("éüßØæœΣσςΩ日本語中文ñ") + ["\u0301", "\u00a0", "\u3000", "🐱", "👍🏽", "½", "²", "Ⅻ", "\x00"])
    words = [w for t in CORPUS for w in t.split()]
    out = []
    for _ in range(n):
        parts = [rng.choice(words) if rng.random() < 0.5 else rng.choice(alphabet) for _ in range(rng.randint(0, 30))]
        out.append("".join(p + (" " if rng.random() < 0.4 else "") for p in parts))
    return out


def _added(content, normalized=True):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False}


@pytest.fixture(scope="module")
def vocab_merges():
    merges = ct.train_clip_bpe(CORPUS, 200)
    return ct.build_clip_vocab(merges), merges


def _write_hub_folder(path, vocab, merges, pad):
    """A tokenizer folder as the Hub has them: AddedToken dicts (normalized) for bos/eos/unk, plain pad."""
    ct.CLIPTokenizer(vocab, merges).save_pretrained(path)
    specials = dict(bos_token=_added(ct.BOS_TOKEN), eos_token=_added(ct.EOS_TOKEN), unk_token=_added(ct.EOS_TOKEN),
                    pad_token=pad)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(dict(specials, model_max_length=77, do_lower_case=True, errors="replace",
                       tokenizer_class="CLIPTokenizer", add_prefix_space=False), f)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f)
    return path


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["sd1_pad_eos", "sd2_pad_bang"])
def folder(request, tmp_path_factory, vocab_merges):
    path = str(tmp_path_factory.mktemp("tok"))
    return _write_hub_folder(path, *vocab_merges, pad=request.param)


def _reference(folder_or_tok, prompts, max_length=77):
    ref = (transformers.CLIPTokenizer.from_pretrained(folder_or_tok) if isinstance(folder_or_tok, str)
           else folder_or_tok)
    return ref(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")["input_ids"]


def _assert_same(ours, theirs, prompts):
    assert ours.shape == theirs.shape == (len(prompts), ours.shape[1]) and ours.dtype == np.int32
    bad = [p for p, a, b in zip(prompts, ours, theirs) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]!r}"


def test_matches_transformers(folder):
    ours = ct.CLIPTokenizer.from_pretrained(folder)
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    assert ours.pad_id == ref.pad_token_id and ours.eos_id == ref.eos_token_id and ours.bos_id == ref.bos_token_id
    assert ours.model_max_length == 77
    prompts = PROMPTS + _random_prompts(300)
    _assert_same(ours(prompts), _reference(ref, prompts), prompts)


def test_padding_and_truncation(folder):
    tok = ct.CLIPTokenizer.from_pretrained(folder)
    ids = tok(["a photo", "", "a " * 100])
    assert ids.shape == (3, 77)
    assert tok.pad_id == (0 if tok.pad_token == "!" else tok.eos_id)
    assert list(ids[1, :2]) == [tok.bos_id, tok.eos_id] and (ids[1, 2:] == tok.pad_id).all()
    assert ids[2, 0] == tok.bos_id and ids[2, -1] == tok.eos_id and tok.pad_id not in ids[2, 1:-1].tolist()
    longest = tok(["a photo", "a photo of a dog"], padding="longest")
    assert longest.shape == (2, 2 + len(tok.encode("a photo of a dog")))
    with pytest.raises(ValueError):
        tok(["a " * 100], truncation=False)


def test_sd2_bang_is_split_out_like_transformers(vocab_merges, tmp_path):
    # With '!' registered as the pad (special) token, "!!" in a prompt is two id-0 tokens, not a merged "!!".
    vocab, merges = vocab_merges
    assert vocab["!"] == 0 and "!!</w>" in vocab
    sd1 = ct.CLIPTokenizer.from_pretrained(_write_hub_folder(str(tmp_path / "a"), vocab, merges, "<|endoftext|>"))
    sd2 = ct.CLIPTokenizer.from_pretrained(_write_hub_folder(str(tmp_path / "b"), vocab, merges, "!"))
    assert sd1.encode("wow!!") != sd2.encode("wow!!") and sd2.encode("wow!!")[-2:] == [0, 0]


def test_special_token_flags(vocab_merges, tmp_path):
    """normalized=False special tokens match only literally; normalized ones also in upper case; the files'
    precedence (special_tokens_map over tokenizer_config) is transformers'."""
    vocab, merges = vocab_merges
    prompts = ["a photo!! x<|endoftext|>y <|ENDOFTEXT|> <|StartOfText|>", "hi ! there!", "<|endoftext|>!"]
    for cfg_pad, map_pad, norm in [("<|endoftext|>", "!", True), ("!", "<|endoftext|>", True), ("!", "!", False)]:
        d = str(tmp_path / f"{cfg_pad}{map_pad}{norm}".replace("|", "").replace("<", "").replace(">", ""))
        ct.CLIPTokenizer(vocab, merges).save_pretrained(d)
        specials = dict(bos_token=_added(ct.BOS_TOKEN, norm), eos_token=_added(ct.EOS_TOKEN, norm),
                        unk_token=_added(ct.EOS_TOKEN, norm))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(dict(specials, pad_token=cfg_pad, model_max_length=77), f)
        with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
            json.dump(dict(specials, pad_token=map_pad), f)
        _assert_same(ct.CLIPTokenizer.from_pretrained(d)(prompts, max_length=24), _reference(d, prompts, 24), prompts)


def test_tokenizer_json_folder(vocab_merges, tmp_path):
    """A folder with only tokenizer.json (+ configs), as transformers 5 saves it."""
    src = _write_hub_folder(str(tmp_path / "src"), *vocab_merges, pad="!")
    ref = transformers.CLIPTokenizer.from_pretrained(src)
    ref.save_pretrained(str(tmp_path / "saved"))
    dst = str(tmp_path / "json_only")
    os.makedirs(dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(tmp_path / "saved" / name):
            shutil.copy(tmp_path / "saved" / name, dst)
    assert not os.path.exists(os.path.join(dst, "vocab.json"))
    ours = ct.CLIPTokenizer.from_pretrained(dst)
    prompts = PROMPTS + _random_prompts(50, seed=1)
    _assert_same(ours(prompts), _reference(ref, prompts), prompts)


def test_unknown_symbols(vocab_merges, tmp_path):
    """Byte symbols missing from the vocabulary become the unk token, one per symbol (fuse_unk=False)."""
    vocab, merges = vocab_merges
    byte_chars = ct.bytes_to_unicode()
    used = {t for m in merges for t in (m[0], m[1], m[0] + m[1])}
    drop = ({byte_chars[b] for b in range(0xE0, 0x100)} | {byte_chars[b] + "</w>" for b in range(0x80, 0xC0)}) - used
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in drop]
    small = {t: i for i, t in enumerate(tokens)}
    d = _write_hub_folder(str(tmp_path / "unk"), small, merges, pad="!")
    prompts = ["日本語 cat", "emoji 🐱 and 👍🏽!", "café", "plain text"]
    ours = ct.CLIPTokenizer.from_pretrained(d)
    assert ours.unk_id in ours.encode("日本語")
    _assert_same(ours(prompts), _reference(d, prompts), prompts)


def test_save_load_roundtrip_and_decode(vocab_merges, tmp_path):
    vocab, merges = vocab_merges
    tok = ct.CLIPTokenizer(vocab, merges, pad_token="!")
    tok.save_pretrained(str(tmp_path))
    tok2 = ct.CLIPTokenizer.from_pretrained(str(tmp_path))
    assert tok2.vocab == tok.vocab and tok2.merges == tok.merges and tok2.pad_id == 0
    prompts = PROMPTS + _random_prompts(20, seed=2)
    np.testing.assert_array_equal(tok(prompts), tok2(prompts))
    assert tok.decode(tok("A Photo of the  MOON, café")[0]) == "a photo of the moon , café"


def test_saved_folder_loads_in_transformers(folder, tmp_path):
    """save_pretrained keeps the special tokens' flags: transformers reads our folder to the same ids."""
    ct.CLIPTokenizer.from_pretrained(folder).save_pretrained(str(tmp_path))
    ours = ct.CLIPTokenizer.from_pretrained(str(tmp_path))
    prompts = PROMPTS + _random_prompts(50, seed=3)
    want = _reference(folder, prompts)
    _assert_same(ours(prompts), want, prompts)
    _assert_same(_reference(str(tmp_path), prompts).astype(np.int32), want, prompts)


def test_pre_tokenize_rules():
    assert ct.pre_tokenize(ct.normalize("It's 2024!! ok")) == ["it", "'s", "2", "0", "2", "4", "!!", "ok"]
    assert ct.pre_tokenize("!'s") == ["!'", "s"]  # the punctuation run takes the apostrophe first
    assert ct.pre_tokenize("<|endoftext|>") == ["<|", "endoftext", "|>"]
    assert ct.normalize("ΟΔΟΣ\u3000x") == "οδοσ x"  # per-character lowercase: no final sigma
