"""merge_adapter: base + LoRA+ adapter -> standalone checkpoint with the same logits, RoPE scaling in its config,
loadable by plain transformers; tied embeddings stay tied; wrong bases and existing outputs are refused; atomic."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from longlora.adapters import apply_lora_plus
from longlora.merge import atomic_directory, cmd_merge, merge_adapter
from longlora.rope import apply_position_interpolation

POSITIONS = 64
TRAINED_CONTEXT = 4 * POSITIONS  # position interpolation x4
VOCAB = 48
IDS = torch.tensor([[1, 5, 9, 14, 3, 22, 7, 40, 11, 30, 2, 17]])


def tiny_llama_config(tied: bool, hidden: int = 32) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS, rope_theta=5000.0,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<s>", "</s>", "[UNK]"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="<pad>"
    )


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def make_base(path: Path, tied: bool, hidden: int = 32) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tied, hidden)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_adapter(base: Path, path: Path, *, with_config: bool = True, resize_to: int | None = None):
    """What `longlora train` leaves: a LoRA+ adapter with 'trained' (perturbed) weights, the PI config, a tokenizer.

    Returns the reference model: base loaded with the PI config + the adapter, through PEFT, in eval mode.
    """
    config = apply_position_interpolation(LlamaConfig.from_pretrained(base), TRAINED_CONTEXT)
    model = LlamaForCausalLM.from_pretrained(base, config=config)
    if resize_to:  # training added tokens (e.g. a pad token): the trained embedding has more rows
        model.resize_token_embeddings(resize_to)
        config = model.config
    peft_model = apply_lora_plus(model, rank=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            # Training moves LoRA B away from zero and the embed/norm copies away from the base weights.
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(path)
    if with_config:
        config.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return peft_model.eval()


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    """{tied: (tied, base dir, adapter dir, reference base+adapter logits, merged fp32 output dir)}."""
    pair = {}
    for tied in (False, True):
        root = tmp_path_factory.mktemp("tied" if tied else "untied")
        base = make_base(root / "base", tied)
        reference = logits(make_adapter(base, root / "adapter"))
        out = merge_adapter(adapter=root / "adapter", output=root / "merged", dtype="float32")
        pair[tied] = (tied, base, root / "adapter", reference, out)
    return pair


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def trained(request, trained_pair):
    return trained_pair[request.param]


def test_merged_logits_equal_base_plus_adapter(trained):
    tied, base, adapter, reference, out = trained
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(merged), reference, rtol=1e-4, atol=1e-4)
    # The adapter does change the model: the check above is not base == base.
    base_model = LlamaForCausalLM.from_pretrained(
        base, config=apply_position_interpolation(LlamaConfig.from_pretrained(base), TRAINED_CONTEXT)
    )
    assert (logits(base_model) - reference).abs().max() > 1e-2


def test_config_records_position_interpolation(trained):
    _, _, _, _, out = trained
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear"
    assert config["rope_parameters"]["factor"] == 4
    assert config["rope_parameters"]["rope_theta"] == 5000.0
    assert config["max_position_embeddings"] == TRAINED_CONTEXT
    assert config["dtype"] == "float32"
    assert config["use_cache"] is True
    assert not any("attn_implementation" in key for key in config)
    assert (out / "tokenizer.json").is_file()
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary directory left beside it
    # the legacy keys transformers 4.x reads, equal to rope_parameters
    assert config["rope_scaling"] == {"type": "linear", "rope_type": "linear", "factor": 4}
    assert config["rope_theta"] == 5000.0
    assert not {"is_local", "local_files_only"} & set(json.loads((out / "tokenizer_config.json").read_text()))


def test_tied_embeddings_stay_tied(trained):
    tied, _, _, _, out = trained
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys
    assert ("lm_head.weight" in keys) is not tied  # tied: one tensor in the file
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) is tied


def test_loads_with_plain_transformers_in_a_fresh_process(trained_pair, tmp_path):
    """No longlora import, no PEFT: AutoModelForCausalLM alone gives the base+adapter logits (tied and untied)."""
    outs = [str(trained_pair[tied][4]) for tied in (False, True)]
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "results = []\n"
        f"for out in {outs!r}:\n"
        "    model = AutoModelForCausalLM.from_pretrained(out)\n"
        "    with torch.no_grad():\n"
        "        logits = model(input_ids=ids).logits\n"
        "    tied = model.lm_head.weight is model.model.embed_tokens.weight\n"
        "    results.append({'logits': logits, 'attn': model.config._attn_implementation, 'tied': tied})\n"
        "assert not any(name.startswith(('longlora', 'peft')) for name in sys.modules), 'longlora/peft imported'\n"
        f"torch.save(results, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, capture_output=True)
    results = torch.load(tmp_path / "out.pt")
    for tied, result in zip((False, True), results):
        assert result["attn"] == "sdpa"
        assert result["tied"] is tied
        torch.testing.assert_close(result["logits"], trained_pair[tied][3], rtol=1e-4, atol=1e-4)


def test_default_dtype_is_the_bases_and_keeps_every_trained_change(tmp_path, caplog):
    """A float32 base merges into float32 by default (dtype 'auto'): the merged logits equal base + adapter to
    1e-4, the merge reports that difference itself, and the small trained changes of the norm weights survive."""
    base = make_base(tmp_path / "base", tied=False)
    reference_model = make_adapter(base, tmp_path / "adapter")
    with torch.no_grad():  # a few steps of training move norm weights by ~1e-4: below bfloat16's resolution near 1
        for name, param in reference_model.named_parameters():
            if "modules_to_save" in name and "norm" in name:
                param.copy_(1.0 + 1e-4 * torch.randn_like(param))
    reference_model.save_pretrained(tmp_path / "adapter")
    with caplog.at_level("INFO", logger="longlora.merge"):
        summary = cmd_merge(None, str(tmp_path / "adapter"), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.float32 and summary["dtype"] == "float32"
    diff = (logits(merged) - logits(reference_model)).abs().max()
    assert diff < 1e-4
    assert summary["max_logit_diff"] is not None and summary["max_logit_diff"] < 1e-4
    assert "max |logit difference|" in caplog.text
    trained_norms = {
        name.split("modules_to_save.default.")[0].removeprefix("base_model.model.").rstrip(".") + ".weight": param
        for name, param in reference_model.named_parameters() if "modules_to_save" in name and "norm" in name
    }
    assert trained_norms
    merged_params = dict(merged.named_parameters())
    for name, trained in trained_norms.items():
        assert torch.equal(merged_params[name], trained), name
        assert not torch.equal(trained, torch.ones_like(trained))  # the base's norm weights are ones

    # bfloat16 rounds those changes away, and the merge says so.
    caplog.clear()
    with caplog.at_level("WARNING", logger="longlora.merge"):
        summary = cmd_merge(None, str(tmp_path / "adapter"), str(tmp_path / "merged-bf16"), dtype="bfloat16")
    assert "norm weights: 100 % of trained changes are below bfloat16 resolution; --dtype float32 keeps them" in (
        caplog.text
    )
    assert summary["lost_changes"]["norm weights"] == 1.0
    assert summary["max_logit_diff"] > diff


def test_bfloat16_and_sharding(trained, tmp_path):
    tied, base, adapter, reference, _ = trained
    out = merge_adapter(base, adapter, tmp_path / "bf16", dtype="bfloat16", max_shard_size="20KB")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) is tied
    torch.testing.assert_close(logits(merged), reference, rtol=0.1, atol=0.1)  # bf16 rounding only


def test_adapter_without_config_keeps_base_rope(tmp_path):
    base = make_base(tmp_path / "base", tied=False)
    make_adapter(base, tmp_path / "adapter", with_config=False)
    out = merge_adapter(adapter=tmp_path / "adapter", output=tmp_path / "merged", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == POSITIONS
    assert config["rope_parameters"]["rope_type"] == "default"
    # rope_factor at merge time stretches it (as load_model_and_tokenizer's rope_factor does).
    out2 = merge_adapter(base, tmp_path / "adapter", tmp_path / "merged2", dtype="float32", rope_factor=2)
    config2 = json.loads((out2 / "config.json").read_text())
    assert (config2["max_position_embeddings"], config2["rope_parameters"]["factor"]) == (2 * POSITIONS, 2)
    # ... and so does `longlora merge --rope-factor`
    from longlora.cli import main

    main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged3"),
          "--rope-factor", "2"])
    config3 = json.loads((tmp_path / "merged3" / "config.json").read_text())
    assert (config3["max_position_embeddings"], config3["rope_scaling"]["factor"], config3["dtype"]) == (
        2 * POSITIONS, 2, "float32")


def test_adapter_of_another_hidden_size_is_refused(tmp_path):
    wide = make_base(tmp_path / "wide", tied=False, hidden=48)
    make_adapter(wide, tmp_path / "adapter", with_config=False)
    base = make_base(tmp_path / "base", tied=False)
    with pytest.raises(ValueError, match=r"does not fit the base model.*in_features 48, base has 32"):
        merge_adapter(base, tmp_path / "adapter", tmp_path / "out", dtype="float32")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_trained_config_of_another_architecture_is_refused(tmp_path):
    wide = make_base(tmp_path / "wide", tied=False, hidden=48)
    make_adapter(wide, tmp_path / "adapter")  # config.json says hidden_size 48
    base = make_base(tmp_path / "base", tied=False)
    with pytest.raises(ValueError, match=r"hidden_size 48 \(adapter\) vs 32 \(base\)"):
        merge_adapter(base, tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_with_added_tokens(tmp_path):
    """Training resized the (tied) embedding: the merged model has the trained vocabulary and the same logits."""
    base = make_base(tmp_path / "base", tied=True)
    reference = make_adapter(base, tmp_path / "adapter", resize_to=VOCAB + 2)
    assert json.loads((tmp_path / "adapter" / "config.json").read_text())["vocab_size"] == VOCAB + 2
    out = merge_adapter(adapter=tmp_path / "adapter", output=tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.get_input_embeddings().weight.shape[0] == VOCAB + 2
    assert json.loads((out / "config.json").read_text())["vocab_size"] == VOCAB + 2
    ids = torch.tensor([[1, 5, VOCAB, 9, VOCAB + 1]])  # the new tokens included
    torch.testing.assert_close(logits(merged, ids), logits(reference, ids), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    base = make_base(root / "base", tied=True)
    make_adapter(base, root / "adapter")
    return root / "adapter"


def test_existing_output_is_refused_unless_overwrite(small, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty.*overwrite"):
        merge_adapter(adapter=small, output=out)
    assert (out / "keep.txt").read_text() == "old"
    merge_adapter(adapter=small, output=out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    # An empty directory is fine without overwrite.
    (tmp_path / "empty").mkdir()
    merge_adapter(adapter=small, output=tmp_path / "empty")
    assert (tmp_path / "empty" / "config.json").is_file()


def test_output_holding_the_adapter_is_refused(small):
    with pytest.raises(ValueError, match="contains the input"):
        merge_adapter(adapter=small, output=small.parent, overwrite=True)
    assert (small / "adapter_config.json").is_file()


def test_failure_mid_write_leaves_no_output(small, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    real_save = PreTrainedModel.save_pretrained

    def save_then_crash(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)  # the shards are on disk, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(adapter=small, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too

    # With overwrite, a failed merge leaves the old output untouched.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.safetensors").write_text("previous model")
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(adapter=small, output=tmp_path / "old", overwrite=True)
    assert (tmp_path / "old" / "model.safetensors").read_text() == "previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "target"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("new")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "new"
    assert oct(target.stat().st_mode & 0o777) == "0o755"
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_missing_adapter_and_missing_base_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_adapter(adapter=tmp_path / "nope", output=tmp_path / "out")
    with pytest.raises(ValueError, match="adapter directory"):
        merge_adapter(output=tmp_path / "out")


def test_cmd_merge_reports_what_it_wrote(small, tmp_path, capsys):
    summary = cmd_merge(None, str(small), str(tmp_path / "out"), "float32", False)
    assert summary["max_position_embeddings"] == TRAINED_CONTEXT
    assert summary["rope_parameters"]["factor"] == 4
    assert summary["tie_word_embeddings"] is True
    assert "config.json" in summary["files"] and "tokenizer.json" in summary["files"]
    assert "merged model written to" in capsys.readouterr().out


def test_gguf_loaded_base_is_copied_out_of_its_quantizer_mark():
    """A GGUF base loads dequantised but marked quantized (save_pretrained refuses it): the merge copies it out."""
    from longlora.merge import _unquantized_copy

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tied=True)).eval()
    model.hf_quantizer = object()  # what a gguf_file= load leaves on the model
    model.config.quantization_config = {"quant_method": "gguf"}
    copy = _unquantized_copy(model)
    assert getattr(copy, "hf_quantizer", None) is None
    assert not hasattr(copy.config, "quantization_config")
    assert copy.lm_head.weight is copy.model.embed_tokens.weight
    assert not any(t.is_meta for t in list(copy.parameters()) + list(copy.buffers()))
    torch.testing.assert_close(logits(copy), logits(model))
