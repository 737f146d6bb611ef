"""Output guards: nothing lorq writes may replace or delete files that are not its own output;
safetensors reads that are checked and do not depend on the file staying as it was."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorq.errors import LorqError
from lorq.io import atomic_dir, check_output_dir, check_output_file, load_safetensors


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


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    floats = {d: torch.randn(3, 5, generator=g).to(d) for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                                                 torch.float8_e4m3fn, torch.float8_e5m2)}
    ints = {d: torch.randint(0, 100, (4, 2), generator=g).to(d) for d in (torch.int64, torch.int32, torch.int16, torch.int8,
                                                                          torch.uint8, torch.uint16, torch.uint32, torch.uint64)}
    named = {f"t.{str(d).removeprefix('torch.')}": t for d, t in {**floats, **ints}.items()}
    return {**named, "mask": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 7)}


def test_load_safetensors_reads_what_safetensors_reads(tmp_path):
    tensors = every_dtype()
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    ours, theirs = load_safetensors(tmp_path / "x.safetensors"), load_file(tmp_path / "x.safetensors")
    assert ours.keys() == theirs.keys() == tensors.keys()
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape
        assert torch.equal(ours[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_loaded_tensors_survive_their_file_being_overwritten(tmp_path):
    """A server's cached adapter kept pointing into the file (a memory map): truncating the
    file killed the process with SIGBUS."""
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.arange(1 << 16, dtype=torch.float32)}, path)
    script = (f"import torch; from lorq.io import load_safetensors\n"
              f"w = load_safetensors({str(path)!r})['w']\n"
              f"open({str(path)!r}, 'r+b').truncate(100)  # overwritten in place, shorter\n"
              f"assert float(w.sum()) == float(torch.arange(1 << 16, dtype=torch.float32).sum()), 'weights changed under the process'")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) - 10], "lies outside the file"),
    (lambda b: (2).to_bytes(8, "little") + b"[]", "not a JSON object"),
    (lambda b: b[:5], "header length"),
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], "header length"),
    (lambda b: b.replace(b'"F32"', b'"F99"'), "bad header entry for w"),
])
def test_damaged_safetensors_files_are_one_line_errors(tmp_path, damage, message):
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(4, 4)}, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(LorqError, match=message):
        load_safetensors(path)
    with pytest.raises(LorqError, match="missing file"):
        load_safetensors(tmp_path / "nothing.safetensors")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_the_system_refuses_is_refused_before_the_work():
    """access() lets root through where creating a file still fails (/proc): a probe file says so."""
    with pytest.raises(LorqError, match="cannot create output /proc/lorq-out: /proc refuses new files"):
        check_output_dir("/proc/lorq-out", "quantized checkpoint", ("lorq_quant.json",))
    with pytest.raises(LorqError, match="refuses new files"):
        check_output_file("/proc/lorq.gguf", b"GGUF", "GGUF file")


def test_saved_safetensors_get_the_usual_mode_and_a_full_disk_is_an_os_error(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from lorq.io import save_safetensors

    old = os.umask(0o022)
    try:
        save_safetensors({"a": torch.zeros(2)}, tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644  # save_file alone: 0600

    def full(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as e:
        save_safetensors({"a": torch.zeros(2)}, tmp_path / "b.safetensors")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "b.safetensors")


def test_an_earlier_output_replaced_whole_may_hold_only_what_lorq_writes(tmp_path):
    """Any tokenizer's files, shards, named chat templates and an interrupted write's temporary
    are lorq's to replace; anything else refuses the output, by name."""
    from lorq.models.loading import HF_MODEL_FILES

    out = tmp_path / "q"
    out.mkdir()
    for name in ("lorq_quant.json", "report.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json",
                 "generation_config.json", "tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.txt", "merges.txt",
                 "chat_template.jinja", ".lorq-tmp-123-abcd"):
        (out / name).write_text("x")
    (out / "additional_chat_templates").mkdir()
    owned = ("lorq_quant.json", "report.json", *HF_MODEL_FILES)
    assert check_output_dir(out, "quantized checkpoint", ("lorq_quant.json",), owned=owned) == out
    (out / "NOTES.md").write_text("mine")
    (out / "eval").mkdir()
    with pytest.raises(LorqError, match=r"also holds what lorq did not write there \(NOTES.md, eval\)"):
        check_output_dir(out, "quantized checkpoint", ("lorq_quant.json",), owned=owned)
    assert (out / "NOTES.md").read_text() == "mine"
