"""`longlora serve`: the document chat behind the page (refusal with exact numbers, truncation, streaming equal to
`ask`, KV cache reuse, stop), its HTTP API through gradio_client, and a real browser (headless Chromium driven by
Playwright) that pastes a document, asks, and reads the streamed answer.

The API and browser tests skip when Gradio / gradio_client / Playwright / a system Chromium are missing.
"""

from __future__ import annotations

import html
import os
import shutil
import socket
import threading
import time

import pytest
import torch
from test_generate import MATERIAL, QUESTION, tiny_llama, tiny_tokenizer

from longlora.generate import ask, cmd_ask
from longlora.serve import DocumentChat, Refused, ServeLimits

TOKENIZER = tiny_tokenizer()
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def long_answer_model(positions: int = 160):
    """The tiny model of test_generate (context 160, or `positions`) with EOS suppressed: it always writes
    max_new_tokens tokens."""
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    if positions != model.config.max_position_embeddings:  # RoPE has no weights: the same model, a longer context
        model.config.max_position_embeddings = positions
        weights = model.state_dict()
        model = LlamaForCausalLM(model.config).eval()
        model.load_state_dict(weights)
    model.generation_config.suppress_tokens = [TOKENIZER.eos_token_id]
    return model


@pytest.fixture(scope="module")
def chat():
    return DocumentChat(long_answer_model(), TOKENIZER, limits=ServeLimits(max_new_tokens_limit=100))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "model"
    long_answer_model(512).save_pretrained(path)  # room for the page's default 256 new tokens
    TOKENIZER.save_pretrained(path)
    return path


def _last(iterator):
    value = None
    for value in iterator:
        pass
    return value


# -------------------------------------------------------------------------------------------- document chat


def test_first_answer_streams_and_equals_ask(chat):
    messages = chat.first_turn(MATERIAL, QUESTION, 12, truncate=False)
    pieces = list(chat.stream(messages, 12, 0.0, 1.0))
    expected = ask(chat.model, TOKENIZER, MATERIAL, QUESTION, max_new_tokens=12, stream=False)
    assert pieces[-1] == expected and len(expected.split()) == 12
    assert len(pieces) >= 4 and all(expected.startswith(p.strip()) for p in pieces[:-1])  # growing prefixes


def test_too_long_document_is_refused_with_exact_numbers(chat):
    document = " ".join(["the sky is blue ."] * 40)  # 200 tokens, the context is 160
    prompt = chat.prompt_tokens(chat.first_turn("x", QUESTION, 1, truncate=False)) - 1 + chat.count(document)
    with pytest.raises(Refused) as refusal:
        chat.first_turn(document, QUESTION, 20, truncate=False)
    over = prompt + 20 - 160
    assert str(refusal.value).startswith(
        f"The prompt is {prompt:,} tokens (the document is 200); with up to 20 new tokens that is {prompt + 20:,}, "
        f"{over:,} more than the model's context of 160. Shorten the document by {over:,} tokens"
    )
    assert "200 tokens" in chat.describe(document) and "41 too many" in chat.describe(document)


def test_truncating_the_middle_keeps_both_ends_and_fits(chat):
    document = "the sky is blue . " * 20 + "the grass is green . " * 20 + "the sun is yellow ." * 20
    messages = chat.first_turn(document, QUESTION, 20, truncate=True)
    assert chat.prompt_tokens(messages) + 20 <= 160
    kept = messages[0]["content"]
    assert "the sky is blue . the sky" in kept and "the sun is yellow . the sun" in kept
    cut = int(kept.split("[... ")[1].split(" tokens cut")[0])
    assert 0 < cut < chat.count(document)


def test_follow_up_reuses_the_documents_kv_cache(chat):
    messages = chat.first_turn(MATERIAL, QUESTION, 6, truncate=False)
    answer = _last(chat.stream(messages, 6, 0.0, 1.0))
    follow = messages + [{"role": "assistant", "content": answer},
                         {"role": "user", "content": "what colour is the sun ?"}]
    seen = []
    hook = chat.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape[1]),
                                                with_kwargs=True)
    try:
        second = _last(chat.stream(follow, 6, 0.0, 1.0))
    finally:
        hook.remove()
    total = chat.prompt_tokens(follow)
    assert seen[0] < total - chat.count(MATERIAL)  # the prefill ran only the new turn, not the document
    # and the reused cache gives the answer a full run of the whole conversation gives
    from longlora.generate import generate_answer

    assert second == generate_answer(chat.model, TOKENIZER, follow, max_new_tokens=6, stream=False)


