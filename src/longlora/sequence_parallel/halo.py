"""The attention side of sequence parallelism: which earlier keys each rank's queries need (`plan_chunks` ->
`ChunkPlan`), the point-to-point exchange that moves them forward and their gradients back (the halo), and the
"s2_sp" attention entry that attends a chunk's queries over [halo ; chunk] (see the package docstring).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .. import attention
from ..attention import TokenLayout, group_segments, resolve_backend, s2_attention, token_layout
from ..attention.cpu import s2_cpu_flash
from ..attention.varlen import prefix_supported, s2_varlen
from ..integration import (
    s2_attention_forward, s2_mask,
)

SP_ATTENTION = "s2_sp"
PLAN_KEY = "sp_plan"  # forward kwarg that carries the ChunkPlan down to every attention layer


# ----------------------------------------------------------------------------------------------------------------
# bookkeeping: which ranks hold which tokens, and which earlier tokens each rank's queries need


def valid_world_sizes(length: int, group_size: int) -> list[int]:
    """Numbers of ranks N that split `length` tokens into chunks holding whole groups or whole fractions of one."""
    return [n for n in range(1, length + 1) if length % n == 0
            and ((length // n) % group_size == 0 or group_size % (length // n) == 0)]


def check_sequence_parallel(length: int, group_size: int, world: int) -> int:
    """The chunk length L/N; a ValueError naming the valid N when the chunks would not line up with the groups."""
    chunk = length // world if length % world == 0 else 0
    if chunk == 0 or (chunk % group_size and group_size % chunk):
        valid = [n for n in valid_world_sizes(length, group_size) if n > 1]
        raise ValueError(
            f"sequence parallelism over {world} ranks needs the sequence length ({length}) split into equal chunks "
            f"that are a multiple of the group size ({group_size}) or divide it; valid numbers of ranks here: "
            f"{valid or 'none'}. Change --sequence-parallel or the context length/group size.")
    return chunk


def aligned_length(length: int, group_size: int, world: int) -> int:
    """The shortest length >= `length` whose N chunks are a multiple or a divisor of the group size."""
    chunk = -(-length // world)
    if chunk >= group_size:
        return -(-chunk // group_size) * group_size * world
    while group_size % chunk:
        chunk += 1
    return chunk * world


def _halves(num_heads: int, num_kv_heads: int, shift: bool) -> list[tuple[int, int, int, int, int]]:
    """(q0, q1, kv0, kv1, shift_index) per half: query heads [q0, q1) read key/value heads [kv0, kv1)."""
    rep = num_heads // num_kv_heads
    n_plain = num_heads // 2 if shift else num_heads  # half the heads shifted (paper section 3.2)
    out = []
    for i, (q0, q1) in enumerate(((0, n_plain), (n_plain, num_heads))):
        if q1 > q0:
            out.append((q0, q1, q0 // rep, (q1 - 1) // rep + 1, i))
    return out


@dataclass(frozen=True)
class ChunkPlan:
    """One rank's share of a sharded batch: its chunk, its halos and the global segment ids attention needs.

    halo[s][h] is how many tokens right before rank s's chunk its half-h queries (h=0 plain, 1 shifted) need; every
    rank holds the whole table, so every rank knows what to send to whom. `real` and `seg` cover the window
    [rank*chunk - max(halo[rank]), (rank+1)*chunk) of this rank: real tokens and segment id per half (equal ids = same
    group of the same document); `layouts` turn them into s2_attention's segments.
    """

    rank: int
    world: int
    chunk: int
    group_size: int
    halo: tuple[tuple[int, int], ...]
    real: torch.Tensor  # (B, W) bool
    seg: torch.Tensor  # (2, B, W) long
    layouts: tuple[TokenLayout, TokenLayout]  # per half: the segments of [halo ; chunk] (see _window_layout)
    group: object = None
    first_lengths: tuple[int, int] | None = None
    """Regular layouts (no padding, no packing): per half, the length of the chunk's first segment, the rest being
    groups of G: the CPU/varlen kernels run the chunk as one S2 row with a prefix (the halo)."""
    segments: tuple[list[list[tuple[int, int]]], ...] | None = None
    """Padding or packing: per half, per row, the (start, length) of the row's segments of real tokens in the chunk
    (the CPU kernels' prefix path takes them one by one), and prefix_lengths[half][row]: the tokens of the halo that
    the row's first segment continues (its last ones)."""
    prefix_lengths: tuple[list[int], ...] | None = None
    chunk_layout: TokenLayout | None = None
    """The chunk as B regular rows of C tokens: what the kernels see (backend resolution)."""

    def transfers(self, half: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        """(sends, recvs) of one half: sends (peer, a, b) = my local tokens [a, b) to peer; recvs (peer, a, b) = the
        peer's tokens that fill [a, b) of my halo buffer (halo index 0 = global token rank*chunk - halo)."""
        c, r = self.chunk, self.rank
        sends, recvs = [], []
        for dst in range(r + 1, self.world):
            start = dst * c - self.halo[dst][half]  # first global token dst needs
            if start < (r + 1) * c:
                sends.append((dst, max(start, r * c) - r * c, c))
        need = self.halo[r][half]
        start = r * c - need
        for src in range(max(0, start // c), r):
            a, b = max(start, src * c), (src + 1) * c
            if b > a:
                recvs.append((src, a - start, b - start))
        return sends, recvs


def plan_chunks(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, batch: int, length: int,
                group_size: int, world: int, rank: int, shift: bool = True, group=None,
                device: torch.device | str = "cpu") -> ChunkPlan:
    """The ChunkPlan of `rank` from the global (B, L) padding mask / position ids (restarting per packed document).

    Pure function of the layout (no communication): every rank of the group computes the same halo table.
    """
    chunk = check_sequence_parallel(length, group_size, world)
    layout = token_layout(batch, length, torch.device("cpu"),
                          None if attention_mask is None else attention_mask.cpu(),
                          None if position_ids is None else position_ids.cpu())
    flat = batch * length
    real = torch.zeros(flat, dtype=torch.bool)
    real[layout.index] = True
    pos_in_row = torch.arange(flat) % length
    segs, starts = [], []
    for shift_by in (0, group_size // 2 if shift else 0):
        seg_id = torch.full((flat,), -1, dtype=torch.long)
        seg_start = torch.full((flat,), length, dtype=torch.long)
        if layout.index.numel():
            s = group_segments(layout, group_size, shift_by)
            seg_id[layout.index] = s.seg_id
            first = torch.full((int(s.seg_id.max()) + 1,), length, dtype=torch.long)
            first = first.scatter_reduce(0, s.seg_id, pos_in_row[layout.index], "amin")
            seg_start[layout.index] = first[s.seg_id]
        segs.append(seg_id.view(batch, length))
        starts.append(seg_start.view(batch, length))
    real = real.view(batch, length)
    halo = []
    for s in range(world):
        lo, hi = s * chunk, (s + 1) * chunk
        need = []
        for h in range(2):
            st = torch.where(real[:, lo:hi], starts[h][:, lo:hi], torch.full_like(starts[h][:, lo:hi], lo))
            need.append(max(0, lo - int(st.min())))
        halo.append((need[0], need[1]))
    lo = rank * chunk - max(halo[rank])
    hi = (rank + 1) * chunk
    seg = torch.stack([segs[0][:, lo:hi], segs[1][:, lo:hi]])  # (2, B, W)
    mine = seg[:, :, -chunk:]  # (2, B, C) segment ids over the chunk (-1: padding)
    if layout.regular:  # segments sit at the same places in every row: the first one's length says it all
        shape = dict(first_lengths=tuple(int((mine[h, 0] == mine[h, 0, 0]).sum()) for h in range(2)))
    else:
        shape = dict(first_lengths=(0, 0), segments=tuple(
            [_row_segments(mine[h, b]) for b in range(batch)] for h in range(2)), prefix_lengths=tuple(
            [int((seg[h, b, :-chunk][seg.shape[2] - chunk - halo[rank][h]:] == mine[h, b, 0]).sum())
             if mine[h, b, 0] >= 0 else 0 for b in range(batch)] for h in range(2)))
    return ChunkPlan(rank=rank, world=world, chunk=chunk, group_size=group_size, halo=tuple(halo),
                     real=real[:, lo:hi].to(device), seg=seg.to(device), group=group, **shape,
                     chunk_layout=token_layout(batch, chunk, torch.device(device)),
                     layouts=tuple(_window_layout(real[:, lo:hi][:, -(n + chunk):], seg[h][:, -(n + chunk):],
                                                  group_size, device) for h, n in enumerate(halo[rank])))


def _row_segments(ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of the runs of equal segment ids in a row (C,), padding (-1) left out."""
    start = torch.ones_like(ids, dtype=torch.bool)
    start[1:] = ids[1:] != ids[:-1]
    starts = start.nonzero().squeeze(1).tolist()
    bounds = starts + [ids.numel()]
    return [(a, z - a) for a, z in zip(bounds[:-1], bounds[1:]) if int(ids[a]) >= 0]


def _window_layout(real: torch.Tensor, seg: torch.Tensor, group_size: int, device) -> TokenLayout:
    """A TokenLayout of a (B, n) window in which every segment (run of equal segment ids) is its own "document".

    `s2_attention(..., shift=False, layout=...)` then attends causally inside each segment (a segment never exceeds
    G tokens, so no group boundary cuts it again): exactly S2 restricted to the window's keys. Without padding or
    packing the window's segments are groups of G from its first token (the window starts at a group start): then
    the layout is s2_attention's regular one, which takes its fused CPU kernels.
    """
    b, n = real.shape
    boundary = torch.ones(b, n, dtype=torch.bool)
    boundary[:, 1:] = seg[:, 1:] != seg[:, :-1]
    groups_from_start = torch.zeros(b, n, dtype=torch.bool)
    groups_from_start[:, ::group_size] = True
    if bool(real.all()) and torch.equal(boundary, groups_from_start):
        return token_layout(b, n, torch.device(device))
    flat_real = real.reshape(-1)
    index = flat_real.nonzero().squeeze(1)
    s = seg.reshape(-1)[index]
    row = index // n
    start = torch.ones_like(s, dtype=torch.bool)
    start[1:] = (s[1:] != s[:-1]) | (row[1:] != row[:-1])
    ar = torch.arange(s.numel())
    offset = ar - torch.where(start, ar, torch.zeros_like(ar)).cummax(0).values
    return TokenLayout(index=index.to(device), doc_start=start.to(device), offset=offset.to(device), batch=b,
                       length=n)


# ----------------------------------------------------------------------------------------------------------------
# the exchange: keys/values forward, their gradients backward

_TRAFFIC: list | None = None  # when counting (see count_traffic): (direction, peer, bytes) per message sent
_DRY_RUN = False


@contextlib.contextmanager
def count_traffic(dry_run: bool = False):
    """Record every message the exchange sends: yields a list of (direction, peer, bytes), direction fwd|bwd.

    dry_run=True posts nothing (received buffers stay uninitialised): with meta tensors, the bytes a run at any
    shape would send, without the memory or the ranks (benchmarks/sequence_parallel.py).
    """
    global _TRAFFIC, _DRY_RUN
    log: list = []
    previous, _TRAFFIC, was_dry, _DRY_RUN = _TRAFFIC, log, _DRY_RUN, dry_run
    try:
        yield log
    finally:
        _TRAFFIC, _DRY_RUN = previous, was_dry


def _exchange(sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]], group, direction: str):
    """Post all sends and receives at once (no ordering deadlock), then wait. Peers are ranks inside `group`."""
    ops = []
    for peer, t in sends:
        if _TRAFFIC is not None:
            _TRAFFIC.append((direction, peer, t.numel() * t.element_size()))
        if _DRY_RUN:
            continue
        ops.append(dist.P2POp(dist.isend, t, _global_rank(group, peer), group))
    for peer, t in recvs if not _DRY_RUN else ():
        ops.append(dist.P2POp(dist.irecv, t, _global_rank(group, peer), group))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _fetch_halos(key: torch.Tensor, value: torch.Tensor, plan: ChunkPlan, halves) -> list:
    """Forward exchange: send my keys/values to the later ranks that need them; receive, per half h (0 plain,
    1 shifted), the halo (key, value) my queries need, each (B, kv1-kv0, halo, D) (0 tokens when none; empty for a
    half absent from `halves`). key/value (B, Hkv, C, D)."""
    b, _, _, d = key.shape
    sends, recvs, halos = [], [], [(key.new_empty(b, 0, 0, d), value.new_empty(b, 0, 0, d))] * 2
    for _, _, kv0, kv1, h in halves:
        s, r = plan.transfers(h)
        # keys and values of a half travel in one message per peer: (2, B, heads, tokens, D)
        sends += [(peer, torch.stack([key[:, kv0:kv1, a:z], value[:, kv0:kv1, a:z]])) for peer, a, z in s]
        buf = key.new_empty(2, b, kv1 - kv0, plan.halo[plan.rank][h], d)  # (K|V, B, heads, halo, D)
        recvs += [(peer, buf[:, :, :, a:z]) for peer, a, z in r]
        halos[h] = (buf[0], buf[1])
    staged = [(peer, t if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format))
              for peer, t in recvs]
    _exchange(sends, staged, plan.group, "fwd")
    for (_, view), (_, t) in zip(recvs, staged):
        if t is not view:
            view.copy_(t)
    return halos


def _return_halo_grads(grads: list, dk: torch.Tensor, dv: torch.Tensor, plan: ChunkPlan, halves) -> None:
    """Backward exchange, the reverse of `_fetch_halos`: the gradients of my halos (per half (dkey, dvalue)) go back
    to their senders; the gradients of the keys/values I sent come back and are added into dk/dv (B, Hkv, C, D)."""
    b, _, _, d = dk.shape
    sends, recvs = [], []
    for _, _, kv0, kv1, h in halves:
        gk, gv = grads[h]
        s, r = plan.transfers(h)
        sends += [(peer, torch.stack([gk[:, :, a:z], gv[:, :, a:z]])) for peer, a, z in r]
        recvs += [(peer, (kv0, kv1, a, z), dk.new_empty(2, b, kv1 - kv0, z - a, d)) for peer, a, z in s]
    _exchange(sends, [(peer, t) for peer, _, t in recvs], plan.group, "bwd")
    for _, (kv0, kv1, a, z), t in recvs:
        dk[:, kv0:kv1, a:z] += t[0]
        dv[:, kv0:kv1, a:z] += t[1]


class _HaloExchange(torch.autograd.Function):
    """The exchange for the general path (padding, packing, GPU): per half the window (k, v) = [halo ; chunk], each
    (B, kv1-kv0, halo+C, D) (a view of the inputs where the half needs no halo). Backward: the halo's gradients go
    back to their owners and the gradients of what this rank sent come back, added to its own keys' gradients.

    The local keys pass through this Function too, so that every rank's backward reaches it, also a rank that
    received nothing but must receive gradients.
    """

    @staticmethod
    def forward(ctx, key, value, plan, halves):
        ctx.plan, ctx.halves, ctx.shape = plan, halves, key.shape
        halos = _fetch_halos(key, value, plan, halves)
        outs = []
        for _, _, kv0, kv1, h in halves:
            for local, halo in zip((key[:, kv0:kv1], value[:, kv0:kv1]), halos[h]):
                outs.append(torch.cat([halo, local], dim=2) if halo.shape[2] else local)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        plan, halves = ctx.plan, ctx.halves
        dk = grads[0].new_zeros(ctx.shape)
        dv = grads[0].new_zeros(ctx.shape)
        halo_grads = [None, None]
        for i, (_, _, kv0, kv1, h) in enumerate(halves):
            gk, gv = grads[2 * i], grads[2 * i + 1]
            halo = plan.halo[plan.rank][h]
            dk[:, kv0:kv1] += gk[:, :, halo:]  # the chunk's own keys/values
            dv[:, kv0:kv1] += gv[:, :, halo:]
            halo_grads[h] = (gk[:, :, :halo], gv[:, :, :halo])
        _return_halo_grads(halo_grads, dk, dv, plan, halves)
        return dk, dv, None, None


class _ChunkPrefix:
    """The halo as the kernels' `RowPrefix` (longlora.attention.cpu, attention.varlen): fetched inside the S2
    Function's forward, its gradients returned inside its backward, straight into the Function's own dk/dv (no
    [halo ; chunk] copies)."""

    def __init__(self, plan: ChunkPlan, halves):
        self.plan, self.halves = plan, halves
        self.first_lengths, self.segments, self.prefix_lengths = plan.first_lengths, plan.segments, plan.prefix_lengths
        starts = {h: kv0 for _, _, kv0, _, h in halves}
        self.kv_start = (starts.get(0, 0), starts.get(1, 0))

    def fetch(self, key, value):
        return _fetch_halos(key, value, self.plan, self.halves)

    def give_back(self, grads, dk, dv):
        _return_halo_grads(grads, dk, dv, self.plan, self.halves)


# ----------------------------------------------------------------------------------------------------------------
# attention of a chunk over [halo ; chunk]


def _chunk_attention(q, k, v, layout: TokenLayout, group_size: int, scale, dropout, sliding_window):
    """Causal attention of the chunk's queries over [halo ; chunk] keys inside the segments of `layout`.

    q (B, Hq, C, D), k/v (B, Hkv, halo+C, D) -> (B, Hq, C, D). The halo's query rows are zeros: the one segment per
    row that straddles the chunk start computes (and drops) them, the price of reusing s2_attention's kernels.
    """
    b, hq, c, d = q.shape
    halo = k.shape[2] - c
    q_all = torch.cat([q.new_zeros(b, hq, halo, d), q], dim=2) if halo else q  # (B, Hq, halo+C, D)
    out = s2_attention(q_all, k, v, group_size, shift=False, scale=scale, dropout=dropout,
                       sliding_window=sliding_window, backend="auto", layout=layout)  # (B, Hq, halo+C, D)
    return out[:, :, halo:]


def sequence_parallel_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                        scaling: float | None = None, **kwargs):
    """AttentionInterface entry "s2_sp": S2 over a sharded sequence (training, with a plan), else "s2_sdpa"'s.

    query (B, Hq, C, D), key/value (B, Hkv, C, D) -> ((B, C, Hq, D), None).
    """
    plan: ChunkPlan | None = kwargs.pop(PLAN_KEY, None)
    if plan is not None and not module.training:
        raise ValueError("a sharded (sequence-parallel) forward is for training; evaluate on the whole sequence")
    if plan is None:
        # eval, generation or an unsharded forward: exactly the single-device S2 / SDPA path
        return s2_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    **kwargs)
    b, hq, c, _ = query.shape
    if c != plan.chunk or key.shape[2] != c:
        raise ValueError(f"sequence-parallel attention expected {plan.chunk} local tokens, got {c} queries and "
                         f"{key.shape[2]} keys (use_cache must be False in training)")
    settings = getattr(module, "s2_settings", None)
    shift = settings.shift if settings is not None else True
    halves = _halves(hq, key.shape[1], shift)
    window = kwargs.get("sliding_window")
    if plan.chunk_layout is not None:
        # the chunk is one S2 row whose first segments continue the halo: the CPU kernels (any layout) and the
        # varlen kernels (regular layouts) take the halo as a prefix (fetched and returned inside their Function),
        # writing one (B, C, Hq, D) output
        n_plain = hq // 2 if shift else hq
        backend = resolve_backend(query, key, value, plan.chunk_layout, plan.group_size, dropout=dropout,
                                  backend=settings.backend if settings is not None else "auto",
                                  sliding_window=window, scale=scaling)
        prefix = _ChunkPrefix(plan, halves)
        if backend == "cpu":
            out = s2_cpu_flash(query, key, value, plan.group_size, n_plain, scaling, attention.REUSE_OUTPUT_MEMORY,
                               prefix=prefix)  # (B, Hq, C, D)
            return out.transpose(1, 2), None
        if backend == "varlen" and plan.segments is None and prefix_supported() and (
                window is None or window >= plan.group_size):
            out = s2_varlen(query, key, value, plan.chunk_layout, plan.group_size, n_plain, scaling, window,
                            prefix=prefix)  # (B, Hq, C, D)
            return out.transpose(1, 2), None
    windows = _HaloExchange.apply(key, value, plan, halves)  # per half: (B, kv, halo+C, D) keys, values
    pieces = []
    for i, (q0, q1, kv0, kv1, h) in enumerate(halves):
        pieces.append(_chunk_attention(query[:, q0:q1], windows[2 * i], windows[2 * i + 1], plan.layouts[h],
                                       plan.group_size, scaling, dropout, window))
    # heads-last, as transformers expects: one copy, and the caller's reshape is then a view
    out = torch.cat([p.transpose(1, 2) for p in pieces], dim=2)  # (B, C, Hq, D)
    return out, None


# True while a model runs a sharded forward (a ChunkPlan among its kwargs; set by a forward pre-hook)
SP_FORWARD = contextvars.ContextVar("longlora_sp_forward", default=False)


def _sp_mask(*args, **kwargs):
    """AttentionMaskInterface entry "s2_sp": no mask in a sharded forward (the layout travels in the ChunkPlan;
    a (C, C) mask would cost C^2 bytes), else "s2_sdpa"'s mask (eval, generation, unsharded training)."""
    return None if SP_FORWARD.get() else s2_mask(*args, **kwargs)


def register() -> None:
    AttentionInterface.register(SP_ATTENTION, sequence_parallel_attention_forward)
    AttentionMaskInterface.register(SP_ATTENTION, _sp_mask)
