"""Stage compute against transformers, batched and sub-range steps, exact KV memory, and the StepBatcher."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading

import pytest
import torch
from transformers import AutoModel

from node.model.checkpoint import resolve_model
from node.model.stage import Stage, StepInput, kv_bytes_per_token
from node.serve.batching import BatcherClosed, StepBatcher

pytestmark = pytest.mark.timeout(120)
CPU, F32 = torch.device("cpu"), torch.float32
ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded box OpenMP's hand-offs between
    threads can cost 100x the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_stage(path, start: int, end: int) -> Stage:
    return Stage(resolve_model(str(path)), start, end, dtype=F32, device=CPU)


@torch.no_grad()
def reference_hidden_states(path, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' own XxxModel on the whole sequence at once: the input of each layer, then the output."""
    model = AutoModel.from_pretrained(path, dtype=F32).eval()
    model.norm = torch.nn.Identity()  # the final norm is the client's
    return model(inputs_embeds=x, output_hidden_states=True).hidden_states


def run_incrementally(stage: Stage, x: torch.Tensor, layers=None) -> torch.Tensor:
    """A prefill, a second prefill chunk at position > 0, then one decode step per remaining token."""
    cache = stage.new_cache(x.shape[1], layers)
    outs = [stage.forward(x[:, :13], 0, cache, layers), stage.forward(x[:, 13:20], 13, cache, layers)]
    outs += [stage.forward(x[:, i: i + 1], i, cache, layers) for i in range(20, x.shape[1])]
    assert cache.length == x.shape[1]
    return torch.cat(outs, dim=1)


@pytest.fixture(scope="module")
def qwen2_sliding(tiny_checkpoint, tmp_path_factory):
    """Tiny Qwen2 whose layers 2 and 3 use a sliding window of 8 (layers 0 and 1 attend to everything)."""
    path = tmp_path_factory.mktemp("qwen2-sliding")
    shutil.copytree(tiny_checkpoint("qwen2", num_layers=4), path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=8, max_window_layers=2,
                  layer_types=["full_attention"] * 2 + ["sliding_attention"] * 2)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen2-sliding", "llama3", "qwen3", "phi3", "gemma3"])
def test_prefill_and_decode_match_transformers(arch, tiny_checkpoint, qwen2_sliding):
    path = qwen2_sliding if arch == "qwen2-sliding" else tiny_checkpoint(arch, num_layers=4)
    x = torch.randn(1, 30, 64, generator=torch.Generator().manual_seed(0))
    states = reference_hidden_states(path, x)
    # fp32 rounding grows with the states' magnitude (Gemma's sandwich norms make them ~20, not ~1)
    atol = ATOL * max(1.0, float(states[4].abs().max()))
    whole = make_stage(path, 0, 4)
    assert torch.allclose(run_incrementally(whole, x), states[4], atol=atol)
    middle = make_stage(path, 1, 3)  # a stage starting mid-model (qwen2-sliding: one full, one sliding layer)
    assert torch.allclose(run_incrementally(middle, states[1]), states[3], atol=atol)

    expected_windows = {"mistral": [16] * 4, "qwen2-sliding": [None, None, 8, 8], "phi3": [16] * 4,
                        "gemma3": [8, 8, None, 8]}.get(arch, [None] * 4)
    assert whole.windows == expected_windows
    if arch in expected_windows:  # 30 tokens overrun the window: ignoring it must change the result
        whole.windows = [None] * 4
        assert not torch.allclose(run_incrementally(whole, x), states[4], atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "llama3", "phi3", "gemma3"])
def test_rotary_tables_hold_the_rotary_modules_own_values(arch, tiny_checkpoint):
    """A step looks its positions up in tables the model's rotary module computed (by layer type for Gemma 3),
    grown when a position passes them."""
    stage = make_stage(tiny_checkpoint(arch, num_layers=4), 0, 4)
    module, rotary = stage.model.rotary_emb, stage.rotary
    assert rotary.static and rotary.kinds == (["full_attention", "sliding_attention"] if arch == "gemma3" else [None])
    # Tables of 256 positions, then 512 (room doubled, rows copied), 768 (room 1024), 1024 (written in that room).
    for positions in (torch.tensor([3]), torch.arange(250, 262), torch.tensor([600]), torch.tensor([1000, 7])):
        tables = rotary.at(positions, end=int(positions.max()) + 1)
        for kind in rotary.kinds:
            cos, sin = module(torch.empty(0), positions[None], **({} if kind is None else {"layer_type": kind}))
            torch.testing.assert_close(tables[kind], (cos[0, :, None], sin[0, :, None]), rtol=0, atol=1e-6)
    assert rotary._positions == 1024  # whole blocks of 256 past position 1000, the earlier rows (7) kept
    assert all(cos.shape[0] == 1024 for cos, _ in rotary._tables.values())  # 768 -> 1024 grew in place


