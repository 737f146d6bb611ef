import json

import pytest
import torch

from lorq.errors import LorqError
from lorq.models.loading import load_tokenizer
from lorq.train.data import IGNORE, DataConfig, load_blocks, pydoc_split, read_records, tokenize_chat


@pytest.fixture(scope="module")
def tok(real_tokenizer_dir):
    return load_tokenizer(real_tokenizer_dir)


def test_pydoc_split_is_deterministic_disjoint_about_ten_percent():
    train, val = pydoc_split()
    assert pydoc_split() == (train, val)
    assert not set(train) & set(val)
    assert 0.08 <= len(val) / (len(train) + len(val)) <= 0.12


def test_embedded_blocks(tok):
    train, val = load_blocks(tok, DataConfig(block_size=64))
    assert train.input_ids.shape[1] == 64 and len(train) > 10 * len(val) / 2 and len(val) > 0
    assert torch.equal(train.input_ids, train.labels)


def test_text_and_jsonl_records(tmp_path, tok):
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} " * 20}) for i in range(30)))
    assert read_records(tmp_path / "a.txt") == ["hello world\n" * 50]
    train, val = load_blocks(tok, DataConfig(train_file=str(tmp_path / "b.jsonl"), block_size=16))
    assert len(val) == (len(train) + len(val)) // 10


def test_chat_loss_only_on_assistant_tokens(tok):
    msgs = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "Six."},
    ]
    ids, labels = tokenize_chat(tok, msgs)
    learned = tok.decode([t for t, l in zip(ids, labels) if l != IGNORE])
    assert "Four." in learned and "Six." in learned
    assert "2+2" not in learned and "3+3" not in learned and "system" not in learned
    assert all(l in (t, IGNORE) for t, l in zip(ids, labels))


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ('{"text": "ok"}\n{broken\n', ":2: not valid JSON"),
    ('{"title": "no text"}\n', "expected an object with a `text`"),
    ('{"messages": [{"role": "user"}]}\n', "string `role` and `content`"),
])
def test_bad_data_files(tmp_path, content, message):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(LorqError, match=message):
        read_records(p)


def test_too_little_data(tmp_path, tok):
    p = tmp_path / "d.txt"
    p.write_text("short")
    with pytest.raises(LorqError, match="fewer than one block"):
        load_blocks(tok, DataConfig(train_file=str(p), validation_file=str(p), block_size=64))
    with pytest.raises(LorqError, match="not found"):
        read_records(tmp_path / "missing.txt")
