"""The OpenAI-compatible API, driven by the official `openai` client against a live local swarm."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator

import openai
import pytest
import requests
import uvicorn
from fastapi import FastAPI

from node.app.api import (
    BODY_OVERHEAD_BYTES,
    MAX_BODY_BYTES_PER_CHAR,
    MAX_CHARS_PER_TOKEN,
    StopSequences,
    create_app,
)
from node.app.api_guard import REFUSAL_HALF_LIFE_S, FairShare
from node.app.local_swarm import LocalSwarm
from node.model.checkpoint import DEFAULT_MODEL, load_tokenizer

pytestmark = pytest.mark.timeout(300)

STORY = [{"role": "user", "content": "Tell me a long story about a bee who learns to fly."}]
MAX_TOKENS = 12


# ------------------------------------------------------------------------------------------------ fixtures


@contextlib.contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """Serves `app` with uvicorn in a background thread on a free loopback port; yields the /v1 base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here and handed over, so no other process can take the port meanwhile
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API server did not start (its lifespan failed?)")
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory) -> Iterator[LocalSwarm]:
    with LocalSwarm(DEFAULT_MODEL, num_nodes=3, threads_per_node=1,
                    log_dir=str(tmp_path_factory.mktemp("api-swarm-logs"))) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def api_url(swarm) -> Iterator[str]:
    with running(create_app(DEFAULT_MODEL, swarm.initial_peers)) as url:
        yield url


