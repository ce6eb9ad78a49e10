"""Wire messages <-> the engine's own types; the one place that knows both.

``request_from_proto`` validates what the wire can get wrong and raises ``ValueError`` naming the
field (``params.top_p must be in (0, 1], got 0.0``), which the server turns into INVALID_ARGUMENT.
What needs the model (the prompt's length and ids, the model name) is checked by the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from latentmoe.engine.sampling_params import SamplingParams
from latentmoe.proto import generate_pb2 as pb

if TYPE_CHECKING:  # the engine pulls in torch; clients of this module need not
    from latentmoe.engine.engine import RequestOutput

# SamplingParams fields that are proto3 `optional` scalars: unset on the wire means the dataclass default
_SCALARS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos", "skip_special_tokens", "n",
            "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens",
            "include_stop_str_in_output", "logprobs", "prompt_logprobs")
_LISTS = ("stop", "stop_token_ids")


def request_from_proto(msg: pb.GenerateRequest) -> tuple[str | list[int], SamplingParams, str | None, str | None]:
    """``GenerateRequest`` -> ``(prompt, params, request_id, model)``; empty ids and model become None.

    The prompt is the text or the list of token ids as given; an empty one passes (the engine rejects
    it with "prompt is empty"), a missing one raises here.
    """
    if not isinstance(msg, pb.GenerateRequest):
        raise TypeError(f"expected a latentmoe.v1.GenerateRequest, got {type(msg).__name__}")
    which = msg.WhichOneof("prompt")
    if which is None:
        raise ValueError("prompt: give text or token_ids")
    prompt = msg.text if which == "text" else list(msg.token_ids.ids)
    return prompt, params_from_proto(msg.params), msg.request_id or None, msg.model or None


def params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Wire parameters -> ``SamplingParams``; unset scalars take its defaults, errors name ``params.<field>``."""
    kwargs = {name: getattr(msg, name) for name in _SCALARS if msg.HasField(name)}
    kwargs.update({name: list(getattr(msg, name)) for name in _LISTS})
    kwargs["logit_bias"] = dict(msg.logit_bias)
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:  # SamplingParams' messages start with the parameter's name
        raise ValueError(f"params.{e}") from None


def request_to_proto(prompt: str | list[int], params: SamplingParams | None = None, *,
                     request_id: str | None = None, model: str | None = None) -> pb.GenerateRequest:
    """The inverse of ``request_from_proto``, for clients and tests: every parameter is sent explicitly."""
    msg = pb.GenerateRequest(request_id=request_id or "", model=model or "")
    if isinstance(prompt, str):
        msg.text = prompt
    else:
        msg.token_ids.SetInParent()  # selects token_ids even when the list is empty
        msg.token_ids.ids.extend(prompt)
    if params is not None:
        for name in _SCALARS:
            value = getattr(params, name)
            if value is not None:
                setattr(msg.params, name, value)
        for name in _LISTS:
            getattr(msg.params, name).extend(getattr(params, name))
        msg.params.logit_bias.update(params.logit_bias)
        msg.params.SetInParent()
    return msg


def logprobs_to_proto(token_ids: list[int], logprobs: list, num_top: int,
                      token_text: Callable[[int], str] | None = None) -> list[pb.TokenLogprob]:
    """Per position: the token there and its ``Logprobs`` (token id -> logprob: the top-N in rank order, then
    the token itself when it is not among them), or ``None`` (a prompt's first token)."""
    text = token_text or (lambda _: "")
    out = []
    for token, lp in zip(token_ids, logprobs):
        msg = pb.TokenLogprob(token_id=token, token=text(token))
        if lp is not None:
            msg.logprob = lp[token]
            msg.top_logprobs.extend(pb.TopLogprob(token_id=t, logprob=v, token=text(t))
                                    for t, v in list(lp.items())[:num_top])
        out.append(msg)
    return out


def output_to_proto(out: RequestOutput, *, delta: bool, params: SamplingParams | None = None,
                    token_text: Callable[[int], str] | None = None) -> pb.GenerateResponse:
    """``RequestOutput`` -> ``GenerateResponse``: the new text and ids if ``delta`` (GenerateStream),
    everything so far if not (Generate). finish_reason and usage are set once the request has finished.
    ``params`` (the request's) say how many top logprobs to send; ``token_text`` gives a token's text."""
    num_top = params.logprobs or 0 if params is not None else 0
    num_prompt_top = params.prompt_logprobs or 0 if params is not None else 0
    first = out.outputs[0]
    msg = pb.GenerateResponse(
        request_id=out.request_id,
        text=first.delta_text if delta else first.text,
        token_ids=first.delta_token_ids if delta else first.token_ids,
        finished=out.finished,
    )
    if first.delta_logprobs is not None:
        ids, lps = (first.delta_token_ids, first.delta_logprobs) if delta else (first.token_ids, first.logprobs)
        msg.logprobs.extend(logprobs_to_proto(ids, lps or [], num_top, token_text))
    if out.prompt_logprobs is not None:
        msg.prompt_logprobs.extend(logprobs_to_proto(out.prompt_token_ids, out.prompt_logprobs, num_prompt_top,
                                                     token_text))
    if len(out.outputs) > 1:
        for c in out.outputs:
            if delta and not (c.delta_token_ids or c.delta_text or c.finished):
                continue
            choice = pb.Choice(index=c.index, text=c.delta_text if delta else c.text,
                               token_ids=c.delta_token_ids if delta else c.token_ids,
                               finish_reason=c.finish_reason or "")
            if c.delta_logprobs is not None:
                ids, lps = (c.delta_token_ids, c.delta_logprobs) if delta else (c.token_ids, c.logprobs)
                choice.logprobs.extend(logprobs_to_proto(ids, lps or [], num_top, token_text))
            if c.cumulative_logprob is not None:
                choice.cumulative_logprob = c.cumulative_logprob
            msg.choices.append(choice)
    if out.finished:
        msg.finish_reason = first.finish_reason or ""
        num_prompt, num_output = out.num_prompt_tokens, out.num_output_tokens
        msg.usage.CopyFrom(pb.Usage(prompt_tokens=num_prompt, completion_tokens=num_output,
                                    total_tokens=num_prompt + num_output))
    return msg


def expert_load_to_proto(load: dict) -> pb.ExpertLoadResponse:
    """The router's ``expert_load()`` summary as a ``GetExpertLoad`` response."""
    return pb.ExpertLoadResponse(
        window_s=load["window_s"],
        layers=[pb.LayerLoad(layer=int(layer), tokens_per_expert=counts,
                             imbalance=load["imbalance_per_layer"][layer])
                for layer, counts in load["tokens_per_expert"].items()],
        tokens_per_shard=load["tokens_per_shard"], shard_imbalance=load["shard_imbalance"],
        devices_histogram=load["devices_histogram"], a2a_bytes=load["a2a_bytes"], ideal_bytes=load["ideal_bytes"],
        a2a_padding_bytes=load.get("a2a_padding_bytes", 0))
