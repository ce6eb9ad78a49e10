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

from latentmoe.engine.sampling_params import MAX_LOGPROBS, SamplingParams


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
_NEUTRAL = {"suffix": None, "tools": None, "tool_choice": None, "response_format": None}
_IGNORED = {"user", "metadata", "store", "parallel_tool_calls", "service_tier"}


@dataclass
class ParsedRequest:
    model: str
    prompts: list[str | list[int]]  # completions: one or a batch; chat: the rendered conversation
    params: SamplingParams
    stream: bool
    include_usage: bool
    chat: bool = False
    echo: bool = False  # completions: the prompt comes back before the text (with its logprobs)
    num_logprobs: int | None = None  # completions' logprobs, chat's top_logprobs (when logprobs is true)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def prompt(self) -> str | list[int]:
        return self.prompts[0]


def _check_type(body: dict, name: str, types: tuple, what: str) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
        raise bad_request(f"{name} must be {what}, got {json.dumps(value)[:80]}", name)
    return value


# (SamplingParams field, body field, JSON types, what the message says)
_FIELDS = [("temperature", "temperature", (int, float), "a number"), ("top_p", "top_p", (int, float), "a number"),
           ("top_k", "top_k", (int,), "an integer"), ("seed", "seed", (int,), "an integer"),
           ("ignore_eos", "ignore_eos", (bool,), "a boolean"),
           ("stop_token_ids", "stop_token_ids", (list,), "a list of integers"),
           ("n", "n", (int,), "an integer"), ("best_of", "best_of", (int,), "an integer"),
           ("presence_penalty", "presence_penalty", (int, float), "a number"),
           ("frequency_penalty", "frequency_penalty", (int, float), "a number"),
           ("repetition_penalty", "repetition_penalty", (int, float), "a number"),
           ("min_p", "min_p", (int, float), "a number"), ("min_tokens", "min_tokens", (int,), "an integer"),
           ("include_stop_str_in_output", "include_stop_str_in_output", (bool,), "a boolean"),
           ("skip_special_tokens", "skip_special_tokens", (bool,), "a boolean")]


def _logit_bias(body: dict) -> dict[int, float] | None:
    bias = _check_type(body, "logit_bias", (dict,), "an object of token id -> bias")
    if bias is None:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad_request(f"logit_bias keys must be token ids, got {json.dumps(key)[:40]}", "logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_request(f"logit_bias values must be numbers, got {json.dumps(value)[:40]}", "logit_bias")
        out[token] = float(value)
    return out


def _sampling_params(body: dict, known: set[str], chat: bool,
                     default_max_tokens: int | None = None) -> tuple[SamplingParams, bool, bool, bool, int | None]:
    """-> (params, stream, include_usage, echo, number of top logprobs or None)."""
    unknown = sorted(set(body) - known - set(_NEUTRAL) - _IGNORED)
    if unknown:
        raise bad_request(f"unknown parameter(s) {unknown}", unknown[0])
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] not in (neutral, None):
            raise bad_request(f"{name}={json.dumps(body[name])[:40]} is not supported (only {json.dumps(neutral)})",
                              name)
    max_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    values = {} if default_max_tokens is None else {"max_tokens": default_max_tokens}
    max_tokens = _check_type(body, max_name, (int,), "an integer")
    if max_tokens is not None:
        values["max_tokens"] = max_tokens
    for name, param, types, what in _FIELDS:
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
    bias = _logit_bias(body)
    if bias:
        values["logit_bias"] = bias
    if chat:
        echo = False
        wanted = _check_type(body, "logprobs", (bool,), "a boolean")
        top = _check_type(body, "top_logprobs", (int,), "an integer")
        if top is not None and not wanted:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        num_logprobs = (top or 0) if wanted else None
        if num_logprobs is not None and not 0 <= num_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {num_logprobs}",
                              "top_logprobs")
    else:
        echo = bool(_check_type(body, "echo", (bool,), "a boolean"))
        num_logprobs = _check_type(body, "logprobs", (int,), "an integer")
        if num_logprobs is not None and not 0 <= num_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {num_logprobs}", "logprobs")
    if num_logprobs is not None:
        values["logprobs"] = num_logprobs
    if echo and (num_logprobs is not None or values.get("max_tokens") == 0):
        values["prompt_logprobs"] = num_logprobs or 0  # max_tokens 0 + echo: the prompt is run, nothing else
    if values.get("max_tokens") == 0 and not echo:
        raise bad_request(f"{max_name} must be at least 1 (0 only with echo)", max_name)
    try:
        params = SamplingParams(**values)
    except ValueError as e:  # SamplingParams' messages start with the parameter's name
        name = str(e).split(" ", 1)[0]
        raise bad_request(str(e), max_name if name == "max_tokens" else name) from None
    stream = _check_type(body, "stream", (bool,), "a boolean") or False
    options = _check_type(body, "stream_options", (dict,), "an object")
    if options is not None:
        if not stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")
        extra = sorted(set(options) - {"include_usage", "continuous_usage_stats"})
        if extra:
            raise bad_request(f"unknown stream_options {extra}", "stream_options")
        if not isinstance(options.get("include_usage", False), bool):
            raise bad_request("stream_options.include_usage must be a boolean", "stream_options")
    if stream and params.num_samples != params.n:
        raise bad_request("best_of must equal n when streaming (the best are known at the end only)", "best_of")
    return params, stream, bool((options or {}).get("include_usage")), echo, num_logprobs


