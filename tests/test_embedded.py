"""The embedded base model: corpus split, tokenizer, a tiny build, determinism, atomic cache."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longlora import embedded, embedded_shipping
from longlora.embedded import (
    EMBEDDED_VERSION,
    EXCLUDED_DIRS,
    METADATA_FILE,
    EmbeddedConfig,
    build_base_model,
    stdlib_split,
    stdlib_texts,
    train_tokenizer,
)
from longlora.embedded_shipping import SHIPPED_DIR, cached_model_path, embedded_model_path, is_built

# A build small enough for a unit test: 8 training files, a 1-layer model, 3 steps of 2 x 32 tokens.
TINY = EmbeddedConfig(
    vocab_size=320,
    hidden_size=16,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    context_length=32,
    batch_size=2,
    warmup_steps=1,
    threads=1,
    max_train_files=8,
    heldout_windows=4,
)
build_tiny = functools.partial(build_base_model, steps=3, config=TINY, progress=False)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


def _leftovers(directory: Path, keep: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != keep)


# ------------------------------------------------------------------------------------------------------ corpus


def test_split_is_deterministic_sorted_and_disjoint():
    train, heldout = stdlib_split()
    assert (train, heldout) == stdlib_split()
    assert train == sorted(train) and heldout == sorted(heldout)
    assert not set(train) & set(heldout)
    assert len(train) > 200
    assert 0.02 < len(heldout) / (len(train) + len(heldout)) < 0.10  # ~5%
    for path in train + heldout:
        assert path.endswith(".py") and not path.startswith("/") and "\\" not in path
        assert not set(Path(path).parts[:-1]) & EXCLUDED_DIRS
    # membership is a function of the relative path alone (not of the machine or the install location)
    assert all(embedded._is_heldout(p) for p in heldout) and not any(embedded._is_heldout(p) for p in train)


def test_split_pins_known_modules():
    train, heldout = stdlib_split()
    assert "ast.py" in heldout and "textwrap.py" in heldout and "unittest/case.py" in heldout
    assert "os.py" in train and "argparse.py" in train
    assert not any(p.startswith(("tkinter/", "idlelib/", "encodings/")) for p in train + heldout)


def test_stdlib_texts_match_the_split():
    train, heldout = stdlib_split()
    texts = stdlib_texts("heldout")
    assert len(texts) == len(heldout)
    assert texts[heldout.index("ast.py")] == (embedded.stdlib_root() / "ast.py").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="split must be one of"):
        stdlib_texts("validation")


# --------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_python_source():
    tokenizer = train_tokenizer(stdlib_texts("train")[:20], vocab_size=512)
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0
    assert tokenizer.pad_token_id == 1 and tokenizer.bos_token_id == 0
    source = stdlib_texts("heldout")[0] + '\n\tdef f(x):\n        return "héllo → 世界"  # tabs, UTF-8\n'
    ids = tokenizer(source, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == source  # byte level: exact, indentation and non-ASCII included
    assert len(ids) < len(source.encode()) / 1.5  # merges were learnt: fewer tokens than bytes
    # EOS is one token and never produced by text that merely looks like code
    assert tokenizer("x = 1<|endoftext|>", add_special_tokens=False)["input_ids"][-1] == 0


def test_tokenizer_training_is_deterministic():
    texts = stdlib_texts("train")[:10]
    first, second = train_tokenizer(texts, 400), train_tokenizer(texts, 400)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


# ------------------------------------------------------------------------------------------------------- build


def test_tiny_build_writes_a_loadable_model(tiny_build):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in tiny_build.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", METADATA_FILE} <= names
    assert _leftovers(tiny_build.parent, keep=tiny_build.name) == []  # the temporary build directory is gone

    model = AutoModelForCausalLM.from_pretrained(tiny_build)
    tokenizer = AutoTokenizer.from_pretrained(tiny_build)
    assert model.config.model_type == "llama"
    assert json.loads((tiny_build / METADATA_FILE).read_text())["device"] == "cpu"  # build_base_model(device=...)
    assert model.config.max_position_embeddings == 32
    assert model.config.rope_parameters["rope_theta"] == 10000.0
    assert model.config.num_key_value_heads == 1 and model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tokenizer) == 320
    assert model.config.eos_token_id == tokenizer.eos_token_id == 0
    assert model.config.pad_token_id == tokenizer.pad_token_id == 1

    ids = tokenizer("import os\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 320) and torch.isfinite(logits).all()

    meta = json.loads((tiny_build / METADATA_FILE).read_text())
    assert meta["version"] == EMBEDDED_VERSION and meta["seed"] == 0 and meta["steps"] == 3
    assert meta["tokens_seen"] == 3 * 2 * 32
    assert meta["corpus"]["train_files"] == 8
    assert meta["corpus"]["heldout_paths"] == stdlib_split()[1]
    assert meta["recipe"]["hidden_size"] == 16
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())
    assert 4.0 < meta["final_train_loss"] < 7.0  # about ln(320) = 5.77 after 3 steps
    assert 50 < meta["heldout_perplexity@32"] < 1000


def test_two_builds_with_the_same_seed_are_identical(tiny_build, tmp_path):
    again = build_tiny(tmp_path / "again")
    first, second = load_file(tiny_build / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert (tiny_build / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    other = load_file(build_tiny(tmp_path / "other", seed=1) / "model.safetensors")
    assert any(not torch.equal(other[name], first[name]) for name in first)  # the seed matters


def test_build_refuses_a_non_empty_directory_unless_overwrite(tiny_build, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_tiny(target)
    assert (target / "notes.txt").read_text() == "mine"
    build_tiny(target, overwrite=True)
    assert is_built(target) and not (target / "notes.txt").exists()
    assert _leftovers(tmp_path, keep="taken") == []


def test_build_restores_the_callers_thread_count(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        path = build_tiny(tmp_path / "m")  # TINY builds with 1 thread
        assert torch.get_num_threads() == 2
        assert json.loads((path / METADATA_FILE).read_text())["threads"] == 1
    finally:
        torch.set_num_threads(before)
    assert 1 <= embedded.default_threads() <= torch.get_num_threads()


def test_config_checks():
    with pytest.raises(ValueError, match="divisible by num_kv_heads"):
        EmbeddedConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="hidden_size"):
        EmbeddedConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        EmbeddedConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        build_base_model("unused", steps=0)


# ------------------------------------------------------------------------------------------------------- cache


def test_cache_builds_once_under_its_version(tmp_path, monkeypatch):
    calls = []

    def counting_build(*args, **kwargs):
        calls.append(args)
        return build_tiny(*args, **{k: v for k, v in kwargs.items() if k != "progress"})

    monkeypatch.setattr(embedded_shipping, "build_base_model", counting_build)
    path = cached_model_path(tmp_path, progress=False)
    assert path == tmp_path / f"embedded-{EMBEDDED_VERSION}" and is_built(path)
    assert cached_model_path(tmp_path, progress=False) == path
    assert len(calls) == 1  # the second call found the finished build

    monkeypatch.setenv("LONGLORA_CACHE", str(tmp_path))
    assert cached_model_path(progress=False) == path and len(calls) == 1


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_pretrain", interrupted)
    monkeypatch.setattr(embedded_shipping, "build_base_model", build_tiny)
    with pytest.raises(KeyboardInterrupt):
        cached_model_path(tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # no half model, no temporary directory


def test_cache_keeps_the_build_of_a_process_that_finished_first(tmp_path, monkeypatch):
    real_pretrain = embedded._pretrain
    target = tmp_path / f"embedded-{EMBEDDED_VERSION}"
    raced = []

    def racing(*args, **kwargs):
        if not raced:  # while this build trains, "another process" publishes its own
            raced.append(True)
            build_tiny(target, seed=5)
        return real_pretrain(*args, **kwargs)

    monkeypatch.setattr(embedded, "_pretrain", racing)
    monkeypatch.setattr(embedded_shipping, "build_base_model", build_tiny)
    assert cached_model_path(tmp_path, progress=False) == target
    assert json.loads((target / METADATA_FILE).read_text())["seed"] == 5  # the first finished build is kept
    assert list(tmp_path.iterdir()) == [target]  # and ours left no temporary directory


# ----------------------------------------------------------------------------------------------------- threads


def test_default_threads_are_the_cores_torch_sees_whatever_the_load(monkeypatch):
    monkeypatch.setattr("os.getloadavg", lambda: (64.0, 64.0, 64.0), raising=False)
    assert embedded.default_threads() == torch.get_num_threads()


# ----------------------------------------------------------------------------------------------------- shipped


def _shipped_metadata() -> dict:
    return json.loads((SHIPPED_DIR / METADATA_FILE).read_text())


def test_embedded_model_path_is_the_shipped_copy_of_the_current_recipe(tmp_path):
    from dataclasses import asdict

    assert is_built(SHIPPED_DIR)
    assert embedded_model_path(tmp_path, progress=False) == SHIPPED_DIR
    assert list(tmp_path.iterdir()) == []  # nothing built
    meta = _shipped_metadata()
    recipe = {k: v for k, v in asdict(EmbeddedConfig()).items() if k != "threads"}
    assert {k: v for k, v in meta["recipe"].items() if k != "threads"} == recipe
    assert meta["version"] == EMBEDDED_VERSION and meta["shipped_dtype"] == "float16" and meta["seed"] == 0
    tensors = load_file(SHIPPED_DIR / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert sum(t.numel() for t in tensors.values()) == meta["parameters"]


def test_shipped_weights_load_as_float32_with_the_builds_perplexity():
    """float16 storage costs no quality: the held-out perplexity at 256 matches the one the build measured in
    float32 (same windows) within 1 %."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SHIPPED_DIR, dtype="auto")
    assert model.dtype == torch.float32 and model.config.max_position_embeddings == 256
    meta = _shipped_metadata()
    ppl = embedded_shipping.heldout_perplexity(SHIPPED_DIR, 256, max_windows=meta["recipe"]["heldout_windows"])
    assert ppl == pytest.approx(meta["heldout_perplexity@256"], rel=0.01)


