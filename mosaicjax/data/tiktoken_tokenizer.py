"""TiktokenTokenizer: a tiktoken BPE file (the format of cl100k_base.tiktoken) plus special tokens.

The BPE file has one line per mergeable token: `<base64 of the token's bytes> <rank>`; the rank is the token id.
Special tokens live outside that table at fixed ids. DBRX uses GPT-4's cl100k_base ranks (ids 0..100255) with
cl100k's own specials plus three that Databricks added (ids as in the published tokenizer_config.json of
databricks/dbrx-base / dbrx-instruct, added_tokens_decoder):

    <|endoftext|> 100257   <|fim_prefix|> 100258   <|fim_middle|> 100259   <|fim_suffix|> 100260
    <|endofprompt|> 100276  <|pad|> 100277          <|im_start|> 100278     <|im_end|> 100279

(The tiktoken README's "cl100k_im" example puts <|im_start|>/<|im_end|> at 100264/100265; DBRX does not.)
The model's embedding has 100352 rows; ids the tokenizer never produces are padding.

As Hugging Face tokenizers do with added tokens, special tokens written in the text are recognised by
`encode` (chat prompts are plain text with '<|im_start|>' in them); pass special_in_text=False to encode
such text as ordinary characters instead.
"""
from __future__ import annotations

import base64
import json
import os
from typing import Mapping, Sequence

import numpy as np

from mosaicjax.data import tokenizers

# GPT-4's pre-tokenisation regex (tiktoken_ext.openai_public.cl100k_base).
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")

CL100K_SPECIAL_TOKENS = {
    '<|endoftext|>': 100257, '<|fim_prefix|>': 100258, '<|fim_middle|>': 100259, '<|fim_suffix|>': 100260,
    '<|endofprompt|>': 100276,
}
DBRX_SPECIAL_TOKENS = {**CL100K_SPECIAL_TOKENS, '<|pad|>': 100277, '<|im_start|>': 100278, '<|im_end|>': 100279}
DBRX_VOCAB_SIZE = 100352  # embedding rows of the published model (ids >= 100280 are padding)


def read_bpe_file(path: str) -> dict[bytes, int]:
    """Mergeable ranks from a tiktoken BPE file (`base64 rank` per line); errors name the file and line."""
    ranks: dict[bytes, int] = {}
    with open(path, 'rb') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f'{path}:{lineno}: not a tiktoken BPE line (`<base64> <rank>`): {line[:80]!r}') from e
    return ranks


def write_bpe_file(ranks: Mapping[bytes, int], path: str) -> None:
    """Inverse of read_bpe_file (lines sorted by rank)."""
    with open(path, 'wb') as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b' ' + str(rank).encode() + b'\n')


