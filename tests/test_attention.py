"""s2_attention against an independent dense-mask reference: values, gradients, causality, padding, packing."""

import pytest
import torch

from longlora.attention import (flash_available, get_backend, resolve_backend, s2_attention, s2_dense_mask,
                                set_backend, token_layout, use_backend)
from s2_reference import ROW_PREFIX_CASES, check_row_prefix, reference_attention, reference_mask


def rand_qkv(b, hq, hk, length, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # (B, L, H, D) transposed, as a model produces them
    q = torch.randn(b, length, hq, d, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, length, hk, d, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(b, length, hk, d, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()
    return q, k, v


def check_against_reference(q, k, v, group_size, *, atol, real=None, **kw):
    b, hq, length, _ = q.shape
    mask = reference_mask(length, hq, group_size, real=real, batch=b, shift=kw.get("shift", True),
                          position_ids=kw.get("position_ids"), sliding_window=kw.get("sliding_window"))
    out = s2_attention(q, k, v, group_size, attention_mask=real, **kw)
    ref = reference_attention(q, k, v, mask)
    keep = torch.ones(b, length, dtype=torch.bool) if real is None else real.bool()
    keep = keep[:, None, :, None]  # padded query rows are unspecified in the reference
    torch.testing.assert_close(out * keep, ref * keep, atol=atol, rtol=0)
    # gradients through both, with the same random upstream gradient on real rows
    grad_out = torch.randn_like(out) * keep
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=atol * 10, rtol=0)
    return out


SHAPES = [
    # b, hq, hk, length, group
    (2, 8, 2, 64, 16),  # GQA, L a multiple of G
    (1, 9, 3, 50, 16),  # odd heads, kv heads split across the plain/shifted halves, L not a multiple of G
    (2, 4, 4, 37, 8),  # MHA, ragged tail
    (1, 1, 1, 20, 4),  # a single (shifted) head
    (2, 4, 2, 10, 64),  # G >= L: plain heads see everything causally, shifted heads split at G/2
    (1, 6, 2, 200, 64),  # several buckets in the shifted half (32-token head group, full groups, tail)
]


@pytest.mark.parametrize("b,hq,hk,length,group", SHAPES)
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_matches_reference(b, hq, hk, length, group, dtype, atol):
    q, k, v = rand_qkv(b, hq, hk, length, dtype=dtype)
    check_against_reference(q, k, v, group, atol=atol)


@pytest.mark.parametrize("b,hq,hk,length,group", SHAPES[:3])
def test_no_shift_and_sliding_window(b, hq, hk, length, group):
    q, k, v = rand_qkv(b, hq, hk, length)
    check_against_reference(q, k, v, group, atol=1e-10, shift=False)
    check_against_reference(q, k, v, group, atol=1e-10, sliding_window=5)


def test_no_shift_is_plain_block_attention():
    q, k, v = rand_qkv(1, 4, 2, 32)
    out = s2_attention(q, k, v, 8, shift=False)
    # each group of 8 alone is ordinary causal attention
    for start in range(0, 32, 8):
        sl = slice(start, start + 8)
        alone = s2_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], 8, shift=False)
        torch.testing.assert_close(out[:, :, sl], alone, atol=1e-12, rtol=0)


def test_shifted_heads_really_differ_and_do_not_wrap():
    """The paper's roll(-G/2) lets the first tokens see the last ones; ours must not."""
    q, k, v = rand_qkv(1, 2, 2, 16)
    mask = s2_dense_mask(16, 2, 8)
    assert mask[0, 1, 3].nonzero().flatten().tolist() == [0, 1, 2, 3]  # shifted head, first half-group [0, 4)
    assert mask[0, 1, 4].nonzero().flatten().tolist() == [4]  # a new shifted group starts at G/2
    assert mask[0, 0, 4].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]  # plain head: group [0, 8)
    assert not mask[0, :, :, 12:].tril(-1)[:, :12].any()  # nothing before 12 sees the tail
    out = s2_attention(q, k, v, 8)
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_library_dense_mask_matches_reference_mask():
    real = torch.ones(2, 30, dtype=torch.bool)
    real[0, :4] = False
    pos = torch.cat([torch.arange(11), torch.arange(19)])[None].expand(2, 30)
    for kw in (dict(), dict(attention_mask=real), dict(position_ids=pos), dict(sliding_window=3, shift=False)):
        ours = s2_dense_mask(30, 5, 8, **kw)
        ref = reference_mask(30, 5, 8, real=kw.get("attention_mask"), position_ids=kw.get("position_ids"),
                             sliding_window=kw.get("sliding_window"), shift=kw.get("shift", True), batch=ours.shape[0])
        rows = (real if "attention_mask" in kw else torch.ones_like(real))[: ours.shape[0], None, :, None]
        assert torch.equal(ours & rows, ref & rows)


