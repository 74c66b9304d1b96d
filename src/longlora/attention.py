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
- "cpu": the regular CPU layout through `attention_cpu` (torch's CPU flash kernels, one output buffer, dq written over
  the saved output when nothing else holds it); other layouts take "sdpa";
- "varlen": torch's own varlen flash kernels through `attention_varlen` (CUDA, fp16/bf16, Ampere or newer, no extra
  package): one call per head half into one output, cached cu_seqlens, no roll/cat/K-V copies;
- "flash": flash-attn's varlen kernel (the flash-attn package, CUDA, fp16/bf16);
- "auto" (default), by device: on CPU, "cpu" where it applies, else "sdpa"; on CUDA in fp16/bf16 with no attention
  dropout, "varlen" where torch has it (torch >= 2.10, Ampere or newer; with a sliding window shorter than G only
  where its varlen takes a window), else "flash" when flash-attn is installed, else "sdpa"; fp32 on CUDA: "sdpa"
  (the flash kernels take half precision only). varlen is preferred to flash-attn because it writes each half into
  one output with no concatenation; the two run the same FlashAttention-2 algorithm.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "cpu", "varlen", "flash")

# Process-wide defaults, changed only through set_backend / use_backend.
_DEFAULT_BACKEND = "auto"
REUSE_OUTPUT_MEMORY = True
"""Let the CPU backend write dq over the saved attention output when nothing else holds it (False: never; needed only
when one graph is backpropagated twice with retain_graph=True and nothing keeps the output). Part of the backend
configuration: prefer set_backend(reuse_output_memory=...) / use_backend(...) to assigning it."""

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
_MIN_BUCKET = 32  # smaller segments share the smallest bucket; below this size padding costs nothing worth saving


@dataclass(frozen=True)
class TokenLayout:
    """Where the real tokens of a (B, L) batch are and which document each belongs to, flattened.

    `index` holds the flat positions b * L + t of the N real tokens in order; `doc_start[n]` is True where a new
    sequence or packed document begins; `offset[n]` counts real tokens since that start (i' in docs/method.md).
    """

    index: torch.Tensor  # (N,) long
    doc_start: torch.Tensor  # (N,) bool
    offset: torch.Tensor  # (N,) long
    batch: int
    length: int
    known_regular: bool | None = field(default=None, compare=False)
    """True when built without mask, position_ids or boundaries: `regular` then needs no look at the tensors
    (on CUDA, no host-device synchronisation)."""
    cache: dict = field(default_factory=dict, compare=False, repr=False)
    """What backends derive from the layout (segments, cu_seqlens), kept with it: a layout shared by every layer of
    a forward pass is cut into groups once."""

    @property
    def all_real(self) -> bool:
        return self.index.numel() == self.batch * self.length

    @property
    def regular(self) -> bool:
        """Every token real and every row a single document: groups sit at fixed positions in every row."""
        if self.known_regular is not None:
            return self.known_regular
        if "regular" not in self.cache:
            self.cache["regular"] = self.all_real and int(self.doc_start.sum()) == self.batch
        return self.cache["regular"]


@dataclass(frozen=True)
class Segments:
    """Contiguous runs of tokens (in layout order) that attend causally among themselves."""

    seg_id: torch.Tensor  # (N,) long, segment of each real token, nondecreasing
    pos: torch.Tensor  # (N,) long, position inside its segment
    lengths: torch.Tensor  # (S,) long


def _running_start(is_start: torch.Tensor) -> torch.Tensor:
    """For a 1-D bool tensor of run starts, the index of the run start at or before each position."""
    ar = torch.arange(is_start.numel(), device=is_start.device)
    return torch.where(is_start, ar, torch.zeros_like(ar)).cummax(0).values


