"""Engine throughput vs Hugging Face ``generate`` on the same checkpoint and requests.

    python benchmarks/bench_engine.py [--model DIR] [--num-prompts 64] [--input-len 128] [--output-len 64]

Both run greedy, every request exactly ``output_len`` new tokens (EOS ignored), float32
on this machine's CPU. HF gets the whole batch in one ``generate`` call (as a user would
call it; the prompts have equal length, so no padding). Prints generated tokens/s for
both and their ratio, and saves the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the built-in tiny model)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default="results/bench_engine.json")
    args = ap.parse_args()

    from latentmoe import LLM, SamplingParams
    from latentmoe.model.tiny import default_model_dir

    model = args.model or str(default_model_dir())
    llm = LLM(model=model, dtype=args.dtype)
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(2, vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    llm_params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    load_before = os.getloadavg()
    start = time.perf_counter()
    outs = llm.generate(prompts, llm_params)
    ours_s = time.perf_counter() - start
    ours_tokens = sum(len(o.token_ids) for o in outs)
    result = {
        "model": model, "dtype": args.dtype, "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "loadavg_before": load_before,
        "latentmoe": {"seconds": ours_s, "generated_tokens": ours_tokens, "tokens_per_s": ours_tokens / ours_s},
    }
    print(f"latentmoe: {ours_tokens} tokens in {ours_s:.2f} s = {ours_tokens / ours_s:.1f} tok/s")

    if not args.skip_hf:
        import transformers

        dtype = getattr(torch, args.dtype)
        hf = transformers.DeepseekV2ForCausalLM.from_pretrained(model, dtype=dtype).eval()
        ids = torch.tensor(prompts)
        with torch.no_grad():
            hf.generate(ids[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
            start = time.perf_counter()
            seq = hf.generate(ids, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                              do_sample=False, top_k=None, top_p=None, pad_token_id=0)
            hf_s = time.perf_counter() - start
        hf_tokens = (seq.shape[1] - ids.shape[1]) * seq.shape[0]
        result["hf_generate"] = {"seconds": hf_s, "generated_tokens": hf_tokens, "tokens_per_s": hf_tokens / hf_s}
        result["ratio"] = (ours_tokens / ours_s) / (hf_tokens / hf_s)
        same = sum(o.token_ids == seq[i, ids.shape[1]:].tolist() for i, o in enumerate(outs))
        result["identical_outputs"] = f"{same}/{len(outs)}"
        print(f"hf generate: {hf_tokens} tokens in {hf_s:.2f} s = {hf_tokens / hf_s:.1f} tok/s")
        print(f"ratio latentmoe / hf: {result['ratio']:.2f}x  (identical greedy outputs: {same}/{len(outs)})")
    result["loadavg_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
