"""The built-in tiny model's tokenizer: a byte-level BPE with exactly ``vocab_size`` ids.

Trained with the ``tokenizers`` library on a small built-in text, so every id the tiny
model can emit decodes, and any text (any language, emoji) encodes: the 256 byte symbols
are in the alphabet, so multi-byte characters can be split across tokens, which is what
incremental detokenization must cope with. Ids 0 and 1 are BOS and EOS, as DeepSeek's.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# DeepSeek-V2-Chat's conversation format: a system prompt, then "User: ...\n\n" and "Assistant: ...<eos>".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_TEXT = """
A mixture of experts replaces the feed-forward block of a transformer with many small experts and a gate
that sends each token to a few of them. DeepSeek-V2 uses fine-grained routed experts and shared experts that
every token visits. Multi-head latent attention compresses keys and values into a latent vector, so the cache
holds five hundred and seventy-six values per token per layer instead of thousands. The serving system keeps
attention on one set of machines and experts on another; tokens travel between them by all-to-all, once per
layer, and each token reaches at most three devices because the gate first picks the best groups of experts.
Requests arrive, wait in a queue, run in a batch that changes at every step, and leave when they are finished.
The scheduler decides which sequences run and how many tokens each; the cache is paged in blocks of tokens.
When memory runs out, a request is preempted and later recomputed from its prompt and the tokens it produced.
Operators ask how the experts are loaded: which are hot, which are cold, how balanced the shards are, and
whether the imbalance is what makes the system slow. Latency is measured as time to first token, time between
tokens, and time to the last token; throughput as requests and tokens per second. The quick brown fox jumps
over the lazy dog. Hello, world! What is the capital of France? Paris is the capital of France. One, two,
three, four, five, six, seven, eight, nine, ten. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1024 4096 32768.
Code: def forward(self, x): return self.down(silu(self.gate(x)) * self.up(x)) # [T, D]
Les experts sont chargés. Die Experten sind geladen. Los expertos están cargados. 専門家の負荷。专家负载。
Эксперты загружены. 전문가 부하. Ελληνικά. café, naïve, über, señor, 🙂 🚀 ✨
"""


def train_tiny_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1, show_progress=False)
    # Repeat the text with small variations so the trainer finds enough merges to fill the vocabulary.
    lines = [line for line in _TEXT.strip().splitlines()]
    corpus = lines + [line.lower() for line in lines] + [line.upper() for line in lines]
    corpus += [" ".join(reversed(line.split())) for line in lines]
    tok.train_from_iterator(corpus, trainer=trainer)
    size = tok.get_vocab_size(with_added_tokens=True)
    if size < vocab_size:  # fill the rest with plain added tokens so every id decodes
        tok.add_tokens([f"<|extra_{i}|>" for i in range(vocab_size - size)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size, tok.get_vocab_size(with_added_tokens=True)
    assert (tok.token_to_id(BOS), tok.token_to_id(EOS)) == (0, 1)
    return tok


def write_tiny_tokenizer(out_dir: str | Path, vocab_size: int | None = None) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template) into ``out_dir``."""
    out_dir = Path(out_dir)
    if vocab_size is None:
        vocab_size = json.loads((out_dir / "config.json").read_text())["vocab_size"]
    train_tiny_tokenizer(vocab_size).save(str(out_dir / "tokenizer.json"))
    config = {
        "bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
