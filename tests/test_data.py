"""Tests for longlora.data: corpora -> token blocks, SFT records -> masked examples, collators.

Tokenizers are tiny byte-level BPEs trained here in milliseconds (no downloads); every dataset cache goes to tmp_path.
"""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, default_data_collator
from transformers.masking_utils import find_packed_sequence_indices

from longlora.data import (
    IGNORE_INDEX,
    SFTStats,
    build_sft_dataset,
    build_sft_example,
    load_documents,
    load_sft_records,
    sft_collator,
    tokenize_and_block,
)

_TRAINING_TEXT = [
    "the quick brown fox jumps over the lazy dog. " * 3,
    "Summarise the paper. What is the answer? Paris is the capital of France.",
    "hello world 12345 def main(): return 0",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_tokenizer(*, bos: bool = False, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE (exact round trip of any text) with <pad>=0, <s>=1, </s>=2.

    bos=True adds a post-processor that puts <s> in front, as Llama's tokenizer does.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


DOCS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world",
    "Paris is the capital of France. " * 4,
    "",  # empty documents are skipped
    "def main(): return 12345",
    "the lazy dog sleeps",
]


def expected_stream(tokenizer, docs) -> list[int]:
    """Every non-empty document's ids followed by EOS, joined."""
    stream = []
    for doc in docs:
        if doc:
            stream += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    return stream


# --------------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------------


def test_concat_blocks_are_the_eos_joined_stream_cut_into_context_length(tokenizer, tmp_path):
    context_length = 16
    stream = expected_stream(tokenizer, DOCS)
    num_blocks = len(stream) // context_length
    assert num_blocks >= 3 and len(stream) % context_length > 0  # the corpus leaves a tail to drop

    blocks = tokenize_and_block(
        datasets.Dataset.from_dict({"text": DOCS}), tokenizer, context_length, cache_dir=tmp_path
    )

    assert blocks.column_names == ["input_ids", "labels"]
    assert len(blocks) == num_blocks
    assert all(len(row) == context_length for row in blocks["input_ids"])
    assert blocks["labels"] == blocks["input_ids"]
    flat = [t for row in blocks["input_ids"] for t in row]
    assert flat == stream[: num_blocks * context_length]  # order kept, tail dropped
    assert len(flat) + len(stream) % context_length == len(stream)  # every token is in a block or in the tail
    # EOS sits exactly after each document: 5 non-empty documents, the tail holds whatever EOS are past the blocks.
    assert flat.count(tokenizer.eos_token_id) == stream[: len(flat)].count(tokenizer.eos_token_id)
    assert stream.count(tokenizer.eos_token_id) == 5
    # Cached in cache_dir (in-memory input: the tokenised documents and the blocks are written there).
    assert blocks.cache_files and all(str(tmp_path) in f["filename"] for f in blocks.cache_files)
    # Without cache_dir, in-memory documents give in-memory blocks, the same ones.
    in_memory = tokenize_and_block(datasets.Dataset.from_dict({"text": DOCS}), tokenizer, context_length)
    assert in_memory.cache_files == [] and in_memory["input_ids"] == blocks["input_ids"]


def test_documents_keep_the_tokenizers_bos_and_end_with_eos(tmp_path):
    tokenizer = tiny_tokenizer(bos=True)
    docs = ["hello world", "the lazy dog", "Paris is the capital of France."]
    stream = expected_stream(tokenizer, docs)
    assert stream[0] == tokenizer.bos_token_id
    blocks = tokenize_and_block(datasets.Dataset.from_dict({"text": docs}), tokenizer, 8, cache_dir=tmp_path)
    flat = [t for row in blocks["input_ids"] for t in row]
    assert flat == stream[: len(flat)]
    # "<s> hello world </s> <s> the lazy dog </s> ..." : each EOS is followed by the next document's BOS.
    eos_positions = [i for i, t in enumerate(flat[:-1]) if t == tokenizer.eos_token_id]
    assert eos_positions and all(flat[i + 1] == tokenizer.bos_token_id for i in eos_positions)


def test_documents_packing_restarts_positions_at_each_document(tokenizer, tmp_path):
    context_length = 16
    docs_ds = datasets.Dataset.from_dict({"text": DOCS})
    concat = tokenize_and_block(docs_ds, tokenizer, context_length, cache_dir=tmp_path)
    packed = tokenize_and_block(docs_ds, tokenizer, context_length, packing="documents", cache_dir=tmp_path)

    assert packed.column_names == ["input_ids", "labels", "position_ids"]
    assert packed["input_ids"] == concat["input_ids"]  # same blocks, only positions and labels differ
    # Document starts in the joined stream: 0 and every token after an EOS.
    stream = [t for row in packed["input_ids"] for t in row]
    is_start = [i == 0 or stream[i - 1] == tokenizer.eos_token_id for i in range(len(stream))]
    for b, row in enumerate(packed):
        starts = is_start[b * context_length : (b + 1) * context_length]
        expected_positions, position = [], 0
        for i, start in enumerate(starts):
            position = 0 if (start or i == 0) else position + 1
            expected_positions.append(position)
        assert row["position_ids"] == expected_positions
        assert row["labels"] == [IGNORE_INDEX if s else t for s, t in zip(starts, row["input_ids"])]
    # Some block holds a document start after its first token, so the restart is really exercised.
    assert any(0 in row[1:] for row in packed["position_ids"])

    # default_data_collator stacks the position ids, and transformers sees the packed documents in them.
    batch = default_data_collator([packed[b] for b in range(len(packed))])
    assert batch["position_ids"].shape == (len(packed), context_length)
    assert batch["labels"].dtype == torch.int64
    segments = find_packed_sequence_indices(batch["position_ids"])
    expected_segments = (batch["position_ids"] == 0).cumsum(dim=1) - 1
    assert torch.equal(segments, expected_segments)


@pytest.mark.parametrize("packing", ["concat", "documents"])
def test_streaming_gives_the_same_blocks(tokenizer, tmp_path, packing):
    docs_ds = datasets.Dataset.from_dict({"text": DOCS * 3})
    blocks = tokenize_and_block(docs_ds, tokenizer, 12, packing=packing, cache_dir=tmp_path)
    streamed = tokenize_and_block(docs_ds.to_iterable_dataset(), tokenizer, 12, packing=packing)
    assert isinstance(streamed, datasets.IterableDataset)
    assert list(streamed) == list(blocks)
    assert list(streamed) == list(blocks)  # a second pass starts afresh


def test_streaming_blocks_across_tokenisation_batches(tokenizer, monkeypatch):
    # More documents than one tokenisation batch: the carry-over between batches must not lose or repeat tokens.
    monkeypatch.setattr("longlora.data.blocks._BATCH", 4)
    docs = [f"hello world {i}" for i in range(23)]
    streamed = list(tokenize_and_block(datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset(), tokenizer, 10))
    stream = expected_stream(tokenizer, docs)
    assert [t for row in streamed for t in row["input_ids"]] == stream[: len(stream) // 10 * 10]


def test_short_corpus_raises_with_the_numbers(tokenizer, tmp_path):
    docs = ["hello world", "the lazy dog"]
    total = len(expected_stream(tokenizer, docs))
    with pytest.raises(ValueError, match=rf"{total} tokens \(2 documents.*context_length=4096"):
        tokenize_and_block(datasets.Dataset.from_dict({"text": docs}), tokenizer, 4096, cache_dir=tmp_path)
    streamed = tokenize_and_block(datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset(), tokenizer, 4096)
    with pytest.raises(ValueError, match=rf"{total} tokens.*context_length=4096"):
        list(streamed)


def test_block_arguments_are_checked(tokenizer):
    docs = datasets.Dataset.from_dict({"text": DOCS})
    with pytest.raises(ValueError, match="packing must be one of"):
        tokenize_and_block(docs, tokenizer, 16, packing="sorted")
    with pytest.raises(ValueError, match="context_length"):
        tokenize_and_block(docs, tokenizer, 0)
    with pytest.raises(ValueError, match="'text' column"):
        tokenize_and_block(datasets.Dataset.from_dict({"body": DOCS}), tokenizer, 16)
    no_eos = tiny_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="no eos_token"):
        tokenize_and_block(docs, no_eos, 16)


# --------------------------------------------------------------------------------------------------------------------
# Loading documents
# --------------------------------------------------------------------------------------------------------------------


def test_load_documents_from_a_directory_recursive_sorted_one_per_file(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "b" / "deep").mkdir(parents=True)
    (corpus / ".git").mkdir()
    (corpus / "z.txt").write_text("last file")
    (corpus / "a.md").write_text("# first\n\nwith two paragraphs\n")
    (corpus / "b" / "deep" / "code.py").write_text("def f():\n    return 1\n")
    (corpus / ".hidden.txt").write_text("hidden")
    (corpus / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (corpus / "b" / "blob.bin").write_bytes(b"\x00\x01\x02binary")

    docs = load_documents(corpus, cache_dir=tmp_path / "cache")
    assert docs.column_names == ["text"]
    assert docs["text"] == ["# first\n\nwith two paragraphs\n", "def f():\n    return 1\n", "last file"]
    streamed = load_documents(corpus, streaming=True)
    assert [row["text"] for row in streamed] == docs["text"]

    single = load_documents(corpus / "a.md", cache_dir=tmp_path / "cache")
    assert single["text"] == ["# first\n\nwith two paragraphs\n"]

    # An edited file is read again (the cache key covers sizes and modification times).
    (corpus / "z.txt").write_text("last file, edited")
    assert load_documents(corpus, cache_dir=tmp_path / "cache")["text"][-1] == "last file, edited"


def test_load_documents_from_records_with_a_named_field(tmp_path):
    rows = [{"id": i, "content": f"document number {i}"} for i in range(3)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    json_array = tmp_path / "docs.json"
    json_array.write_text(json.dumps(rows))
    parquet = tmp_path / "docs.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))

    for path in (jsonl, json_array, parquet):
        docs = load_documents(path, text_field="content", cache_dir=tmp_path / "cache")
        assert docs.column_names == ["text"]
        assert docs["text"] == [r["content"] for r in rows]
        with pytest.raises(ValueError, match=r"no field 'text'.*\['id', 'content'\]"):
            load_documents(path, cache_dir=tmp_path / "cache")
    streamed = load_documents(jsonl, text_field="content", streaming=True, cache_dir=tmp_path / "cache")
    assert [r["text"] for r in streamed] == [r["content"] for r in rows]
    with pytest.raises(ValueError, match="holds .*not text"):
        load_documents(jsonl, text_field="id", cache_dir=tmp_path / "cache")

    # A directory of only JSONL files is read as records.
    (tmp_path / "shards").mkdir()
    for i in range(2):
        (tmp_path / "shards" / f"part-{i}.jsonl").write_text(json.dumps({"text": f"shard {i}"}) + "\n")
    assert load_documents(tmp_path / "shards", cache_dir=tmp_path / "cache")["text"] == ["shard 0", "shard 1"]


def test_load_documents_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        load_documents(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no such file or directory"):
        load_documents("./not/there")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        load_documents(tmp_path / "empty_dir")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        load_documents(tmp_path / "empty.jsonl")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        load_documents(tmp_path / "empty.txt")


def test_text_that_is_not_utf8_is_counted_and_warned_about(tmp_path, caplog):
    """Latin-1 text trains (each bad byte becomes U+FFFD), but not without a word: the warning names file and count."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    latin1 = "Café au lait, crème brûlée, naïve façade. " * 10
    (corpus / "latin1.txt").write_bytes(latin1.encode("latin-1"))
    (corpus / "utf8.txt").write_text(latin1, encoding="utf-8")
    # the independent count: bytes of the Latin-1 text that are not ASCII (none of them starts valid UTF-8 here)
    expected = sum(b >= 0x80 for b in latin1.encode("latin-1"))
    with caplog.at_level("WARNING", logger="longlora.data.corpus"):
        docs = load_documents(corpus, cache_dir=tmp_path / "cache")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert str(corpus / "latin1.txt") in warnings[0] and f"{expected} byte(s) are not valid UTF-8" in warnings[0]
    replaced, intact = docs["text"]  # files in path order
    assert replaced.count("\ufffd") == expected and intact == latin1
    caplog.clear()
    with caplog.at_level("WARNING", logger="longlora.data.corpus"):
        load_documents(corpus / "utf8.txt", cache_dir=tmp_path / "cache")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_broken_json_records_name_the_line(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 3 is not valid JSON"):
        load_documents(tmp_path / "broken.jsonl", cache_dir=tmp_path / "cache")
    (tmp_path / "broken.json").write_text('[{"instruction": "a", "output": "b"},\n {"instruction": }]')
    with pytest.raises(ValueError, match=r"broken\.json: line 2 is not valid JSON"):
        load_sft_records(tmp_path / "broken.json", cache_dir=tmp_path / "cache")


def test_load_documents_hub_name_and_saved_dataset(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config, kwargs))
        if name == "org/broken":
            raise ConnectionError("hub unreachable")
        return datasets.Dataset.from_dict({"body": ["a", "b"], "meta": [1, 2]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = load_documents("org/corpus", text_field="body", split="validation", dataset_config="en")
    assert docs["text"] == ["a", "b"]
    assert calls[0][:2] == ("org/corpus", "en") and calls[0][2]["split"] == "validation"
    with pytest.raises(ValueError, match=r"no field 'text'.*\['body', 'meta'\]"):
        load_documents("org/corpus")
    with pytest.raises(ValueError, match="org/broken.*hub unreachable"):
        load_documents("org/broken")

    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["x", "y"]})}).save_to_disk(str(saved))
    assert load_documents(saved, split="test")["text"] == ["x", "y"]
    with pytest.raises(ValueError, match=r"no split 'train'.*\['test'\]"):
        load_documents(saved)


def test_documents_from_files_to_blocks_end_to_end(tokenizer, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [d for d in DOCS if d]
    for i, text in enumerate(texts):
        (corpus / f"{i:02d}.txt").write_text(text)
    cache = tmp_path / "cache"
    blocks = tokenize_and_block(load_documents(corpus, cache_dir=cache), tokenizer, 16, cache_dir=cache)
    streamed = tokenize_and_block(load_documents(corpus, streaming=True), tokenizer, 16)
    stream = expected_stream(tokenizer, texts)
    assert [t for row in blocks["input_ids"] for t in row] == stream[: len(stream) // 16 * 16]
    assert list(streamed) == list(blocks)


# --------------------------------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------------------------------

RECORD = {"instruction": "What is the capital of France?", "input": "France is a country.", "output": "Paris."}
RECORD_NO_INPUT = {"instruction": "Say hello to the world.", "output": "hello world"}


def answer_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def prompt_text(tokenizer, example) -> str:
    n_prompt = sum(1 for t in example["labels"] if t == IGNORE_INDEX)
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt  # the masked part is one prefix
    return tokenizer.decode(example["input_ids"][:n_prompt])


@pytest.mark.parametrize("template", ["llama2", "alpaca", "chat_template"])
@pytest.mark.parametrize("record", [RECORD, RECORD_NO_INPUT], ids=["with_input", "no_input"])
def test_sft_labels_are_exactly_the_answer_and_eos(template, record):
    tokenizer = tiny_tokenizer(chat_template=CHAT_TEMPLATE)
    example = build_sft_example(record, tokenizer, 1024, prompt_template=template)
    assert example["num_truncated_tokens"] == 0
    assert len(example["input_ids"]) == len(example["labels"])
    assert answer_text(tokenizer, example) == record["output"] + "</s>"
    prompt = prompt_text(tokenizer, example)
    user = record["instruction"] + ("\n" + record["input"] if "input" in record else "")
    expected = {
        "llama2": f"[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.\n<</SYS>>\n\n{user} [/INST]",
        "chat_template": f"<|user|>\n{user}\n<|assistant|>\n",
    }
    if template in expected:
        assert prompt == expected[template]
    else:
        assert prompt.startswith("Below is an instruction that describes a task")
        assert f"### Instruction:\n{record['instruction']}\n\n" in prompt and prompt.endswith("### Response:")
        assert ("### Input:\nFrance is a country." in prompt) == ("input" in record)


def test_sft_auto_template_and_bos():
    with_chat = tiny_tokenizer(chat_template=CHAT_TEMPLATE)
    assert prompt_text(with_chat, build_sft_example(RECORD, with_chat, 512)).startswith("<|user|>")
    llama_like = tiny_tokenizer(bos=True)
    example = build_sft_example(RECORD, llama_like, 512)
    assert example["input_ids"][0] == llama_like.bos_token_id
    assert prompt_text(llama_like, example).startswith("<s>[INST] <<SYS>>")
    assert answer_text(llama_like, example) == "Paris.</s>"
    with pytest.raises(ValueError, match="no chat template"):
        build_sft_example(RECORD, llama_like, 512, prompt_template="chat_template")
    with pytest.raises(ValueError, match="prompt_template must be one of"):
        build_sft_example(RECORD, llama_like, 512, prompt_template="vicuna")


LONG_RECORD = {  # LongAlpaca's shape: the paper and the question inside the instruction, no input
    "instruction": "Below is a paper. Memorize it and answer my question after the paper.\n The paper begins.\n"
    + "the quick brown fox jumps over the lazy dog. " * 40
    + "\n Now the paper ends.\n What does the fox do?",
    "output": "The fox jumps over the lazy dog.",
}


@pytest.mark.parametrize("template", ["llama2", "alpaca", "chat_template"])
def test_sft_material_truncation_keeps_question_closing_and_answer(template):
    tokenizer = tiny_tokenizer(chat_template=CHAT_TEMPLATE)
    full = build_sft_example(LONG_RECORD, tokenizer, 100_000, prompt_template=template)
    context_length = len(full["input_ids"]) // 2
    example = build_sft_example(LONG_RECORD, tokenizer, context_length, prompt_template=template)

    assert len(example["input_ids"]) <= context_length
    assert len(example["input_ids"]) >= context_length - 4  # cut only as much as needed
    assert example["num_truncated_tokens"] > 0
    assert answer_text(tokenizer, example) == LONG_RECORD["output"] + "</s>"
    prompt = prompt_text(tokenizer, example)
    assert "Below is a paper. Memorize it" in prompt  # the head of the material
    assert "Now the paper ends.\n What does the fox do?" in prompt  # the question at its tail
    closing = {"llama2": " [/INST]", "alpaca": "\n\n### Response:", "chat_template": "\n<|assistant|>\n"}[template]
    assert prompt.endswith(closing)


def test_sft_truncation_of_the_input_field_and_drop_mode():
    tokenizer = tiny_tokenizer()
    long_input = dict(RECORD, input="Paris is the capital of France. " * 50)
    short = RECORD_NO_INPUT
    too_long_answer = dict(RECORD_NO_INPUT, output="hello world " * 100)
    records = [long_input, short, too_long_answer]

    cut = build_sft_example(long_input, tokenizer, 120, prompt_template="llama2")
    assert len(cut["input_ids"]) <= 120 and cut["num_truncated_tokens"] > 0
    assert prompt_text(tokenizer, cut).startswith(
        "[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.\n<</SYS>>\n\n"
        "What is the capital of France?\nParis is the capital"
    )  # the instruction is whole; the input keeps its head and tail
    assert build_sft_example(long_input, tokenizer, 120, prompt_template="llama2", truncation="drop") is None
    assert build_sft_example(too_long_answer, tokenizer, 120, prompt_template="llama2") is None

    dataset, stats = build_sft_dataset(records, tokenizer, 120, prompt_template="llama2")
    assert stats == SFTStats(kept=2, truncated=1, dropped=1)
    assert dataset.column_names == ["input_ids", "labels"]
    assert all(len(ids) <= 120 for ids in dataset["input_ids"])
    assert answer_text(tokenizer, dataset[1]) == short["output"] + "</s>"

    dataset, stats = build_sft_dataset(records, tokenizer, 120, prompt_template="llama2", truncation="drop")
    assert stats == SFTStats(kept=1, truncated=0, dropped=2)
    assert str(stats) == "kept 1 SFT examples (0 truncated), dropped 2"
    with pytest.raises(ValueError, match="none of the 1 SFT records fits context_length=8"):
        build_sft_dataset([RECORD], tokenizer, 8, prompt_template="llama2")


def test_sft_chat_messages_records():
    tokenizer = tiny_tokenizer(chat_template=CHAT_TEMPLATE)
    single = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    }
    example = build_sft_example(single, tokenizer, 512, prompt_template="chat_template")
    assert (
        prompt_text(tokenizer, example)
        == "<|system|>\nBe brief.\n<|user|>\nWhat is the capital of France?\n<|assistant|>\n"
    )
    assert answer_text(tokenizer, example) == "Paris.</s>"
    example = build_sft_example(single, tokenizer, 512, prompt_template="llama2")
    assert (
        prompt_text(tokenizer, example)
        == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST]"
    )

    multi = {
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello world"},
            {"role": "user", "content": "Say it again."},
            {"role": "assistant", "content": "hello world"},
        ]
    }
    example = build_sft_example(multi, tokenizer, 512, prompt_template="chat_template")
    assert prompt_text(tokenizer, example) == (
        "<|user|>\nhello\n<|assistant|>\nhello world\n<|user|>\nSay it again.\n<|assistant|>\n"
    )  # earlier turns are context: only the last answer is learned
    assert answer_text(tokenizer, example) == "hello world</s>"
    with pytest.raises(ValueError, match="multi-turn"):
        build_sft_example(multi, tokenizer, 512, prompt_template="llama2")
    with pytest.raises(ValueError, match="end with a user turn then the assistant"):
        build_sft_example({"messages": multi["messages"][:3]}, tokenizer, 512)
    with pytest.raises(ValueError, match="role"):
        build_sft_example({"messages": [{"role": "robot", "content": "x"}]}, tokenizer, 512)

    dataset, stats = build_sft_dataset([single, multi], tokenizer, 512)
    assert stats == SFTStats(kept=2, truncated=0, dropped=0)


def test_load_sft_records(tmp_path):
    records = [RECORD, RECORD_NO_INPUT, LONG_RECORD]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name in ("alpaca.json", "alpaca.jsonl"):
        loaded = load_sft_records(tmp_path / name, cache_dir=tmp_path / "cache")
        assert len(loaded) == 3
        assert loaded[0]["output"] == "Paris." and loaded[1]["input"] is None
    dataset, stats = build_sft_dataset(loaded, tiny_tokenizer(), 4096, prompt_template="alpaca")
    assert stats.kept == 3 and [answer_text(tiny_tokenizer(), row) for row in dataset][1] == "hello world</s>"

    (tmp_path / "chat.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n"
    )
    assert (
        load_sft_records(tmp_path / "chat.jsonl", cache_dir=tmp_path / "cache")[0]["messages"][1]["content"] == "hello"
    )

    (tmp_path / "missing.json").write_text(json.dumps([RECORD, {"instruction": "no answer here"}]))
    with pytest.raises(ValueError, match="record 1 has no 'output'"):
        load_sft_records(tmp_path / "missing.json", cache_dir=tmp_path / "cache")
    (tmp_path / "wrong.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"need 'instruction' and 'output'.*\['prompt', 'completion'\]"):
        load_sft_records(tmp_path / "wrong.jsonl", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="no such file"):
        load_sft_records(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="has no 'output'"):
        build_sft_example({"instruction": "x"}, tiny_tokenizer(), 64)


def test_sft_packing_collator_restarts_positions_and_masks_record_starts(tokenizer):
    examples = [build_sft_example(r, tokenizer, 512, prompt_template="llama2") for r in (RECORD, RECORD_NO_INPUT)]
    lengths = [len(e["input_ids"]) for e in examples]
    batch = sft_collator(tokenizer)(examples)

    assert batch["input_ids"].shape == (1, sum(lengths))  # one padding-free row
    assert batch["input_ids"][0].tolist() == examples[0]["input_ids"] + examples[1]["input_ids"]
    assert batch["position_ids"][0].tolist() == list(range(lengths[0])) + list(range(lengths[1]))
    labels = batch["labels"][0].tolist()
    # Each record's first label is -100 (the previous record's last token does not learn to predict it); the
    # answers stay unmasked.
    assert labels[0] == IGNORE_INDEX and labels[lengths[0]] == IGNORE_INDEX
    assert labels == examples[0]["labels"] + [IGNORE_INDEX] + examples[1]["labels"][1:]
    assert "attention_mask" not in batch

    padded = sft_collator(tokenizer, packing=False)(examples)
    assert padded["input_ids"].shape == (2, max(lengths))
    assert padded["labels"][1, lengths[1] :].eq(IGNORE_INDEX).all()
    assert padded["attention_mask"].sum(dim=1).tolist() == lengths
    no_pad = tiny_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        sft_collator(no_pad, packing=False)


def test_evaluation_text_and_documents_that_are_not_utf8_are_warned_about(tmp_path, caplog):
    """eval perplexity's text files and `ask`'s material read invalid bytes as U+FFFD, with the same warning as
    training text (file and count), not silently."""
    from longlora.evaluate.perplexity import load_token_stream
    from longlora.generate import read_material

    latin1 = "Café au lait, crème brûlée, naïve façade. " * 10
    path = tmp_path / "latin1.txt"
    path.write_bytes(latin1.encode("latin-1"))
    expected = sum(b >= 0x80 for b in latin1.encode("latin-1"))

    class ByteTokenizer:
        eos_token_id = 0

        def __call__(self, text, **kwargs):
            return {"input_ids": list(text.encode("utf-8"))}

    for read in (lambda: read_material(path), lambda: load_token_stream(path, ByteTokenizer())):
        caplog.clear()
        with caplog.at_level("WARNING", logger="longlora.data.corpus"):
            read()
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and str(path) in warnings[0], warnings
        assert f"{expected} byte(s) are not valid UTF-8" in warnings[0]
    assert read_material(path).count("\ufffd") == expected
