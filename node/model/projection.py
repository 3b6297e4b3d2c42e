"""A linear projection (y = x Wᵀ + b) whose weight is stored the way its device multiplies fastest.

Decode multiplies a few rows by every weight matrix, so it runs at the speed weights stream from memory,
and on CPU in fp32 that speed depends on the kernel and the layout. Measured here (2-core AMD EPYC VM,
1 thread, forty 1536 x 576 matrices = 141 MB, like 10 SmolLM2 layers):

    rows (tokens)                       1       8      64     512
    F.linear, W as checkpoints hold it  8.8    15.5    57       -  ms
    W transposed, [in, out]             5.5    14.7    57     355 ms
    oneDNN, W reordered for 8 rows      4.6     6.6    24     196 ms

MKL's small-row gemm is far from the memory bound (8 rows cost 2.7x one row); oneDNN's comes close, and a
row's result does not depend on the batch it is in (8 rows at once equal each alone, bit for bit). So a
layer's projections use oneDNN through torch's private `torch.ops.mkldnn` ops, probed at load: a build or
device without them gets the transposed layout (still 1.6x at one row). The LM head, read by ranges of
rows (`outputs`), keeps the transposed layout, in which such a range is a view. bf16 and fp16 on CPU (0.73x
and 0.10x transposed) and GPUs keep F.linear. Every kernel sums the same products in its own order:
results agree within fp32 rounding (relative ~4e-6 on those matrices), not bit for bit.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

PACKED_FOR_ROWS = 8  # oneDNN's reorder is tuned for a row count: 8 beat 1 and no reorder at every count from 1 to 37
# oneDNN makes a primitive per input shape and keeps it in two LRU caches (ideep's and oneDNN's own), 1,024 entries
# each by default, at about 0.6 MB an entry: every row count a step brings (prefills, failover replays, batches of
# sessions) adds one per weight shape, so a node's heap grew by 20-50 MB in minutes of churn (benchmarks/soak.py),
# towards ~600 MB. Decode reuses a few row counts per weight shape, which this many entries keep; a miss makes the
# primitive again (about 0.1 ms on the tiny model's shapes). Read when the first primitive is made; a user's own wins.
ONEDNN_CACHE_ENTRIES = 64
ONEDNN_CACHE_ENV = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def _bound_onednn_caches() -> None:
    for name in ONEDNN_CACHE_ENV:
        os.environ.setdefault(name, str(ONEDNN_CACHE_ENTRIES))


def _onednn_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` reordered for oneDNN's matmul, or None where this torch build or device has none."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    _bound_onednn_caches()  # before the first primitive is made
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_FOR_ROWS)
        torch.ops.mkldnn._linear_pointwise(weight.new_zeros(1, weight.shape[1]), packed, None, "none", [], "")
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return packed


class Projection(torch.nn.Module):
    """Drop-in for a bias-optional `nn.Linear` at inference: `Projection(weight [out, in], bias [out])`.

    `sliceable`: `forward(x, outputs=(a, b))` computes outputs a..b only, reading just their weights (the
    LM head's shares); that rules oneDNN's opaque layout out. `kernel` says which one runs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, sliceable: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        packed = None if sliceable else _onednn_weight(weight)
        if packed is not None:
            self.kernel, stored = "onednn", packed
        elif weight.device.type == "cpu" and weight.dtype == torch.float32:
            self.kernel, stored = "transposed", weight.t().contiguous()
        else:
            self.kernel, stored = "linear", weight
        self.weight = torch.nn.Parameter(stored, requires_grad=False)
        self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor, outputs: tuple[int, int] | None = None) -> torch.Tensor:
        if self.kernel == "onednn":
            if outputs is not None:
                raise ValueError("this projection was not made sliceable")
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        a, b = outputs if outputs is not None else (0, self.out_features)
        bias = self.bias[a:b] if self.bias is not None else None
        if self.kernel == "linear":
            return F.linear(x, self.weight[a:b], bias)
        weight = self.weight[:, a:b]  # a strided view; MKL reads the columns in place
        if bias is None:
            return x @ weight
        flat = torch.addmm(bias, x.reshape(-1, self.in_features), weight)  # the bias added in the same pass
        return flat.view(*x.shape[:-1], b - a)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"kernel={self.kernel}"
