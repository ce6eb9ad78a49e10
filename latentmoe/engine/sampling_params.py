"""Per-request sampling parameters, validated on construction (``ValueError`` naming the parameter).

vLLM's semantics where OpenAI is silent: penalties, ``min_p``, ``min_tokens``, ``logit_bias`` and
``include_stop_str_in_output`` act as they do in vLLM, and ``logprobs`` / ``prompt_logprobs`` are the
log-softmax of the raw logits (before temperature, penalties and filtering).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from latentmoe.engine.engine_config import reject_unknown_keys

MAX_LOGPROBS = 20  # top logprobs per position, as OpenAI's and vLLM's default limit
MAX_SAMPLES = 32  # n and best_of


@dataclass
class SamplingParams:
    max_tokens: int = 16  # >= 1; 0 with prompt_logprobs: only the prompt is run
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None  # same seed, same tokens, whatever else is in the batch
    stop: list[str] = field(default_factory=list)  # the text ends before the first stop string
    stop_token_ids: list[int] = field(default_factory=list)  # generation ends at one (token included)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1  # samples returned
    best_of: int | None = None  # samples drawn (>= n); the n with the highest cumulative logprob are returned
    presence_penalty: float = 0.0  # [-2, 2], OpenAI: minus alpha if the token occurs in the output
    frequency_penalty: float = 0.0  # [-2, 2], OpenAI: minus alpha per occurrence in the output
    repetition_penalty: float = 1.0  # (0, 2], CTRL / vLLM: over prompt and output tokens
    min_p: float = 0.0  # [0, 1]: drop tokens below min_p * the top token's probability
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens were generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, [-100, 100]
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # per generated token: its logprob and the top-N, N in [0, 20]
    prompt_logprobs: int | None = None  # the same for every prompt token (computed during prefill)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        if not _is_int(self.max_tokens) or self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r} "
                             "(0 only with prompt_logprobs: the prompt's logprobs alone)")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if len(self.stop) > 16:
            raise ValueError(f"stop takes at most 16 strings, got {len(self.stop)}")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_SAMPLES:
            raise ValueError(f"n must be an integer in [1, {MAX_SAMPLES}], got {self.n!r}")
        if self.best_of is not None and (not _is_int(self.best_of) or not self.n <= self.best_of <= MAX_SAMPLES):
            raise ValueError(f"best_of must be an integer in [n={self.n}, {MAX_SAMPLES}], got {self.best_of!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= max(self.max_tokens, 0):
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        if len(self.logit_bias) > 300:
            raise ValueError(f"logit_bias takes at most 300 tokens, got {len(self.logit_bias)}")
        for token, bias in self.logit_bias.items():
            if not _is_int(token) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {token!r}")
            if not _is_number(bias) or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r} for token {token}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def num_samples(self) -> int:
        """Sequences drawn from the prompt: ``best_of``, else ``n``."""
        return self.best_of or self.n

    @property
    def modifies_logits(self) -> bool:
        """Anything between the raw logits and temperature: min_tokens, logit_bias, penalties."""
        return bool(self.min_tokens or self.logit_bias or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)

    def check_vocab(self, vocab_size: int) -> None:
        """``ValueError`` for logit_bias token ids outside ``[0, vocab_size)``."""
        bad = [t for t in self.logit_bias if t >= vocab_size]
        if bad:
            raise ValueError(f"logit_bias token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        reject_unknown_keys(cls, d, "sampling parameter")
        return cls(**d)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN
