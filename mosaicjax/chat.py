"""Chat prompts: a checkpoint's own jinja chat template, ChatML, or a plain-text fallback; and stop tokens.

Which format a model gets (`ChatFormat(tokenizer, chat_template)`):
  1. the folder's chat template (tokenizer_config.json "chat_template" or chat_template.jinja), rendered with
     transformers' semantics: a sandboxed jinja2 environment with trim_blocks and lstrip_blocks, the loopcontrols
     extension, `raise_exception`, `strftime_now`, a `tojson` filter that does not HTML-escape, and the
     variables messages, add_generation_prompt, bos_token, eos_token, pad_token, unk_token (plus extra kwargs);
  2. ChatML when the tokenizer has <|im_start|> and <|im_end|> as single tokens (DBRX-instruct's format):
         <|im_start|>system\\nYou are...<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n
  3. otherwise plain text ("User: Hi\\n\\nAssistant:"), for models trained without chat tokens; its stop
     strings end a turn where the model starts writing the next speaker.
Generation stops at `stop_token_ids`: <|im_end|> and <|endoftext|> when present, and the tokenizer's EOS.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Mapping, Sequence

IM_START, IM_END, END_OF_TEXT = '<|im_start|>', '<|im_end|>', '<|endoftext|>'
_STOP_TOKENS = (IM_END, END_OF_TEXT)
_PLAIN_ROLES = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}

Message = Mapping[str, Any]


def format_chatml(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then `<|im_start|>assistant\\n`."""
    text = ''.join(f'{IM_START}{m["role"]}\n{_content(m)}{IM_END}\n' for m in messages)
    return text + (f'{IM_START}assistant\n' if add_generation_prompt else '')


def format_plain(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """`Role: content` turns separated by blank lines, ending with `Assistant:` (no special tokens needed)."""
    turns = [f'{_PLAIN_ROLES.get(m["role"], str(m["role"]).capitalize())}: {_content(m)}' for m in messages]
    if add_generation_prompt:
        turns.append('Assistant:')
    return '\n\n'.join(turns)


def _content(m: Message) -> str:
    c = m.get('content')
    if c is None:
        return ''
    if isinstance(c, str):
        return c
    # OpenAI-style content parts: keep the text parts.
    return ''.join(p.get('text', '') for p in c if isinstance(p, Mapping) and p.get('type', 'text') == 'text')


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    try:
        import jinja2  # pylint: disable=import-outside-toplevel
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError('chat templates need jinja2: pip install "jinja2>=3.1.6"') from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes '<', '>' and '&', which would change the prompt.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # Templates come from downloaded folders: the sandbox keeps them from reaching Python internals.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=['jinja2.ext.loopcontrols'])
    env.filters['tojson'] = tojson
    env.globals['raise_exception'] = raise_exception
    env.globals['strftime_now'] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_template(template: str, messages: Sequence[Message], add_generation_prompt: bool = True,
                    **context) -> str:
    """Renders a Hugging Face chat template (see the module docstring for what the template can see)."""
    return _compile(template).render(messages=[dict(m) for m in messages],
                                     add_generation_prompt=add_generation_prompt, **context)


def token_id(tokenizer, token: str) -> int | None:
    """Id of `token` when the tokenizer has it as one token, else None (works for all mosaicjax tokenizers)."""
    if tokenizer is None:
        return None
    if hasattr(tokenizer, 'token_to_id'):
        return tokenizer.token_to_id(token)
    hf = getattr(tokenizer, '_tok', None)  # HFTokenizer wraps a tokenizers.Tokenizer
    if hf is not None:
        return hf.token_to_id(token)
    sp = getattr(tokenizer, '_sp', None)  # SentencePieceTokenizer
    if sp is not None:
        i = sp.piece_to_id(token)
        return None if i == sp.unk_id() and token != sp.id_to_piece(i) else int(i)
    ids = tokenizer.encode(token)
    return ids[0] if len(ids) == 1 else None


def has_chatml(tokenizer) -> bool:
    return token_id(tokenizer, IM_START) is not None and token_id(tokenizer, IM_END) is not None


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an assistant turn: <|im_end|>, <|endoftext|> (when single tokens) and the EOS id."""
    ids = [token_id(tokenizer, t) for t in _STOP_TOKENS]
    eos = getattr(tokenizer, 'eos_id', -1)
    ids.append(eos if eos is not None and eos >= 0 else None)
    out: list[int] = []
    for i in ids:
        if i is not None and i not in out:
            out.append(int(i))
    return out


def _token_text(tokenizer, attr: str, default: str | None) -> str:
    """Text of the tokenizer's bos/eos/pad/unk token for the template's `bos_token` etc. variables."""
    names = getattr(tokenizer, 'special_token_names', None)
    if isinstance(names, Mapping) and names.get(attr):
        return names[attr]
    i = getattr(tokenizer, f'{attr}_id', -1)
    specials = getattr(tokenizer, 'special_tokens', None)  # TiktokenTokenizer: {text: id}
    if isinstance(specials, Mapping) and i is not None and i >= 0:
        for text, tid in specials.items():
            if tid == i:
                return text
    hf = getattr(tokenizer, '_tok', None)
    if hf is not None and i is not None and i >= 0:
        return hf.id_to_token(i) or ''
    sp = getattr(tokenizer, '_sp', None)
    if sp is not None and i is not None and i >= 0:
        return sp.id_to_piece(i)
    return default or ''


class ChatFormat:
    """How one model turns messages into a prompt, and which tokens end its turn."""

    def __init__(self, tokenizer, chat_template: str | None = None, *, template_vars: Mapping | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        if chat_template:
            self.style = 'template'
        elif has_chatml(tokenizer):
            self.style = 'chatml'
        else:
            self.style = 'plain'
        self.stop_token_ids = stop_token_ids(tokenizer) if tokenizer is not None else []
        # Plain text has no end-of-turn token: a new speaker's label ends the turn.
        self.stop_strings = ['\n\nUser:', '\n\nSystem:'] if self.style == 'plain' else []
        self._vars = {k: _token_text(tokenizer, k.split('_')[0], None)
                      for k in ('bos_token', 'eos_token', 'pad_token', 'unk_token')}
        self._vars.update(template_vars or {})

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True, **context) -> str:
        if not messages:
            raise ValueError('a chat needs at least one message')
        for m in messages:
            if not isinstance(m, Mapping) or 'role' not in m:
                raise ValueError(f'each message must be a dict with "role" and "content", got {m!r}')
        if self.style == 'template':
            return render_template(self.chat_template, messages, add_generation_prompt, **{**self._vars, **context})
        if self.style == 'chatml':
            return format_chatml(messages, add_generation_prompt)
        return format_plain(messages, add_generation_prompt)

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = True, **context) -> list[int]:
        """Token ids of the rendered prompt (special tokens written in it become their ids)."""
        return self.tokenizer.encode(self.render(messages, add_generation_prompt, **context))