_COMMON = {"model", "max_tokens", "max_completion_tokens", "stop", "stream", "stream_options", "logit_bias"} | {
    param for _, param, _, _ in _FIELDS}


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required (a string; see GET /v1/models)", "model")
    return model


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_prompts(prompt) -> list[str | list[int]]:
    """A completion's ``prompt``: a string, token ids, or a batch of either (``bad_request`` naming the index)."""
    if isinstance(prompt, str) or (_is_ids(prompt) and prompt):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad_request("prompt must be a string, a list of token ids, or a non-empty list of either", "prompt")
    for i, p in enumerate(prompt):
        if not isinstance(p, str) and not _is_ids(p):
            raise bad_request(f"prompt[{i}] must be a string or a list of token ids (ints)", "prompt")
    return list(prompt)


def parse_completion(body: dict) -> ParsedRequest:
    """``POST /v1/completions``: a prompt, as text or token ids, or a batch of them."""
    model = _model(body)
    if "prompt" not in body:
        raise bad_request("prompt is required", "prompt")
    prompts = parse_prompts(body["prompt"])
    params, stream, include_usage, echo, num_logprobs = _sampling_params(body, _COMMON | {"prompt", "echo",
                                                                                          "logprobs"}, chat=False)
    return ParsedRequest(model, prompts, params, stream, include_usage, False, echo, num_logprobs,
                         f"cmpl-{uuid.uuid4().hex}")


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
    params, stream, include_usage, _, num_logprobs = _sampling_params(
        body, _COMMON | {"messages", "logprobs", "top_logprobs"}, chat=True, default_max_tokens=max_model_len)
    if tokenizer is None or tokenizer.chat_template is None:
        raise bad_request("this model has no chat template: use /v1/completions", "messages")
    prompt = tokenizer.apply_chat_template(rendered, add_generation_prompt=True)
    return ParsedRequest(model, [prompt], params, stream, include_usage, True, False, num_logprobs,
                         f"chatcmpl-{uuid.uuid4().hex}")


# ---- logprobs in OpenAI's shapes ----------------------------------------------------------------------------------

def completion_logprobs(token_ids: list[int], logprobs: list, num_top: int, token_text, text_offset: int = 0
                        ) -> dict:
    """Completions' shape: ``tokens``, ``token_logprobs``, ``top_logprobs`` (token text -> logprob: the top-N
    and the token itself, as vLLM), ``text_offset`` (of each token in the choice's text)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, lp in zip(token_ids, logprobs):
        text = token_text(token)
        out["tokens"].append(text)
        out["text_offset"].append(text_offset)
        text_offset += len(text)
        if lp is None:  # the prompt's first token
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(lp[token])
        top = {token_text(t): v for t, v in list(lp.items())[:num_top]}
        top.setdefault(text, lp[token])
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(token_ids: list[int], logprobs: list, num_top: int, token_text) -> dict:
    """Chat's shape: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``."""
    def entry(token: int, value: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [entry(token, lp[token]) | {"top_logprobs": [entry(t, v) for t, v in list(lp.items())[:num_top]]}
                        for token, lp in zip(token_ids, logprobs) if lp is not None]}


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


