"""The gRPC contract: stubs up to date with generate.proto, convert.py, and the stubs over a real grpcio server."""

from __future__ import annotations

import importlib.metadata
import math
import re
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from latentmoe.engine.engine import RequestOutput, tokenize_prompt
from latentmoe.engine.sampling_params import SamplingParams
from latentmoe.proto import convert, gen
from latentmoe.proto import generate_pb2 as pb
from latentmoe.proto import generate_pb2_grpc as pb_grpc

REGENERATE = "python -m latentmoe.proto.gen"


def wire(msg):
    """The message as the other side sees it: serialized and parsed again."""
    return type(msg).FromString(msg.SerializeToString())


# --- the checked-in stubs are not stale --------------------------------------------------------------------------

def test_compiled_descriptor_matches_proto(tmp_path):
    """Whatever grpcio-tools is installed: generate_pb2 was compiled from the generate.proto of this checkout."""
    from grpc_tools import protoc

    out = tmp_path / "generate.desc"
    assert protoc.main(["grpc_tools.protoc", f"-I{gen.ROOT}", f"--descriptor_set_out={out}",
                        str(gen.ROOT / gen.PROTO)]) == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    messages = list(fresh.message_type)
    for message in messages:  # the Python generator leaves out json_name (derived from the field's name)
        messages.extend(message.nested_type)
        for field in message.field:
            field.ClearField("json_name")
    compiled = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert fresh == compiled, f"latentmoe/proto/generate_pb2*.py are stale against generate.proto: run `{REGENERATE}`"


def test_stubs_are_byte_identical_to_a_fresh_generation(tmp_path):
    tools, stubs = importlib.metadata.version("grpcio-tools"), pb_grpc.GRPC_GENERATED_VERSION
    for fresh in gen.generate(tmp_path):
        checked_in = Path(pb.__file__).parent / fresh.name
        assert fresh.read_bytes() == checked_in.read_bytes(), (
            f"{checked_in.name} differs from what `{REGENERATE}` writes now. Run it and check the result in"
            + ("." if tools == stubs else f"; the stubs were made with grpcio-tools=={stubs} but {tools} is "
               f"installed: install the pinned grpcio-tools=={stubs}, or regenerate and raise the grpcio/protobuf "
               "runtime pins to what the new stubs require."))


def test_service_names_are_the_versioned_contract():
    service = pb.DESCRIPTOR.services_by_name["Generator"]
    assert service.full_name == "latentmoe.v1.Generator"
    methods = {m.name: m for m in service.methods}
    assert sorted(methods) == ["Generate", "GenerateStream", "GetExpertLoad"]
    assert not methods["Generate"].server_streaming and methods["GenerateStream"].server_streaming
    assert {methods[m].input_type.full_name for m in ("Generate", "GenerateStream")} == {
        "latentmoe.v1.GenerateRequest"}
    assert methods["GetExpertLoad"].output_type.full_name == "latentmoe.v1.ExpertLoadResponse"


# --- convert: requests -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["The experts of a mixture ü", [0, 5, 2**31 - 1]])
def test_request_round_trip(prompt):
    params = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=5, seed=2**63 - 1, stop=["\n\n", "END"],
                            stop_token_ids=[3, 4], ignore_eos=True, skip_special_tokens=False)
    msg = wire(convert.request_to_proto(prompt, params, request_id="r-1", model="tiny"))
    assert msg.WhichOneof("prompt") == ("text" if isinstance(prompt, str) else "token_ids")
    assert convert.request_from_proto(msg) == (prompt, params, "r-1", "tiny")


def test_unset_fields_take_the_defaults():
    defaults = ("hi", SamplingParams(), None, None)
    assert convert.request_from_proto(wire(pb.GenerateRequest(text="hi"))) == defaults
    assert convert.request_from_proto(wire(pb.GenerateRequest(text="hi", params=pb.SamplingParams()))) == defaults
    # set to the proto3 zero value is not unset: presence travels on the wire
    _, params, _, _ = convert.request_from_proto(wire(pb.GenerateRequest(
        text="hi", params=pb.SamplingParams(temperature=0.0, top_k=0, seed=0, skip_special_tokens=False))))
    assert (params.temperature, params.top_k, params.seed, params.skip_special_tokens) == (0.0, 0, 0, False)
    assert params.greedy


@pytest.mark.parametrize("fields, message", [
    (dict(max_tokens=0), "params.max_tokens must be a positive integer, got 0"),
    (dict(max_tokens=-3), "params.max_tokens must be a positive integer, got -3"),
    (dict(temperature=-0.5), "params.temperature must be in [0, 100], got -0.5"),
    (dict(temperature=100.5), "params.temperature must be in [0, 100], got 100.5"),
    (dict(temperature=math.nan), "params.temperature must be in [0, 100], got nan"),
    (dict(top_p=0.0), "params.top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), "params.top_p must be in (0, 1], got 1.5"),
    (dict(top_k=-2), "params.top_k must be -1, 0 (off) or a positive integer, got -2"),
    (dict(seed=-1), "params.seed must be an integer in [0, 2**63), got -1"),
    (dict(stop=["ok", ""]), "params.stop must be a list of non-empty strings"),
    (dict(stop=[str(i) for i in range(17)]), "params.stop takes at most 16 strings, got 17"),
    (dict(stop_token_ids=[2, -1]), "params.stop_token_ids must be non-negative integers, got [2, -1]"),
])
def test_bad_params_name_the_field(fields, message):
    msg = wire(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), params=pb.SamplingParams(**fields)))
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        convert.request_from_proto(msg)


