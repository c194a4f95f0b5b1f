"""TiktokenTokenizer on a tiny BPE file written here (the cl100k file cannot be downloaded in tests)."""
import json
import os

import numpy as np
import pytest

from mosaicjax.checkpoints import hf_folder
from mosaicjax.data import tiktoken_tokenizer as tt

pytest.importorskip('tiktoken')

# 256 single bytes, then merges (each a concatenation of two earlier tokens, in merge order).
MERGES = [b'he', b'll', b'hell', b'hello', b' w', b'or', b' wor', b'ld', b' world', b'in', b'def', b' ', b'  ']
SPECIALS = {'<|endoftext|>': 300, '<|pad|>': 301, '<|im_start|>': 302, '<|im_end|>': 303}


def _ranks():
    ranks = {bytes([b]): b for b in range(256)}
    for m in MERGES:
        if m not in ranks:
            ranks[m] = len(ranks)
    return ranks


@pytest.fixture
def bpe_file(tmp_path):
    path = str(tmp_path / 'tiny.tiktoken')
    tt.write_bpe_file(_ranks(), path)
    return path


def test_bpe_file_round_trip(bpe_file):
    assert tt.read_bpe_file(bpe_file) == _ranks()
    with open(bpe_file, 'rb') as f:
        first = f.readline()
    assert first == b'AA== 0\n'  # base64 of b'\x00', rank 0: the cl100k_base.tiktoken format


def test_encode_decode_round_trip(bpe_file):
    tok = tt.TiktokenTokenizer(bpe_file, SPECIALS)
    r = _ranks()
    assert tok.encode('hello world') == [r[b'hello'], r[b' world']]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (304, 300, 300, 301)
    for text in ['hello world', 'def f():\n    return "héllo" + ω', '', '🙂 emoji\tand\r\nnewlines', 'x' * 50]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert int(tok.token_bytes()[ids].sum()) == len(text.encode('utf-8'))  # bits-per-byte accounting


def test_special_tokens(bpe_file):
    tok = tt.TiktokenTokenizer(bpe_file, SPECIALS)
    ids = tok.encode('<|im_start|>user\nhello<|im_end|>')
    assert ids[0] == 302 and ids[-1] == 303 and _ranks()[b'hello'] in ids
    assert tok.decode(ids) == 'user\nhello'  # specials dropped, as every mosaicjax tokenizer does
    assert tok.decode_with_special(ids) == '<|im_start|>user\nhello<|im_end|>'
    assert tok.token_to_id('<|im_end|>') == 303 and tok.token_to_id('hello') == _ranks()[b'hello']
    assert tok.token_to_id('not one token') is None
    assert tok.token_bytes()[300:].tolist() == [0, 0, 0, 0]
    literal = tt.TiktokenTokenizer(bpe_file, SPECIALS, special_in_text=False)
    ids = literal.encode('<|endoftext|>')
    assert 300 not in ids and literal.decode(ids) == '<|endoftext|>'


def test_vocab_padding_and_errors(bpe_file, tmp_path):
    tok = tt.TiktokenTokenizer(bpe_file, SPECIALS, vocab_size=384, pad_token=None)
    assert tok.vocab_size == 384 and tok.token_bytes().shape == (384,) and tok.pad_id == -1
    assert tok.decode([_ranks()[b'hello'], 350, 383]) == 'hello'  # padding ids name no token
    with pytest.raises(ValueError, match='vocab_size'):
        tt.TiktokenTokenizer(bpe_file, SPECIALS, vocab_size=300)
    with pytest.raises(ValueError, match='collide'):
        tt.TiktokenTokenizer(bpe_file, {'<|endoftext|>': 10})
    bad = tmp_path / 'bad.tiktoken'
    bad.write_bytes(b'AA== 0\nnot-base64!! 1\n')
    with pytest.raises(ValueError, match='bad.tiktoken:2'):
        tt.read_bpe_file(str(bad))


def test_dbrx_special_token_ids():
    # databricks/dbrx-* tokenizer_config.json added_tokens_decoder, on top of cl100k_base's own specials.
    d = tt.DBRX_SPECIAL_TOKENS
    assert (d['<|endoftext|>'], d['<|pad|>'], d['<|im_start|>'], d['<|im_end|>']) == (100257, 100277, 100278, 100279)
    assert (d['<|fim_prefix|>'], d['<|fim_middle|>'], d['<|fim_suffix|>'], d['<|endofprompt|>']) == (
        100258, 100259, 100260, 100276)
    assert max(d.values()) < tt.DBRX_VOCAB_SIZE == 100352


def test_folder_with_tokenizer_config(bpe_file, tmp_path):
    folder = os.path.dirname(bpe_file)
    added = {str(i): {'content': t, 'special': True} for t, i in SPECIALS.items()}
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
        json.dump({'added_tokens_decoder': added, 'eos_token': '<|im_end|>', 'pad_token': '<|pad|>',
                   'bos_token': None}, f)
    tok = hf_folder.load_tokenizer(folder)  # how load_lm finds a tiktoken tokenizer in a model folder
    assert isinstance(tok, tt.TiktokenTokenizer)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (303, 301, -1)
    assert tok.special_tokens == SPECIALS
    np.testing.assert_array_equal(tok.encode('hello'), [_ranks()[b'hello']])


def test_named_encoding_as_dbrx_first_shipped(tmp_path, monkeypatch):
    # databricks/dbrx-* first shipped no tokenizer file: tokenizer_config.json says model_name 'gpt-4' and
    # llm-foundry's wrapper fetched cl100k_base through tiktoken. Here tiktoken's registry is faked.
    import tiktoken
    fake = tiktoken.Encoding('cl100k_base', pat_str=tt.CL100K_PATTERN, mergeable_ranks=_ranks(),
                             special_tokens={'<|endoftext|>': 300})
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: fake if name == 'cl100k_base' else None)
    added = {'300': {'content': '<|endoftext|>'}, '301': {'content': '<|pad|>'},
             '302': {'content': '<|im_start|>'}, '303': {'content': '<|im_end|>'}}
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
        {'model_name': 'gpt-4', 'added_tokens_decoder': added, 'eos_token': '<|endoftext|>', 'pad_token': '<|pad|>'}))
    tok = hf_folder.load_tokenizer(str(tmp_path))
    assert isinstance(tok, tt.TiktokenTokenizer)
    assert tok.special_tokens == SPECIALS and (tok.eos_id, tok.pad_id) == (300, 301)
    assert tok.decode(tok.encode('hello world')) == 'hello world'
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'model_name': 'no-such-model'}))
    assert hf_folder.load_tokenizer(str(tmp_path)) is None
