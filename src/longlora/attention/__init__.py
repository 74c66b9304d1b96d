"""Shifted sparse attention (S2-Attn, LongLoRA section 3.2) in plain torch.

The sequence is cut into groups of G tokens. Heads h < H//2 attend causally inside plain groups [0,G), [G,2G), ...;
heads h >= H//2 inside groups shifted by G/2: [0,G/2), [G/2,3G/2), ... Group boundaries are counted from each
sequence's first real token (or each packed document's first token), and a group never wraps around: the paper's
`roll(-G/2)` leaked the end of the sequence into its start; this module does not.

How it is computed: every (sequence, document, group) is a *segment*, a contiguous run of real tokens. Attention is
plain causal attention inside each segment, so the whole op is "variable-length causal attention over segments":
- flash-attn's varlen kernel takes the segments as they are (cu_seqlens);
- SDPA gets them gathered into padded (num_segments, capacity, H, D) buffers, one buffer per capacity bucket
  (G, G/2, G/4, ...) so that short segments (the first shifted half-group, a packed document's tail) do not pay for a
  whole group. Padding sits at the end of each segment, so the causal mask alone keeps it out of real rows.
- On CPU with the common regular layout (no padding, no packing), a custom autograd Function drives torch's CPU
  flash kernels piece by piece, writing into one output buffer and one set of gradient buffers, so that S2-Attn holds
  no more than full causal attention does (output, logsumexp, dq/dk/dv) plus one small backward tile.

Backends (one switch for users and tests: the `backend=` argument, or `set_backend` / `use_backend` for every call
that leaves it at "auto", e.g. a model's layers):
- "sdpa": the composition above (any device, any layout);
- "cpu": the regular CPU layout through `attention.cpu` (torch's CPU flash kernels, one output buffer, dq written over
  the saved output when nothing else holds it); other layouts take "sdpa";
- "varlen": torch's own varlen flash kernels through `attention.varlen` (CUDA, fp16/bf16, Ampere or newer, head
  dimension a multiple of 8 up to 256, no extra package): one call per head half into one output, cached
  cu_seqlens, no roll/cat/K-V copies in the forward;
- "flash": flash-attn's varlen kernel (the flash-attn package, CUDA, fp16/bf16);
- "auto" (default), by device: on CPU, "cpu" where it applies, else "sdpa"; on CUDA in fp16/bf16 with no attention
  dropout, "varlen" where torch has it (torch >= 2.10, Ampere or newer; with a sliding window shorter than G only
  where its varlen takes a window), else "flash" when flash-attn is installed, else "sdpa"; fp32 on CUDA: "sdpa"
  (the flash kernels take half precision only). varlen is preferred to flash-attn because it writes each half into
  one output with no concatenation; the two run the same FlashAttention-2 algorithm.

This package: `layout` (tokens, documents, segments, cu_seqlens: what every backend shares), one module per backend
(`sdpa`, `cpu`, `varlen`, `flash`), `reference` (the dense mask of the definition), and here the switch and
`s2_attention`, which import the backends; no backend imports this module.
"""

from __future__ import annotations

import contextlib

import torch

from .cpu import cpu_flash_applies, s2_cpu_flash
from .flash import flash_available, flash_segments, import_flash
from .layout import (
    Segments, TokenLayout, regular_layout, group_segments, group_size_from_ratio, head_blocks, merge_attention,
    token_layout,
)
from .reference import s2_dense_mask
from .sdpa import s2_sdpa
from .varlen import check_varlen, s2_varlen, varlen_applies

BACKENDS = ("auto", "sdpa", "cpu", "varlen", "flash")

# Process-wide defaults, changed only through set_backend / use_backend.
_DEFAULT_BACKEND = "auto"
REUSE_OUTPUT_MEMORY = True
"""Let the CPU backend write dq over the saved attention output when nothing else holds it (False: never; needed only
when one graph is backpropagated twice with retain_graph=True and nothing keeps the output). Part of the backend
configuration: prefer set_backend(reuse_output_memory=...) / use_backend(...) to assigning it."""


def set_backend(backend: str = "auto", *, reuse_output_memory: bool | None = None) -> None:
    """Set the backend used by every s2_attention call that passes backend="auto" (a model's layers do, unless
    enable_s2_attention got another backend), and optionally REUSE_OUTPUT_MEMORY. set_backend() restores "auto"."""
    global _DEFAULT_BACKEND, REUSE_OUTPUT_MEMORY
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    _DEFAULT_BACKEND = backend
    if reuse_output_memory is not None:
        REUSE_OUTPUT_MEMORY = bool(reuse_output_memory)


def get_backend() -> str:
    """The process-wide default set by set_backend ("auto" unless changed)."""
    return _DEFAULT_BACKEND


@contextlib.contextmanager
def use_backend(backend: str = "auto", *, reuse_output_memory: bool | None = None):
    """`with use_backend("sdpa"): ...`: set_backend for the block, the previous configuration restored after."""
    saved = (_DEFAULT_BACKEND, REUSE_OUTPUT_MEMORY)
    set_backend(backend, reuse_output_memory=reuse_output_memory)
    try:
        yield
    finally:
        set_backend(saved[0], reuse_output_memory=saved[1])


