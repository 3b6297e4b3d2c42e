"""Wire codecs: lossless, fp16 and 8-bit blockwise round trips, and malformed buffers refused."""

from __future__ import annotations

import pytest
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

from node.net.protocol import ProtocolError, pack, parse_step
from node.net.wire import INT8_COMPRESSION, WireError, decode, encode, for_links


def test_round_trips_within_each_codecs_precision():
    x = torch.randn(1, 9, 100) * 4
    x[0, 3, 7] = 300.0  # an outlier: blockwise scales keep it from blurring other blocks
    assert torch.equal(decode(encode(x, "none")), x)
    assert torch.allclose(decode(encode(x, "fp16")), x, rtol=1e-3, atol=1e-3)
    restored = decode(encode(x, "int8"))
    assert restored.shape == x.shape and restored.dtype == x.dtype
    block_max = torch.nn.functional.pad(x.reshape(-1), (0, -x.numel() % 64)).view(-1, 64).abs().amax(1)
    error = torch.nn.functional.pad((restored - x).reshape(-1).abs(), (0, -x.numel() % 64)).view(-1, 64).amax(1)
    assert (error <= block_max / 127 / 2 + 1e-6).all()  # at most half a quantisation step per block
    assert len(encode(x, "int8").buffer) < len(encode(x, "none").buffer) / 3.5


def test_bf16_tensors_travel_as_they_are_under_fp16():
    x = torch.randn(1, 2, 64, dtype=torch.bfloat16)
    assert torch.equal(decode(encode(x, "fp16")), x)


def test_malformed_int8_buffers_are_refused():
    proto = encode(torch.randn(1, 1, 64), "int8")
    proto.buffer = proto.buffer[:-1]
    with pytest.raises(WireError, match="needs"):
        decode(proto)
    proto = encode(torch.randn(1, 1, 64), "int8")
    proto.dtype = "int64"
    with pytest.raises(WireError, match="floating-point"):
        decode(proto)
    proto.compression = 3  # another of hivemind's codecs, which we never accept
    with pytest.raises(WireError, match="unsupported"):
        decode(proto)
    assert encode(torch.zeros(1), "int8").compression == INT8_COMPRESSION


def test_the_codec_follows_the_slowest_link():
    assert for_links([]) == "none"  # unmeasured links: stay lossless
    assert for_links([1e9, 0.0]) == "none"
    assert for_links([1e9, 50e6]) == "fp16"
    assert for_links([5e6, 1e9]) == "int8"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_uncompressed_tensors_read_both_ways_with_hivemind(dtype):
    # Our plain codec skips hivemind's machinery but keeps a layout its decoder reads, and reads what it sends
    # (hivemind's legacy bf16 travels as fp32).
    tensor = torch.randn(1, 3, 8).to(dtype)
    ours, theirs = encode(tensor, "none"), serialize_torch_tensor(tensor)
    for proto in (ours, theirs):
        assert decode(proto).dtype == dtype and torch.equal(decode(proto), tensor)
        assert torch.equal(deserialize_torch_tensor(proto), tensor)


def test_an_uncompressed_buffer_that_does_not_fit_its_shape_is_refused():
    proto = encode(torch.randn(2, 4), "none")
    proto.buffer = proto.buffer[:-1]
    with pytest.raises(WireError, match="needs 32 bytes, got 31"):
        decode(proto)
    proto.buffer, proto.size[:] = b"", [0, 4]
    assert decode(proto).shape == (0, 4)


def test_non_finite_hidden_states_are_refused_in_every_wire_dtype():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for bad in (float("nan"), float("inf"), float("-inf")):
            hidden = torch.zeros(1, 2, 8, dtype=dtype)
            hidden[0, 1, 3] = bad
            with pytest.raises(ProtocolError, match="NaN or infinity"):
                parse_step(pack({"position": 0}, [hidden]), hidden_size=8, expected_position=0, max_length=64)
        step = parse_step(pack({"position": 0}, [torch.ones(1, 2, 8, dtype=dtype)]), hidden_size=8,
                          expected_position=0, max_length=64)
        assert step.hidden.dtype == dtype and torch.equal(step.hidden, torch.ones(1, 2, 8, dtype=dtype))
        step.hidden.add_(1)  # a received tensor is the stage's own, writable copy
