"""Bad input through the real CLI: every case exits with status 2 and one line on stderr that names the problem, no
traceback, and leaves the files it was given (and everything else in the workspace) as they were.

The matrix runs in-process through `longlora.cli.main` (a subprocess costs seconds to start); a few cases also run
as real `longlora` subprocesses, where the whole of stderr is checked.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from longlora.cli import main as cli_main
from longlora.train import cmd_train
from tiny_models import save_tiny_model, stdlib_corpus

TRAIN = dict(context_length=256, max_steps=1, save_steps=1, per_device_train_batch_size=2,
             gradient_accumulation_steps=1, learning_rate=3e-3, warmup_steps=0, max_blocks=4,
             gradient_checkpointing="false")


def _options(**options) -> list[str]:
    args = []
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _truncate(path: Path, keep: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with a tiny model, a second model of another size, a corpus, a trained run and broken files."""
    root = tmp_path_factory.mktemp("bad_input")
    save_tiny_model(root / "base", "llama")
    save_tiny_model(root / "other_base", "llama", hidden_size=32, intermediate_size=64)
    stdlib_corpus(root / "corpus", n_files=2)
    cmd_train(_options(model=root / "base", data=root / "corpus", output_dir=root / "run", **TRAIN))

    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n  \n")
    (root / "binary.dat").write_bytes(bytes(range(256)) * 64)
    (root / "short.txt").write_text("x = 1\n")
    (root / "bad.yaml").write_text("context_length: [1024, 2048\nmodel: m\n")
    (root / "list.yaml").write_text("- context_length\n- 1024\n")
    (root / "unknown.yaml").write_text("contxt_length: 1024\n")
    (root / "corpus_broken.jsonl").write_text('{"text": "a b c"}\n{"text": "d e\n')
    (root / "sft_nofields.jsonl").write_text('{"question": "a", "reply": "b"}\n')
    (root / "sft_broken.jsonl").write_text('{"instruction": "a", "output": \n')
    (root / "sft_empty.jsonl").write_text("")
    (root / "material_empty.txt").write_text("")
    (root / "not_gguf.gguf").write_text("this is not a GGUF file\n")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("keep me")
    # a run whose only checkpoint is damaged (its adapter truncated after the completion marker was written)
    shutil.copytree(root / "run", root / "damaged_run")
    _truncate(root / "damaged_run" / "checkpoint-1" / "adapter_model.safetensors")
    # a model directory and an adapter whose weights are truncated
    shutil.copytree(root / "base", root / "broken_model")
    _truncate(root / "broken_model" / "model.safetensors", keep=4000)
    shutil.copytree(root / "run", root / "broken_adapter", ignore=shutil.ignore_patterns("checkpoint-*"))
    _truncate(root / "broken_adapter" / "adapter_model.safetensors", keep=4000)
    return root


