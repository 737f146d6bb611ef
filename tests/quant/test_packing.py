import pytest
import torch

from lorq.quant.packing import byte_pair_table, byte_table, decode_bytes, pack_bits, packed_size, pairs_pay, unpack_bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 64, 1001])
def test_pack_unpack_roundtrip(bits, n):
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_sizes_are_tight():
    assert [packed_size(1000, b) for b in (2, 3, 4, 8)] == [250, 375, 500, 1000]


def test_layout_is_a_big_endian_bit_stream():
    assert pack_bits(torch.tensor([0xA, 0x5]), 4).tolist() == [0xA5]  # bitsandbytes: first in the high nibble
    assert pack_bits(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b11000110]
    # eight 3-bit codes -> 24 bits -> 3 bytes
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    stream = "".join(f"{c:03b}" for c in codes.tolist())
    assert pack_bits(codes, 3).tolist() == [int(stream[i:i + 8], 2) for i in (0, 8, 16)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_decode_bytes_is_the_level_of_every_code(bits, dtype):
    # rows of 1-4 values of 2-32 bytes: every gather width (int16, int32, int64) and the row copy
    levels = torch.randn(2**bits - 3).to(dtype)  # fewer levels than codes, as FP8 / FP4
    codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
    values = decode_bytes(byte_table(levels, bits), pack_bits(codes, bits))
    assert values.dtype == dtype and values.numel() == packed_size(1001, bits) * 8 // bits
    assert torch.equal(values[:1001], levels[codes.long().clamp(max=levels.numel() - 1)])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("count,offset", [(1000, 0), (1001, 0), (1000, 1), (1, 0)])
def test_byte_pairs_decode_as_single_bytes(bits, dtype, count, offset):
    # an odd count or a view starting at an odd byte falls back to single bytes; same values
    levels = torch.randn(2**bits - 3).to(dtype)
    table = byte_table(levels, bits)
    packed = torch.randint(0, 256, (count + offset,), dtype=torch.uint8)[offset:]
    pairs = byte_pair_table(table)
    assert pairs.shape == (65536, 2 * table.shape[1])
    assert torch.equal(decode_bytes(table, packed, pairs), decode_bytes(table, packed))
    assert pairs_pay(table) == (table.shape[1] * table.element_size() <= 4)
