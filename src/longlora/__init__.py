"""longlora: LongLoRA context extension for transformers 5 (S2-Attn, LoRA+, position interpolation).

`import longlora` registers the "s2_sdpa" attention with transformers. Heavier parts (training, evaluation, merge,
generation) load on first use of their functions.
"""

from .adapters import apply_lora_plus, format_trainable_counts, trainable_parameter_counts
from .attention import s2_attention, set_backend, use_backend
from .integration import S2_ATTENTION, disable_s2_attention, enable_s2_attention
from .rope import apply_position_interpolation, original_context_length, rope_factor_for

__version__ = "0.1.0"


def __getattr__(name):
    # the workflow functions, imported lazily so that `import longlora` stays light
    lazy = {
        "run_training": "train", "cmd_train": "train", "TrainConfig": "config", "SFTConfig": "sft",
        "cmd_sft": "sft", "load_model_and_tokenizer": "modeling", "merge_adapter": "merge", "ask": "generate",
        "chat": "generate", "evaluate_perplexity": "evaluate.perplexity", "run_passkey": "evaluate.passkey",
        "load_documents": "data", "tokenize_and_block": "data", "run_quickstart": "quickstart",
        "enable_sequence_parallel": "sequence_parallel", "shard_batch": "sequence_parallel",
        "sequence_parallel_loss": "sequence_parallel",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(f".{lazy[name]}", __name__), name)
    raise AttributeError(f"module 'longlora' has no attribute {name!r}")


__all__ = [
    "S2_ATTENTION", "apply_lora_plus", "apply_position_interpolation", "disable_s2_attention", "enable_s2_attention",
    "format_trainable_counts", "original_context_length", "rope_factor_for", "s2_attention", "set_backend",
    "use_backend",
    "trainable_parameter_counts", "__version__",
    "run_training", "cmd_train", "TrainConfig", "SFTConfig", "cmd_sft", "load_model_and_tokenizer", "merge_adapter",
    "ask", "chat", "evaluate_perplexity", "run_passkey", "load_documents", "tokenize_and_block", "run_quickstart",
    "enable_sequence_parallel", "shard_batch", "sequence_parallel_loss",
]
