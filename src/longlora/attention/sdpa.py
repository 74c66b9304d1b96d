"""The "sdpa" backend: S2-Attn as torch SDPA calls, on any device and any layout.

Each head half (plain, shifted) attends inside its segments. In the regular layout (no padding, no packing) the
groups sit at fixed positions: the token-first tensors are viewed as (B * groups, H, G, D), one SDPA call per run of
equal-length groups. Otherwise the segments are gathered into padded (segments, capacity, H, D) buffers, one buffer
per capacity bucket (G, G/2, G/4, ...), so that short segments (the first shifted half-group, a packed document's
tail) do not pay for a whole group; padding sits at the end of each segment, so the causal mask keeps it out of real
rows. The flash-attn backend reuses the same per-half composition with its own segment kernel (`s2_sdpa`'s
`segment_kernel`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layout import Segments, TokenLayout, group_runs, group_segments

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
_MIN_BUCKET = 32  # smaller segments share the smallest bucket; below this size padding costs nothing worth saving


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



def s2_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: TokenLayout, group_size: int,
            n_plain: int, scale: float | None, dropout: float, sliding_window: int | None,
            segment_kernel=None) -> torch.Tensor:
    """S2 over `layout` by head halves: heads [0, n_plain) in plain groups, the rest shifted by G/2.

    query (B, Hq, L, D), key/value (B, Hkv, L, D) -> (B, Hq, L, D), padded positions 0. `segment_kernel(q, k, v,
    layout, group_size, shift, scale, dropout, sliding_window)` on token-first (N, H, D) halves replaces SDPA (the
    flash-attn backend passes its varlen call).
    """
    b, hq, length, _ = query.shape
    hk = key.shape[1]
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
        if segment_kernel is not None:
            pieces.append(segment_kernel(qh, kh, vh, layout, group_size, shift_by, scale, dropout, sliding_window))
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
