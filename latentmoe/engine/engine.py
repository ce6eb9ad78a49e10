"""The single-process engine: scheduler + latent cache + model runner + sampler + detokenizers.

``step()`` runs one scheduled batch (prefill chunks and decodes together) and returns
a ``RequestOutput`` for every request that produced a token or finished in it.

A request with ``n`` / ``best_of`` samples is prefilled once: when its prompt is in the cache,
the other samples are forked from its sequence (sharing its blocks, copy-on-write) and every
sample draws its first token from the same logits. Prompt logprobs come from the prefill's
own logits: the chunks of such a request send every row through ``lm_head``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from latentmoe.engine.block_manager import BlockManager
from latentmoe.engine.detokenizer import IncrementalDetokenizer
from latentmoe.engine.engine_config import EngineConfig
from latentmoe.engine.latent_cache import LatentCache, num_blocks_for_budget
from latentmoe.engine.model_runner import ModelRunner
from latentmoe.engine.sampler import Logprobs, Sampler, top_logprobs
from latentmoe.engine.sampling_params import SamplingParams
from latentmoe.engine.scheduler import Scheduler, SchedulerConfig
from latentmoe.engine.sequence import Sequence
from latentmoe.model.deepseek_v2 import RoutedFn
from latentmoe.model.loader import load_model, resolve_dtype
from latentmoe.model.tokenizer import Tokenizer


@dataclass
class CompletionOutput:
    """One sample of a request: everything so far, plus what this step added."""

    index: int
    token_ids: list[int]
    text: str
    delta_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    # with params.logprobs: per token, its raw logprob and the top-N (``Logprobs``); ``logprobs`` holds all of
    # them on the finished output only (non-streaming consumers read that one), ``delta_logprobs`` the new ones
    logprobs: list[Logprobs | None] | None = None
    delta_logprobs: list[Logprobs | None] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    """A request's state after a step: one ``CompletionOutput`` per sample (``n`` of them), and, with
    ``prompt_logprobs``, the prompt's (``None`` for its first token) on the first output and the last."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[Logprobs | None] | None = None

    # the first sample's fields, for the common case n = 1
    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def delta_token_ids(self) -> list[int]:
        return self.outputs[0].delta_token_ids

    @property
    def delta_text(self) -> str:
        return self.outputs[0].delta_text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def stop_reason(self) -> int | str | None:
        return self.outputs[0].stop_reason

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

    @classmethod
    def single(cls, request_id: str, prompt_token_ids: list[int], token_ids: list[int], text: str, **fields
               ) -> "RequestOutput":
        """A one-sample output (for tests and clients that build one by hand)."""
        finished = fields.get("finished", False)
        return cls(request_id, prompt_token_ids, [CompletionOutput(0, token_ids, text, **fields)], finished)