def resolve_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: TokenLayout,
                    group_size: int, *, backend: str = "auto", dropout: float = 0.0,
                    sliding_window: int | None = None, scale: float | None = None) -> str:
    """The path s2_attention takes for these inputs: "sdpa", "cpu", "varlen" or "flash" (the rule in the module
    docstring). Raises a ValueError when an explicitly asked-for "varlen" cannot run on them."""
    if backend == "auto":
        backend = _DEFAULT_BACKEND
    cpu_ok = cpu_flash_applies(query, key, value, layout, dropout, sliding_window, group_size)
    if backend == "auto":
        if query.device.type == "cpu":
            return "cpu" if cpu_ok else "sdpa"
        if varlen_applies(query, dropout, sliding_window, group_size, scale, value.shape[-1]):
            return "varlen"
        half = query.dtype in (torch.float16, torch.bfloat16)
        return "flash" if query.is_cuda and half and flash_available() else "sdpa"
    if backend == "cpu":
        return "cpu" if cpu_ok else "sdpa"
    if backend == "varlen":
        check_varlen(query, dropout, sliding_window, group_size, scale, value.shape[-1])
    if backend == "flash":
        import_flash()  # ImportError with the install hint when the package is missing
        if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)):
            raise ValueError(f"backend='flash' needs CUDA tensors in fp16/bf16 (got {query.dtype} on "
                             f"{query.device}); use backend='auto'.")
    return backend


def _check_inputs(query, key, value, group_size, attention_mask, position_ids, backend) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"query/key/value must be 4-D (batch, heads, length, head_dim); got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    b, hq, length, d = query.shape
    if key.shape != value.shape[:3] + (key.shape[3],) or key.shape[:1] + key.shape[2:3] != (b, length):
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} must be (batch={b}, kv_heads, length={length}, "
            f"head_dim) like query {tuple(query.shape)}"
        )
    if key.shape[3] != d:
        raise ValueError(f"query head_dim {d} differs from key head_dim {key.shape[3]}")
    if hq % key.shape[1] != 0:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({key.shape[1]}) for grouped-query attention"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(
            f"group_size must be an even integer >= 2 (half of it is the shift); got {group_size!r}. "
            "The paper uses a quarter of the training length."
        )
    for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if t is not None and (t.dim() != 2 or t.shape[1] != length or t.shape[0] not in (1, b)):
            raise ValueError(f"{name} must be (batch={b}, length={length}); got {tuple(t.shape)}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")


def s2_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group_size: int,
    *,
    shift: bool = True,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    backend: str = "auto",
    layout: TokenLayout | None = None,
) -> torch.Tensor:
    """Causal shifted sparse attention. query (B, Hq, L, D), key/value (B, Hkv, L, D) -> (B, Hq, L, D).

    Heads h < Hq//2 attend inside plain groups of `group_size`, heads h >= Hq//2 inside groups shifted by
    group_size//2 (all heads plain when shift=False, the paper's "no shift" ablation). `attention_mask` (B, L) marks
    real tokens (left or right padding; padded outputs are 0); `position_ids` restarting at 0 mark packed documents.
    `sliding_window` additionally limits each query to the last `sliding_window` keys (Mistral/Qwen2 style).
    backend: "auto" (the process default of set_backend / use_backend, itself "auto" unless set: the fastest path for
    the device), "sdpa", "cpu", "varlen" or "flash"; see the module docstring.
    `layout` may pass a precomputed `token_layout(...)` (shared by every layer of a forward pass).
    """
    _check_inputs(query, key, value, group_size, attention_mask, position_ids, backend)
    b, hq, length, _ = query.shape
    if layout is None and attention_mask is None and position_ids is None:
        layout = regular_layout(b, length, query.device)
    elif layout is None:
        layout = token_layout(b, length, query.device, attention_mask, position_ids)
    if layout.index.numel() == 0:  # nothing but padding
        return query.new_zeros(b, length, hq, value.shape[-1]).transpose(1, 2)
    # Half the heads shifted by G/2 (paper section 3.2); all plain for the no-shift ablation.
    n_plain = hq // 2 if shift else hq
    backend = resolve_backend(query, key, value, layout, group_size, backend=backend, dropout=dropout,
                              sliding_window=sliding_window, scale=scale)
    if backend == "cpu":
        return s2_cpu_flash(query, key, value, group_size, n_plain, scale, REUSE_OUTPUT_MEMORY)
    if backend == "varlen":
        return s2_varlen(query, key, value, layout, group_size, n_plain, scale, sliding_window)

    kernel = flash_segments if backend == "flash" else None
    return s2_sdpa(query, key, value, layout, group_size, n_plain, scale, dropout, sliding_window, kernel)


__all__ = [
    "BACKENDS", "REUSE_OUTPUT_MEMORY", "Segments", "TokenLayout", "flash_available", "get_backend", "group_segments",
    "group_size_from_ratio", "head_blocks", "merge_attention", "resolve_backend", "s2_attention", "s2_dense_mask",
    "set_backend", "token_layout", "use_backend",
]
