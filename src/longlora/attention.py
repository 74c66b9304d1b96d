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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flash")

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
_MIN_BUCKET = 32  # smaller segments share the smallest bucket; below this size padding costs nothing worth saving


@dataclass(frozen=True)
class TokenLayout:
    """Where the real tokens of a (B, L) batch are and which document each belongs to, flattened.

    `index` holds the flat positions b * L + t of the N real tokens in order; `doc_start[n]` is True where a new
    sequence or packed document begins; `offset[n]` counts real tokens since that start (i' in LONGLORA.md).
    """

    index: torch.Tensor  # (N,) long
    doc_start: torch.Tensor  # (N,) bool
    offset: torch.Tensor  # (N,) long
    batch: int
    length: int

    @property
    def all_real(self) -> bool:
        return self.index.numel() == self.batch * self.length

    @property
    def regular(self) -> bool:
        """Every token real and every row a single document: groups sit at fixed positions in every row."""
        return self.all_real and int(self.doc_start.sum()) == self.batch


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
    return TokenLayout(index=index, doc_start=doc_start, offset=offset, batch=batch, length=length)


def group_segments(layout: TokenLayout, group_size: int, shift: int) -> Segments:
    """Cut each document into groups of `group_size` counted from its start, the first group `shift` tokens shorter."""
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


def _runs(length: int, group_size: int, shift: int) -> list[tuple[int, int, int]]:
    """(start, segment_length, count) runs of equal-length consecutive groups in a row of `length` real tokens."""
    bounds = [0] + list(range(shift or group_size, length, group_size)) + [length]
    runs: list[tuple[int, int, int]] = []
    for a, z in zip(bounds[:-1], bounds[1:]):
        if runs and runs[-1][1] == z - a:
            runs[-1] = (runs[-1][0], z - a, runs[-1][2] + 1)
        else:
            runs.append((a, z - a, 1))
    return runs


