"""Tiny offline models and a tiny tokenizer for the tests."""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from hfquant.calibration.data import BUNDLED_CALIBRATION

VOCAB = 320


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE with a few hundred tokens, trained in well under a second on bundled text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    text = BUNDLED_CALIBRATION.read_text()[:60000]
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@contextlib.contextmanager
def running_as(isa: str, monkeypatch):
    """Run the block as a CPU of level ``isa`` (``HFQUANT_ISA``; ``hfquant.kernels.isa``); skip where this CPU
    cannot (it is below ``isa``). The level is recomputed on entry and on exit."""
    from hfquant.kernels.isa import cpu_isa

    monkeypatch.setenv("HFQUANT_ISA", isa)
    cpu_isa.cache_clear()
    try:
        if cpu_isa() != isa:
            pytest.skip(f"this CPU cannot run as {isa}")
        yield
    finally:
        monkeypatch.delenv("HFQUANT_ISA")
        cpu_isa.cache_clear()


def tiny_config(arch: str):
    """Configs of a few families, each small enough for CPU tests in seconds."""
    import transformers as tf

    common = dict(vocab_size=VOCAB)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, word_embed_proj_dim=64, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    if arch == "gemma3":  # the second architecture of the accuracy work: sliding and full attention, q/k norms
        return tf.Gemma3TextConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=1, head_dim=16, max_position_embeddings=256, sliding_window=32,
                                   layer_types=["sliding_attention", "full_attention"], **common)
    if arch == "bert":
        return tf.BertConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=256, **common)
    raise ValueError(arch)


def save_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """Build a randomly initialised tiny model (seeded) and save it with the tiny tokenizer."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cls = tf.AutoModel if arch == "bert" else tf.AutoModelForCausalLM
    model = cls.from_config(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def auto_class(arch: str):
    import transformers as tf

    return tf.AutoModel if arch == "bert" else tf.AutoModelForCausalLM


def small_calibration(**overrides):
    """Config kwargs for a fast calibration on bundled text."""
    kw = dict(num_samples=8, seq_len=64, calibration_batch_size=4)
    kw.update(overrides)
    return kw


EVAL_SEQ_LEN, EVAL_MAX_TOKENS = 64, 512  # write_recipe's evaluation section


def recipe_perplexity(model) -> float:
    """``model``'s perplexity as a ``write_recipe`` run evaluates it (bundled evaluation text, 8 x 64 tokens), to
    compare a reloaded checkpoint with the run's report."""
    from hfquant.calibration.data import BUNDLED_EVALUATION, tokenize_text
    from hfquant.eval.perplexity import perplexity

    ids = tokenize_text(BUNDLED_EVALUATION.read_text(), tiny_tokenizer())
    return perplexity(model, None, ids, seq_len=EVAL_SEQ_LEN, max_windows=EVAL_MAX_TOKENS // EVAL_SEQ_LEN,
                      progress=False)


