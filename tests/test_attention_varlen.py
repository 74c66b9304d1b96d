"""The CUDA varlen path of S2-Attn, its logic checked on CPU.

torch's flash varlen kernels do not run on CPU, so these tests swap `attention_varlen.KERNEL` for a per-segment
reference written here (plain softmax per cu_seqlens segment) and check what the path does around the kernel: the
cu_seqlens of each head half, one output buffer written slice by slice, views instead of copies in the regular layout,
GQA, padding (left/right), packed documents, values and gradients against the independent dense reference
(tests/s2_reference.py). A second part runs `TorchVarlenKernel`'s signature adaptation (old/new torch signatures,
no out variant, no GQA flag) over a fake `varlen` module built on the same reference. GPU-marked tests run the real
kernels against the dense reference.
"""

import types

import pytest
import torch

from longlora.attention import varlen as attention_varlen
from longlora.attention import s2_attention, token_layout, use_backend
from s2_reference import (ROW_PREFIX_CASES, ReferenceKernel, SlicePrefix, check_row_prefix, reference_attention,
                          reference_mask, segment_attention)


@pytest.fixture
def kernel(monkeypatch):
    ref = ReferenceKernel()
    monkeypatch.setattr(attention_varlen, "KERNEL", ref)
    return ref


def rand_qkv(b, hq, hk, length, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # (B, L, H, D) transposed, as a model produces them
    return tuple(torch.randn(b, length, h, d, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()
                 for h in (hq, hk, hk))


def check_against_reference(q, k, v, group_size, *, atol=1e-10, real=None, **kw):
    b, hq, length, _ = q.shape
    mask = reference_mask(length, hq, group_size, real=real, batch=b, shift=kw.get("shift", True),
                          position_ids=kw.get("position_ids"), sliding_window=kw.get("sliding_window"))
    out = s2_attention(q, k, v, group_size, attention_mask=real, backend="varlen", **kw)
    ref = reference_attention(q, k, v, mask)
    keep = (torch.ones(b, length, dtype=torch.bool) if real is None else real.bool())[:, None, :, None]
    torch.testing.assert_close(out * keep, ref * keep, atol=atol, rtol=0)
    if real is not None:
        assert out[~keep.expand_as(out)].abs().max() == 0  # padded positions give 0
    grad_out = torch.randn_like(out) * keep
    for g, r in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(ref, (q, k, v), grad_out)):
        torch.testing.assert_close(g, r, atol=atol * 10, rtol=0)
    return out


SHAPES = [
    # b, hq, hk, length, group
    (2, 8, 2, 64, 16),  # GQA, L a multiple of G
    (1, 9, 3, 50, 16),  # odd heads: a key/value head shared by a plain and a shifted query head; ragged L
    (2, 4, 4, 37, 8),  # MHA, ragged tail
    (1, 1, 1, 20, 4),  # a single (shifted) head
    (2, 4, 2, 10, 64),  # G >= L
]


@pytest.mark.parametrize("b,hq,hk,length,group", SHAPES)
def test_values_and_gradients_match_dense_reference(kernel, b, hq, hk, length, group):
    q, k, v = rand_qkv(b, hq, hk, length)
    check_against_reference(q, k, v, group)
    check_against_reference(q, k, v, group, shift=False)
    check_against_reference(q, k, v, group, sliding_window=5)


def test_regular_layout_cu_seqlens_head_halves_and_one_output_without_copies(kernel):
    q, k, v = rand_qkv(2, 8, 2, 64)
    out = s2_attention(q, k, v, 16, backend="varlen")
    plain, shifted = kernel.forward_calls
    # plain groups 0, G, 2G, ... per row, rows after one another; shifted groups 0, G/2, 3G/2, ..., L
    assert plain["cu"] == [0, 16, 32, 48, 64, 80, 96, 112, 128]
    assert shifted["cu"] == [0, 8, 24, 40, 56, 64, 72, 88, 104, 120, 128]
    # heads 0-3 plain over key/value head 0, heads 4-7 shifted over key/value head 1: GQA unrepeated
    assert [c["q"].shape[1] for c in (plain, shifted)] == [4, 4]
    assert [c["k"].shape[1] for c in (plain, shifted)] == [1, 1]
    for call in (plain, shifted):  # views of the caller's tensors: no roll, no cat, no K/V copy
        for name, src in (("q", q), ("k", k), ("v", v)):
            assert call[name].untyped_storage().data_ptr() == src.untyped_storage().data_ptr()
    # both halves wrote into slices of one buffer, which is the returned output
    buffers = {c["out"].untyped_storage().data_ptr() for c in (plain, shifted)}
    assert buffers == {out.untyped_storage().data_ptr()}
    assert [c["out"].storage_offset() for c in (plain, shifted)] == [0, 4 * 8]
    out.sum().backward()
    assert [(c["q_heads"], c["kv_heads"]) for c in kernel.backward_calls] == [(4, 1), (4, 1)]


def test_regular_cu_seqlens_are_cached(kernel):
    q, k, v = rand_qkv(1, 4, 2, 48)
    s2_attention(q, k, v, 16, backend="varlen")
    first = [c["cu"] for c in kernel.forward_calls]
    cached = attention_varlen.regular_cu_seqlens(1, 48, 16, 8, q.device)
    assert attention_varlen.regular_cu_seqlens(1, 48, 16, 8, q.device)[0] is cached[0]
    assert first[1] == cached[0].tolist() == [0, 8, 24, 40, 48] and cached[1] == 16


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_segments_of_real_tokens_only(kernel, side):
    q, k, v = rand_qkv(2, 4, 2, 40)
    real = torch.ones(2, 40, dtype=torch.bool)
    if side == "left":
        real[0, :11] = False
    else:
        real[0, 29:] = False
    check_against_reference(q, k, v, 8, real=real)
    plain = kernel.forward_calls[0]["cu"]
    assert plain[-1] == int(real.sum()) == 69  # only real tokens reach the kernel
    # row 0's 29 real tokens: groups counted from its first real token (8, 8, 8, 5), then row 1's 40 tokens
    assert plain[:6] == [0, 8, 16, 24, 29, 37]


def test_packed_documents_restart_groups(kernel):
    lengths = [13, 29, 6]
    q, k, v = rand_qkv(1, 4, 2, sum(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    check_against_reference(q, k, v, 8, position_ids=pos)
    plain, shifted = (c["cu"] for c in kernel.forward_calls[:2])
    assert plain == [0, 8, 13, 21, 29, 37, 42, 48]
    assert shifted == [0, 4, 12, 13, 17, 25, 33, 41, 42, 46, 48]


def test_layout_segments_are_cut_once_per_layout(kernel, monkeypatch):
    from longlora import attention

    cuts = []
    cut = attention.layout._cut_segments
    monkeypatch.setattr(attention.layout, "_cut_segments", lambda *a: cuts.append(a[1:]) or cut(*a))
    q, k, v = rand_qkv(1, 4, 2, 40)
    real = (torch.arange(40) >= 5)[None]
    layout = token_layout(1, 40, q.device, attention_mask=real)
    for _ in range(3):  # three layers of one forward
        s2_attention(q, k, v, 8, backend="varlen", layout=layout)
    assert sorted(cuts) == [(8, 0), (8, 4)]


def test_auto_selection_and_clear_errors():
    q, k, v = rand_qkv(1, 4, 2, 32, dtype=torch.float32)
    layout = token_layout(1, 32, q.device)
    from longlora.attention import resolve_backend

    assert resolve_backend(q, k, v, layout, 8) == "cpu"  # the real kernel never runs on CPU: auto does not pick it
    with pytest.raises(ValueError, match="CUDA tensors in fp16/bf16"):
        s2_attention(q, k, v, 8, backend="varlen")
    with pytest.raises(ValueError, match="no attention dropout"):
        s2_attention(q, k, v, 8, backend="varlen", dropout=0.1)
    with use_backend("varlen"), pytest.raises(ValueError, match="fp16/bf16"):
        s2_attention(q, k, v, 8)


# --- TorchVarlenKernel's adaptation to torch's signatures, over a fake varlen module --------------------------


def fake_varlen(new_signature: bool, cudnn_like: bool = False):
    """A stand-in for torch.nn.attention.varlen: 2.13-like (window_size, enable_gqa, return_aux, varlen_attn_out)
    or 2.10-like (is_causal only, no GQA, no logsumexp, no out variant); cudnn_like: the new signature, but the
    out variant and GQA raise at run time (torch's cuDNN varlen path). Records the K/V head counts it sees."""
    seen = []

    def run(q, k, v, cu, window):
        assert q.shape[1] == k.shape[1] or new_signature, "K/V must be repeated where enable_gqa is missing"
        seen.append(k.shape[1])
        return segment_attention(q, k, v, cu, None, window)

    if new_signature:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False):
            assert window_size[1] == 0
            if cudnn_like and enable_gqa:
                raise RuntimeError("GQA is not supported with the cuDNN backend.")
            out, lse = run(query, key, value, cu_seq_q, window_size)
            return (out, lse) if return_aux is not None else out

        def varlen_attn_out(out, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                            window_size=(-1, -1), enable_gqa=False):
            if cudnn_like:
                raise RuntimeError("cuDNN backend does not support out variant.")
            res, lse = run(query, key, value, cu_seq_q, window_size)
            out.copy_(res)
            return (out, lse) if return_aux is not None else out

        module = types.SimpleNamespace(varlen_attn=varlen_attn, varlen_attn_out=varlen_attn_out,
                                       AuxRequest=lambda lse: types.SimpleNamespace(lse=lse))
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, is_causal=False):
            assert is_causal
            return run(query, key, value, cu_seq_q, (-1, 0))[0]

        module = types.SimpleNamespace(varlen_attn=varlen_attn)
    return module, seen


@pytest.mark.parametrize("new_signature,cudnn_like", [(True, False), (False, False), (True, True)])
def test_torch_kernel_adapts_to_the_installed_signature(monkeypatch, new_signature, cudnn_like):
    module, seen = fake_varlen(new_signature, cudnn_like)
    monkeypatch.setattr(attention_varlen, "_varlen_module", lambda: module)

    class OnCPU(attention_varlen.TorchVarlenKernel):
        def applies(self, query, sliding_window, group_size, scale=None, value_dim=None):  # runs anywhere
            return self.supports(sliding_window, group_size)

    torch_kernel = OnCPU()
    assert torch_kernel.features["window"] == torch_kernel.features["gqa"] == new_signature
    torch_kernel._features["backward"] = False  # torch's private backward op needs CUDA: recompute instead
    monkeypatch.setattr(attention_varlen, "KERNEL", torch_kernel)
    q, k, v = rand_qkv(2, 8, 2, 48)
    check_against_reference(q, k, v, 16)
    # unrepeated K/V with enable_gqa, repeated without (or once the kernel refused GQA)
    assert set(seen) == ({1} if new_signature and not cudnn_like else {4})
    if cudnn_like:  # learnt once: no more out-variant or GQA attempts
        assert not torch_kernel.features["out"] and not torch_kernel.features["gqa"]
    if new_signature:
        check_against_reference(q, k, v, 16, sliding_window=5)
    else:  # a window shorter than G needs window_size: this torch's varlen cannot take it
        assert not torch_kernel.supports(5, 16) and torch_kernel.supports(None, 16)


def test_torch_2_11_signature_takes_kv_unrepeated(monkeypatch):
    """torch 2.11's varlen_attn has window_size, scale and return_aux but no enable_gqa keyword, and its flash kernel
    takes fewer K/V heads as they are: the kernel finds that out on meta tensors and passes K/V unrepeated (no 4
    copies + 4 sums per layer), output copied into place (2.11 has no varlen_attn_out)."""
    seen = []

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
        if query.is_meta:  # the probe: shapes only, like torch's fake kernel
            return torch.empty_like(query)
        assert query.shape[1] % key.shape[1] == 0
        seen.append(key.shape[1])
        rep = query.shape[1] // key.shape[1]
        key, value = (x.repeat_interleave(rep, dim=1) for x in (key, value))  # what the kernel does inside
        out, lse = segment_attention(query, key, value, cu_seq_q, None, window_size)
        return (out, lse) if return_aux is not None else out

    module = types.SimpleNamespace(varlen_attn=varlen_attn, AuxRequest=lambda lse: types.SimpleNamespace(lse=lse))
    monkeypatch.setattr(attention_varlen, "_varlen_module", lambda: module)

    class OnCPU(attention_varlen.TorchVarlenKernel):
        def applies(self, query, sliding_window, group_size, scale=None, value_dim=None):
            return self.supports(sliding_window, group_size)

    kernel = OnCPU()
    assert not kernel.features["gqa"] and kernel.features["gqa_native"] and not kernel.features["out"]
    kernel._features["backward"] = False  # torch's private backward op needs CUDA: recompute instead
    monkeypatch.setattr(attention_varlen, "KERNEL", kernel)
    q, k, v = rand_qkv(2, 8, 2, 48)
    check_against_reference(q, k, v, 16)
    assert set(seen) == {1}  # each head block's one key/value head, never repeated to its 4 query heads


def test_head_dims_flash_cannot_take_fall_back_from_varlen():
    from longlora.attention.varlen import head_dim_supported

    assert head_dim_supported(64) and head_dim_supported(256, 256) and head_dim_supported(8)
    assert not head_dim_supported(60) and not head_dim_supported(264) and not head_dim_supported(64, 128)
    kernel = attention_varlen.TorchVarlenKernel()
    q = torch.empty(1, 4, 16, 60, dtype=torch.bfloat16, device="meta")  # (B, H, L, D): D = 60
    assert not kernel.applies(q, None, 8)  # (and on CPU anyway); "auto" then takes sdpa or flash-attn


@pytest.mark.parametrize("hq,hk", [(8, 2), (9, 3)])
def test_torch_kernel_calls_this_torchs_real_ops_with_matching_arguments(hq, hk):
    """Meta tensors run torch's own varlen ops through their shape functions: the fast path (varlen_attn_out with
    the logsumexp, the private backward op) accepts the arguments this module passes, and gives gradients in the
    inputs' layout. No numbers (meta tensors have none): the values are the GPU tests' job."""
    kernel = attention_varlen.TorchVarlenKernel()
    if not kernel.features["available"]:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    b, length, d = 2, 64, 64
    q, k, v = (torch.empty(b, length, h, d, device="meta", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for h in (hq, hk, hk))
    before = dict(kernel.features)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_varlen, "KERNEL", kernel)
        out = attention_varlen.s2_varlen(q, k, v, token_layout(b, length, q.device), 16, hq // 2, None, None)
        assert out.shape == (b, hq, length, d)
        out.sum().backward()
        assert kernel.features == before  # no fallback was needed: the fast path took every call
        if attention_varlen.prefix_supported():  # a row prefix: unmasked calls with their own key cu_seqlens
            whole = tuple(torch.empty(b, 3 * length, h, d, device="meta", dtype=torch.bfloat16).transpose(1, 2)
                          for h in (hk, hk))
            prefix = SlicePrefix(*whole, 40, length, 16, hq)
            out = attention_varlen.s2_varlen(q, k, v, token_layout(b, length, q.device), 16, hq // 2, None, None,
                                             prefix=prefix)
            out.sum().backward()
            assert kernel.features == before and [g[0].shape[2] for g in prefix.given] == [8, 0]
    for x in (q, k, v):
        assert x.grad.shape == x.shape and x.grad.stride() == x.stride()


# --- the real kernels, on a GPU ------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_case(b, hq, hk, length, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, length, h, 64, generator=g).cuda().to(dtype).transpose(1, 2).requires_grad_()
                 for h in (hq, hk, hk))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kw", [dict(), dict(real="left"), dict(real="right"), dict(packed=True),
                                dict(sliding_window=40)])
