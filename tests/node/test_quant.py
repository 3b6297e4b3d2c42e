"""Quantized projections (node.model.quant) against F.linear, on CPU with torch's own kernels.

Tolerances are relative errors per row (‖y − ref‖ / ‖ref‖, max over rows), measured on these shapes and
seeds and then given about 2.5x room:
* kernel vs F.linear on the dequantized weight (what the kernel should compute): bf16 activations and
  output cost 2.5e-3 .. 4.1e-3;
* vs F.linear on the original Gaussian weight (what quantization costs): int8 6e-3 .. 1.0e-2, int4 (groups
  of 64, or 32) 8.5e-2 .. 1.1e-1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from node.model.projection import Projection
from node.model.quant import (
    INT8_KERNEL_MAX_ROWS,
    BnbProjection,
    Int4Projection,
    Int8Projection,
    int4_group,
    quantize_int4,
    quantize_int8,
    quantized_projection,
    weight_bytes,
    weight_format,
)

KERNEL_TOLERANCE = 1e-2
QUANT_TOLERANCE = {"int8": 2.5e-2, "int4": 0.25}
SHAPES = [(960, 576), (576, 1536), (128, 64), (96, 160)]  # SmolLM2's qkv and down, tiny's qkv, a group of 32


def relative(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()


def dequantized(weight: torch.Tensor, quant: str) -> torch.Tensor:
    """The weight the quantized projection stands for, computed independently of the module."""
    if quant == "int8":
        q, scale = quantize_int8(weight)
        return q.float() * scale[:, None]
    n, k = weight.shape
    group = int4_group(k)
    q, scale, offset = quantize_int4(weight, group)
    return (q.float().view(n, k // group, group) * scale[..., None] + offset[..., None]).view(n, k)


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_quantized_projection_matches_f_linear(quant, shape, with_bias):
    torch.manual_seed(0)
    weight = 0.05 * torch.randn(shape)
    bias = 0.1 * torch.randn(shape[0]) if with_bias else None
    projection = quantized_projection(weight, bias, quant)
    assert projection.kernel == quant
    reference_weight = dequantized(weight, quant)
    # 1 and 8 rows take int8's kernel, 64 its dequantize-and-gemm path
    for rows in (1, 8, INT8_KERNEL_MAX_ROWS + 1, 64):
        x = torch.randn(rows, shape[1])
        y = projection(x)
        assert y.shape == (rows, shape[0]) and y.dtype == torch.float32
        assert relative(y, F.linear(x, reference_weight, bias)) < KERNEL_TOLERANCE
        assert relative(y, F.linear(x, weight, bias)) < QUANT_TOLERANCE[quant]


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_three_dimensional_input_is_rows(quant):
    torch.manual_seed(1)
    weight, bias = 0.05 * torch.randn(128, 64), torch.randn(128)
    projection = quantized_projection(weight, bias, quant)
    x = torch.randn(2, 5, 64)
    y = projection(x)
    assert y.shape == (2, 5, 128)
    # the kernel sees 10 rows at once; row by row it must give the same rows (the kernels are batch-invariant)
    rows = torch.cat([projection(x[i, j:j + 1]) for i in range(2) for j in range(5)])
    assert torch.equal(y.reshape(10, 128), rows)
    assert relative(y, F.linear(x, dequantized(weight, quant), bias)) < KERNEL_TOLERANCE


def test_int4_from_gguf_style_blocks():
    """Q4_0 blocks (w = d * (q - 8), 32 weights per block) and Q4_K-style (w = d*sc*q - dmin*m) fill the
    int4 weight exactly: the module computes with them as given, no requantizing."""
    torch.manual_seed(2)
    n, k, group = 64, 256, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    d = torch.rand(n, k // group) * 0.01
    for scale, offset in ((d, -8 * d), (d, -torch.rand(n, k // group) * 0.05)):
        weight = (q.float().view(n, k // group, group) * scale[..., None] + offset[..., None]).view(n, k)
        projection = Int4Projection(q, scale, offset)
        assert projection.group == group
        x = torch.randn(3, k)
        assert relative(projection(x), F.linear(x, weight)) < KERNEL_TOLERANCE
    q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale8 = torch.rand(n) * 0.01
    x = torch.randn(3, k)
    assert relative(Int8Projection(q8, scale8)(x), F.linear(x, q8.float() * scale8[:, None])) < KERNEL_TOLERANCE


def test_shapes_no_kernel_takes_fall_back():
    # torch's int8 kernel crashes the process on inputs that are not a multiple of 16: such a matrix stays dense
    assert weight_format(96, 40, "int8") == "none" and weight_format(96, 40, "int4") == "none"
    assert isinstance(quantized_projection(torch.randn(96, 40), None, "int8"), Projection)
    with pytest.raises(ValueError, match="in % 16"):
        Int8Projection(torch.zeros(96, 40, dtype=torch.int8), torch.ones(96))
    # int4 needs out % 16 == 0 and a group dividing the inputs; else int8
    assert weight_format(40, 64, "int4") == "int8" and weight_format(96, 48, "int4") == "int8"
    assert weight_format(96, 64, "int4") == "int4" and int4_group(96) == 32 and int4_group(576) == 64
    assert quantized_projection(torch.randn(40, 64), None, "int4").kernel == "int8"
    with pytest.raises(ValueError, match="out % 16"):
        Int4Projection(torch.zeros(40, 64, dtype=torch.uint8), torch.ones(40, 2), torch.zeros(40, 2))
    assert isinstance(quantized_projection(torch.randn(96, 64), None, "none"), Projection)
    with pytest.raises(ValueError, match="quantization must be one of"):
        weight_format(96, 64, "int3")


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
@pytest.mark.parametrize("shape", [(960, 576), (96, 160), (40, 64), (96, 40)])
def test_weight_bytes_are_what_the_module_holds(quant, shape):
    projection = quantized_projection(torch.randn(shape), None, quant)
    held = sum(t.nbytes for t in (*projection.parameters(), *projection.buffers()))
    assert held == weight_bytes(*shape, quant, torch.float32)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_bitsandbytes_path_runs_on_cpu(quant):
    """The CUDA path's bitsandbytes layers (NF4, LLM.int8), exercised where they also run: on CPU."""
    torch.manual_seed(3)
    weight, bias = 0.05 * torch.randn(128, 64), torch.randn(128)
    projection = quantized_projection(weight, bias, quant, backend="bnb")
    assert isinstance(projection, BnbProjection) and projection.kernel == {"int8": "bnb-int8", "int4": "bnb-nf4"}[quant]
    x = torch.randn(2, 3, 64)
    y = projection(x)
    assert y.shape == (2, 3, 128) and y.dtype == torch.float32
    assert relative(y, F.linear(x, weight, bias)) < QUANT_TOLERANCE[quant]
