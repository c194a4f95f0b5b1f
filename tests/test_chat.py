"""Chat prompts: exact ChatML strings, jinja templates rendered as transformers does, stop ids, fallbacks."""
import os
import sys

import pytest

from mosaicjax import chat
from mosaicjax.data import tokenizers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'checkpoints'))
import lm_fixtures  # noqa: E402  pylint: disable=wrong-import-position

MESSAGES = [{'role': 'system', 'content': 'You are terse.'}, {'role': 'user', 'content': 'Hi'},
            {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': 'Name <3 things & more'}]

# DBRX-instruct's template shape (llm-foundry's ChatML with a default system prompt and eos after assistant).
DBRX_STYLE_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = 'You are DBRX.' %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 %}"
    "{{ '<|im_start|>system\n' + system_message.strip() + '<|im_end|>\n'}}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if loop.last and add_generation_prompt %}{{ '\n<|im_start|>assistant\n' }}"
    "{% elif not loop.last %}{{ '\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")
# Exercises trim_blocks/lstrip_blocks, loop controls, tojson (no HTML escaping) and namespace.
WHITESPACE_TEMPLATE = """{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m['role'] == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    [{{ ns.n }}] {{ m['role'] }}: {{ m['content'] | tojson }}
{% endfor %}
{% if add_generation_prompt %}
    [{{ ns.n + 1 }}] assistant:
{% endif %}"""


@pytest.fixture(scope='module')
def hf_tok(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('tok'))
    lm_fixtures.write_tokenizer(folder, chat_template=None)
    return folder, tokenizers.HFTokenizer(folder)


def test_chatml_exact_strings():
    assert chat.format_chatml(MESSAGES) == (
        '<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
        '<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nName <3 things & more<|im_end|>\n'
        '<|im_start|>assistant\n')
    assert chat.format_chatml(MESSAGES[1:2], add_generation_prompt=False) == '<|im_start|>user\nHi<|im_end|>\n'
    parts = [{'role': 'user', 'content': [{'type': 'text', 'text': 'a'}, {'type': 'text', 'text': 'b'}]}]
    assert chat.format_chatml(parts) == '<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n'


def test_chatml_with_a_dbrx_style_tokenizer(hf_tok):
    _, tok = hf_tok
    fmt = chat.ChatFormat(tok)
    assert fmt.style == 'chatml'
    assert fmt.render(MESSAGES) == chat.format_chatml(MESSAGES)
    ids = fmt.encode(MESSAGES[1:2])
    im_start, im_end, eot = (tok._tok.token_to_id(t) for t in ('<|im_start|>', '<|im_end|>', '<|endoftext|>'))
    assert ids[0] == im_start and ids.count(im_start) == 2 and ids.count(im_end) == 1
    assert tok.decode(ids) == 'user\nHi\nassistant\n'
    assert fmt.stop_token_ids == [im_end, eot]  # EOS is <|endoftext|>: listed once
    assert fmt.stop_strings == []


@pytest.mark.parametrize('template', [DBRX_STYLE_TEMPLATE, WHITESPACE_TEMPLATE, lm_fixtures.CHAT_TEMPLATE],
                         ids=['dbrx_style', 'whitespace', 'chatml'])
@pytest.mark.parametrize('gen', [True, False])
def test_templates_render_like_transformers(hf_tok, template, gen):
    transformers = pytest.importorskip('transformers')
    folder, tok = hf_tok
    ref_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(folder, 'tokenizer.json'), eos_token='<|endoftext|>', bos_token='<|endoftext|>',
        pad_token='<|pad|>')
    for messages in (MESSAGES, MESSAGES[1:]):
        want = ref_tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                           add_generation_prompt=gen)
        fmt = chat.ChatFormat(tok, template)
        assert fmt.style == 'template'
        assert fmt.render(messages, add_generation_prompt=gen) == want


def test_template_errors_and_context(hf_tok):
    _, tok = hf_tok
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}ok"
    fmt = chat.ChatFormat(tok, strict)
    assert fmt.render(MESSAGES[1:]) == 'ok'
    import jinja2
    with pytest.raises(jinja2.exceptions.TemplateError, match='must start with user'):
        fmt.render(MESSAGES)
    extra = chat.ChatFormat(tok, '{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ greeting }}')
    assert extra.render(MESSAGES, greeting='hey') == '<|endoftext|>|<|endoftext|>|<|pad|>|hey'
    sandboxed = chat.ChatFormat(tok, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        sandboxed.render(MESSAGES)
    with pytest.raises(ValueError):
        fmt.render([])


def test_plain_text_fallback_without_chatml_tokens(tmp_path):
    texts = ['User: hello there\nAssistant: hi\n' * 20, 'def f(x):\n    return x\n' * 20]
    model = tokenizers.train_sentencepiece(texts, str(tmp_path / 'sp'), vocab_size=300)
    tok = tokenizers.SentencePieceTokenizer(model)
    assert not chat.has_chatml(tok)
    fmt = chat.ChatFormat(tok)
    assert fmt.style == 'plain'
    assert fmt.render(MESSAGES) == ('System: You are terse.\n\nUser: Hi\n\nAssistant: Hello.\n\n'
                                    'User: Name <3 things & more\n\nAssistant:')
    assert fmt.stop_token_ids == [tok.eos_id] and '\n\nUser:' in fmt.stop_strings
    assert tok.decode(fmt.encode(MESSAGES[1:2])) == 'User: Hi\n\nAssistant:'


def test_tiktoken_tokenizer_gets_chatml(tmp_path):
    pytest.importorskip('tiktoken')
    from mosaicjax.data import tiktoken_tokenizer as tt
    ranks = {bytes([b]): b for b in range(256)}
    tt.write_bpe_file(ranks, str(tmp_path / 'bytes.tiktoken'))
    tok = tt.TiktokenTokenizer(str(tmp_path / 'bytes.tiktoken'),
                               {'<|endoftext|>': 256, '<|pad|>': 257, '<|im_start|>': 258, '<|im_end|>': 259})
    fmt = chat.ChatFormat(tok)
    assert fmt.style == 'chatml' and fmt.stop_token_ids == [259, 256]
    ids = fmt.encode(MESSAGES[1:2])
    assert ids[0] == 258 and ids[-len('assistant\n') - 1] == 258
    assert tok.decode_with_special(ids) == chat.format_chatml(MESSAGES[1:2])
