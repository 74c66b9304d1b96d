"""longlora: LongLoRA context extension for transformers 5 (S2-Attn, LoRA+, position interpolation)."""

from .attention import s2_attention
from .integration import S2_ATTENTION, disable_s2_attention, enable_s2_attention

__version__ = "0.1.0"

__all__ = ["S2_ATTENTION", "disable_s2_attention", "enable_s2_attention", "s2_attention", "__version__"]