def test_closing_the_stream_stops_the_generation_and_frees_the_model(chat):
    messages = chat.first_turn(MATERIAL, QUESTION, 90, truncate=False)
    before = chat.generations
    steps = []
    hook = chat.model.register_forward_pre_hook(lambda *a: steps.append(1))
    try:
        stream = chat.stream(messages, 90, 0.0, 1.0)
        next(stream)
        stream.close()  # what Gradio does when the stop button is pressed or the client goes away
    finally:
        hook.remove()
    assert chat.generations == before + 1 and not chat.active.is_set() and not chat.lock.locked()
    assert len(steps) < 45  # stopped long before its 90 tokens


def test_settings_are_bounded(chat):
    assert chat.check_settings(100, 0, 1) == (100, 0.0, 1.0)
    with pytest.raises(Refused, match="between 1 and 100"):
        chat.check_settings(101, 0, 1)
    with pytest.raises(Refused, match="top-p"):
        chat.check_settings(10, 0.5, 0)
    with pytest.raises(ValueError, match="max_new_tokens_limit"):
        ServeLimits(max_new_tokens_limit=0)


def test_serve_without_a_model_says_how_to_make_one(tmp_path, monkeypatch):
    from longlora.serve import resolve_model

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="run `longlora quickstart` first"):
        resolve_model(None, None)
    (tmp_path / "runs/quickstart/merged").mkdir(parents=True)
    (tmp_path / "runs/quickstart/merged/config.json").write_text("{}")
    assert resolve_model(None, None) == os.path.join("runs", "quickstart", "merged")
    assert resolve_model("m", None) == "m"


def test_serve_without_gradio_names_the_extra(monkeypatch, capsys):
    import sys

    from longlora.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["serve", "--model", "unused"]) == 2
    assert "pip install 'longlora[serve]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ HTTP / page


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(saved_model):
    pytest.importorskip("gradio")
    pytest.importorskip("gradio_client")
    from longlora.serve import cmd_serve

    port = _free_port()
    app = cmd_serve(str(saved_model), port=port, device="cpu", dtype="float32", block=False,
                    limits=ServeLimits(max_new_tokens_limit=300))
    yield app, f"http://127.0.0.1:{port}/"
    app.close()


def _fn(app, name):
    return next(f for f in app.fns.values() if f.name == name).fn


def _chat_of(app) -> DocumentChat:
    return next(c.cell_contents for c in _fn(app, "respond").__closure__ if isinstance(c.cell_contents, DocumentChat))