def test_rebuild_builds_into_the_cache_and_replaces_an_earlier_one(tmp_path, monkeypatch):
    calls = []

    def counting_build(path, **kwargs):
        calls.append(path)
        return build_tiny(path, overwrite=kwargs["overwrite"], seed=len(calls))

    monkeypatch.setattr(embedded_shipping, "build_base_model", counting_build)
    target = tmp_path / f"embedded-{EMBEDDED_VERSION}"
    assert embedded_model_path(tmp_path, progress=False, rebuild=True) == target
    assert embedded_model_path(tmp_path, progress=False, rebuild=True) == target
    assert len(calls) == 2 and json.loads((target / METADATA_FILE).read_text())["seed"] == 2
    assert embedded_model_path(tmp_path, progress=False) == SHIPPED_DIR  # without rebuild: the shipped copy


def test_rebuild_without_muon_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    with pytest.raises(ValueError, match=r"torch >= 2.9.*without --rebuild-base"):
        embedded_model_path(tmp_path, progress=False, rebuild=True)
    assert list(tmp_path.iterdir()) == []


def test_ship_model_stores_float16_and_matches_its_build(tiny_build, tmp_path):
    shipped = embedded_shipping.ship_model(tiny_build, tmp_path / "shipped")
    assert is_built(shipped)
    assert (shipped / "tokenizer.json").read_bytes() == (tiny_build / "tokenizer.json").read_bytes()
    assert {t.dtype for t in load_file(shipped / "model.safetensors").values()} == {torch.float16}
    assert embedded_shipping.shipped_weights_match(tiny_build, shipped)
    assert not embedded_shipping.shipped_weights_match(build_tiny(tmp_path / "other", seed=1), shipped)
    with pytest.raises(FileNotFoundError, match="no complete embedded build"):
        embedded_shipping.ship_model(tmp_path, tmp_path / "x")


