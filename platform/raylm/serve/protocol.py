"""The OpenAI request format: request schemas and their validation.

Requests are validated in two steps before the engine sees them (serve/gate.py). Pydantic checks
what a request says on its own (types, ranges, NaN, negative numbers) and
`api_error_from_validation` turns its first error into the OpenAI error body naming the
parameter. What depends on the served model (its name, `serve.max_tokens_limit`) is checked by
`check_limits`. Responses are vLLM's own (its OpenAI server), so they are not built here.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

MAX_STOP_SEQUENCES = 4  # OpenAI's own limit
MAX_SEED = 2**63 - 1
# Prompts in one completions request: each is a full generation, so an unbounded list lets one
# request occupy a replica for minutes (10k prompts did, in tests/reliability).
MAX_PROMPTS = 32
MAX_N = 8  # choices per prompt: each is a sequence in the engine's batch

# Floats: ints are fine (temperature=1), strings, bools and NaN/inf are not.
Temperature = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, strict=True)
TopP = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, strict=True)


class APIError(Exception):
    """An error the API reports to the client in OpenAI's format (status, message, param, code)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return error_body(self.message, self.param, self.code, self.type)


def error_body(message: str, param: Optional[str] = None, code: Optional[str] = None,
               type_: str = "invalid_request_error") -> dict:
    """`{"error": {...}}` as OpenAI sends it; the client raises it as `openai.APIStatusError`."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions. Unknown fields are kept aside (the app
    refuses the few that would change the answer, like echo or logprobs) and otherwise ignored
    like OpenAI's optional extras (user, logit_bias, ...); supported ones are checked strictly."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: float = Temperature
    top_p: float = TopP
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[StrictInt] = Field(None, ge=0, le=MAX_SEED)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    n: StrictInt = Field(1, ge=1, le=MAX_N, description="Choices generated per prompt.")

    def stop_list(self) -> list[str]:
        """`stop` as a list; empty strings are rejected because they would match everywhere."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise APIError(400, f"stop: at most {MAX_STOP_SEQUENCES} sequences are allowed", "stop")
        if any(s == "" for s in stops):
            raise APIError(400, "stop: sequences must not be empty", "stop")
        return stops

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def logprobs_asked(self) -> tuple[Optional[str], int]:
        """(the parameter that asks for top-k log-probs per token, k)."""
        return None, 0