def test_causal_later_tokens_never_change_earlier_outputs():
    q, k, v = rand_qkv(2, 6, 2, 48)
    out = s2_attention(q, k, v, 16)
    k2, v2 = k.detach().clone(), v.detach().clone()
    q2 = q.detach().clone()
    q2[:, :, 30:] += 5.0
    k2[:, :, 30:] += 5.0
    v2[:, :, 30:] -= 3.0
    out2 = s2_attention(q2, k2, v2, 16)
    torch.testing.assert_close(out[:, :, :30], out2[:, :, :30], atol=1e-12, rtol=0)
    assert not torch.allclose(out[:, :, 30:], out2[:, :, 30:])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_changes_nothing_for_real_tokens(side):
    n_real, pad = 37, 11
    q, k, v = rand_qkv(1, 4, 2, n_real)
    alone = s2_attention(q, k, v, 8)
    zeros = lambda t: torch.zeros(1, t.shape[1], pad, t.shape[3], dtype=t.dtype)  # noqa: E731
    parts = (lambda t: torch.cat([zeros(t), t], 2)) if side == "left" else (lambda t: torch.cat([t, zeros(t)], 2))
    qp, kp, vp = parts(q), parts(k), parts(v)
    real = torch.zeros(1, n_real + pad, dtype=torch.bool)
    real[:, pad:] if side == "left" else None
    if side == "left":
        real[:, pad:] = True
        sl = slice(pad, None)
    else:
        real[:, :n_real] = True
        sl = slice(0, n_real)
    padded = s2_attention(qp, kp, vp, 8, attention_mask=real)
    torch.testing.assert_close(padded[:, :, sl], alone, atol=1e-12, rtol=0)
    assert padded[:, :, ~real[0]].abs().max() == 0  # padded positions give 0
    check_against_reference(qp, kp, vp, 8, atol=1e-10, real=real)


def test_batch_with_mixed_padding_matches_each_row_alone():
    q, k, v = rand_qkv(3, 4, 2, 40)
    real = torch.ones(3, 40, dtype=torch.bool)
    real[0, :7] = False
    real[2, 33:] = False
    out = s2_attention(q, k, v, 8, attention_mask=real)
    for row in range(3):
        idx = real[row].nonzero().flatten()
        alone = s2_attention(*(t[row:row + 1, :, idx] for t in (q, k, v)), 8)
        torch.testing.assert_close(out[row:row + 1, :, idx], alone, atol=1e-12, rtol=0)


def test_packing_equals_each_document_alone():
    lengths = [13, 29, 6]
    q, k, v = rand_qkv(1, 4, 2, sum(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    out = s2_attention(q, k, v, 8, position_ids=pos)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = s2_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], 8)
        torch.testing.assert_close(out[:, :, sl], alone, atol=1e-12, rtol=0)
        start += n
    check_against_reference(q, k, v, 8, atol=1e-10, position_ids=pos)


def test_group_size_at_least_length_plain_heads_are_full_causal():
    q, k, v = rand_qkv(1, 2, 2, 12)
    out = s2_attention(q, k, v, 16, shift=False)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, full, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(group_size=3), "even integer"),
        (dict(group_size=0), "even integer"),
        (dict(group_size=1.5), "even integer"),
        (dict(hk=3), "multiple of key/value heads"),
        (dict(bad_shape=True), "must be"),
        (dict(mask_len=5), "attention_mask must be"),
        (dict(backend="cuda-magic"), "backend must be one of"),
    ],
)
def test_bad_input_raises_clear_value_error(kwargs, message):
    hk = kwargs.pop("hk", 2)
    q, k, v = rand_qkv(1, 4, hk, 16)
    if kwargs.pop("bad_shape", False):
        k = k[:, :, :10]
    extra = {}
    if "mask_len" in kwargs:
        extra["attention_mask"] = torch.ones(1, kwargs.pop("mask_len"), dtype=torch.bool)
    group = kwargs.pop("group_size", 8)
    with pytest.raises(ValueError, match=message):
        s2_attention(q, k, v, group, **kwargs, **extra)


def test_flash_backend_missing_gives_clear_message():
    if flash_available():
        pytest.skip("flash-attn is installed")
    q, k, v = rand_qkv(1, 4, 2, 16, dtype=torch.float32)
    with pytest.raises(ImportError, match="flash-attn"):
        s2_attention(q, k, v, 8, backend="flash")


@pytest.mark.gpu
@pytest.mark.skipif(not flash_available(), reason="needs CUDA and flash-attn")
def test_flash_backend_matches_sdpa_backend_on_gpu():
    g = torch.Generator().manual_seed(0)
    real = torch.ones(2, 300, dtype=torch.bool, device="cuda")
    real[0, :17] = False
    q = torch.randn(2, 300, 8, 64, generator=g).cuda().bfloat16().transpose(1, 2)
    k = torch.randn(2, 300, 2, 64, generator=g).cuda().bfloat16().transpose(1, 2)
    v = torch.randn(2, 300, 2, 64, generator=g).cuda().bfloat16().transpose(1, 2)
    for kw in (dict(), dict(attention_mask=real), dict(sliding_window=40)):
        a = s2_attention(q, k, v, 64, backend="flash", **kw).float()
        b = s2_attention(q, k, v, 64, backend="sdpa", **kw).float()
        keep = real[:, None, :, None] if "attention_mask" in kw else 1
        torch.testing.assert_close(a * keep, b * keep, atol=2e-2, rtol=0)


@pytest.fixture(params=["cpu", "sdpa"])
def regular_path(request, monkeypatch):
    """Run a test through each implementation of the regular (unpadded, unpacked) CPU layout, by the backend switch."""
    from longlora.attention import cpu as attention_cpu

    if request.param == "cpu":
        monkeypatch.setattr(attention_cpu, "_BWD_MIN_TILE", 4)  # several backward tiles per group at test sizes
    with use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("b,hq,hk,length,group", SHAPES)
def test_both_regular_paths_match_reference(regular_path, b, hq, hk, length, group):
    q, k, v = rand_qkv(b, hq, hk, length)
    layout = token_layout(b, length, q.device)
    assert resolve_backend(q, k, v, layout, group) == regular_path  # the switch really selects the path
    check_against_reference(q, k, v, group, atol=1e-10)
    check_against_reference(q, k, v, group, atol=1e-10, shift=False)


def test_cpu_flash_function_gradients_keep_input_layout_and_match_composed_path(monkeypatch):
    from longlora.attention import cpu as attention_cpu

    q, k, v = rand_qkv(2, 6, 2, 96, dtype=torch.float32)
    q2, k2, v2 = (x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v))
    monkeypatch.setattr(attention_cpu, "_BWD_MIN_TILE", 4)
    out = s2_attention(q, k, v, 32, backend="cpu")
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    s2_attention(q2, k2, v2, 32, backend="sdpa").backward(grad_out)
    for x, y in ((q, q2), (k, k2), (v, v2)):
        assert x.grad.stride() == x.stride()  # autograd took our buffer as it is: no layout copy
        torch.testing.assert_close(x.grad, y.grad, atol=2e-5, rtol=0)
    # bf16 runs through the same kernels
    qb, kb, vb = (x.detach().bfloat16().requires_grad_() for x in (q, k, v))
    monkeypatch.undo()
    ob = s2_attention(qb, kb, vb, 32)
    torch.testing.assert_close(ob.float(), out.detach(), atol=3e-2, rtol=0)


def _reference_grads(q, k, v, group, grad_out):
    ref = reference_attention(q, k, v, reference_mask(q.shape[2], q.shape[1], group, batch=q.shape[0]))
    return torch.autograd.grad(ref, (q, k, v), grad_out)


