"""Logprobs, prompt logprobs, n / best_of forks and vLLM's sampling fields in the single-process engine,
against transformers on the same checkpoint (float32): its log-softmax, its ``generate`` with
``repetition_penalty`` (``RepetitionPenaltyLogitsProcessor``), and OpenAI's formula for presence and
frequency penalties applied to its logits step by step."""

from __future__ import annotations

import random

import pytest
import torch

from latentmoe import LLM, SamplingParams

import transformers  # noqa: E402 (a test dependency: the reference, never skipped)

TOL = 1e-4


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return transformers.DeepseekV2ForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """``[len(ids), V]``: row i is the log-softmax of the logits after ids[: i + 1]."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def check_position(lp: dict, token: int, ref_row: torch.Tensor, num_top: int) -> None:
    assert abs(lp[token] - ref_row[token].item()) < TOL, (token, lp[token], ref_row[token].item())
    top = list(lp.items())[:num_top]
    ref_values, ref_ids = ref_row.topk(num_top)
    assert [v for _, v in top] == pytest.approx(ref_values.tolist(), abs=TOL)
    # ties aside, the same tokens in the same order
    assert [t for t, _ in top] == ref_ids.tolist() or torch.allclose(ref_values[:-1], ref_values[1:])
    assert len(lp) in (num_top, num_top + 1) and (len(lp) == num_top) == (token in dict(top))


def prompts(n: int, seed: int, lengths=(1, 9, 70, 33, 130, 2)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 1024) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


@pytest.mark.parametrize("setup", [
    dict(),
    dict(block_size=8, max_num_batched_tokens=24),  # chunked prefill: prompt logprobs over several chunks
    dict(block_size=4, num_blocks=64, max_num_seqs=6),  # preemption by recompute
], ids=["whole", "chunked", "preempted"])
def test_logprobs_and_prompt_logprobs_match_transformers(tiny_dir, hf, setup):
    llm = LLM(model=str(tiny_dir), **setup)
    batch = prompts(6, seed=1)
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=5, prompt_logprobs=3),
              SamplingParams(max_tokens=8, temperature=0.8, seed=7, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),  # neutral, in the same steps
              SamplingParams(max_tokens=8, temperature=1.0, top_k=5, seed=3, ignore_eos=True, logprobs=0,
                             prompt_logprobs=0, repetition_penalty=1.5),  # logprobs stay raw
              SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, prompt_logprobs=20),
              SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=20, prompt_logprobs=1)]
    outs = llm.generate(batch, params)
    if "num_blocks" in setup:
        assert llm.engine.num_preemptions > 0
    for prompt, p, out in zip(batch, params, outs):
        tokens = out.token_ids
        ref = hf_logprobs(hf, prompt + tokens)
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None
        else:
            assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
            for q in range(1, len(prompt)):
                check_position(out.prompt_logprobs[q], prompt[q], ref[q - 1], p.prompt_logprobs)
        c = out.outputs[0]
        if p.logprobs is None:
            assert c.logprobs is None
            continue
        assert len(c.logprobs) == len(tokens)
        for i, token in enumerate(tokens):
            check_position(c.logprobs[i], token, ref[len(prompt) - 1 + i], p.logprobs)
        assert c.cumulative_logprob == pytest.approx(sum(ref[len(prompt) - 1 + i, t].item()
                                                         for i, t in enumerate(tokens)), abs=1e-3)
    stats = llm.cache_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_prompt_logprobs_alone_with_max_tokens_0(tiny_dir, hf):
    llm = LLM(model=str(tiny_dir), block_size=8, max_num_batched_tokens=16)
    prompt = prompts(1, seed=4, lengths=(45,))[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=2))[0]
    assert out.token_ids == [] and out.finish_reason == "length" and out.finished
    ref = hf_logprobs(hf, prompt)
    for q in range(1, len(prompt)):
        check_position(out.prompt_logprobs[q], prompt[q], ref[q - 1], 2)
    assert llm.engine.num_tokens_run == len(prompt)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_n_samples_fork_the_prefilled_prompt(tiny_dir):
    """n=4 with a seed: one prefill, shared blocks (copy-on-write), sample i as a lone request with seed+i."""
    llm = LLM(model=str(tiny_dir), block_size=8)
    engine = llm.engine
    prompt = prompts(1, seed=5, lengths=(21,))[0]  # 21 tokens: a full block pair and a shared partial block
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=42, n=4, ignore_eos=True, logprobs=1)
    rid = engine.add_request(prompt, params)
    engine.step()  # the prefill, then the fork
    request = engine.requests[rid]
    tables = [s.seq.block_table for s in request.samples]
    assert len(tables) == 4 and all(t[:2] == tables[0][:2] for t in tables)  # the full blocks: shared
    assert engine.block_manager.num_shared_blocks == 3  # two full blocks and the partial one, not yet written
    engine.step()  # each sample writes its first token: the partial block is copied for all but one
    assert engine.block_manager.num_copied_blocks == 3 and engine.block_manager.num_shared_blocks == 2
    final = None
    while engine.has_unfinished:
        for out in engine.step():
            final = out
    assert final.finished and [c.index for c in final.outputs] == [0, 1, 2, 3]
    assert engine.num_tokens_run == len(prompt) + 4 * 9  # the prompt once; 9 decode steps per sample
    stats = llm.cache_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and stats["num_shared_blocks"] == 0
    samples = [c.token_ids for c in final.outputs]
    assert len({tuple(s) for s in samples}) > 1
    # reproducible, and sample i is what a lone request with seed 42 + i draws (a fresh prefill)
    again = llm.generate([prompt], params)[0]
    assert [c.token_ids for c in again.outputs] == samples
    for i in range(4):
        alone = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=42 + i,
                                                      ignore_eos=True, logprobs=1))[0]
        assert alone.token_ids == samples[i]
        for mine, theirs in zip(alone.outputs[0].logprobs, final.outputs[i].logprobs):
            assert mine.keys() == theirs.keys() and list(mine.values()) == pytest.approx(list(theirs.values()),
                                                                                          abs=TOL)
    # among other requests, in other batches
    mixed = llm.generate([[3] * 50, prompt, [9, 8]], [SamplingParams(max_tokens=5, seed=1), params,
                                                      SamplingParams(max_tokens=7, temperature=0.0)])
    assert [c.token_ids for c in mixed[1].outputs] == samples


def test_best_of_keeps_the_n_most_likely(tiny_dir):
    llm = LLM(model=str(tiny_dir), block_size=4, num_blocks=40, max_num_seqs=8)  # small: forks get preempted
    prompt = [5, 17, 300, 2, 44, 8, 9]
    every = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=9, n=6, ignore_eos=True,
                                                  logprobs=0))[0]
    best = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=9, n=2, best_of=6,
                                                 ignore_eos=True))[0]
    ranked = sorted(every.outputs, key=lambda c: -c.cumulative_logprob)
    assert [c.token_ids for c in best.outputs] == [c.token_ids for c in ranked[:2]]
    assert best.outputs[0].logprobs is None  # not asked for
    assert llm.cache_stats()["num_free_blocks"] == 40


def hf_greedy_with_penalties(hf, prompt, steps, presence=0.0, frequency=0.0, bias=None, repetition=None):
    """Greedy decoding on transformers' logits, with transformers' ``RepetitionPenaltyLogitsProcessor`` and
    OpenAI's formula for the others: mu[j] - c[j] * frequency - (c[j] > 0) * presence, c counted over the
    generated tokens."""
    ids = list(prompt)
    out = []
    processor = transformers.RepetitionPenaltyLogitsProcessor(repetition) if repetition else None
    for _ in range(steps):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
        for t, b in (bias or {}).items():
            logits[t] += b
        if processor is not None:
            logits = processor(torch.tensor([ids]), logits[None])[0]
        counts = torch.zeros_like(logits)
        for t in out:
            counts[t] += 1
        logits = logits - counts * frequency - (counts > 0).float() * presence
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
    return out


def test_penalties_match_independent_references(tiny_dir, hf):
    llm = LLM(model=str(tiny_dir))
    prompt = [42] * 5  # its greedy continuation repeats tokens, so that every penalty changes it
    n = 24
    plain = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0].token_ids
    cases = [dict(repetition=1.6), dict(repetition=0.7), dict(presence=1.5), dict(frequency=2.0),
             dict(presence=-0.5, frequency=1.0), dict(presence=2.0, repetition=1.2, bias={plain[0]: -100.0, 33: 5.0})]
    changed = 0
    for case in cases:
        ref = hf_greedy_with_penalties(hf, prompt, n, **case)
        got = llm.generate([prompt], SamplingParams(
            max_tokens=n, temperature=0.0, ignore_eos=True, presence_penalty=case.get("presence", 0.0),
            frequency_penalty=case.get("frequency", 0.0), repetition_penalty=case.get("repetition", 1.0),
            logit_bias=case.get("bias")))[0].token_ids
        assert got == ref, case
        changed += got != plain
    assert changed == len(cases), "the penalties hardly change the output: the test would not see a wrong one"


def test_per_request_sampling_in_one_batch(tiny_dir):
    """Requests with different fields share steps; each gets what it gets alone."""
    llm = LLM(model=str(tiny_dir))
    batch = prompts(6, seed=8)
    params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(max_tokens=10, temperature=0.7, seed=1, min_p=0.2, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, presence_penalty=2.0,
                             logit_bias={5: 3.0}),
              SamplingParams(max_tokens=10, temperature=1.2, top_k=20, seed=4, frequency_penalty=1.0,
                             ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0.9, seed=5, n=3, ignore_eos=True)]
    together = llm.generate(batch, params)
    for prompt, p, out in zip(batch, params, together):
        alone = llm.generate([prompt], p)[0]
        assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in out.outputs]


def test_min_tokens_min_p_and_stop_string_kept(tiny_dir):
    llm = LLM(model=str(tiny_dir))
    eos = llm.engine.model_config.eos_token_ids[0]
    prompt = [4, 5, 6]
    # EOS made certain by a bias: it ends generation at once, unless min_tokens holds it off
    ends = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, logit_bias={eos: 100.0}))[0]
    assert ends.token_ids == [eos] and ends.finish_reason == "stop"
    held = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, logit_bias={eos: 100.0},
                                                 min_tokens=4))[0]
    assert len(held.token_ids) == 5 and held.token_ids[-1] == eos and eos not in held.token_ids[:4]
    # min_p = 1 keeps only the most likely token: sampling is then greedy
    greedy = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    sharp = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=1.5, min_p=1.0, seed=3,
                                                  ignore_eos=True))[0]
    assert sharp.token_ids == greedy.token_ids
    text = greedy.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if stop.strip():
        kept = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, stop=[stop],
                                                     include_stop_str_in_output=True))[0]
        assert kept.text == text[: text.index(stop) + len(stop)] and kept.stop_reason == stop


@pytest.mark.parametrize("kwargs,name", [
    (dict(n=0), "n"), (dict(n=2, best_of=1), "best_of"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=2.5), "repetition_penalty"), (dict(min_p=1.5), "min_p"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens"), (dict(logit_bias={3: 101.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"), (dict(logprobs=21), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"), (dict(include_stop_str_in_output=1), "include_stop_str"),
])
def test_new_fields_out_of_range_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        SamplingParams(**kwargs)


def test_logit_bias_outside_the_vocabulary(tiny_dir):
    llm = LLM(model=str(tiny_dir))
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([[1, 2]], SamplingParams(logit_bias={5000: 1.0}))
