"""Scale: layer-wise onloading, exact multi-process calibration, device_map loading (tiny models, CPU, gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import dist_quantize_worker, run_cli, small_calibration, tiny_tokenizer, write_recipe

import hfquant  # noqa: F401 - registers the quantizer
from hfquant.calibration.distributed import Dist
from hfquant.calibration.spill import DiskHiddenStore, HiddenStore
from hfquant.config import HFQuantConfig
from hfquant.app.recipe import RecipeError, validate


def _config(method="gptq", **kw):
    grid = {} if "gguf_type" in kw or method == "smoothquant" else {"group_size": 32}  # SmoothQuant: int8 per channel
    return HFQuantConfig(method=method, **grid, tokenizer=tiny_tokenizer(), **small_calibration(**kw))


def _full(folder, config, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    hfquant.quantize_(model, config, progress=False)
    return model


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method,activations", [("gptq", "device"), ("gptq", "disk"), ("gptq", "cpu"), ("rtn", "device"),
                                               ("smoothquant", "device"), ("rtn-head8", "device"),
                                               ("gptq-gguf", "device"), ("gptq-best", "disk")])
def test_layerwise_is_bit_identical_to_full_load(tiny_models, tmp_path, arch, method, activations):
    from hfquant.api import quantize_layerwise

    extra = {"weight_method": "gptq"} if method == "smoothquant" else {}
    if method == "rtn-head8":  # an 8-bit head (llama's is tied to the embeddings, qwen2's is not)
        method, extra = "rtn", {"lm_head_bits": 8}
    if method == "gptq-gguf":  # GGUF blocks; the head and embeddings rounded to their GGUF types
        method, extra = "gptq", {"gguf_type": "Q4_0"}
    if method == "gptq-best":  # asymmetric calibration: the float model's hidden states travel (and spill) too
        method, extra = "gptq", {"quality": "best"}
    full = _full(tiny_models[arch], _config(method, **extra))
    lw = quantize_layerwise(tiny_models[arch], _config(method, **extra), activations=activations,
                            offload_folder=tmp_path / "spill" if activations == "disk" else None, progress=False)
    assert not [k for k, v in lw.state_dict().items() if v.is_meta]
    _assert_same_state(full.state_dict(), lw.state_dict())
    if activations == "disk":
        assert list((tmp_path / "spill").iterdir()) == []  # the spill folder is removed afterwards
    full.save_pretrained(tmp_path / "full")
    lw.save_pretrained(tmp_path / "lw")
    assert json.loads((tmp_path / "full" / "config.json").read_text()) == json.loads((tmp_path / "lw" / "config.json").read_text())
    from safetensors.torch import load_file

    _assert_same_state(load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "lw" / "model.safetensors"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["gptq", "smoothquant"])
def test_layerwise_is_bit_identical_to_full_load_in_low_precision(tiny_models, dtype, method):
    from hfquant.api import quantize_layerwise

    full = _full(tiny_models["llama"], _config(method), dtype)
    lw = quantize_layerwise(tiny_models["llama"], _config(method), dtype=dtype, progress=False)
    _assert_same_state(full.state_dict(), lw.state_dict())
    assert {v.dtype for k, v in lw.state_dict().items() if k.endswith(".scales")} == ({dtype} if method == "gptq" else set())


def test_layerwise_never_holds_two_float_blocks(tiny_models):
    """While block i runs, no other block has float Linear weights loaded (they are meta or quantized)."""
    from hfquant.calibration.onload import LayerLoader
    from hfquant.api import quantize_layerwise

    seen = []
    original = LayerLoader.load_block

    def spy(self, index):
        original(self, index)
        loaded = [i for i, blk in enumerate(self.blocks)
                  if any(isinstance(m, torch.nn.Linear) and not m.weight.is_meta for m in blk.modules())]
        seen.append((index, loaded))

    LayerLoader.load_block = spy
    try:
        quantize_layerwise(tiny_models["llama"], _config(), progress=False)
    finally:
        LayerLoader.load_block = original
    assert seen == [(i, [i]) for i in range(len(seen))] and len(seen) == 2


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_layerwise_keeps_no_mapping_of_the_checkpoint(tiny_models, tmp_path):
    """Loaded tensors are private copies: a kept norm weight must not pin the file's memory map (and with
    it every page a block touched) until the end of the run."""
    import shutil

    from hfquant.calibration.onload import LayerLoader, empty_model

    folder = Path(shutil.copytree(tiny_models["llama"], tmp_path / "model"))  # a path no other test maps
    loader = LayerLoader(empty_model(folder, torch.float32), folder, "cpu", torch.float32)
    loader.load_outside()
    for i in range(len(loader.blocks)):
        loader.load_block(i)
    assert not loader.model.state_dict()["model.layers.0.input_layernorm.weight"].is_meta
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(folder.resolve()) in line]
    assert mapped == []


def test_disk_store_round_trip(tmp_path):
    store = DiskHiddenStore("cpu", tmp_path)
    xs = [torch.randn(2, 3, 4) for _ in range(3)]
    for b, x in enumerate(xs):
        store.put(b, x)
    store.advance()
    assert len(store) == 3 and all(torch.equal(store.get(b), x) for b, x in enumerate(xs))
    store.put(0, xs[2] * 2)
    store.advance()
    assert len(store) == 1 and torch.equal(store.get(0), xs[2] * 2)
    with pytest.raises(IndexError):
        store.get(1)
    store.close()
    assert list(tmp_path.iterdir()) == []
    mem = HiddenStore("cpu", "cpu")
    mem.put(0, xs[0])
    mem.advance()
    assert torch.equal(mem.get(0), xs[0])


@pytest.mark.parametrize("n,world", [(16, 2), (5, 2), (7, 3), (3, 3)])
def test_batch_ranges_partition_in_order(n, world):
    ranges = [Dist(r, world).batch_range(n) for r in range(world)]
    assert [b for r in ranges for b in r] == list(range(n))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


@pytest.mark.parametrize("rows,world,device,expected", [
    (576, 2, "cpu", [(0, 288), (288, 576)]), (1536, 3, "cpu", [(0, 512), (512, 1024), (1024, 1536)]),
    (160, 2, "cpu", [(0, 80), (80, 160)]), (136, 2, "cpu", [(0, 64), (64, 136)]), (127, 2, "cpu", [(0, 127)]),
    (64, 2, "cpu", [(0, 64)]), (200, 4, "cpu", [(0, 64), (64, 128), (128, 200)]), (576, 1, "cpu", [(0, 576)]),
    (576, 2, "cuda", [(0, 576)]),
])
def test_row_slabs(rows, world, device, expected):
    """Slabs cover the rows in order, one per rank but no more than rows // 64, cut at multiples of 16; whole on CUDA."""
    assert Dist(0, world).row_slabs(rows, device) == expected


