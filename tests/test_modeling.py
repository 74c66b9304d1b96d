"""The shared loader: plain models, PEFT adapters (base read from the adapter), RoPE scaling at load, errors."""

import importlib.util
import json
import sys
import types

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from longlora.modeling import load_model_and_tokenizer, max_context

POSITIONS = 128


def tiny_llama():
    config = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=POSITIONS, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer(extra=()):
    words = ["<pad>", "<s>", "</s>", "[UNK]", *"the sky is blue".split(), *extra]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="<pad>"
    )


IDS = torch.tensor([[1, 4, 5, 6, 7, 4, 5, 6, 7, 3]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def save_adapter(base_dir, path, *, resize_to=None):
    """A LoRA+ adapter (q,k,v,o + embed/norm modules_to_save) with non-trivial weights, saved with a tokenizer."""
    model = LlamaForCausalLM.from_pretrained(base_dir)  # so the adapter records base_dir as its base model
    tokenizer = tiny_tokenizer(extra=["<extra>"] if resize_to else ())
    if resize_to:
        model.resize_token_embeddings(resize_to)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        modules_to_save=["embed_tokens", "norm"])
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:  # LoRA A/B and the trainable embed/norm copies
                param.add_(0.1 * torch.randn_like(param))
    peft_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return peft_model.eval()


def test_plain_model_loads_in_eval_mode_with_sdpa(base_dir):
    model, tokenizer = load_model_and_tokenizer(str(base_dir), dtype="float32", device="cpu")
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.bos_token == "<s>"
    assert max_context(model) == POSITIONS
    torch.testing.assert_close(logits(model), logits(LlamaForCausalLM.from_pretrained(base_dir)))


def test_dtype(base_dir):
    model, _ = load_model_and_tokenizer(base_dir, dtype="bf16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_model_and_tokenizer(base_dir, dtype="float8")


def test_adapter_loaded_on_top_with_base_from_its_config(base_dir, tmp_path):
    reference = save_adapter(base_dir, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base_dir
    )
    expected = logits(reference)
    for model_arg, adapter_arg in [(None, tmp_path / "adapter"), (str(base_dir), tmp_path / "adapter"),
                                   (str(tmp_path / "adapter"), None)]:
        model, tokenizer = load_model_and_tokenizer(model_arg, adapter_arg, device="cpu")
        assert not model.training and max_context(model) == POSITIONS
        torch.testing.assert_close(logits(model), expected)
    assert not torch.allclose(expected, logits(LlamaForCausalLM.from_pretrained(base_dir)))


def test_adapter_with_resized_vocabulary(base_dir, tmp_path):
    reference = save_adapter(base_dir, tmp_path / "adapter", resize_to=40)
    model, tokenizer = load_model_and_tokenizer(None, tmp_path / "adapter", device="cpu")
    assert len(tokenizer) == 9  # the adapter's tokenizer, with the added token
    assert model.get_input_embeddings().weight.shape[0] == 40
    ids = torch.tensor([[1, 4, 5, 8, 39]])  # includes a new row of the embedding
    torch.testing.assert_close(model(input_ids=ids).logits[..., :32], reference(input_ids=ids).logits[..., :32])


def test_adapter_config_with_position_interpolation_is_used(base_dir, tmp_path):
    """train saves the base config with its RoPE scaling beside the adapter; eval must not need --rope-factor."""
    reference = save_adapter(base_dir, tmp_path / "adapter", resize_to=40)
    config = reference.get_base_model().config
    config.rope_parameters = {**config.rope_parameters, "rope_type": "linear", "factor": 2.0}
    config.max_position_embeddings = 2 * POSITIONS
    config.save_pretrained(tmp_path / "adapter")  # vocab_size 40 in it: the base checkpoint has 32 rows

    plain, _ = load_model_and_tokenizer(base_dir, device="cpu")
    model, _ = load_model_and_tokenizer(None, tmp_path / "adapter", device="cpu")
    assert max_context(model) == 2 * POSITIONS
    assert model.get_input_embeddings().weight.shape[0] == 40
    rotary = model.get_base_model().model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq, plain.model.rotary_emb.inv_freq / 2)


def _fake_rope_module(calls):
    def apply_position_interpolation(config, context_length, scaling="linear", factor=None):
        calls.append((context_length, scaling, factor))
        config.rope_parameters = {**config.rope_parameters, "rope_type": "linear", "factor": float(factor)}
        config.max_position_embeddings = context_length
        return config

    module = types.ModuleType("longlora.rope")
    module.apply_position_interpolation = apply_position_interpolation
    module.original_context_length = lambda config: config.max_position_embeddings
    return module


def test_rope_factor_goes_through_the_rope_contract_before_weights_load(base_dir, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "longlora.rope", _fake_rope_module(calls))
    plain, _ = load_model_and_tokenizer(base_dir, device="cpu")
    model, _ = load_model_and_tokenizer(base_dir, device="cpu", rope_factor=4)
    assert calls == [(4 * POSITIONS, "linear", 4)]
    assert max_context(model) == 4 * POSITIONS
    # the rotary embedding was built from the scaled config: linear PI divides every frequency by the factor
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq / 4)


