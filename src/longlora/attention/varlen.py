"""S2-Attn on CUDA through torch's own variable-length flash kernels (`torch.nn.attention.varlen`, no extra package).

Every S2 group is a causal segment, so each head half is one varlen call over the whole batch: plain heads with
cu_seqlens 0, G, 2G, ..., shifted heads with 0, G/2, 3G/2, ..., L (per row, rows after one another). In the regular
layout (no padding, no packing) q/k/v are the model's tensors seen token-first, (B*L, H, D) views sliced by head (no
roll, no cat), and grouped-query attention stays unrepeated: through `enable_gqa` where torch has it (2.12+), as they
are where its varlen_attn takes fewer K/V heads without the keyword (2.10-2.11's flash kernels do; probed once on
meta tensors), repeated only where neither holds. Each call writes into its head slice of one preallocated output
where torch has `varlen_attn_out`; without it (2.11) each half's output is copied into its slice, which nothing
avoids there. cu_seqlens of the regular layout are built from Python integers once per (batch, length, group, shift,
device) and cached, so a call reads no tensor on the host (no host-device synchronisation). With padding or packed
documents, cu_seqlens come from the token layout's segments (cut once per layout and cached on it); the real tokens
are gathered first.

The backward runs torch's varlen backward op per head half into one dq/dk/dv. "No copies" holds for the forward
only: the flash backward makes grad_out and out contiguous and allocates its own dq/dk/dv on every call, which are
then copied (dk/dv summed) into place. Where this torch lacks what the fast path needs (the logsumexp, the backward
op with the expected schema) it degrades: the backward recomputes the half through torch's differentiable
`varlen_attn`. The kernels are FlashAttention-2's (torch's varlen leaves cuDNN off; FlashAttention-3 needs a package).

The kernel is one object, `KERNEL` (forward and backward per head half). Tests on CPU, where torch's flash kernels do
not run, set it to a per-segment reference (tests/test_attention_varlen.py); everything around the kernel
(cu_seqlens, head halves, output slices, GQA, padding, packing, gradients) is then checked against a dense reference.
"""

from __future__ import annotations

import functools
import inspect

import torch

from .layout import TokenLayout, head_blocks, merge_attention, regular_cu_seqlens, segment_cu_seqlens

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _varlen_module():
    try:
        from torch.nn.attention import varlen
    except ImportError:
        return None
    return varlen if hasattr(varlen, "varlen_attn") else None


class TorchVarlenKernel:
    """torch's flash varlen kernels, called the way this torch's signature allows (read once with inspect)."""

    def __init__(self):
        self._features = None

    @property
    def features(self) -> dict:
        if self._features is None:
            varlen = _varlen_module()
            params = set(inspect.signature(varlen.varlen_attn).parameters) if varlen else set()
            self._features = dict(
                available=varlen is not None,
                window="window_size" in params,  # torch >= 2.11; 2.10 had is_causal only
                gqa="enable_gqa" in params,
                # no enable_gqa keyword (torch 2.10-2.11): whether varlen_attn takes fewer K/V heads as they are
                # (flash's varlen kernels need only Hq % Hkv == 0, its backward sums dk/dv per K/V head)
                gqa_native="enable_gqa" not in params and varlen is not None and _takes_fewer_kv_heads(varlen),
                scale="scale" in params,
                aux="return_aux" in params,
                out=varlen is not None and hasattr(varlen, "varlen_attn_out"),
                backward=_backward_op_matches(),
            )
        return self._features

    def supports(self, sliding_window: int | None, group_size: int) -> bool:
        f = self.features
        return f["available"] and (f["window"] or sliding_window is None or sliding_window >= group_size)

    def applies(self, query: torch.Tensor, sliding_window: int | None, group_size: int,
                scale: float | None = None, value_dim: int | None = None) -> bool:
        """CUDA fp16/bf16 on an Ampere or newer GPU, a head dimension flash takes, and what this torch's signature
        can express."""
        default_scale = scale is None or abs(scale - query.shape[-1] ** -0.5) < 1e-12
        return (query.is_cuda and query.dtype in HALF_DTYPES and head_dim_supported(query.shape[-1], value_dim)
                and self.supports(sliding_window, group_size) and (self.features["scale"] or default_scale)
                and _capability(query.device.index or 0) >= (8, 0))

    def _kwargs(self, scale, window):
        f = self.features
        kw = {"scale": scale} if f["scale"] else {}  # without the argument: the default 1/sqrt(D) (see applies)
        if f["window"]:
            kw["window_size"] = window
        else:  # (-1, 0): causal; (-1, -1): no mask (a row's prefix); other windows need window_size (see supports)
            kw["is_causal"] = window[1] == 0
        return kw

    def _kv(self, q, k, v):
        """K/V as the kernel takes them: unrepeated with enable_gqa, or as they are where varlen_attn takes fewer K/V
        heads without the keyword; else repeated to the query heads (4 copies + 4 sums per layer)."""
        rep = q.shape[1] // k.shape[1]
        if rep == 1:
            return k, v, {}
        if self.features["gqa"]:
            return k, v, {"enable_gqa": True}
        if self.features["gqa_native"]:
            return k, v, {}
        return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), {}  # (N, Hq, D)

    def forward(self, out, q, k, v, cu, max_len, scale, window, cu_k=None, max_k=None):
        """Attention per segment of q (N, h, D) over k/v (Nk, hk, D), written into out (N, h, D); returns the
        logsumexp (h, N) float32, or None where this torch does not return it. Segments: cu (and cu_k for the keys
        when they differ from the queries'); window (-1, 0) causal, (w - 1, 0) sliding, (-1, -1) no mask."""
        cu_k, max_k = (cu, max_len) if cu_k is None else (cu_k, max_k)
        varlen = _varlen_module()
        kw = self._kwargs(scale, window)
        k, v, gqa = self._kv(q, k, v)
        kw.update(gqa)
        aux = {"return_aux": varlen.AuxRequest(lse=True)} if self.features["aux"] else {}
        if self.features["out"] and self.features["window"]:
            try:
                result = varlen.varlen_attn_out(out, q, k, v, cu, cu_k, max_len, max_k, **aux, **kw)
                return result[1] if aux else None
            except RuntimeError:  # e.g. a cuDNN build without the out variant: allocate and copy from now on
                self._features["out"] = False
        try:
            result = varlen.varlen_attn(q, k, v, cu, cu_k, max_len, max_k, **aux, **kw)
        except RuntimeError:
            if k.shape[1] == q.shape[1]:
                raise
            # a kernel without GQA (torch's cuDNN varlen path): repeat K/V from now on, forward and backward alike
            self._features["gqa"] = self._features["gqa_native"] = False
            k, v, _ = self._kv(q, k, v)
            kw.pop("enable_gqa", None)
            result = varlen.varlen_attn(q, k, v, cu, cu_k, max_len, max_k, **aux, **kw)
        piece, lse = result if aux else (result, None)
        out.copy_(piece)
        return lse

    def backward(self, grad_out, q, k, v, out, lse, cu, max_len, scale, window, cu_k=None, max_k=None):
        """(dq, dk, dv) of one forward call; dk/dv have k/v's (unrepeated) heads."""
        cu_k, max_k = (cu, max_len) if cu_k is None else (cu_k, max_k)
        rep = q.shape[1] // k.shape[1]
        if lse is not None and self.features["backward"] and self.features["window"]:
            kk, vv, _ = self._kv(q, k, v)
            rng = _unused_rng_state(q.device)  # no dropout: the state is read by no one
            dq, dk, dv = torch.ops.torch_attn._varlen_attn_backward(
                grad_out, q, kk, vv, out, lse, cu, cu_k, max_len, max_k, window == (-1, 0), rng, scale, list(window))
        else:  # recompute this half through the differentiable public function
            varlen = _varlen_module()
            kw = self._kwargs(scale, window)
            with torch.enable_grad():
                qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
                k2, v2, gqa = self._kv(qq, kk, vv)
                res = varlen.varlen_attn(qq, k2, v2, cu, cu_k, max_len, max_k, **kw, **gqa)
                dq, dk, dv = torch.autograd.grad(res, (qq, kk, vv), grad_out)
            return dq, dk, dv
        if dk.shape[1] != k.shape[1]:  # K/V were repeated for the kernel: sum each key/value head's copies
            dk, dv = (x.unflatten(1, (k.shape[1], rep)).sum(2) for x in (dk, dv))
        return dq, dk, dv


