"""QLoRA (`--quantization 4bit`) on the CPU: bitsandbytes >= 0.49 has CPU kernels for its NF4 layers.

A tiny Llama trains on a 4-bit base (fp32 run: the CPU default; and a bf16 run), saves a float32 adapter, resumes
from a checkpoint to the uninterrupted run's adapter, and merges onto the *dequantized* base: the merged model's
logits are the 4-bit model + adapter's (eval mode, full attention), not those of the full-precision base + adapter.
Without a usable bitsandbytes, `longlora train --quantization 4bit` stops with one line saying what to install.
"""

import json
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from longlora.cli import main as cli_main
from longlora.config import TrainConfig, load_config
from longlora.quantization import check_bitsandbytes
from longlora.checkpoints import SUMMARY, latest_complete_checkpoint
from longlora.config import RUN_CONFIG
from longlora.train import run_training
from test_train import StopAt
from tiny_models import LAYERS, save_tiny_model, stdlib_corpus


def _bitsandbytes_problem() -> str | None:
    try:
        check_bitsandbytes("cpu")
    except ValueError as error:
        return str(error)
    return None


needs_bitsandbytes = pytest.mark.skipif(_bitsandbytes_problem() is not None,
                                        reason=f"no 4-bit bitsandbytes on CPU: {_bitsandbytes_problem()}")

RUN = dict(context_length=128, max_steps=4, save_steps=2, per_device_train_batch_size=1,
           gradient_accumulation_steps=2, learning_rate=3e-3, warmup_steps=1, logging_steps=1, seed=7, max_blocks=8,
           quantization="4bit")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _args(ws, out, **overrides) -> list[str]:
    options = dict(RUN, model=ws / "base", data=ws / "corpus", output_dir=out)
    options.update(overrides)
    args = []
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


