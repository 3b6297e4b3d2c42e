"""How hidden states travel between peers: as they are, as fp16, or 8-bit blockwise.

Decode traffic is tiny and latency-bound; prefill traffic is bandwidth-bound, so a slow
link gains from fewer bytes. `int8` quantises each block of 64 values to int8 with its
own fp32 absmax scale (8.5 bits per value): about a quarter of fp32's bytes, and an
outlier in one block does not blur the rest. `fp16` halves fp32. `none` is lossless,
and for bf16/fp16 models already 16-bit. `for_links` picks one from the chain's uplinks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

BLOCK = 64
CODECS = ("none", "fp16", "int8")
_HIVEMIND = {"none": runtime_pb2.CompressionType.NONE, "fp16": runtime_pb2.CompressionType.FLOAT16}
# We carry our own 8-bit format under this enum value (hivemind's needs bitsandbytes).
INT8_COMPRESSION = runtime_pb2.CompressionType.BLOCKWISE_8BIT
ACCEPTED_COMPRESSIONS = frozenset({*_HIVEMIND.values(), INT8_COMPRESSION})


class WireError(ValueError):
    pass


# Uncompressed tensors, in a layout hivemind's own decoder reads (bf16 as its raw 2-byte words), without its
# generic compression machinery: a ring sends a hidden state per stage per token (packing one decode step,
# measured here: 59 -> 39 us hot; about 90 us either way on caches the layers just flushed).
_RAW = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_RAW_NAMES = {name: dtype for dtype, name in _RAW.items()}
NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}  # the wire dtypes numpy has (not bf16)


def _encode_raw(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    data = tensor.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)  # numpy has no bf16; the bytes are the same
    return runtime_pb2.Tensor(buffer=data.numpy().tobytes(), size=list(tensor.shape), dtype=_RAW[tensor.dtype],
                              compression=runtime_pb2.CompressionType.NONE)


def _decode_raw(proto: runtime_pb2.Tensor) -> torch.Tensor:
    dtype = _RAW_NAMES[proto.dtype]
    size = list(proto.size)
    if dtype == torch.bfloat16 and len(proto.buffer) == 4 * math.prod(size) > 0:  # hivemind's legacy bf16: fp32
        return torch.frombuffer(bytearray(proto.buffer), dtype=torch.float32).view(size).to(dtype)
    if len(proto.buffer) != math.prod(size) * dtype.itemsize:
        raise WireError(f"a {proto.dtype} tensor of shape {size} needs {math.prod(size) * dtype.itemsize} bytes, "
                        f"got {len(proto.buffer)}")
    if not proto.buffer:
        return torch.empty(size, dtype=dtype)
    if dtype in NUMPY_DTYPES:  # numpy's copy: a received step costs less there on an idling stage's cold caches
        return torch.from_numpy(np.frombuffer(proto.buffer, dtype=NUMPY_DTYPES[dtype]).reshape(size).copy())
    return torch.frombuffer(bytearray(proto.buffer), dtype=dtype).view(size)


def for_links(uplinks_bps: list[float], *, fast_bps: float = 100e6, slow_bps: float = 10e6) -> str:
    """Lossless on fast (or unmeasured) links, fp16 on middling ones, int8 on slow ones."""
    measured = [u for u in uplinks_bps if u > 0]
    slowest = min(measured, default=float("inf"))
    if slowest >= fast_bps:
        return "none"
    return "fp16" if slowest >= slow_bps else "int8"


def encode(tensor: torch.Tensor, codec: str = "none") -> runtime_pb2.Tensor:
    if codec == "none" and tensor.dtype in _RAW:
        return _encode_raw(tensor)
    if codec in _HIVEMIND:
        if codec == "fp16" and tensor.dtype != torch.float32:
            codec = "none"  # already 16-bit (or hivemind cannot cast it): send as is
        return serialize_torch_tensor(tensor.detach().cpu(), _HIVEMIND[codec])
    if codec != "int8":
        raise WireError(f"unknown wire codec {codec!r}")
    flat = tensor.detach().cpu().float().reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, -len(flat) % BLOCK)).view(-1, BLOCK)
    scales = padded.abs().amax(dim=1).clamp_min(1e-12) / 127
    quantised = torch.round(padded / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return runtime_pb2.Tensor(
        buffer=quantised.numpy().tobytes() + scales.numpy().astype(np.float32).tobytes(),
        size=list(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."), compression=INT8_COMPRESSION,
    )


def decode(proto: runtime_pb2.Tensor) -> torch.Tensor:
    """Restores a tensor; raises WireError on anything malformed (never trusts the header)."""
    if proto.compression == runtime_pb2.CompressionType.NONE and proto.dtype in _RAW_NAMES:
        return _decode_raw(proto)
    if proto.compression != INT8_COMPRESSION:
        if proto.compression not in _HIVEMIND.values():
            raise WireError(f"unsupported tensor compression {proto.compression}")
        try:
            return deserialize_torch_tensor(proto)
        except Exception as e:
            raise WireError(f"cannot decode the tensor: {e}") from None
    numel = math.prod(proto.size)
    blocks = -(-numel // BLOCK)
    if len(proto.buffer) != blocks * BLOCK + blocks * 4:
        raise WireError(f"an int8 tensor of {numel} values needs {blocks * (BLOCK + 4)} bytes, got {len(proto.buffer)}")
    dtype = getattr(torch, proto.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise WireError(f"int8 wire carries floating-point tensors, not {proto.dtype!r}")
    quantised = torch.frombuffer(bytearray(proto.buffer[: blocks * BLOCK]), dtype=torch.int8).view(blocks, BLOCK)
    scales = torch.frombuffer(bytearray(proto.buffer[blocks * BLOCK :]), dtype=torch.float32)
    values = (quantised.float() * scales[:, None]).reshape(-1)[:numel]
    return values.view(*proto.size).to(dtype)
