"""An independent S2-Attn reference for tests: the definition in docs/method.md as a dense mask, then plain softmax.

Written separately from longlora.attention (vectorised here, loops there) so that the two can check each other.
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