@pytest.mark.parametrize("kw", [dict(bits=4, group_size=128, sym=True, observer="hessian"),
                                dict(bits=3, group_size=64, sym=False, observer="hessian", cross=True),
                                dict(bits=4, group_size=128, sym=False, observer="minmax", static_groups=False),
                                dict(bits=8, group_size=-1, sym=True),
                                dict(gguf_type="Q4_0", bits=4, group_size=32, sym=True)])
def test_row_slab_solves_join_to_the_whole_solve(kw):
    """The premise of sharing a solve by rows: GPTQ on row slabs of a weight, joined, is the whole solve bit for
    bit (act-order, static or fitted groups, Hessian-weighted grids, GPTAQ's cross term, a GGUF grid)."""
    from helpers import solve_kw as gptq_solve

    from hfquant.core.gptq import join_rows, prepare_hessian

    g = torch.Generator().manual_seed(0)
    rows, cols = 320, 384
    x = torch.randn(1024, cols, generator=g) * torch.linspace(0.2, 3, cols)
    w = torch.randn(rows, cols, generator=g)
    cross = (torch.randn(1024, cols, generator=g) * 0.1).t() @ x / 512 if kw.pop("cross", False) else None
    static = kw.pop("static_groups", True)
    factor = prepare_hessian(x.t() @ x / 512, act_order=True)
    solve = lambda part: gptq_solve(part, factor, static_groups=static, cross=cross, **kw).result  # noqa: E731
    whole = solve(w)
    for world in (2, 3):
        joined = join_rows([solve(w[r0:r1]) for r0, r1 in Dist(0, world).row_slabs(rows, "cpu")])
        for field in whole.format.fields:
            assert torch.equal(joined[field], whole[field]), (world, field)
        for field in ("row_losses", "pre"):
            assert torch.equal(getattr(joined, field), getattr(whole, field)), (world, field)
        assert torch.equal(joined.dequantized(), whole.dequantized())