def _matrix(ws: Path) -> list[tuple[str, list[str], str]]:
    """(what is wrong, argv, a pattern the one-line message must contain)."""
    base, corpus, run = str(ws / "base"), str(ws / "corpus"), str(ws / "run")
    train = ["train"] + _options(**TRAIN)

    def tr(**kw):
        options = dict(model=base, data=corpus, output_dir=ws / "out")
        options.update(kw)
        return train + _options(**options)

    sft = ["sft"] + _options(**TRAIN)

    def sf(**kw):
        options = dict(model=base, data=ws / "sft.jsonl", output_dir=ws / "out")
        options.update(kw)
        return sft + _options(**options)

    ppl = ["eval", "perplexity", "--model", base, "--lengths", "32", "--output", str(ws / "ppl.json")]
    pk = ["eval", "passkey", "--model", base, "--lengths", "64", "--trials", "1", "--output", str(ws / "pk.json")]
    ask = ["ask", "--model", base, "--question", "what?", "--max-new-tokens", "2"]
    chat = ["chat", "--model", base]
    return [
        # train: data
        ("train: data missing", tr(data=ws / "nope.txt"), r"no such file.*nope\.txt"),
        ("train: data file empty", tr(data=ws / "empty.txt"), r"empty"),
        ("train: data binary", tr(data=ws / "binary.dat"), r"binary"),
        ("train: corpus shorter than a block", tr(data=ws / "short.txt"), r"tokens"),
        ("train: JSONL corpus with a broken line", tr(data=ws / "corpus_broken.jsonl"),
         r"corpus_broken\.jsonl: line 2 is not valid JSON"),
        ("train: JSONL corpus without the text field", tr(data=ws / "sft_nofields.jsonl"), r"no field 'text'"),
        # train: options
        ("train: YAML syntax error", ["train", str(ws / "bad.yaml")], r"not valid YAML at line 2"),
        ("train: YAML not a mapping", ["train", str(ws / "list.yaml")], r"expected a mapping"),
        ("train: YAML file missing", ["train", str(ws / "nope.yaml")], r"nope\.yaml.*not found"),
        ("train: unknown key in YAML", ["train", str(ws / "unknown.yaml")], r"unknown option.*contxt_length"),
        ("train: unknown option", tr(contxt_length=512), r"unknown option.*contxt_length"),
        ("train: wrong type", tr(context_length="long"), r"context_length must be an integer"),
        ("train: wrong bool", tr(gradient_checkpointing="maybe"), r"true or false"),
        ("train: bad choice", tr(attention="sparse"), r"attention must be one of"),
        ("train: negative steps", tr(max_steps=-5), r"max_steps must be >= 1"),
        ("train: stray argument", train + ["oops"], r"unexpected argument"),
        # train: model, context, output, checkpoints
        ("train: model missing", tr(model=ws / "nope_model"), r"nope_model"),
        ("train: model weights truncated", tr(model=ws / "broken_model"),
         r"broken_model/model\.safetensors is truncated \(4000 of \d+ bytes\)"),
        ("train: context below the model's", tr(context_length=32), r"below the model's original context"),
        ("train: output dir not empty", tr(output_dir=ws / "full"), r"not empty.*--resume auto"),
        ("train: resume, every checkpoint damaged", tr(output_dir=ws / "damaged_run", resume="auto"),
         r"no checkpoint .* loads.*adapter_model\.safetensors is truncated"),
        ("train: resume from a missing directory", tr(resume=ws / "nope_ckpt"), r"not a directory"),
        ("train: resume from a damaged checkpoint", tr(output_dir=ws / "damaged_run",
                                                       resume=ws / "damaged_run" / "checkpoint-1"),
         r"does not load.*truncated"),
        # sft
        ("sft: data missing", sf(data=ws / "nope.jsonl"), r"nope\.jsonl"),
        ("sft: data empty", sf(data=ws / "sft_empty.jsonl"), r"empty"),
        ("sft: records without instruction/output", sf(data=ws / "sft_nofields.jsonl"), r"instruction|output|messages"),
        ("sft: broken JSON", sf(data=ws / "sft_broken.jsonl"), r"sft_broken\.jsonl: line 1 is not valid JSON"),
        ("sft: bad prompt_template", sf(data=ws / "sft_broken.jsonl", prompt_template="vicuna"),
         r"prompt_template must be one of"),
        ("sft: negative steps", sf(max_steps=-1), r"max_steps must be >= 1"),
        ("sft: output dir not empty", sf(data=ws / "sft_nofields.jsonl", output_dir=ws / "full"), r"not empty"),
        ("sft: YAML syntax error", ["sft", str(ws / "bad.yaml")], r"not valid YAML"),
        # merge
        ("merge: adapter onto the wrong base", ["merge", "--model", str(ws / "other_base"), "--adapter", run,
                                                "--output", str(ws / "merged")], r"trained on another model"),
        ("merge: output dir not empty", ["merge", "--adapter", run, "--model", base, "--output", str(ws / "full")],
         r"exists and is not empty"),
        ("merge: output is a file", ["merge", "--adapter", run, "--model", base, "--output", str(ws / "short.txt")],
         r"is a file"),
        ("merge: adapter missing", ["merge", "--adapter", str(ws / "nope_adapter"), "--output", str(ws / "merged")],
         r"nope_adapter"),
        ("merge: adapter weights truncated", ["merge", "--adapter", str(ws / "broken_adapter"), "--model", base,
                                              "--output", str(ws / "merged")],
         r"broken_adapter/adapter_model\.safetensors is truncated"),
        ("merge: bad dtype", ["merge", "--adapter", run, "--model", base, "--output", str(ws / "merged"),
                              "--dtype", "int3"], r"dtype"),
        # eval perplexity
        ("eval perplexity: data file empty", ppl + ["--data", str(ws / "empty.txt")], r"is empty"),
        ("eval perplexity: data only blank", ppl + ["--data", str(ws / "blank.txt")], r"is empty"),
        ("eval perplexity: data missing", ppl + ["--data", str(ws / "nope.txt")], r"does not exist"),
        ("eval perplexity: --lengths not numbers", ppl + ["--data", corpus, "--lengths", "a,b"],
         r"argument --lengths: expected comma-separated integers"),
        ("eval perplexity: --lengths zero", ppl + ["--data", corpus, "--lengths", "0"], r"positive integers"),
        ("eval perplexity: length beyond the model", ppl + ["--data", corpus, "--lengths", "4096"], r"rope.factor"),
        ("eval perplexity: model weights truncated", ["eval", "perplexity", "--model", str(ws / "broken_model"),
                                                      "--data", corpus, "--lengths", "32"],
         r"broken_model/model\.safetensors is truncated \(4000 of \d+ bytes\)"),
        ("eval perplexity: model missing", ["eval", "perplexity", "--model", str(ws / "nope_model"), "--data", corpus],
         r"nope_model"),
        # eval passkey
        ("eval passkey: model missing", ["eval", "passkey", "--model", str(ws / "nope_model")], r"nope_model"),
        ("eval passkey: depth out of range", pk + ["--depths", "1.5"], r"depth must be in \[0, 1\]"),
        ("eval passkey: zero trials", pk[:-4] + ["--trials", "0", "--output", str(ws / "pk.json")], r"trials"),
        ("eval passkey: --lengths not numbers", pk + ["--lengths", "x"], r"argument --lengths"),
        # convert
        ("convert: file missing", ["convert", "--model", str(ws / "nope.gguf"), "--output", str(ws / "conv")],
         r"nope\.gguf"),
        ("convert: not a .gguf", ["convert", "--model", str(ws / "short.txt"), "--output", str(ws / "conv")],
         r"not a \.gguf"),
        ("convert: .gguf that is not GGUF", ["convert", "--model", str(ws / "not_gguf.gguf"), "--output",
                                             str(ws / "conv")], r"GGUF|gguf"),
        # ask
        ("ask: material missing", ask + ["--material", str(ws / "nope.txt")], r"nope\.txt"),
        ("ask: material empty", ask + ["--material", str(ws / "material_empty.txt")], r"no text|empty"),
        ("ask: model missing", ["ask", "--model", str(ws / "nope_model"), "--material", str(ws / "short.txt"),
                                "--question", "q"], r"nope_model"),
        ("ask: zero new tokens", ["ask", "--model", base, "--material", str(ws / "short.txt"), "--question", "q",
                                  "--max-new-tokens", "0"], r"max_new_tokens"),
        # chat (questions come from stdin, after these checks)
        ("chat: material missing", chat + ["--material", str(ws / "nope.txt")], r"nope\.txt"),
        ("chat: material binary", chat + ["--material", str(ws / "binary.dat")], r"binary"),
        ("chat: model missing", ["chat", "--model", str(ws / "nope_model"), "--material", str(ws / "short.txt")],
         r"nope_model"),
        ("chat: zero new tokens", chat + ["--material", str(ws / "short.txt"), "--max-new-tokens", "0"],
         r"max_new_tokens"),
        # top level
        ("unknown command", ["trian"], r"invalid choice"),
    ]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run_in_process(argv, capsys) -> tuple[int, str]:
    try:
        code = cli_main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def test_bad_input_matrix(ws, capsys, monkeypatch):
    monkeypatch.chdir(ws)  # default output paths (runs/...) would land in the workspace, where the snapshot sees them
    monkeypatch.delenv("LONGLORA_DEBUG", raising=False)
    failures, table = [], []
    for what, argv, pattern in _matrix(ws):
        before = _snapshot(ws)
        try:
            code, err = _run_in_process(argv, capsys)
        except BaseException as e:  # noqa: BLE001 - an escaped exception is one of the failures this test reports
            failures.append(f"{what}: raised {type(e).__name__}: {e}")
            continue
        lines = [line for line in err.splitlines() if "error:" in line]
        message = lines[-1] if lines else ""
        table.append(f"| {what} | {message} |")
        problems = []
        if code != 2:
            problems.append(f"exit {code}")
        if len(lines) != 1 or not err.rstrip().endswith(message):
            problems.append(f"{len(lines)} error lines, stderr ends {err[-300:]!r}")
        if "Traceback" in err:
            problems.append("traceback")
        if not re.search(pattern, message):
            problems.append(f"message {message!r} lacks {pattern!r}")
        after = _snapshot(ws)
        if after != before:
            changed = sorted(set(after.items()) ^ set(before.items()))
            problems.append(f"files changed: {changed[:5]}")
        if problems:
            failures.append(f"{what}: {'; '.join(problems)}")
    print("\n".join(table))
    assert not failures, "\n".join(failures)
    assert (ws / "full" / "keep.txt").read_text() == "keep me"


