"""The token layout every S2 backend shares: which tokens are real, where documents start, how they cut into groups.

A (B, L) batch is flattened to its N real tokens (`TokenLayout`); each (sequence, document, group) is a contiguous
*segment* of them that attends causally among itself (`group_segments`, `segment_cu_seqlens`). The regular layout
(no padding, no packing) has its groups at fixed positions (`group_runs`, `regular_cu_seqlens`), known from Python
integers alone. `head_blocks` splits the query heads into plain and shifted blocks over whole key/value heads, and
`merge_attention` joins two partial attentions of the same queries (a row prefix's keys, then the row's own).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


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


def regular_layout(batch: int, length: int, device: torch.device) -> TokenLayout:
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


_REGULAR_CU: dict[tuple, tuple[torch.Tensor, int]] = {}


def regular_cu_seqlens(batch: int, length: int, group_size: int, shift: int, device: torch.device):
    """cu_seqlens (int32, on device) and the longest segment of a regular layout: rows after one another, each cut
    at 0, G, 2G, ... (shift 0) or 0, G/2, 3G/2, ..., L (shift G/2). Built from integers once, then cached."""
    key = (batch, length, group_size, shift, str(device))
    if key not in _REGULAR_CU:
        if len(_REGULAR_CU) >= 256:  # many distinct shapes (variable-length batches): start over
            _REGULAR_CU.clear()
        row = [0] + list(range(shift or group_size, length, group_size)) + [length]
        bounds = [b * length + x for b in range(batch) for x in row[:-1]] + [batch * length]
        host = torch.tensor(bounds, dtype=torch.int32)
        if device.type == "cuda":  # pinned + non_blocking: the copy does not block the host
            cu = host.pin_memory().to(device, non_blocking=True)
        else:
            cu = host.to(device)
        _REGULAR_CU[key] = (cu, max(z - a for a, z in zip(row[:-1], row[1:])))
    return _REGULAR_CU[key]


def segment_cu_seqlens(layout: TokenLayout, group_size: int, shift: int) -> tuple[torch.Tensor, int]:
    """cu_seqlens of a layout's segments (padding and packed documents), cached on the layout. The longest segment
    is bounded by G, passed as the kernel's maximum without reading the lengths on the host."""
    key = ("cu_seqlens", group_size, shift)
    if key not in layout.cache:
        segs: Segments = group_segments(layout, group_size, shift)
        cu = F.pad(segs.lengths.cumsum(0, dtype=torch.int32), (1, 0))  # (S+1,)
        layout.cache[key] = (cu, min(group_size, layout.length))
    return layout.cache[key]