class ResponseBuilder:
    """OpenAI's response and chunk shapes for one request from the engine's outputs (one engine request per
    prompt; choice index = prompt index * n + sample index, as OpenAI orders them)."""

    def __init__(self, req: ParsedRequest, prompt_ids: list[list[int]], prompt_texts: list[str], token_text,
                 created: int | None = None):
        self.req, self.prompt_ids, self.prompt_texts, self.token_text = req, prompt_ids, prompt_texts, token_text
        self.created = created or int(time.time())
        self.n = req.params.n
        self.started: set[int] = set()  # choices that sent their first chunk
        self.ended: set[int] = set()  # choices that sent their finish_reason
        self.offsets: dict[int, int] = {}  # completions' text_offset so far, per choice
        self.num_completion_tokens: dict[int, int] = {}

    @property
    def object(self) -> str:
        return "chat.completion" if self.req.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.req.chat else "text_completion"

    def _logprobs(self, prompt_index: int, out, ids: list[int], lps: list | None, with_prompt: bool, index: int):
        n = self.req.num_logprobs
        if n is None:
            return None
        lps = list(lps or [])
        if self.req.chat:
            return chat_logprobs(ids, lps, n, self.token_text)
        if with_prompt:
            ids = self.prompt_ids[prompt_index] + list(ids)
            lps = list(out.prompt_logprobs or [None] * len(self.prompt_ids[prompt_index])) + lps
        result = completion_logprobs(ids, lps, n, self.token_text, self.offsets.get(index, 0))
        if result["text_offset"]:
            self.offsets[index] = result["text_offset"][-1] + len(result["tokens"][-1])
        return result

    def response(self, outs: list) -> dict:
        """The whole response from each prompt's final output."""
        choices = []
        for i, out in enumerate(outs):
            for c in out.outputs:
                index = i * self.n + c.index
                entry = {"index": index, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                         "logprobs": self._logprobs(i, out, c.token_ids, c.logprobs, self.req.echo, index)}
                if self.req.chat:
                    entry["message"] = {"role": "assistant", "content": c.text}
                else:
                    entry["text"] = (self.prompt_texts[i] if self.req.echo else "") + c.text
                choices.append(entry)
        num_prompt = sum(len(ids) for ids in self.prompt_ids)
        return {"id": self.req.request_id, "object": self.object, "created": self.created, "model": self.req.model,
                "choices": choices, "usage": usage(num_prompt, sum(o.num_output_tokens for o in outs))}

    def chunk(self, prompt_index: int, out) -> dict | None:
        """A streamed chunk with what ``out`` adds, for each of its samples that changed (None: nothing did)."""
        choices = []
        for c in out.outputs:
            index = prompt_index * self.n + c.index
            first = index not in self.started
            ending = c.finished and index not in self.ended
            self.num_completion_tokens[index] = len(c.token_ids)
            if not (c.delta_text or c.delta_token_ids or ending or (first and (self.req.chat or self.req.echo))):
                continue
            self.started.add(index)
            entry = {"index": index, "finish_reason": c.finish_reason if ending else None,
                     "logprobs": self._logprobs(prompt_index, out, c.delta_token_ids, c.delta_logprobs,
                                                first and self.req.echo, index)}
            if ending:
                entry["stop_reason"] = c.stop_reason
                self.ended.add(index)
            if self.req.chat:
                entry["delta"] = {"role": "assistant", "content": c.delta_text} if first else {"content": c.delta_text}
            else:
                entry["text"] = (self.prompt_texts[prompt_index] if first and self.req.echo else "") + c.delta_text
            choices.append(entry)
        if not choices:
            return None
        return {"id": self.req.request_id, "object": self.chunk_object,
                "created": self.created, "model": self.req.model, "choices": choices}

    def usage_chunk(self) -> dict:
        num_prompt = sum(len(ids) for ids in self.prompt_ids)
        return {"id": self.req.request_id, "object": self.chunk_object,
                "created": self.created, "model": self.req.model, "choices": [],
                "usage": usage(num_prompt, sum(self.num_completion_tokens.values()))}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
