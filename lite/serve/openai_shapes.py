"""OpenAI's API shapes: request validation (a clear 400 naming the parameter) and the response records."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lite.sampling import SamplingParams

MAX_STOPS = 16


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 500: "server_error"}

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.type = self.TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class GenerationRequest:
    """One validated request: a chat (`messages`) or a raw completion (`prompt`: text or token ids)."""

    kind: str  # "chat" or "completion"
    messages: list[dict[str, str]] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None  # None: the server's --max-tokens
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams field -> value

    def params(self, defaults: SamplingParams) -> SamplingParams:
        """The server's sampling defaults (and --seed) with this request's values on top."""
        return dataclasses.replace(defaults, **self.sampling, seed=defaults.seed if self.seed is None else self.seed)


# body key -> (SamplingParams field, low, high, integer); top_k, min_p and repeat_penalty as llama.cpp's server
NUMBERS = {
    "temperature": ("temperature", 0.0, 2.0, False),
    "top_p": ("top_p", 0.0, 1.0, False),
    "frequency_penalty": ("frequency_penalty", -2.0, 2.0, False),
    "presence_penalty": ("presence_penalty", -2.0, 2.0, False),
    "top_k": ("top_k", 0, math.inf, True),
    "min_p": ("min_p", 0.0, 1.0, False),
    "repeat_penalty": ("repeat_penalty", 1e-6, math.inf, False),
}
# parameters lite does not implement: a 400 naming them unless they hold the value that means "off"
UNSUPPORTED = {
    "tools": "tool calls are not supported",
    "functions": "function calls are not supported",
    "function_call": "function calls are not supported",
    "tool_choice": "tool calls are not supported",
    "logit_bias": "logit_bias is not supported",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "suffix": "suffix (insertion) is not supported",
    "echo": "echo is not supported",
}
OFF_VALUES: tuple[Any, ...] = (None, False, 0, "none", "auto", [], {})


def number(body: dict[str, Any], key: str, low: float, high: float, integer: bool) -> float | int | None:
    value = body.get(key)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise bad(key, f"{key} must be {kind}, got {value!r}", "invalid_type")
    if math.isnan(value) or not low <= value <= high:
        bounds = f">= {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
        raise bad(key, f"{key} must be {bounds}, got {value!r}")
    return value


def common_fields(body: Any, kind: str) -> GenerationRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    for key, why in UNSUPPORTED.items():
        if body.get(key) not in OFF_VALUES:
            raise bad(key, f"{key}: {why} by this server; remove the parameter", "unsupported_parameter")
    n = body.get("n")
    if n is not None and (n != 1 or isinstance(n, bool)):
        raise bad("n", f"n must be 1 (one choice per request), got {n!r}", "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise bad("best_of", "best_of must be 1", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("response_format", "response_format: only {'type': 'text'} is supported", "unsupported_parameter")
    req = GenerationRequest(kind)
    for key, (name, low, high, integer) in NUMBERS.items():
        value = number(body, key, low, high, integer)
        if value is not None:
            req.sampling[name] = int(value) if integer else float(value)
    for key in ("max_completion_tokens", "max_tokens"):  # the newer name wins when both are given
        value = number(body, key, 1, math.inf, True)
        if value is not None:
            req.max_tokens = int(value)
            break
    seed = number(body, "seed", -math.inf, math.inf, True)
    req.seed = None if seed is None else int(seed) % 2**63
    req.stop = stops(body.get("stop"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("stream", f"stream must be true or false, got {stream!r}", "invalid_type")
    req.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not req.stream:
            raise bad("stream_options", "stream_options is only allowed with stream: true")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise bad("stream_options", "stream_options must be an object such as {'include_usage': true}")
        req.include_usage = bool(options.get("include_usage", False))
    return req


def stops(value: Any) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad("stop", "stop must be a non-empty string or a list of non-empty strings", "invalid_type")
    if len(items) > MAX_STOPS:
        raise bad("stop", f"stop takes at most {MAX_STOPS} sequences, got {len(items)}")
    return list(items)


def content_text(content: Any, param: str) -> str:
    """A message's content: a string, or a list of text parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(param, f"{param}: only text content parts are supported", "unsupported_content")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(param, f"{param} must be a string or a list of text parts", "invalid_type")


def parse_chat(body: Any) -> GenerationRequest:
    req = common_fields(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects", "missing_required")
    req.messages = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object with role and content", "invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(
                f"messages[{i}].role", f"messages[{i}].role must be system, user or assistant, got {role!r}",
                "unsupported_role" if role in ("tool", "function") else "invalid_value",
            )  # fmt: skip
        if m.get("tool_calls") not in OFF_VALUES:
            raise bad(f"messages[{i}].tool_calls", "tool calls are not supported", "unsupported_parameter")
        text = content_text(m.get("content"), f"messages[{i}].content")
        if role == "assistant":
            text = text.strip()  # as lite chat keeps its replies: the template adds its own separators
        req.messages.append({"role": "system" if role == "developer" else role, "content": text})
    return req


def parse_completion(body: Any) -> GenerationRequest:
    req = common_fields(body, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        req.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        req.prompt = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("prompt", "one prompt per request: batches of prompts are not supported", "unsupported_parameter")
    else:
        raise bad("prompt", "prompt must be a string or a list of token ids", "missing_required")
    return req


# -- responses -------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_record(
    req: GenerationRequest, rid: str, created: int, model: str, text: str, finish: str, use: dict[str, Any]
) -> dict[str, Any]:
    """The whole (non-streamed) response: a chat.completion or a text_completion."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        obj = "chat.completion"
    else:
        choice, obj = {"index": 0, "text": text, "logprobs": None}, "text_completion"
    choice["finish_reason"] = finish
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": use}


def chunk_record(
    req: GenerationRequest,
    rid: str,
    created: int,
    model: str,
    text: str | None = None,
    finish: str | None = None,
    role: bool = False,
    use: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed chunk: text (and, in the first chat chunk, the role), a finish reason, or the usage alone."""
    if req.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    record: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model}
    record["choices"] = [] if use is not None else [choice]
    if req.include_usage:
        record["usage"] = use
    return record