@pytest.mark.parametrize("hq,hk,length", [(8, 2, 512), (9, 3, 300)])
def test_real_varlen_kernel_matches_dense_reference(hq, hk, length, kw):
    q, k, v = _cuda_case(2, hq, hk, length, torch.float16)
    args = {}
    real = None
    if kw.get("real"):
        real = torch.ones(2, length, dtype=torch.bool, device="cuda")
        if kw["real"] == "left":
            real[0, :37] = False
        else:
            real[0, length - 37:] = False
        args["attention_mask"] = real
    if kw.get("packed"):
        args["position_ids"] = torch.cat([torch.arange(length // 3), torch.arange(length - length // 3)])[None].cuda()
    if kw.get("sliding_window"):
        args["sliding_window"] = kw["sliding_window"]
    out = s2_attention(q, k, v, 128, backend="varlen", **args)
    q64, k64, v64 = (x.detach().double().cpu().requires_grad_() for x in (q, k, v))
    mask = reference_mask(length, hq, 128, real=None if real is None else real.cpu(), batch=2,
                          position_ids=None if "position_ids" not in args else args["position_ids"].cpu(),
                          sliding_window=args.get("sliding_window"))
    ref = reference_attention(q64, k64, v64, mask)
    keep = (torch.ones(2, length, dtype=torch.bool) if real is None else real.cpu())[:, None, :, None]
    close = lambda a, b: (a - b).abs().max() <= 5e-3 * b.abs().max() + 1e-3  # noqa: E731  (fp16 rounding)
    assert close(out.double().cpu() * keep, ref * keep)
    grad = torch.randn(out.shape, dtype=torch.float64) * keep
    got = torch.autograd.grad(out, (q, k, v), grad.to("cuda", out.dtype))
    want = torch.autograd.grad(ref, (q64, k64, v64), grad)
    for a, b in zip(got, want):
        assert close(a.double().cpu(), b)


@pytest.mark.gpu
@cuda
def test_layer_integration_has_no_host_device_sync_in_the_regular_layout():
    """Every attention layer of a model's S2 forward, and the op's forward + backward, run with sync checks on."""
    import longlora
    from longlora.attention import resolve_backend
    from tiny_models import VOCAB, tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", head_dim=64)).cuda().bfloat16()
    longlora.enable_s2_attention(model, group_size=16)
    model.train()
    ids = torch.randint(3, VOCAB, (2, 128), device="cuda")
    model(ids).logits.float().sum().backward()  # warm-up: cu_seqlens cached, kernels loaded
    modules = longlora.integration.attention_modules(model)
    hooks = [h for m in modules for h in (
        m.register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error")),
        m.register_forward_hook(lambda *_: torch.cuda.set_sync_debug_mode("default"), always_call=True))]
    try:
        model(ids).logits.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        for h in hooks:
            h.remove()

    q, k, v = _cuda_case(2, 8, 2, 256, torch.bfloat16)
    layout = token_layout(2, 256, q.device)
    assert resolve_backend(q, k, v, layout, 64) == "varlen"
    s2_attention(q, k, v, 64, layout=layout).sum().backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s2_attention(q, k, v, 64, layout=layout).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("hq,hk,length,group,start,chunk", ROW_PREFIX_CASES)
def test_row_prefix_equals_the_longer_sequence(kernel, hq, hk, length, group, start, chunk):
    """s2_varlen(prefix=...) (sequence parallelism on CUDA) on a cut of a sequence = S2 over the whole sequence at the
    cut's rows (s2_reference.check_row_prefix); the prefix calls are unmasked, with their own key cu_seqlens."""
    def attend(q, k, v, prefix):
        return attention_varlen.s2_varlen(q, k, v, token_layout(2, chunk, q.device), group, hq // 2, None, None,
                                          prefix=prefix)

    check_row_prefix(attend, *rand_qkv(2, hq, hk, length), group, start, chunk)
    cross = [c for c in kernel.forward_calls if c["window"] == (-1, -1)]
    assert cross and all(c["cu_k"] is not None for c in cross)


@pytest.mark.gpu
@cuda
def test_real_varlen_kernel_row_prefix_matches_dense_reference():
    """The row prefix (sequence parallelism on CUDA) through torch's real varlen kernels: the unmasked call with its
    own key cu_seqlens, the logsumexp merge and the backward from the merged output, against the dense reference."""
    if not attention_varlen.prefix_supported():
        pytest.skip("this torch's varlen has no logsumexp/backward op: sequence parallelism takes the general path")
    hq, hk, length, group, start, chunk = 8, 2, 1024, 256, 384, 512
    q, k, v = _cuda_case(2, hq, hk, length, torch.bfloat16)
    rows = slice(start, start + chunk)
    ql, kl, vl = (x[:, :, rows].detach().clone().requires_grad_() for x in (q, k, v))
    prefix = SlicePrefix(k, v, start, chunk, group, hq)
    out = attention_varlen.s2_varlen(ql, kl, vl, token_layout(2, chunk, ql.device), group, hq // 2, None, None,
                                     prefix=prefix)
    q64, k64, v64 = (x.detach().double().cpu().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q64, k64, v64, reference_mask(length, hq, group, batch=2))[:, :, rows]
    close = lambda a, b: (a - b).abs().max() <= 2e-2 * b.abs().max() + 2e-3  # noqa: E731  (bf16 rounding)
    assert close(out.double().cpu(), ref)
    grad = torch.randn(ref.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, (ql, kl, vl), grad.to("cuda", out.dtype))
    want = torch.autograd.grad(ref, (q64, k64, v64), grad)
    assert close(got[0].double().cpu(), want[0][:, :, rows])
    assert close(got[1].double().cpu() - 1.0, want[1][:, :, rows])  # SlicePrefix.give_back adds +1 / -1
    assert close(got[2].double().cpu() + 1.0, want[2][:, :, rows])
    for (gk, gv), (a, z), s in zip(prefix.given, prefix.kv, prefix.starts):
        assert close(gk.double().cpu(), want[1][:, a:z, s:start]) and close(gv.double().cpu(), want[2][:, a:z, s:start])


@pytest.mark.gpu
@cuda
def test_auto_falls_back_from_varlen_for_a_head_dim_flash_cannot_take():
    """A model with head dimension 60 (not a multiple of 8) runs S2 through another backend instead of erroring."""
    from longlora.attention import resolve_backend

    if not attention_varlen.KERNEL.features["available"]:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    q, k, v = (torch.randn(1, 4, 32, 60, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    layout = token_layout(1, 32, q.device)
    assert resolve_backend(q, k, v, layout, 8) != "varlen"
    out = s2_attention(q, k, v, 8)
    assert out.shape == q.shape and torch.isfinite(out).all()
    with use_backend("varlen"), pytest.raises(ValueError, match="multiples of 8"):
        s2_attention(q, k, v, 8)
