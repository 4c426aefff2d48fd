"""The quantized Linears under ``torch.compile(fullgraph=True)``: hfquant's CPU kernels are torch operators,
so a compiled graph calls them (no graph break), and its outputs equal the eager calls' bit for bit."""

import pytest
import torch

from hfquant.kernels import cpu_ext
from hfquant.nn import prepare_model
from hfquant.nn.w8a8 import QuantLinearW8A8

from helpers import make_module


class Block(torch.nn.Module):
    """A W4A16 and a W8A8 Linear with a float op between them, as in a decoder layer, then an 8-bit head."""

    def __init__(self, static: bool):
        super().__init__()
        self.up = make_module(576, 192, group=128)
        torch.manual_seed(1)
        lin = torch.nn.Linear(192, 96)
        self.down = QuantLinearW8A8.from_float(lin, lin.weight.data, input_scale=0.05 if static else None)
        self.head = make_module(96, 320, bits=8, group=-1)  # lm_head_bits: 8

    def forward(self, x):
        return self.head(self.down(torch.nn.functional.silu(self.up(x))))


@pytest.mark.parametrize("static,dynamic", [(False, False), (True, False), (False, True)])
def test_compiled_graph_calls_the_kernels_and_matches_eager(static, dynamic):
    if cpu_ext.extension() is None:
        pytest.skip("hfquant's CPU extension is not available here (no compiler or no AVX-512)")
    torch._dynamo.reset()
    block = Block(static).eval()
    assert prepare_model(block) == 3  # as at load time
    compiled = torch.compile(block, fullgraph=True, dynamic=dynamic)  # fullgraph: a graph break is an error
    with torch.no_grad():
        # one row: the GEMVs; more rows: the reproducible prefill choice (hfquant's int16 GEMM) and _int_mm or the
        # W8A8 many-rows choice (twice with dynamic shapes: a symbolic row count through the Meta implementations)
        for rows in (1, 8, 35) + ((43,) if dynamic else ()):
            x = torch.randn(1, rows, 576)
            assert torch.equal(compiled(x), block(x)), rows
    ops = getattr(torch.ops, cpu_ext.extension().__name__)
    assert ops.weight_only_gemv(torch.randn(2, 3, 576, device="meta"),
                                block.up._kernel_cache["cpu_ext"][1][0].to("meta"), torch.empty(192, 5, device="meta"),
                                torch.empty(192, 5, device="meta"), None, 128).shape == (2, 3, 192)
