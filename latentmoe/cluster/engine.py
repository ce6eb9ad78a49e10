"""The single-process engine: scheduler + latent cache + model runner + sampler + detokenizers.

``step()`` runs one scheduled batch (prefill chunks and decodes together) and returns
a ``RequestOutput`` for every request that produced a token or finished in it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from latentmoe.cluster.block_manager import BlockManager
from latentmoe.cluster.detokenizer import IncrementalDetokenizer
from latentmoe.cluster.engine_config import EngineConfig
from latentmoe.cluster.latent_cache import LatentCache, num_blocks_for_budget
from latentmoe.cluster.model_runner import ModelRunner
from latentmoe.cluster.sampler import Sampler
from latentmoe.cluster.sampling_params import SamplingParams
from latentmoe.cluster.scheduler import Scheduler, SchedulerConfig
from latentmoe.cluster.sequence import Sequence
from latentmoe.model.deepseek_v2 import RoutedFn
from latentmoe.model.loader import load_model, resolve_dtype
from latentmoe.model.tokenizer import Tokenizer


@dataclass
class RequestOutput:
    """A request's state after a step: everything so far, plus what this step added."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    delta_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)


def tokenize_prompt(tokenizer: Tokenizer | None, vocab_size: int, max_model_len: int,
                    prompt: str | list[int]) -> list[int]:
    """Prompt text or ids -> ids, validated: ``ValueError`` naming the problem."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: give the prompt as token ids")
        if not prompt:
            raise ValueError("prompt is empty")
        ids = tokenizer.encode(prompt)
    else:
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt):
            raise ValueError("prompt must be a string or a list of token ids (ints)")
        if not prompt:
            raise ValueError("prompt is empty")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")
        ids = list(prompt)
    if len(ids) >= max_model_len:
        raise ValueError(f"prompt has {len(ids)} tokens; the context length is {max_model_len}")
    return ids


class _Request:
    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer | None):
        self.seq, self.detok = seq, detok
        self.text = ""  # all text decoded so far
        self.num_emitted_tokens = 0  # what earlier outputs already carried
        self.num_emitted_chars = 0
        self.num_detok_tokens = 0  # tokens fed to the detokenizer


class LLMEngine:
    """The whole engine in one process, or an attention shard's engine when ``routed_fn`` is given.

    ``expert_ids`` limits the routed experts loaded (``[]`` on an attention shard, whose routed
    experts run elsewhere through ``routed_fn(layer, h, topk_ids, topk_weights)``).
    """

    def __init__(self, config: EngineConfig, *, expert_ids: list[int] | None = None,
                 routed_fn: RoutedFn | None = None):
        self.config = config
        self.device = torch.device(config.device)
        self.routed_fn = routed_fn
        dtype = resolve_dtype(config.dtype)
        self.model = load_model(config.model, dtype=dtype, device=self.device, expert_ids=expert_ids)
        self.model_config = self.model.config
        try:
            self.tokenizer = Tokenizer.from_dir(config.model)
        except FileNotFoundError:
            self.tokenizer = None  # token-id prompts only
        num_blocks = config.num_blocks
        if num_blocks is None:
            fraction = config.cache_memory_fraction
            if config.cache_bytes is None and fraction is None:
                fraction = 0.9 if self.device.type == "cuda" else 0.05
            num_blocks = num_blocks_for_budget(self.model_config, config.block_size, dtype,
                                               cache_bytes=config.cache_bytes, memory_fraction=fraction,
                                               device=self.device)
        self.cache = LatentCache(self.model_config, num_blocks, config.block_size, dtype, self.device)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        # a sequence alone must fit the cache, or preempting everything else could not make room for it
        max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                            self.model_config.max_position_embeddings, num_blocks * config.block_size)
        self.max_model_len = max_model_len
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=max_model_len, eos_token_ids=self.model_config.eos_token_ids), self.block_manager)
        from latentmoe.kernels import use_triton

        self.runner = ModelRunner(self.model, self.cache, prefill_absorbed=config.prefill_mla == "absorbed",
                                  use_triton=use_triton(config.kernels, self.device))
        self.sampler = Sampler(seed=config.seed)
        self.requests: dict[str, _Request] = {}
        self._next_id = 0
        self.num_preemptions = 0
        self.num_forward_passes = 0

    # ---- requests --------------------------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return tokenize_prompt(self.tokenizer, self.model_config.vocab_size, self.max_model_len, prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None, *,
                    output_token_ids: list[int] | None = None, num_output_chars: int = 0) -> str:
        """Queue a request. ``output_token_ids``: tokens it already produced elsewhere (and ``num_output_chars``,
        characters of their text already returned), to be recomputed like a preempted request's; outputs go
        on after them, and sampling goes on as if it had never moved (seeds are per position)."""
        params = params or SamplingParams()
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        ids = self.tokenize(prompt)
        seq = Sequence(request_id, ids, params, arrival_time if arrival_time is not None else time.monotonic())
        prior = list(output_token_ids or [])
        if prior:
            if len(prior) >= params.max_tokens or len(ids) + len(prior) >= self.max_model_len:
                raise ValueError(f"request {request_id!r} has no tokens left to generate")
            seq.output_token_ids = prior
        self.scheduler.add(seq)
        detok = IncrementalDetokenizer(self.tokenizer, ids, params) if self.tokenizer is not None else None
        request = _Request(seq, detok)
        if prior:
            request.num_emitted_tokens = request.num_detok_tokens = len(prior)
            if detok is not None:
                detok.step(prior)
                request.text = detok.resume_at(num_output_chars)
                request.num_emitted_chars = len(request.text)
        self.requests[request_id] = request
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self.scheduler.abort(request_id)
        request = self.requests.pop(request_id, None)
        if seq is None or request is None:
            return None
        return self._output(request, finished=True)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- the step --------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        self.num_preemptions += len(scheduled.preempted)
        if not scheduled.chunks:
            return []
        logits = self.runner.execute(scheduled.chunks, self.routed_fn)
        self.num_forward_passes += 1
        sampling = [c.seq for c in scheduled.chunks if c.sample]
        tokens = self.sampler(logits, [s.params for s in sampling], [s.num_output_tokens for s in sampling])
        finished = {s.request_id for s in self.scheduler.update(scheduled, {
            s.request_id: t for s, t in zip(sampling, tokens)})}
        outputs = []
        for seq in sampling:
            request = self.requests.get(seq.request_id)
            if request is None:
                continue
            done = seq.request_id in finished
            if request.detok is not None:
                delta, stop = request.detok.step(seq.output_token_ids[request.num_detok_tokens:])
                request.num_detok_tokens = len(seq.output_token_ids)
                request.text += delta
                if stop is not None and not done:
                    self.scheduler.finish(seq.request_id, "stop", stop)
                    done = True
                if done:
                    request.text += request.detok.finish()
            outputs.append(self._output(request, finished=done))
            if done:
                del self.requests[seq.request_id]
        return outputs

    def _output(self, request: _Request, finished: bool) -> RequestOutput:
        seq = request.seq
        delta_ids = seq.output_token_ids[request.num_emitted_tokens:]
        delta_text = request.text[request.num_emitted_chars:]
        request.num_emitted_tokens, request.num_emitted_chars = len(seq.output_token_ids), len(request.text)
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids, token_ids=list(seq.output_token_ids),
            text=request.text, delta_token_ids=list(delta_ids), delta_text=delta_text,
            finished=finished, finish_reason=seq.finish_reason if finished else None,
            stop_reason=seq.stop_reason if finished else None)

    def cache_stats(self) -> dict:
        return {
            "block_size": self.cache.block_size,
            "num_blocks": self.block_manager.num_blocks,
            "num_free_blocks": self.block_manager.num_free_blocks,
            "bytes_per_token": self.cache.bytes_per_token,
            "cache_bytes": self.cache.nbytes,
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
        }