def write_recipe(path: Path, model, output_dir, **sections) -> Path:
    """A small fast recipe for a tiny model (calibration 8 x 64, evaluation 8 x 64); ``sections`` override."""
    import yaml

    recipe = {
        "model": str(model),
        "output_dir": str(output_dir),
        "quantization": {"method": "gptq", "group_size": 32},
        "calibration": {"num_samples": 8, "seq_len": 64, "batch_size": 4},
        "evaluation": {"seq_len": EVAL_SEQ_LEN, "max_tokens": EVAL_MAX_TOKENS},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``hfquant.app.cli.main(argv)`` in-process: (exit code, stdout, stderr)."""
    from hfquant.app.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def dist_quantize_worker(rank: int, world: int, port: int, folder: str, out: str, config_kwargs: dict,
                         layerwise: bool = False, dtype: str = "float32") -> None:
    """One process of a gloo group (1 thread): quantize ``folder`` under ``PartialState``; rank 0 saves the
    quantized state dict to ``out`` (safetensors). ``world == 1`` runs without a process group."""
    import os

    import torch

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        from accelerate import PartialState

        PartialState(cpu=True)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from hfquant.config import HFQuantConfig
    from hfquant.api import quantize_, quantize_layerwise

    import hfquant.quantize.weight_only as hq

    hessians = []
    calibrate = hq.calibrate_blocks_

    def recording(model, batches, keep, solve, *args, **kw):  # the reduced Hessians, not only the results
        def solve_and_record(block_name, group, h, **kw):
            hessians.append(h.clone())
            if kw.get("cross") is not None:
                hessians.append(kw["cross"].clone())
            return solve(block_name, group, h, **kw)

        return calibrate(model, batches, keep, solve_and_record, *args, **kw)

    hq.calibrate_blocks_ = recording
    config = HFQuantConfig(tokenizer=tiny_tokenizer(), **config_kwargs)
    if layerwise:
        model = quantize_layerwise(folder, config, dtype=getattr(torch, dtype), progress=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
        quantize_(model, config, progress=False)
    if rank == 0:
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        state.update({f"hessian.{i}": h for i, h in enumerate(hessians)})
        save_file(state, out)
    hq.calibrate_blocks_ = calibrate
    if world > 1:
        import torch.distributed as td

        td.barrier()
        td.destroy_process_group()


def dist_dying_peer_worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    """Two gloo processes; rank 1 dies (``os._exit``) when its first Hessian is reduced. Rank 0 writes the error
    it got (type and message) to ``out``."""
    import json
    import os

    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from accelerate import PartialState

    PartialState(cpu=True)
    from transformers import AutoModelForCausalLM

    import hfquant
    import hfquant.calibration.blocks as blocks

    if rank == 1:
        blocks.HessianStat.reduce = lambda self: os._exit(3)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    try:
        hfquant.quantize_(model, hfquant.HFQuantConfig(tokenizer=tiny_tokenizer(), group_size=32, **small_calibration()),
                          progress=False)
        result = {"type": None, "message": "no error"}
    except Exception as exc:  # noqa: BLE001 - the test reads what was raised
        result = {"type": type(exc).__name__, "message": str(exc)}
    with open(out, "w") as f:
        json.dump(result, f)
    os._exit(0)


class Solved:
    """A ``GPTQResult`` whose stored tensors also read as attributes (``res.codes``, ``res.scales``, ...)."""

    def __init__(self, res):
        self.result = res

    def __getattr__(self, name):
        res = self.__dict__["result"]
        return res[name] if name in res.format.fields else getattr(res, name)


def _format_and_args(kw: dict):
    """The weight format and solve settings of the keyword form ``bits=, group_size=, sym=, observer=, gguf_type=,
    act_order=, static_groups=, damp_percent=, block_size=, cross_alpha=``."""
    from hfquant.core import GGUFBlocks, IntGrid
    from hfquant.core.gptq import SolveArgs

    gguf = kw.pop("gguf_type", None)
    fmt = GGUFBlocks(gguf) if gguf else IntGrid(kw.pop("bits", 4), kw.pop("group_size", 128), kw.pop("sym", True),
                                                 kw.pop("observer", "minmax"))
    for k in ("bits", "group_size", "sym", "observer"):
        kw.pop(k, None)
    args = SolveArgs(desc_act=kw.pop("act_order", False), static_groups=kw.pop("static_groups", False),
                     damp_percent=kw.pop("damp_percent", 0.01), block_size=kw.pop("block_size", 128),
                     gptaq_alpha=kw.pop("cross_alpha", 0.25))
    return fmt, args


def gptq_kw(weight, hessian, **kw):
    """``gptq_quantize`` with the settings as keywords (see ``_format_and_args``); ``None`` or a ``Solved``."""
    from hfquant.core.gptq import gptq_quantize

    fmt, args = _format_and_args(kw)
    res = gptq_quantize(weight, hessian, fmt, args, **kw)
    return None if res is None else Solved(res)


def solve_kw(weight, factor, **kw):
    """``gptq_solve`` with the settings as keywords (see ``_format_and_args``); a ``Solved``."""
    from hfquant.core.gptq import gptq_solve

    fmt, args = _format_and_args(kw)
    return Solved(gptq_solve(weight, factor, fmt, args, **kw))


# ---- kernels: a quantized module, the relative error, another x86 build of the CPU kernels
def make_module(in_f, out_f, bits=4, group=128, bias=True, act_perm=False, seed=0):
    """A ``QuantLinearWeightOnly`` from a seeded random Linear, rounded to nearest (asymmetric)."""
    from hfquant.core.grids import rtn_quantize
    from hfquant.nn.weight_only import QuantLinearWeightOnly

    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    codes, scales, zeros, g_idx = rtn_quantize(lin.weight.data, bits, group, sym=False)
    if act_perm:  # act-order layout: groups are sets of permuted columns, g_idx is not monotone
        g = in_f if group == -1 else group
        perm = torch.randperm(in_f)
        g_idx = (torch.arange(in_f) // g)[torch.argsort(perm)].int()
    return QuantLinearWeightOnly.from_float(lin, codes, scales, zeros, g_idx, bits, group)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def use_build(build: str, monkeypatch):
    """Swap in a copy of hfquant's CPU kernels built for another x86 level: ``"no-vnni"`` (the AVX-512 float32 FMA
    loop Skylake-X Xeons run) or ``"avx2"`` (``-march=haswell``: what AVX2-only CPUs run); ``"native"`` keeps the
    machine's own build. Skips where that copy cannot run or is the native one."""
    from hfquant.kernels import cpu_ext

    if cpu_ext.extension() is None:
        pytest.skip("hfquant's CPU extension is not available here (no compiler or no AVX2)")
    native = cpu_ext.extension().path()
    if build == "no-vnni":
        if native != "avx512-vnni":
            pytest.skip("the native build already is the non-VNNI loop")
        ext = cpu_ext.compile_kernel(f"{cpu_ext.NAME}_novnni", ("-mno-avx512vnni",))
        assert ext.path() == "avx512"
    elif build == "avx2":
        if native == "avx2":
            pytest.skip("the native build already is the AVX2 loop")
        ext = cpu_ext.compile_kernel(f"{cpu_ext.NAME}_avx2", ("-march=haswell",))
        assert ext.path() == "avx2"
    else:
        return cpu_ext.extension()
    monkeypatch.setitem(cpu_ext._STATE, "ext", ext)
    return ext
