"""Every command, option and repository file that README.md and docs/ name exists.

Commands and their options are checked against the real parsers: `longlora.cli`'s argparse tree; for `train` / `sft`
(which take any config field as `--field-name`) the fields of TrainConfig / SFTConfig and of TrainingArguments (passed
through); for `benchmarks/X.py` the parser its `main` builds (captured in-process, nothing runs). An option named
outside a command must belong to one of those. File paths (under src/, tests/, benchmarks/, docs/, configs/, .ci/,
or a relative Markdown link) must exist in the repository; `make` targets must be in the Makefile.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import re
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs").glob("*/*.md"))]
PLACEHOLDERS = {"--key"}  # `longlora train [--key value ...]`: stands for any option
# outputs the docs describe that a run has not made yet (no GPU run of fidelity_gpu.py so far)
NOT_YET_WRITTEN = {"docs/benchmarks/fidelity_gpu.{json,png}"}
TOP_DIRS = ("src", "tests", "benchmarks", "docs", "configs", ".ci")
PATH_RE = re.compile(r"(?<![\w./$~\[-])(?<!\]\()((?:%s)/[\w.*{},/-]*[\w*}/])" % "|".join(re.escape(d) for d in TOP_DIRS))
OPTION_RE = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*)")
FENCE_RE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE_RE = re.compile(r"`([^`]+)`")
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
COMMAND_END = {"|", "||", "&&", ";", "#", "2>&1", ">"}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for s in parser._option_string_actions if s.startswith("--")}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@lru_cache(maxsize=None)
def cli_commands() -> tuple[set[str], dict[tuple[str, ...], set[str]]]:
    """(top-level options, {command path: its options}) of `longlora`."""
    from transformers import TrainingArguments

    from longlora.cli import _parser
    from longlora.config import TrainConfig
    from longlora.sft import SFTConfig

    top = _parser()
    commands: dict[tuple[str, ...], set[str]] = {}

    def walk(parser, path):
        subs = _subcommands(parser)
        commands[path] = _options(parser) if not subs else set()
        for name, sub in subs.items():
            walk(sub, path + (name,))

    walk(top, ())
    passthrough = {f.name for f in dataclasses.fields(TrainingArguments)}
    for name, cls in (("train", TrainConfig), ("sft", SFTConfig)):
        fields = {f.name for f in dataclasses.fields(cls)} - {"training_args"}
        commands[(name,)] = {"--" + n.replace("_", "-") for n in fields | passthrough} | {
            "--help", "-h", "--help-options", "--debug"}
    return _options(top), commands


@lru_cache(maxsize=None)
def script_options(script: str) -> set[str]:
    """The options of benchmarks/<script>: the parser its main() builds, captured at parse_args."""
    path = ROOT / "benchmarks" / script
    assert path.is_file(), f"benchmarks/{script} does not exist"
    captured = []

    class Captured(Exception):
        pass

    def capture(self, args=None, namespace=None):
        captured.append(self)
        raise Captured

    saved_path, saved_parse = list(sys.path), argparse.ArgumentParser.parse_args
    try:
        sys.path.insert(0, str(path.parent))  # as when run as a script: its folder first (for _measure etc.)
        spec = importlib.util.spec_from_file_location(f"docs_check_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        argparse.ArgumentParser.parse_args = capture
        with pytest.raises(Captured):
            module.main([])
    finally:
        argparse.ArgumentParser.parse_args = saved_parse
        sys.path[:] = saved_path
    return _options(captured[0]) | {"-h"}


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def code_units(text: str) -> tuple[list[str], str]:
    """(command-like code: each line of a shell block, each inline span; the prose left over)."""
    units = []
    for lang, body in FENCE_RE.findall(text):
        if lang in ("", "bash", "sh", "shell", "console"):
            units += body.replace("\\\n", " ").splitlines()
    prose = FENCE_RE.sub(" ", text)
    units += [span.replace("\n", " ") for span in INLINE_RE.findall(prose)]
    return units, INLINE_RE.sub(" ", prose)


def check_unit(unit: str) -> tuple[list[str], list[str]]:
    """(problems, options named outside any command) of one piece of code."""
    top_options, commands = cli_commands()
    problems, bare = [], []
    tokens = [t.strip("[](),") for t in unit.split()]
    command, allowed, seen_command, before_command = None, set(), False, []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in ("longlora", "longlora.cli") and (i == 0 or tokens[i - 1] not in ("import", "from")):
            i += 1
            while i < len(tokens) and tokens[i] in top_options:
                i += 1
            path: tuple[str, ...] = ()
            while i < len(tokens) and re.fullmatch(r"[a-z][a-z-]*", tokens[i]) and _subcommands_of(path):
                path += (tokens[i],)
                i += 1
            command, allowed, seen_command = path, commands.get(path, set()) | top_options, True
            if path not in commands:
                problems.append(f"`longlora {' '.join(path)}` is not a command")
                command = None
            elif path and _subcommands_of(path):
                problems.append(f"`longlora {' '.join(path)}` needs a subcommand: {sorted(_subcommands_of(path))}")
            continue
        script = re.fullmatch(r"(?:\./)?benchmarks/([a-z]\w*\.py)", token)
        if script and not (ROOT / "benchmarks" / script.group(1)).is_file():
            problems.append(f"benchmarks/{script.group(1)} does not exist")
            command, seen_command = None, True
        elif script:
            command, allowed, seen_command = (f"benchmarks/{script.group(1)}",), script_options(script.group(1)), True
        elif token == "make" and i + 1 < len(tokens):
            if tokens[i + 1] not in make_targets():
                problems.append(f"`make {tokens[i + 1]}`: no such target in the Makefile")
            command = None
        elif token in COMMAND_END or token.startswith("#"):
            command = None
        elif token.startswith("--") and token not in PLACEHOLDERS:
            option = token.split("=", 1)[0]
            if not OPTION_RE.fullmatch(option):
                pass
            elif command is not None:
                ok = option in allowed or (
                    command in (("train",), ("sft",)) and option.startswith("--no-") and "--" + option[5:] in allowed
                )
                if not ok:
                    name = command[0] if command[0].startswith("benchmarks/") else "longlora " + " ".join(command)
                    problems.append(f"`{name}` has no option {option}")
            elif not seen_command:
                before_command.append(option)
        i += 1
    # options before a command on the line are a launcher's (torchrun, accelerate); on a line without one, bare
    return problems, bare + ([] if seen_command else before_command)


def _subcommands_of(path: tuple[str, ...]) -> set[str]:
    _, commands = cli_commands()
    return {p[len(path)] for p in commands if len(p) == len(path) + 1 and p[:len(path)] == path}


def all_options() -> set[str]:
    top, commands = cli_commands()
    scripts = {p.name for p in (ROOT / "benchmarks").glob("[a-z]*.py")}
    return top.union(*commands.values(), *(script_options(s) for s in scripts))


def path_exists(text: str, base: Path) -> bool:
    text = text.split("#", 1)[0].rstrip("/")
    pattern = re.sub(r"\{([^}]*)\}", lambda m: "[" + "".join(sorted(set(m.group(1).replace(",", "")))) + "]*", text)
    return bool(glob.glob(str(base / pattern)))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_and_options_named_in_docs_exist(doc):
    units, prose = code_units(doc.read_text(encoding="utf-8"))
    problems, bare = [], OPTION_RE.findall(prose)
    for unit in units:
        unit_problems, unit_bare = check_unit(unit)
        problems += unit_problems
        bare += unit_bare
    known = all_options()
    problems += [f"option {o} is not an option of any command or benchmark" for o in sorted(set(bare))
                 if o not in known and o not in PLACEHOLDERS]
    assert not problems, f"{doc.relative_to(ROOT)}:\n" + "\n".join(sorted(set(problems)))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_files_named_in_docs_exist(doc):
    text = doc.read_text(encoding="utf-8")
    missing = [p for p in PATH_RE.findall(text) if not path_exists(p, ROOT) and p not in NOT_YET_WRITTEN]
    for target in LINK_RE.findall(text):
        if not re.match(r"[a-z]+:|#", target) and not path_exists(target, doc.parent):
            missing.append(target)
    assert not missing, f"{doc.relative_to(ROOT)} names files that do not exist: {sorted(set(missing))}"


def test_the_checks_catch_what_they_should():
    """The checker itself: a removed option, an unknown command, a missing file are caught; real ones pass."""
    assert check_unit("longlora merge --model B --adapter A --output O --rope-factor 2")[0] == []
    assert check_unit("longlora merge --model B --rope-factr 2")[0] == ["`longlora merge` has no option --rope-factr"]
    assert check_unit("longlora eval perplexity --lengths 1024 --protocol sliding")[0] == []
    assert check_unit("longlora eval ppl --model M")[0] == ["`longlora eval ppl` is not a command"]
    assert check_unit("longlora eval-ppl --model M")[0] == ["`longlora eval-ppl` is not a command"]
    assert check_unit("longlora train c.yaml --max-steps 3 --no-gradient-checkpointing --report-to none")[0] == []
    assert check_unit("longlora sft --max-stepz 3")[0] == ["`longlora sft` has no option --max-stepz"]
    assert check_unit("torchrun --nproc_per_node 8 -m longlora.cli train --resume auto") == ([], [])
    assert check_unit("python benchmarks/attention.py --lengths 512 --output x.json")[0] == []
    assert check_unit("python benchmarks/attention.py --lenghts 512")[0] == [
        "`benchmarks/attention.py` has no option --lenghts"]
    assert check_unit("make tset")[0] == ["`make tset`: no such target in the Makefile"]
    assert "--nonexistent-option" not in all_options() and "--sequence-parallel" in all_options()
    assert path_exists("docs/benchmarks/ablation*.json", ROOT) and path_exists("src/longlora/io.py", ROOT)
    assert not path_exists("src/longlora/data.py", ROOT)
    assert PATH_RE.findall("see src/longlora/io.py. and $OUT/docs/x.json") == ["src/longlora/io.py"]
