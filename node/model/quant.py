"""Weight-only quantized projections: int8 with one scale per output channel, int4 with a scale and an offset
per group of inputs. Activations stay in floating point; only the weights shrink (4x and ~7x against fp32).

Decode reads every weight once per token, so on CPU it runs at the speed the weights stream from memory:
smaller weights are faster, if the kernel keeps up. Measured here (benchmarks/quant.py --kernels; 2-core
AMD EPYC with AVX-512 BF16/VNNI, 1 thread, the forty matrices of 10 SmolLM2 layers, medians of interleaved
runs on a machine shared with other jobs, so the ratios matter more than the times):

    rows (tokens)                   1      8     64    (x fp32 oneDNN in the same run)
    int8, torch _weight_int8pack  1.9x   0.8-1.4x  0.5-0.7x
    int4 g64, torch int4pack_cpu  4.5-6x  1.7-2.3x 0.8-0.9x
    bitsandbytes 0.50 NF4 (CPU)   0.45x  0.6x   1.2x
    bitsandbytes 0.50 int8 (CPU)  0.23x  0.26x  0.6x

So the CPU path uses torch's own kernels. They run fast only on bf16 activations (fp32 ones take a generic
path 4-15x slower than fp32 oneDNN, fp16 ones 3-30x): rows are cast to bf16 and the result back, which adds
bf16 rounding of the inputs (~0.4% per element) to the weights' own error; the tolerances of
`node.client.verify` are measured with it. int8's kernel falls behind at many rows (prefill), where
dequantizing the matrix to bf16 and one bf16 gemm wins (`INT8_KERNEL_MAX_ROWS`); int4 has no such cheap way
back (its packed layout is torch's own), so its prefill runs at ~0.8x fp32.

Kernels accept only some shapes, and torch's int8 kernel crashes the process (SIGSEGV, no exception) when
the input size is not a multiple of 16: `weight_format` decides per matrix, from its shape alone, and a
matrix a kernel cannot take stays in the dense `Projection` (or int8 for int4). `weight_bytes` counts bytes
by the same rule, so the planner's bytes per layer (`node.model.checkpoint.layer_bytes`) are what a stage holds.

CUDA (untested here: no GPU; `benchmarks/gpu_check.py` measures it): bitsandbytes as Petals uses it, NF4
(blocks of 64) and LLM.int8 (threshold 6), when installed (`pip install layerhive[gpu]`); without it torch's
own tinygemm int4 kernel (`_weight_int4pack_mm`, Ampere or newer, bf16) and int8 by dequantizing per call.

For quantized checkpoints (GGUF): `Int4Projection(q, scale, offset)` takes weights as w = q * scale + offset
with q in 0..15 per group of 32..256 inputs, which is how Q4_0 (scale d, offset -8d) and Q4_K (scale d*sc,
offset -dmin*m, groups of 32) are defined; `Int8Projection(q, scale)` takes per-output-channel int8, so
Q8_0's per-block scales need requantizing (`Int8Projection.quantize` of the dequantized rows).
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from node.model.projection import Projection
from swarm.records import QUANTIZATIONS

logger = logging.getLogger(__name__)

INT4_GROUP = 64  # inputs per int4 group (benchmarks/quant.py: see the README table); 32 where 64 does not divide
INT8_KERNEL_MAX_ROWS = 16  # above: dequantize to bf16 and one gemm (1.3x the kernel's time at 16 rows, 0.8x at 32)
KERNEL_DTYPE = torch.bfloat16  # activations and scales as the CPU kernels take them fast
CUDA_BACKENDS = ("bnb", "torch")  # tried in this order on CUDA: bitsandbytes if installed, else torch's own
# The projections of a decoder layer that stage.py fuses (their shared input lets one matmul serve them): the
# kernels' shape rules apply to the fused matrix, so bytes are counted on it too.
FUSED_PROJECTIONS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def check_quant(quant: str) -> str:
    if quant not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quant!r}")
    return quant


def int4_group(in_features: int) -> int | None:
    """The int4 group size for a matrix of `in_features` inputs: INT4_GROUP, else 32, if it divides them."""
    return next((g for g in (INT4_GROUP, 32) if in_features % g == 0), None)


def weight_format(out_features: int, in_features: int, quant: str) -> str:
    """How a [out, in] projection is held at `quant`: "int4", "int8" or "none" (dense), by the kernels' rules:
    int8 needs in % 16 == 0 (else torch's kernel crashes), int4 out % 16 == 0 and a group dividing in."""
    check_quant(quant)
    if quant == "int4" and out_features % 16 == 0 and int4_group(in_features) is not None:
        return "int4"
    if quant != "none" and in_features % 16 == 0:
        return "int8"
    return "none"


def weight_bytes(out_features: int, in_features: int, quant: str, dtype: torch.dtype) -> int:
    """Bytes of one projection's weight at `quant` (dense ones at `dtype`); scales and offsets in bf16 (2 bytes).

    bitsandbytes' NF4 keeps an fp32 absmax per 64 weights: the same 0.5625 bytes per weight as int4 here."""
    n, k = out_features, in_features
    fmt = weight_format(n, k, quant)
    if fmt == "int8":
        return n * k + 2 * n
    if fmt == "int4":
        return n * k // 2 + 2 * 2 * n * (k // int4_group(k))
    return n * k * torch.empty((), dtype=dtype).element_size()


def layer_weight_bytes(shapes: dict[str, list[int]], dtype: torch.dtype, quant: str) -> int:
    """Bytes of a decoder layer's tensors (name within the layer -> shape, e.g. "mlp.up_proj.weight") as a stage
    holds them at `quant`: projections fused as stage.py fuses them, each in its `weight_format`; the rest
    (norms, biases) at `dtype`."""
    shapes = dict(shapes)
    for fused, parts in FUSED_PROJECTIONS.items():
        names = [f"{part}.weight" for part in parts]
        if all(name in shapes for name in names) and len({shapes[name][1] for name in names}) == 1:
            inputs = shapes[names[0]][1]
            shapes[f"{fused}.weight"] = [sum(shapes.pop(name)[0] for name in names), inputs]
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(weight_bytes(*shape, quant, dtype) if len(shape) == 2 and name.endswith("proj.weight")
               else math.prod(shape) * itemsize for name, shape in shapes.items())


# --- quantizers (plain tensors in, plain tensors out; any device) ----------------------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scale fp32 [out]) with weight ≈ q * scale, symmetric per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [out, in] in 0..15, scale, offset fp32 [out, in / group]) with weight ≈ q * scale + offset,
    from each group's min and max (round to nearest)."""
    n, k = weight.shape
    w = weight.detach().float().view(n, k // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = (high - low).clamp_min(1e-12) / 15
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.view(n, k), scale, low


# --- modules -----------------------------------------------------------------------------------------------------


class _Quantized(torch.nn.Module):
    """What the quantized projections share with `Projection`: in/out sizes, an optional bias, 2-D/3-D input."""

    kernel = ""

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = torch.nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._matmul(x.reshape(-1, self.in_features)).to(x.dtype)
        if self.bias is not None:
            flat = flat + self.bias
        return flat.view(*x.shape[:-1], self.out_features)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"kernel={self.kernel}"


class Int8Projection(_Quantized):
    """y = x (q * scale)ᵀ + b with q int8 [out, in] and one scale per output channel."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        n, k = q.shape
        if q.dtype != torch.int8 or scale.shape != (n,) or k % 16:
            raise ValueError(f"int8 weights need q int8 [out, in] with in % 16 == 0 and scale [out], got "
                             f"{q.dtype} {list(q.shape)} and {list(scale.shape)}")
        super().__init__(n, k, bias)
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.to(KERNEL_DTYPE))
        self.kernel = "int8" if _int8_kernel_runs(q.device) else "int8-dequant"

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Projection:
        return cls(*quantize_int8(weight), bias)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(KERNEL_DTYPE)
        if self.kernel == "int8" and rows.shape[0] <= INT8_KERNEL_MAX_ROWS:
            return torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scale)
        return rows @ (self.qweight.to(KERNEL_DTYPE) * self.scale[:, None]).t()  # one matrix dequantized at a time


class Int4Projection(_Quantized):
    """y = x wᵀ + b with w = q * scale + offset, q in 0..15, one (scale, offset) per `group` inputs of a row;
    held in torch's packed int4 layout for its CPU or CUDA (tinygemm) kernel."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        n, k = q.shape
        groups = scale.shape[-1] if scale.dim() == 2 else 0
        group = k // groups if groups else 0
        if scale.shape != (n, groups) or offset.shape != scale.shape or group not in (32, 64, 128, 256) \
                or group * groups != k or n % 16:
            raise ValueError(f"int4 weights need q [out, in] with out % 16 == 0 and scale, offset [out, in / group] "
                             f"for a group of 32, 64, 128 or 256; got {list(q.shape)}, {list(scale.shape)}, "
                             f"{list(offset.shape)}")
        super().__init__(n, k, bias)
        self.group = group
        zero = offset.float() + 8 * scale.float()  # the kernels compute (q - 8) * scale + zero
        self.register_buffer("scale_and_zero", torch.stack([scale.float(), zero], dim=-1).transpose(0, 1)
                             .contiguous().to(KERNEL_DTYPE))  # [in / group, out, 2]
        self.register_buffer("packed", _pack_int4(q))
        self.kernel = "int4"

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group: int | None = None
                 ) -> Int4Projection:
        group = group or int4_group(weight.shape[1])
        if group is None:
            raise ValueError(f"no int4 group divides {weight.shape[1]} inputs")
        return cls(*quantize_int4(weight, group), bias)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(KERNEL_DTYPE)
        if self.packed.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scale_and_zero)
        return torch.ops.aten._weight_int4pack_mm(rows, self.packed, self.group, self.scale_and_zero)


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [out, in] in 0..15 in the layout of torch's int4 kernel on q's device."""
    if q.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    k = q.shape[1]
    pairs = (q[:, ::2].to(torch.uint8) << 4 | q[:, 1::2].to(torch.uint8)).contiguous()  # even inputs high
    tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
    return torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)


@functools.cache
def _int8_kernel_runs(device: torch.device) -> bool:
    """Whether torch's int8 weight-only kernel exists for `device` (CPU always; CUDA depends on the build)."""
    if device.type == "cpu":
        return True
    try:
        rows = torch.zeros(1, 16, dtype=KERNEL_DTYPE, device=device)
        torch.ops.aten._weight_int8pack_mm(rows, torch.zeros(16, 16, dtype=torch.int8, device=device),
                                           torch.ones(16, dtype=KERNEL_DTYPE, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


class BnbProjection(_Quantized):
    """A bitsandbytes layer (NF4 for int4, LLM.int8 for int8) behind the same interface; CUDA is what it is for
    (on CPU it runs too, slower than torch's kernels: see the table above)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quant: str) -> None:
        import bitsandbytes as bnb

        n, k = weight.shape
        super().__init__(n, k, None)
        device, self.compute_dtype = weight.device, weight.dtype
        host = weight.detach().to("cpu")  # bitsandbytes quantizes as the parameter moves to its device
        if quant == "int4":
            layer = bnb.nn.Linear4bit(k, n, bias=bias is not None, compute_dtype=weight.dtype, quant_type="nf4",
                                      device="cpu")
            layer.weight = bnb.nn.Params4bit(host, requires_grad=False, quant_type="nf4", blocksize=64)
            self.kernel = "bnb-nf4"
        else:
            layer = bnb.nn.Linear8bitLt(k, n, bias=bias is not None, has_fp16_weights=False, threshold=6.0,
                                        device="cpu")
            layer.weight = bnb.nn.Int8Params(host, requires_grad=False, has_fp16_weights=False)
            self.kernel = "bnb-int8"
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias.detach().to("cpu", layer.bias.dtype), requires_grad=False)
        self.layer = layer.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.to(self.compute_dtype)).to(x.dtype)


def supported_quants(device: torch.device) -> tuple[str, ...]:
    """The quantizations whose kernels run on `device`: all on CPU; on CUDA int8 always (dequantizing at worst),
    int4 with bitsandbytes or on Ampere and newer (tinygemm); none on other devices (not tried there)."""
    if device.type == "cpu":
        return QUANTIZATIONS
    if device.type == "cuda":
        int4 = bnb_available() or torch.cuda.get_device_capability(device) >= (8, 0)
        return ("none", "int8", "int4") if int4 else ("none", "int8")
    return ("none",)


def bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # ImportError, or a build without the libraries for this machine
        return False
    return True


def quantized_projection(weight: torch.Tensor, bias: torch.Tensor | None = None, quant: str = "none", *,
                         backend: str | None = None) -> torch.nn.Module:
    """A projection of `weight` [out, in] (+ `bias`) at `quant`, on weight's device: `Projection` for "none" or a
    shape no kernel takes (`weight_format`), else an int8 or int4 one. `backend`: "torch" (its own kernels,
    the only choice on CPU by default) or "bnb"; None: torch on CPU, the first of CUDA_BACKENDS available on CUDA."""
    fmt = weight_format(*weight.shape, quant)
    if fmt == "none":
        return Projection(weight, bias)
    backend = backend or ("bnb" if weight.device.type == "cuda" and bnb_available() else "torch")
    if backend == "bnb":
        return BnbProjection(weight, bias, fmt)
    if backend != "torch":
        raise ValueError(f"unknown quantization backend {backend!r}; have {', '.join(CUDA_BACKENDS)}")
    if fmt == "int4":
        return Int4Projection.quantize(weight, bias)
    return Int8Projection.quantize(weight, bias)
