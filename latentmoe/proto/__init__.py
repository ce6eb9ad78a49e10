"""The gRPC wire contract (``generate.proto``, package ``latentmoe.v1``), its generated stubs
(``generate_pb2``, ``generate_pb2_grpc``; regenerate with ``python -m latentmoe.proto.gen``) and
``convert``, the one module that turns wire messages into the engine's types and back."""