def _takes_fewer_kv_heads(varlen) -> bool:
    """Whether varlen_attn, called without enable_gqa, accepts K/V with fewer heads than Q (probed on meta tensors:
    its checks and its fake kernel run, no device does)."""
    q = torch.empty(8, 4, 64, dtype=torch.bfloat16, device="meta")  # (N, Hq, D)
    kv = torch.empty(8, 2, 64, dtype=torch.bfloat16, device="meta")  # (N, Hkv, D)
    cu = torch.empty(2, dtype=torch.int32, device="meta")
    try:
        out = varlen.varlen_attn(q, kv, kv, cu, cu, 8, 8)
    except Exception:  # noqa: BLE001 - a check that refuses the head counts (or anything else): repeat K/V
        return False
    out = out[0] if isinstance(out, tuple) else out
    return tuple(out.shape) == tuple(q.shape)


def head_dim_supported(head_dim: int, value_dim: int | None = None) -> bool:
    """Flash's varlen kernels take head dimensions that are multiples of 8 up to 256, the same for values."""
    return head_dim % 8 == 0 and head_dim <= 256 and (value_dim is None or value_dim == head_dim)


@functools.lru_cache(maxsize=16)
def _unused_rng_state(device: torch.device) -> torch.Tensor:
    """The (2,) uint64 RNG state the backward op takes, one per device: without dropout it is never read, and a
    new one per call would be one more allocation and fill per head block and layer."""
    return torch.zeros(2, dtype=torch.uint64, device=device)


def _backward_op_matches() -> bool:
    """Whether torch's private varlen backward op exists with the argument list this module passes."""
    try:
        schema = torch.ops.torch_attn._varlen_attn_backward.default._schema
    except (AttributeError, RuntimeError):
        return False
    names = [a.name for a in schema.arguments]
    return names[:14] == ["grad_out", "query", "key", "value", "out", "lse", "cu_seq_q", "cu_seq_k", "max_q",
                          "max_k", "is_causal", "rng_state", "scale", "window_size"]


KERNEL = TorchVarlenKernel()
"""The kernel every varlen call uses: an object with forward(out, q, k, v, cu, max_len, scale, window, cu_k=None,
max_k=None) -> lse and backward(grad_out, q, k, v, out, lse, cu, max_len, scale, window, cu_k=None, max_k=None) ->
(dq, dk, dv). Replace it to test on CPU."""


def prefix_supported() -> bool:
    """Whether KERNEL can run a row prefix (`s2_varlen(prefix=...)`): it must return the logsumexp and take its
    backward from the given (merged) output and logsumexp, as torch's private backward op does; a backward that
    recomputes would see only its own part of each row. An injected kernel is taken at its word."""
    f = getattr(KERNEL, "features", None)
    return f is None or bool(f["aux"] and f["backward"] and f["window"])


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def varlen_applies(query: torch.Tensor, dropout: float, sliding_window: int | None, group_size: int,
                   scale: float | None = None, value_dim: int | None = None) -> bool:
    """Whether backend "auto" may take this path: CUDA fp16/bf16 on an Ampere or newer GPU, no dropout, a head
    dimension flash takes (a multiple of 8, at most 256, values as wide as queries), torch with varlen (and its
    window argument where a sliding window bites). Where it does not, "auto" falls back (flash-attn or sdpa)."""
    if dropout != 0.0:
        return False
    if not hasattr(KERNEL, "applies"):  # an injected kernel runs wherever it was written for
        return True
    return KERNEL.applies(query, sliding_window, group_size, scale, value_dim)


