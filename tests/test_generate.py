"""ask / chat: prompts (chat template or Llama-2 [INST]), material files, streaming, the over-length warning, the
multi-turn loop with its reused KV cache, and the CLI functions on a saved tiny model."""

import io
import sys
import types

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from longlora.generate import (
    ContextLengthWarning,
    PromptCache,
    ask,
    build_prompt,
    chat,
    cmd_ask,
    cmd_chat,
    context_warning,
    generate_answer,
    read_material,
    render_conversation,
)

POSITIONS = 160
WORDS = (
    "below is some material read it and answer my question after the begins now ends you are a helpful respectful "
    "honest assistant sky blue grass green sun yellow what colour of how many"
).split()
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat_template=None):
    """Word-level tokenizer over the prompt's words plus [INST]-form punctuation; BOS prepended like Llama's."""
    specials = ["<pad>", "<s>", "</s>", "[UNK]", "<|user|>", "<|assistant|>", "<|end|>"]
    punctuation = ["[", "]", "[/", "<<", ">>", "<</", ".", "?", "INST", "SYS"]
    vocab = {w: i for i, w in enumerate(specials + punctuation + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="<pad>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


TOKENIZER = tiny_tokenizer()
VOCAB = len(TOKENIZER)


def tiny_llama():
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=POSITIONS, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[2].zero_()  # keep the random model from stopping at once: EOS logit 0
        model.lm_head.weight[2] -= 1.0
    return model


MODEL = tiny_llama()
MATERIAL = "the sky is blue . the grass is green . the sun is yellow ."
QUESTION = "what colour is the sky ?"


class Chunks(io.StringIO):
    """An output stream that records each write, to see the answer arrive in pieces."""

    def __init__(self):
        super().__init__()
        self.chunks = []

    def write(self, text):
        self.chunks.append(text)
        return super().write(text)


def test_llama2_prompt_when_the_tokenizer_has_no_chat_template():
    prompt = build_prompt(TOKENIZER, MATERIAL, QUESTION)
    assert prompt.startswith("[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.\n<</SYS>>\n\n")
    assert prompt.endswith(f"Now the material ends.\n{QUESTION} [/INST]")
    assert MATERIAL in prompt
    assert build_prompt(TOKENIZER, MATERIAL, QUESTION, template="llama2") == prompt


def test_chat_template_is_used_when_present():
    tokenizer = tiny_tokenizer(SIMPLE_CHAT_TEMPLATE)
    prompt = build_prompt(tokenizer, MATERIAL, QUESTION)
    assert prompt.startswith("<|user|> Below is some material.") and prompt.endswith("<|end|> <|assistant|>")
    assert MATERIAL in prompt and QUESTION in prompt
    assert build_prompt(tokenizer, MATERIAL, QUESTION, template="llama2").startswith("[INST] <<SYS>>")
    with pytest.raises(ValueError, match="no chat template"):
        build_prompt(TOKENIZER, MATERIAL, QUESTION, template="chat_template")
    with pytest.raises(ValueError, match="unknown prompt template"):
        build_prompt(TOKENIZER, MATERIAL, QUESTION, template="vicuna")


def test_llama2_multi_turn_form():
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"},
    ]
    text = render_conversation(TOKENIZER, messages, "llama2")
    assert text.endswith("first [/INST] one </s><s>[INST] second [/INST]")
    assert text.count("<<SYS>>") == 1
    with pytest.raises(ValueError, match="alternates user / assistant"):
        render_conversation(TOKENIZER, messages[:2], "llama2")  # ends with the assistant


def test_read_material_text_and_errors(tmp_path):
    (tmp_path / "doc.md").write_text("# Title\nthe sky is blue\n")
    assert read_material(tmp_path / "doc.md") == "# Title\nthe sky is blue\n"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_material(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text"):
        read_material(tmp_path / "empty.txt")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01binary")
    with pytest.raises(ValueError, match="binary"):
        read_material(tmp_path / "blob.bin")


def test_read_pdf_without_pypdf_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.4")
    monkeypatch.setitem(sys.modules, "pypdf", None)  # import pypdf raises ImportError
    with pytest.raises(ImportError, match="pip install pypdf"):
        read_material(tmp_path / "paper.pdf")


def test_read_pdf_joins_the_pages(tmp_path, monkeypatch):
    class Page:
        def __init__(self, text):
            self.text = text

        def extract_text(self):
            return self.text

    class PdfReader:
        def __init__(self, path):
            assert path.endswith("paper.pdf")
            self.pages = [Page("page one "), Page(None), Page("page three")]

    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.4")
    monkeypatch.setitem(sys.modules, "pypdf", types.SimpleNamespace(PdfReader=PdfReader))
    assert read_material(tmp_path / "paper.pdf") == "page one\n\n\n\npage three"


def test_ask_streams_the_answer_and_returns_it(monkeypatch):
    """Pieces of the answer are written while the model is still generating. (The random model's greedy answer
    is 2 tokens then EOS; how transformers' TextStreamer splits so short an answer into writes changed between
    5.17 and 5.24, so EOS is suppressed for a 12-token answer and the test counts forward passes, not writes.)"""
    monkeypatch.setattr(MODEL.generation_config, "suppress_tokens", [TOKENIZER.eos_token_id])
    forwards = []
    hook = MODEL.register_forward_pre_hook(lambda module, args: forwards.append(1))
    out = Chunks()
    seen_at = []  # forward passes done when each non-empty piece was written
    out.write = lambda text, write=out.write: (text and seen_at.append(len(forwards)), write(text))[1]
    try:
        answer = ask(MODEL, TOKENIZER, MATERIAL, QUESTION, max_new_tokens=12, out=out)
    finally:
        hook.remove()
    assert len(answer.split()) == 12 and len(forwards) == 12  # prefill + 11 decoding steps, KV cache
    assert len(seen_at) >= 3 and seen_at[0] <= 3 < len(forwards)  # the first word came out at the start
    assert out.getvalue().strip() == answer
    # Greedy by default: the same answer again, and the one plain greedy decoding gives.
    assert ask(MODEL, TOKENIZER, MATERIAL, QUESTION, max_new_tokens=12, stream=False) == answer
    ids = TOKENIZER(build_prompt(TOKENIZER, MATERIAL, QUESTION), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = MODEL.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert TOKENIZER.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True).strip() == answer


def test_greedy_ignores_the_models_sampling_defaults(monkeypatch):
    """A chat model's generation_config may ask for sampling (Llama-2 chat: temperature 0.6); 0 is greedy."""
    greedy = ask(MODEL, TOKENIZER, MATERIAL, QUESTION, max_new_tokens=8, stream=False)
    for name, value in {"do_sample": True, "temperature": 50.0, "top_p": 0.5, "top_k": 3}.items():
        monkeypatch.setattr(MODEL.generation_config, name, value)
    for seed in range(3):
        torch.manual_seed(seed)
        assert ask(MODEL, TOKENIZER, MATERIAL, QUESTION, max_new_tokens=8, stream=False) == greedy


def test_sampling_depends_on_the_seed():
    answers = set()
    for seed in range(4):
        torch.manual_seed(seed)
        answers.add(ask(MODEL, TOKENIZER, MATERIAL, QUESTION, max_new_tokens=8, temperature=5.0, top_p=1.0,
                        stream=False))
    assert len(answers) > 1
    with pytest.raises(ValueError, match="top_p"):
        ask(MODEL, TOKENIZER, MATERIAL, QUESTION, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        ask(MODEL, TOKENIZER, MATERIAL, QUESTION, temperature=-1.0)


def test_prompt_over_the_context_warns_with_the_token_count_and_still_runs(capsys):
    material = " ".join([MATERIAL] * 12)  # ~170 tokens of material alone, over the 160 positions
    n = len(TOKENIZER(build_prompt(TOKENIZER, material, QUESTION))["input_ids"])
    assert n > POSITIONS
    with pytest.warns(ContextLengthWarning, match=rf"the prompt is {n} tokens, {n - POSITIONS} tokens more than"):
        answer = ask(MODEL, TOKENIZER, material, QUESTION, max_new_tokens=4, stream=False)
    assert answer  # not truncated, not refused
    assert f"warning: the prompt is {n} tokens, {n - POSITIONS} tokens more" in capsys.readouterr().err


def test_prompt_plus_answer_over_the_context_warns():
    n = len(TOKENIZER(build_prompt(TOKENIZER, MATERIAL, QUESTION))["input_ids"])
    room = POSITIONS - n
    with pytest.warns(ContextLengthWarning, match=rf"plus up to {room + 5} new tokens is 5 tokens more"):
        ask(MODEL, TOKENIZER, MATERIAL, QUESTION, max_new_tokens=room + 5, stream=False)
    assert context_warning(n, room, POSITIONS) is None


def test_chat_keeps_the_conversation_and_reuses_the_cache():
    tokenizer = tiny_tokenizer(SIMPLE_CHAT_TEMPLATE)
    run = []  # tokens each forward pass runs through the model

    def record(module, args, kwargs):
        run.append(kwargs["input_ids"].shape[1])

    hook = MODEL.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        messages = chat(MODEL, tokenizer, MATERIAL, [QUESTION, "  ", "how many colour ?"], max_new_tokens=6,
                        stream=False)
    finally:
        hook.remove()
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert MATERIAL in messages[0]["content"] and messages[2]["content"] == "how many colour ?"
    # The second turn ran only its new tokens (the material was not encoded again) ...
    second_prompt = len(tokenizer(render_conversation(tokenizer, messages[:3]), add_special_tokens=False)["input_ids"])
    prefills = [n for n in run if n > 1]
    assert len(prefills) == 2 and prefills[1] < second_prompt - 40
    # ... and gave the answer decoding the second prompt from scratch gives.
    fresh = generate_answer(MODEL, tokenizer, messages[:3], max_new_tokens=6, stream=False)
    assert messages[3]["content"] == fresh


def test_prompt_cache_reuses_the_shared_prefix():
    tokenizer = tiny_tokenizer(SIMPLE_CHAT_TEMPLATE)
    cache = PromptCache()
    first = [{"role": "user", "content": QUESTION}]
    answer = generate_answer(MODEL, tokenizer, first, max_new_tokens=5, stream=False, cache=cache)
    held_ids = cache.ids.clone()  # the prompt and the answer but its last token
    prompt_length = len(tokenizer(render_conversation(tokenizer, first), add_special_tokens=False)["input_ids"])
    assert held_ids.shape[1] == cache.past.get_seq_length() > prompt_length
    follow_up = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "why ?"}]
    ids = tokenizer(render_conversation(tokenizer, follow_up), add_special_tokens=False,
                    return_tensors="pt")["input_ids"]
    past = cache.reusable(ids)
    reused = past.get_seq_length()
    assert prompt_length <= reused <= held_ids.shape[1]  # the whole first prompt (and what of the answer matches)
    assert torch.equal(ids[0, :reused], held_ids[0, :reused])
    assert ids.shape[1] > reused
    # A prompt sharing nothing with the cache reuses nothing.
    cache.keep(past, held_ids[:, :reused])
    assert cache.reusable(torch.tensor([[44, 45, 46]])) is None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    MODEL.save_pretrained(path)
    TOKENIZER.save_pretrained(path)
    (path / "material.txt").write_text(MATERIAL)
    return path


def test_cmd_ask_end_to_end(model_dir):
    out = Chunks()
    answer = cmd_ask(str(model_dir), None, str(model_dir / "material.txt"), QUESTION, max_new_tokens=8,
                     dtype="float32", out=out)
    assert answer and out.getvalue().strip() == answer
    with pytest.raises(ValueError, match="question"):
        cmd_ask(str(model_dir), None, str(model_dir / "material.txt"), "  ")
    with pytest.raises(FileNotFoundError):
        cmd_ask(str(model_dir), None, str(model_dir / "nope.txt"), QUESTION)


def test_cmd_chat_reads_questions_until_exit(model_dir):
    questions = io.StringIO(f"{QUESTION}\n\nhow many colour ?\nexit\nnever asked\n")
    out = Chunks()
    messages = cmd_chat(str(model_dir), None, str(model_dir / "material.txt"), max_new_tokens=5, dtype="float32",
                        input=questions, out=out)
    assert [m["content"] for m in messages if m["role"] == "user"][1:] == ["how many colour ?"]
    assert len(messages) == 4
    for answer in (messages[1]["content"], messages[3]["content"]):
        assert answer in out.getvalue()
    # End of input ends the chat too.
    messages = cmd_chat(str(model_dir), None, str(model_dir / "material.txt"), max_new_tokens=3, dtype="float32",
                        input=io.StringIO(QUESTION), out=io.StringIO())
    assert len(messages) == 2
