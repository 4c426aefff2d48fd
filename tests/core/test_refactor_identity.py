"""Invariants the GPTQ solve's parts and the resume format must keep (fast, CPU).

* The lazy block update is only a reordering of the same updates: the block size must not change the
  result beyond float rounding, also where a group starts in the middle of a block or spills past its end
  (its grid must be fitted on columns that already received the block's pending updates).
* The resume store's per-module format (``<module>:<field>`` tensors, reports in the JSON under the module's
  name, restored in the saved order) is the on-disk format of existing progress folders.
"""

import pytest
import torch

from helpers import gptq_kw as gptq_quantize

from hfquant.quantize.resume import ResumeStore


def _problem(rows=24, cols=160, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=gen) * (torch.rand(cols, generator=gen) * 2 + 0.1)
    x[:, 5] = 0  # a dead input
    return torch.randn(rows, cols, generator=gen), 2 / x.shape[0] * x.t() @ x


@pytest.mark.parametrize("group_size", [32, 64, -1])  # 160 columns: 64 leaves a partial last group
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("static_groups", [False, True])
def test_block_size_only_reorders_the_updates(group_size, act_order, static_groups):
    w, h = _problem()
    kw = dict(bits=4, group_size=group_size, sym=False, act_order=act_order, static_groups=static_groups)
    every_column = gptq_quantize(w, h, block_size=1, **kw)  # every update applied at once: no lazy update
    for block_size in (48, 100, 1000):  # groups starting mid-block and spilling past it; one block
        res = gptq_quantize(w, h, block_size=block_size, **kw)
        assert torch.equal(res.g_idx, every_column.g_idx)
        assert (res.codes == every_column.codes).float().mean() > 0.99, block_size
        torch.testing.assert_close(res.scales, every_column.scales, rtol=0, atol=1e-5)
        assert abs(res.loss - every_column.loss) <= 1e-4 * every_column.loss, block_size


FIELDS = ("codes", "scales", "zeros", "g_idx")  # IntGrid's stored tensors: the on-disk names of progress folders


def test_module_results_round_trip_in_the_saved_format(tmp_path):
    store = ResumeStore(tmp_path / "p", "k")
    store.start(resume=False)
    gen = torch.Generator().manual_seed(0)
    modules = {name: dict(zip(FIELDS, (torch.randint(0, 16, (4, 8), generator=gen, dtype=torch.int32),
                                       torch.rand(4, 2, generator=gen),
                                       torch.randint(0, 16, (4, 2), generator=gen, dtype=torch.int32),
                                       torch.arange(8).int() // 4)))
               for name in ("m.layers.0.v_proj", "m.layers.0.q_proj", "m.layers.0.k_proj")}  # not sorted
    meta = {name: {"name": name, "method": "gptq", "loss": 0.5} for name in modules}
    hidden = [torch.randn(2, 3, 4)]
    store.save_modules(0, modules, meta, hidden)

    # the files hold ``<module>:<field>`` tensors and the records in the saved order
    tensors, raw_meta = store.load_block(0)
    assert set(tensors) == {f"{n}:{f}" for n in modules for f in FIELDS}
    assert list(raw_meta) == list(modules) and raw_meta == meta
    from hfquant.core import IntGrid
    assert IntGrid.fields == FIELDS

    again = ResumeStore(tmp_path / "p", "k")
    again.start(resume=True)
    loaded, loaded_meta = again.load_modules(0)
    assert list(loaded) == list(modules) and loaded_meta == meta
    for name, ts in modules.items():
        assert set(loaded[name]) == set(FIELDS)
        for f in FIELDS:
            assert loaded[name][f].dtype == ts[f].dtype and torch.equal(loaded[name][f], ts[f])


def test_blocks_saved_with_save_block_are_read_by_load_modules(tmp_path):
    """A progress folder written before ``save_modules`` existed (``save_block`` with ``<module>:<field>`` keys)."""
    store = ResumeStore(tmp_path / "p", "k")
    store.start(resume=False)
    codes, scales = torch.ones(2, 4, dtype=torch.int32), torch.rand(2, 1)
    zeros, g_idx = torch.zeros(2, 1, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)
    store.save_block(0, {"a.b:codes": codes, "a.b:scales": scales, "a.b:zeros": zeros, "a.b:g_idx": g_idx},
                     {"a.b": {"name": "a.b", "method": "rtn"}}, [torch.zeros(1)])
    loaded, meta = store.load_modules(0)
    assert meta == {"a.b": {"name": "a.b", "method": "rtn"}}
    assert all(torch.equal(loaded["a.b"][f], y) for f, y in zip(FIELDS, (codes, scales, zeros, g_idx), strict=True))
