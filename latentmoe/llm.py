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
                 step_timeout_s: float = 120.0, **engine_args):
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
        self.engine = self.router = self._cluster = self.coordinator = None
        self.attention: list = []
        if attention_shards is None and expert_shards is None:
            self.engine = LLMEngine(config)
            return
        from latentmoe.actors.cluster import ensure_ray

        for name, value in (("attention_shards", attention_shards), ("expert_shards", expert_shards)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self._cluster = ensure_ray(ray_address, attention_shards or 1, expert_shards or 1)
        if self._cluster is not None:
            atexit.register(self.shutdown)
        self.coordinator, self.attention = None, []
        try:
            self._start_shards(dataclasses.asdict(config), attention_shards or 1, expert_shards or 1, timeout_s,
                               step_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _start_shards(self, config: dict, num_attention: int, num_expert: int, timeout_s: float,
                      step_timeout_s: float) -> None:
        """The coordinator with its expert shards, then the attention shards (plain actors: no Serve here)."""
        import uuid

        import ray

        from latentmoe.actors.attention_shard import AttentionShardActor
        from latentmoe.actors.cluster import has_role_nodes, start_coordinator
        from latentmoe.actors.engine_client import ShardClient, actor_opener
        from latentmoe.actors.placement import ATTENTION_RESOURCE
        from latentmoe.cluster.shards import shard_runtime_env
        from latentmoe.model.tokenizer import Tokenizer

        name = f"latentmoe-llm-{uuid.uuid4().hex[:8]}"
        by_role = has_role_nodes()
        self.coordinator = start_coordinator(config, num_expert, name, timeout_s=timeout_s,
                                             step_timeout_s=step_timeout_s, place_by_role=by_role)
        resources = {ATTENTION_RESOURCE: 1.0} if by_role else {}
        gpu = config["device"].startswith("cuda")

        def new_shard():
            return AttentionShardActor.options(num_cpus=1, num_gpus=1 if gpu else 0, resources=resources,
                                               max_concurrency=10_000, runtime_env=shard_runtime_env(),
                                               enable_task_events=False).remote(
                config, name, collective_timeout_s=step_timeout_s / 2, start_timeout_s=timeout_s,
                max_num_requests=1 << 20)

        self._new_shard = new_shard
        self.attention = [new_shard() for _ in range(num_attention)]
        try:
            ray.get([a.stats.remote() for a in self.attention], timeout=timeout_s + 30)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"{num_attention} attention shards could not be placed within {timeout_s:g} s: "
                               f"the cluster has {ray.available_resources()} available") from None
        info = self._wait_formed(num_attention, num_expert, timeout_s)
        try:
            tokenizer = Tokenizer.from_dir(self.model_dir)
        except FileNotFoundError:
            tokenizer = None
        self._turn = 0
        self.router = ShardClient(actor_opener(self._pick), self.coordinator, tokenizer, info,
                                  output_timeout_s=step_timeout_s * 2 + timeout_s, recovery_timeout_s=timeout_s)
        self.shard_info = info

    async def _pick(self, moved: bool):
        """The next attention actor in turn; after a request's shard went away, dead actors are replaced first
        (Serve does that for its replicas)."""
        import asyncio

        import ray

        if moved:
            async def alive(actor):
                try:
                    await asyncio.wait_for(actor.__ray_ready__.remote(), 5)
                    return True
                except Exception:  # noqa: BLE001
                    return False

            actors = list(self.attention)
            live = await asyncio.gather(*(alive(a) for a in actors))
            for i, (actor, ok) in enumerate(zip(actors, live)):
                if not ok and self.attention[i] is actor:  # another request may have replaced it meanwhile
                    ray.kill(actor)
                    self.attention[i] = self._new_shard()
        self._turn += 1
        return self.attention[self._turn % len(self.attention)]

    def _wait_formed(self, num_attention: int, num_expert: int, timeout_s: float) -> dict:
        import time

        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            status = ray.get(self.coordinator.status.remote(), timeout=30)
            if status["attention_shards"] == num_attention and status["expert_shards"] == num_expert:
                return status
            if time.monotonic() > deadline:
                raise RuntimeError(f"the collective group did not form within {timeout_s:g} s: {status}")
            time.sleep(0.2)

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in the order of the prompts."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        if self.router is not None:
            return self._run(self.router.generate_all(list(prompts), list(params)))
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def cache_stats(self) -> dict:
        if self.router is None:
            return self.engine.cache_stats()
        shards = [{k: v for k, v in st.items() if k in _CACHE_KEYS} for st in self.shard_stats()]
        first = shards[0] if shards else {}
        return {"block_size": first.get("block_size"), "bytes_per_token": first.get("bytes_per_token"),
                **{k: sum(s.get(k, 0) for s in shards) for k in ("num_blocks", "num_free_blocks", "num_running",
                                                                  "num_waiting")}, "shards": shards}

    def dispatch_stats(self) -> dict:
        """Tokens per (layer, expert), per expert shard, devices reached per token, all-to-all bytes (cluster only)."""
        if self.router is None:
            raise RuntimeError("dispatch_stats() is for the disaggregated engine (attention_shards / expert_shards)")
        from latentmoe.cluster.dispatch import DispatchStats
        from latentmoe.model.config import ModelConfig

        c = ModelConfig.from_json(self.model_dir)
        E = self.shard_info["num_expert"]
        total = DispatchStats(c.n_routed_experts, E, c.num_experts_per_tok)
        for st in self.shard_stats():
            if st["dispatch"]:
                total.merge(DispatchStats.from_dict(st["dispatch"], c.n_routed_experts, E, c.num_experts_per_tok))
        return total.as_dict() | {"max_devices_per_token": self.shard_info["max_devices_per_token"]}

    def rebalance(self, force: bool = True, window_s: float | None = None, mode: str | None = None) -> dict:
        """Rebalance the expert placement from the expert load of the last ``window_s`` seconds (the
        coordinator's ``rebalance``): returns what changed, the imbalance before and after, and the times."""
        import ray

        return ray.get(self.coordinator.rebalance.remote(force, window_s, mode), timeout=self.timeout_s)

    def scale_experts(self, num_expert: int, window_s: float | None = None) -> dict:
        """Change the number of expert shards while running (the coordinator's ``scale_experts``): new shards
        with their slices, one switch, the old ones go; returns what changed and its parts' times."""
        import ray

        report = ray.get(self.coordinator.scale_experts.remote(num_expert, window_s), timeout=self.timeout_s)
        self.shard_info = ray.get(self.coordinator.status.remote(), timeout=self.timeout_s)
        return report

    def expert_placement(self) -> dict:
        """The expert placement in force: version, slots of each expert shard, copies, the latest rebalances."""
        import ray

        return ray.get(self.coordinator.expert_load.remote(), timeout=self.timeout_s)["placement"]

    def shards(self) -> dict:
        """Where each shard runs: ``{"attention": [...], "expert": [...]}`` with node ids and pids."""
        import ray

        status = ray.get(self.coordinator.shards.remote(), timeout=self.timeout_s)
        return {"attention": [info for _, info in status["attention"]],
                "expert": [info for _, info in status["expert"]]}

    def shard_stats(self) -> list[dict]:
        """Each attention shard's own counters: cache, steps, dispatch statistics and step timings."""
        import ray

        return ray.get([a.stats.remote() for a in self.attention], timeout=self.timeout_s)

    def shutdown(self) -> None:
        """Stop the shards and the coordinator, and the local cluster this ``LLM`` started, if it started one."""
        import ray

        try:
            for actor in self.attention:
                ray.kill(actor)
            # ray.kill returns before the shard is gone; a shard still alive when the coordinator goes has its
            # long-poll ``watch`` fail, and its worker prints "Task Coordinator.watch failed ... will be retried"
            # into this process's output (CI saw it as the last line of a script's stdout)
            _wait_dead(self.attention, timeout_s=30)
            self.attention = []
            if self.coordinator is not None:
                try:
                    ray.get(self.coordinator.shutdown.remote(), timeout=60)
                finally:
                    ray.kill(self.coordinator, no_restart=True)
                    if self.router is not None:
                        self.router.close()
                    self.coordinator = self.router = None
        finally:
            if self._cluster is not None:
                cluster, self._cluster = self._cluster, None
                atexit.unregister(self.shutdown)
                ray.shutdown()
                cluster.stop(echo=logger.info)

    def _run(self, coroutine):
        """Run one of the engine client's coroutines to its end (bounded by ``timeout_s``)."""
        import asyncio

        async def bounded():
            return await asyncio.wait_for(coroutine, self.timeout_s)

        return asyncio.run(bounded())

    @property
    def tokenizer(self):
        if self.engine is None:
            from latentmoe.model.tokenizer import Tokenizer

            return Tokenizer.from_dir(self.model_dir)
        return self.engine.tokenizer


_CACHE_KEYS = ("block_size", "bytes_per_token", "num_blocks", "num_free_blocks", "num_running", "num_waiting",
               "max_model_len")


def _wait_dead(actors: list, timeout_s: float) -> None:
    """Wait until each killed actor is dead (a call on it raises ``RayActorError``), at most ``timeout_s``."""
    import time

    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    deadline = time.monotonic() + timeout_s
    for actor in actors:
        while time.monotonic() < deadline:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
            except RayActorError:
                break
            except GetTimeoutError:
                return
            time.sleep(0.1)
