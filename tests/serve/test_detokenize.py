"""Incremental detokenization gives the whole decode's text at every token, decoding a tail."""

import pytest
from transformers import PreTrainedTokenizerFast

from lorq.serve.detokenize import Detokenizer

MIXED = ("def f(x):\n    return x ** 2  # naïve, café, Straße, 東京タワー, 🙂🚀 and ＡＢＣ\n\n"
         "Unicode: Ω ≈ ç √ ∫ — «quotes» ‘single’; emoji sequences 👩‍💻 👨‍👩‍👧 and flags 🇫🇷 🇯🇵.  ")


def texts_agree(tok, ids):
    det, calls = Detokenizer(), []
    decode = tok.decode

    def spy(tokens, **kw):
        calls.append(len(tokens))
        return decode(tokens, **kw)

    tok.decode = spy
    try:
        for k in range(1, len(ids) + 1):
            assert det.text(tok, ids[:k]) == decode(ids[:k], skip_special_tokens=True), k
    finally:
        del tok.decode
    return calls


def test_byte_level_bpe_including_split_characters_and_special_tokens(real_tokenizer_dir):
    from pydoc_data.topics import topics

    from lorq.models.loading import load_tokenizer

    tok = load_tokenizer(real_tokenizer_dir)
    ids = tok(MIXED + topics["for"][:3000], add_special_tokens=False)["input_ids"]
    ids[40:40] = [tok.eos_token_id]  # skipped, as the engine skips special tokens
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(1, 80))  # some tokens end mid-character
    calls = texts_agree(tok, ids)
    assert max(calls[200:]) <= 16  # each token decodes a short tail, not the whole output


def test_a_metaspace_tokenizer_keeps_its_word_boundaries():
    """SentencePiece-style: the decoder strips the space that starts a text, so a tail decoded
    without its context would lose a word boundary."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    corpus = ["the quick brown fox jumps over the lazy dog", "a dog and a fox", "quickly jumping foxes"] * 20
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>")
    ids = tok("the quick brown fox jumps over the lazy dog and a quick dog", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "the quick brown fox jumps over the lazy dog and a quick dog"
    texts_agree(tok, ids)
