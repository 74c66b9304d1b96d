"""The S2 pattern as a dense boolean mask, straight from its definition: the independent reference of tests and the
naive baseline of benchmarks (quadratic in memory; never used by the backends)."""

from __future__ import annotations

import torch


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