def _longlora(*args, cwd, debug_env=None):
    env = {k: v for k, v in os.environ.items() if k != "LONGLORA_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    if debug_env:
        env["LONGLORA_DEBUG"] = debug_env
    return subprocess.run([sys.executable, "-m", "longlora.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("case", ["train: YAML syntax error", "merge: output dir not empty",
                                  "eval perplexity: data file empty"])
def test_bad_input_in_a_real_process_is_one_line(ws, case):
    """The whole of stderr of a real `longlora` process: one line (no log, warning or progress bar before it)."""
    argv = dict((what, argv) for what, argv, _ in _matrix(ws))[case]
    before = _snapshot(ws)
    proc = _longlora(*argv, cwd=ws)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert _snapshot(ws) == before


def test_debug_flag_or_variable_lets_the_exception_through(ws, monkeypatch, capsys):
    argv = dict((what, argv) for what, argv, _ in _matrix(ws))["train: YAML syntax error"]
    monkeypatch.delenv("LONGLORA_DEBUG", raising=False)
    with pytest.raises(ValueError, match="not valid YAML"):
        cli_main(["--debug", *argv])
    with pytest.raises(ValueError, match="not valid YAML"):
        cli_main([*argv, "--debug"])
    monkeypatch.setenv("LONGLORA_DEBUG", "1")
    with pytest.raises(ValueError, match="not valid YAML"):
        cli_main(argv)
    monkeypatch.setenv("LONGLORA_DEBUG", "0")
    assert cli_main(argv) == 2 and "not valid YAML" in capsys.readouterr().err


def test_a_bug_is_not_hidden_as_a_user_error(monkeypatch):
    """Only user errors become one line: anything else (a bug) keeps its traceback."""
    import longlora.train

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(longlora.train, "cmd_train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli_main(["train", "--model", "m", "--data", "d"])