@pytest.fixture(scope="module")
def client(api_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(swarm):
    return load_tokenizer(swarm.source)


@pytest.fixture(scope="module")
def story(client) -> openai.types.chat.ChatCompletion:
    """The greedy, non-streamed answer to STORY that several tests compare against."""
    return client.chat.completions.create(model=DEFAULT_MODEL, messages=STORY, max_tokens=MAX_TOKENS, temperature=0)


def chat_prompt_tokens(tokenizer, messages) -> int:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return len(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def assert_still_serves(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=STORY, max_tokens=2, temperature=0)
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens == 2


# ----------------------------------------------------------------------------------------- stop sequences


def test_stop_sequences_hold_back_a_possible_start_and_cut_across_deltas():
    stops = StopSequences(["END", "xy"])
    assert stops.push("Hello E") == ("Hello ", False)  # "E" may begin "END": held back
    assert stops.push("N") == ("", False)
    assert stops.push("D and more") == ("", True)
    stops = StopSequences(["END"])
    assert stops.push("Hello E") == ("Hello ", False)
    assert stops.push("arth") == ("Earth", False)  # not a stop after all: released
    assert stops.push(" E") == (" ", False)
    assert stops.flush() == "E"


def test_stop_sequences_cut_at_the_earliest_match():
    assert StopSequences(["c", "ab"]).push("xxabc") == ("xx", True)
    assert StopSequences([]).push("anything") == ("anything", False)


# ------------------------------------------------------------------------------------------------ endpoints


def test_models_lists_the_swarm_model(client):
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL]
    assert client.models.retrieve("smollm2-135m").id == DEFAULT_MODEL  # aliases resolve


def test_chat_non_streaming_counts_usage(story, tokenizer):
    assert story.object == "chat.completion" and story.model == DEFAULT_MODEL
    choice = story.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # a long story does not end in MAX_TOKENS tokens
    assert story.usage.prompt_tokens == chat_prompt_tokens(tokenizer, STORY)
    assert story.usage.completion_tokens == MAX_TOKENS
    assert story.usage.total_tokens == story.usage.prompt_tokens + MAX_TOKENS


def test_chat_streaming_matches_non_streaming(client, story):
    chunks = list(client.chat.completions.create(
        model=DEFAULT_MODEL, messages=STORY, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == story.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == story.usage


def test_completion_uses_no_chat_template(client, tokenizer):
    prompt = "The capital of France is"
    reply = client.completions.create(model=DEFAULT_MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text
    assert reply.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 6


def test_completion_stream_is_server_sent_events(api_url):
    body = {"model": DEFAULT_MODEL, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with requests.post(f"{api_url}/completions", json=body, stream=True, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 4


def test_stop_sequence_cuts_the_text(client, story):
    full = story.choices[0].message.content
    words = full.split(" ")
    stop = " " + words[len(words) // 2]
    expected = full[: full.index(stop)]
    for stream in (False, True):
        request = dict(model=DEFAULT_MODEL, messages=STORY, max_tokens=MAX_TOKENS, temperature=0,
                       stop=[stop, "no such text"])
        if stream:
            chunks = list(client.chat.completions.create(**request, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert (text, finish) == (expected, ["stop"])
        else:
            reply = client.chat.completions.create(**request)
            assert reply.choices[0].message.content == expected
            assert reply.choices[0].finish_reason == "stop"
            assert reply.usage.completion_tokens < MAX_TOKENS


def test_concurrent_requests_are_served_at_once(client):
    """Three streams in flight together: each starts before any ends, and each gets its own answer."""
    prompts = ["Name a colour.", "Count to five.", "What is a bee?"]
    alone = [client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": p}],
                                            max_tokens=8, temperature=0).choices[0].message.content
             for p in prompts]
    barrier = threading.Barrier(len(prompts))
    results: dict[int, tuple[str, float, float]] = {}

    def run(index: int) -> None:
        barrier.wait()
        stream = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": prompts[index]}], max_tokens=8,
            temperature=0, stream=True,
        )
        pieces, first_at = [], None
        for chunk in stream:
            first_at = first_at or time.monotonic()
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
        results[index] = ("".join(pieces), first_at, time.monotonic())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == [0, 1, 2]
    assert [results[i][0] for i in range(3)] == alone
    assert max(first for _, first, _ in results.values()) < min(last for _, _, last in results.values())


# --------------------------------------------------------------------------------------------------- errors


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=STORY, max_tokens=2)
    assert caught.value.status_code == 404
    assert (caught.value.code, caught.value.param, caught.value.type) == ("model_not_found", "model",
                                                                          "invalid_request_error")
    assert_still_serves(client)


def test_prompt_over_the_context_is_400(client):
    long_messages = [{"role": "user", "content": "hello " * 9000}]  # ~9000 tokens, the context is 8192
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=long_messages, max_tokens=2)
    assert caught.value.code == "context_length_exceeded" and "8192" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:  # a short prompt asking for too many tokens
        client.completions.create(model=DEFAULT_MODEL, prompt="Hi", max_tokens=9000)
    assert caught.value.code == "context_length_exceeded"
    assert_still_serves(client)


def test_malformed_json_is_400(client, api_url):
    response = requests.post(f"{api_url}/chat/completions", data='{"model": "x", "messages": [',
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]
    assert_still_serves(client)


@pytest.mark.parametrize(("param", "value"), [("max_tokens", -5), ("max_tokens", 0), ("temperature", 3.0),
                                              ("top_p", 0), ("n", 2)])
def test_bad_sampling_parameters_are_400(client, param, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=STORY, **{param: value})
    assert caught.value.status_code == 400
    assert (caught.value.type, caught.value.param) == ("invalid_request_error", param)


def test_bad_request_then_good_request(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=DEFAULT_MODEL, messages=STORY, max_tokens=-1)
    assert_still_serves(client)


def test_model_the_swarm_does_not_serve_is_503(swarm, tiny_checkpoint):
    """An API for a model nobody in the swarm serves: no chain, 503, and the server keeps answering."""
    path = str(tiny_checkpoint("llama", num_layers=2))
    with running(create_app(path, swarm.initial_peers)) as url:
        tiny = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        for _ in range(2):
            with pytest.raises(openai.InternalServerError) as caught:
                tiny.chat.completions.create(model=path, messages=[{"role": "user", "content": "hello"}],
                                             max_tokens=2)
            assert (caught.value.status_code, caught.value.code) == (503, "no_chain")
        assert [m.id for m in tiny.models.list().data] == [path]


# ------------------------------------------------------------------------------------------ hostile callers


def _whole_answer(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return length is None or len(body) >= int(length.group(1))


def raw_post(url: str, head: str, body_chunks: Iterable[bytes] = (), timeout_s: float = 60) -> tuple[int, bytes]:
    """Sends a POST with hand-made headers and body pieces on a raw socket, stopping once the server answers or
    closes; returns the status and the bytes of the answer (a hostile client owes the server no well-formed body)."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(head.encode())
        sock.setblocking(False)
        answer = b""
        for chunk in body_chunks:
            try:
                answer += sock.recv(65536)
                break  # the server answered before the body was all sent
            except BlockingIOError:
                pass
            try:
                sock.setblocking(True)
                sock.sendall(chunk)
                sock.setblocking(False)
            except OSError:  # the server closed the connection on us: its answer is waiting
                break
        sock.setblocking(True)
        with contextlib.suppress(OSError):  # the head, then the body it announces (they may arrive apart)
            while not _whole_answer(answer) and (more := sock.recv(65536)):
                answer += more
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    return status, answer


def test_a_body_announced_too_large_is_refused_before_it_is_sent(client, api_url):
    status, answer = raw_post(api_url, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                              "Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n")
    assert status == 413 and b"request_too_large" in answer
    assert_still_serves(client)


def _sent_before_cut(url: str, head: str, megabytes: int = 100) -> int:
    """Sends `head`, then `megabytes` MB of body whatever the server answers; the bytes sent before it cut us off."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    sent, piece = 0, b"x" * (1 << 20)
    with socket.create_connection((host, int(port)), timeout=30) as sock, contextlib.suppress(OSError):
        sock.sendall(head.encode())
        for _ in range(megabytes):
            sock.sendall(piece)
            sent += len(piece)
    return sent


def test_the_body_limit_follows_the_context_and_a_refusal_closes_the_connection(client, api_url):
    """No prompt of SmolLM2's 8192-token context needs a body over 8192 x 16 characters x 4 bytes + 64 KB: one
    announced a byte longer is refused by its Content-Length, and its connection closed, so a client that goes on
    sending its 100 MB is cut off after what the sockets buffer (before, the server read and threw away all of it)."""
    limit = 8192 * MAX_CHARS_PER_TOKEN * MAX_BODY_BYTES_PER_CHAR + BODY_OVERHEAD_BYTES
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: {}\r\n\r\n")
    status, answer = raw_post(api_url, head.format(limit + 1))
    assert status == 413 and f"larger than {limit} bytes".encode() in answer
    assert _sent_before_cut(api_url, head.format(100 << 20)) < 16 << 20
    assert_still_serves(client)


def test_a_chunked_body_is_refused_before_it_is_read(client, api_url):
    """Chunked, without a Content-Length: refused by its headers (411), not after 64 MB, nor after the limit."""
    sent = []

    def chunks() -> Iterator[bytes]:
        piece = b"x" * (256 << 10)
        for _ in range(256):  # 64 MB if the server read it all
            sent.append(len(piece))
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"

    status, answer = raw_post(api_url, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                              "application/json\r\nTransfer-Encoding: chunked\r\n\r\n", chunks())
    assert status == 411 and b"length_required" in answer
    # Not 64 MB; how many MB go out before the answer is seen depends on the machine's load (4.25 MB once at load 20).
    assert sum(sent) < 16 << 20, f"the server read {sum(sent)} bytes before refusing"
    assert_still_serves(client)


def test_a_prompt_longer_than_any_context_is_refused_before_tokenizing(client):
    """200,000 characters in a 1.2 MB body: within the body limit, but more characters than 8192 tokens reach
    at 16 a token, so it is refused on its length; the server keeps serving."""
    huge = [{"role": "user", "content": "hello " * 33_000}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=huge, max_tokens=2)
    assert caught.value.code == "context_length_exceeded" and "characters" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=DEFAULT_MODEL, prompt="hello " * 33_000, max_tokens=2)
    assert caught.value.code == "context_length_exceeded"
    assert_still_serves(client)


@pytest.mark.parametrize(("param", "value"), [("stop", ["a", "b", "c", "d", "e"]), ("stop", "x" * 300),
                                              ("seed", 2**64), ("seed", -1)])
def test_unbounded_fields_are_400(client, param, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=STORY, max_tokens=2, **{param: value})
    assert caught.value.param == param
    assert_still_serves(client)


def test_the_swarm_room_comes_from_the_records(swarm):
    """The longest session the swarm can hold, from the free KV tokens its nodes announce."""
    import asyncio

    from node.client.session import connect, session_room

    async def room() -> int | None:
        async with connect(swarm.initial_peers, swarm.source) as probe:
            return await probe.session_room()

    swarm_room = asyncio.run(room())
    assert swarm_room is not None and swarm_room > 0
    records = swarm.online_records()
    assert swarm_room == session_room(records, swarm.source.num_layers)
    assert session_room(records[1:], swarm.source.num_layers) is None  # a layer uncovered: no chain, no figure


def test_the_swarm_room_bounds_max_tokens_and_its_default(tiny_checkpoint, swarm):
    """`ServedModel.sampling_params` with a small room: an explicit max_tokens beyond it is a 400 naming the room,
    the default shrinks to it, and a prompt that alone exceeds it is a 503 (the swarm is full, not the request bad)."""
    from node.app.api import APIError, ServedModel
    from node.app.api_schema import ChatCompletionRequest

    app = create_app(DEFAULT_MODEL, swarm.initial_peers)
    with running(app):
        model: ServedModel = app.state.served
        request = ChatCompletionRequest(model=DEFAULT_MODEL, messages=STORY)
        with pytest.raises(APIError) as caught:
            model.sampling_params(request, 100, 20, "messages", swarm_room=64)
        assert caught.value.status == 400 and "64" in caught.value.message and caught.value.param == "max_tokens"
        assert model.sampling_params(request, None, 20, "messages", swarm_room=64).max_new_tokens == 44
        with pytest.raises(APIError) as caught:
            model.sampling_params(request, None, 64, "messages", swarm_room=64)
        assert (caught.value.status, caught.value.code) == (503, "no_capacity")


def test_a_bearer_token_is_required_when_set(swarm):
    from node.app.api import api_key_for

    assert api_key_for("127.0.0.1", None) == (None, False)
    key, generated = api_key_for("0.0.0.0", None)  # beyond loopback: never open
    assert generated and len(key) >= 24
    assert api_key_for("0.0.0.0", "mine") == ("mine", False)
    with running(create_app(DEFAULT_MODEL, swarm.initial_peers, api_key="s3cret")) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = requests.post(f"{url}/chat/completions", json={"model": DEFAULT_MODEL, "messages": STORY},
                                     headers=headers, timeout=30)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        allowed = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0, timeout=120)  # as OpenAI clients send it
        assert [m.id for m in allowed.models.list().data] == [DEFAULT_MODEL]
        assert_still_serves(allowed)


def test_a_speculating_api_gives_the_same_greedy_answer(swarm, story):
    """`layerhive api --speculate K`: rings draft by prompt lookup, verified at the last stage; the greedy text is
    the plain API's."""
    import asyncio

    from node.client.session import connect

    async def drafts_verified() -> int:
        async with connect(swarm.initial_peers, swarm.source) as client:
            infos = [await client.node_info(swarm.peer_id(i)) for i in range(len(swarm.processes))]
        return sum(info["draft_tokens"] for info in infos)

    before = asyncio.run(drafts_verified())
    with running(create_app(DEFAULT_MODEL, swarm.initial_peers, speculate=6)) as url:
        speculating = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        reply = speculating.chat.completions.create(model=DEFAULT_MODEL, messages=STORY, max_tokens=MAX_TOKENS,
                                                    temperature=0)
    assert reply.choices[0].message.content == story.choices[0].message.content
    assert reply.usage == story.usage
    assert asyncio.run(drafts_verified()) > before  # drafts rode the answer's steps


# ---------------------------------------------------------------------------------------------- fair shares


def test_a_callers_refusals_wait_longer_the_more_it_is_refused_and_it_is_forgiven_in_time():
    clock = [0.0]
    share = FairShare(free_refusals=2, tarpit_step_s=0.5, tarpit_max_s=1.2, clock=lambda: clock[0])
    delays = [share.refusal_delay_s("address a") for _ in range(6)]
    assert delays[:2] == [0, 0] and 0 < delays[2] < delays[3] < delays[4] and delays[5] == 1.2
    assert share.refusal_delay_s("address b") == 0  # another caller's count is its own
    clock[0] += 10 * REFUSAL_HALF_LIFE_S
    assert share.refusal_delay_s("address a") == 0  # old refusals are forgotten
    few = FairShare(max_callers=3, max_in_flight=1)
    assert few.enter("busy")
    assert not few.enter("busy")  # one in flight is its whole share
    for n in range(10):
        few.refusal_delay_s(f"address {n}")
    assert len(few.callers) == 3 and "busy" in few.callers  # bounded; one with a request in flight is kept


def _wait_for(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_a_caller_refused_again_and_again_waits_for_its_refusals_but_not_for_its_answers(swarm):
    """Past its free refusals, a caller's refusal is held back (no CPU: a sleep), while a good request from the same
    address is answered meanwhile; once its held slots are taken, refusals go out at once; a held one still comes."""
    hold_s = 30.0
    share = FairShare(free_refusals=1, tarpit_step_s=hold_s, tarpit_max_s=hold_s, max_held_per_caller=1)
    too_large = ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 "Content-Length: 104857600\r\n\r\n")
    with running(create_app(DEFAULT_MODEL, swarm.initial_peers, fair_share=share)) as url:
        assert raw_post(url, too_large)[0] == 413  # the first: at once
        host, port = url.removeprefix("http://").split("/")[0].split(":")
        with socket.create_connection((host, int(port)), timeout=120) as held:
            held.sendall(too_large.encode())
            _wait_for(lambda: share.held == 1)  # the second: held back
            assert raw_post(url, too_large, timeout_s=hold_s / 2)[0] == 413  # the caller's one slot is taken
            local = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
            assert_still_serves(local)  # the same address's good request is not held
            assert share.held == 1
            answer = b""
            while not _whole_answer(answer) and (more := held.recv(65536)):
                answer += more
        assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer


def test_each_key_is_a_caller_with_its_own_requests_in_flight(swarm):
    """With keys "alice,bob" and one request in flight each: alice's second is 429 while her first is still being
    sent; bob, another caller, is served meanwhile; alice is served again once her first has ended."""
    share = FairShare(max_in_flight=1)
    with running(create_app(DEFAULT_MODEL, swarm.initial_peers, api_key="alice,bob", fair_share=share)) as url:
        host, port = url.removeprefix("http://").split("/")[0].split(":")
        with socket.create_connection((host, int(port)), timeout=60) as slow:
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")  # 99 bytes to come
            _wait_for(lambda: share.callers.get("key 0") is not None and share.callers["key 0"].in_flight == 1)
            response = requests.post(f"{url}/completions", json={"model": DEFAULT_MODEL, "prompt": "hi"},
                                     headers={"Authorization": "Bearer alice"}, timeout=60)
            assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limit_exceeded"
            assert_still_serves(openai.OpenAI(base_url=url, api_key="bob", max_retries=0, timeout=120))
        _wait_for(lambda: share.callers["key 0"].in_flight == 0)
        assert_still_serves(openai.OpenAI(base_url=url, api_key="alice", max_retries=0, timeout=120))
        assert response.headers["retry-after"] == "1"


def test_a_node_crash_mid_stream_is_an_error_event_then_an_error_status(client, swarm):
    """Runs last: it kills a node of the module's swarm, which has no replica of its layers, so failover
    finds no chain. A failure after the headers went out can only be reported inside the stream (an
    OpenAI-style `error` event, which the client raises as APIError); later requests get a 503, and the
    server keeps answering."""
    stream = client.chat.completions.create(model=DEFAULT_MODEL, messages=STORY, max_tokens=16, temperature=0,
                                            stream=True)
    chunks = iter(stream)
    next(chunks)  # the role chunk: the session is open and the first token decided
    swarm.kill(2)  # the last stage: the client holds a stream to it, so the crash shows at once
    with pytest.raises(openai.APIError) as caught:
        for _ in chunks:
            pass
    assert caught.value.type == "service_unavailable" and caught.value.code == "no_chain"
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=STORY, max_tokens=2)
    assert caught.value.status_code == 503
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL]
