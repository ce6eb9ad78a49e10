"""Continuous batching. The scheduler knows nothing of tensors: it decides which sequences run
and how many tokens each, under a token budget per step and a cap on running sequences.

Each step: running sequences first (one decode token each, or the next chunk of a chunked
prefill), oldest first; then waiting ones, first come first served, while the token budget,
the sequence cap and the free blocks allow. When a running sequence needs a block and none is
free, the newest running sequence is preempted: its blocks are freed and it goes back to the
front of the queue, to be recomputed from its prompt and the tokens it already produced.

The samples of one prompt (``n`` / ``best_of``) are forked from its sequence when its prefill
ends: they share its blocks, and the block manager copies a shared block before one writes to it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from latentmoe.engine.block_manager import BlockManager
from latentmoe.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    eos_token_ids: tuple[int, ...] = ()


@dataclass
class Chunk:
    """``num_tokens`` tokens of ``seq`` from position ``start``; ``sample``: its last token's logits are sampled;
    ``all_logits``: every token's logits are wanted (prompt logprobs), not only the sampled one."""

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool
    all_logits: bool = False


@dataclass
class ScheduledBatch:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) cache blocks, before the step

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self._by_id: dict[str, Sequence] = {}

    # ---- requests ---------------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        assert seq.request_id not in self._by_id, f"duplicate request id {seq.request_id!r}"
        assert 0 < seq.num_tokens < self.config.max_model_len, f"{seq}: max_model_len={self.config.max_model_len}"
        self._by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is; its blocks are freed. ``None`` if it is not here."""
        return self.finish(request_id, "abort")

    def finish(self, request_id: str, reason: str, stop_reason: int | str | None = None) -> Sequence | None:
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status, seq.finish_reason, seq.stop_reason = SequenceStatus.FINISHED, reason, stop_reason
        return seq

    @property
    def has_unfinished(self) -> bool:
        return bool(self._by_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ---------------------------------------------------------------------------------------------

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.blocks.can_grow(seq, n):
                victim = self.running[-1]  # the newest; never one already in this batch (they come before seq)
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted itself; self.running[i] is now the next one
            batch.copies += self.blocks.grow(seq, n)
            batch.chunks.append(Chunk(seq, seq.num_computed_tokens, n, n == seq.num_uncomputed_tokens))
            budget -= n
            i += 1
        if batch.preempted:  # don't admit new work in a step that had to give blocks back
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.can_grow(seq, n):
                break
            self.waiting.popleft()
            batch.copies += self.blocks.grow(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.chunks.append(Chunk(seq, seq.num_computed_tokens, n, n == seq.num_uncomputed_tokens))
            budget -= n
        return batch

    def fork(self, chunk: Chunk, batch: ScheduledBatch, child: Sequence) -> Sequence:
        """After ``chunk`` ran, start ``child`` (a new sequence of the same prompt) where ``chunk.seq`` stands:
        same blocks (shared), same computed tokens. It samples from the chunk's logits in ``update``."""
        parent = chunk.seq
        assert child.request_id not in self._by_id, f"duplicate request id {child.request_id!r}"
        assert parent.status is SequenceStatus.RUNNING and chunk.sample, f"{parent} cannot fork"
        self.blocks.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = SequenceStatus.RUNNING
        self._by_id[child.request_id] = child
        self.running.insert(self.running.index(parent) + 1, child)
        batch.chunks.append(Chunk(child, chunk.start, chunk.num_tokens, True))
        return child

    def update(self, batch: ScheduledBatch, sampled: dict[str, int]) -> list[Sequence]:
        """Record a step's results: computed tokens, and the token sampled for each sampling chunk.

        Returns the sequences that finished (EOS, a stop token id, ``max_tokens``, or the context length).
        A sequence with ``max_tokens == 0`` finishes ("length") when its prompt is computed, with nothing sampled.
        """
        finished = []
        for chunk in batch.chunks:
            seq = chunk.seq
            if seq.is_finished:  # aborted meanwhile
                continue
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            if not chunk.sample:
                continue
            params = seq.params
            if params.max_tokens == 0:
                finished.append(self.finish(seq.request_id, "length"))
                continue
            token = sampled[seq.request_id]
            seq.output_token_ids.append(token)
            if token in params.stop_token_ids:
                reason = ("stop", token)
            elif not params.ignore_eos and token in self.config.eos_token_ids:
                reason = ("stop", None)
            elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.config.max_model_len:
                reason = ("length", None)
            else:
                continue
            finished.append(self.finish(seq.request_id, *reason))
        return finished
