"""Load tests of a running server, over HTTP (OpenAI API) or gRPC, as ``latentmoe loadtest``.

``workload`` says what to send, ``runner`` when (closed loop or Poisson arrivals), ``clients`` sends it
and times it, ``metrics`` turns per-request timings into the figures llmperf and vLLM's serving
benchmark report, ``report`` writes them (text, JSON, PNG, one-file HTML). Only ``clients`` and
``runner.run_loadtest`` touch the network.
"""
