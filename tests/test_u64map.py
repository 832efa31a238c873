"""U64Map against a dict, through random single and bulk operations."""

from __future__ import annotations

import random

import numpy as np
import pytest

from xdpfw.rules.u64map import U64Map


@pytest.mark.parametrize("seed", range(5))
def test_u64map_behaves_like_a_dict(seed):
    rng = random.Random(seed)
    m, ref = U64Map(16), {}
    space = [rng.getrandbits(rng.choice([8, 20, 40, 62])) for _ in range(3000)]
    for _ in range(300):
        op = rng.random()
        if op < 0.3:
            k, v = rng.choice(space), rng.getrandbits(40)
            m.put(k, v)
            ref[k] = v
        elif op < 0.45:
            k = rng.choice(space)
            assert m.pop(k) == ref.pop(k, None)
        elif op < 0.75:
            ks = list({rng.choice(space) for _ in range(rng.randint(1, 200))})
            vs = [rng.getrandbits(40) for _ in ks]
            m.put_many(np.array(ks, dtype=np.uint64), np.array(vs, dtype=np.int64))
            ref.update(zip(ks, vs, strict=True))
        else:
            ks = list({rng.choice(space) for _ in range(rng.randint(1, 100))})
            got = m.pop_many(np.array(ks, dtype=np.uint64))
            assert got.tolist() == [ref.pop(k, -1) for k in ks]
        assert len(m) == len(ref)
    probe = np.array(space, dtype=np.uint64)
    assert m.get_many(probe).tolist() == [ref.get(k, -1) for k in space]
    assert all(m.get(k) == ref.get(k) for k in space[:200])
    keys, vals = m.items()
    assert dict(zip(keys.tolist(), vals.tolist(), strict=True)) == ref
