"""The workload generator on its own: deterministic per request, lengths as asked, prompts files, arrivals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from latentmoe.loadtest.workload import WORDS, LengthDist, Workload, arrival_times, load_prompts


def test_requests_depend_only_on_seed_and_index():
    w = Workload(LengthDist(32, 8.0), LengthDist(16, 4.0), seed=7)
    forward = [w.request(i) for i in range(20)]
    assert [w.request(i) for i in reversed(range(20))][::-1] == forward  # order does not matter
    assert Workload(LengthDist(32, 8.0), LengthDist(16, 4.0), seed=7).request(5) == forward[5]
    assert Workload(LengthDist(32, 8.0), LengthDist(16, 4.0), seed=8).request(5) != forward[5]
    assert len({tuple(r.prompt) for r in forward}) == 20 and len({r.seed for r in forward}) == 20
    assert [r.index for r in forward] == list(range(20))


def test_fixed_lengths_and_token_ids_in_vocabulary():
    w = Workload(LengthDist(24), LengthDist(8), vocab_size=50)
    for spec in (w.request(i) for i in range(50)):
        assert len(spec.prompt) == spec.input_len == 24 and spec.max_tokens == 8
        assert all(isinstance(t, int) and 0 <= t < 50 for t in spec.prompt)


def test_text_prompts_have_the_asked_number_of_words():
    w = Workload(LengthDist(0, 0.0, 5, 40), LengthDist(4), text=True)
    lengths = []
    for spec in (w.request(i) for i in range(200)):
        words = spec.prompt.split(" ")
        assert len(words) == spec.input_len and set(words) <= set(WORDS)
        lengths.append(spec.input_len)
    assert min(lengths) == 5 and max(lengths) == 40  # both ends of the range are reached


def test_normal_lengths_have_the_asked_moments_and_stay_positive():
    rng = np.random.default_rng(0)
    normal = [LengthDist(100, 20.0).sample(rng) for _ in range(4000)]
    assert abs(np.mean(normal) - 100) < 1.5 and abs(np.std(normal) - 20) < 1.5
    assert min(LengthDist(2, 10.0).sample(rng) for _ in range(500)) == 1  # clipped, never 0 or negative


@pytest.mark.parametrize("args,message", [
    ((0,), "positive"), ((10, -1.0), ">= 0"), ((10, 0.0, 5, None), "both ends"), ((10, 0.0, 9, 3), "low <= high"),
])
def test_bad_length_distributions(args, message):
    with pytest.raises(ValueError, match=message):
        LengthDist(*args)


def test_parse_range():
    assert LengthDist.parse(128, 3.0, "10:20") == LengthDist(128, 0.0, 10, 20)
    assert LengthDist.parse(128, 3.0) == LengthDist(128, 3.0)
    with pytest.raises(ValueError, match="LOW:HIGH"):
        LengthDist.parse(128, 0.0, "10-20")


def test_prompts_file_cycles_and_falls_back_to_the_output_length(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hello", "max_tokens": 3}) + "\n\n" + json.dumps({"prompt": [4, 5]}) + "\n")
    prompts = load_prompts(path)
    w = Workload(LengthDist(1), LengthDist(9), prompts=prompts)
    specs = [w.request(i) for i in range(4)]
    assert [s.prompt for s in specs] == ["hello", [4, 5], "hello", [4, 5]]
    assert [s.max_tokens for s in specs] == [3, 9, 3, 9]
    assert all(s.input_len is None for s in specs)


@pytest.mark.parametrize("line,message", [
    ("{not json", ":1: not valid JSON"), ('{"text": "x"}', ':1: expected an object with a "prompt"'),
    ('{"prompt": ""}', "non-empty"), ('{"prompt": [1, "a"]}', "token ids"),
    ('{"prompt": "x", "max_tokens": 0}', "max_tokens must be a positive integer"),
])
def test_bad_prompts_files_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_prompts(path)


def test_empty_prompts_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(tmp_path / "empty.jsonl")


def test_poisson_arrivals():
    times = np.fromiter(arrival_times(50.0, seed=1), float, count=5000)
    gaps = np.diff(times)
    assert times[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 1 / 50) < 0.002  # exponential gaps of mean 1 / rate ...
    assert abs(gaps.std() / gaps.mean() - 1) < 0.06  # ... whose std equals their mean
    assert list(np.fromiter(arrival_times(50.0, seed=1), float, count=10)) == list(times[:10])
    assert set(np.fromiter(arrival_times(float("inf")), float, count=10)) == {0.0}
    with pytest.raises(ValueError, match="> 0"):
        next(arrival_times(0.0))
