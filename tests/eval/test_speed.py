from lorq.eval.speed import decode_tokens_per_s, prefill_tokens_per_s


def test_speed_measurements_run(tiny_llama):
    tiny_llama.eval()
    assert prefill_tokens_per_s(tiny_llama, tokens=16, repeats=1, vocab=128) > 0
    # enough tokens that decoding outlasts timing noise on a busy machine (else the rate is nan)
    assert decode_tokens_per_s(tiny_llama, new_tokens=24, prompt_tokens=4, repeats=3, vocab=128) > 0
