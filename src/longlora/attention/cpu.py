"""S2-Attn on CPU for the regular layout (no padding, no packing): torch's CPU flash kernels driven piece by piece.

`s2_attention` dispatches here (backend "cpu", or "auto" on CPU) when `cpu_flash_applies(...)`. The autograd Function
writes every piece into one output buffer and one set of gradient buffers, so that S2-Attn holds no more than full
causal attention does (output, logsumexp, dq/dk/dv) plus one small backward tile.

Output reuse (the part that keeps the backward below full SDPA's peak) writes dq over the saved output when nothing
outside the backward holds that output. Whether that is so is read from the storage's use count
(`torch._C._storage_Use_Count`, a private torch API), compared with a count calibrated on this torch. The calibration
runs once, lazily, on the first forward that could reuse (not at import), in a fresh thread: saved-tensor hooks
(activation checkpointing, offloading) are thread-local, so the probe never sees the caller's hooks, and a first use
inside a backward (checkpoint recompute) does not nest a backward in the caller's graph. Where the API is missing or
the calibration does not tell "held" from "dropped", the output is never reused: results are unchanged, the peak is
then about one output larger (`output_reuse_supported()` says which applies).
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch

from .layout import TokenLayout, group_runs, head_blocks, merge_attention

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


def _batches(length: int, group_size: int, shift: int, first_alone: bool = False) -> list[tuple[int, int, int, int]]:
    """(start, segment_length, count, spacing): equal-length groups of a row, evenly spaced, batched for one call.

    The runs of `group_runs`, except that a shifted row's two half-groups (the first and the last, of equal length
    when L is a multiple of G) are batched together: one kernel call with two batch entries instead of two calls.
    first_alone: the row's first segment is a batch of its own (it has a prefix).
    """
    runs = [(start, seg_len, count, seg_len) for start, seg_len, count in group_runs(length, group_size, shift)]
    if first_alone:
        start, seg_len, count, _ = runs[0]
        return [(start, seg_len, 1, seg_len)] + ([(start + seg_len, seg_len, count - 1, seg_len)] if count > 1
                                                 else []) + runs[1:]
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


class RowPrefix(Protocol):
    """Keys/values that come before every row of an S2 call, inside each row's first segment.

    Sequence parallelism (longlora.sequence_parallel) passes one: a rank's chunk is a row whose first group began on
    earlier ranks. Per half of the heads (0 plain, 1 shifted):
    - first_lengths[h]: the length of each row's first segment; the rest of the row is cut into groups of G after it;
    - segments (optional; padding or packed documents): segments[h][row] lists the row's segments of real tokens as
      (start, length), replacing first_lengths, and prefix_lengths[h][row] how many of the fetched prefix tokens
      (the last ones) the row's first segment continues (0: none; other rows may need more);
    - kv_start[h]: the first key/value head of the prefix fetched for the half;
    - fetch(key, value) -> per half (key, value), each (B, key/value heads of the half, n, D), n >= 0: the keys that
      every query of a row's first segment sees before the row's own (called in the forward);
    - give_back(grads, dk, dv): grads per half (dkey, dvalue) of the fetched prefix; adds into dk/dv (B, Hkv, L, D)
      whatever gradient of the row's own keys/values comes back (called at the end of the backward).
    """

    first_lengths: tuple[int, int]
    kv_start: tuple[int, int]
    segments: tuple[list[list[tuple[int, int]]], ...] | None
    prefix_lengths: tuple[list[int], ...] | None

    def fetch(self, key: torch.Tensor, value: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]: ...

    def give_back(self, grads: list[tuple[torch.Tensor, torch.Tensor]], dk: torch.Tensor,
                  dv: torch.Tensor) -> None: ...


class _S2FlashCPU(torch.autograd.Function):
    """S2-Attn on the regular layout with torch's CPU flash kernels, one call per (row, head block, batch of groups).

    Full causal SDPA holds its output, its logsumexp and then dq/dk/dv; composing SDPA calls with autograd also holds
    every piece's output and concatenated copies. Here the forward writes every piece into one (B, L, Hq, D) output
    (the returned tensor, saved for backward) and keeps only the pieces' logsumexps; the backward writes into one
    dq/dk/dv, calling the backward kernel on square tiles of a few groups at a time (the flash backward is exact per
    tile given the whole row's output and logsumexp). The kernel returns freshly allocated gradients for each call;
    to stay below full SDPA's peak, dq is written over the saved output (each piece's output is dead once its rows
    are done) when nothing else holds that output (`_output_is_private`); otherwise dq is a new buffer.

    With a `RowPrefix`, each row's first segment also attends to the prefix keys: a second (unmasked: every prefix
    key precedes every row) kernel call merged with the first through their logsumexps, and one more key tile in
    the backward. A prefix may also list each row's segments (padding, packed documents): one call per segment, and
    padded rows give 0.
    """

    @staticmethod
    def forward(ctx, query, key, value, group_size, n_plain, scale, private_count, prefix=None):
        # query (B, Hq, L, D), key/value (B, Hkv, L, D)
        flash_fwd, _ = _cpu_flash_ops()
        b, hq, length, d = query.shape
        # output stored tokens-first like SDPA's, returned as a (B, Hq, L, D) view
        out = query.new_empty(b, length, hq, d).transpose(1, 2)
        segments = getattr(prefix, "segments", None)  # per half, per row: (start, length) of its real segments
        if segments is not None:
            out.zero_()  # padded rows give 0: no segment writes them
        before = prefix.fetch(key, value) if prefix is not None else []  # per half (k, v) (B, Hkv_half, n, D)
        plan, lses = [], []
        for bi in range(b):
            for h0, h1, kv0, kv1, shift in head_blocks(hq, key.shape[1], n_plain, group_size):
                pre, batches = None, None  # pre: (half, the block's key/value heads and first token in the prefix)
                if prefix is not None:
                    half = int(h0 >= n_plain)
                    n = n_row = before[half][0].shape[2]
                    if segments is not None:
                        batches = [(start, n_seg, 1, n_seg) for start, n_seg in segments[half][bi]]
                        n_row = prefix.prefix_lengths[half][bi]
                    shift = prefix.first_lengths[half] % group_size
                    if n_row:
                        pre = (half, kv0 - prefix.kv_start[half], kv1 - prefix.kv_start[half], n - n_row)
                if batches is None:  # regular rows (a padded row may have no segment at all: [])
                    batches = _batches(length, group_size, shift, first_alone=pre is not None)
                for batch in batches:
                    q, k, v = (_pieces(x, bi, a, z, *batch) for x, a, z in
                               ((query, h0, h1), (key, kv0, kv1), (value, kv0, kv1)))  # (count, H, seg, D)
                    piece, lse = flash_fwd(q, k, v, 0.0, True, scale=scale)  # (count, H, seg, D), (count, H, seg)
                    on_prefix = pre if batch[0] == 0 else None
                    if on_prefix is not None:
                        kp, vp = (x[bi:bi + 1, pre[1]:pre[2], pre[3]:] for x in before[pre[0]])  # (1, Hkv, n, D)
                        piece, lse = merge_attention(piece, lse, *flash_fwd(q, kp, vp, 0.0, False, scale=scale))
                    _pieces(out, bi, h0, h1, *batch).copy_(piece)
                    del piece  # one piece's output alive at a time
                    plan.append((bi, h0, h1, kv0, kv1, batch, on_prefix))
                    lses.append(lse)
        ctx.plan, ctx.scale, ctx.output_reused, ctx.private_count = plan, scale, False, private_count
        ctx.prefix, ctx.padded = prefix, segments is not None
        ctx.save_for_backward(query, key, value, out, *lses, *(t for pair in before for t in pair))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        _, flash_bwd = _cpu_flash_ops()
        if ctx.output_reused:
            raise RuntimeError(
                "S2-Attn's backward ran twice over one graph (retain_graph=True): its first backward wrote the "
                "gradient over the saved attention output to save memory. Set longlora.attention."
                "REUSE_OUTPUT_MEMORY = False (or run the forward under use_backend(reuse_output_memory=False)) to "
                "keep it.")
        query, key, value, out, *rest = ctx.saved_tensors
        lses, flat = rest[:len(ctx.plan)], rest[len(ctx.plan):]
        before = list(zip(flat[::2], flat[1::2]))  # per half (k, v) of the prefix
        # every (row, head, token) of dq is written once (pieces partition them); dk/dv accumulate over head blocks
        if isinstance(ctx.private_count, list):  # calibration run: record the count, reuse nothing
            ctx.private_count.append(_storage_use_count(out))
        ctx.output_reused = out.stride() == query.stride() and _output_is_private(out, ctx.private_count)
        # (padded rows: out holds zeros there, and no piece writes them)
        dq = out if ctx.output_reused else (torch.zeros_like if ctx.padded else torch.empty_like)(query)
        # same strides as the inputs, so that autograd hands them over without a copy
        dk, dv = torch.zeros_like(key), torch.zeros_like(value)
        d_before = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in before]
        threads = _kernel_threads()
        for (bi, h0, h1, kv0, kv1, batch, pre), lse in zip(ctx.plan, lses):
            q, o, go, gq = (_pieces(x, bi, h0, h1, *batch) for x in (query, out, grad_out, dq))  # (n, H, seg, D)
            k, v, gk, gv = (_pieces(x, bi, kv0, kv1, *batch) for x in (key, value, dk, dv))  # (n, Hkv, seg, D)
            _, seg_len, count, _ = batch
            tile = max(_BWD_MIN_TILE, -(-seg_len // _BWD_SPLITS))
            for g, heads, kv_heads, rep in _backward_calls(count, h1 - h0, kv1 - kv0, threads):
                for i0 in range(0, seg_len, tile):
                    rows = slice(i0, min(i0 + tile, seg_len))
                    # key tiles at or before the query tile (causal on the diagonal), and the prefix (unmasked)
                    tiles = [(k, v, gk, gv, slice(j0, min(j0 + tile, seg_len)), j0 == i0)
                             for j0 in range(0, i0 + 1, tile)]
                    if pre is not None:
                        tiles.append(tuple(x[bi:bi + 1, pre[1]:pre[2], pre[3]:]
                                           for x in before[pre[0]] + d_before[pre[0]]) + (slice(None), False))
                    row_dq = None
                    for ks, vs, gks, gvs, cols, causal in tiles:
                        # rep > 1: one key/value head seen as `rep` query heads (stride 0, no copy)
                        kt, vt = (x[g, kv_heads, cols] if rep == 1 else x[g, kv_heads, cols].expand(-1, rep, -1, -1)
                                  for x in (ks, vs))
                        tq, tk, tv = flash_bwd(go[g, heads, rows], q[g, heads, rows], kt, vt, o[g, heads, rows],
                                               lse[g, heads, rows], 0.0, causal, scale=ctx.scale)
                        row_dq = tq if row_dq is None else row_dq.add_(tq)
                        gks[g, kv_heads, cols] += tk if rep == 1 else tk.sum(1, keepdim=True)
                        gvs[g, kv_heads, cols] += tv if rep == 1 else tv.sum(1, keepdim=True)
                        del tq, tk, tv
                    gq[g, heads, rows].copy_(row_dq)  # these output rows are no longer read: safe to overwrite
                    del row_dq
        if ctx.prefix is not None:
            ctx.prefix.give_back(d_before, dk, dv)
        return dq, dk, dv, None, None, None, None, None


def _storage_use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _calibrate_private_use_count() -> int | None:
    """The use count a saved output's storage has in backward when only autograd holds it; None if undetectable.

    Measured with this torch and this Function rather than assumed: a tiny S2 call whose backward records the count,
    once with the output dropped, once with it held by the caller. The counts must differ, or the reuse is never done.
    """
    if not hasattr(torch._C, "_storage_Use_Count") or _cpu_flash_ops() is None:
        return None
    counts: list[int] = []
    try:
        q = torch.zeros(1, 2, 4, 2, requires_grad=True)  # (B, H, L, D)
        with torch.enable_grad():
            _S2FlashCPU.apply(q, q, q, 2, 1, None, counts).sum().backward()  # output dropped
            held = _S2FlashCPU.apply(q, q, q, 2, 1, None, counts)
            held.sum().backward()  # output held by the caller
        dropped, kept = counts
    except Exception:  # any surprise in the private API: never reuse
        return None
    return dropped if kept > dropped else None


_CALIBRATION: list[int | None] = []  # filled once by _private_use_count
_CALIBRATION_LOCK = threading.Lock()


def _private_use_count() -> int | None:
    """The calibrated private use count, measured on first call in a thread of its own (see the module docstring)."""
    with _CALIBRATION_LOCK:
        if not _CALIBRATION:
            result: list[int | None] = [None]
            probe = threading.Thread(target=lambda: result.__setitem__(0, _calibrate_private_use_count()))
            probe.start()
            probe.join()
            _CALIBRATION.append(result[0])
        return _CALIBRATION[0]


def output_reuse_supported() -> bool:
    """Whether this torch lets the backward tell that nobody else holds the output (so dq may be written over it)."""
    return _private_use_count() is not None


def _output_is_private(out: torch.Tensor, private_count) -> bool:
    """Whether no tensor outside this backward shares the saved output's storage (so overwriting it is invisible).

    The caller's output tensor, a view of it saved by a later op (retain_graph) or a saved-tensor hook's copy all
    raise the storage's use count above the calibrated private count; then the output is left alone.
    """
    return isinstance(private_count, int) and _storage_use_count(out) <= private_count


def cpu_flash_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: TokenLayout,
                      dropout: float, sliding_window: int | None, group_size: int) -> bool:
    """Whether this call can take the CPU Function (regular layout, CPU tensors, no dropout, window >= G)."""
    return (query.device.type == "cpu" and layout.regular and query.dtype in _CPU_FLASH_DTYPES
            and key.dtype == value.dtype == query.dtype and value.shape[-1] == query.shape[-1]
            and all(x.stride(-1) == 1 for x in (query, key, value)) and dropout == 0.0
            and (sliding_window is None or sliding_window >= group_size) and _cpu_flash_ops() is not None)


def s2_cpu_flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group_size: int, n_plain: int,
                 scale: float | None, reuse_output_memory: bool = True,
                 prefix: RowPrefix | None = None) -> torch.Tensor:
    """S2-Attn on the regular layout. query (B, Hq, L, D), key/value (B, Hkv, L, D) -> (B, Hq, L, D).

    Heads [0, n_plain) use plain groups, the rest groups shifted by group_size // 2 (with a `prefix`: its
    first_lengths set each half's first segment, and that segment also sees the prefix's keys). reuse_output_memory
    lets the backward write dq over the saved output when nothing else holds it (see the module docstring).
    """
    private_count = _private_use_count() if reuse_output_memory else None
    return _S2FlashCPU.apply(query, key, value, group_size, n_plain, scale, private_count, prefix)