def _sdpa_regular(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    shift: int,
    scale: float | None,
    dropout: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Groups at fixed positions (no padding, no packing): views, one SDPA call per run of equal groups.

    q (B, L, Hq, D), k/v (B, L, Hk, D) -> (B, L, Hq, D).
    """
    b, length, hq, _ = q.shape
    hk = k.shape[2]
    runs = _runs(length, group_size, shift)
    sizes = [seg_len * count for _, seg_len, count in runs]
    # split (not slice) along L: its backward is one cat, where per-run slices would each allocate a full-size grad
    outs = []
    for (_, seg_len, count), qr, kr, vr in zip(runs, *(x.split(sizes, dim=1) for x in (q, k, v))):
        # (B, count*seg, H, D) -> (B*count, H, seg, D): a view when the run spans whole rows, else one copy
        qr, kr, vr = (x.reshape(b * count, seg_len, x.shape[2], x.shape[3]).transpose(1, 2) for x in (qr, kr, vr))
        outs.append(_sdpa_causal(qr, kr, vr, hq, hk, scale, dropout, sliding_window)
                    .transpose(1, 2).reshape(b, seg_len * count, hq, -1))
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


_CPU_FLASH_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# The backward kernel returns freshly allocated dq/dk/dv for the rows it is given: cutting each group into
# _BWD_SPLITS x _BWD_SPLITS tiles (lower triangle only) bounds that extra memory to ~1/_BWD_SPLITS of one group's
# gradients (about 1% of the whole op's at G = L/4) for (_BWD_SPLITS + 1) * _BWD_SPLITS / 2 kernel calls per group.
_BWD_SPLITS = 1
_BWD_MIN_TILE = 128  # rows; smaller tiles would cost more in per-call overhead than they save


def _cpu_flash_ops():
    """torch's CPU flash-attention forward/backward ops, or None where this torch build lacks them."""
    try:
        return (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
    except (AttributeError, RuntimeError):
        return None


def _head_chunks(hq: int, hk: int, n_plain: int, group_size: int) -> list[tuple[int, int, int, int, int]]:
    """(h0, h1, kv0, kv1, shift) blocks of query heads that share a shift and whole key/value heads [kv0, kv1)."""
    rep = hq // hk
    chunks = []
    for h0, h1, shift in ((0, n_plain, 0), (n_plain, hq, group_size // 2)):
        if h1 <= h0:
            continue
        if h0 % rep == 0 and h1 % rep == 0:  # whole key/value heads: one GQA call, K/V unrepeated
            chunks.append((h0, h1, h0 // rep, h1 // rep, shift))
        else:  # a key/value head straddles the plain/shifted border: one call per key/value head
            for kv in range(h0 // rep, (h1 - 1) // rep + 1):
                chunks.append((max(h0, kv * rep), min(h1, (kv + 1) * rep), kv, kv + 1, shift))
    return chunks


def _batches(length: int, group_size: int, shift: int) -> list[tuple[int, int, int, int]]:
    """(start, segment_length, count, spacing): equal-length groups of a row, evenly spaced, batched for one call.

    The runs of `_runs`, except that a shifted row's two half-groups (the first and the last, of equal length when L is
    a multiple of G) are batched together: one kernel call with two batch entries instead of two calls with one.
    """
    runs = [(start, seg_len, count, seg_len) for start, seg_len, count in _runs(length, group_size, shift)]
    if len(runs) > 2 and runs[0][1:3] == runs[-1][1:3] == (runs[0][1], 1):
        first, last = runs[0], runs[-1]
        runs = [(first[0], first[1], 2, last[0] - first[0])] + runs[1:-1]
    return runs


def _pieces(x: torch.Tensor, bi: int, h0: int, h1: int, start: int, seg_len: int, count: int,
            spacing: int) -> torch.Tensor:
    """View of heads [h0, h1) of row `bi` over `count` groups of `seg_len` tokens, `spacing` tokens apart.

    (B, H, L, D) -> (count, H, seg_len, D), no copy.
    """
    base = x[bi, h0:h1]  # (H, L, D)
    s_h, s_l, s_d = base.stride()
    return base.as_strided((count, h1 - h0, seg_len, base.shape[-1]), (spacing * s_l, s_h, s_l, s_d),
                           base.storage_offset() + start * s_l)


def _kernel_threads() -> int:
    return torch.get_num_threads()


def _backward_calls(count: int, hq: int, hkv: int, threads: int) -> list[tuple[slice, slice, slice, int]]:
    """Backward kernel calls for one batch of `count` groups: (groups, query heads, key/value heads, rep).

    With GQA inputs torch's CPU backward kernel parallelises over (groups x key/value heads) only: a call gets just
    enough groups to give every thread one (more would only hold more gradient memory). Groups left over (on 2
    threads, the 3 middle groups of a shifted row leave 1) would leave threads idle, so their calls see one
    key/value head as its `rep` query heads (rep > 1; expanded with stride 0), which the kernel parallelises over.
    """
    rep = hq // hkv
    per_call = max(1, -(-threads // hkv))
    whole = count if rep == 1 else count // per_call * per_call
    calls = [(slice(s, min(s + per_call, count)), slice(0, hq), slice(0, hkv), 1) for s in range(0, whole, per_call)]
    per_expanded = max(1, -(-threads // rep))
    for s in range(whole, count, per_expanded):
        groups = slice(s, min(s + per_expanded, count))
        calls += [(groups, slice(kv * rep, (kv + 1) * rep), slice(kv, kv + 1), rep) for kv in range(hkv)]
    return calls


class _S2FlashCPU(torch.autograd.Function):
    """S2-Attn on the regular layout with torch's CPU flash kernels, one call per (row, head block, batch of groups).

    Full causal SDPA holds its output, its logsumexp and then dq/dk/dv; composing SDPA calls with autograd also holds
    every piece's output and concatenated copies. Here the forward writes every piece into one (B, L, Hq, D) output
    (the returned tensor, saved for backward) and keeps only the pieces' logsumexps; the backward writes into one
    dq/dk/dv, calling the backward kernel on square tiles of a few groups at a time (the flash backward is exact per
    tile given the whole row's output and logsumexp). The kernel returns freshly allocated gradients for each call;
    to stay below full SDPA's peak, dq is written over the saved output (each piece's output is dead once its rows
    are done) when nothing else holds that output (`_output_is_private`); otherwise dq is a new buffer.
    """

    @staticmethod
    def forward(ctx, query, key, value, group_size, n_plain, scale):
        # query (B, Hq, L, D), key/value (B, Hkv, L, D)
        flash_fwd, _ = _cpu_flash_ops()
        b, hq, length, d = query.shape
        # output stored tokens-first like SDPA's, returned as a (B, Hq, L, D) view
        out = query.new_empty(b, length, hq, d).transpose(1, 2)
        plan, lses = [], []
        for bi in range(b):
            for h0, h1, kv0, kv1, shift in _head_chunks(hq, key.shape[1], n_plain, group_size):
                for batch in _batches(length, group_size, shift):
                    piece, lse = flash_fwd(_pieces(query, bi, h0, h1, *batch), _pieces(key, bi, kv0, kv1, *batch),
                                           _pieces(value, bi, kv0, kv1, *batch),
                                           0.0, True, scale=scale)  # (count, H, seg, D), (count, H, seg)
                    _pieces(out, bi, h0, h1, *batch).copy_(piece)
                    del piece  # one piece's output alive at a time
                    plan.append((bi, h0, h1, kv0, kv1, batch))
                    lses.append(lse)
        ctx.plan, ctx.scale, ctx.output_reused = plan, scale, False
        ctx.save_for_backward(query, key, value, out, *lses)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        _, flash_bwd = _cpu_flash_ops()
        if ctx.output_reused:
            raise RuntimeError(
                "S2-Attn's backward ran twice over one graph (retain_graph=True): its first backward wrote the "
                "gradient over the saved attention output to save memory. Set longlora.attention.REUSE_OUTPUT_MEMORY "
                "= False before the forward to keep it.")
        query, key, value, out, *lses = ctx.saved_tensors
        # every (row, head, token) of dq is written once (pieces partition them); dk/dv accumulate over head blocks
        ctx.output_reused = REUSE_OUTPUT_MEMORY and out.stride() == query.stride() and _output_is_private(out)
        dq = out if ctx.output_reused else torch.empty_like(query)
        # same strides as the inputs, so that autograd hands them over without a copy
        dk, dv = torch.zeros_like(key), torch.zeros_like(value)
        threads = _kernel_threads()
        for (bi, h0, h1, kv0, kv1, batch), lse in zip(ctx.plan, lses):
            q, o, go, gq = (_pieces(x, bi, h0, h1, *batch) for x in (query, out, grad_out, dq))  # (n, H, seg, D)
            k, v, gk, gv = (_pieces(x, bi, kv0, kv1, *batch) for x in (key, value, dk, dv))  # (n, Hkv, seg, D)
            _, seg_len, count, _ = batch
            tile = max(_BWD_MIN_TILE, -(-seg_len // _BWD_SPLITS))
            for g, heads, kv_heads, rep in _backward_calls(count, h1 - h0, kv1 - kv0, threads):
                for i0 in range(0, seg_len, tile):
                    rows = slice(i0, min(i0 + tile, seg_len))
                    row_dq = None
                    for j0 in range(0, i0 + 1, tile):  # key tiles at or before the query tile (causal)
                        cols = slice(j0, min(j0 + tile, seg_len))
                        # rep > 1: one key/value head seen as `rep` query heads (stride 0, no copy)
                        kt, vt = (x[g, kv_heads, cols] if rep == 1 else x[g, kv_heads, cols].expand(-1, rep, -1, -1)
                                  for x in (k, v))
                        tq, tk, tv = flash_bwd(go[g, heads, rows], q[g, heads, rows], kt, vt, o[g, heads, rows],
                                               lse[g, heads, rows], 0.0, j0 == i0, scale=ctx.scale)
                        row_dq = tq if row_dq is None else row_dq.add_(tq)
                        gk[g, kv_heads, cols] += tk if rep == 1 else tk.sum(1, keepdim=True)
                        gv[g, kv_heads, cols] += tv if rep == 1 else tv.sum(1, keepdim=True)
                        del tq, tk, tv
                    gq[g, heads, rows].copy_(row_dq)  # these output rows are no longer read: safe to overwrite
                    del row_dq
        return dq, dk, dv, None, None, None


# Write dq over the saved output in _S2FlashCPU's backward when nothing else can see that output (see below).
REUSE_OUTPUT_MEMORY = True


def _storage_use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _UseCountProbe(torch.autograd.Function):
    """Records, in backward, the use count of its saved output's storage (calibration for _output_is_private)."""

    counts: list[int] = []

    @staticmethod
    def forward(ctx, x):
        out = x.detach().clone()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        _UseCountProbe.counts.append(_storage_use_count(out))
        return grad


def _calibrate_private_use_count() -> int | None:
    """The use count a saved output's storage has in backward when only autograd holds it; None if undetectable.

    Measured with this torch rather than assumed: once with the output dropped, once with it held by the caller.
    The counts must differ, or the reuse is never done. Run once, at import (no saved-tensor hooks active then).
    """
    if not hasattr(torch._C, "_storage_Use_Count"):
        return None
    try:
        _UseCountProbe.counts = []
        x = torch.zeros(2, requires_grad=True)
        with torch.enable_grad():
            _UseCountProbe.apply(x).sum().backward()  # output dropped
            held = _UseCountProbe.apply(x)
            held.sum().backward()  # output held by the caller
        dropped, kept = _UseCountProbe.counts
    except Exception:  # any surprise in the private API: never reuse
        return None
    return dropped if kept > dropped else None


_PRIVATE_USE_COUNT = _calibrate_private_use_count()


def _output_is_private(out: torch.Tensor) -> bool:
    """Whether no tensor outside this backward shares the saved output's storage (so overwriting it is invisible).

    The caller's output tensor, a view of it saved by a later op (retain_graph) or a saved-tensor hook's copy all
    raise the storage's use count above the calibrated private count; then the output is left alone.
    """
    return _PRIVATE_USE_COUNT is not None and _storage_use_count(out) <= _PRIVATE_USE_COUNT


def _use_cpu_flash(query, key, value, layout, dropout, sliding_window, group_size) -> bool:
    """Whether the regular CPU case can take _S2FlashCPU (else the autograd-composed SDPA path)."""
    return (layout.regular and query.device.type == "cpu" and query.dtype in _CPU_FLASH_DTYPES
            and key.dtype == value.dtype == query.dtype and value.shape[-1] == query.shape[-1]
            and all(x.stride(-1) == 1 for x in (query, key, value)) and dropout == 0.0
            and (sliding_window is None or sliding_window >= group_size) and _cpu_flash_ops() is not None)


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
    segs: Segments,
    scale: float | None,
    dropout: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Causal attention inside each segment with flash-attn's varlen kernel (segments are contiguous in token order)."""
    flash_attn_varlen_func = _import_flash()
    cu = F.pad(segs.lengths.cumsum(0, dtype=torch.int32), (1, 0))  # (S+1,)
    max_len = int(segs.lengths.max())
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
    backend: "sdpa", "flash" (flash-attn varlen, CUDA) or "auto" (flash when installed and on CUDA).
    `layout` may pass a precomputed `token_layout(...)` (shared by every layer of a forward pass).
    """
    _check_inputs(query, key, value, group_size, attention_mask, position_ids, backend)
    b, hq, length, _ = query.shape
    hk = key.shape[1]
    if backend == "auto":
        backend = "flash" if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and flash_available() \
            else "sdpa"
    if layout is None:
        layout = token_layout(b, length, query.device, attention_mask, position_ids)
    if layout.index.numel() == 0:  # nothing but padding
        return query.new_zeros(b, length, hq, value.shape[-1]).transpose(1, 2)
    # Half the heads shifted by G/2 (paper section 3.2); all plain for the no-shift ablation.
    n_plain = hq // 2 if shift else hq
    if backend == "sdpa" and _use_cpu_flash(query, key, value, layout, dropout, sliding_window, group_size):
        return _S2FlashCPU.apply(query, key, value, group_size, n_plain, scale)

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
            pieces.append(_flash_segments(qh, kh, vh, group_segments(layout, group_size, shift_by), scale, dropout,
                                          sliding_window))
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
    """The S2 pattern as a dense (B, H, L, L) boolean mask, straight from the definition in LONGLORA.md.

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
