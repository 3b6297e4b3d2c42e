"""Driving a node from a UI: start, pause (drain and withdraw), resume (rejoin), stop, status, and chat.

`NodeController` runs the node's asyncio loop in a background thread, so a Qt UI thread never blocks:
every method returns at once, with a `concurrent.futures.Future` for the ones that take time, and is
safe to call from any thread. Operations run one at a time, in the order they were called, except
`stop`, which cancels whatever is under way, and `pause`, which gives up a join under way (a join can
take a minute: the user who clicks Pause meanwhile means now, not once online). State changes are
reported to callbacks registered with `on_state_change`; they run on the node's thread, so a Qt app
should re-emit them as a signal (queued connection) rather than touch widgets there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from node.client.chat import REVISED_NOTICE, AnswerStats, AnswerTrace, ChatEngine, Message, TextRevision
from node.client.session import connect
from node.model.checkpoint import ModelSource, resolve_model
from node.model.sampling import SamplingParams
from node.serve.assignment import SwarmStatus, reference_memory
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
    own_tokens_served: int = 0  # of tokens_served, those of this machine's own chats (not a contribution)
    offered_memory_bytes: float | None = None  # memory offered to the swarm, in this node's own dtype; None: unknown

    @property
    def tokens_for_others(self) -> int:
        return self.tokens_served - self.own_tokens_served


StateCallback = Callable[[str, NodeStatus], None]


@dataclass(frozen=True)
class ChatReply:
    text: str
    stats: AnswerStats  # the model, tokens, speed and the chains that served it


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
        self._beside: set[asyncio.Task] = set()  # swarm reads and chats under way, cancelled by stop()

    # --- the API --------------------------------------------------------------------------------------

    def start(self) -> Future:
        """Joins the swarm (or serves the fixed range); the future resolves once the node is online."""
        return self._submit(self._node.start)

    def pause(self, deadline_s: float = 60.0) -> Future:
        """Refuses new sessions, lets open ones finish for up to `deadline_s`, withdraws from the DHT and
        frees the layers' memory; the future resolves once paused. A node still joining withdraws at once."""
        self._loop.call_soon_threadsafe(self._give_up_joining)  # runs before the pause is queued
        return self._submit(lambda: self._node.pause(deadline_s))

    def resume(self) -> Future:
        """Rejoins with a new assignment; the future resolves once online again."""
        return self._submit(self._node.resume)

    def set_memory_cap(self, max_memory_bytes: int | None) -> Future:
        """Caps the memory offered to the swarm (None: no cap); a serving node drains and rejoins with it."""
        return self._submit(lambda: self._node.set_memory_cap(max_memory_bytes))

    def swarm_status(self) -> Future:
        """Resolves to the swarm as the DHT shows it (a `node.serve.assignment.SwarmStatus`: nodes, their ranges and
        load, replicas per layer), or None while the node has no DHT (stopped). Runs beside other operations.
        Records announce memory at the planner's reference dtype; this node's own entry shows what it really
        offers (a 2 GB cap on a float32 CPU node is announced as 1 GB of bfloat16)."""
        return self._run_beside(self._swarm_status())

    async def _swarm_status(self) -> SwarmStatus | None:
        status = await self._node.swarm_status()
        offered, own = self.status().offered_memory_bytes, self._node.record
        if status is None or own is None or offered is None:
            return status
        nodes = tuple(dataclasses.replace(peer, record=dataclasses.replace(peer.record, memory_bytes=float(offered)))
                      if peer.record.peer_id == own.peer_id else peer for peer in status.nodes)
        return dataclasses.replace(status, nodes=nodes)

    def stop(self) -> Future:
        """Cancels what is under way, leaves the swarm and ends the node's thread."""
        future: Future = Future()
        if not self._loop.is_running():
            future.set_result(None)
            return future

        async def stop() -> None:
            if self._current is not None:
                self._current.cancel()
            beside = list(self._beside)
            for task in beside:  # else they are destroyed pending when the loop stops
                task.cancel()
            await asyncio.gather(*beside, return_exceptions=True)
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

    def chat(self, messages: Sequence[Message], params: SamplingParams,
             on_text: Callable[[str, AnswerStats], None]) -> Future:
        """Streams an answer from the swarm: `on_text(piece, stats)` gets each piece of text as it comes, with the
        answer's figures so far (tokens, speed, the chain serving it), on the node's thread. The future resolves
        to a `ChatReply`, and cancelling it stops the answer. The chain is routed and failed over like any
        client's (`node.client.chat.ChatEngine`); it runs beside start/pause/resume."""
        return self._run_beside(self._chat(list(messages), params, on_text))

    async def _chat(self, messages: list[Message], params: SamplingParams,
                    on_text: Callable[[str, AnswerStats], None]) -> ChatReply:
        trace = AnswerTrace(self.source.name)
        self._chat_lock = self._chat_lock or asyncio.Lock()
        async with self._chat_lock:  # the first answers of a session must not each start a client
            await self._start_chat_engine()
        answer = ""
        async for piece in self._chat_engine.stream_chat(messages, params, trace):
            if isinstance(piece, TextRevision):  # a lying node was caught: the answer restarts, marked so
                answer = answer[:piece.keep_chars]
                piece = f"\n[{REVISED_NOTICE}]\n{answer}"
            else:
                answer += piece
            on_text(piece, trace.stats())
        return ChatReply(answer, trace.stats())

    async def _start_chat_engine(self) -> None:
        if self._chat_engine is None:
            # A peer of its own, in client mode: a chain may run through this very node (p2pd cannot dial
            # itself), and chatting goes on while the node is paused. The DHT and the tokenizer start off
            # the loop, which is serving.
            client = await self._chat_client.enter_async_context(
                connect(self.config.initial_peers, self.source, host_maddrs=self.config.host_maddrs))
            self._node.own_clients.add(client.peer.peer_id)  # its tokens are ours, not a contribution
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
            own_tokens_served=node.own_tokens_served,
            offered_memory_bytes=(record.memory_bytes / reference_memory(1.0, node.dtype, node.source, record.quant)
                                  if record else None),
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

    def _give_up_joining(self) -> None:
        if self._node.state == "joining" and self._current is not None:
            self._current.cancel()  # the pause that follows withdraws the joining record

    def _call_soon(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

        self._loop.call_soon_threadsafe(run)
        return future

    def _run_beside(self, coroutine: Coroutine[Any, Any, Any]) -> Future:
        """Runs `coroutine` on the node's loop beside the serialized operations; `stop` cancels it."""
        async def tracked() -> Any:
            task = asyncio.current_task()
            self._beside.add(task)
            try:
                return await coroutine
            finally:
                self._beside.discard(task)

        return asyncio.run_coroutine_threadsafe(tracked(), self._loop)

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
