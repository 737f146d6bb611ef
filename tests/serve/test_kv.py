import torch

from lorq.serve.kv import KVPool


def test_pool_grows_to_the_batch_keeps_keys_moves_slots_and_shrinks():
    pool = KVPool(layers=2, kv_heads=2, head_dim=4, dtype=torch.float32)
    assert pool.nbytes == 0
    pool.fit(3, 4)  # capacity rounded up to 64 positions
    assert pool.k[0].shape == (3, 2, 64, 4)
    for t in pool.k + pool.v:
        t.copy_(torch.randn_like(t))
    before = [t.clone() for t in pool.k + pool.v]
    pool.fit(3, 64)
    assert pool.k[0].shape == (3, 2, 64, 4)  # it fits already
    pool.fit(9, 70)
    assert pool.k[0].shape == (9, 2, 128, 4) and pool.nbytes == pool.bytes_for(9, 70) == 2 * 2 * 9 * 2 * 128 * 4 * 4
    for old, new in zip(before, pool.k + pool.v):
        torch.testing.assert_close(new[:3, :, :64], old)
    pool.move(2, 0, 3)
    for t in pool.k + pool.v:
        torch.testing.assert_close(t[0, :, :3], t[2, :, :3])
    kept = [t[:2, :, :64].clone() for t in pool.k + pool.v]
    pool.shrink(2, 10)  # a ninth of what is held: given back, the first slots kept
    assert pool.k[0].shape == (2, 2, 64, 4)
    for old, new in zip(kept, pool.k + pool.v):
        torch.testing.assert_close(new, old)
    pool.shrink(2, 64)  # needs more than half of what is held: no reallocation
    assert pool.k[0].shape == (2, 2, 64, 4)