def coalesce(outputs: list[RequestOutput]) -> RequestOutput:
    """Successive outputs of one request as one: the last one's state, with every delta in between.

    An attention shard sends what piled up while its consumer was busy as one message."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    samples = []
    for i, sample in enumerate(last.outputs):
        parts = [o.outputs[i] for o in outputs if i < len(o.outputs)]
        delta_logprobs = None
        if any(p.delta_logprobs is not None for p in parts):
            delta_logprobs = [lp for p in parts for lp in (p.delta_logprobs or [])]
        samples.append(dataclasses.replace(sample, delta_token_ids=[t for p in parts for t in p.delta_token_ids],
                                           delta_text="".join(p.delta_text for p in parts),
                                           delta_logprobs=delta_logprobs))
    prompt_logprobs = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return dataclasses.replace(last, outputs=samples, prompt_logprobs=prompt_logprobs)


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


class _Sample:
    """One sequence of a request and its text."""

    def __init__(self, index: int, seq: Sequence, detok: IncrementalDetokenizer | None):
        self.index, self.seq, self.detok = index, seq, detok
        self.text = ""  # all text decoded so far
        self.num_emitted_tokens = 0  # what earlier outputs already carried
        self.num_emitted_chars = 0
        self.num_detok_tokens = 0  # tokens fed to the detokenizer
        self.done = False


class _Request:
    """A request: its samples (one sequence each; samples 1.. are forked from 0 when the prompt is prefilled)."""

    def __init__(self, request_id: str, params: SamplingParams, prompt_token_ids: list[int]):
        self.request_id, self.params, self.prompt_token_ids = request_id, params, prompt_token_ids
        self.samples: list[_Sample] = []
        self.forked = params.num_samples == 1
        # position -> Logprobs of the prompt token there (position 0 has none)
        self.prompt_logprobs: list[Logprobs | None] | None = (
            [None] * len(prompt_token_ids) if params.prompt_logprobs is not None else None)
        self.num_prompt_logprobs = 1  # positions filled (0 counts: it has no logprob)
        self.prompt_logprobs_sent = False

    @property
    def done(self) -> bool:
        return all(s.done for s in self.samples) and self.forked

    def sample_params(self, index: int) -> SamplingParams:
        """Sample ``index``'s own parameters: one sequence, seed ``seed + index`` (vLLM's rule), and logprobs
        computed when best_of ranks by them."""
        p = self.params
        seed = None if p.seed is None else (p.seed + index) % 2**63
        logprobs = p.logprobs if p.logprobs is not None or p.num_samples == p.n else 0
        return dataclasses.replace(p, n=1, best_of=None, seed=seed, logprobs=logprobs)


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
        from latentmoe.kernels import kernel_family

        self.runner = ModelRunner(self.model, self.cache, prefill_absorbed=config.prefill_mla == "absorbed",
                                  kernels=kernel_family(config.kernels, self.device))
        self.sampler = Sampler(seed=config.seed, eos_token_ids=tuple(self.model_config.eos_token_ids))
        self.requests: dict[str, _Request] = {}
        self._samples: dict[str, tuple[_Request, _Sample]] = {}  # sequence id -> its request and sample
        self._next_id = 0
        self.num_preemptions = 0
        self.num_forward_passes = 0
        self.num_tokens_run = 0  # tokens through the model, summed over steps (a prompt prefilled once: once)

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
        params.check_vocab(self.model_config.vocab_size)
        ids = self.tokenize(prompt)
        prior = list(output_token_ids or [])
        if prior and params.num_samples > 1:
            raise ValueError(f"request {request_id!r} has {params.num_samples} samples: it cannot resume elsewhere")
        request = _Request(request_id, params, ids)
        seq = Sequence(request_id, ids, request.sample_params(0),
                       arrival_time if arrival_time is not None else time.monotonic())
        if prior:
            if len(prior) >= params.max_tokens or len(ids) + len(prior) >= self.max_model_len:
                raise ValueError(f"request {request_id!r} has no tokens left to generate")
            seq.output_token_ids = prior
            seq.output_logprobs = [None] * len(prior)  # the client has those already
            request.prompt_logprobs_sent = True
        self.scheduler.add(seq)
        sample = self._new_sample(request, 0, seq)
        if prior:
            sample.num_emitted_tokens = sample.num_detok_tokens = len(prior)
            if sample.detok is not None:
                sample.detok.step(prior)
                sample.text = sample.detok.resume_at(num_output_chars)
                sample.num_emitted_chars = len(sample.text)
        self.requests[request_id] = request
        return request_id

    def _new_sample(self, request: _Request, index: int, seq: Sequence) -> _Sample:
        detok = (IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, seq.params)
                 if self.tokenizer is not None else None)
        sample = _Sample(index, seq, detok)
        request.samples.append(sample)
        self._samples[seq.request_id] = (request, sample)
        return sample

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for sample in request.samples:
            self._samples.pop(sample.seq.request_id, None)
            if not sample.done:
                self.scheduler.abort(sample.seq.request_id)
                sample.done = True
        request.forked = True
        return self._output(request)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- the step --------------------------------------------------------------------------------------------

    def _wants_prompt_logprobs(self, chunk) -> bool:
        owner = self._samples.get(chunk.seq.request_id)
        if owner is None:
            return False
        request, sample = owner
        return (request.prompt_logprobs is not None and sample.index == 0
                and request.num_prompt_logprobs < len(request.prompt_token_ids)
                and chunk.start < len(request.prompt_token_ids) - 1)

    def _record_prompt_logprobs(self, chunk, logits: torch.Tensor) -> None:
        """``logits [n, V]`` of a chunk's tokens: row j predicts the token at position start + j + 1."""
        request, _ = self._samples[chunk.seq.request_id]
        num_prompt = len(request.prompt_token_ids)
        first = chunk.start + 1
        last = min(chunk.start + chunk.num_tokens, num_prompt - 1)  # positions first..last
        if last < first:
            return
        targets = request.prompt_token_ids[first : last + 1]
        rows = logits[: last - first + 1].float().log_softmax(-1)
        for q, d in zip(range(first, last + 1), top_logprobs(rows, request.params.prompt_logprobs, targets)):
            if request.prompt_logprobs[q] is None:
                request.num_prompt_logprobs += 1
            request.prompt_logprobs[q] = d

    def step(self, execute: Callable[[list], torch.Tensor] | None = None) -> list[RequestOutput]:
        """Schedule, run and sample one step. ``execute(chunks) -> logits`` runs the chunks' forward pass in
        place of the runner's own (an attention shard runs it as micro-batches)."""
        scheduled = self.scheduler.schedule()
        self.num_preemptions += len(scheduled.preempted)
        if not scheduled.chunks:
            return []
        chunks = list(scheduled.chunks)
        for chunk in chunks:
            chunk.all_logits = self._wants_prompt_logprobs(chunk)
        self.cache.copy_blocks(scheduled.copies)
        logits = execute(chunks) if execute is not None else self.runner.execute(chunks, self.routed_fn)
        self.num_forward_passes += 1
        self.num_tokens_run += scheduled.num_tokens
        row, sampling = 0, []  # (sequence, its logits row)
        for chunk in chunks:
            if chunk.all_logits:
                self._record_prompt_logprobs(chunk, logits[row : row + chunk.num_tokens])
                row += chunk.num_tokens
            elif chunk.sample:
                row += 1
            if not chunk.sample or chunk.seq.params.max_tokens == 0:
                continue
            sampling.append((chunk.seq, row - 1))
            request, _ = self._samples[chunk.seq.request_id]
            if not request.forked:  # the prompt is in the cache: the other samples start from it
                for index in range(1, request.params.num_samples):
                    child = Sequence(f"{request.request_id}#{index}", request.prompt_token_ids,
                                     request.sample_params(index), chunk.seq.arrival_time)
                    self.scheduler.fork(chunk, scheduled, child)
                    self._new_sample(request, index, child)
                    sampling.append((child, row - 1))
                request.forked = True
        seqs = [s for s, _ in sampling]
        tokens, logprobs = self.sampler.sample(
            logits[[r for _, r in sampling]], [s.params for s in seqs], [s.num_output_tokens for s in seqs],
            [(s.prompt_token_ids, s.output_token_ids) for s in seqs])
        for seq, token, lp in zip(seqs, tokens, logprobs):
            if lp is not None:
                seq.output_logprobs.append(lp)
                seq.cumulative_logprob += lp[token]
        touched = {c.seq.request_id for c in scheduled.chunks if c.sample}
        finished = {s.request_id for s in self.scheduler.update(scheduled, {
            s.request_id: t for s, t in zip(seqs, tokens)})}
        outputs, seen = [], set()
        for seq_id in touched:
            owner = self._samples.get(seq_id)
            if owner is None:
                continue
            request, sample = owner
            seq = sample.seq
            done = seq_id in finished
            if sample.detok is not None:
                delta, stop = sample.detok.step(seq.output_token_ids[sample.num_detok_tokens:])
                sample.num_detok_tokens = len(seq.output_token_ids)
                sample.text += delta
                if stop is not None and not done:
                    self.scheduler.finish(seq_id, "stop", stop)
                    done = True
                if done:
                    sample.text += sample.detok.finish()
            sample.done = done
            if request.request_id not in seen:
                seen.add(request.request_id)
        for request_id in seen:
            request = self.requests[request_id]
            done = request.done
            if request.params.num_samples > request.params.n and not done:
                continue  # best_of: the n best are known at the end only
            outputs.append(self._output(request))
            if done:
                del self.requests[request_id]
                for sample in request.samples:
                    self._samples.pop(sample.seq.request_id, None)
        return outputs

    def _output(self, request: _Request) -> RequestOutput:
        finished = request.done
        samples = request.samples
        p = request.params
        if p.num_samples > p.n:  # best_of: the n with the highest cumulative logprob, in that order
            samples = sorted(samples, key=lambda s: -s.seq.cumulative_logprob)[: p.n]
        outputs = []
        for index, sample in enumerate(samples):
            seq = sample.seq
            start = sample.num_emitted_tokens
            with_logprobs = p.logprobs is not None
            outputs.append(CompletionOutput(
                index=index, token_ids=list(seq.output_token_ids), text=sample.text,
                delta_token_ids=seq.output_token_ids[start:], delta_text=sample.text[sample.num_emitted_chars:],
                finished=sample.done, finish_reason=seq.finish_reason if sample.done else None,
                stop_reason=seq.stop_reason if sample.done else None,
                logprobs=list(seq.output_logprobs) if with_logprobs and finished else None,
                delta_logprobs=seq.output_logprobs[start:] if with_logprobs else None,
                cumulative_logprob=seq.cumulative_logprob if with_logprobs or p.num_samples > p.n else None))
            sample.num_emitted_tokens, sample.num_emitted_chars = len(seq.output_token_ids), len(sample.text)
        prompt_logprobs = None
        if request.prompt_logprobs is not None and (finished or not request.prompt_logprobs_sent):
            prompt_logprobs = list(request.prompt_logprobs)
            request.prompt_logprobs_sent = True
        return RequestOutput(request.request_id, request.prompt_token_ids, outputs, finished, prompt_logprobs)

    def cache_stats(self) -> dict:
        return {
            "block_size": self.cache.block_size,
            "num_blocks": self.block_manager.num_blocks,
            "num_free_blocks": self.block_manager.num_free_blocks,
            "bytes_per_token": self.cache.bytes_per_token,
            "cache_bytes": self.cache.nbytes,
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "num_tokens_run": self.num_tokens_run,
            "num_shared_blocks": self.block_manager.num_shared_blocks,
            "num_forked_blocks": self.block_manager.num_forked_blocks,
            "num_copied_blocks": self.block_manager.num_copied_blocks,
        }