@pytest.mark.parametrize("min_tile", [4, 128])
def test_gradient_written_over_a_dropped_output_is_exact(monkeypatch, min_tile):
    """The caller keeps no output (the usual training graph): dq is written over the saved output, still exact."""
    from longlora.attention import cpu as attention_cpu

    if not attention_cpu.output_reuse_supported():
        pytest.skip("this torch cannot tell a dropped output from a held one: no reuse, nothing to check")
    monkeypatch.setattr(attention_cpu, "_BWD_MIN_TILE", min_tile)  # several row tiles per group, or one
    monkeypatch.setattr(attention_cpu, "_BWD_SPLITS", 4)
    private = []
    check = attention_cpu._output_is_private
    monkeypatch.setattr(attention_cpu, "_output_is_private",
                        lambda out, count: private.append(check(out, count)) or private[-1])
    q, k, v = rand_qkv(2, 6, 2, 96)
    grad_out = torch.randn(2, 6, 96, 8, dtype=torch.float64)
    (s2_attention(q, k, v, 32) * grad_out).sum().backward()  # the output itself is not kept by anyone
    assert private == [True]
    for x, r in zip((q, k, v), _reference_grads(q, k, v, 32, grad_out)):
        torch.testing.assert_close(x.grad, r, atol=1e-10, rtol=0)


def test_output_kept_by_the_caller_is_not_overwritten():
    q, k, v = rand_qkv(1, 4, 2, 64)
    out = s2_attention(q, k, v, 16)
    before = out.detach().clone()
    grad_out = torch.randn_like(before)
    out.backward(grad_out)
    assert torch.equal(out.detach(), before)
    for x, r in zip((q, k, v), _reference_grads(q, k, v, 16, grad_out)):
        torch.testing.assert_close(x.grad, r, atol=1e-10, rtol=0)


def test_retained_graph_second_backward_is_exact_or_says_what_to_do(monkeypatch):
    from contextlib import nullcontext

    from longlora import attention
    from longlora.attention import cpu as attention_cpu

    q, k, v = rand_qkv(1, 4, 2, 64)
    # square() keeps the output for its own backward: not private, left alone, so a second backward is exact
    loss = s2_attention(q, k, v, 16).square().sum()
    loss.backward(retain_graph=True)
    first = q.grad.clone()
    loss.backward()
    torch.testing.assert_close(q.grad, 2 * first, atol=1e-12, rtol=0)
    # sum() keeps nothing: the first backward wrote over the output, the second one says so and how to avoid it
    if attention_cpu.output_reuse_supported():
        loss = s2_attention(q, k, v, 16).sum()
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="REUSE_OUTPUT_MEMORY"):
            loss.backward()
    # both documented ways of switching the reuse off: the configuration, and the module flag's old name
    for switch_off in (lambda: use_backend(reuse_output_memory=False),
                       lambda: monkeypatch.setattr(attention, "REUSE_OUTPUT_MEMORY", False) or nullcontext()):
        with switch_off():
            loss = s2_attention(q, k, v, 16).sum()
        q.grad = None
        loss.backward(retain_graph=True)
        first = q.grad.clone()
        loss.backward()
        torch.testing.assert_close(q.grad, 2 * first, atol=1e-12, rtol=0)
        monkeypatch.undo()
    assert attention.REUSE_OUTPUT_MEMORY is True and get_backend() == "auto"  # both restored


def test_checkpointed_s2_gradients_are_exact():
    from torch.utils.checkpoint import checkpoint

    q, k, v = rand_qkv(2, 4, 2, 64)
    grad_out = torch.randn(2, 4, 64, 8, dtype=torch.float64)
    for reentrant in (False, True):
        q.grad = k.grad = v.grad = None
        checkpoint(lambda a, b, c: (s2_attention(a, b, c, 16) * grad_out).sum(), q, k, v,
                   use_reentrant=reentrant).backward()
        for x, r in zip((q, k, v), _reference_grads(q, k, v, 16, grad_out)):
            torch.testing.assert_close(x.grad, r, atol=1e-10, rtol=0)


def test_peak_memory_of_forward_and_backward_is_not_above_full_sdpa():
    """The memory figure, at test size: S2 (G = L/4, GQA) holds no more tensor bytes than full causal SDPA.

    That needs the output reuse; on a torch where it is not supported (see attention_cpu), dq is a buffer of its
    own, and S2 may hold up to one output more than full SDPA, no more.
    """
    import importlib.util
    from pathlib import Path

    from longlora.attention.cpu import output_reuse_supported

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_measure.py"
    spec = importlib.util.spec_from_file_location("_measure", path)
    measure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(measure)
    PeakTensorMemory, full_attention = measure.PeakTensorMemory, measure.full_attention

    q, k, v = rand_qkv(1, 8, 2, 1024, d=32, dtype=torch.float32)
    peaks = []
    for fn in (full_attention, lambda a, b, c: s2_attention(a, b, c, 256)):
        with PeakTensorMemory(exclude=(q, k, v)) as tracker:
            fn(q, k, v).sum().backward()
        peaks.append(tracker.peak)
        q.grad = k.grad = v.grad = None
    full, s2 = peaks
    allowance = 0 if output_reuse_supported() else q.numel() * q.element_size()  # one (B, Hq, L, D) output
    assert s2 <= full + allowance, f"S2 peak {s2 / 2**20:.2f} MiB > full SDPA {full / 2**20:.2f} MiB (+ allowance)"


