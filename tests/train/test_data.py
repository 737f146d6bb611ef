import json

import pytest
import torch

from lorq.errors import LorqError
from lorq.models.loading import load_tokenizer
from lorq.eval.perplexity import next_token_nll
from lorq.train.data import IGNORE, DataConfig, document_positions, load_blocks, pack, pydoc_split, read_records, tokenize_chat


@pytest.fixture(scope="module")
def tok(real_tokenizer_dir):
    return load_tokenizer(real_tokenizer_dir)


def test_pydoc_split_is_deterministic_disjoint_about_ten_percent():
    train, val = pydoc_split()
    assert pydoc_split() == (train, val)
    assert not set(train) & set(val)
    assert 0.08 <= len(val) / (len(train) + len(val)) <= 0.12


def test_embedded_blocks(tok):
    train, val = load_blocks(tok, DataConfig(block_size=64, packing="stream"))
    assert train.input_ids.shape[1] == 64 and len(train) > 10 * len(val) / 2 and len(val) > 0
    assert torch.equal(train.input_ids, train.labels) and train.position_ids is None and val.position_ids is None


def test_document_positions_restart_at_documents_and_blocks():
    pos = document_positions(12, [0, 3, 9], block_size=4)
    assert pos.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 0, 0, 1, 2]


def test_document_packing_keeps_documents_apart(tok):
    docs = load_blocks(tok, DataConfig(block_size=64))[0]
    stream = load_blocks(tok, DataConfig(block_size=64, packing="stream"))[0]
    assert torch.equal(docs.input_ids, stream.input_ids)
    inner = (docs.position_ids == 0) & (torch.arange(64) > 0)  # a document starts inside the block
    assert inner.any() and (docs.position_ids[:, 0] == 0).all()
    assert (docs.labels[inner] == IGNORE).all()  # no document predicts the next one's first token
    assert torch.equal(docs.labels[~inner], stream.labels[~inner])
    eos = docs.input_ids[:, :-1][inner[:, 1:]]
    assert (eos == tok.eos_token_id).all()  # each starts right after the previous one's EOS
    held_out = load_blocks(tok, DataConfig(block_size=64))[1]
    assert held_out.position_ids is None  # validation is the stream perplexity, whatever the packing


def test_a_packed_block_scores_like_its_documents_alone(tiny_llama):
    """The oracle: with document positions, the loss of a packed row is the sum of the losses of
    its documents run one by one (stream packing lets the later ones see the earlier)."""
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (9, 14, 9)]
    ids = sum(docs, [])
    starts = [0, 9, 23]
    blocks = pack(ids, list(ids), starts, 32, "docs").as_documents()
    with torch.no_grad():
        packed, n = next_token_nll(tiny_llama, blocks.input_ids, blocks.labels, chunk=0, position_ids=blocks.position_ids)
        alone = [next_token_nll(tiny_llama, torch.tensor([d]), torch.tensor([d]), chunk=0) for d in docs]
        stream, _ = next_token_nll(tiny_llama, blocks.input_ids, blocks.as_stream().labels, chunk=0)
        stream_docs, _ = next_token_nll(tiny_llama, blocks.input_ids, blocks.labels, chunk=0)  # masked targets, no positions
    assert n == sum(k for _, k in alone) == 29
    torch.testing.assert_close(packed, sum(nll for nll, _ in alone), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(stream_docs, packed, rtol=1e-3) and stream.item() > 0


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


def test_an_evaluated_file_is_scored_to_its_last_token(tiny_llama):
    """`lorq eval --data-file` scores all of the file: the padded tail block adds the tail's
    tokens and nothing else (the oracle: the tail run alone)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (70,), generator=g).tolist()  # two blocks of 32 and a tail of 6
    cut = pack(ids, list(ids), [0], 32, "f").as_stream()
    padded = pack(ids, list(ids), [0], 32, "f", pad_tail=True).as_stream()
    assert len(cut) == 2 and len(padded) == 3 and torch.equal(padded.input_ids[:2], cut.input_ids)
    with torch.no_grad():
        whole, n = next_token_nll(tiny_llama, padded.input_ids, padded.labels, chunk=0)
        blocks, m = next_token_nll(tiny_llama, cut.input_ids, cut.labels, chunk=0)
        tail, k = next_token_nll(tiny_llama, torch.tensor([ids[64:]]), torch.tensor([ids[64:]]), chunk=0)
    assert (n, m, k) == (70 - 3, 62, 5)
    torch.testing.assert_close(whole, blocks + tail, rtol=1e-5, atol=1e-4)
    short = pack(ids[:5], ids[:5], [0], 32, "f", pad_tail=True)  # shorter than a block: still evaluated
    assert len(short) == 1 and (short.labels[0, 5:] == IGNORE).all()


def test_too_little_data(tmp_path, tok):
    p = tmp_path / "d.txt"
    p.write_text("short")
    with pytest.raises(LorqError, match="fewer than one block"):
        load_blocks(tok, DataConfig(train_file=str(p), validation_file=str(p), block_size=64))
    with pytest.raises(LorqError, match="not found"):
        read_records(tmp_path / "missing.txt")
    with pytest.raises(LorqError, match="packing must be one of documents, stream"):
        DataConfig(packing="document").validate()
