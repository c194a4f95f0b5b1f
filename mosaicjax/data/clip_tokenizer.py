"""CLIP's byte-level BPE tokenizer (Stable Diffusion text encoders), pure Python, exact to transformers.

Reads the files a diffusers folder carries in tokenizer/ and tokenizer_2/: vocab.json + merges.txt (or
tokenizer.json), with tokenizer_config.json / special_tokens_map.json for the special tokens and the maximum
length. Ids equal transformers 5's `CLIPTokenizer(prompts, padding="max_length", max_length=77,
truncation=True)`, which is what the diffusers pipelines call. That tokenizer is the `tokenizers`-backed one
(transformers 5 dropped the ftfy/BasicTokenizer Python path), so the text pipeline is:

  1. special tokens (`<|startoftext|>`, `<|endoftext|>`) written literally in the prompt are split out first and
     map to their ids, as the `tokenizers` added vocabulary does;
  2. normalise: NFC, every run of Unicode White_Space -> one ' ', lowercase character by character (Rust's
     `char::to_lowercase`, so no context-dependent Greek final sigma);
  3. pre-tokenise with CLIP's pattern
     `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+` (one digit per
     piece), then GPT-2's byte-level pattern over each piece (it only changes the special-token strings);
  4. map each piece's UTF-8 bytes to GPT-2's printable byte alphabet, append '</w>' to the last symbol and apply
     the merges lowest rank first (ties: leftmost), as `tokenizers`' BPE does; a symbol missing from the
     vocabulary becomes the unknown token (one per symbol, not fused).

Padding: SD1 pads with `<|endoftext|>`; SD2 and SDXL's tokenizer_2 pad with '!' (id 0). The pad token comes from
tokenizer_config.json / special_tokens_map.json, never from a guess.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import unicodedata
from typing import Iterable, Mapping, Sequence

import numpy as np

from mosaicjax.data.tokenizers import bytes_to_unicode

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_SUFFIX = "</w>"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Unicode's White_Space property (what `\s` means in Rust's regex, hence in `tokenizers`). Python's str.isspace
# differs (it also accepts U+001C..U+001F), so the set is spelled out.
_WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000")


def _is_letter(c: str) -> bool:
    return unicodedata.category(c)[0] == "L"


def _is_number(c: str) -> bool:
    return unicodedata.category(c)[0] == "N"


def normalize(text: str) -> str:
    """NFC, collapse White_Space runs to ' ', lowercase per character (transformers' CLIP normaliser)."""
    text = unicodedata.normalize("NFC", text)
    out, in_space = [], False
    for c in text:
        if c in _WHITE_SPACE:
            if not in_space:
                out.append(" ")
            in_space = True
        else:
            out.append(c.lower())
            in_space = False
    return "".join(out)


def _gpt2_split(piece: str) -> list[str]:
    """GPT-2's byte-level pattern over a whitespace-free CLIP piece.

    On such a piece `'s|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+` splits only at letter / number /
    other boundaries, which CLIP's pattern already did, except inside the special-token strings
    ('<|endoftext|>' -> '<|', 'endoftext', '|>').
    """
    out, i, n = [], 0, len(piece)
    while i < n:
        for con in _CONTRACTIONS:
            if piece.startswith(con, i):
                out.append(con)
                i += len(con)
                break
        else:
            kind = _is_letter(piece[i]), _is_number(piece[i])
            j = i + 1
            while j < n and (_is_letter(piece[j]), _is_number(piece[j])) == kind:
                j += 1
            out.append(piece[i:j])
            i = j
    return out


def pre_tokenize(text: str) -> list[str]:
    """CLIP's regex split of normalised text (leftmost-first alternation, whitespace dropped)."""
    pieces, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c in _WHITE_SPACE:
            i += 1
            continue
        match = None
        for lit in (BOS_TOKEN, EOS_TOKEN) + _CONTRACTIONS:
            if text.startswith(lit, i):
                match = lit
                break
        if match is None:
            j = i + 1
            if _is_letter(c):
                while j < n and _is_letter(text[j]):
                    j += 1
            elif not _is_number(c):  # a number is always a single character
                while j < n and not (text[j] in _WHITE_SPACE or _is_letter(text[j]) or _is_number(text[j])):
                    j += 1
            match = text[i:j]
        pieces.extend(_gpt2_split(match))
        i += len(match)
    return pieces


Token = "str | Mapping"  # a plain string, or an AddedToken dict {"content": ..., "normalized": ...}


def _token(tok) -> tuple[str, bool]:
    """(content, normalized) of a special token given as a string (never normalised, as transformers reads a
    plain string) or as an AddedToken dict (its own "normalized" flag, by default `not special`). The lstrip /
    rstrip / single_word flags are not supported (no CLIP tokenizer sets them)."""
    if isinstance(tok, Mapping):
        return tok["content"], bool(tok.get("normalized", not tok.get("special", True)))
    return str(tok), False


class CLIPTokenizer:
    """CLIP BPE tokenizer. `__call__(prompts) -> int32 [B, model_max_length]` (bos, tokens, eos, pad).

    vocab: token -> id; merges: ordered (left, right) pairs (rank = position). pad_token defaults to the eos token
    (SD1); SD2 / SDXL tokenizer_2 use '!'. Special tokens are strings or AddedToken dicts; each is matched
    literally in prompts before anything else, on the raw text, or on the normalised (lowercased) text when
    its "normalized" flag is set. added_tokens: further such tokens (tokenizer_config's added_tokens_decoder
    entries); their flags win over the special token values' own, as in transformers.
    """

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
                 bos_token: Token = BOS_TOKEN, eos_token: Token = EOS_TOKEN, pad_token: Token | None = None,
                 unk_token: Token | None = None, added_tokens: Sequence[Token] = (), model_max_length: int = 77):
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        pad_token = eos_token if pad_token is None else pad_token
        unk_token = eos_token if unk_token is None else unk_token
        # Which literal strings the added vocabulary splits out, and whether it matches them after normalising.
        # transformers registers bos, eos, unk, pad in this order; a later registration of the same string wins.
        declared = dict(_token(t) for t in added_tokens)
        self._added: dict[str, bool] = dict(declared)
        for tok in (bos_token, eos_token, unk_token, pad_token):
            content, normalized = _token(tok)
            self._added[content] = declared.get(content, normalized)
        self.bos_token, self.eos_token = _token(bos_token)[0], _token(eos_token)[0]
        self.pad_token, self.unk_token = _token(pad_token)[0], _token(unk_token)[0]
        self.inv_vocab = {i: t for t, i in self.vocab.items()}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if getattr(self, name) not in self.vocab:
                raise ValueError(f"{name} {getattr(self, name)!r} is not in the vocabulary")
        self.bos_id, self.eos_id = self.vocab[self.bos_token], self.vocab[self.eos_token]
        self.pad_id, self.unk_id = self.vocab[self.pad_token], self.vocab[self.unk_token]
        self.model_max_length = int(model_max_length)
        # (left_id, right_id) -> (rank, merged_id), as `tokenizers` keys its merge table; a later duplicate wins.
        self._merge_table: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(self.merges):
            try:
                self._merge_table[self.vocab[a], self.vocab[b]] = (rank, self.vocab[a + b])
            except KeyError as e:
                raise ValueError(f"merge {a!r} {b!r} (rank {rank}) uses a token not in the vocabulary: {e}") from None
        self._byte_map = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_map.items()}
        by_len = sorted(self._added, key=len, reverse=True)
        self._raw_specials = [t for t in by_len if not self._added[t]]
        self._norm_specials = [t for t in by_len if self._added[t]]
        self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **overrides) -> "CLIPTokenizer":
        """Loads a tokenizer/ or tokenizer_2/ folder: vocab.json + merges.txt, or tokenizer.json.

        Special tokens and model_max_length come from tokenizer_config.json, then special_tokens_map.json (which
        wins, as in transformers); `overrides` (e.g. pad_token='!') win over both.
        """
        folder = os.fspath(folder)
        vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        json_path = os.path.join(folder, "tokenizer.json")
        added: dict[str, int] = {}
        added_tokens: list[dict] = []
        if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
            with open(vocab_path, encoding="utf-8") as f:
                vocab = json.load(f)
            with open(merges_path, encoding="utf-8") as f:
                merges = _parse_merges(f.read().split("\n"))
        elif os.path.isfile(json_path):
            with open(json_path, encoding="utf-8") as f:
                tj = json.load(f)
            model = tj["model"]
            if model.get("type", "BPE") != "BPE":
                raise ValueError(f"{json_path}: expected a BPE model, got {model.get('type')!r}")
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
            added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
            added_tokens = list(tj.get("added_tokens", []))
        else:
            raise FileNotFoundError(f"{folder}: no vocab.json + merges.txt nor tokenizer.json")
        kw: dict = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    conf = json.load(f)
                for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                    if conf.get(key) is not None:
                        kw[key] = conf[key]
                for idx, tok in (conf.get("added_tokens_decoder") or {}).items():
                    added[tok["content"]] = int(idx)
                    added_tokens.append(tok)
                if name == "tokenizer_config.json" and conf.get("model_max_length") is not None:
                    # transformers writes a huge sentinel when the length is unknown; CLIP's positions are 77.
                    mml = int(conf["model_max_length"])
                    kw["model_max_length"] = mml if mml < 1_000_000 else 77
        kw.update(overrides)
        vocab = {**vocab, **added}
        return cls(vocab, merges, added_tokens=added_tokens, **kw)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Writes vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json (Hub CLIP layout)."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
        def spec(content):  # AddedToken dicts keep the normalized flags
            return dict(content=content, lstrip=False, normalized=self._added[content], rstrip=False,
                        single_word=False, special=content in special_strings)

        special_strings = {self.bos_token, self.eos_token, self.pad_token, self.unk_token}
        specials = dict(bos_token=spec(self.bos_token), eos_token=spec(self.eos_token),
                        pad_token=spec(self.pad_token), unk_token=spec(self.unk_token))
        with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump(specials, f, indent=2, ensure_ascii=False)
        decoder = {str(self.vocab[t]): spec(t) for t in sorted(self._added, key=self.vocab.__getitem__)}
        # transformers reads dicts in tokenizer_config.json only with the "__type" marker (as the Hub files have).
        typed = {k: {"__type": "AddedToken", **v} for k, v in specials.items()}
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(dict(typed, added_tokens_decoder=decoder, model_max_length=self.model_max_length,
                           do_lower_case=True, tokenizer_class="CLIPTokenizer"), f, indent=2, ensure_ascii=False)

    # ---------------------------------------------------------------------------------------------- encoding
    def _bpe_uncached(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-token: byte-map, '</w>' on the last symbol, merges lowest (rank, position) first."""
        chars = [self._byte_map[b] for b in piece.encode("utf-8")]
        ids = []
        for k, c in enumerate(chars):
            sym = c + _SUFFIX if k == len(chars) - 1 else c
            ids.append(self.vocab.get(sym, self.unk_id))
        table = self._merge_table
        while len(ids) > 1:
            best = None  # (rank, position, merged_id)
            for p in range(len(ids) - 1):
                m = table.get((ids[p], ids[p + 1]))
                if m is not None and (best is None or m[0] < best[0]):
                    best = (m[0], p, m[1])
            if best is None:
                break
            _, p, new = best
            ids[p:p + 2] = [new]
        return tuple(ids)

    @staticmethod
    def _split_added(text: str, tokens: Sequence[str]) -> list[tuple[str, bool]]:
        """[(segment, is_added_token)]: `tokens` (longest first) matched leftmost-longest, as `tokenizers` does."""
        if not tokens:
            return [(text, False)] if text else []
        out, start, i = [], 0, 0
        while i < len(text):
            for tok in tokens:
                if text.startswith(tok, i):
                    if start < i:
                        out.append((text[start:i], False))
                    out.append((tok, True))
                    i += len(tok)
                    start = i
                    break
            else:
                i += 1
        if start < len(text):
            out.append((text[start:], False))
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without bos/eos, untruncated."""
        ids: list[int] = []
        for segment, special in self._split_added(text, self._raw_specials):
            if special:
                ids.append(self.vocab[segment])
                continue
            for part, special in self._split_added(normalize(segment), self._norm_specials):
                if special:
                    ids.append(self.vocab[part])
                    continue
                for piece in pre_tokenize(part):
                    ids.extend(self._bpe(piece))
        return ids

    def __call__(self, prompts: str | Iterable[str], *, max_length: int | None = None,
                 padding: str = "max_length", truncation: bool = True) -> np.ndarray:
        """int32 [B, max_length] ids: bos, tokens (truncated to max_length - 2), eos, then pad_id.

        padding='max_length' pads to max_length (default model_max_length, 77: what the pipelines use);
        padding='longest' pads to the longest row of the batch. Without truncation a longer prompt raises.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        max_length = self.model_max_length if max_length is None else int(max_length)
        rows = []
        for p in prompts:
            ids = self.encode(p)
            if truncation:
                ids = ids[:max_length - 2]
            elif len(ids) + 2 > max_length:
                raise ValueError(f"prompt is {len(ids) + 2} tokens, more than max_length={max_length}")
            rows.append([self.bos_id] + ids + [self.eos_id])
        if padding == "max_length":
            width = max_length
        elif padding == "longest":
            width = max((len(r) for r in rows), default=2)
        else:
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        out = np.full((len(rows), width), self.pad_id, np.int32)
        for b, r in enumerate(rows):
            out[b, :len(r)] = r
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` ('</w>' -> ' ', stripped), for messages such as "this part of the prompt was cut"."""
        specials = {self.bos_id, self.eos_id, self.pad_id} if skip_special_tokens else set()
        data = bytearray()
        for i in ids:
            if int(i) in specials:
                continue
            tok = self.inv_vocab.get(int(i), "")
            word_end = tok.endswith(_SUFFIX)
            tok = tok[:-len(_SUFFIX)] if word_end else tok
            if tok in (self.bos_token, self.eos_token, self.pad_token, self.unk_token):
                data += tok.encode("utf-8")
            else:
                data += bytes(self._byte_decoder[c] for c in tok if c in self._byte_decoder)
            if word_end:
                data += b" "
        return data.decode("utf-8", errors="replace").strip()


def _parse_merges(lines: Iterable[str]) -> list[tuple[str, str]]:
    """merges.txt lines -> pairs; the '#version' header and blank lines are skipped."""
    merges = []
    for k, line in enumerate(lines):
        if not line.strip() or (k == 0 and line.startswith("#version")):
            continue
        a, b = line.split(" ") if line.count(" ") == 1 else line.split()
        merges.append((a, b))
    return merges


def build_clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout for `merges`: 256 byte symbols, their '</w>' forms, one token per merge, then
    '<|startoftext|>' and '<|endoftext|>' (so '!' is id 0, as the SD2 pad token relies on)."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + _SUFFIX for b in base] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}


def train_clip_bpe(texts: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE merges over CLIP's pre-tokens of `texts` (most frequent pair first, ties by first seen).

    Small and deterministic: for building tokenizers of tests and toy models, not for production vocabularies.
    """
    byte_map = bytes_to_unicode()
    words: collections.Counter = collections.Counter()
    for t in texts:
        for piece in pre_tokenize(normalize(t)):
            chars = [byte_map[b] for b in piece.encode("utf-8")]
            chars[-1] += _SUFFIX
            words[tuple(chars)] += 1
    merges: list[tuple[str, str]] = []
    seen = set()
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        # Skip pairs whose merged string already exists: a vocabulary has one id per string.
        cands = [(n, p) for p, n in pairs.items() if "".join(p) not in seen]
        if not cands:
            break
        best = max(cands, key=lambda x: x[0])[1]  # max keeps the first of equal counts (insertion order)
        merges.append(best)
        seen.add("".join(best))
        merged = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges
