"""S2-Attn inside transformers models: every supported architecture, train vs eval, padding, packing, checkpointing."""

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, DataCollatorWithFlattening
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import longlora
from longlora.integration import S2_ATTENTION, S2Settings, s2_enabled
from s2_reference import reference_attention, reference_mask
from tiny_models import ARCHS, VOCAB, tiny_config

GROUP = 8
REF = "s2_test_reference"
_ref_inputs = {}  # the 2-D padding mask of the current call, for the reference attention


def _reference_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Independent S2: dense mask from the definition, then softmax. Returns (B, L, Hq, D) like transformers wants."""
    b, hq, length, _ = query.shape
    mask = reference_mask(length, hq, GROUP, real=_ref_inputs.get("real"), batch=b,
                          position_ids=_ref_inputs.get("position_ids"), sliding_window=kwargs.get("sliding_window"))
    return reference_attention(query, key, value, mask, scale=scaling).transpose(1, 2), None


AttentionInterface.register(REF, _reference_forward)
AttentionMaskInterface.register(REF, sdpa_mask)


def build(arch, seed=0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))


def logits_with(model, impl, input_ids, train, **kwargs):
    model.set_attn_implementation(impl)
    model.train(train)
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_train_s2_eval_sdpa_and_causal(arch):
    model = build(arch)
    ids = torch.randint(3, VOCAB, (2, 44), generator=torch.Generator().manual_seed(1))
    sdpa_eval = logits_with(model, "sdpa", ids, train=False)
    _ref_inputs.clear()
    reference = logits_with(model, REF, ids, train=True)

    longlora.enable_s2_attention(model, group_size=GROUP)
    assert s2_enabled(model)
    model.train()
    with torch.no_grad():
        s2_train = model(ids).logits
    torch.testing.assert_close(s2_train, reference, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(s2_train, sdpa_eval, atol=1e-3)  # S2 really restricts attention in training

    model.eval()
    with torch.no_grad():
        s2_eval = model(ids).logits
    assert torch.equal(s2_eval, sdpa_eval)  # eval mode is bit-for-bit the SDPA path

    changed = ids.clone()
    changed[:, 30:] = (changed[:, 30:] + 7) % VOCAB
    model.train()
    with torch.no_grad():
        later_changed = model(changed).logits
    torch.testing.assert_close(later_changed[:, :30], s2_train[:, :30], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt_neox"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_reference_and_unpadded_rows(arch, side):
    kw = dict(sliding_window=12) if arch == "mistral" else {}
    model = build(arch, **kw)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    if side == "left":
        mask[0, :9] = 0
    else:
        mask[0, 31:] = 0
    _ref_inputs.clear()
    _ref_inputs["real"] = mask.bool()
    reference = logits_with(model, REF, ids, train=True, attention_mask=mask)
    longlora.enable_s2_attention(model, group_size=GROUP)
    model.train()
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        real = mask[0].bool()
        # RoPE positions of a left-padded row: transformers' default arange, so run the row alone at the same positions
        pos = torch.arange(40)[real][None]
        alone = model(ids[:1, real], position_ids=pos if side == "left" else None).logits
    torch.testing.assert_close(padded[mask.bool()], reference[mask.bool()], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(padded[0, real], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_packed_batch_from_flattening_collator_equals_documents_alone(arch):
    model = build(arch)
    longlora.enable_s2_attention(model, group_size=GROUP)
    model.config.use_cache = False
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (19, 26, 7)]
    batch = DataCollatorWithFlattening()([{"input_ids": d} for d in docs])
    assert batch["input_ids"].shape == (1, 52)
    model.train()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        start = 0
        for d in docs:
            alone = model(torch.tensor([d]), use_cache=False).logits
            torch.testing.assert_close(packed[0, start:start + len(d)], alone[0], atol=1e-4, rtol=1e-4)
            start += len(d)
    _ref_inputs.clear()
    _ref_inputs["position_ids"] = batch["position_ids"]
    reference = logits_with(model, REF, batch["input_ids"], train=True, position_ids=batch["position_ids"],
                            use_cache=False)
    torch.testing.assert_close(packed, reference, atol=1e-4, rtol=1e-4)


def test_packing_respected_even_when_a_cache_skips_transformers_packing_detection():
    """transformers ignores position_ids restarts when use_cache=True; S2 reads them itself."""
    model = build("llama")
    longlora.enable_s2_attention(model, group_size=GROUP)
    model.train()
    pos = torch.cat([torch.arange(20), torch.arange(12)])[None]
    ids = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        packed = model(ids, position_ids=pos, use_cache=True).logits
        second = model(ids[:, 20:], use_cache=False).logits
    torch.testing.assert_close(packed[:, 20:], second, atol=1e-4, rtol=1e-4)


def test_gradients_with_gradient_checkpointing_match_without():
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    grads = []
    for checkpointing in (False, True):
        model = build("llama")
        longlora.enable_s2_attention(model, group_size=GROUP)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_group_size_ratio_follows_sequence_length_and_disable_restores_sdpa():
    model = build("llama")
    ids = torch.randint(3, VOCAB, (1, 48), generator=torch.Generator().manual_seed(6))
    longlora.enable_s2_attention(model, group_size=12)
    model.train()
    with torch.no_grad():
        fixed_12 = model(ids).logits
    longlora.enable_s2_attention(model, group_size_ratio=0.25)  # 48 * 0.25 = 12
    with torch.no_grad():
        ratio = model(ids).logits
    assert torch.equal(fixed_12, ratio)
    longlora.disable_s2_attention(model)
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model.model.layers[0].self_attn, "s2_settings")
    with torch.no_grad():
        restored = model(ids).logits
    assert not torch.allclose(restored, ratio)


def test_no_shift_setting_reaches_the_layers():
    model = build("llama")
    longlora.enable_s2_attention(model, group_size=GROUP, shift=False)
    assert all(m.s2_settings.shift is False for m in longlora.integration.attention_modules(model))


def test_bf16_training_step_runs_and_is_close_to_fp32():
    ids = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(7))
    model = build("llama")
    longlora.enable_s2_attention(model, group_size=GROUP)
    model.train()
    loss32 = model(ids, labels=ids).loss
    model16 = model.to(torch.bfloat16)
    loss16 = model16(ids, labels=ids).loss
    loss16.backward()
    assert torch.isfinite(loss16)
    assert abs(loss16.item() - loss32.item()) < 0.05


def test_peft_model_can_be_switched():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    longlora.enable_s2_attention(model, group_size=GROUP)
    assert model.get_base_model().config._attn_implementation == S2_ATTENTION
    # through PEFT's wrapper the S2 forward is still recognised: a padded training batch gets the O(L) mask
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :5] = 0
    seen = []
    handle = model.get_base_model().model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(tuple(
            longlora.integration.s2_mask(2, 40, 40, attention_mask=kwargs["attention_mask"]).shape)),
        with_kwargs=True)
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    handle.remove()
    assert seen == [(2, 1, 1, 80)]


def test_unsupported_features_raise_clear_errors():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma2 = Gemma2ForCausalLM(Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64))
    with pytest.raises(ValueError, match="Gemma2ForCausalLM.*soft-capping"):
        longlora.enable_s2_attention(gemma2)
    with pytest.raises(ValueError, match="group_size must be"):
        longlora.enable_s2_attention(build("llama"), group_size=7)
    with pytest.raises(ValueError, match="group_size_ratio"):
        S2Settings(group_size_ratio=0)


def test_in_eval_applies_s2_in_eval_mode_and_refuses_generation():
    model = build("llama")
    ids = torch.randint(3, VOCAB, (2, 44), generator=torch.Generator().manual_seed(5))
    _ref_inputs.clear()
    reference = logits_with(model, REF, ids, train=True)
    longlora.enable_s2_attention(model, group_size=GROUP, in_eval=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="KV cache"):
            model.generate(ids[:1, :10], max_new_tokens=2, do_sample=False)
    # inference tensors carry no version counter for the per-forward layout cache; padded rows too
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, padded, atol=0, rtol=0)
    longlora.enable_s2_attention(model, group_size=GROUP)  # default: eval is full attention again
    with torch.no_grad():
        sdpa = logits_with(model, "sdpa", ids, train=False)
        longlora.enable_s2_attention(model, group_size=GROUP)
        assert torch.equal(model(ids).logits, sdpa)


def test_training_forward_gets_an_O_L_mask_with_padding_and_packing_and_eval_stays_exact(monkeypatch):
    """In an S2 forward the mask is (B, 1, 1, 2L), not (B, 1, L, L); eval mode still gets SDPA's own mask."""
    from longlora import integration

    seen = []
    layout = integration._layout_from_mask
    monkeypatch.setattr(integration, "_layout_from_mask",
                        lambda mask, *a: seen.append(None if mask is None else tuple(mask.shape)) or layout(mask, *a))
    model = build("llama")
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(8))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :9] = 0
    sdpa_eval = logits_with(model, "sdpa", ids, train=False, attention_mask=mask)
    longlora.enable_s2_attention(model, group_size=GROUP)
    model.train()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert seen and set(seen) == {(2, 1, 1, 80)}  # padding: compact
    seen.clear()
    collated = DataCollatorWithFlattening(return_position_ids=True)([{"input_ids": ids[0, :25].tolist()},
                                                                     {"input_ids": ids[1, :15].tolist()}])
    with torch.no_grad():
        model(collated["input_ids"], position_ids=collated["position_ids"], use_cache=False)
    assert seen and set(seen) == {(1, 1, 1, 80)}  # packing detected by transformers: compact too
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, sdpa_eval)
        # a forward that died in training leaves the flag set: eval layers still get SDPA's full mask, bit for bit
        integration._S2_FORWARD.set(True)
        model.model(ids, attention_mask=mask)  # the inner model has no hook: the flag stays as it is
        assert torch.equal(model.lm_head(model.model(ids, attention_mask=mask).last_hidden_state), sdpa_eval)
        integration._S2_FORWARD.set(False)
    longlora.disable_s2_attention(model)
    assert not model._longlora_hooks