def test_upload_reads_text_files_within_the_limit(server, tmp_path):
    import gradio

    app, _ = server
    load_file = _fn(app, "load_file")
    (tmp_path / "notes.md").write_text("the sky is blue .")
    assert load_file(str(tmp_path / "notes.md")) == "the sky is blue ."
    (tmp_path / "big.txt").write_bytes(b"x" * 4_000_001)
    with pytest.raises(gradio.Error, match="over this server's limit of 4,000,000"):
        load_file(str(tmp_path / "big.txt"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(gradio.Error, match="upload a .txt, .md, .py file"):
        load_file(str(tmp_path / "image.png"))


def test_api_answer_equals_longlora_ask_and_refuses_with_numbers(server, saved_model, tmp_path):
    from gradio_client import Client

    app, url = server
    assert app.server_name == "127.0.0.1"
    client = Client(url, verbose=False)
    answer, history = client.predict(MATERIAL, QUESTION, False, 12, 0.0, 1.0, api_name="/ask")
    material = tmp_path / "material.txt"
    material.write_text(MATERIAL)
    expected = cmd_ask(str(saved_model), material=str(material), question=QUESTION, max_new_tokens=12,
                       dtype="float32", device="cpu", out=open(os.devnull, "w"))
    content = history[-1]["content"]  # Gradio 6 returns a message's content as a list of parts
    content = content if isinstance(content, str) else content[0]["text"]
    assert answer == expected and html.unescape(content) == expected and "<" not in content  # shown, not parsed
    assert "token" in client.predict(MATERIAL, api_name="/count")

    with pytest.raises(Exception, match=r"tokens \(the document is 600\).* more than the model's context of 512"):
        client.predict(" ".join(["the sky is blue ."] * 120), QUESTION, False, 20, 0.0, 1.0, api_name="/ask")
    with pytest.raises(Exception, match=r"maximum value 300|between 1 and 300"):  # the slider's check, then ours
        client.predict(MATERIAL, QUESTION, False, 301, 0.0, 1.0, api_name="/ask")


def test_api_cancelled_stream_frees_the_generation(server):
    from gradio_client import Client

    app, url = server
    chat = _chat_of(app)
    before = chat.generations
    client = Client(url, verbose=False)
    job = client.submit(MATERIAL, QUESTION, False, 100, 0.0, 1.0, api_name="/ask")
    deadline = time.time() + 30
    while not chat.active.is_set() and time.time() < deadline:
        time.sleep(0.01)
    job.cancel()
    deadline = time.time() + 30
    while (chat.active.is_set() or chat.generations == before) and time.time() < deadline:
        time.sleep(0.05)
    assert chat.generations == before + 1 and not chat.active.is_set()
    # the slot is free: the next request runs
    answer, _ = client.predict(MATERIAL, QUESTION, False, 5, 0.0, 1.0, api_name="/ask")
    assert len(answer.split()) == 5


def _launch_chromium(playwright):
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync"],
    )


def test_browser_paste_ask_and_read_the_streamed_answer(server, saved_model, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("no system Chromium (Debian: apt-get install chromium)")
    app, url = server
    material = tmp_path / "material.txt"
    material.write_text(MATERIAL)
    expected = cmd_ask(str(saved_model), material=str(material), question=QUESTION, max_new_tokens=256,
                       dtype="float32", device="cpu", out=open(os.devnull, "w"))
    with sync_api.sync_playwright() as p:
        browser = _launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)  # a busy 2-core machine
            page.goto(url, wait_until="load")
            page.locator("#document textarea").fill(MATERIAL)
            page.locator("#token-count").get_by_text("tokens of the model's context").wait_for()
            page.locator("#question textarea").fill(QUESTION)
            page.locator("#ask").click()
            answer = page.locator("#answer textarea")
            page.wait_for_function("e => e.value.length > 0", arg=answer.element_handle())
            # streamed: wait until the answer stops changing and the queue is idle again
            deadline, value = time.time() + 60, None
            while time.time() < deadline:
                current = answer.input_value()
                if current == value and _chat_of(app).lock.locked() is False:
                    break
                value = current
                time.sleep(0.5)
            assert answer.input_value() == expected
            shown = page.locator("[data-testid='bot']").last.inner_text()
            assert " ".join(shown.split()) == " ".join(expected.split())  # the conversation pane shows the text
            if os.environ.get("LONGLORA_SCREENSHOT"):
                page.screenshot(path=os.environ["LONGLORA_SCREENSHOT"], full_page=True)
        finally:
            browser.close()


def test_browser_tab_closed_mid_answer_frees_the_generation(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("no system Chromium (Debian: apt-get install chromium)")
    app, url = server
    chat = _chat_of(app)
    slow = chat.model.register_forward_pre_hook(lambda *a: time.sleep(0.1))  # 256 tokens: ~26 s
    before = chat.generations
    try:
        with sync_api.sync_playwright() as p:
            browser = _launch_chromium(p)
            try:
                page = browser.new_page()
                page.set_default_timeout(120_000)
                page.goto(url, wait_until="load")
                page.locator("#document textarea").fill(MATERIAL)
                page.locator("#question textarea").fill(QUESTION)
                page.locator("#ask").click()
                page.wait_for_function("e => e.value.length > 0", arg=page.locator("#answer textarea").element_handle())
                closed = time.time()
                page.close()  # the tab goes away mid-answer
            finally:
                browser.close()
        while chat.active.is_set() and time.time() < closed + 60:
            time.sleep(0.1)
        assert not chat.active.is_set() and chat.generations == before + 1
        assert time.time() - closed < 20  # stopped, not run to its 256 tokens
    finally:
        slow.remove()