def test_backward_calls_cover_every_group_and_head_once_and_fill_the_threads():
    from longlora.attention.cpu import _backward_calls

    for count, hq, hkv, threads in [(3, 4, 1, 2), (4, 4, 1, 2), (3, 8, 2, 4), (5, 6, 3, 2), (3, 4, 4, 2), (1, 4, 1, 1)]:
        cells = []
        for g, heads, kv_heads, rep in _backward_calls(count, hq, hkv, threads):
            assert heads.stop - heads.start == rep * (kv_heads.stop - kv_heads.start) or rep == 1
            cells += [(i, h) for i in range(count)[g] for h in range(hq)[heads]]
            # work items the kernel spreads over threads: groups x key/value heads, or x query heads when expanded
            items = (g.stop - g.start) * (rep if rep > 1 else kv_heads.stop - kv_heads.start)
            assert items >= min(threads, count * hq) or (rep == 1 and hq == hkv)
        assert sorted(cells) == [(i, h) for i in range(count) for h in range(hq)]


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_gradients_exact_for_every_thread_count(monkeypatch, threads):
    from longlora.attention import cpu as attention_cpu

    monkeypatch.setattr(attention_cpu, "_kernel_threads", lambda: threads)
    q, k, v = rand_qkv(1, 8, 2, 96)
    grad_out = torch.randn(1, 8, 96, 8, dtype=torch.float64)
    (s2_attention(q, k, v, 32) * grad_out).sum().backward()
    for x, r in zip((q, k, v), _reference_grads(q, k, v, 32, grad_out)):
        torch.testing.assert_close(x.grad, r, atol=1e-10, rtol=0)


def test_backend_switch_validates_and_restores():
    with pytest.raises(ValueError, match="backend must be one of"):
        set_backend("cuda-magic")
    q, k, v = rand_qkv(1, 4, 2, 32)
    layout = token_layout(1, 32, q.device)
    with use_backend("sdpa"):
        assert get_backend() == "sdpa" and resolve_backend(q, k, v, layout, 8) == "sdpa"
        assert resolve_backend(q, k, v, layout, 8, backend="cpu") == "cpu"  # an explicit argument wins
    assert get_backend() == "auto" and resolve_backend(q, k, v, layout, 8) == "cpu"  # auto on CPU, regular layout
    padded = token_layout(1, 32, q.device, attention_mask=torch.arange(32)[None] >= 3)
    assert resolve_backend(q, k, v, padded, 8, backend="cpu") == "sdpa"  # cpu applies to the regular layout only


def test_lazy_calibration_runs_outside_the_callers_saved_tensor_hooks(monkeypatch):
    """First use inside saved-tensor hooks (as under activation checkpointing) calibrates as it would alone."""
    from longlora.attention import cpu as attention_cpu

    expected = attention_cpu._calibrate_private_use_count()
    monkeypatch.setattr(attention_cpu, "_CALIBRATION", [])
    packed = []
    q, k, v = rand_qkv(1, 4, 2, 32)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
        s2_attention(q, k, v, 8).sum().backward()
    assert packed and attention_cpu._CALIBRATION == [expected]


@pytest.mark.parametrize("hq,hk,length,group,start,chunk", ROW_PREFIX_CASES)
def test_cpu_row_prefix_equals_the_longer_sequence(hq, hk, length, group, start, chunk):
    """s2_cpu_flash(prefix=...) (sequence parallelism on CPU) on a cut of a sequence = S2 over the whole sequence at
    the cut's rows (s2_reference.check_row_prefix)."""
    from longlora.attention.cpu import s2_cpu_flash

    check_row_prefix(lambda q, k, v, prefix: s2_cpu_flash(q, k, v, group, hq // 2, None, prefix=prefix),
                     *rand_qkv(2, hq, hk, length), group, start, chunk)