def check_varlen(query: torch.Tensor, dropout: float, sliding_window: int | None, group_size: int,
                 scale: float | None = None, value_dim: int | None = None) -> None:
    """Raise a clear ValueError when backend="varlen" was asked for where it cannot run."""
    if varlen_applies(query, dropout, sliding_window, group_size, scale, value_dim):
        return
    if dropout:
        raise ValueError("backend='varlen' has no attention dropout; use backend='sdpa' (or 'auto') with dropout.")
    if isinstance(KERNEL, TorchVarlenKernel) and not KERNEL.features["available"]:
        raise ValueError(f"backend='varlen' needs torch.nn.attention.varlen (torch >= 2.10; this is "
                         f"{torch.__version__}); use backend='auto'.")
    if isinstance(KERNEL, TorchVarlenKernel) and not (query.is_cuda and query.dtype in HALF_DTYPES):
        raise ValueError(f"backend='varlen' runs torch's flash kernels: CUDA tensors in fp16/bf16 (got {query.dtype} "
                         f"on {query.device}); use backend='auto'.")
    if isinstance(KERNEL, TorchVarlenKernel) and not head_dim_supported(query.shape[-1], value_dim):
        raise ValueError(f"backend='varlen' runs torch's flash kernels, which take head dimensions that are multiples "
                         f"of 8 up to 256, the same for values (got {query.shape[-1]} and {value_dim}); use "
                         "backend='auto'.")
    raise ValueError("backend='varlen' cannot run here (a GPU older than Ampere, or a sliding window or scale this "
                     "torch's varlen_attn cannot take); use backend='auto'.")


