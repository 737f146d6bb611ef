"""Output guards: nothing lorq writes may replace or delete files that are not its own output."""

import os

import pytest

from lorq.errors import LorqError
from lorq.io import atomic_dir, check_output_dir, check_output_file


def test_a_non_empty_foreign_directory_is_refused_and_kept(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(LorqError, match="not a quantized checkpoint written by lorq"):
        check_output_dir(tmp_path / "mine", "quantized checkpoint", ("lorq_quant.json",))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"


def test_an_earlier_output_of_the_kind_an_empty_or_missing_directory_pass(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "lorq_quant.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    for out in ("q", "empty", "new"):
        check_output_dir(tmp_path / out, "quantized checkpoint", ("lorq_quant.json",))


def test_overlaps_files_and_the_working_directory_are_refused(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "file").write_text("x")
    for out in (model, model / "sub", tmp_path):  # the input itself, inside it, above it
        with pytest.raises(LorqError, match="overlaps"):
            check_output_dir(out, "merged model", ("merge_report.json",), reads=[model])
    with pytest.raises(LorqError, match="not a directory"):
        check_output_dir(tmp_path / "file", "merged model", ("merge_report.json",))
    monkeypatch.chdir(model)
    for out in (".", ".."):
        with pytest.raises(LorqError, match="current directory"):
            check_output_dir(out, "merged model", ("merge_report.json",))
    check_output_dir(".", "fine-tuning run", ("metrics.jsonl",), parts=("adapter",))  # replaces only its parts
    with pytest.raises(LorqError, match="overlaps"):  # ... which must not hold an input
        check_output_dir(tmp_path, "fine-tuning run", ("metrics.jsonl",), reads=[model], parts=("model",))


def test_empty_names_and_symlinks_are_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out in ("", " "):
        with pytest.raises(LorqError, match="empty"):
            check_output_dir(out, "merged model", ("merge_report.json",))
    for out in ("link", "dangling"):
        with pytest.raises(LorqError, match="symbolic link"):
            check_output_dir(tmp_path / out, "merged model", ("merge_report.json",))
        with pytest.raises(LorqError, match="symbolic link"):
            check_output_file(tmp_path / out, b"GGUF", "GGUF file")


def test_output_files_replace_only_their_own_kind(tmp_path):
    (tmp_path / "old.gguf").write_bytes(b"GGUF\x03\x00")
    (tmp_path / "notes.txt").write_text("keep me")
    check_output_file(tmp_path / "old.gguf", b"GGUF", "GGUF file")
    check_output_file(tmp_path / "new.gguf", b"GGUF", "GGUF file")
    with pytest.raises(LorqError, match="not a GGUF file"):
        check_output_file(tmp_path / "notes.txt", b"GGUF", "GGUF file")
    with pytest.raises(LorqError, match="is a directory"):
        check_output_file(tmp_path, b"GGUF", "GGUF file")
    with pytest.raises(LorqError, match="overlaps"):
        check_output_file(tmp_path / "model" / "model.safetensors", b"GGUF", "GGUF file", reads=[tmp_path])


def test_atomic_dir_never_turns_a_file_into_a_directory(tmp_path):
    (tmp_path / "f").write_text("keep me")
    with pytest.raises(LorqError, match="not a directory"):
        with atomic_dir(tmp_path / "f"):
            pass
    assert (tmp_path / "f").read_text() == "keep me"


def test_atomic_dir_interrupted_between_its_renames_puts_the_old_output_back(tmp_path, monkeypatch):
    import lorq.io

    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    real, calls = os.replace, []

    def replace_then_interrupt(src, dst):
        calls.append(dst)
        real(src, dst)
        if len(calls) == 1:  # the old output is aside, the new one not yet in place
            raise KeyboardInterrupt

    monkeypatch.setattr(lorq.io.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("new")
    monkeypatch.setattr(lorq.io.os, "replace", real)
    assert (out / "a").read_text() == "old" and os.listdir(tmp_path) == ["out"]


def test_atomic_dir_outputs_get_the_umask_mode_and_long_names_fit(tmp_path):
    old = os.umask(0o022)
    try:
        name = "y" * 250  # legal (< 255), so a temporary sibling must not be longer
        with atomic_dir(tmp_path / name) as tmp:
            (tmp / "f").write_text("x")
        assert (tmp_path / name / "f").read_text() == "x"
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(old)