def _recipe_on_shipped_threads():
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("the recipe needs torch.optim.Muon (torch >= 2.9)")
    return EmbeddedConfig(threads=_shipped_metadata()["threads"])


@pytest.mark.slow
def test_the_recipe_starts_the_way_the_shipped_base_started(tmp_path):
    """The committed recipe's tokenizer is the shipped one byte for byte, and its first 31 steps (of the 300-step
    schedule) retrace the shipped build's recorded loss curve within 0.5 % (measured: within 0.06 % on another CPU
    than the build's, where float reductions split differently; seed 1 instead of 0 is off by up to 7 %). ~2
    minutes; the whole rebuild (~15 minutes) is the next test, run with LONGLORA_FULL_REBUILD=1."""
    config = _recipe_on_shipped_threads()
    curve = _shipped_metadata()["train_loss_curve"]
    every = max(1, config.steps // 50)  # build_base_model records every `every`-th loss
    with embedded._torch_threads(config.threads):
        tokenizer, stream, model = embedded.recipe_start(config, stdlib_texts("train"), seed=0)
        losses = embedded._pretrain(model, stream, config, config.steps, seed=0, progress=False, stop_after=31)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (SHIPPED_DIR / "tokenizer.json").read_bytes()
    retraced = [round(x, 4) for x in losses[::every]]
    assert len(retraced) == 6 and retraced[0] > retraced[-1] + 1.0  # six points, and the model learns
    assert retraced == pytest.approx(curve[: len(retraced)], rel=0.005)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LONGLORA_FULL_REBUILD"), reason="the whole 15-minute rebuild: set "
                    "LONGLORA_FULL_REBUILD=1 (the test above checks the recipe's first 31 steps)")
def test_rebuilding_from_the_recipe_reproduces_the_shipped_base(tmp_path):
    """The committed recipe makes the shipped weights: bitwise (same torch, CPU kind and thread count), else within
    1 % held-out perplexity at 256. Built with the shipped build's thread count: float reductions split across
    threads differently, so another count gives other weights (2 threads instead of 1: perplexity 43.71 vs 43.27).
    ~15 minutes on CPU (the whole 300-step pretraining on one thread)."""
    config = _recipe_on_shipped_threads()
    rebuilt = build_base_model(tmp_path / "rebuilt", progress=False, config=config)
    assert (rebuilt / "tokenizer.json").read_bytes() == (SHIPPED_DIR / "tokenizer.json").read_bytes()
    if not embedded_shipping.shipped_weights_match(rebuilt, SHIPPED_DIR):
        meta = _shipped_metadata()
        ppl = json.loads((rebuilt / METADATA_FILE).read_text())["heldout_perplexity@256"]
        assert ppl == pytest.approx(meta["heldout_perplexity@256"], rel=0.01)
