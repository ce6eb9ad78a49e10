"""What a load test sends: one ``RequestSpec`` per request index, and when (Poisson arrivals).

Plain and deterministic: request ``i`` of a run depends only on the seed and ``i`` (its own
``numpy`` generator seeded with ``[seed, i]``), so a run by count or by duration, over HTTP or gRPC,
sends the same requests in the same order. No network here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

# Common English words for synthetic chat prompts: most are one token in any BPE vocabulary.
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an had "
    "they you were their one all we can her has there been if more when will would who so no time about out up "
    "into them some could only other new than then its also two after first these may any where most over "
    "through years such well very down should because each just those people how too little state good make "
    "world still own see work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three states himself few "
    "house use during without again place around however home small found thought went say part once general "
    "high upon school every does got united left number course war until always away something fact though "
    "water less public put think almost hand enough far took head yet government system better set told "
    "nothing night end why called find going look asked later knew point next program city business give "
    "group toward young days let room president side social given present several order national possible "
    "rather second face per among form important often things looked early white case john become large big "
    "need four within felt along children saw best church ever least power development light thing seemed "
    "family interest want members mind country area others done turned although open god service certain kind "
    "problem began different door thus help sense means whole matter perhaps itself york times law human line "
    "above name example action company hands local show whether five history gave today either act feet across "
    "taken past quite anything seen having death week experience body word half really field am car words "
    "already themselves information tell together college shall money period held keep sure probably free seems "
    "political real cannot behind miss question air office making brought whose special major heard problems "
    "ago became federal study available known result street economic boy position reason change south board "
    "individual job society areas west close turn love community true court force full seem am expert mixture "
    "token layer shard router latent cache attention"
).split()


@dataclass(frozen=True)
class LengthDist:
    """Lengths ``round(N(mean, std))`` clipped to ``[1, ...)``, or uniform integers in ``[low, high]`` if a range."""

    mean: int
    std: float = 0.0
    low: int | None = None
    high: int | None = None

    def __post_init__(self):
        if (self.low is None) != (self.high is None):
            raise ValueError(f"give both ends of a length range, got low={self.low}, high={self.high}")
        if self.low is not None:
            if not 1 <= self.low <= self.high:
                raise ValueError(f"a length range needs 1 <= low <= high, got {self.low}:{self.high}")
        elif not isinstance(self.mean, int) or self.mean < 1:
            raise ValueError(f"a mean length must be a positive integer, got {self.mean!r}")
        if self.std < 0:
            raise ValueError(f"a length std must be >= 0, got {self.std}")

    @classmethod
    def parse(cls, mean: int, std: float = 0.0, range_: str | None = None) -> "LengthDist":
        """``range_`` is ``"LOW:HIGH"`` (inclusive) and wins over ``mean``/``std``."""
        if range_ is None:
            return cls(mean, std)
        try:
            low, high = (int(part) for part in range_.split(":"))
        except ValueError:
            raise ValueError(f"a length range is LOW:HIGH with integers, got {range_!r}") from None
        return cls(mean, 0.0, low, high)

    def sample(self, rng: np.random.Generator) -> int:
        if self.low is not None:
            return int(rng.integers(self.low, self.high + 1))
        if self.std == 0:
            return self.mean
        return max(1, int(round(rng.normal(self.mean, self.std))))


@dataclass(frozen=True)
class RequestSpec:
    """One request: a prompt (text, or token ids for /v1/completions and gRPC), its output length and seed.

    ``input_len`` is the synthetic length asked for (tokens for id prompts, words for text) or None for a
    prompt from a file; the server's usage gives the true token count.
    """

    index: int
    prompt: str | list[int]
    max_tokens: int
    seed: int
    input_len: int | None = None


@dataclass(frozen=True)
class Workload:
    """Synthetic prompts (``prompts=None``) of ``input_len`` random token ids in ``[0, vocab_size)``, or
    random words if ``text``; or the prompts of a file, cycled. Output lengths from ``output_len`` unless a
    file line gives ``max_tokens``."""

    input_len: LengthDist
    output_len: LengthDist
    seed: int = 0
    text: bool = False
    vocab_size: int = 1024
    prompts: tuple[dict, ...] | None = None

    def __post_init__(self):
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.prompts is not None and not self.prompts:
            raise ValueError("the prompts file has no prompts")

    def request(self, index: int) -> RequestSpec:
        rng = np.random.default_rng([self.seed, index])
        seed = int(rng.integers(0, 2**31))
        if self.prompts is not None:
            line = self.prompts[index % len(self.prompts)]
            max_tokens = line.get("max_tokens") or self.output_len.sample(rng)
            return RequestSpec(index, line["prompt"], int(max_tokens), seed)
        input_len, max_tokens = self.input_len.sample(rng), self.output_len.sample(rng)
        if self.text:
            prompt = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), input_len))
        else:
            prompt = rng.integers(0, self.vocab_size, input_len).tolist()
        return RequestSpec(index, prompt, max_tokens, seed, input_len)

    def __iter__(self) -> Iterator[RequestSpec]:
        index = 0
        while True:
            yield self.request(index)
            index += 1


def load_prompts(path: str | Path) -> tuple[dict, ...]:
    """A JSONL file of ``{"prompt": str | [int, ...], "max_tokens": int (optional)}``; blank lines are skipped.

    Raises ``ValueError`` naming the line for anything else."""
    lines = []
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON: {e}") from None
        if not isinstance(line, dict) or "prompt" not in line:
            raise ValueError(f"{path}:{number}: expected an object with a \"prompt\", got {raw[:80]}")
        prompt = line["prompt"]
        ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        if not (isinstance(prompt, str) or ids) or not prompt:
            raise ValueError(f"{path}:{number}: prompt must be a non-empty string or list of token ids")
        max_tokens = line.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise ValueError(f"{path}:{number}: max_tokens must be a positive integer, got {max_tokens!r}")
        lines.append({"prompt": prompt, "max_tokens": max_tokens})
    if not lines:
        raise ValueError(f"{path}: no prompts")
    return tuple(lines)


def arrival_times(rate: float, seed: int = 0) -> Iterator[float]:
    """Send times in seconds from the start of a run: a Poisson process of ``rate`` requests per second
    (exponential gaps of mean ``1 / rate``); ``rate = inf`` sends everything at time 0."""
    if not rate > 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    rng = np.random.default_rng([seed, 2**32])  # a stream apart from the requests' own ([seed, i], i < 2**32)
    t = 0.0
    while True:
        yield t
        if rate != float("inf"):
            t += float(rng.exponential(1.0 / rate))