def group_size_from_ratio(length: int, ratio: float = 0.25) -> int:
    """The S2 group size for a sequence length: ratio x length rounded down to an even number, at least 2.

    The paper's ratio is 1/4 (section 3.2); even so that the shifted half moves by exactly G/2 tokens.
    """
    return max(2, int(length * ratio) // 2 * 2)


def token_layout(
    batch: int,
    length: int,
    device: torch.device,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    doc_boundaries: torch.Tensor | None = None,
) -> TokenLayout:
    """Layout of real tokens from a 2-D padding mask and/or position_ids restarting per packed document.

    attention_mask: (B, L), 1/True for real tokens. position_ids: (B, L) or (1, L); a new document starts wherever a
    position is not the previous one + 1 (the rule transformers uses for packed batches). doc_boundaries: (B, L) bool,
    extra document starts known by the caller.
    """
    is_new = torch.zeros(batch, length, dtype=torch.bool, device=device)
    is_new[:, 0] = True
    if position_ids is not None:
        pos = position_ids.to(device).expand(batch, length)
        is_new[:, 1:] |= pos[:, 1:] != pos[:, :-1] + 1
    if doc_boundaries is not None:
        is_new |= doc_boundaries.to(device=device, dtype=torch.bool)
    if attention_mask is None:
        index = torch.arange(batch * length, device=device)
        doc_start = is_new.reshape(-1)
    else:
        real = attention_mask.to(device=device, dtype=torch.bool).reshape(-1)
        index = real.nonzero().squeeze(1)
        # a document begins at its first *real* token: carry starts that fall on padding forward to the next real one
        docs = is_new.reshape(batch, length).cumsum(1).reshape(-1) + (torch.arange(batch * length, device=device)
                                                                      // length) * (length + 1)
        docs = docs[index]
        doc_start = torch.ones_like(docs, dtype=torch.bool)
        doc_start[1:] = docs[1:] != docs[:-1]
    offset = torch.arange(index.numel(), device=device) - _running_start(doc_start)
    plain = attention_mask is None and position_ids is None and doc_boundaries is None
    return TokenLayout(index=index, doc_start=doc_start, offset=offset, batch=batch, length=length,
                       known_regular=True if plain else None)


_REGULAR_LAYOUTS: dict[tuple, TokenLayout] = {}


def _regular_layout(batch: int, length: int, device: torch.device) -> TokenLayout:
    """token_layout(batch, length, device) for calls without mask or positions, built once per shape: a bare
    s2_attention call then launches no layout kernels (the layout's tensors are never written to)."""
    key = (batch, length, str(device))
    if key not in _REGULAR_LAYOUTS:
        if len(_REGULAR_LAYOUTS) >= 16:  # many distinct shapes: start over
            _REGULAR_LAYOUTS.clear()
        _REGULAR_LAYOUTS[key] = token_layout(batch, length, device)
    return _REGULAR_LAYOUTS[key]


def group_segments(layout: TokenLayout, group_size: int, shift: int) -> Segments:
    """Cut each document into groups of `group_size` counted from its start, the first group `shift` tokens shorter.

    Cached on the layout: every layer of a forward pass that shares the layout reuses the cut.
    """
    key = ("segments", group_size, shift)
    if key not in layout.cache:
        layout.cache[key] = _cut_segments(layout, group_size, shift)
    return layout.cache[key]


def _cut_segments(layout: TokenLayout, group_size: int, shift: int) -> Segments:
    group = torch.div(layout.offset + shift, group_size, rounding_mode="floor")  # (N,)
    is_start = layout.doc_start.clone()
    is_start[1:] |= group[1:] != group[:-1]
    seg_id = is_start.cumsum(0) - 1
    pos = torch.arange(seg_id.numel(), device=seg_id.device) - _running_start(is_start)
    lengths = torch.bincount(seg_id, minlength=int(seg_id[-1]) + 1 if seg_id.numel() else 0)
    return Segments(seg_id=seg_id, pos=pos, lengths=lengths)


def _bucket_capacities(group_size: int) -> list[int]:
    caps = [group_size]
    while caps[-1] > _MIN_BUCKET:
        caps.append(max(_MIN_BUCKET, math.ceil(caps[-1] / 2)))
    return caps  # descending: G, G/2, G/4, ...


def _sdpa_segments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segs: Segments,
    group_size: int,
    scale: float | None,
    dropout: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Causal attention inside each segment via SDPA on padded buffers. q (N, Hq, D), k/v (N, Hk, D) -> (N, Hq, D)."""
    n_tok, hq, d = q.shape
    hk = k.shape[1]
    out = q.new_zeros(n_tok, hq, v.shape[-1])
    caps = _bucket_capacities(group_size)
    # bucket of each segment: the smallest capacity that holds it
    cap_t = torch.tensor(caps, device=segs.lengths.device)
    seg_bucket = (segs.lengths[:, None] <= cap_t[None, :]).sum(1) - 1  # (S,) index into caps (caps descending)
    tok_bucket = seg_bucket[segs.seg_id]  # (N,)
    for b in torch.unique(seg_bucket).tolist():
        cap = caps[b]
        in_bucket = seg_bucket == b  # (S,)
        rank = in_bucket.cumsum(0) - 1  # (S,) row of each segment inside this bucket
        tok = (tok_bucket == b).nonzero().squeeze(1)  # (n,)
        row, col = rank[segs.seg_id[tok]], segs.pos[tok]
        n_seg = int(in_bucket.sum())
        qb = q.new_zeros(n_seg, cap, hq, d).index_put((row, col), q[tok])  # (S_b, cap, Hq, D)
        kb = k.new_zeros(n_seg, cap, hk, d).index_put((row, col), k[tok])  # (S_b, cap, Hk, D)
        vb = v.new_zeros(n_seg, cap, hk, v.shape[-1]).index_put((row, col), v[tok])
        qb, kb, vb = (x.transpose(1, 2) for x in (qb, kb, vb))  # (S_b, H, cap, D)
        ob = _sdpa_causal(qb, kb, vb, hq, hk, scale, dropout, sliding_window)
        out = out.index_put((tok,), ob.transpose(1, 2)[row, col])  # (n, Hq, D) back to token order
    return out


def group_runs(length: int, group_size: int, shift: int) -> list[tuple[int, int, int]]:
    """(start, segment_length, count) runs of equal-length consecutive groups in a row of `length` real tokens."""
    bounds = [0] + list(range(shift or group_size, length, group_size)) + [length]
    runs: list[tuple[int, int, int]] = []
    for a, z in zip(bounds[:-1], bounds[1:]):
        if runs and runs[-1][1] == z - a:
            runs[-1] = (runs[-1][0], z - a, runs[-1][2] + 1)
        else:
            runs.append((a, z - a, 1))
    return runs


def _sdpa_regular(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int, shift: int,
                  scale: float | None, dropout: float, sliding_window: int | None) -> torch.Tensor:
    """Groups at fixed positions (no padding, no packing): views, one SDPA call per run of equal groups.

    q (B, L, Hq, D), k/v (B, L, Hk, D) -> (B, L, Hq, D).
    """
    b, length, hq, _ = q.shape
    hk = k.shape[2]
    runs = group_runs(length, group_size, shift)
    sizes = [seg_len * count for _, seg_len, count in runs]
    # split (not slice) along L: its backward is one cat, where per-run slices would each allocate a full-size grad
    outs = []
    for (_, seg_len, count), qr, kr, vr in zip(runs, *(x.split(sizes, dim=1) for x in (q, k, v))):
        # (B, count*seg, H, D) -> (B*count, H, seg, D): a view when the run spans whole rows, else one copy
        qr, kr, vr = (x.reshape(b * count, seg_len, x.shape[2], x.shape[3]).transpose(1, 2) for x in (qr, kr, vr))
        outs.append(_sdpa_causal(qr, kr, vr, hq, hk, scale, dropout, sliding_window)
                    .transpose(1, 2).reshape(b, seg_len * count, hq, -1))
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


def head_blocks(hq: int, hk: int, n_plain: int, group_size: int) -> list[tuple[int, int, int, int, int]]:
    """(h0, h1, kv0, kv1, shift) blocks of query heads that share a shift and whole key/value heads [kv0, kv1)."""
    rep = hq // hk
    blocks = []
    for h0, h1, shift in ((0, n_plain, 0), (n_plain, hq, group_size // 2)):
        if h1 <= h0:
            continue
        if h0 % rep == 0 and h1 % rep == 0:  # whole key/value heads: one GQA call, K/V unrepeated
            blocks.append((h0, h1, h0 // rep, h1 // rep, shift))
        else:  # a key/value head straddles the plain/shifted border: one call per key/value head
            for kv in range(h0 // rep, (h1 - 1) // rep + 1):
                blocks.append((max(h0, kv * rep), min(h1, (kv + 1) * rep), kv, kv + 1, shift))
    return blocks


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
                    lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of the same queries over two disjoint key sets, merged into attention over their union.

    o (..., D), lse (...) over o's leading dimensions (natural log of each row's sum of exp(scores)) -> (o, lse) of
    the union; the merged lse has lse1's memory layout (flash backward kernels read it as their forward wrote it).
    A row prefix (sequence parallelism's halo) is attended this way: a second kernel call over the prefix keys.
    """
    lse = torch.logaddexp(lse1, lse2, out=torch.empty_like(lse1))
    acc = torch.promote_types(o1.dtype, torch.float32)  # at least fp32 for half-precision outputs, float64 kept
    w1, w2 = (torch.exp(x - lse).unsqueeze(-1) for x in (lse1, lse2))  # each part's share of a row's softmax
    return (o1.to(acc) * w1 + o2.to(acc) * w2).to(o1.dtype), lse


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
    # imported here: the backend modules build on this one
    from .attention_cpu import cpu_flash_applies
    from .attention_varlen import check_varlen, varlen_applies

    if backend == "auto":
        backend = _DEFAULT_BACKEND
    cpu_ok = cpu_flash_applies(query, key, value, layout, dropout, sliding_window, group_size)
    if backend == "auto":
        if query.device.type == "cpu":
            return "cpu" if cpu_ok else "sdpa"
        if varlen_applies(query, dropout, sliding_window, group_size, scale):
            return "varlen"
        half = query.dtype in (torch.float16, torch.bfloat16)
        return "flash" if query.is_cuda and half and flash_available() else "sdpa"
    if backend == "cpu":
        return "cpu" if cpu_ok else "sdpa"
    if backend == "varlen":
        check_varlen(query, dropout, sliding_window, group_size, scale)
    if backend == "flash":
        _import_flash()  # ImportError with the install hint when the package is missing
        if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)):
            raise ValueError(f"backend='flash' needs CUDA tensors in fp16/bf16 (got {query.dtype} on "
                             f"{query.device}); use backend='auto'.")
    return backend