class Inspect(TrainerCallback):
    """The training model as the Trainer starts (its 4-bit layers, parameter dtypes) and the dtype of the hidden
    states entering each decoder layer in the first step."""

    def __init__(self):
        self.layer_inputs, self._hooks = [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import bitsandbytes as bnb
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.parameters = {name: (p.dtype, p.requires_grad) for name, p in model.named_parameters()}
        self.linear4bit = {name: (m.weight.quant_type, m.compute_dtype, m.support_avx512bf16_for_cpu)
                           for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        for layer in (m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)):
            self._hooks.append(layer.register_forward_pre_hook(
                lambda module, a, kw: self.layer_inputs.append((a[0] if a else kw["hidden_states"]).dtype),
                with_kwargs=True))

    def on_step_end(self, args, state, control, **kwargs):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []




@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny Llama, a corpus (in `root`) and the uninterrupted 4-bit runs the tests look at, fp32 (the CPU default)
    and bf16, with what `Inspect` saw of them."""
    if _bitsandbytes_problem() is not None:
        pytest.skip(_bitsandbytes_problem())
    root = tmp_path_factory.mktemp("qlora")
    save_tiny_model(root / "base", "llama")
    stdlib_corpus(root / "corpus", n_files=2)
    inspect, inspect_bf16 = Inspect(), Inspect()
    run_training(load_config(TrainConfig, _args(root, root / "straight", bf16="false")), callbacks=[inspect])
    run_training(load_config(TrainConfig, _args(root, root / "straight-bf16", bf16="true")), callbacks=[inspect_bf16])
    return SimpleNamespace(root=root, inspect=inspect, inspect_bf16=inspect_bf16)


def _expected_quantized(prefix: str = "base_model.model.") -> set[str]:
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    return {f"{prefix}model.layers.{i}.{'self_attn' if p in attention else 'mlp'}.{p}" + (
        ".base_layer" if p in attention else "") for i in range(LAYERS) for p in PROJECTIONS}


@needs_bitsandbytes
def test_a_4bit_run_trains_lora_plus_over_nf4_projections_on_the_cpu(ws):
    inspect = ws.inspect
    # every attention and MLP projection is an NF4 layer computing in float32 (an fp32 run), CPU repacking off
    assert set(inspect.linear4bit) == _expected_quantized()
    assert set(inspect.linear4bit.values()) == {("nf4", torch.float32, False)}
    trainable = {name for name, (_, grad) in inspect.parameters.items() if grad}
    assert sum(".lora_" in n for n in trainable) == LAYERS * 4 * 2
    assert {n for n in trainable if ".lora_" not in n} == {
        "base_model.model.model.embed_tokens.modules_to_save.default.weight",
        "base_model.model.model.norm.modules_to_save.default.weight",
        *(f"base_model.model.model.layers.{i}.{norm}.modules_to_save.default.weight"
          for i in range(LAYERS) for norm in ("input_layernorm", "post_attention_layernorm"))}
    out = ws.root / "straight"
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["steps"] == 4 and summary["last_loss"] < summary["first_loss"]
    saved = load_file(out / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert yaml.safe_load((out / RUN_CONFIG).read_text())["quantization"] == "4bit"
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["dtype"] == "float32"
    assert recorded["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert recorded["quantization_config"]["bnb_4bit_compute_dtype"] == "float32"


@needs_bitsandbytes
def test_a_bf16_4bit_run_computes_in_bf16_with_fp32_trainables(ws):
    inspect, out = ws.inspect_bf16, ws.root / "straight-bf16"
    assert set(inspect.linear4bit.values()) == {("nf4", torch.bfloat16, False)}
    for name, (dtype, grad) in inspect.parameters.items():
        if grad:
            assert dtype == torch.float32, name
        elif dtype.is_floating_point:  # lm_head and the frozen originals of the embedding and norms
            assert dtype == torch.bfloat16, name
    assert inspect.layer_inputs == [torch.bfloat16] * LAYERS * RUN["gradient_accumulation_steps"]  # first step
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float32}
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_compute_dtype"] == (
        "bfloat16")


@needs_bitsandbytes
@pytest.mark.parametrize("bf16", ["false", "true"], ids=["fp32", "bf16"])
def test_a_resumed_4bit_run_ends_with_the_uninterrupted_adapter(ws, tmp_path, bf16):
    """Bit for bit on CPU; in the bf16 run also the float32 embed/norm copies come back from the checkpoint."""
    out = tmp_path / "interrupted"
    run_training(load_config(TrainConfig, _args(ws.root, out, bf16=bf16)), callbacks=[StopAt(2)])
    assert latest_complete_checkpoint(out).endswith("checkpoint-2")
    run_training(load_config(TrainConfig, _args(ws.root, out, bf16=bf16, resume="auto")))
    straight = ws.root / ("straight" if bf16 == "false" else "straight-bf16")
    assert (out / "adapter_model.safetensors").read_bytes() == (straight / "adapter_model.safetensors").read_bytes()
    a, b = (json.loads((d / SUMMARY).read_text()) for d in (out, straight))
    a.pop("seconds"), b.pop("seconds")
    assert a == b and a["steps"] == 4


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@needs_bitsandbytes
def test_merge_goes_onto_the_dequantized_base(ws, tmp_path):
    """The merged model computes what the 4-bit base + adapter computed in training, not full precision + adapter."""
    from peft import PeftModel

    from longlora.merge import merge_and_check
    from longlora.modeling import resolve_checkpoint
    from longlora.quantization import keep_4bit_layers_unpacked, qlora_quantization_config

    adapter = ws.root / "straight"
    _, report = merge_and_check(adapter=adapter, output=tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in written and written["dtype"] == "float32"
    assert {type(m).__name__ for n, m in merged.named_modules() if n.endswith(PROJECTIONS)} == {"Linear"}

    # the reference: the training model's 4-bit base (same quantization, loaded in the run's dtype) + the adapter
    config = resolve_checkpoint(None, adapter).config  # the trained config, without its quantization mark
    quantized = AutoModelForCausalLM.from_pretrained(ws.root / "base", config=config, dtype=torch.float32,
                                                     quantization_config=qlora_quantization_config(torch.float32))
    assert keep_4bit_layers_unpacked(quantized) == LAYERS * len(PROJECTIONS)
    reference = PeftModel.from_pretrained(quantized, adapter).eval()
    full_precision = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(ws.root / "base", config=config, dtype=torch.float32), adapter).eval()
    ids = torch.randint(3, 300, (1, 100), generator=torch.Generator().manual_seed(0))
    expected = _logits(reference, ids)
    assert (_logits(merged, ids) - expected).abs().max() < 1e-5
    assert report.max_logit_diff < 1e-5
    # the originals give other logits: the check above would fail for a merge onto them
    assert (_logits(full_precision, ids) - expected).abs().max() > 1e-2

    # eval / ask load the same base under the adapter
    from longlora.modeling import load_model_and_tokenizer

    evaluated, _ = load_model_and_tokenizer(adapter, dtype="float32", device="cpu")
    assert (_logits(evaluated, ids) - expected).abs().max() < 1e-5


@needs_bitsandbytes
def test_a_damaged_record_of_the_quantization_is_a_clear_error(ws, tmp_path):
    import shutil

    from longlora.merge import merge_adapter

    adapter = tmp_path / "adapter"
    shutil.copytree(ws.root / "straight", adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    values = json.loads((adapter / "config.json").read_text())
    del values["quantization_config"]
    (adapter / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match="trained on a 4-bit base .* does not record the quantization"):
        merge_adapter(adapter=adapter, output=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.fixture
def plain_ws(tmp_path):
    save_tiny_model(tmp_path / "base", "llama")
    stdlib_corpus(tmp_path / "corpus", n_files=1)
    return tmp_path


def test_without_bitsandbytes_4bit_is_a_one_line_error(plain_ws, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    out = plain_ws / "out"
    assert cli_main(["train", *_args(plain_ws, out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bitsandbytes >= 0.49" in err and "pip install 'longlora[qlora]'" in err and "\n" not in err
    assert not out.exists()


@needs_bitsandbytes
def test_bitsandbytes_without_a_backend_for_the_device_is_a_one_line_error(plain_ws, monkeypatch, capsys):
    import bitsandbytes.functional

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'bitsandbytes::quantize_4bit' with arguments from the 'CPU' backend")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", no_kernel)
    out = plain_ws / "out"
    assert cli_main(["train", *_args(plain_ws, out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no 4-bit backend for cpu" in err and "pip install -U 'longlora[qlora]'" in err and "\n" not in err
    assert not out.exists()