class _S2Varlen(torch.autograd.Function):
    """One kernel call per head block into one output; the backward writes one dq and accumulates dk/dv.

    With a `RowPrefix` (longlora.attention.cpu; regular layouts, rows of C tokens): each block's first segment of
    every row also attends to the prefix keys: a second, unmasked call whose output and logsumexp are merged into
    those rows, and one more backward call. The prefix is fetched in the forward and its gradients given back in the
    backward (sequence parallelism: the halo, exchanged inside the Function).
    """

    @staticmethod
    def forward(ctx, q, k, v, blocks, scale, window, kernel, prefix=None, rows=None, n_plain=None):
        # q (N, Hq, D), k/v (N, Hkv, D); blocks: (h0, h1, kv0, kv1, cu_seqlens, max_len); with a prefix: rows (B, C)
        # and the number of plain heads
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])  # (N, Hq, D)
        before = [] if prefix is None else prefix.fetch(*(x.view(*rows, *x.shape[1:]).transpose(1, 2) for x in (k, v)))
        lses, pre = [], []
        for h0, h1, kv0, kv1, cu, max_len in blocks:
            lse = kernel.forward(out[:, h0:h1], q[:, h0:h1], k[:, kv0:kv1], v[:, kv0:kv1], cu, max_len, scale, window)
            pre.append(None if prefix is None else _prefix_call(before, prefix, n_plain, h0, kv0, kv1))
            if pre[-1] is not None:
                if lse is None:
                    raise RuntimeError("a row prefix needs the kernel's logsumexp (torch >= 2.11 varlen)")
                (half, first, n, a, z), (kp, vp, cu_q, cu_k) = pre[-1], _prefix_tensors(before, pre[-1], rows)
                b = rows[0]
                o_first = q.new_empty(b * first, h1 - h0, v.shape[-1])  # (B*F, h, D)
                q_first = q.view(*rows, *q.shape[1:])[:, :first, h0:h1].reshape(b * first, h1 - h0, -1)
                lse2 = kernel.forward(o_first, q_first, kp, vp, cu_q, first, scale, (-1, -1), cu_k=cu_k, max_k=n)
                # the first segments' rows of this block: out (B, F, h, D), lse (h, B, F) seen as (B, F, h)
                o_rows = out.view(*rows, *out.shape[1:])[:, :first, h0:h1]
                lse_rows = lse.view(-1, *rows)[:, :, :first].permute(1, 2, 0)
                merged, merged_lse = merge_attention(o_rows, lse_rows, o_first.view(b, first, h1 - h0, -1),
                                                     lse2.view(-1, b, first).permute(1, 2, 0))
                o_rows.copy_(merged)
                lse_rows.copy_(merged_lse)
            lses.append(lse)
        ctx.blocks, ctx.scale, ctx.window, ctx.kernel = blocks, scale, window, kernel
        ctx.prefix, ctx.rows, ctx.pre = prefix, rows, pre
        ctx.has_lse = [x is not None for x in lses]
        ctx.save_for_backward(q, k, v, out, *(x for x in lses if x is not None),
                              *(t for pair in before for t in pair))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, *saved = ctx.saved_tensors
        n_lse = sum(ctx.has_lse)
        lses, flat = iter(saved[:n_lse]), saved[n_lse:]
        before = list(zip(flat[::2], flat[1::2]))  # per half (k, v) of the prefix, (B, heads, n, D)
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        dq = torch.empty_like(q)
        kv_ranges = [(b[2], b[3]) for b in ctx.blocks]
        disjoint = len(set(kv_ranges)) == len(kv_ranges) and all(
            a1 <= b0 or b1 <= a0 for i, (a0, a1) in enumerate(kv_ranges) for (b0, b1) in kv_ranges[i + 1:])
        dk, dv = (torch.empty_like(x) if disjoint else torch.zeros_like(x) for x in (k, v))
        d_before = [(torch.zeros_like(a), torch.zeros_like(b)) for a, b in before]
        for (h0, h1, kv0, kv1, cu, max_len), has_lse, pre in zip(ctx.blocks, ctx.has_lse, ctx.pre):
            lse = next(lses) if has_lse else None
            gq, gk, gv = ctx.kernel.backward(grad_out[:, h0:h1], q[:, h0:h1], k[:, kv0:kv1], v[:, kv0:kv1],
                                             out[:, h0:h1], lse, cu, max_len, ctx.scale, ctx.window)
            dq[:, h0:h1].copy_(gq)
            if disjoint:
                dk[:, kv0:kv1].copy_(gk)
                dv[:, kv0:kv1].copy_(gv)
            else:  # a key/value head serves a plain and a shifted block
                dk[:, kv0:kv1] += gk
                dv[:, kv0:kv1] += gv
            if pre is not None:  # the first segments' rows over the prefix keys (unmasked)
                (half, first, n, a, z), (kp, vp, cu_q, cu_k) = pre, _prefix_tensors(before, pre, ctx.rows)
                b = ctx.rows[0]

                def first_rows(x, h0=h0, h1=h1, first=first):  # (N, Hq, D) -> (B*F, h, D)
                    return x.view(*ctx.rows, *x.shape[1:])[:, :first, h0:h1].reshape(b * first, h1 - h0, -1)

                lse_first = lse.view(-1, *ctx.rows)[:, :, :first].reshape(-1, b * first)  # (h, B*F)
                gq, gk, gv = ctx.kernel.backward(first_rows(grad_out), first_rows(q), kp, vp, first_rows(out),
                                                 lse_first, cu_q, first, ctx.scale, (-1, -1), cu_k=cu_k, max_k=n)
                dq.view(*ctx.rows, *dq.shape[1:])[:, :first, h0:h1] += gq.view(b, first, h1 - h0, -1)
                for dst, g in zip(d_before[half], (gk, gv)):  # (B*n, hk, D) -> (B, hk, n, D)
                    dst[:, a:z] += g.view(b, n, z - a, -1).transpose(1, 2)
        if ctx.prefix is not None:
            ctx.prefix.give_back(d_before, *(x.view(*ctx.rows, *x.shape[1:]).transpose(1, 2) for x in (dk, dv)))
        return dq, dk, dv, None, None, None, None, None, None, None


