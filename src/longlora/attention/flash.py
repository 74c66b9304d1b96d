"""The "flash" backend: each S2 segment through flash-attn's varlen kernel (the flash-attn package, CUDA, fp16/bf16).

Imported lazily: without the package, `flash_available()` is False and asking for backend="flash" raises an
ImportError that says how to install it.
"""

from __future__ import annotations

import torch

from .layout import TokenLayout, segment_cu_seqlens


def flash_segments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    group_size: int,
    shift: int,
    scale: float | None,
    dropout: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Causal attention inside each segment with flash-attn's varlen kernel (segments are contiguous in token order)."""
    flash_attn_varlen_func = import_flash()  # the same cu_seqlens as varlen's, cached on the layout
    cu, max_len = segment_cu_seqlens(layout, group_size, shift)  # (S+1,) int32, a bound on segment length
    window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
    return flash_attn_varlen_func(
        q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scale, causal=True, window_size=window
    )


def import_flash():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise ImportError(
            "backend='flash' needs the flash-attn package on a CUDA machine: pip install 'longlora[gpu]' "
            "(or use backend='sdpa')."
        ) from err
    return flash_attn_varlen_func


def flash_available() -> bool:
    try:
        import_flash()
    except ImportError:
        return False
    return torch.cuda.is_available()
