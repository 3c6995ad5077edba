"""The KV buffer pool hands back zeroed buffers, reuses them, and stays within its byte bound."""
import gc

import torch

from murmur.memory import BufferPool, keep_freed_memory


class _Owner:
    pass


def test_pool_reuses_zeroed_buffers_within_its_bound():
    pool = BufferPool(keep=2, max_bytes=3 * 4000)
    a = _Owner()
    t = pool.zeros(a, (10, 100), torch.float32, "cpu")
    t.fill_(7.0)
    ptr = t.data_ptr()
    del a, t
    gc.collect()
    assert pool.nbytes == 4000
    b = _Owner()
    u = pool.zeros(b, (10, 100), torch.float32, "cpu")
    assert u.data_ptr() == ptr and not u.any()  # the same memory, zeroed again
    assert pool.nbytes == 0
    owners = [_Owner() for _ in range(4)]
    bufs = [pool.zeros(o, (10 * (i + 1), 100), torch.float32, "cpu") for i, o in enumerate(owners)]
    del owners, bufs
    gc.collect()
    assert pool.nbytes <= 3 * 4000  # the oldest shapes went first


def test_allocator_tuning_is_idempotent():
    first = keep_freed_memory()
    assert keep_freed_memory() == first


def test_pool_buffers_made_in_inference_mode_serve_owners_outside_it():
    import torch

    from murmur.memory import BufferPool
    pool = BufferPool()

    class Owner:
        pass

    a = Owner()
    with torch.inference_mode():
        t = pool.zeros(a, (4, 8), torch.float32, "cpu")
    assert not t.is_inference()
    del a, t
    b = Owner()
    u = pool.zeros(b, (4, 8), torch.float32, "cpu")  # the same buffer, handed back and zeroed
    u.add_(1.0)
    assert pool.nbytes == 0 and float(u.sum()) == 32.0
