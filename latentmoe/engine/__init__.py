"""One shard's engine, in plain Python (no Ray): scheduler, block manager, latent cache, model runner, sampler,
detokenizer, and ``LLMEngine`` over them; ``AsyncLLM`` puts an asyncio front on it."""
