"""Tiny Hugging Face model folders built on the spot (no hub): a BPE tokenizer trained with `tokenizers`
on the given text, and a random-init GPT-2 or Llama sized to it, written with `save_pretrained`.

Tests and `fedswarm bench lora` use these in place of a downloaded checkpoint.
"""
from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a PreTrainedTokenizerFast with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(family: str, vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A random-init causal LM of `family` ('gpt2', 'llama', 'qwen2' or 'mistral') with `vocab_size` embeddings."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if family == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=hidden, n_layer=layers, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    elif family in ("llama", "qwen2", "mistral"):
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
        config = cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, bos_token_id=0,
                     eos_token_id=0, pad_token_id=1, tie_word_embeddings=True)
    else:
        raise ValueError(f"unknown family {family!r}: use gpt2, llama, qwen2 or mistral")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def save_tiny_hf(folder: str | Path, family: str, texts: Iterable[str], vocab_size: int = 512, seed: int = 0,
                 layers: int = 2, hidden: int = 64) -> Path:
    """Train a tokenizer on `texts`, build a model sized to it, save both to `folder`; returns the folder."""
    folder = Path(folder)
    tokenizer = train_tokenizer(texts, vocab_size)
    model = build_tiny_model(family, len(tokenizer), seed, layers, hidden)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


COLORS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]


def fact_records(kind: str, n: int, seed: int) -> list[dict]:
    """Synthetic facts with a pattern to learn ('add': sums, 'color': lookups), as text and as prompt/response."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(50), rng.randrange(50)
        if kind == "add":
            prompt, response = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        else:
            prompt, response = f"Which color is item {a}?", f"Item {a} is {COLORS[a % len(COLORS)]}."
        out.append({"text": f"{prompt} {response}", "prompt": prompt, "response": response})
    return out
