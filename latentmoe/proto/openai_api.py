"""The OpenAI-compatible HTTP wire format: request bodies in, the engine's types out, and back.

Plain Python, no server: ``parse_completion`` / ``parse_chat`` turn a raw body into what the
engine takes, raising ``ApiError`` (status, message, the offending parameter) for anything a
client could get wrong; the ``*_response`` / ``*_chunk`` functions build OpenAI's JSON shapes.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from latentmoe.cluster.sampling_params import SamplingParams


class ApiError(Exception):
    """An error for the client, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                413: "invalid_request_error", 503: "server_overloaded"}.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def decode_body(raw: bytes, max_bytes: int) -> dict:
    """Bytes of a request body -> a JSON object, or the ``ApiError`` that says what is wrong with it."""
    if len(raw) > max_bytes:
        raise ApiError(413, f"request body is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8: {e}") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e}") from None
    except ValueError as e:  # NaN / Infinity: Python's json reads them, JSON (RFC 8259) has no such values
        raise bad_request(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, got {type(body).__name__}")
    return body


# OpenAI parameters we accept only at their neutral value (anything else would silently change results)
_NEUTRAL = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": None,
            "top_logprobs": None, "echo": False, "suffix": None, "logit_bias": None, "tools": None,
            "tool_choice": None, "response_format": None}
_IGNORED = {"user", "stream_options", "metadata", "store", "parallel_tool_calls", "service_tier"}


@dataclass
class ParsedRequest:
    model: str
    prompt: str | list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def _check_type(body: dict, name: str, types: tuple, what: str) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
        raise bad_request(f"{name} must be {what}, got {json.dumps(value)[:80]}", name)
    return value


def _sampling_params(body: dict, known: set[str],
                     default_max_tokens: int | None = None) -> tuple[SamplingParams, bool, bool]:
    unknown = sorted(set(body) - known - set(_NEUTRAL) - _IGNORED)
    if unknown:
        raise bad_request(f"unknown parameter(s) {unknown}", unknown[0])
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] not in (neutral, None) and not (name == "logprobs" and body[name] is False):
            raise bad_request(f"{name}={json.dumps(body[name])[:40]} is not supported (only {json.dumps(neutral)})",
                              name)
    max_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    fields = [("max_tokens", max_name, (int,), "an integer"), ("temperature", "temperature", (int, float), "a number"),
              ("top_p", "top_p", (int, float), "a number"), ("top_k", "top_k", (int,), "an integer"),
              ("seed", "seed", (int,), "an integer"), ("ignore_eos", "ignore_eos", (bool,), "a boolean"),
              ("stop_token_ids", "stop_token_ids", (list,), "a list of integers")]
    values = {} if default_max_tokens is None else {"max_tokens": default_max_tokens}
    for name, param, types, what in fields:
        value = _check_type(body, param, types, what)
        if value is not None:
            values[name] = value
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad_request("stop must be a string or a list of strings", "stop")
        values["stop"] = stop
    try:
        params = SamplingParams(**values)
    except ValueError as e:  # SamplingParams' messages start with the parameter's name
        name = str(e).split(" ", 1)[0]
        raise bad_request(str(e), max_name if name == "max_tokens" else name) from None
    stream = _check_type(body, "stream", (bool,), "a boolean") or False
    options = _check_type(body, "stream_options", (dict,), "an object") or {}
    return params, stream, bool(options.get("include_usage"))


_COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos",
           "stop_token_ids", "stop", "stream"}


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required (a string; see GET /v1/models)", "model")
    return model


def parse_completion(body: dict) -> ParsedRequest:
    """``POST /v1/completions``: one prompt, as text or token ids."""
    model = _model(body)
    if "prompt" not in body:
        raise bad_request("prompt is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request("batched prompts are not supported: send one prompt per request", "prompt")
    if not isinstance(prompt, (str, list)) or (
            isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        raise bad_request("prompt must be a string or a list of token ids", "prompt")
    params, stream, include_usage = _sampling_params(body, _COMMON | {"prompt"})
    return ParsedRequest(model, prompt, params, stream, include_usage, f"cmpl-{uuid.uuid4().hex}")


def parse_chat(body: dict, tokenizer, max_model_len: int) -> ParsedRequest:
    """``POST /v1/chat/completions``: messages rendered with the checkpoint's chat template.

    Without ``max_tokens`` a chat reply may run to the end of the context, as OpenAI's does."""
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a role", "messages")
        if m["role"] not in ("system", "user", "assistant", "developer"):
            raise bad_request(f"messages[{i}].role {m['role']!r} is not supported", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or a list of text parts", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        rendered.append({"role": role, "content": content})
    params, stream, include_usage = _sampling_params(body, _COMMON | {"messages"}, default_max_tokens=max_model_len)
    if tokenizer is None or tokenizer.chat_template is None:
        raise bad_request("this model has no chat template: use /v1/completions", "messages")
    prompt = tokenizer.apply_chat_template(rendered, add_generation_prompt=True)
    return ParsedRequest(model, prompt, params, stream, include_usage, f"chatcmpl-{uuid.uuid4().hex}")


def usage(out) -> dict:
    return {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens,
            "total_tokens": out.num_prompt_tokens + out.num_output_tokens}


def completion_response(req: ParsedRequest, out, created: int | None = None) -> dict:
    return {"id": req.request_id, "object": "text_completion", "created": created or int(time.time()),
            "model": req.model, "choices": [{"index": 0, "text": out.text, "finish_reason": out.finish_reason,
                                             "logprobs": None}], "usage": usage(out)}


def completion_chunk(req: ParsedRequest, out, created: int) -> dict:
    return {"id": req.request_id, "object": "text_completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "text": out.delta_text, "finish_reason": out.finish_reason if out.finished
                         else None, "logprobs": None}]}


def chat_response(req: ParsedRequest, out, created: int | None = None) -> dict:
    return {"id": req.request_id, "object": "chat.completion", "created": created or int(time.time()),
            "model": req.model, "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                                             "finish_reason": out.finish_reason, "logprobs": None}],
            "usage": usage(out)}


def chat_chunk(req: ParsedRequest, out, created: int, first: bool) -> dict:
    delta = {"role": "assistant", "content": out.delta_text} if first else {"content": out.delta_text}
    return {"id": req.request_id, "object": "chat.completion.chunk", "created": created, "model": req.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": out.finish_reason if out.finished else None,
                         "logprobs": None}]}


def usage_chunk(req: ParsedRequest, out, created: int, chat: bool) -> dict:
    return {"id": req.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": req.model, "choices": [], "usage": usage(out)}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