class TiktokenTokenizer(tokenizers.Tokenizer):
    """tiktoken BPE + special tokens, behind mosaicjax's Tokenizer interface.

    special_tokens: {text: id}; default DBRX's (only meaningful with the cl100k ranks). vocab_size is the
    largest id + 1 unless given (e.g. 100352 to match the model). bos/eos/pad name special tokens (None: absent).
    """

    def __init__(self, bpe_path: str | Mapping[bytes, int], special_tokens: Mapping[str, int] | None = None, *,
                 pat_str: str = CL100K_PATTERN, vocab_size: int | None = None,
                 bos_token: str | None = '<|endoftext|>', eos_token: str | None = '<|endoftext|>',
                 pad_token: str | None = '<|pad|>', special_in_text: bool = True, name: str | None = None):
        import tiktoken  # pylint: disable=import-outside-toplevel

        if isinstance(bpe_path, Mapping):  # mergeable ranks given directly
            self.path, ranks = name or '<ranks>', dict(bpe_path)
        else:
            self.path = os.fspath(bpe_path)
            ranks = read_bpe_file(self.path)
        specials = dict(DBRX_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        rank_ids = set(ranks.values())
        clash = {t: i for t, i in specials.items() if i in rank_ids}
        if clash:
            raise ValueError(f'{self.path}: special token ids collide with BPE ranks: {clash}')
        self._enc = tiktoken.Encoding(name or os.path.basename(self.path), pat_str=pat_str,
                                      mergeable_ranks=ranks, special_tokens=specials)
        self._ranks = ranks
        self.special_tokens = specials
        self._special_ids = set(specials.values())
        self._rank_ids = set(ranks.values())
        self._special_in_text = special_in_text
        natural = max([*ranks.values(), *specials.values()]) + 1
        if vocab_size is not None and vocab_size < natural:
            raise ValueError(f'vocab_size={vocab_size} < the largest token id + 1 ({natural})')
        self.vocab_size = int(vocab_size or natural)
        self.bos_id = self._named(bos_token)
        self.eos_id = self._named(eos_token)
        self.pad_id = self._named(pad_token)

    def _named(self, token: str | None) -> int:
        if token is None:
            return -1
        tid = self.token_to_id(token)
        return -1 if tid is None else tid

    @classmethod
    def from_encoding(cls, encoding_name: str = 'cl100k_base', **kwargs) -> 'TiktokenTokenizer':
        """The ranks and regex of one of tiktoken's registered encodings (tiktoken downloads the file on first
        use, or reads it from TIKTOKEN_CACHE_DIR). Special tokens: the encoding's own plus `special_tokens`;
        by default, for cl100k_base, DBRX's."""
        import tiktoken  # pylint: disable=import-outside-toplevel
        enc = tiktoken.get_encoding(encoding_name)
        extra = kwargs.pop('special_tokens', None)
        if extra is None and encoding_name == 'cl100k_base':
            extra = DBRX_SPECIAL_TOKENS
        kwargs['special_tokens'] = {**enc._special_tokens, **(extra or {})}  # pylint: disable=protected-access
        kwargs.setdefault('pat_str', enc._pat_str)  # pylint: disable=protected-access
        kwargs.setdefault('name', encoding_name)
        return cls(enc._mergeable_ranks, **kwargs)  # pylint: disable=protected-access

    @classmethod
    def from_folder(cls, folder: str, **kwargs) -> 'TiktokenTokenizer':
        """The single *.tiktoken file of `folder`; specials from tokenizer_config.json's added_tokens_decoder
        (and bos/eos/pad_token there) when present, else DBRX's. Without a *.tiktoken file, the encoding named
        by tokenizer_config.json's encoding_name / model_name (llm-foundry's TiktokenTokenizerWrapper)."""
        kwargs = {**config_kwargs(folder), **kwargs}
        files = sorted(f for f in os.listdir(folder) if f.endswith('.tiktoken'))
        if len(files) == 1:
            return cls(os.path.join(folder, files[0]), **kwargs)
        if files:
            raise FileNotFoundError(f'expected one *.tiktoken file in {folder}, found {files}')
        encoding = tiktoken_encoding_name(folder)
        if encoding is None:
            raise FileNotFoundError(f'no *.tiktoken file in {folder} and no encoding_name/model_name in its '
                                    f'tokenizer_config.json')
        return cls.from_encoding(encoding, **kwargs)

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token, or of text that is exactly one BPE token; None otherwise."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self._ranks.get(token.encode('utf-8'))

    def encode(self, text: str) -> list[int]:
        if self._special_in_text:
            return self._enc.encode(text, allowed_special='all')
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens are dropped (the Tokenizer contract), and so are ids that name no token (padding rows).
        keep = [int(i) for i in ids if int(i) in self._rank_ids]
        return self._enc.decode(keep, errors='replace')

    def decode_with_special(self, ids: Sequence[int]) -> str:
        """Like decode, but special tokens are kept as their text (for showing chat transcripts)."""
        return self._enc.decode([int(i) for i in ids if int(i) in self._rank_ids or int(i) in self._special_ids],
                                errors='replace')

    def _compute_token_bytes(self) -> np.ndarray:
        out = np.zeros([self.vocab_size], np.int32)
        for token, rank in self._ranks.items():
            out[rank] = len(token)
        return out


def _tokenizer_config(folder: str) -> dict:
    path = os.path.join(folder, 'tokenizer_config.json')
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def config_kwargs(folder: str) -> dict:
    """TiktokenTokenizer arguments from tokenizer_config.json: special tokens and bos/eos/pad names."""
    cfg = _tokenizer_config(folder)
    kwargs = {}
    added = cfg.get('added_tokens_decoder') or {}
    if added:
        kwargs['special_tokens'] = {v['content']: int(k) for k, v in added.items()}
    for key in ('bos_token', 'eos_token', 'pad_token'):
        if key in cfg:
            v = cfg[key]
            kwargs[key] = v.get('content') if isinstance(v, dict) else v
    return kwargs


def tiktoken_encoding_name(folder: str) -> str | None:
    """tiktoken encoding named by tokenizer_config.json (encoding_name, or model_name such as 'gpt-4')."""
    cfg = _tokenizer_config(folder)
    if cfg.get('encoding_name'):
        return cfg['encoding_name']
    if cfg.get('model_name'):
        import tiktoken  # pylint: disable=import-outside-toplevel
        try:
            return tiktoken.encoding_name_for_model(cfg['model_name'])
        except KeyError:
            return None
    return None
