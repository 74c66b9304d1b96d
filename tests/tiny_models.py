"""Tiny random model configs for tests: every supported architecture at toy size, built in code (no downloads).

`tiny_config("llama")` gives a transformers config with hidden size 64, 2 layers, 4 query heads (2 key/value heads
where the architecture has GQA), vocabulary 128 and 64 positions, using SDPA attention. Build a model from it with
`AutoModelForCausalLM.from_config(tiny_config(arch))`.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
VOCAB = 128
POSITIONS = 64

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3", "gpt_neox")

# Architectures whose attention has separate key/value head counts (grouped-query attention).
_GQA = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3"}


def tiny_config(arch: str, **overrides) -> PretrainedConfig:
    """A tiny random config of `arch` (one of `ARCHS`); keyword overrides are passed to the config."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    head_dim = HIDDEN // HEADS
    kwargs: dict = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN,
        vocab_size=VOCAB,
        max_position_embeddings=POSITIONS,
        # Small ids: some architectures default to pad/bos/eos ids beyond a 128-token vocabulary.
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch in _GQA:
        kwargs["num_key_value_heads"] = KV_HEADS
    if arch in {"qwen3", "gemma", "gemma3_text"}:
        kwargs["head_dim"] = head_dim  # these default to a large fixed head_dim (128 / 256)
    if arch == "gemma3_text":
        # One local (sliding-window) and one global layer, so both RoPE kinds are present.
        kwargs.update(
            layer_types=["sliding_attention", "full_attention"], sliding_window=16, query_pre_attn_scalar=head_dim
        )
    if arch == "phi3":
        kwargs["original_max_position_embeddings"] = POSITIONS  # defaults to 4096, the real Phi-3 value
    kwargs.update(overrides)
    config = AutoConfig.for_model(arch, **kwargs)
    config._attn_implementation = "sdpa"
    return config


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE (exact round trip of any text) trained in milliseconds on a stdlib module.

    Special tokens: <pad>=0, <s>=1, </s>=2 (the ids tiny_config uses).
    """
    import textwrap

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with open(textwrap.__file__, encoding="utf-8") as f:
        tok.train_from_iterator([f.read()], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_model(path, arch: str = "llama", seed: int = 0, **overrides):
    """Write a tiny random model of `arch` plus tiny_tokenizer() to `path` (a from_pretrained-able directory)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=len(tokenizer), **overrides))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def stdlib_corpus(path, n_files: int = 6, min_chars: int = 20_000):
    """Copy a few long stdlib modules (real text, present wherever Python is) into `path` as a corpus directory."""
    import shutil
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(stdlib.glob("*.py")) if p.stat().st_size >= min_chars][:n_files]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, out / f.name)
    return out
