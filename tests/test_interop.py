"""A merged model read by the other consumers: transformers 4.x and llama.cpp's GGUF converter.

transformers 4.x ignores `rope_parameters`; it reads the legacy `rope_scaling` and top-level `rope_theta` that
`longlora merge` writes beside it. Both consumers run in a subprocess from their own install (`.ci/run` puts them
under .venv/interop/), so the main environment stays on transformers 5; the tests skip when they are missing:
  transformers 4.57: pip install --target .venv/interop/transformers4 --no-deps transformers==4.57.6 \
                     "huggingface_hub<1.0" "tokenizers<=0.23.0" requests ...   (or LONGLORA_TRANSFORMERS4=DIR)
  llama.cpp converter: convert_hf_to_gguf.py, conversion/ and gguf-py/ from the llama-cpp-python sdist in
                     .venv/interop/llama.cpp                                     (or LONGLORA_LLAMA_CPP=DIR)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from longlora.adapters import apply_lora_plus
from longlora.merge import merge_adapter
from longlora.rope import apply_position_interpolation

ROOT = Path(__file__).resolve().parents[1]
TRANSFORMERS4 = Path(os.environ.get("LONGLORA_TRANSFORMERS4", ROOT / ".venv" / "interop" / "transformers4"))
LLAMA_CPP = Path(os.environ.get("LONGLORA_LLAMA_CPP", ROOT / ".venv" / "interop" / "llama.cpp"))
POSITIONS = 64
CONTEXT = 4 * POSITIONS
SCALINGS = ("linear", "dynamic", "yarn", "llama3")


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer.json (BPE with byte fallback, '▁' for spaces), the kind llama.cpp's converter
    recognises without a pre-tokenizer hash; trained in milliseconds on a stdlib module."""
    import textwrap

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False)
    lines = Path(textwrap.__file__).read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator([line for line in lines if line.strip()], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def merged_model(root: Path, scaling: str) -> Path:
    """A tiny Llama (theta 5e5, 64 positions) extended x4 by `scaling`, a perturbed LoRA+ adapter on it, merged with
    `longlora merge`'s default options. Returns the merged directory."""
    tokenizer = llama_tokenizer()
    base_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=POSITIONS, rope_theta=5e5, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(base_config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    config = apply_position_interpolation(LlamaConfig.from_pretrained(root / "base"), CONTEXT, scaling=scaling)
    peft_model = apply_lora_plus(LlamaForCausalLM.from_pretrained(root / "base", config=config), rank=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(root / "adapter")
    config.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    return merge_adapter(adapter=root / "adapter", output=root / "merged")


def run_python(code: str, *, path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(path)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def logits_under_both(model_dir: Path, ids: torch.Tensor, transformers4: Path, cwd: Path,
                      report: str = "") -> tuple[torch.Tensor, torch.Tensor, str]:
    """(transformers 4's logits, transformers 5's logits, the subprocess's stdout) of `model_dir` on `ids` (1, T),
    float32; `report` is code run in the transformers-4 process after the forward (it sees `model`)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits5 = model(input_ids=ids).logits  # (1, T, V)
    code = (
        "import json, torch, transformers\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, torch_dtype=torch.float32)\n"
        "with torch.no_grad():\n"
        f"    logits = model(input_ids=torch.tensor({ids.tolist()})).logits\n"
        f"torch.save(logits, {str(cwd / 'logits4.pt')!r})\n"
        + report
    )
    result = run_python(code, path=transformers4, cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.load(cwd / "logits4.pt"), logits5, result.stdout


@pytest.fixture(scope="module")
def transformers4():
    if not (TRANSFORMERS4 / "transformers").is_dir():
        pytest.skip(f"transformers 4.x not installed in {TRANSFORMERS4} (.ci/run installs it)")
    probe = run_python("import transformers; print(transformers.__version__)", path=TRANSFORMERS4, cwd=ROOT)
    if probe.returncode != 0 or not probe.stdout.startswith("4."):
        pytest.skip(f"transformers 4.x in {TRANSFORMERS4} does not import: {probe.stderr[-300:]}")
    return TRANSFORMERS4


@pytest.mark.parametrize("scaling", SCALINGS)
def test_transformers4_gives_the_same_logits_as_transformers5(tmp_path, transformers4, scaling):
    merged = merged_model(tmp_path, scaling)
    # 200 tokens: past the original 64 positions, so every scaling (dynamic NTK included) is in effect.
    ids = torch.randint(3, 320, (1, 200), generator=torch.Generator().manual_seed(0))
    report = (
        f"tokenizer = AutoTokenizer.from_pretrained({str(merged)!r})\n"
        "c = model.config\n"
        "print(json.dumps({'version': transformers.__version__, 'rope_scaling': c.rope_scaling,"
        " 'rope_theta': c.rope_theta, 'tokens': tokenizer('hello world')['input_ids']}))\n"
    )
    logits4, logits5, stdout = logits_under_both(merged, ids, transformers4, tmp_path, report)
    seen = json.loads(stdout.strip().splitlines()[-1])
    assert seen["version"].startswith("4.")
    assert seen["rope_theta"] == 5e5
    assert seen["rope_scaling"]["rope_type"] == scaling and seen["rope_scaling"]["factor"] == 4
    assert seen["tokens"] == llama_tokenizer()("hello world")["input_ids"]
    diff = (logits4 - logits5).abs().max().item()
    print(f"{scaling}: transformers {seen['version']} vs 5: max |logit diff| {diff:.3g}")
    assert diff < 1e-5
    # The scaling matters at this length: without it the logits are far off (the check above is not vacuous).
    unscaled = LlamaForCausalLM.from_pretrained(merged, config=LlamaConfig.from_pretrained(tmp_path / "base"))
    with torch.no_grad():
        assert (unscaled(input_ids=ids).logits - logits5).abs().max() > 1e-3


@pytest.mark.parametrize(
    "arch,scaling", [("gemma3_text", "linear"), ("gpt_neox", "linear"), ("qwen3", "yarn"), ("mistral", "dynamic")]
)
def test_transformers4_reads_the_legacy_forms_of_other_architectures(tmp_path, transformers4, arch, scaling):
    """Gemma-3 (rope_local_base_freq + a rope_scaling for the global layers), GPT-NeoX (rotary_emb_base, rotary_pct)
    and the one-entry form on Qwen3 / Mistral: a saved, finalized checkpoint gives transformers 5's logits."""
    from longlora.modeling import finalize_saved_files
    from tiny_models import tiny_config

    config = apply_position_interpolation(tiny_config(arch), CONTEXT, scaling=scaling)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    finalize_saved_files(tmp_path / "model")
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    logits4, logits5, _ = logits_under_both(tmp_path / "model", ids, transformers4, tmp_path)
    diff = (logits4 - logits5).abs().max().item()
    print(f"{arch} {scaling}: transformers 4 vs 5: max |logit diff| {diff:.3g}")
    assert diff < 1e-5


@pytest.fixture(scope="module")
def llama_cpp_converter():
    script = LLAMA_CPP / "convert_hf_to_gguf.py"
    if not script.is_file():
        pytest.skip(f"llama.cpp's convert_hf_to_gguf.py not in {LLAMA_CPP} (.ci/run extracts it)")
    return script


@pytest.mark.parametrize("scaling", ["linear", "yarn", "llama3"])
def test_llama_cpp_gguf_carries_the_scaling(tmp_path, llama_cpp_converter, scaling):
    """The converter (run with transformers 4.57, as its requirements pin, when installed) writes the scaling type
    and factor for linear and yarn; llama3 becomes a rope_freqs tensor of per-frequency divisors, checked against
    transformers' own inverse frequencies. (llama.cpp has no dynamic NTK: the converter writes none for it.)"""
    merged = merged_model(tmp_path, scaling)
    gguf_path = tmp_path / "model.gguf"
    path = TRANSFORMERS4 if (TRANSFORMERS4 / "transformers").is_dir() else Path(os.pathsep.join(sys.path))
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['convert_hf_to_gguf.py', {str(merged)!r}, '--outfile', {str(gguf_path)!r}, '--outtype', 'f32']\n"
        f"sys.path.insert(0, {str(LLAMA_CPP)!r})\n"
        f"runpy.run_path({str(llama_cpp_converter)!r}, run_name='__main__')\n"
    )
    result = run_python(code, path=path, cwd=tmp_path)
    if result.returncode != 0 and "ModuleNotFoundError" in result.stderr:
        pytest.skip(f"the converter lacks a dependency: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-3000:]

    # llama.cpp's own gguf-py reads the file; it must not stay importable as `gguf` for later tests (a module left in
    # sys.modules makes `gguf` look installed, without package metadata)
    installed = {name: mod for name, mod in sys.modules.items() if name == "gguf" or name.startswith("gguf.")}
    sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.remove(str(LLAMA_CPP / "gguf-py"))
        for name in [n for n in sys.modules if n == "gguf" or n.startswith("gguf.")]:
            del sys.modules[name]
        sys.modules.update(installed)
    reader = GGUFReader(str(gguf_path))

    def field(name):
        f = reader.fields[name]
        value = f.parts[f.data[0]]
        return bytes(value).decode() if f.types[0].name == "STRING" else value[0].item()

    assert field("tokenizer.ggml.model") == "llama"
    assert field("llama.rope.freq_base") == 5e5
    assert field("llama.context_length") == CONTEXT
    if scaling in ("linear", "yarn"):
        assert field("llama.rope.scaling.type") == scaling
        assert field("llama.rope.scaling.factor") == 4
    if scaling == "yarn":
        assert field("llama.rope.scaling.original_context_length") == POSITIONS
    if scaling == "llama3":
        (freqs,) = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
        model = AutoModelForCausalLM.from_pretrained(merged)
        inv_freq = model.model.rotary_emb.inv_freq  # (head_dim / 2,)
        base = 1.0 / (5e5 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
        torch.testing.assert_close(torch.as_tensor(freqs.data.copy()).float(), base / inv_freq, rtol=1e-5, atol=0)