def test_rotary_tables_stay_within_the_bytes_a_node_budgets_for_them(tiny_checkpoint):
    """Grown one decode position at a time, the tables never hold more than `max_bytes` of the positions reached
    (what a node takes off its KV budget for them), and that bound is at most twice what they come to hold."""
    stage = make_stage(tiny_checkpoint("llama", num_layers=2), 0, 2)
    rotary = stage.rotary
    assert rotary.nbytes == 0 and rotary.max_bytes(0) == 0
    per_position = 2 * stage.head_dim * 4  # cos and sin rows, fp32
    assert rotary.max_bytes(1) == 2 * rotary.BLOCK * per_position
    for position in range(1300):
        rotary.at(torch.tensor([position]), end=position + 1)
        assert rotary.nbytes <= rotary.max_bytes(position + 1) <= 2 * rotary.nbytes, position
    assert rotary.nbytes == 2048 * per_position  # rooms 256, 512, 1024, 2048
    assert rotary.max_bytes(1300) == 2 * 1536 * per_position


def test_a_dynamic_rope_is_computed_for_every_pass():
    """NTK-dynamic rope rescales its frequencies once a sequence outgrows the trained context: no table."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from node.model.stage import RotaryTables
    from tests.conftest import tiny_config

    config = tiny_config("llama", 2)
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    module = LlamaRotaryEmbedding(config)
    rotary = RotaryTables(module, None, F32)
    assert not rotary.static
    late = rotary.at(torch.arange(300, 304), end=304)[None]  # past max_position_embeddings (256): rescaled
    assert rotary._positions == 0
    torch.testing.assert_close(late[0], module(torch.empty(0), torch.arange(300, 304)[None])[0][0, :, None])
    unscaled = LlamaRotaryEmbedding(tiny_config("llama", 2))(torch.empty(0), torch.arange(300, 304)[None])[0]
    assert not torch.allclose(late[0], unscaled[0, :, None])


def test_sub_range_equals_the_stage_layers(tiny_checkpoint):
    path = tiny_checkpoint("mistral", num_layers=4)
    x = torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(1))
    states = reference_hidden_states(path, x)
    whole = make_stage(path, 0, 4)
    sub = run_incrementally(whole, states[1], layers=(1, 3))  # absolute layer indices
    assert torch.allclose(sub, run_incrementally(make_stage(path, 1, 3), states[1]), atol=ATOL)
    assert torch.allclose(sub, states[3], atol=ATOL)
    with pytest.raises(ValueError, match="absolute"):
        whole.new_cache(8, layers=(3, 5))
    cache = whole.new_cache(8, layers=(1, 3))
    with pytest.raises(ValueError, match="holds layers"):
        whole.forward(x[:, :2], 0, cache, layers=(0, 4))


def test_batched_steps_equal_one_at_a_time(tiny_checkpoint):
    """Sessions at different lengths (one beyond the sliding window, one on a sub-range) in one pass."""
    stage = make_stage(tiny_checkpoint("mistral", num_layers=4), 0, 4)
    gen = torch.Generator().manual_seed(2)
    prompts = [1, 5, 12, 21, 3]
    spans = [None, None, None, None, (1, 4)]
    alone = [stage.new_cache(40, span) for span in spans]
    batched = [stage.new_cache(40, span) for span in spans]
    for n, a, b in zip(prompts, alone, batched, strict=True):
        x = torch.randn(1, n, 64, generator=gen)
        stage.forward(x, 0, a, a.layers)
        stage.forward(x, 0, b, b.layers)
    for step in range(4):
        xs = [torch.randn(1, 1, 64, generator=gen) for _ in prompts]
        if step == 2:  # a prefill chunk of one session rides along with the decode steps of the others
            xs[1] = torch.randn(1, 6, 64, generator=gen)
        expected = [stage.forward(x, c.length, c) for x, c in zip(xs, alone, strict=True)]
        got = stage.forward_batch([StepInput(x, c.length, c) for x, c in zip(xs, batched, strict=True)])
        for e, g in zip(expected, got, strict=True):
            assert g.shape == e.shape and torch.allclose(g, e, atol=ATOL)
    assert [c.length for c in batched] == [c.length for c in alone]


def test_cache_memory_is_exactly_the_reservation(tiny_checkpoint):
    stage = make_stage(tiny_checkpoint("llama", num_layers=4), 0, 4)
    per_layer = kv_bytes_per_token(stage.config, F32)
    assert per_layer == 2 * 2 * 16 * 4  # K and V, 2 KV heads, head_dim 16, fp32
    assert stage.shape.kv_bytes_per_token == 4 * per_layer
    cache = stage.new_cache(100)
    assert cache.nbytes == 100 * stage.shape.kv_bytes_per_token == stage.cache_bytes(100)
    assert stage.new_cache(100, layers=(1, 3)).nbytes == 100 * 2 * per_layer == stage.cache_bytes(100, (1, 3))

    stage.forward(torch.randn(1, 98, 64), 0, cache)
    with pytest.raises(ValueError, match="max_length"):
        stage.forward(torch.randn(1, 3, 64), 98, cache)
    assert cache.length == 98 and cache.nbytes == stage.cache_bytes(100)  # refused: nothing moved or grew
    with pytest.raises(ValueError, match="position"):
        stage.forward(torch.randn(1, 1, 64), 97, cache)
    with pytest.raises(ValueError, match="shape"):
        stage.forward(torch.randn(1, 1, 63), 98, cache)
    growing = stage.new_cache()  # no max_length: grows on demand (tests, references)
    stage.forward(torch.randn(1, 40, 64), 0, growing)
    assert growing.length == 40 and growing.capacity >= 40


# --- StepBatcher ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_stage(tiny_checkpoint) -> Stage:
    return make_stage(tiny_checkpoint("llama", num_layers=4), 0, 4)


def recorded_passes(stage: Stage, monkeypatch) -> list[list[tuple[int, int]]]:
    """Spies on forward_batch: each pass as [(session index, tokens)], sessions named by `cache.tag`."""
    passes: list[list[tuple[int, int]]] = []
    real = stage.forward_batch

    def spy(steps):
        passes.append([(step.cache.tag, step.tokens) for step in steps])
        return real(steps)

    monkeypatch.setattr(stage, "forward_batch", spy)
    return passes


def tagged_caches(stage: Stage, n: int, max_length: int = 64):
    caches = [stage.new_cache(max_length) for _ in range(n)]
    for i, cache in enumerate(caches):
        cache.tag = i
    return caches


def test_batcher_gathers_concurrent_decodes_and_matches_one_at_a_time(llama_stage, monkeypatch):
    stage, n, steps = llama_stage, 8, 5
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randn(1, 2 + i, 64, generator=gen) for i in range(n)]
    tokens = [[torch.randn(1, 1, 64, generator=gen) for _ in range(steps)] for _ in range(n)]
    expected = []
    for prompt, xs in zip(prompts, tokens, strict=True):
        cache = stage.new_cache(64)
        stage.forward(prompt, 0, cache)
        expected.append([stage.forward(x, cache.length, cache) for x in xs])

    caches = tagged_caches(stage, n)
    passes = recorded_passes(stage, monkeypatch)

    async def decode(batcher: StepBatcher, i: int) -> list[torch.Tensor]:
        return [await batcher.run(caches[i], x, caches[i].length) for x in tokens[i]]

    async def main():
        batcher = StepBatcher(stage, max_batch_size=32)
        try:
            await asyncio.gather(*(batcher.run(caches[i], prompts[i], 0) for i in range(n)))
            return await asyncio.gather(*(decode(batcher, i) for i in range(n)))
        finally:
            batcher.shutdown()

    got = asyncio.run(main())
    for e_session, g_session in zip(expected, got, strict=True):
        for e, g in zip(e_session, g_session, strict=True):
            assert torch.allclose(g, e, atol=ATOL)
    assert passes[0] == [(i, 2 + i) for i in range(n)], "the prompts that came together share one pass"
    assert [len(p) for p in passes[1:]] == [n] * steps, "each round of decode steps is one pass"


def test_batcher_is_fifo_and_bounded(llama_stage, monkeypatch):
    stage = llama_stage
    caches = tagged_caches(stage, 8)
    for cache in caches:
        stage.forward(torch.randn(1, 3, 64), 0, cache)
    passes = recorded_passes(stage, monkeypatch)

    async def main():
        batcher = StepBatcher(stage, max_batch_size=3)
        # All eight are queued before the worker takes its first batch.
        await asyncio.gather(*(batcher.run(c, torch.randn(1, 1, 64), 3) for c in caches))
        assert batcher.queue_len == 0 and batcher.pending == 0
        batcher.shutdown()

    asyncio.run(main())
    assert [[tag for tag, _ in p] for p in passes] == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_long_prefill_is_chunked_and_shares_its_passes_with_decodes(llama_stage, monkeypatch):
    stage = llama_stage
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randn(1, 40, 64, generator=gen)
    expected = stage.forward(prompt, 0, stage.new_cache(64))
    long_cache, *decoders = tagged_caches(stage, 3)
    for cache in decoders:
        stage.forward(torch.randn(1, 2, 64), 0, cache)
    passes = recorded_passes(stage, monkeypatch)

    async def decode_loop(batcher: StepBatcher, cache, prefill: asyncio.Task) -> int:
        steps = 0
        while not prefill.done():  # keeps decoding for as long as the prefill runs: must not starve
            await batcher.run(cache, torch.randn(1, 1, 64), cache.length)
            steps += 1
        return steps

    async def main():
        batcher = StepBatcher(stage, max_batch_tokens=8)
        prefill = asyncio.ensure_future(batcher.run(long_cache, prompt, 0))
        counts = await asyncio.gather(*(decode_loop(batcher, c, prefill) for c in decoders))
        batcher.shutdown()
        return await prefill, counts

    got, counts = asyncio.run(main())
    assert torch.allclose(got, expected, atol=ATOL)  # the chunks give the one-pass result
    assert all(sum(tokens for _, tokens in p) <= 8 for p in passes), passes
    chunks = [[tokens for tag, tokens in p if tag == 0] for p in passes]
    assert sum(sum(c) for c in chunks) == 40 and all(len(c) <= 1 for c in chunks)
    with_chunk = [sorted(tag for tag, _ in p) for p, c in zip(passes, chunks, strict=True) if c]
    assert with_chunk[1:] == [[0, 1, 2]] * (len(with_chunk) - 1), "both decoders ride along every chunk"
    assert len(with_chunk) <= 7 and min(counts) >= 5


@pytest.mark.parametrize("gather", [True, False])
def test_sessions_arriving_out_of_step_are_gathered_into_one_pass(llama_stage, monkeypatch, gather):
    """Two sessions step in the same rhythm (30 ms elsewhere per round), 12 ms apart. Without gathering the
    stage never waits (on an idle machine each keeps its own pass); with it, the stage waits for the due one
    once, and they stay together."""
    stage = llama_stage
    caches = tagged_caches(stage, 2)
    for cache in caches:
        stage.forward(torch.randn(1, 2, 64), 0, cache)
    passes = recorded_passes(stage, monkeypatch)

    async def session(batcher: StepBatcher, cache, start_s: float) -> None:
        await asyncio.sleep(start_s)
        for _ in range(12):
            await batcher.run(cache, torch.randn(1, 1, 64), cache.length)
            await asyncio.sleep(0.03)  # the rest of the chain and the client

    async def main():
        batcher = StepBatcher(stage, max_gather_s=0.05 if gather else 0.0)
        await asyncio.gather(session(batcher, caches[0], 0.0), session(batcher, caches[1], 0.012))
        batcher.shutdown()
        return batcher.gather_waits

    waits = asyncio.run(main())
    sizes = [len(p) for p in passes]
    if gather:
        together = sizes.index(2)  # one session has run a step more than the other when they meet
        assert together <= 4 and sizes[together: together + 10] == [2] * 10, sizes
        assert 1 <= waits <= 3, waits  # paid once (plus a jittery round at most), not every round
    else:  # never waits; on a loaded machine a slow pass may still find both queued and take them together
        assert sum(sizes) == 24 and waits == 0, sizes


def pass_threads(stage: Stage, monkeypatch) -> list[str]:
    """Spies on forward_batch: the name of the thread each pass ran on."""
    threads: list[str] = []
    real = stage.forward_batch
    monkeypatch.setattr(stage, "forward_batch", lambda steps: (threads.append(threading.current_thread().name),
                                                                real(steps))[1])
    return threads


def _task_here() -> asyncio.Task | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # a thread without an event loop
        return None


def test_a_lone_session_is_never_held_back_and_skips_the_thread_handoff(llama_stage, monkeypatch):
    stage = llama_stage
    cache, other = stage.new_cache(64), stage.new_cache(64)
    for c in (cache, other):
        stage.forward(torch.randn(1, 2, 64), 0, c)
    threads = pass_threads(stage, monkeypatch)
    in_callers_task = []  # per lone step: whether its pass ran in the caller's task (no worker, no queue)

    async def main(lone_steps: int, then_another: bool):
        batcher = StepBatcher(stage, max_gather_s=1.0)
        ran_in, real = [], batcher._compute
        monkeypatch.setattr(batcher, "_compute", lambda steps: (ran_in.append(_task_here()), real(steps))[1])
        for _ in range(lone_steps):
            await batcher.run(cache, torch.randn(1, 1, 64), cache.length)
            in_callers_task.append(ran_in[-1] is asyncio.current_task())
            await asyncio.sleep(0.01)
        waits = batcher.gather_waits
        if then_another:  # once a second session decodes here, passes go back to the compute thread
            await batcher.run(other, torch.randn(1, 1, 64), other.length)
            await batcher.run(cache, torch.randn(1, 1, 64), cache.length)
        batcher.shutdown()
        return waits

    assert asyncio.run(main(8, then_another=True)) == 0
    loop_thread = threading.current_thread().name
    assert threads[:8] == [loop_thread] * 8, "a lone session's decode passes run on the event loop"
    # ... and after its first step here, in its own task: no queue, no worker task, no loop turns between
    assert in_callers_task == [False] + [True] * 7
    assert all(name.startswith("stage-compute") for name in threads[8:]) and len(threads) == 10

    # Not with several torch threads: torch run from two threads gets two OpenMP teams, and GNU OpenMP then
    # stops spinning between parallel regions (2 threads on 2 cores: 32 -> 55 ms per token).
    threads.clear()
    torch.set_num_threads(2)
    try:
        asyncio.run(main(4, then_another=False))
    finally:
        torch.set_num_threads(1)
    assert len(threads) == 4 and all(name.startswith("stage-compute") for name in threads), threads


def test_a_failing_step_does_not_fail_its_batch(llama_stage, monkeypatch):
    stage = llama_stage
    caches, twins = tagged_caches(stage, 4), tagged_caches(stage, 4)
    xs = [torch.randn(1, 1, 64) for _ in caches]
    expected = []
    for cache, twin, x in zip(caches, twins, xs, strict=True):
        prompt = torch.randn(1, 2, 64)
        stage.forward(prompt, 0, cache)
        stage.forward(prompt, 0, twin)
        expected.append(stage.forward(x, 2, twin))
    real = stage.forward_batch

    def poisoned(steps):  # session 2 fails whenever it runs, as a compute error would
        if any(step.cache.tag == 2 for step in steps):
            raise RuntimeError("boom")
        return real(steps)

    monkeypatch.setattr(stage, "forward_batch", poisoned)

    async def main():
        batcher = StepBatcher(stage)
        with pytest.raises(ValueError, match="shape"):  # refused up front, never batched
            await batcher.run(caches[0], torch.randn(1, 1, 65), 2)
        results = await asyncio.gather(*(batcher.run(c, x, 2) for c, x in zip(caches, xs, strict=True)),
                                       return_exceptions=True)
        first = asyncio.ensure_future(batcher.run(caches[0], xs[0], 3))
        await asyncio.sleep(0)  # queued
        with pytest.raises(ValueError, match="already has a step"):
            await batcher.run(caches[0], xs[0], 3)
        await first
        batcher.shutdown()
        with pytest.raises(BatcherClosed):
            await batcher.run(caches[1], xs[1], 3)
        return results

    results = asyncio.run(main())
    assert isinstance(results[2], RuntimeError) and caches[2].length == 2
    for i in (0, 1, 3):
        assert torch.allclose(results[i], expected[i], atol=ATOL)


def test_a_pass_the_compute_thread_cannot_take_fails_its_steps_instead_of_hanging(llama_stage):
    stage = llama_stage
    caches = tagged_caches(stage, 2)

    async def main():
        batcher = StepBatcher(stage)
        batcher._executor.shutdown()  # as when the node stops under a running pass
        return await asyncio.wait_for(asyncio.gather(
            *(batcher.run(c, torch.randn(1, 2, 64), 0) for c in caches), return_exceptions=True), 10)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results), results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("sliceable", [False, True])
def test_projection_computes_what_linear_does_with_every_kernel(dtype, with_bias, sliceable):
    """fp32 on CPU runs oneDNN on a reordered weight (or, sliceable, a transposed one), other dtypes F.linear:
    either way the outputs are F.linear's, for 2-D and 3-D inputs, and a sliceable one computes a range alone."""
    from node.model.projection import Projection

    torch.manual_seed(0)
    weight, bias = torch.randn(48, 32, dtype=dtype), (torch.randn(48, dtype=dtype) if with_bias else None)
    projection = Projection(weight, bias, sliceable=sliceable)
    expected_kernel = "linear" if dtype != torch.float32 else "transposed" if sliceable else "onednn"
    assert projection.kernel == expected_kernel
    assert projection.weight.shape == ((32, 48) if expected_kernel == "transposed" else (48, 32))
    tolerance = {"atol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}
    for x in (torch.randn(5, 32, dtype=dtype), torch.randn(2, 3, 32, dtype=dtype)):
        expected = torch.nn.functional.linear(x, weight, bias)
        assert torch.allclose(projection(x), expected, **tolerance)
        if sliceable:
            assert torch.allclose(projection(x, outputs=(7, 20)), expected[..., 7:20], **tolerance)
    if not sliceable and dtype == torch.float32:
        with pytest.raises(ValueError, match="sliceable"):
            projection(torch.randn(1, 32), outputs=(0, 8))


def test_a_cpu_stage_runs_every_projection_on_onednn_and_holds_no_weight_twice(tiny_checkpoint):
    from node.model.projection import Projection

    path = tiny_checkpoint("qwen2")  # biases on q, k and v
    stage = make_stage(path, 0, 2)
    projections = [m for m in stage.layers.modules() if isinstance(m, Projection)]
    assert len(projections) == 4 * 2 and all(p.kernel == "onednn" for p in projections)
    assert not any(isinstance(m, torch.nn.Linear) for m in stage.layers.modules())
    assert stage.layers[0].self_attn.qkv_proj.bias is not None
    expected = sum(p.numel() for p in AutoModel.from_config(stage.config).layers.parameters())
    assert sum(p.numel() for p in stage.layers.parameters()) == expected
    assert stage.head is None and stage.embedder is not None


def test_onednn_rows_do_not_depend_on_their_batch_and_its_absence_falls_back(monkeypatch):
    """What projection.py promises: a row's oneDNN result is the same bit for bit alone or among 8 (so batching
    sessions does not change their outputs), and a build without oneDNN gets the transposed layout."""
    from node.model.projection import Projection

    torch.manual_seed(0)
    weight, bias = torch.randn(1536, 576), torch.randn(1536)  # a SmolLM2-sized projection
    projection = Projection(weight, bias)
    assert projection.kernel == "onednn"
    rows = torch.randn(8, 576)
    together = projection(rows)
    assert all(torch.equal(together[i: i + 1], projection(rows[i: i + 1])) for i in range(8))

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    fallback = Projection(weight, bias)
    assert fallback.kernel == "transposed" and fallback.weight.shape == (576, 1536)
    assert torch.allclose(fallback(rows), together, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "llama3", "qwen3", "phi3", "gemma3"])
def test_embedding_stages_and_head_give_the_logits_of_transformers(arch, tiny_checkpoint):
    """Token ids through the first stage's embedding (Gemma scales it by sqrt(hidden)), two stages and the last
    stage's norm + LM head equal transformers' own causal LM: what a ring computes, end to end."""
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint(arch, num_layers=4)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    expected = AutoModelForCausalLM.from_pretrained(path, dtype=F32).eval()(ids).logits[0, -1]
    first, last = make_stage(path, 0, 2), make_stage(path, 2, 4)
    hidden = first.embedder.embed(ids)
    hidden = first.forward(hidden, 0, first.new_cache(24))
    hidden = last.forward(hidden, 0, last.new_cache(24))
    logits = last.head.logits(hidden)[0, -1]
    assert torch.allclose(logits, expected, atol=ATOL * max(1.0, float(expected.abs().max())))
    assert (first.embedder.scale == 8.0) == (arch == "gemma3")  # sqrt(64)
