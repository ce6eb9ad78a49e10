"""``LLM``: the offline API, in the shape vLLM users know.

    llm = LLM(model="path/to/checkpoint", dtype="float32")
    outs = llm.generate(["a prompt", [1, 2, 3]], SamplingParams(max_tokens=32, temperature=0.0))
    outs[0].token_ids, outs[0].text, outs[0].finish_reason
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
from typing import Sequence

from latentmoe.engine.engine import LLMEngine, RequestOutput
from latentmoe.engine.engine_config import EngineConfig
from latentmoe.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "float32", *, attention_shards: int | None = None,
                 expert_shards: int | None = None, ray_address: str | None = None, timeout_s: float = 300.0,
                 **engine_args):
        """``model``: a checkpoint directory (default: the built-in tiny model). ``engine_args``: ``EngineConfig`` fields.

        With ``attention_shards`` / ``expert_shards`` the engine runs disaggregated on the Ray cluster this
        process is connected to (or the one at ``ray_address``, or the one running on this machine); with none,
        it starts a local multi-node cluster sized for the shards and stops it on ``shutdown()`` (or at exit).
        """
        if model is None:
            from latentmoe.model.tiny import default_model_dir

            model = str(default_model_dir())
        config = EngineConfig.from_dict({"model": str(model), "dtype": dtype, **engine_args})
        self.timeout_s = timeout_s
        self.model_dir = str(model)
        self.engine = self.router = self._cluster = None
        if attention_shards is None and expert_shards is None:
            self.engine = LLMEngine(config)
            return
        from latentmoe.actors.cluster import ensure_ray, start_router

        for name, value in (("attention_shards", attention_shards), ("expert_shards", expert_shards)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self._cluster = ensure_ray(ray_address, attention_shards or 1, expert_shards or 1)
        if self._cluster is not None:
            atexit.register(self.shutdown)
        try:
            self.router, self.shard_info = start_router(dataclasses.asdict(config), attention_shards or 1,
                                                        expert_shards or 1, timeout_s=timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in the order of the prompts."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        if self.router is not None:
            return self._get(self.router.generate_all.remote(list(prompts), list(params)))
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def cache_stats(self) -> dict:
        if self.router is not None:
            return self._get(self.router.cache_stats.remote())
        return self.engine.cache_stats()

    def dispatch_stats(self) -> dict:
        """Tokens per (layer, expert), per expert shard, devices reached per token, all-to-all bytes (cluster only)."""
        if self.router is None:
            raise RuntimeError("dispatch_stats() is for the disaggregated engine (attention_shards / expert_shards)")
        return self._get(self.router.dispatch_stats.remote())

    def shutdown(self) -> None:
        """Stop the router and its shards, and the local cluster this ``LLM`` started, if it started one."""
        import ray

        try:
            if self.router is not None:
                try:
                    ray.get(self.router.shutdown.remote(), timeout=60)
                finally:
                    ray.kill(self.router)
                    self.router = None
        finally:
            if self._cluster is not None:
                cluster, self._cluster = self._cluster, None
                atexit.unregister(self.shutdown)
                ray.shutdown()
                cluster.stop(echo=logger.info)

    def _get(self, ref):
        import ray

        try:
            return ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.RayTaskError as e:  # re-raise the router's ValueError / TypeError as itself
            cause = e.as_instanceof_cause()
            raise cause from None

    @property
    def tokenizer(self):
        if self.engine is None:
            from latentmoe.model.tokenizer import Tokenizer

            return Tokenizer.from_dir(self.model_dir)
        return self.engine.tokenizer
