"""Request bodies of the OpenAI-compatible endpoints (pydantic v2).

Every model accepts unknown fields (extra='allow'): SDK versions and harnesses send fields we do not use
(user, service_tier, ...). Types are checked strictly enough that a wrong type is a 400 naming the field, never a
crash later. Ranges follow OpenAI's documented limits where they have one.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

_MAX_N = 16
_MAX_STOP = 4


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Request):
    include_usage: Optional[StrictBool] = None


class _Sampling(_Request):
    """Sampling fields shared by chat and completions."""
    model: StrictStr
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[StrictInt] = Field(None, ge=-1)  # vLLM's extra; -1 / 0 = off
    n: StrictInt = Field(1, ge=1, le=_MAX_N)
    seed: Optional[StrictInt] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: Optional[StrictBool] = False  # vLLM's extra: EOS / stop token ids do not end the completion
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)  # accepted, not applied
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)  # accepted, not applied

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > _MAX_STOP:
            raise ValueError(f"at most {_MAX_STOP} stop sequences")
        if any(not s for s in v):
            raise ValueError("stop sequences must be non-empty")
        return v

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, v):
        if v is not None and not -2**63 <= v < 2**64:
            raise ValueError("seed must fit in 64 bits")
        return v


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Optional[Union[StrictStr, list[dict[str, Any]]]] = None
    name: Optional[StrictStr] = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    # str | list[str] | list[int] | list[list[int]]; checked in _check_prompt (pydantic's union errors are opaque).
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    max_tokens: Optional[StrictInt] = Field(16, ge=0)
    echo: Optional[StrictBool] = False
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    suffix: Optional[StrictStr] = None
    best_of: Optional[StrictInt] = Field(None, ge=1, le=1)  # only 1 (n>1 gives independent choices)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    def prompts(self) -> list:
        """The prompts as a list of str or of token-id lists (one choice each, in this order)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class ImageGenerationRequest(_Request):
    prompt: StrictStr = Field(..., min_length=1, max_length=32000)
    model: Optional[StrictStr] = None
    n: Optional[StrictInt] = Field(1, ge=1, le=10)
    size: Optional[StrictStr] = None
    response_format: Optional[Literal["b64_json", "url"]] = "b64_json"
    negative_prompt: Optional[StrictStr] = None
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63)
    num_inference_steps: Optional[StrictInt] = Field(None, ge=1, le=200)
    guidance_scale: Optional[float] = Field(None, ge=0.0, le=50.0)
    scheduler: Optional[StrictStr] = None
    quality: Optional[StrictStr] = None  # accepted, ignored (OpenAI's DALL-E field)
    style: Optional[StrictStr] = None


class TokenizeRequest(_Request):
    model: Optional[StrictStr] = None
    prompt: Optional[StrictStr] = None
    messages: Optional[list[ChatMessage]] = None
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Request):
    model: Optional[StrictStr] = None
    tokens: list[StrictInt]


class TokenizerInfoRequest(_Request):
    model: Optional[StrictStr] = None
