"""An independent S2-Attn reference for tests: the definition in docs/method.md as a dense mask, then plain softmax.

Written separately from longlora.attention (vectorised here, loops there) so that the two can check each other.
Also the stand-ins the CPU tests put around the library: a per-segment varlen kernel (`ReferenceKernel`, what
torch's CUDA varlen kernels compute) and a row prefix cut out of a longer sequence (`SlicePrefix`).
"""

from __future__ import annotations

import torch


def reference_mask(length, num_heads, group_size, *, shift=True, real=None, position_ids=None, sliding_window=None,
                   batch=1):
    """(B, H, L, L) bool: may query i see key j under S2 (causal, same document, same plain/shifted group)."""
    real = torch.ones(batch, length, dtype=torch.bool) if real is None else real.bool().expand(batch, length)
    if position_ids is None:
        doc = torch.zeros(batch, length, dtype=torch.long)
    else:
        pos = position_ids.expand(batch, length)
        starts = torch.ones(batch, length, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        doc = starts.long().cumsum(1)
    # i': number of real tokens of the same document strictly before position t
    same_doc = doc[:, :, None] == doc[:, None, :]  # (B, L, L)
    before = torch.ones(length, length, dtype=torch.bool).tril(-1)  # j < i
    rel = (same_doc & before[None] & real[:, None, :]).sum(-1)  # (B, L)
    i = torch.arange(length)
    base = same_doc & (i[None, :, None] >= i[None, None, :]) & real[:, None, :] & real[:, :, None]
    if sliding_window is not None:
        base &= i[None, None, :] > i[None, :, None] - sliding_window
    heads = []
    for h in range(num_heads):
        offset = group_size // 2 if (shift and h >= num_heads // 2) else 0
        g = torch.div(rel + offset, group_size, rounding_mode="floor")  # (B, L)
        heads.append(base & (g[:, :, None] == g[:, None, :]))
    return torch.stack(heads, dim=1)  # (B, H, L, L)


def reference_attention(q, k, v, mask, scale=None):
    """Dense masked softmax attention. q (B, Hq, L, D), k/v (B, Hkv, L, D), mask (B, Hq, L, L) -> (B, Hq, L, D)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows (padding queries) give 0
    return probs @ v


def _segment_scores(q, k, cu, cu_k, scale, window):
    """Per segment pair: (query rows, key rows, masked scores (h, n, nk)); keys repeated to the query heads.
    Causal for window (-1, 0) (the last query sees the last key), banded for (w, 0), unmasked for (-1, -1)."""
    rep = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    for a, z, ak, zk in zip(cu[:-1].tolist(), cu[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        n, nk = z - a, zk - ak
        if n == 0:
            continue
        scores = q[a:z].transpose(0, 1) @ k[ak:zk].repeat_interleave(rep, 1).permute(1, 2, 0) * scale  # (h, n, nk)
        i, j = torch.arange(n)[:, None] + (nk - n), torch.arange(nk)[None, :]  # bottom-right aligned
        allowed = j <= i if window[1] == 0 else torch.ones(n, nk, dtype=torch.bool)
        if window[0] >= 0:
            allowed &= j >= i - window[0]
        yield slice(a, z), slice(ak, zk), scores.masked_fill(~allowed, float("-inf"))


def segment_attention(q, k, v, cu, scale, window, cu_k=None):
    """Softmax attention of each query segment [cu[i], cu[i+1]) over key segment [cu_k[i], cu_k[i+1]) (cu_k = cu by
    default; masks as in _segment_scores). q (N, h, D), k/v (Nk, hk, D) -> out (N, h, D), lse (h, N)."""
    rep = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for _, keys, scores in _segment_scores(q, k, cu, cu if cu_k is None else cu_k, scale, window):
        lses.append(scores.logsumexp(-1))  # (h, n)
        outs.append((scores.softmax(-1) @ v[keys].repeat_interleave(rep, 1).transpose(0, 1)).transpose(0, 1))
    return torch.cat(outs), torch.cat(lses, dim=1)


def segment_attention_backward(grad_out, q, k, v, out, lse, cu, scale, window, cu_k=None):
    """The flash backward of segment_attention from the given output and logsumexp (not recomputed ones): what a
    flash kernel computes, exact for one part of a row whose (out, lse) cover more keys than this call's.
    -> dq (N, h, D), dk/dv (Nk, hk, D)."""
    rep = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rows, keys, scores in _segment_scores(q, k, cu, cu if cu_k is None else cu_k, scale, window):
        p = torch.exp(scores - lse[:, rows, None])  # (h, n, nk) this call's share of each row's softmax
        go, o = grad_out[rows].transpose(0, 1), out[rows].transpose(0, 1)  # (h, n, D)
        vs = v[keys].repeat_interleave(rep, 1).transpose(0, 1)  # (h, nk, D)
        ks = k[keys].repeat_interleave(rep, 1).transpose(0, 1)
        ds = p * (go @ vs.transpose(-1, -2) - (go * o).sum(-1, keepdim=True))  # (h, n, nk)
        dq[rows] += (ds @ ks * scale).transpose(0, 1)
        dk[keys] += (ds.transpose(-1, -2) @ q[rows].transpose(0, 1) * scale).transpose(0, 1).unflatten(
            1, (k.shape[1], rep)).sum(2)
        dv[keys] += (p.transpose(-1, -2) @ go).transpose(0, 1).unflatten(1, (k.shape[1], rep)).sum(2)
    return dq, dk, dv


class ReferenceKernel:
    """KERNEL's interface over segment_attention; records every call."""

    def __init__(self):
        self.forward_calls, self.backward_calls = [], []

    def forward(self, out, q, k, v, cu, max_len, scale, window, cu_k=None, max_k=None):
        for c, m, x in ((cu, max_len, q), (cu if cu_k is None else cu_k, max_len if cu_k is None else max_k, k)):
            lengths = (c[1:] - c[:-1]).tolist()
            assert c.dtype == torch.int32 and c[0] == 0 and c[-1] == x.shape[0] and min(lengths) >= 0
            assert max(lengths) <= m, "max_len must bound every segment"
        self.forward_calls.append(dict(out=out, q=q, k=k, v=v, cu=cu.tolist(), window=window,
                                       cu_k=None if cu_k is None else cu_k.tolist()))
        o, lse = segment_attention(q, k, v, cu, scale, window, cu_k)
        out.copy_(o)
        return lse

    def backward(self, grad_out, q, k, v, out, lse, cu, max_len, scale, window, cu_k=None, max_k=None):
        assert lse.shape == (q.shape[1], q.shape[0])
        self.backward_calls.append(dict(q_heads=q.shape[1], kv_heads=k.shape[1], cu=cu.tolist()))
        return segment_attention_backward(grad_out, q, k, v, out, lse, cu, scale, window, cu_k)


class SlicePrefix:
    """A RowPrefix over a row cut out of a longer sequence: the keys of each half's straddling group before the cut
    (what a sequence-parallel rank receives as its halo), the gradients given back recorded."""

    def __init__(self, k, v, start, length, group, num_heads):
        """k/v (B, Hkv, T, D) of the whole sequence; the row is tokens [start, start + length); num_heads query
        heads, the first half plain."""
        rep, n_plain = num_heads // k.shape[1], num_heads // 2
        # key/value heads of each half (one is in both when it serves a plain and a shifted query head)
        self.kv = ((0, (n_plain - 1) // rep + 1), (n_plain // rep, k.shape[1]))
        self.kv_start = (self.kv[0][0], self.kv[1][0])
        half = group // 2
        # first token of the plain / shifted group holding token `start` (shifted groups begin at 0, G/2, 3G/2, ...)
        self.starts = [start - start % group, 0 if start < half else start - (start - half) % group]
        ends = [s + group if h == 0 or s else half for h, s in enumerate(self.starts)]
        self.first_lengths = tuple(min(end, start + length) - start for end in ends)
        self.k, self.v, self.start, self.given = k, v, start, None

    def fetch(self, key, value):
        return [(self.k[:, a:z, s:self.start].detach(), self.v[:, a:z, s:self.start].detach())
                for (a, z), s in zip(self.kv, self.starts)]

    def give_back(self, grads, dk, dv):
        self.given = [(gk.clone(), gv.clone()) for gk, gv in grads]
        dk += 1.0  # what the ranks the row's keys were sent to would add: must reach the returned gradient
        dv -= 1.0


# (query heads, key/value heads, sequence length, group size, row start, row length)
ROW_PREFIX_CASES = [
    (4, 2, 64, 16, 24, 32),  # plain half straddles (8 before), shifted half starts at the cut
    (4, 2, 64, 32, 32, 32),  # shifted straddles (16 before); its local part is two equal half-groups
    (6, 2, 96, 32, 48, 16),  # a row shorter than a group: the whole row is one segment of each half
    (4, 4, 96, 16, 40, 48),  # MHA, both halves straddle
    (9, 3, 96, 16, 40, 48),  # a key/value head shared by a plain and a shifted block
]


def check_row_prefix(attend, q, k, v, group, start, chunk, atol=1e-10):
    """attend(q, k, v, prefix) on tokens [start, start + chunk) of q/k/v (B, H, T, D) with a SlicePrefix = S2 over
    the whole sequence at those rows: outputs, gradients of the row's q/k/v and of the prefix keys/values, and what
    give_back adds. Returns the prefix."""
    hq = q.shape[1]
    rows = slice(start, start + chunk)
    ref = reference_attention(q, k, v, reference_mask(q.shape[2], hq, group, batch=q.shape[0]))[:, :, rows]
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    ql, kl, vl = (x[:, :, rows].detach().clone().requires_grad_() for x in (q, k, v))
    prefix = SlicePrefix(k, v, start, chunk, group, hq)
    out = attend(ql, kl, vl, prefix)
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    dq, dk, dv = torch.autograd.grad(out, (ql, kl, vl), grad_out)
    torch.testing.assert_close(dq, ref_grads[0][:, :, rows], atol=atol, rtol=0)
    torch.testing.assert_close(dk - 1.0, ref_grads[1][:, :, rows], atol=atol, rtol=0)  # give_back's +1 / -1
    torch.testing.assert_close(dv + 1.0, ref_grads[2][:, :, rows], atol=atol, rtol=0)
    assert any(s < start for s in prefix.starts)  # every case has a prefix somewhere
    for (gk, gv), (a, z), s in zip(prefix.given, prefix.kv, prefix.starts):
        assert gk.shape[2] == start - s
        torch.testing.assert_close(gk, ref_grads[1][:, a:z, s:start], atol=atol, rtol=0)
        torch.testing.assert_close(gv, ref_grads[2][:, a:z, s:start], atol=atol, rtol=0)
    return prefix
