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

from node.client.verify import (
    QUANT_TOLERANCES,
    SAME_QUANT_TOLERANCE,
    TOLERANCES,
    Auditor,
    relative_error,
    tolerance_for,
)
from node.model.checkpoint import layer_bytes, resolve_model
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
from node.model.stage import Stage, StepInput, kv_bytes_per_token
from node.serve.assignment import model_spec, planning_spec, reference_memory
from swarm.allocator import DEFAULT_CONTEXT_TOKENS
from swarm.costmodel import layer_capacity
from swarm.records import ServerRecord

CPU = torch.device("cpu")

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
    assert weight_format(96, 64, "int4") == "int4" and int4_group(96) == int4_group(576) == 32
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


# --- a stage holding its layers quantized -------------------------------------------------------------------------

# A tiny random model's 6 layers (prefill, a second chunk, decode steps) against the fp32 stage: measured relative
# error 3.5e-3 .. 4.2e-3 (int8) and 4.5e-2 .. 4.7e-2 (int4) over llama, qwen2 (biases) and mistral (sliding window).
STAGE_TOLERANCE = {"int8": 1e-2, "int4": 1.2e-1}


def run_steps(stage: Stage, x: torch.Tensor) -> torch.Tensor:
    cache = stage.new_cache(x.shape[1])
    outs = [stage.forward(x[:, :24], 0, cache), stage.forward(x[:, 24:30], 24, cache)]
    outs += [stage.forward(x[:, i:i + 1], i, cache) for i in range(30, x.shape[1])]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_quantized_stage_follows_the_fp32_stage(tiny_checkpoint, arch, quant):
    source = resolve_model(str(tiny_checkpoint(arch, num_layers=6)))
    x = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(0))
    dense = Stage(source, 0, 6, dtype=torch.float32, device=CPU)
    quantized = Stage(source, 0, 6, dtype=torch.float32, device=CPU, quant=quant)
    assert {type(m).__name__ for m in quantized.layers.modules() if hasattr(m, "kernel")} == {
        {"int8": "Int8Projection", "int4": "Int4Projection"}[quant]}
    error = relative_error(run_steps(quantized, x), run_steps(dense, x))
    assert 0 < error < STAGE_TOLERANCE[quant]
    # the bytes the planner is told a layer takes are the bytes the stage holds
    assert quantized.layer_bytes == layer_bytes(source, torch.float32, quant)
    assert quantized.layer_bytes < dense.layer_bytes / {"int8": 3.5, "int4": 6}[quant]


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_decode_steps_batched_equal_one_at_a_time(tiny_checkpoint, quant):
    """The kernels are batch-invariant (up to INT8_KERNEL_MAX_ROWS rows for int8): a session's decode step gives
    the same bits alone or batched with others, as fp32 oneDNN does."""
    stage = Stage(resolve_model(str(tiny_checkpoint("llama", num_layers=6))), 0, 6, dtype=torch.float32,
                  device=CPU, quant=quant)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randn(1, 5 + i, 64, generator=generator) for i in range(4)]
    steps = [torch.randn(1, 1, 64, generator=generator) for _ in range(4)]
    alone, batched = [stage.new_cache(16) for _ in prompts], [stage.new_cache(16) for _ in prompts]
    for caches in (alone, batched):
        for prompt, cache in zip(prompts, caches, strict=True):
            stage.forward(prompt, 0, cache)
    singles = [stage.forward(step, p.shape[1], cache) for step, p, cache in zip(steps, prompts, alone, strict=True)]
    together = stage.forward_batch([StepInput(step, p.shape[1], cache)
                                    for step, p, cache in zip(steps, prompts, batched, strict=True)])
    assert all(torch.equal(a, b) for a, b in zip(singles, together, strict=True))


def test_layer_bytes_of_smollm2(smollm2):
    """SmolLM2's layer: fp32 14.16 MB; int8 weights plus a bf16 scale per row; int4 half a byte a weight plus a bf16
    scale and offset per 32 inputs; its two norms stay fp32."""
    params = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
    norms = 2 * 576 * 4
    assert layer_bytes(smollm2, torch.float32) == 14_160_384
    assert layer_bytes(smollm2, torch.float32, "int8") == sum(n * k + 2 * n for n, k in params.values()) + norms
    assert layer_bytes(smollm2, torch.float32, "int4") == sum(n * k // 2 + 4 * n * (k // 32)
                                                            for n, k in params.values()) + norms
    assert layer_bytes(smollm2, torch.float32, "int4") == 2_216_448  # 6.4x smaller


# --- the planner's memory units, verification's tolerance ---------------------------------------------------------


def test_a_quantized_node_announces_memory_the_planner_fills_exactly(smollm2):
    """At one session's KV (the planner's unit), the layers the planner fits into the announced memory at the
    node's quantization are the layers that fit in its real memory at its dtype."""
    spec = model_spec(smollm2)
    for quant in ("none", "int8", "int4"):
        real_per_layer = layer_bytes(smollm2, torch.float32, quant) + DEFAULT_CONTEXT_TOKENS * kv_bytes_per_token(
            smollm2.config, torch.float32)
        memory = 7.5 * real_per_layer
        record = ServerRecord("peer", spec.name, 0, 1, quant=quant,
                              memory_bytes=reference_memory(memory, torch.float32, smollm2, quant))
        assert layer_capacity(spec, planning_spec(record, spec), sessions=1) == 7


def test_the_tolerance_follows_each_sides_quantization_and_dtype():
    assert tolerance_for(torch.float32) == tolerance_for(torch.float32, quants=("none", "none")) == 1e-4
    assert tolerance_for(torch.float32, quants=("none", "int8")) == QUANT_TOLERANCES["int8"]
    assert tolerance_for(torch.float32, quants=("int4", "int8")) == QUANT_TOLERANCES["int4"]
    # the same quantization on both sides means the same weights: a tight tolerance
    assert tolerance_for(torch.float32, quants=("int4", "int4")) == SAME_QUANT_TOLERANCE < QUANT_TOLERANCES["int8"]
    assert tolerance_for(torch.bfloat16, quants=("none", "none")) == 1e-1
    auditor = Auditor(client=None, probability=1.0, quants={"a": "int4", "b": "none", "c": "int8"})
    fp32, fp16, bf16 = torch.float32, torch.float16, torch.bfloat16
    assert auditor.tolerance_between(("a", fp32), ("b", fp32)) == QUANT_TOLERANCES["int4"]
    assert auditor.tolerance_between(("b", fp32), ("unknown", fp32)) == TOLERANCES[fp32]  # no record: unquantized
    # Both count: the looser of the two dtypes, and the looser of the two quantizations.
    assert auditor.tolerance_between(("b", fp32), ("unknown", fp16)) == TOLERANCES[fp16]
    assert auditor.tolerance_between(("b", fp16), ("c", fp32)) == max(TOLERANCES[fp16], QUANT_TOLERANCES["int8"])
    assert auditor.tolerance_between(("a", bf16), ("b", fp32), ("c", fp32)) == QUANT_TOLERANCES["int4"]