@pytest.mark.skipif(importlib.util.find_spec("longlora.rope") is None, reason="longlora.rope not written yet")
def test_rope_factor_with_the_real_rope_module(base_dir):
    model, _ = load_model_and_tokenizer(base_dir, device="cpu", rope_factor=2)
    assert max_context(model) == 2 * POSITIONS
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 2


def test_missing_paths_raise_clear_errors(base_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model_and_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="adapter directory"):
        load_model_and_tokenizer(base_dir, tmp_path / "no-adapter")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_model_and_tokenizer(base_dir, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="GGUF"):
        load_model_and_tokenizer(str(tmp_path / "model.gguf"))
    with pytest.raises(ValueError, match="adapter"):
        load_model_and_tokenizer(None)


@pytest.mark.skipif(importlib.util.find_spec("gguf") is not None, reason="gguf is installed")
def test_gguf_without_the_package_says_what_to_install(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ImportError, match="pip install gguf"):
        load_model_and_tokenizer(str(tmp_path / "model.gguf"))


def test_eval_loader_refuses_an_adapter_trained_on_another_architecture(base_dir, tmp_path):
    """The one loader runs merge's architecture check for every command (eval, ask, ...), before weights load."""
    save_adapter(base_dir, tmp_path / "adapter")
    wide = LlamaConfig.from_pretrained(base_dir)
    wide.num_hidden_layers = 3
    wide.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"num_hidden_layers 3 \(adapter\) vs 2 \(base\)"):
        load_model_and_tokenizer(None, tmp_path / "adapter", device="cpu")


def test_saved_checkpoint_files_are_finalized_for_every_reader(base_dir, tmp_path):
    """finalize_saved_files: legacy RoPE keys consistent with rope_parameters, no attention setting, and a
    tokenizer_config.json without transformers 5's bookkeeping keys, whose class transformers 4 also knows."""
    from longlora.modeling import finalize_saved_files

    model, tokenizer = load_model_and_tokenizer(base_dir, device="cpu", rope_factor=2)
    model.config._attn_implementation = "s2_sdpa"
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    finalize_saved_files(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_scaling"] == {"type": "linear", "rope_type": "linear", "factor": 2}
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert not any("attn_implementation" in key for key in config)
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(tokenizer_config)
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    reloaded, reloaded_tokenizer = load_model_and_tokenizer(tmp_path, device="cpu")
    assert reloaded.config.rope_parameters["factor"] == 2
    assert reloaded_tokenizer("the sky is blue")["input_ids"] == tokenizer("the sky is blue")["input_ids"]


def test_stored_dtype_is_read_from_the_weights(base_dir, tmp_path):
    """merge --dtype auto writes what the base stores: read from the safetensors header, not guessed."""
    from longlora.modeling import resolve_checkpoint, stored_dtype

    assert stored_dtype(resolve_checkpoint(base_dir)) == torch.float32
    LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert stored_dtype(resolve_checkpoint(tmp_path / "bf16")) == torch.bfloat16


def test_adapter_config_module_lists_are_written_in_one_order(base_dir, tmp_path):
    """PEFT writes target_modules from a set (its order changes with the process's hash seed): finalize_saved_files
    sorts the module lists, so that two runs of the same training write the same adapter_config.json."""
    from longlora.adapters import apply_lora_plus
    from longlora.modeling import ADAPTER_CONFIG, finalize_saved_files

    model, _ = load_model_and_tokenizer(base_dir, device="cpu")
    apply_lora_plus(model).save_pretrained(tmp_path)
    path = tmp_path / ADAPTER_CONFIG
    saved = json.loads(path.read_text())
    saved["target_modules"] = sorted(saved["target_modules"], reverse=True)  # as another hash seed may write it
    path.write_text(json.dumps(saved))
    finalize_saved_files(tmp_path)
    final = json.loads(path.read_text())
    assert len(final["target_modules"]) > 1 and final["target_modules"] == sorted(saved["target_modules"])
    assert final["modules_to_save"] == sorted(saved["modules_to_save"])
    assert {k: v for k, v in final.items() if k not in ("target_modules", "modules_to_save")} == {
        k: v for k, v in saved.items() if k not in ("target_modules", "modules_to_save")}