def _sdpa_causal(q, k, v, hq, hk, scale, dropout, sliding_window):
    """Causal SDPA on (S, H, L, D) tensors, GQA without repeating K/V where torch allows, optional sliding window."""
    if hk != hq and not _SDPA_HAS_GQA:
        k, v = (x.repeat_interleave(hq // hk, dim=1) for x in (k, v))
    gqa = {"enable_gqa": hk != hq} if _SDPA_HAS_GQA else {}
    length = q.shape[2]
    if sliding_window is not None and sliding_window < length:
        i = torch.arange(length, device=q.device)
        band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - sliding_window)  # (L, L)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=dropout, scale=scale, **gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale, **gqa)


def _flash_segments(
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
    from .attention_varlen import segment_cu_seqlens  # the same cu_seqlens, cached on the layout

    flash_attn_varlen_func = _import_flash()
    cu, max_len = segment_cu_seqlens(layout, group_size, shift)  # (S+1,) int32, a bound on segment length
    window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
    return flash_attn_varlen_func(
        q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scale, causal=True, window_size=window
    )


def _import_flash():
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
        _import_flash()
    except ImportError:
        return False
    return torch.cuda.is_available()


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
    hk = key.shape[1]
    if layout is None and attention_mask is None and position_ids is None:
        layout = _regular_layout(b, length, query.device)
    elif layout is None:
        layout = token_layout(b, length, query.device, attention_mask, position_ids)
    if layout.index.numel() == 0:  # nothing but padding
        return query.new_zeros(b, length, hq, value.shape[-1]).transpose(1, 2)
    # Half the heads shifted by G/2 (paper section 3.2); all plain for the no-shift ablation.
    n_plain = hq // 2 if shift else hq
    backend = resolve_backend(query, key, value, layout, group_size, backend=backend, dropout=dropout,
                              sliding_window=sliding_window, scale=scale)
    if backend == "cpu":
        from .attention_cpu import s2_cpu_flash

        return s2_cpu_flash(query, key, value, group_size, n_plain, scale, REUSE_OUTPUT_MEMORY)
    if backend == "varlen":
        from .attention_varlen import s2_varlen

        return s2_varlen(query, key, value, layout, group_size, n_plain, scale, sliding_window)

    # tokens-first views: the model's q/k/v are usually transposes of (B, L, H, D), so this costs no copy
    q_tok = query.transpose(1, 2).reshape(b * length, hq, -1)  # (B*L, Hq, D)
    k_tok = key.transpose(1, 2).reshape(b * length, hk, -1)  # (B*L, Hkv, D)
    v_tok = value.transpose(1, 2).reshape(b * length, hk, -1)
    if not layout.all_real:
        q_tok, k_tok, v_tok = q_tok[layout.index], k_tok[layout.index], v_tok[layout.index]  # (N, H, D)

    halves = [(h0, h1, s) for h0, h1, s in ((0, n_plain, 0), (n_plain, hq, group_size // 2)) if h1 > h0]
    rep = hq // hk
    head_sizes = [h1 - h0 for h0, h1, _ in halves]
    # split (not slice) the heads: one cat in backward instead of a full-size zero grad per half
    q_halves = q_tok.split(head_sizes, dim=1)
    if all(h0 % rep == 0 and h1 % rep == 0 for h0, h1, _ in halves):  # whole key/value heads: GQA unrepeated
        kv_sizes = [n // rep for n in head_sizes]
        k_halves, v_halves = k_tok.split(kv_sizes, dim=1), v_tok.split(kv_sizes, dim=1)
    else:  # a key/value head is shared by a plain and a shifted query head (odd layouts): repeat per half
        kv_of = [torch.arange(h0, h1, device=query.device) // rep for h0, h1, _ in halves]
        k_halves, v_halves = [k_tok[:, i] for i in kv_of], [v_tok[:, i] for i in kv_of]
    pieces = []
    for (h0, h1, shift_by), qh, kh, vh in zip(halves, q_halves, k_halves, v_halves):
        if backend == "flash":
            pieces.append(_flash_segments(qh, kh, vh, layout, group_size, shift_by, scale, dropout, sliding_window))
        elif layout.regular:
            rows = (b, length)
            pieces.append(_sdpa_regular(qh.view(*rows, *qh.shape[1:]), kh.view(*rows, *kh.shape[1:]),
                                        vh.view(*rows, *vh.shape[1:]), group_size, shift_by, scale, dropout,
                                        sliding_window).reshape(b * length, h1 - h0, -1))
        else:
            segs = group_segments(layout, group_size, shift_by)
            pieces.append(_sdpa_segments(qh, kh, vh, segs, group_size, scale, dropout, sliding_window))
    out_real = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]  # (N, Hq, D)
    if layout.all_real:
        out = out_real
    else:  # padded positions give 0
        out = out_real.new_zeros(b * length, hq, out_real.shape[-1]).index_put((layout.index,), out_real)
    return out.view(b, length, hq, -1).transpose(1, 2)  # (B, Hq, L, D)


def s2_dense_mask(
    length: int,
    num_heads: int,
    group_size: int,
    *,
    shift: bool = True,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The S2 pattern as a dense (B, H, L, L) boolean mask, straight from the definition in docs/method.md.

    Quadratic in memory: for tests and the naive baseline of the benchmarks only.
    """
    b = 1 if attention_mask is None else attention_mask.shape[0]
    if position_ids is not None:
        b = max(b, position_ids.shape[0])
    real = torch.ones(b, length, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    real = real.expand(b, length)
    pos = None if position_ids is None else position_ids.cpu().expand(b, length)
    masks = torch.zeros(b, num_heads, length, length, dtype=torch.bool)
    n_plain = num_heads // 2 if shift else num_heads
    for bi in range(b):
        # document id and i' (count of real tokens since the document start) of every position, by a plain loop
        doc, off = [0] * length, [0] * length
        d, count = 0, 0
        for t in range(length):
            if t > 0 and pos is not None and int(pos[bi, t]) != int(pos[bi, t - 1]) + 1:
                d, count = d + 1, 0
            doc[t], off[t] = d, count
            count += int(real[bi, t])
        doc_t, off_t = torch.tensor(doc), torch.tensor(off)
        same_doc = doc_t[:, None] == doc_t[None, :]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        base = causal & same_doc & real[bi][None, :] & real[bi][:, None]
        if sliding_window is not None:
            i = torch.arange(length)
            base &= i[None, :] > i[:, None] - sliding_window
        for h in range(num_heads):
            s = group_size // 2 if h >= n_plain else 0
            g = (off_t + s) // group_size
            masks[bi, h] = base & (g[:, None] == g[None, :])
    return masks
