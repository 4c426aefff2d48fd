"""ResumeStore: the commit point, ordering, the run key, cleanup of superseded hidden states."""

import json

import pytest
import torch

from hfquant.core.errors import ConfigError
from hfquant.quantize.resume import ResumeStore


def test_blocks_commit_in_order_and_reload(tmp_path):
    store = ResumeStore(tmp_path / "p", "key-1")
    store.start(resume=False)
    hidden = [torch.randn(2, 3, 4), torch.randn(1, 3, 4)]
    store.save_block(0, {"a:codes": torch.arange(6).view(2, 3)}, {"a": {"loss": 1.5}}, hidden)
    with pytest.raises(RuntimeError):
        store.save_block(2, {}, {}, hidden)  # block 1 missing
    store.save_block(1, {"b:codes": torch.ones(2)}, {"b": {"loss": 2.0}}, [h * 2 for h in hidden])
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == ["block-0.json", "block-0.safetensors", "block-1.json", "block-1.safetensors",
                     "hidden-2.safetensors", "state.json"]  # hidden-1 superseded and removed, no .tmp left

    again = ResumeStore(tmp_path / "p", "key-1")
    again.start(resume=True)
    assert again.blocks_done == 2 and again.resumed_from == 2
    tensors, meta = again.load_block(0)
    assert torch.equal(tensors["a:codes"], torch.arange(6).view(2, 3)) and meta == {"a": {"loss": 1.5}}
    assert all(torch.equal(a, b * 2) for a, b in zip(again.load_hidden(), hidden, strict=True))


def test_state_is_the_commit_point(tmp_path):
    store = ResumeStore(tmp_path / "p", "k")
    store.start(resume=False)
    store.put("ppl_before", {"value": 3.0})
    # a block file written but not committed (a kill between the block file and state.json) is ignored
    (tmp_path / "p" / "block-0.safetensors").write_bytes(b"partial")
    again = ResumeStore(tmp_path / "p", "k")
    again.start(resume=True)
    assert again.blocks_done == 0 and again.get("ppl_before") == {"value": 3.0}


def test_other_runs_progress_is_refused_and_fresh_start_clears(tmp_path):
    store = ResumeStore(tmp_path / "p", "k")
    store.start(resume=False)
    store.save_block(0, {}, {}, [torch.zeros(1)])
    with pytest.raises(ConfigError, match="the recipe, model or calibration data changed since"):
        ResumeStore(tmp_path / "p", "other").start(resume=True)
    fresh = ResumeStore(tmp_path / "p", "other")
    fresh.start(resume=False)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["state.json"]
    assert json.loads((tmp_path / "p" / "state.json").read_text())["blocks_done"] == 0
