"""`longlora serve`: ask a long document questions in the browser (Gradio, `pip install 'longlora[serve]'`).

    longlora serve --model runs/quickstart/merged            # http://127.0.0.1:7860

The page: paste a document or upload a .txt / .md / .py file; its token count against the model's context; a
question; the answer streams token by token; follow-up questions continue the conversation and reuse the KV cache of
the document (as `longlora chat` does); generation settings with the CLI's defaults; a stop button.

A document that does not fit (prompt + max new tokens > the model's context) is refused with the exact numbers,
unless "truncate the middle" is ticked: then the document keeps its beginning and its end, and a marker says how
many tokens were cut. The first answer about a document is exactly what `longlora ask` gives on the same input.

Safety and sharing: binds to 127.0.0.1 unless `--host` says otherwise; the document size, the upload size and max
new tokens are bounded; one generation at a time (Gradio's queue, plus a lock: the shared KV cache is never used by
two requests at once); a stop click or a client that goes away ends the generation after the current token.
"""

from __future__ import annotations

import html
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

DEFAULT_MODEL = Path("runs") / "quickstart" / "merged"
"""Where `longlora quickstart` leaves the extended embedded model (the default --output)."""
UPLOAD_TYPES = (".txt", ".md", ".py")
TRUNCATION_MARKER = "\n\n[... {cut} tokens cut from the middle of the document ...]\n\n"


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request may ask of the server."""

    max_document_chars: int = 2_000_000
    """Longest document accepted (pasted or uploaded), in characters."""
    max_upload_bytes: int = 4_000_000
    max_new_tokens_limit: int = 2048
    """Largest `max new tokens` a request may ask for."""
    queue_size: int = 16
    """Requests waiting for the one generation slot; more are turned away."""

    def __post_init__(self):
        for name in ("max_document_chars", "max_upload_bytes", "max_new_tokens_limit", "queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Refused(ValueError):
    """A request the server will not run (too long, too large, bad settings); the message says what to do."""


class DocumentChat:
    """The model, its tokenizer and one shared KV cache, used by one generation at a time.

    The cache (generate.PromptCache) is keyed by token ids: a turn reuses the longest prefix it shares with the last
    generation, whichever session ran it, so follow-ups skip the document and two tabs cannot see each other's state.
    """

    def __init__(self, model, tokenizer, *, limits: ServeLimits = ServeLimits(), template: str = "auto"):
        from longlora.generate import PromptCache
        from longlora.modeling import max_context

        self.model, self.tokenizer, self.limits, self.template = model.eval(), tokenizer, limits, template
        self.context = max_context(model)
        self.cache = PromptCache()
        self.lock = threading.Lock()
        self.generations = 0  # finished or stopped generations (tests watch it)
        self.active = threading.Event()  # set while a generation runs

    # ------------------------------------------------------------------------------------------------- counting

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def prompt_tokens(self, messages: list[dict]) -> int:
        from longlora.prompts import encode_prompt, render_conversation

        return len(encode_prompt(self.tokenizer, render_conversation(self.tokenizer, messages, self.template),
                                 self.template))

    def describe(self, document: str) -> str:
        """The token count line under the document box."""
        if not document.strip():
            return f"No document yet. Model context: {self.context:,} tokens."
        if len(document) > self.limits.max_document_chars:
            return (f"The document is {len(document):,} characters, more than this server's limit of "
                    f"{self.limits.max_document_chars:,}.")
        tokens = self.count(document)
        line = f"Document: **{tokens:,} tokens** of the model's context of **{self.context:,}**"
        if tokens >= self.context:
            return line + (f" — {tokens - self.context + 1:,} too many before the question and the answer: "
                           "asking is refused unless *truncate the middle* is ticked.")
        return line + " (the prompt, the question and the answer need room too)."

    # --------------------------------------------------------------------------------------------------- turns

    def first_turn(self, document: str, question: str, max_new_tokens: int, truncate: bool) -> list[dict]:
        """The first user turn, as `longlora ask` builds it; a document that does not fit is refused (or, with
        `truncate`, cut in the middle)."""
        from longlora.generate import user_message

        messages = [{"role": "user", "content": user_message(document, question)}]
        total = self.prompt_tokens(messages) + max_new_tokens
        if total <= self.context:
            return messages
        if not truncate:
            prompt = total - max_new_tokens
            raise Refused(
                f"The prompt is {prompt:,} tokens (the document is {self.count(document):,}); with up to "
                f"{max_new_tokens:,} new tokens that is {total:,}, {total - self.context:,} more than the model's "
                f"context of {self.context:,}. Shorten the document by {total - self.context:,} tokens, lower max "
                "new tokens, or tick 'truncate the middle'."
            )
        return [{"role": "user", "content": user_message(self._truncate(document, total - self.context), question)}]

    def _truncate(self, document: str, over: int) -> str:
        """The document with its middle cut so that the prompt is `over` tokens shorter (re-checked: decoding and
        encoding again can move a token boundary)."""
        ids = self.tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"]
        cut = over + self.count(TRUNCATION_MARKER.format(cut=len(ids)))
        while cut < len(ids):
            keep = len(ids) - cut
            head, tail = ids[: (keep + 1) // 2], ids[len(ids) - keep // 2 :]
            text = (self.tokenizer.decode(head) + TRUNCATION_MARKER.format(cut=cut) + self.tokenizer.decode(tail))
            excess = self.count(text) - (len(ids) - over)
            if excess <= 0:
                return text
            cut += excess
        raise Refused("the question and the answer alone do not fit the model's context: lower max new tokens")

    def check_settings(self, max_new_tokens: Any, temperature: Any, top_p: Any) -> tuple[int, float, float]:
        limit = self.limits.max_new_tokens_limit
        try:
            max_new_tokens, temperature, top_p = int(max_new_tokens), float(temperature), float(top_p)
        except (TypeError, ValueError):
            raise Refused("max new tokens, temperature and top-p must be numbers") from None
        if not 1 <= max_new_tokens <= limit:
            raise Refused(f"max new tokens must be between 1 and {limit:,} on this server, got {max_new_tokens:,}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise Refused(f"temperature must be >= 0 and top-p in (0, 1], got {temperature} and {top_p}")
        return max_new_tokens, temperature, top_p

    # ---------------------------------------------------------------------------------------------- generation

    def stream(self, messages: list[dict], max_new_tokens: int, temperature: float, top_p: float) -> Iterator[str]:
        """Yield the answer so far as it is generated; the last value is the finished (stripped) answer.

        Closing the iterator early (stop button, client gone) stops the generation after the current token and
        waits for it, so the model and its cache are free for the next request when this returns.
        """
        from transformers import TextIteratorStreamer

        from longlora.generate import generate_answer

        with self.lock:
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=0.2)
            stop, result = threading.Event(), {}

            def work():
                try:
                    result["answer"] = generate_answer(
                        self.model, self.tokenizer, messages, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, template=self.template, cache=self.cache,
                        streamer=streamer, stop_event=stop,
                    )
                except BaseException as error:  # re-raised in the caller's thread below
                    result["error"] = error
                    streamer.end()

            self.active.set()
            worker = threading.Thread(target=work, name="longlora-serve-generate", daemon=True)
            worker.start()
            text = ""
            try:
                while True:
                    try:
                        piece = next(streamer)
                    except StopIteration:
                        break
                    except queue.Empty:  # nothing new yet: keep waiting while the model works
                        if not worker.is_alive():
                            break
                        continue
                    if piece:
                        text += piece
                        yield text
            finally:
                stop.set()  # a no-op after a normal end; after an early close it ends generate() at the next token
                worker.join()
                self.generations += 1
                self.active.clear()
            if "error" in result:
                raise result["error"]
            yield result["answer"]


# ---------------------------------------------------------------------------------------------------------- page


def build_app(chat: DocumentChat, *, title: str = "longlora: ask a long document"):
    """The Gradio Blocks app around `chat` (not launched)."""
    gr = _gradio()

    limits = chat.limits

    def count(document):
        return chat.describe(document or "")

    def load_file(file):
        if file is None:
            return gr.update()
        path = Path(file if isinstance(file, str) else file.name)
        if path.suffix.lower() not in UPLOAD_TYPES:
            raise gr.Error(f"upload a {', '.join(UPLOAD_TYPES)} file (got {path.name})")
        if path.stat().st_size > limits.max_upload_bytes:
            raise gr.Error(f"{path.name} is {path.stat().st_size:,} bytes, over this server's limit of "
                           f"{limits.max_upload_bytes:,}")
        from longlora.data.corpus import decode_text

        return decode_text(path.read_bytes(), path.name)

    def respond(document, question, truncate, max_new_tokens, temperature, top_p, state):
        document, question = document or "", (question or "").strip()
        try:
            if not document.strip():
                raise Refused("paste a document or upload a file first")
            if len(document) > limits.max_document_chars:
                raise Refused(f"the document is {len(document):,} characters, over this server's limit of "
                              f"{limits.max_document_chars:,}")
            if not question:
                raise Refused("type a question")
            settings = chat.check_settings(max_new_tokens, temperature, top_p)
            same_document = state and state.get("document") == document and state.get("truncate") == truncate
            if same_document:  # a follow-up: the conversation so far, then the new question
                messages = state["messages"] + [{"role": "user", "content": question}]
                total = chat.prompt_tokens(messages) + settings[0]
                if total > chat.context:
                    raise Refused(f"the conversation with this question and up to {settings[0]:,} new tokens is "
                                  f"{total:,} tokens, over the model's context of {chat.context:,}: start a new "
                                  "conversation or lower max new tokens")
            else:
                messages = chat.first_turn(document, question, settings[0], truncate)
        except Refused as refusal:
            raise gr.Error(str(refusal)) from None
        # The conversation pane shows text as HTML: escaped, so code such as `a </b` is shown, not parsed as a tag.
        history = [] if not same_document else list(state["history"])
        history.append({"role": "user", "content": html.escape(question)})
        answer = ""
        for answer in chat.stream(messages, *settings):
            yield answer, history + [{"role": "assistant", "content": html.escape(answer)}], state
        history.append({"role": "assistant", "content": html.escape(answer)})
        new_state = {"document": document, "truncate": truncate, "history": history,
                     "messages": messages + [{"role": "assistant", "content": answer}]}
        yield answer, history, new_state

    def clear():
        return "", [], None

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}\nPaste a document (or upload {', '.join(UPLOAD_TYPES)}), ask about it; "
                    "follow-up questions continue the conversation.")
        with gr.Row():
            with gr.Column(scale=3):
                document = gr.Textbox(label="Document", lines=14, max_lines=14, elem_id="document",
                                      max_length=limits.max_document_chars, placeholder="Paste the text here")
                upload = gr.File(label="or upload", file_types=list(UPLOAD_TYPES), type="filepath")
                tokens = gr.Markdown(chat.describe(""), elem_id="token-count")
                truncate = gr.Checkbox(label="truncate the middle of a document that does not fit", value=False)
            with gr.Column(scale=2):
                question = gr.Textbox(label="Question", lines=2, elem_id="question")
                with gr.Row():
                    ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
                    stop_button = gr.Button("Stop", elem_id="stop")
                    new_button = gr.Button("New conversation", elem_id="new")
                answer = gr.Textbox(label="Answer", lines=6, interactive=False, elem_id="answer")
                history = gr.Chatbot(label="Conversation", height=260, render_markdown=False)
                with gr.Accordion("Generation settings", open=False):
                    limit = limits.max_new_tokens_limit
                    max_new_tokens = gr.Slider(1, limit, value=min(256, limit), step=1, label="max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p")
        state = gr.State(None)

        document.change(count, document, tokens, api_name="count", queue=False, trigger_mode="always_last")
        upload.upload(load_file, upload, document, api_name=False)
        inputs = [document, question, truncate, max_new_tokens, temperature, top_p, state]
        # one concurrency group for both triggers: a single generation slot, the rest wait in the queue
        asked = ask_button.click(respond, inputs, [answer, history, state], api_name="ask", concurrency_id="generate")
        submitted = question.submit(respond, inputs, [answer, history, state], api_name=False,
                                    concurrency_id="generate")
        stop_button.click(None, None, None, cancels=[asked, submitted], api_name=False)
        new_button.click(clear, None, [answer, history, state], api_name=False, cancels=[asked, submitted])
    app.queue(default_concurrency_limit=1, max_size=limits.queue_size)
    return app


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    try:
        import gradio
    except ImportError as error:
        raise ImportError("`longlora serve` needs Gradio: pip install 'longlora[serve]'") from error
    if not hasattr(gradio, "Blocks"):  # a stray ./gradio directory (Gradio's own /tmp/gradio cache) imports empty
        raise ImportError(f"`gradio` imports from {list(gradio.__path__)}, not the Gradio package: "
                          "pip install 'longlora[serve]', or run from another directory")
    return gradio


def resolve_model(model: str | None, adapter: str | None) -> str | None:
    """--model, or the quickstart's extended model when neither --model nor --adapter is given."""
    if model is not None or adapter is not None:
        return model
    if (DEFAULT_MODEL / "config.json").is_file():
        return str(DEFAULT_MODEL)
    raise FileNotFoundError(
        f"no --model given and the quickstart's extended model ({DEFAULT_MODEL}) does not exist: run "
        "`longlora quickstart` first (or `make quickstart`), or pass --model DIR"
    )


def cmd_serve(
    model: str | None = None,
    adapter: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    dtype: str = "auto",
    device: str | None = None,
    rope_factor: float | None = None,
    template: str = "auto",
    limits: ServeLimits = ServeLimits(),
    block: bool = True,
):
    """`longlora serve`: load the model (+ adapter) and serve the page on host:port. Returns the Gradio app
    (already launched; with block=False the call returns at once and `app.close()` stops it)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    _gradio()  # the missing-extra message before a model loads
    from longlora.modeling import load_model_and_tokenizer

    source = resolve_model(model, adapter)
    lm, tokenizer = load_model_and_tokenizer(source, adapter, dtype=dtype, device=device, rope_factor=rope_factor)
    app = build_app(DocumentChat(lm, tokenizer, limits=limits, template=template),
                    title=f"longlora: ask a long document ({Path(str(source or adapter)).name})")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: anyone who can reach this address can use the model", flush=True)
    app.launch(server_name=host, server_port=port, max_file_size=limits.max_upload_bytes, show_error=True,
               prevent_thread_lock=not block, ssr_mode=False, quiet=not block)
    return app