def test_a_forward_that_raises_resets_the_s2_flag():
    from longlora import integration

    model = build("llama")
    longlora.enable_s2_attention(model, group_size=GROUP)
    model.train()
    bad = torch.full((1, 16), VOCAB + 5)  # out of the vocabulary: the embedding raises inside the forward
    with pytest.raises(IndexError):
        model(bad)
    assert integration._S2_FORWARD.get() is False
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    model(ids).logits.sum().backward()  # and the model still works afterwards
    assert integration._S2_FORWARD.get() is False


def test_layout_is_built_once_per_forward_and_reused_by_every_layer(monkeypatch):
    """Per forward, the token layout (and its group cut) is read off the mask once, not once per layer."""
    from longlora import attention, integration

    built, cut = [], []
    layout_from_mask, cut_segments = integration._layout_from_mask, attention.layout._cut_segments
    monkeypatch.setattr(integration, "_layout_from_mask", lambda *a: built.append(1) or layout_from_mask(*a))
    monkeypatch.setattr(attention.layout, "_cut_segments", lambda *a: cut.append(a[1:]) or cut_segments(*a))
    model = build("llama", num_hidden_layers=3)
    longlora.enable_s2_attention(model, group_size=GROUP)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :9] = 0
    with longlora.attention.use_backend("sdpa"):
        model(ids, attention_mask=mask, labels=ids).loss.backward()  # 3 layers, forward + checkpoint recompute
    assert len(built) == 1
    assert sorted(cut) == [(GROUP, 0), (GROUP, GROUP // 2)]  # each head half's groups cut once
    built.clear()
    with longlora.attention.use_backend("sdpa"):
        model(ids, labels=ids).loss.backward()  # no padding: the regular layout, kept on position_ids
    assert built == [1]


def test_cached_layout_follows_a_position_ids_tensor_changed_in_place():
    """The layout kept on a position_ids tensor is read again after the tensor is changed in place."""
    model = build("llama")
    longlora.enable_s2_attention(model, group_size=GROUP)
    model.train()
    ids = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(32)[None]
    with torch.no_grad():
        model(ids, position_ids=pos, use_cache=True)  # one document
        pos[0, 20:] = torch.arange(12)  # now two packed documents, same tensor
        packed = model(ids, position_ids=pos, use_cache=True).logits
        second = model(ids[:, 20:], use_cache=False).logits
    torch.testing.assert_close(packed[:, 20:], second, atol=1e-4, rtol=1e-4)