def test_too_few_batches_for_the_processes():
    from hfquant.core.errors import CalibrationError

    with pytest.raises(CalibrationError, match="cannot be split across 3 processes"):
        Dist(0, 3).batch_range(2)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method,layerwise,dtype", [("gptq", False, "float32"), ("gptq", True, "float32"),
                                                   ("smoothquant", False, "float32"), ("gptq", False, "bfloat16"),
                                                   ("smoothquant", True, "float16"), ("gguf", False, "float32"),
                                                   ("gptq-best", True, "float32"), ("gptq-rec", False, "float32")])
def test_two_processes_bit_identical_to_one(tiny_models, tmp_path, method, layerwise, dtype):
    """Python API under PartialState (gloo, 2 processes x 1 thread) vs one process with 1 thread: every
    tensor and every reduced Hessian equal. 5 batches: an uneven split (3 + 2), so the chain crosses ranks
    mid-sequence. SmoothQuant: alpha search (samples gathered in batch order), maxima, GPTQ int8 weights."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    extra = dict(method="smoothquant", weight_method="gptq", activation_scheme="static") if method == "smoothquant" \
        else dict(method="gptq", gguf_type="Q4_K_M") if method == "gguf" \
        else dict(method="gptq", group_size=32, quality="best") if method == "gptq-best" \
        else dict(method="gptq", group_size=32, quality="best", reconstruct_steps=6) if method == "gptq-rec" \
        else dict(method="gptq", group_size=32)
    kw = dict(**extra, **small_calibration(num_samples=10, calibration_batch_size=2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dist_quantize_worker(0, 1, 0, str(tiny_models["llama"]), str(tmp_path / "one.safetensors"), kw, layerwise, dtype)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(dist_quantize_worker, args=(2, _port(), str(tiny_models["llama"]), str(tmp_path / "two.safetensors"),
                                         kw, layerwise, dtype), nprocs=2)
    _assert_same_state(load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors"))


def test_accelerate_launch_two_processes(tiny_models, tmp_path, capsys):
    """``accelerate launch --multi_gpu --num_processes 2 -m hfquant run`` on CPU (gloo): same checkpoint as
    ``hfquant run`` in one process with one thread; only the main process writes."""
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], tmp_path / "one",
                          evaluation={"before": False, "after": False})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_cli(["-q", "run", recipe], capsys)[0] == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_port())}
    launcher = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2",
                           "--num_cpu_threads_per_process", "1", "--main_process_port", env["MASTER_PORT"],
                           "-m", "hfquant", "-q", "run", str(recipe), "--output", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("saved to") == 1
    _assert_same_state(load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors"))
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["quantization"]["calibration"]["processes"] == 2


def test_recipe_layerwise_run_matches_full(tiny_models, tmp_path, capsys):
    from safetensors.torch import load_file

    ev = {"before": False, "after": True}
    full = write_recipe(tmp_path / "f.yaml", tiny_models["qwen2"], tmp_path / "full", evaluation=ev)
    lw = write_recipe(tmp_path / "l.yaml", tiny_models["qwen2"], tmp_path / "lw", evaluation=ev,
                      calibration={"layerwise": True, "activations": "disk", "offload_folder": str(tmp_path / "act")})
    assert run_cli(["-q", "run", full], capsys)[0] == 0
    assert run_cli(["-q", "run", lw], capsys)[0] == 0
    _assert_same_state(load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "lw" / "model.safetensors"))
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("full", "lw"))
    assert a["evaluation"]["after"] == b["evaluation"]["after"]
    assert b["quantization"]["layerwise"]["activations"] == "disk"
    code, _, err = run_cli(["run", lw, "--resume", "--output", tmp_path / "lw2"], capsys)
    assert code == 2 and "not supported with calibration.layerwise" in err


@pytest.mark.parametrize("calibration,message", [
    ({"layerwise": "yes"}, "calibration.layerwise: must be true or false"),
    ({"activations": "gpu"}, "calibration.activations: must be one of"),
    ({"offload_folder": "/tmp/x"}, "calibration.offload_folder: is only used with activations: disk"),
    ({"activations": "disk", "offload_folder": 3}, "calibration.offload_folder: must be a folder path"),
])
def test_recipe_loading_keys_are_checked(tiny_models, calibration, message):
    with pytest.raises(RecipeError, match=message):
        validate({"model": str(tiny_models["llama"]), "output_dir": "o", "calibration": calibration})


def test_recipe_smoothquant_activations_stay_on_device(tiny_models):
    with pytest.raises(RecipeError, match="calibration.activations: only gptq"):
        validate({"model": str(tiny_models["llama"]), "output_dir": "o", "quantization": {"method": "smoothquant"},
                  "calibration": {"layerwise": True, "activations": "disk"}})


def test_layerwise_needs_safetensors(tmp_path):
    from hfquant.core.errors import ConfigError
    from hfquant.calibration.onload import checkpoint_files

    with pytest.raises(ConfigError, match="needs model.safetensors"):
        checkpoint_files(tmp_path)


@pytest.fixture(scope="module")
def quantized_folder(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("q") / "llama"
    _full(tiny_models["llama"], _config()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ["auto", "auto-disk", "cpu+disk"])
def test_device_map_loads_give_identical_logits(quantized_folder, tmp_path, name):
    from transformers import AutoModelForCausalLM

    maps = {
        "auto": dict(device_map="auto"),
        "auto-disk": dict(device_map="auto", max_memory={"cpu": 50_000}, offload_folder=str(tmp_path / "off")),
        "cpu+disk": dict(device_map={"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                                     "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"},
                         offload_folder=str(tmp_path / "off")),
    }
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = AutoModelForCausalLM.from_pretrained(quantized_folder).eval()
    placed = AutoModelForCausalLM.from_pretrained(quantized_folder, **maps[name]).eval()
    if name != "auto":
        assert "disk" in set(placed.hf_device_map.values())
    with torch.no_grad():
        expected = plain(ids).logits
        for _ in range(2):  # twice: kernel operand caches must stay right when offloaded weights come back
            assert torch.equal(placed(ids).logits, expected)


def test_layerwise_honours_per_module_overrides(tiny_models, tmp_path):
    """Per-module schemes (issue 8) go through the layer-wise path unchanged: same tensors as a full load."""
    from safetensors.torch import load_file

    from hfquant.api import quantize_layerwise

    overrides = {"*.down_proj": {"bits": 8}, "re:.*\\.1\\.self_attn\\.(k|v)_proj": {"bits": 3, "sym": False},
                 "model.layers.0.mlp.up_proj": {"method": "rtn"}, "*.0.self_attn.o_proj": {"skip": True}}
    full = _full(tiny_models["llama"], _config(overrides=overrides))
    lw = quantize_layerwise(tiny_models["llama"], _config(overrides=overrides), activations="disk", progress=False)
    full.save_pretrained(tmp_path / "full")
    lw.save_pretrained(tmp_path / "lw")
    assert lw.config.quantization_config.module_schemes == full.config.quantization_config.module_schemes
    schemes = lw.config.quantization_config.module_schemes
    assert schemes["model.layers.1.mlp.down_proj"]["bits"] == 8 and "model.layers.0.self_attn.o_proj" not in schemes
    _assert_same_state(load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "lw" / "model.safetensors"))


def test_auto_bits_refuses_layerwise(tiny_models):
    from hfquant.core.errors import ConfigError
    from hfquant.api import quantize_layerwise

    with pytest.raises(ConfigError, match="bits: auto .* cannot be combined with layerwise"):
        quantize_layerwise(tiny_models["llama"], _config(bits="auto", target_avg_bits=3.5), progress=False)


def test_a_dying_process_gives_the_others_one_line(tiny_models, tmp_path):
    """A calibration process that dies mid-block: the survivor raises one CalibrationError line (no gloo trace,
    no hang)."""
    import json

    import torch.multiprocessing as mp

    from helpers import dist_dying_peer_worker

    ctx = mp.get_context("spawn")
    port, out = _port(), tmp_path / "rank0.json"
    procs = [ctx.Process(target=dist_dying_peer_worker, args=(r, 2, port, str(tiny_models["llama"]), str(out)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode is not None, "a process hung"
    result = json.loads(out.read_text())
    assert result["type"] == "CalibrationError", result
    assert "\n" not in result["message"] and "lost contact" in result["message"] and "another process stopped" in result["message"]
