"""Wire messages <-> the engine's own types; the one place that knows both.

``request_from_proto`` validates what the wire can get wrong and raises ``ValueError`` naming the
field (``params.top_p must be in (0, 1], got 0.0``), which the server turns into INVALID_ARGUMENT.
What needs the model (the prompt's length and ids, the model name) is checked by the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from latentmoe.cluster.sampling_params import SamplingParams
from latentmoe.proto import generate_pb2 as pb

if TYPE_CHECKING:  # the engine pulls in torch; clients of this module need not
    from latentmoe.cluster.engine import RequestOutput

# SamplingParams fields that are proto3 `optional` scalars: unset on the wire means the dataclass default
_SCALARS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos", "skip_special_tokens")
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
        msg.params.SetInParent()
    return msg


def output_to_proto(out: RequestOutput, *, delta: bool) -> pb.GenerateResponse:
    """``RequestOutput`` -> ``GenerateResponse``: the new text and ids if ``delta`` (GenerateStream),
    everything so far if not (Generate). finish_reason and usage are set once the request has finished."""
    msg = pb.GenerateResponse(
        request_id=out.request_id,
        text=out.delta_text if delta else out.text,
        token_ids=out.delta_token_ids if delta else out.token_ids,
        finished=out.finished,
    )
    if out.finished:
        msg.finish_reason = out.finish_reason or ""
        num_prompt, num_output = len(out.prompt_token_ids), len(out.token_ids)
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
        devices_histogram=load["devices_histogram"], a2a_bytes=load["a2a_bytes"], ideal_bytes=load["ideal_bytes"])
