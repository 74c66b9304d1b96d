"""Passkey prompt construction (length in tokens, depth), scoring, the run loop with stub generators, outputs."""

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from longlora.evaluate import build_passkey_prompt, cmd_eval_passkey, run_passkey, score_answer
from longlora.evaluate.passkey import FILLER, INSTRUCTION, KEY_LINE, QUESTION
from longlora.plots import plot_passkey_accuracy, plot_passkey_heatmap


def tiny_tokenizer():
    """Word-level tokenizer over the prompt's words, digits one token each, BOS prepended like Llama's."""
    words = sorted(set(re.findall(r"[A-Za-z]+", " ".join([INSTRUCTION, FILLER, KEY_LINE, QUESTION]))))
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "[UNK]", ".", "?", *map(str, range(10)), *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="<pad>"
    )


TOKENIZER = tiny_tokenizer()
FILLER_TOKENS = len(TOKENIZER(FILLER, add_special_tokens=False)["input_ids"])


def tiny_llama(positions=512):
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=positions, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def key_in(prompt):
    return int(re.search(r"The pass key is (\d+)\.", prompt).group(1))


@pytest.mark.parametrize("length", [120, 333, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_length_within_one_filler(length, depth):
    prompt, _ = build_passkey_prompt(TOKENIZER, length, depth, key=4213)
    n = len(TOKENIZER(prompt)["input_ids"])
    assert length - FILLER_TOKENS < n <= length
    assert prompt.startswith(INSTRUCTION) and prompt.endswith(QUESTION)
    assert prompt.count("4213") == 2


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_key_sits_at_requested_depth(depth):
    length, key = 2000, 31337
    prompt, position = build_passkey_prompt(TOKENIZER, length, depth, key)
    ids = TOKENIZER(prompt)["input_ids"]
    key_line = TOKENIZER(KEY_LINE.format(key=key), add_special_tokens=False)["input_ids"]
    assert ids[position : position + len(key_line)] == key_line  # the key line starts exactly there
    assert abs(position / length - depth) < 0.05


def test_prompt_arguments_are_checked():
    with pytest.raises(ValueError, match="depth"):
        build_passkey_prompt(TOKENIZER, 500, 1.5, 7)
    with pytest.raises(ValueError, match="key"):
        build_passkey_prompt(TOKENIZER, 500, 0.5, 50000)
    with pytest.raises(ValueError, match="shorter"):
        build_passkey_prompt(TOKENIZER, 20, 0.5, 7)


def test_score_answer():
    assert score_answer(" 4213. Remember it.", 4213)
    assert score_answer("4213", 4213)
    assert not score_answer(" 421", 4213)
    assert not score_answer(" 42130", 4213)
    assert not score_answer(" 4,213", 4213)
    assert not score_answer(" no idea", 4213)
    assert not score_answer(" 7 or 4213", 4213)  # the first integer counts


def test_run_passkey_with_stub_generators():
    lengths, depths = [150, 300], [0.0, 0.5, 1.0]
    right = run_passkey(None, TOKENIZER, lengths, depths, trials=3, seed=1,
                        generate_fn=lambda p: f" {key_in(p)}.", progress=False)
    assert right["accuracy"] == {"150": 1.0, "300": 1.0} and right["overall_accuracy"] == 1.0
    assert right["grid"] == [[1.0] * 3, [1.0] * 3]
    assert len(right["records"]) == 2 * 3 * 3
    keys = [r["key"] for r in right["records"]]
    assert all(1 <= k < 50000 for k in keys) and len(set(keys)) > 1
    assert all(r["prompt_tokens"] <= r["length"] for r in right["records"])

    wrong = run_passkey(None, TOKENIZER, lengths, depths, trials=3, seed=1,
                        generate_fn=lambda p: f" {key_in(p) + 1}.", progress=False)
    assert wrong["overall_accuracy"] == 0.0 and wrong["accuracy_by_depth"]["300"] == {"0": 0.0, "0.5": 0.0, "1": 0.0}
    assert [r["key"] for r in wrong["records"]] == keys  # same seed, same keys

    other = run_passkey(None, TOKENIZER, lengths, depths, trials=3, seed=2, generate_fn=lambda p: "", progress=False)
    assert [r["key"] for r in other["records"]] != keys

    # right only in the first half of depths: per-depth accuracy tells them apart
    half = run_passkey(None, TOKENIZER, [300], depths, trials=2, seed=0, progress=False,
                       generate_fn=lambda p: str(key_in(p)) if p.index("pass key is") < len(p) / 4 else "0")
    assert half["accuracy_by_depth"]["300"] == {"0": 1.0, "0.5": 0.0, "1": 0.0}
    assert half["accuracy"]["300"] == pytest.approx(1 / 3)


def test_run_passkey_with_tiny_model_greedy_decoding():
    model = tiny_llama()
    result = run_passkey(model, TOKENIZER, [100], [0.5], trials=2, seed=0, progress=False)
    assert 0.0 <= result["accuracy"]["100"] <= 1.0
    assert all(isinstance(r["answer"], str) for r in result["records"])
    with pytest.raises(ValueError, match="--rope-factor"):
        run_passkey(model, TOKENIZER, [1024], [0.5], trials=1, progress=False)


def test_plots_are_written(tmp_path):
    result = run_passkey(None, TOKENIZER, [150, 300, 600], [0.0, 0.5, 1.0], trials=2, seed=0, progress=False,
                         generate_fn=lambda p: str(key_in(p)) if len(p) < 1500 else "0")
    for plot, name in [(plot_passkey_heatmap, "heat.png"), (plot_passkey_accuracy, "acc.png")]:
        path = plot(result, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc.png", "heat.png"]


def test_cmd_eval_passkey_writes_json_and_plots(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "model")
    TOKENIZER.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval" / "passkey.json"
    result = cmd_eval_passkey(f"tiny={tmp_path / 'model'}", lengths=[100, 160], depths=[0.0, 1.0], trials=1, seed=3,
                              output=out, device="cpu", progress=False)
    saved = json.loads(out.read_text())
    assert saved["lengths"] == [100, 160] and saved["label"] == "tiny"
    assert saved["records"] == json.loads(json.dumps(result["records"]))
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "passkey.json", "passkey_accuracy.png", "passkey_heatmap.png"
    ]


# ---------------------------------------------------------------------------------------------- code template


@pytest.fixture(scope="module")
def code_tokenizer():
    """A small byte-level BPE (any source text round-trips), like the embedded model's."""
    from longlora.embedded import train_tokenizer

    return train_tokenizer(["def f(x):\n    return x + 1\n", "PASSKEY = 12345\nassert PASSKEY == 12345\n"], 300)


def code_key_in(prompt):
    return int(re.search(r"^PASSKEY = (\d{5})$", prompt, re.MULTILINE).group(1))


def _tokens(tokenizer, text):
    return tokenizer(text, verbose=False)["input_ids"]


@pytest.mark.parametrize("length", [200, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_code_prompt_is_held_out_source_with_the_key_line_at_depth(code_tokenizer, length, depth):
    from longlora.evaluate.passkey import CODE_QUESTION, _compose_code, build_code_passkey_prompt, code_filler_lines

    lines, start, key = code_filler_lines(), 5000, 48213
    prompt, position = build_code_passkey_prompt(code_tokenizer, length, depth, key, start)
    ids = _tokens(code_tokenizer, prompt)
    assert len(ids) <= length
    # the largest filler that fits: the key line and question removed, the rest is lines start.. of held-out source
    assert prompt.endswith("\n" + CODE_QUESTION) and prompt.count("PASSKEY = 48213\n") == 1
    filler = prompt.replace("PASSKEY = 48213\n", "", 1)[: -len(CODE_QUESTION)]
    n = len(filler.splitlines())
    assert filler == "".join(lines[start : start + n])
    assert len(_tokens(code_tokenizer, _compose_code(lines, start, n + 1, round((n + 1) * depth), key)[0])) > length
    # the key line starts at the returned token and after round(n * depth) filler lines
    assert code_tokenizer.decode(ids[position:]).startswith("PASSKEY = 48213\n")
    assert len(prompt[: prompt.index("PASSKEY = ")].splitlines()) == round(n * depth)


def test_code_filler_is_the_held_out_split_only():
    from longlora.embedded import stdlib_split, stdlib_texts
    from longlora.evaluate.passkey import code_filler_lines

    heldout = "".join(t if t.endswith("\n") else t + "\n" for t in stdlib_texts("heldout"))
    assert "".join(code_filler_lines()) == heldout
    train, held = stdlib_split()
    assert set(train).isdisjoint(held)


def test_code_prompt_arguments_are_checked(code_tokenizer):
    from longlora.evaluate.passkey import build_code_passkey_prompt

    with pytest.raises(ValueError, match="key must be in"):
        build_code_passkey_prompt(code_tokenizer, 500, 0.5, 4213)  # four digits
    with pytest.raises(ValueError, match="depth"):
        build_code_passkey_prompt(code_tokenizer, 500, -0.1, 12345)
    with pytest.raises(ValueError, match="shorter"):
        build_code_passkey_prompt(code_tokenizer, 5, 0.5, 12345)
    with pytest.raises(ValueError, match="unknown passkey template"):
        run_passkey(None, code_tokenizer, [200], [0.5], template="english", generate_fn=str, progress=False)


def test_run_passkey_code_template_with_stub_generators(code_tokenizer):
    lengths, depths = [200, 400], [0.0, 0.5, 1.0]
    right = run_passkey(None, code_tokenizer, lengths, depths, trials=2, seed=1, template="code",
                        generate_fn=lambda p: f" {code_key_in(p)}\n", progress=False)
    assert right["template"] == "code" and right["overall_accuracy"] == 1.0 and right["grid"] == [[1.0] * 3] * 2
    records = right["records"]
    assert all(10000 <= r["key"] < 100000 for r in records) and len({r["key"] for r in records}) > 1
    assert all(r["prompt_tokens"] <= r["length"] for r in records)
    wrong = run_passkey(None, code_tokenizer, lengths, depths, trials=2, seed=1, template="code",
                        generate_fn=lambda p: f" {code_key_in(p) // 10}\n", progress=False)
    assert wrong["overall_accuracy"] == 0.0 and [r["key"] for r in wrong["records"]] == [r["key"] for r in records]
    # the paper template stays the default, with its own prompt
    paper = run_passkey(None, TOKENIZER, [150], [0.5], trials=1, generate_fn=lambda p: f" {key_in(p)}.", progress=False)
    assert paper["template"] == "paper" and paper["overall_accuracy"] == 1.0


def test_cli_eval_passkey_code_template(tmp_path, code_tokenizer):
    from longlora.cli import main

    config = LlamaConfig(
        vocab_size=len(code_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=code_tokenizer.eos_token_id, pad_token_id=code_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    code_tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "code.json"
    assert main(["eval", "passkey", "--model", str(tmp_path / "model"), "--template", "code", "--lengths", "128,256",
                 "--depths", "0,1", "--trials", "1", "--device", "cpu", "--output", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["template"] == "code" and saved["lengths"] == [128, 256] and len(saved["records"]) == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == ["code_accuracy.png", "code_heatmap.png"]
