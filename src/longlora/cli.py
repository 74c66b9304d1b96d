"""`longlora` command line: each command is a plain function of the library.

    longlora train [CONFIG.yaml] [--key value ...]      context extension (S2-Attn + LoRA+ + PI)
    longlora sft [CONFIG.yaml] [--key value ...]        long instruction tuning
    longlora eval perplexity --model M [--adapter A] --data D --lengths 2048,4096 --output results.json
    longlora eval passkey --model M --lengths 1024,2048 --depths 0,0.5,1 --trials 5
    longlora merge --model BASE --adapter DIR --output OUT
    longlora ask --model M --material FILE --question "..."
    longlora chat --model M --material FILE
    longlora serve [--model M] [--adapter A] [--host 127.0.0.1] [--port 7860]
    longlora convert --model file.gguf --output DIR
    longlora plan --model M --context L [--gpu-memory 80] [--batch 1] [--quantization 4bit]
    longlora quickstart [--output DIR] [--fast] [--rebuild-base] [--threads N]

A mistake in the input (a missing file, a bad option, data that cannot be used) ends the command with one line on
stderr that names the problem and exit status 2; `longlora --debug ...` or LONGLORA_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage text is one `--help` away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser, *, several: bool = False) -> None:
    if several:
        p.add_argument("--model", action="append", default=None,
                       help="model directory / hub id / .gguf / adapter dir, or label=path; repeat for several")
    else:
        p.add_argument("--model", default=None, help="model directory, hub id, .gguf file or adapter directory")
    p.add_argument("--adapter", default=None, help="a LoRA / LoRA+ adapter directory to apply on top")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda when available)")
    p.add_argument("--rope-factor", type=float, default=None,
                   help="position interpolation at load time (needed for lengths beyond the model's context)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="longlora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or LONGLORA_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, what in (("train", "context extension: S2-Attn + LoRA+ + position interpolation"),
                       ("sft", "supervised fine-tuning on long instruction data (LongAlpaca format)")):
        p = sub.add_parser(name, help=what, description=f"{what}. Options: a YAML file and/or --key value pairs; "
                           "see configs/ and `longlora {name} --help-options`.", add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)

    ev = sub.add_parser("eval", help="perplexity across lengths, passkey retrieval")
    evsub = ev.add_subparsers(dest="eval_command", required=True)
    pp = evsub.add_parser("perplexity", help="perplexity at several context lengths (JSON + PNG)")
    _add_model_args(pp, several=True)
    pp.add_argument("--data", required=True, help=".bin token file (uint16/uint32) or text / JSONL / directory")
    pp.add_argument("--lengths", type=_ints, default=[2048, 4096])
    pp.add_argument("--protocol", choices=["window", "sliding"], default="window")
    pp.add_argument("--stride", type=int, default=256)
    pp.add_argument("--max-windows", type=int, default=None)
    pp.add_argument("--max-tokens", type=int, default=None)
    pp.add_argument("--batch-size", type=int, default=1)
    pp.add_argument("--token-dtype", default="uint16", help="dtype of a .bin token file: uint16 | uint32")
    pp.add_argument("--output", default="runs/eval/perplexity.json")
    pk = evsub.add_parser("passkey", help="passkey retrieval accuracy by length and depth (JSON + PNGs)")
    _add_model_args(pk)
    pk.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096])
    pk.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    pk.add_argument("--trials", type=int, default=5)
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--template", choices=["paper", "code"], default="paper",
                    help="paper: the paper's English prompt; code: PASSKEY = K hidden in held-out Python source")
    pk.add_argument("--output", default="runs/eval/passkey.json")
    mg = sub.add_parser("merge", help="fold an adapter into its base: a standalone Hugging Face model directory")
    mg.add_argument("--model", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    mg.add_argument("--adapter", required=True, help="adapter directory written by `longlora train` / `sft`")
    mg.add_argument("--output", required=True, help="new model directory (written atomically)")
    mg.add_argument("--dtype", default="auto",
                    help="dtype of the saved weights: auto (the base checkpoint's) | bfloat16 | float16 | float32")
    mg.add_argument("--rope-factor", type=float, default=None, help="stretch the RoPE this much more (linear PI)")
    mg.add_argument("--max-shard-size", default="2GB")
    mg.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    for name, what in (("ask", "answer one question about a long document, streamed"),
                       ("chat", "a multi-turn conversation about a long document (questions from stdin)")):
        p = sub.add_parser(name, help=what)
        _add_model_args(p)
        p.add_argument("--material", required=True, help="the long text: .txt / .md (.pdf with pypdf installed)")
        if name == "ask":
            p.add_argument("--question", required=True)
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--template", default="auto", choices=["auto", "chat_template", "llama2"])
    sv = sub.add_parser("serve", help="ask a long document in the browser (pip install 'longlora[serve]')")
    _add_model_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    sv.add_argument("--port", type=int, default=7860)
    sv.add_argument("--template", default="auto", choices=["auto", "chat_template", "llama2"])
    sv.add_argument("--max-document-chars", type=int, default=2_000_000)
    sv.add_argument("--max-new-tokens-limit", type=int, default=2048,
                    help="the largest max new tokens a request may ask")
    cv = sub.add_parser("convert", help="a GGUF checkpoint -> a normal Hugging Face model directory (dequantised)")
    cv.add_argument("--model", required=True, help="the .gguf file")
    cv.add_argument("--output", required=True)
    cv.add_argument("--dtype", default="float32")
    cv.add_argument("--overwrite", action="store_true")

    pl = sub.add_parser("plan", help="predict a training step's GPU memory and the longest context that fits")
    pl.add_argument("--model", required=True, help="model directory (config.json) or hub id; no weights are loaded")
    pl.add_argument("--context", type=int, required=True, help="training tokens per sequence")
    pl.add_argument("--gpu-memory", type=float, default=80.0, help="GiB of one GPU (default 80)")
    pl.add_argument("--batch", type=int, default=1, help="sequences per GPU per micro-batch")
    pl.add_argument("--quantization", default=None, help="4bit: QLoRA")
    pl.add_argument("--dtype", default="bf16", help="bf16 (default) | fp32")
    pl.add_argument("--output", default=None, help="also write the plan as JSON")

    qs = sub.add_parser("quickstart", help="the whole workflow on the embedded default model (CPU, minutes)")
    qs.add_argument("--output", default="runs/quickstart")
    qs.add_argument("--fast", action="store_true", help="fewer steps and windows (the CI smoke run)")
    qs.add_argument("--cache-dir", default=None, help="where the embedded model is cached (default ~/.cache/longlora)")
    qs.add_argument("--seed", type=int, default=0)
    qs.add_argument("--rebuild-base", action="store_true",
                    help="make the embedded base again from its recipe (minutes; torch >= 2.9) instead of the shipped "
                    "one; with --threads 1 it is the shipped one")
    qs.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores torch sees)")
    return parser


def _cmd_generate(ns: argparse.Namespace) -> None:
    from .generate import cmd_ask, cmd_chat

    common = dict(adapter=ns.adapter, material=ns.material, max_new_tokens=ns.max_new_tokens,
                  temperature=ns.temperature, top_p=ns.top_p, rope_factor=ns.rope_factor, dtype=ns.dtype,
                  template=ns.template, device=ns.device)
    if ns.command == "ask":
        cmd_ask(ns.model, question=ns.question, **common)
    else:
        cmd_chat(ns.model, **common)


def _cmd_eval(ns: argparse.Namespace) -> None:
    from .evaluate import cmd_eval_passkey, cmd_eval_perplexity

    if ns.eval_command == "perplexity":
        if not ns.model and not ns.adapter:
            raise ValueError("give --model (repeatable) or --adapter")
        cmd_eval_perplexity(
            ns.model or [ns.adapter], adapter=ns.adapter if ns.model else None, data=ns.data, lengths=ns.lengths,
            protocol=ns.protocol, stride=ns.stride, max_windows=ns.max_windows, max_tokens=ns.max_tokens,
            batch_size=ns.batch_size, dtype=ns.dtype, rope_factor=ns.rope_factor, output=ns.output,
            token_dtype=ns.token_dtype, device=ns.device,
        )
    else:
        cmd_eval_passkey(ns.model, adapter=ns.adapter, lengths=ns.lengths, depths=ns.depths, trials=ns.trials,
                         seed=ns.seed, rope_factor=ns.rope_factor, output=ns.output, dtype=ns.dtype,
                         device=ns.device, template=ns.template)


def _option_help(cls) -> str:
    import dataclasses

    lines = [f"Options of {cls.__name__} (YAML keys or --key value; any TrainingArguments field passes through):"]
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name == "training_args":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{f.name.replace('_', '-'):<30} {docs.get(f.name, '')} [default: {default!r}]")
    return "\n".join(lines)


def _field_docs(cls) -> dict[str, str]:
    """The one-line docstrings under each dataclass field."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = str(nxt.value.value)  # type: ignore[union-attr]
    return docs