@pytest.mark.parametrize("msg", [pb.GenerateRequest(), pb.GenerateRequest(params=pb.SamplingParams(max_tokens=4),
                                                                           request_id="r", model="tiny")])
def test_no_prompt_is_an_error(msg):
    with pytest.raises(ValueError, match=re.escape("prompt: give text or token_ids")):
        convert.request_from_proto(wire(msg))


def test_empty_prompts_pass_to_the_engine_which_rejects_them():
    assert convert.request_from_proto(wire(pb.GenerateRequest(text="")))[0] == ""
    ids = convert.request_from_proto(wire(convert.request_to_proto([])))[0]
    assert ids == []
    with pytest.raises(ValueError, match="prompt is empty"):
        tokenize_prompt(None, vocab_size=100, max_model_len=64, prompt=ids)


def test_not_a_request_is_a_type_error():
    with pytest.raises(TypeError, match="GenerateRequest"):
        convert.request_from_proto(pb.GenerateResponse())


# --- convert: outputs --------------------------------------------------------------------------------------------

def make_output(finished=False, finish_reason=None):
    return RequestOutput.single("r-1", [1, 2, 3], [7, 8, 9], "abc", delta_token_ids=[9], delta_text="c",
                                finished=finished, finish_reason=finish_reason)


def test_output_mid_stream():
    msg = wire(convert.output_to_proto(make_output(), delta=True))
    assert (msg.request_id, msg.text, list(msg.token_ids)) == ("r-1", "c", [9])
    assert (msg.finished, msg.finish_reason) == (False, "")
    assert not msg.HasField("usage")


@pytest.mark.parametrize("delta, text, ids", [(True, "c", [9]), (False, "abc", [7, 8, 9])])
def test_output_finished(delta, text, ids):
    msg = wire(convert.output_to_proto(make_output(finished=True, finish_reason="length"), delta=delta))
    assert (msg.text, list(msg.token_ids), msg.finished, msg.finish_reason) == (text, ids, True, "length")
    assert (msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.total_tokens) == (3, 3, 6)


# --- the stubs over a real grpcio server -------------------------------------------------------------------------

class EchoGenerator(pb_grpc.GeneratorServicer):
    """Generates the prompt's own ids (text: code points), one per step, up to max_tokens."""

    def _outputs(self, request, context):
        try:
            prompt, params, request_id, _ = convert.request_from_proto(request)
            if not prompt:
                raise ValueError("prompt is empty")
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        prompt_ids = [ord(c) for c in prompt] if isinstance(prompt, str) else prompt
        tokens, text = [], ""
        for i, token in enumerate(prompt_ids[:params.max_tokens]):
            tokens.append(token)
            text += chr(token)
            last = i + 1 == min(len(prompt_ids), params.max_tokens)
            reason = ("length" if len(prompt_ids) > params.max_tokens else "stop") if last else None
            yield RequestOutput.single(request_id or "echo-0", prompt_ids, list(tokens), text,
                                       delta_token_ids=[token], delta_text=chr(token), finished=last,
                                       finish_reason=reason)

    def Generate(self, request, context):
        *_, last = self._outputs(request, context)
        return convert.output_to_proto(last, delta=False)

    def GenerateStream(self, request, context):
        for out in self._outputs(request, context):
            yield convert.output_to_proto(out, delta=True)


@pytest.fixture(scope="module")
def stub():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GeneratorServicer_to_server(EchoGenerator(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)])
    yield pb_grpc.GeneratorStub(channel)
    channel.close()
    server.stop(grace=None)


def test_unary_and_stream_agree(stub):
    request = convert.request_to_proto([72, 105, 33, 63], SamplingParams(max_tokens=3), request_id="r-7")
    whole = stub.Generate(request, timeout=10)
    assert (whole.request_id, whole.text, list(whole.token_ids)) == ("r-7", "Hi!", [72, 105, 33])
    assert (whole.finished, whole.finish_reason) == (True, "length")
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (4, 3, 7)

    chunks = list(stub.GenerateStream(request, timeout=10))
    assert [c.text for c in chunks] == ["H", "i", "!"]
    assert [c.finished for c in chunks] == [False, False, True]
    assert [c.finish_reason for c in chunks] == ["", "", "length"]
    assert [c.HasField("usage") for c in chunks] == [False, False, True]
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    assert chunks[-1].usage == whole.usage


def test_text_prompt_with_default_params(stub):
    whole = stub.Generate(pb.GenerateRequest(text="ok"), timeout=10)
    assert (whole.text, whole.finish_reason, whole.request_id) == ("ok", "stop", "echo-0")


@pytest.mark.parametrize("request_, message", [
    (pb.GenerateRequest(text="hi", params=pb.SamplingParams(max_tokens=0)),
     "params.max_tokens must be a positive integer, got 0 (0 only with prompt_logprobs: the prompt's logprobs alone)"),
    (pb.GenerateRequest(params=pb.SamplingParams(max_tokens=4)), "prompt: give text or token_ids"),
    (pb.GenerateRequest(token_ids=pb.TokenIds()), "prompt is empty"),
])
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_invalid_argument_reaches_the_client(stub, method, request_, message):
    with pytest.raises(grpc.RpcError) as info:
        response = getattr(stub, method)(request_, timeout=10)
        if method == "GenerateStream":
            list(response)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == message
    # the server is still serving
    assert stub.Generate(pb.GenerateRequest(text="x"), timeout=10).text == "x"
