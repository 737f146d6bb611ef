"""Model names and paths: what `--model` resolves to and what a model is called."""
from pathlib import Path

import pytest

from lorq.errors import LorqError
from lorq.models.loading import DEFAULT_MODEL, model_label, resolve_model


@pytest.mark.parametrize("given, label", [(None, DEFAULT_MODEL), (DEFAULT_MODEL, DEFAULT_MODEL), ("x.gguf", "x"),
                                          ("dir/x.gguf", "x"), ("models/tiny", "tiny"), ("models/tiny/", "tiny")])
def test_model_label_is_the_name_given_not_a_cache_directory(given, label):
    assert model_label(given) == label


def test_model_label_of_the_working_directory_is_its_name(tmp_path, monkeypatch):
    """`--model .` must not serve a model with an empty id."""
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path / "mine")
    assert model_label(".") == "mine" and model_label("./") == "mine"


@pytest.mark.parametrize("name, message", [("", "--model is empty"), ("   ", "--model is empty"), ("no/such/model", "not found"),
                                           ("plain.txt", "neither a model directory nor a .gguf file")])
def test_resolve_model_refuses_what_is_not_a_model(name, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("plain.txt").write_text("x")
    with pytest.raises(LorqError, match=message):
        resolve_model(name)


def test_resolve_model_wants_a_config_in_a_directory(tmp_path):
    with pytest.raises(LorqError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_a_model_directory_without_tokenizer_files_says_so(tiny_model_dir, tmp_path):
    from lorq.models.loading import load_tokenizer

    (tmp_path / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    with pytest.raises(LorqError, match=r"cannot load the tokenizer in .*: it has no tokenizer files \(tokenizer.json"):
        load_tokenizer(tmp_path)