def _cmd_train_like(name: str, args: list[str]) -> None:
    if any(a in ("-h", "--help", "--help-options") for a in args):
        from .config import TrainConfig

        cls = TrainConfig
        if name == "sft":
            from .sft import SFTConfig

            cls = SFTConfig
        print(f"usage: longlora {name} [CONFIG.yaml] [--key value ...]\n")
        print(_option_help(cls))
        return
    if name == "train":
        from .train import cmd_train

        cmd_train(args)
    else:
        from .sft import cmd_sft

        cmd_sft(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # train / sft take free-form --key value options (any config field): parsed by longlora.config, not argparse
    command_at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command_at is not None and argv[command_at] in ("train", "sft"):
        args = argv[command_at + 1:]
        # a bare --debug among the options is ours (--debug VALUE is TrainingArguments.debug)
        bare = [i for i, a in enumerate(args)
                if a == "--debug" and (i + 1 == len(args) or args[i + 1].startswith("--"))]
        ns = argparse.Namespace(command=argv[command_at], args=[a for i, a in enumerate(args) if i not in bare],
                                verbose="--verbose" in argv[:command_at],
                                debug="--debug" in argv[:command_at] or bool(bare))
    else:
        ns = _parser().parse_args(argv)
    debug = ns.debug or os.environ.get("LONGLORA_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if ns.command in ("train", "sft"):
            _cmd_train_like(ns.command, ns.args)
        elif ns.command == "eval":
            _cmd_eval(ns)
        elif ns.command == "merge":
            from .merge import cmd_merge

            cmd_merge(ns.model, ns.adapter, ns.output, dtype=ns.dtype, overwrite=ns.overwrite,
                      max_shard_size=ns.max_shard_size, rope_factor=ns.rope_factor)
        elif ns.command in ("ask", "chat"):
            _cmd_generate(ns)
        elif ns.command == "serve":
            from .serve import ServeLimits, cmd_serve

            cmd_serve(ns.model, ns.adapter, ns.host, ns.port, dtype=ns.dtype, device=ns.device,
                      rope_factor=ns.rope_factor, template=ns.template,
                      limits=ServeLimits(max_document_chars=ns.max_document_chars,
                                         max_new_tokens_limit=ns.max_new_tokens_limit))
        elif ns.command == "convert":
            from .convert import cmd_convert

            cmd_convert(ns.model, ns.output, dtype=ns.dtype, overwrite=ns.overwrite)
        elif ns.command == "plan":
            from .plan import cmd_plan

            cmd_plan(ns.model, ns.context, gpu_memory=ns.gpu_memory, batch=ns.batch, quantization=ns.quantization,
                     dtype=ns.dtype, output=ns.output)
        elif ns.command == "quickstart":
            from .quickstart import cmd_quickstart

            cmd_quickstart(ns.output, fast=ns.fast, cache_dir=ns.cache_dir, seed=ns.seed,
                           rebuild_base=ns.rebuild_base, threads=ns.threads)
    except KeyboardInterrupt:
        print(f"longlora {ns.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug or not _is_user_error(err):
            raise
        command = " ".join(filter(None, [ns.command, getattr(ns, "eval_command", None)]))
        message = _one_line(err)
        if type(err).__name__ == "SafetensorError":  # its message does not say which file
            from .checkpoints import damaged_safetensors

            damaged = damaged_safetensors(a for a in argv if not a.startswith("-") and os.path.exists(a))
            message = f"{damaged}: re-create or re-download it ({message})" if damaged else message
        print(f"longlora {command}: error: {message}", file=sys.stderr)
        return 2
    return 0


def _is_user_error(err: Exception) -> bool:
    """Errors that input causes: bad values (ValueError), files missing, existing or unreadable (OSError, which
    transformers also raises for a model it cannot find), YAML syntax, damaged safetensors, a missing extra."""
    import yaml

    user_errors = (ValueError, OSError, ImportError, yaml.YAMLError)
    return isinstance(err, user_errors) or type(err).__name__ == "SafetensorError"


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
