"""Driving a node from a UI: start, pause (drain and withdraw), resume (rejoin), stop, status, and chat.

`NodeController` runs the node's asyncio loop in a background thread, so a Qt UI thread never blocks:
every method returns at once, with a `concurrent.futures.Future` for the ones that take time, and is
safe to call from any thread. Operations run one at a time, in the order they were called (a `pause`
called while the node is still joining runs once it is online), except `stop`, which cancels whatever
is under way. State changes are reported to callbacks registered with `on_state_change`; they run on
the node's thread, so a Qt app should re-emit them as a signal (queued connection) rather than touch
widgets there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from node.client.chat import REVISED_NOTICE, ChatEngine, Message, TextRevision
from node.client.session import connect
from node.model.checkpoint import ModelSource, resolve_model
from node.model.sampling import SamplingParams
from node.serve.node import Node, NodeConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeStatus:
    state: str  # one of node.serve.node.NODE_STATES
    peer_id: str | None
    layers: tuple[int, int] | None  # the range new sessions go to; None while joining, paused or stopped
    epoch: int
    sessions: int  # open now, on every stage this node still serves
    draining_layers: tuple[tuple[int, int], ...]  # ranges left by a move, finishing their sessions
    tokens_served: int  # contribution counters, since the controller started
    steps_served: int
    sessions_opened: int
    online_s: float
    error: str | None = None


StateCallback = Callable[[str, NodeStatus], None]


class NodeController:
    def __init__(self, model: str | ModelSource, config: NodeConfig) -> None:
        self.source = model if isinstance(model, ModelSource) else resolve_model(model)
        self.config = config
        self._callbacks: list[StateCallback] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="layerhive-node", daemon=True)
        self._thread.start()
        self._node = self._call_soon(self._make_node).result()  # built on its loop, which owns its tasks
        self._lock: asyncio.Lock | None = None
        self._current: asyncio.Task | None = None
        self._chat_engine: ChatEngine | None = None
        self._chat_client = AsyncExitStack()  # closes the chat engine's client, if one was started
        self._chat_lock: asyncio.Lock | None = None

    # --- the API --------------------------------------------------------------------------------------

    def start(self) -> Future:
        """Joins the swarm (or serves the fixed range); the future resolves once the node is online."""
        return self._submit(self._node.start)

    def pause(self, deadline_s: float = 60.0) -> Future:
        """Refuses new sessions, lets open ones finish for up to `deadline_s`, withdraws from the DHT and
        frees the layers' memory; the future resolves once paused."""
        return self._submit(lambda: self._node.pause(deadline_s))

    def resume(self) -> Future:
        """Rejoins with a new assignment; the future resolves once online again."""
        return self._submit(self._node.resume)

    def set_memory_cap(self, max_memory_bytes: int | None) -> Future:
        """Caps the memory offered to the swarm (None: no cap); a serving node drains and rejoins with it."""
        return self._submit(lambda: self._node.set_memory_cap(max_memory_bytes))

    def swarm_status(self) -> Future:
        """Resolves to the swarm as the DHT shows it (`node.serve.assignment.swarm_status`: nodes, their ranges and
        load, replicas per layer), or None while the node has no DHT (stopped). Runs beside other operations."""
        return asyncio.run_coroutine_threadsafe(self._node.swarm_status(), self._loop)

    def stop(self) -> Future:
        """Cancels what is under way, leaves the swarm and ends the node's thread."""
        future: Future = Future()
        if not self._loop.is_running():
            future.set_result(None)
            return future

        async def stop() -> None:
            if self._current is not None:
                self._current.cancel()
            try:
                await self._node.stop()
            finally:
                await self._chat_client.aclose()
                self._loop.call_soon(self._loop.stop)

        stopping = asyncio.run_coroutine_threadsafe(stop(), self._loop)

        def finish() -> None:  # on a helper thread: the node's own thread cannot wait for itself to end
            try:
                stopping.result()
                self._thread.join(timeout=30)
                future.set_result(None)
            except BaseException as e:
                future.set_exception(e)

        threading.Thread(target=finish, name="layerhive-node-stop", daemon=True).start()
        return future

    def chat(self, messages: Sequence[Message], params: SamplingParams, on_text: Callable[[str], None]) -> Future:
        """Streams an answer from the swarm: `on_text(piece)` gets each piece of text as it comes (on the node's
        thread); the future resolves to the whole answer, and cancelling it stops the answer. The chain is
        routed and failed over like any client's (`node.client.chat.ChatEngine`); it runs beside start/pause/resume."""
        return asyncio.run_coroutine_threadsafe(self._chat(list(messages), params, on_text), self._loop)

    async def _chat(self, messages: list[Message], params: SamplingParams, on_text: Callable[[str], None]) -> str:
        self._chat_lock = self._chat_lock or asyncio.Lock()
        async with self._chat_lock:  # the first answers of a session must not each start a client
            await self._start_chat_engine()
        answer = ""
        async for piece in self._chat_engine.stream_chat(messages, params):
            if isinstance(piece, TextRevision):  # a lying node was caught: the answer restarts, marked so
                answer = answer[:piece.keep_chars]
                piece = f"\n[{REVISED_NOTICE}]\n{answer}"
            else:
                answer += piece
            on_text(piece)
        return answer

    async def _start_chat_engine(self) -> None:
        if self._chat_engine is None:
            # A peer of its own, in client mode: a chain may run through this very node (p2pd cannot dial
            # itself), and chatting goes on while the node is paused. The DHT and the tokenizer start off
            # the loop, which is serving.
            client = await self._chat_client.enter_async_context(
                connect(self.config.initial_peers, self.source, host_maddrs=self.config.host_maddrs))
            self._chat_engine = await asyncio.to_thread(ChatEngine, client, self.source)

    def status(self) -> NodeStatus:
        """A snapshot, read without waiting for the node's thread (its fields are updated atomically)."""
        node = self._node
        record, server = node.record, node.server
        active = server is not None and node.state in ("online", "draining")
        servers = [s for s in [server, *node.retiring] if s is not None]
        return NodeStatus(
            state=node.state, peer_id=record.peer_id if record else None,
            layers=(record.start, record.end) if active and record else None,
            epoch=record.epoch if record else 0, sessions=sum(len(s.sessions) for s in servers),
            draining_layers=tuple((s.stage.start, s.stage.end) for s in node.retiring if s.stage is not None),
            tokens_served=node.tokens_served, steps_served=node.steps_served,
            sessions_opened=node.sessions_opened, online_s=node.online_s, error=node.error,
        )

    def on_state_change(self, callback: StateCallback) -> Callable[[], None]:
        """Calls `callback(state, status)` on every state change (on the node's thread); returns an unsubscriber."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    @property
    def node(self) -> Node:
        """The node itself, for code running on its loop (tests, diagnostics); not thread-safe."""
        return self._node

    # --- plumbing -------------------------------------------------------------------------------------

    def _make_node(self) -> Node:
        node = Node(self.source, self.config)
        node.listeners.append(self._notify)
        return node

    def _notify(self, state: str) -> None:
        status = self.status()
        for callback in list(self._callbacks):
            try:
                callback(state, status)
            except Exception:
                logger.exception("a state-change callback failed")

    def _call_soon(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

        self._loop.call_soon_threadsafe(run)
        return future

    def _submit(self, operation: Callable[[], Coroutine[Any, Any, None]]) -> Future:
        async def serialized() -> None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                self._current = asyncio.current_task()
                try:
                    await operation()
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self._node.fail(f"{type(e).__name__}: {e}")
                    raise
                finally:
                    self._current = None

        return asyncio.run_coroutine_threadsafe(serialized(), self._loop)
