"""The single-process engine against Hugging Face ``generate`` (each prompt alone, greedy, float32)."""

from __future__ import annotations

import asyncio
import copy
import random

import pytest
import torch
import transformers  # the reference: a test dependency, so a missing one fails rather than skips

from latentmoe import LLM, SamplingParams
from latentmoe.engine.async_engine import AsyncLLM
from latentmoe.model.tiny import TINY_CONFIG, make_tiny

MAX_NEW = 12


def make_prompts(vocab: int, seed: int, n: int = 14) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 2, 200, 7, 64, 65, 3, 128, 31, 150, 5, 99, 17, 40][:n]
    return [[rng.randrange(2, vocab) for _ in range(length)] for length in lengths]


def hf_greedy(path, prompts, max_new=MAX_NEW) -> list[list[int]]:
    hf = transformers.DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        with torch.no_grad():
            seq = hf.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False, top_k=None, top_p=None,
                              pad_token_id=0)
        outs.append(seq[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module")
def second_dir(tmp_path_factory):
    """A second random configuration: no q_lora, plain greedy routing, all layers MoE, no YaRN."""
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg.update(q_lora_rank=None, topk_method="greedy", n_group=None, topk_group=None, first_k_dense_replace=0,
               rope_scaling=None, num_attention_heads=2, kv_lora_rank=48, num_experts_per_tok=3)
    return make_tiny(tmp_path_factory.mktemp("second"), seed=11, config=cfg)


@pytest.fixture(scope="module")
def reference(tiny_dir, second_dir):
    refs = {}
    for name, path in (("tiny", tiny_dir), ("second", second_dir)):
        prompts = make_prompts(1024, seed=len(name))
        refs[name] = (path, prompts, hf_greedy(path, prompts))
    return refs


GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


@pytest.mark.parametrize("model", ["tiny", "second"])
@pytest.mark.parametrize("setup", [
    dict(),  # everything fits, one prefill per prompt
    dict(block_size=4, num_blocks=90, max_num_seqs=6),  # forces preemption by recompute
    dict(block_size=8, max_num_batched_tokens=16),  # chunked prefill at a small token budget
    dict(prefill_mla="absorbed", block_size=16),
])
def test_batch_matches_hf_alone(reference, model, setup):
    path, prompts, expected = reference[model]
    llm = LLM(model=str(path), **setup)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    stats = llm.cache_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]
    if "num_blocks" in setup:
        assert llm.engine.num_preemptions > 0, "the tiny cache did not force preemption"


def test_requests_arriving_while_others_decode(reference):
    path, prompts, expected = reference["tiny"]
    llm = LLM(model=str(path), block_size=8, max_num_batched_tokens=64)
    engine = llm.engine
    pending = list(enumerate(prompts))
    results: dict[str, list[int]] = {}
    ids = {}
    steps = 0
    while pending or engine.has_unfinished:
        if pending and steps % 3 == 0:  # a new request every third step, while others run
            i, p = pending.pop(0)
            ids[engine.add_request(p, GREEDY)] = i
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.token_ids
        steps += 1
    assert [results[r] for r in sorted(ids, key=ids.get)] == expected


def test_cache_holds_latents_only(tiny_dir):
    llm = LLM(model=str(tiny_dir), block_size=16, num_blocks=10)
    cfg = llm.engine.model_config
    stats = llm.cache_stats()
    expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    assert stats["bytes_per_token"] == expected
    kv = llm.engine.cache.kv
    assert kv.numel() * kv.element_size() // stats["num_blocks"] == 16 * expected  # really allocated per block
    half = LLM(model=str(tiny_dir), dtype="bfloat16", block_size=16, cache_bytes=16 * expected // 2 * 7)
    assert half.cache_stats()["bytes_per_token"] == expected // 2 and half.cache_stats()["num_blocks"] == 7


def test_no_leaks_after_finished_stopped_aborted_preempted(tiny_dir):
    llm = LLM(model=str(tiny_dir), block_size=4, num_blocks=40, max_num_seqs=8)
    engine = llm.engine
    rng = random.Random(3)
    live = set()
    for i in range(30):
        prompt = [rng.randrange(2, 1024) for _ in range(rng.randrange(1, 40))]
        kind = i % 4
        params = SamplingParams(max_tokens=rng.randrange(1, 20), temperature=0.0 if kind else 0.8, seed=i,
                                stop_token_ids=[rng.randrange(2, 1024) for _ in range(50)] if kind == 2 else None,
                                ignore_eos=kind == 3)
        live.add(engine.add_request(prompt, params))
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
        if i % 5 == 4 and live:  # abort someone, waiting or running
            victim = sorted(live)[0]
            engine.abort_request(victim)
            live.discard(victim)
    while engine.has_unfinished:
        engine.step()
    assert engine.num_preemptions > 0
    stats = llm.cache_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] == 40


def test_seeded_sampling_is_batch_independent(tiny_dir):
    llm = LLM(model=str(tiny_dir))
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = llm.generate([[5, 6, 7, 8]], params)[0].token_ids
    others = [SamplingParams(max_tokens=20, temperature=1.0, seed=s) for s in range(5)]
    batch = llm.generate([[9, 10], [5, 6, 7, 8], [11] * 30, [12, 13, 14]],
                         [others[0], params, others[1], others[2]])
    assert batch[1].token_ids == alone
    # and under preemption (recompute) too
    tight = LLM(model=str(tiny_dir), block_size=4, num_blocks=12, max_num_seqs=4)
    outs = tight.generate([[5, 6, 7, 8], [3] * 20, [4] * 15], [params, others[3], others[4]])
    assert outs[0].token_ids == alone
    assert len({tuple(o.token_ids) for o in batch}) > 1


def test_stop_conditions(tiny_dir):
    llm = LLM(model=str(tiny_dir))
    prompt = [5, 6, 7]
    free = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    # a stop token id: generation ends at its first occurrence, token included
    stop_id = free.token_ids[4]
    first = free.token_ids.index(stop_id)
    out = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id and out.token_ids == free.token_ids[:first + 1]
    # a stop string: the text ends before it
    text = free.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if stop.strip():
        out = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, stop=[stop]))[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == text[: text.index(stop)]


def test_text_prompt_and_bad_input(tiny_dir):
    llm = LLM(model=str(tiny_dir))
    out = llm.generate("Hello experts", SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert out.prompt_token_ids[0] == llm.tokenizer.bos_token_id and len(out.token_ids) >= 1
    for bad, message in (("", "prompt is empty"), ([], "prompt is empty"), ([5, 99999], "outside the vocabulary"),
                         ([1.5], "token ids"), ([7] * 3000, "context length")):
        with pytest.raises(ValueError, match=message):
            llm.generate([bad], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    stats = llm.cache_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and stats["num_waiting"] == 0


def test_async_engine_streams_and_aborts(tiny_dir):
    llm = LLM(model=str(tiny_dir), block_size=4)
    engine = llm.engine
    expected = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    async_llm = AsyncLLM(engine)

    async def main():
        deltas, texts = [], []
        async for out in async_llm.generate([5, 6, 7], SamplingParams(max_tokens=16, temperature=0.0,
                                                                      ignore_eos=True)):
            deltas += out.delta_token_ids
            texts.append(out.delta_text)
        assert deltas == expected.token_ids and "".join(texts) == expected.text

        # a consumer that goes away mid-stream aborts its request
        gen = async_llm.generate([8] * 30, SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True))
        await gen.__anext__()
        await gen.aclose()
        with pytest.raises(ValueError, match="prompt is empty"):
            async for _ in async_llm.generate([], GREEDY):
                pass
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not engine.has_unfinished:
                break

    try:
        asyncio.run(main())
    finally:
        async_llm.shutdown()
    stats = llm.cache_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and not engine.has_unfinished


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=99, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=["zz"]),
], ids=["greedy", "seeded", "stop-string"])
def test_resumed_request_continues_its_stream(tiny_dir, params):
    """A request moved from a failed attention shard: given the tokens and characters its client already has,
    a fresh engine goes on with the same tokens and text, and repeats nothing."""
    prompt = "The experts of a mixture"
    whole = LLM(model=str(tiny_dir)).engine
    request_id = whole.add_request(prompt, params)
    stream = []  # (tokens so far, characters of text so far) after each output
    while whole.has_unfinished:
        for out in whole.step():
            stream.append((list(out.token_ids), len(out.text)))
    tokens, text = out.token_ids, out.text
    for cut in (1, 5, len(stream) // 2, len(stream) - 1):
        have_tokens, have_chars = stream[cut - 1]
        engine = LLM(model=str(tiny_dir)).engine
        engine.add_request(prompt, params, request_id=request_id, output_token_ids=have_tokens,
                           num_output_chars=have_chars)
        deltas, delta_text = [], ""
        while engine.has_unfinished:
            for out in engine.step():
                deltas += out.delta_token_ids
                delta_text += out.delta_text
        assert have_tokens + deltas == tokens == out.token_ids
        assert text[:have_chars] + delta_text == text == out.text
        assert engine.cache_stats()["num_free_blocks"] == engine.cache_stats()["num_blocks"]
