import torch

from lorq.serve.kv import KVPool


def test_pool_grows_without_losing_keys_and_moves_slots():
    pool = KVPool(layers=2, slots=3, kv_heads=2, head_dim=4, dtype=torch.float32, capacity=4)
    for t in pool.k + pool.v:
        t.copy_(torch.randn_like(t))
    before = [t.clone() for t in pool.k + pool.v]
    pool.reserve(4)
    assert pool.capacity == 4
    pool.reserve(5)
    assert pool.capacity == 8 and pool.k[0].shape == (3, 2, 8, 4)
    for old, new in zip(before, pool.k + pool.v):
        torch.testing.assert_close(new[:, :, :4], old)
    pool.move(2, 0, 3)
    for t in pool.k + pool.v:
        torch.testing.assert_close(t[0, :, :3], t[2, :, :3])
    assert pool.nbytes == 2 * 2 * 3 * 2 * 8 * 4 * 4