def _prefix_call(before, prefix, n_plain, h0, kv0, kv1):
    """(half, first segment length, prefix tokens, the block's key/value heads inside the half's prefix), or None
    when the block's half has no prefix."""
    half = int(h0 >= n_plain)
    n = before[half][0].shape[2]
    if n == 0:
        return None
    return half, prefix.first_lengths[half], n, kv0 - prefix.kv_start[half], kv1 - prefix.kv_start[half]


def _prefix_tensors(before, pre, rows):
    """The block's prefix keys/values token-first, (B*n, hk, D) each, and the cu_seqlens of the first segments'
    queries (F per row) and of the prefix keys (n per row)."""
    half, first, n, a, z = pre
    b = rows[0]
    kp, vp = (x[:, a:z].transpose(1, 2).reshape(b * n, z - a, -1) for x in before[half])
    device = kp.device
    return kp, vp, regular_cu_seqlens(b, first, first, 0, device)[0], regular_cu_seqlens(b, n, n, 0, device)[0]


def s2_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: TokenLayout, group_size: int,
              n_plain: int, scale: float | None, sliding_window: int | None, prefix=None) -> torch.Tensor:
    """S2-Attn through KERNEL. query (B, Hq, L, D), key/value (B, Hkv, L, D) -> (B, Hq, L, D); padded rows give 0.

    prefix: a `RowPrefix` (regular layouts only): its first_lengths set each half's first segment, which also sees
    the prefix keys (needs the kernel's logsumexp, and a sliding window of at least G if any).
    """
    b, hq, length, _ = query.shape
    hk = key.shape[1]
    # tokens-first views: the model's q/k/v are transposes of (B, L, H, D), so this costs no copy
    q_tok = query.transpose(1, 2).reshape(b * length, hq, -1)  # (B*L, Hq, D)
    k_tok = key.transpose(1, 2).reshape(b * length, hk, -1)  # (B*L, Hkv, D)
    v_tok = value.transpose(1, 2).reshape(b * length, hk, -1)
    regular = layout.regular
    if prefix is not None and not regular:
        raise ValueError("a row prefix needs the regular layout (no padding, no packing)")
    if not regular:
        q_tok, k_tok, v_tok = q_tok[layout.index], k_tok[layout.index], v_tok[layout.index]  # (N, H, D)
    # a window at least as long as a group never bites inside one
    window = (sliding_window - 1, 0) if sliding_window is not None and sliding_window < group_size else (-1, 0)
    if prefix is not None and window != (-1, 0):
        raise ValueError("a row prefix needs no sliding window shorter than the group size")
    if prefix is not None and not prefix_supported():
        raise ValueError("a row prefix needs torch's varlen logsumexp and backward op (torch >= 2.11)")
    blocks = []
    for h0, h1, kv0, kv1, shift in head_blocks(hq, hk, n_plain, group_size):
        if prefix is not None:
            shift = prefix.first_lengths[int(h0 >= n_plain)] % group_size
        if regular:
            cu, max_len = regular_cu_seqlens(b, length, group_size, shift, query.device)
        else:
            cu, max_len = segment_cu_seqlens(layout, group_size, shift)
        blocks.append((h0, h1, kv0, kv1, cu, max_len))
    out = _S2Varlen.apply(q_tok, k_tok, v_tok, blocks, scale, window, KERNEL, prefix, (b, length),
                          n_plain)  # (N, Hq, D)
    if not regular:  # padded positions give 0
        out = out.new_zeros(b * length, hq, out.shape[-1]).index_put((layout.index,), out)
    return out.view(b, length, hq, -1).transpose(1, 2)  # (B, Hq, L, D)
