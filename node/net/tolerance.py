"""How far two honest runs of one step may differ: tolerances by the dtypes, wire codecs and quantizations the
nodes announce, measured on honest runs (benchmarks/verification.py). Shared by the client's checks
(`node.client.verify`) and every reader of a published proof (`node.net.evidence`)."""

from __future__ import annotations

import torch

# Relative error allowed between two honest runs of a step, by the least precise dtype involved:
# about 30x (fp32), 4x (fp16) and 5x (bf16) the largest honest error measured (see the docstring).
TOLERANCES = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}
DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in TOLERANCES}

# Lossy wire codecs (node.net.wire) round both outputs compared: fp16 as fp16 compute; int8 (blockwise) round-trips
# hidden states with ~2e-2 relative error per token (measured on outlier-heavy tensors), so two honest outputs
# may differ by about twice that.
WIRE_TOLERANCES = {"none": 0.0, "fp16": TOLERANCES[torch.float16], "int8": 1e-1}


# Quantized layers (node.model.quant), as their records announce them. Honest server-vs-verifier errors measured by
# benchmarks/verification.py --quant-only on SmolLM2's 10-layer stages fed real activations, fp32, CPU (the
# embedded model and a copy moved off its 4-bit grid, which is what a bf16-trained model looks like to int4):
# * both sides at the same quantization (the same weights: rounding is deterministic): at most 6.8e-3 (int8,
#   int4) -> SAME_QUANT_TOLERANCE, about 4x;
# * int8 against fp32 or int4-on-grid: at most 4.1e-2 -> 2e-1, about 5x;
# * int4 against fp32 or int8 off the grid: up to 3.4e-1 (median 1.4e-1) on layers 0:10 -> 7e-1, only 2x, and weak:
#   an output within 70% of the truth passes. So the auditor asks a node of the audited one's quantization first.
QUANT_TOLERANCES = {"none": 0.0, "int8": 2e-1, "int4": 7e-1}
SAME_QUANT_TOLERANCE = 3e-2


def tolerance_for(compute_dtype: torch.dtype, wire: str = "none", quants: tuple[str, ...] = ()) -> float:
    """The tolerance for outputs computed in `compute_dtype` (the least precise any node may use),
    sent with the `wire` codec, by nodes holding their layers at `quants` (the audited one's and the verifier's)."""
    if len(set(quants)) == 1 and quants[0] != "none":
        quant_tolerance = SAME_QUANT_TOLERANCE
    else:
        quant_tolerance = max((QUANT_TOLERANCES[q] for q in quants), default=0.0)
    return max(TOLERANCES[compute_dtype], WIRE_TOLERANCES[wire], quant_tolerance)


def announced_dtype(name: object) -> torch.dtype:
    """The dtype a node announced when its session opened; anything else is taken as the least precise one."""
    return DTYPE_NAMES.get(name, torch.bfloat16) if isinstance(name, str) else torch.bfloat16


def relative_error(claimed: torch.Tensor, reference: torch.Tensor) -> float:
    """Max over tokens of ‖claimed − reference‖ / ‖reference‖ (scale-free, so one tolerance fits all layers)."""
    if claimed.shape != reference.shape:
        return float("inf")
    return relative_errors(claimed, reference).max().item()


def relative_errors(claimed: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per token (position), ‖claimed − reference‖ / ‖reference‖, of two outputs of one shape [1, tokens, hidden]."""
    claimed, reference = claimed.float(), reference.float()
    return ((claimed - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-12)).flatten()