class CompletionRequest(_Sampling):
    """POST /v1/completions: a prompt (text, a list of texts, or token ids). `logprobs` (top-k per
    token) and `echo` (the prompt's own tokens and log-probs first) are what evaluation harnesses
    (lm-evaluation-harness `local-completions`) score answers with."""

    prompt: Union[StrictStr, list[StrictStr], list[StrictInt]]
    logprobs: Optional[StrictInt] = Field(None, ge=0)
    echo: StrictBool = False

    def logprobs_asked(self) -> tuple[Optional[str], int]:
        return "logprobs", self.logprobs or 0

    def prompts(self) -> list[Union[str, list[int]]]:
        """One entry per choice: a text or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise APIError(400, "prompt: must not be an empty list", "prompt")
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        if len(self.prompt) > MAX_PROMPTS:
            raise APIError(400, f"prompt: at most {MAX_PROMPTS} prompts per request (got {len(self.prompt)})",
                           "prompt", "invalid_value")
        return list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[TextPart], None] = None
    name: Optional[StrictStr] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions: a conversation; `max_completion_tokens` is the newer max_tokens."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0)

    def logprobs_asked(self) -> tuple[Optional[str], int]:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs=true", "top_logprobs", "invalid_value")
        return "top_logprobs", self.top_logprobs or 0

    def requested_max_tokens(self) -> Optional[int]:
        """What vLLM will generate at most: `max_completion_tokens` wins over `max_tokens` when both
        are set (vLLM's `build_tok_params`), so the gate must read it the same way."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def requested_max_tokens(req: _Sampling) -> Optional[int]:
    if isinstance(req, ChatCompletionRequest):
        return req.requested_max_tokens()
    return req.max_tokens


# ------------------------------------------------------------------ errors


# Pydantic puts the union branch it tried into an error's location ('str', 'list[int]', ...).
_UNION_TAG = re.compile(r"^(str|int|float|bool|none)$|\[|^(function|constrained|lax|json)-")
_MODEL_TAGS = {"TextPart", "ChatMessage", "StreamOptions"}


def _param_name(loc: tuple) -> Optional[str]:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'; union branch tags are dropped."""
    parts: list[str] = []
    for item in loc:
        if item == "body" and not parts:
            continue
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
            continue
        if not isinstance(item, str) or _UNION_TAG.search(item) or item in _MODEL_TAGS:
            continue
        parts.append(item)
    return ".".join(parts) or None


def api_error_from_validation(errors: list[dict[str, Any]]) -> APIError:
    """The first validation error as a 400 naming the parameter (the `openai` client shows it)."""
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first.get("type") in ("json_invalid", "json_type", "model_attributes_type", "model_type"):
        return APIError(400, "We could not parse the JSON body of your request: it must be a JSON object "
                        f"({first.get('msg', 'invalid JSON')}).", None, "invalid_json")
    param = _param_name(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    value = first.get("input")
    shown = json.dumps(value)[:80] if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    return APIError(400, f"Invalid value for '{param}': {first.get('msg', 'invalid')} (got {shown}).",
                    param, "invalid_value")


def parse_request(model: type[_Sampling], raw: bytes) -> Any:
    """Validate a JSON body; any problem becomes an `APIError` (400) naming the parameter."""
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as err:
        raise api_error_from_validation(err.errors(include_url=False)) from None


def check_limits(req: _Sampling, *, models: tuple[str, ...], max_tokens_limit: int,
                 max_logprobs: int = 0) -> Optional[int]:
    """Checks that need the served models: the name (404), this server's max_tokens and logprobs limits.
    Returns the requested max_tokens (None when the request leaves it to the server). The
    context length is checked by the engine, which tokenizes the prompt anyway."""
    if req.model not in models:
        raise APIError(404, f"The model '{req.model}' does not exist; this server serves "
                       f"{', '.join(repr(m) for m in models)}.", "model", "model_not_found")
    for param in ("max_completion_tokens", "max_tokens"):  # both: a small one must not hide a large one
        value = getattr(req, param, None)
        if value is not None and value > max_tokens_limit:
            raise APIError(400, f"{param}={value} exceeds this server's limit of {max_tokens_limit} "
                           "(serve.max_tokens_limit).", param, "invalid_value")
    asked = requested_max_tokens(req)
    name, logprobs = req.logprobs_asked()
    if logprobs > max_logprobs:
        raise APIError(400, f"{name}={logprobs} exceeds this server's limit of {max_logprobs} (serve.max_logprobs).",
                       name, "invalid_value")
    return asked


CHAT_TOKENS_PER_MESSAGE = 8  # a chat template's role markers and separators, per message and for the reply's header


def prompt_tokens_bound(req: _Sampling) -> list[int]:
    """A generous estimate of each prompt's tokens, made without the tokenizer (the edge has none):
    its UTF-8 bytes (a byte-level BPE token holds at least one byte) plus a few for special tokens
    and, in a chat, the template's markers. The per-key token limit reserves it at admission and
    settles on the usage the engine reports."""
    if isinstance(req, ChatCompletionRequest):
        return [sum(len(m.text().encode()) + CHAT_TOKENS_PER_MESSAGE for m in req.messages)
                + CHAT_TOKENS_PER_MESSAGE]
    return [len(p.encode()) + 2 if isinstance(p, str) else len(p) for p in req.prompts()]


def reject_unsupported(req: _Sampling, defaults: dict[str, tuple]) -> None:
    """Options this server does not offer are refused by name rather than silently ignored."""
    extra = req.model_extra or {}
    for name, allowed in defaults.items():
        if name in extra and extra[name] not in allowed:
            raise APIError(400, f"{name}: not supported by this server", name, "unsupported_parameter")
