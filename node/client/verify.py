"""Checks of volunteers' work: every step is committed to, a random sample is re-run elsewhere.

The threat model, what each mechanism defeats and what is left are in docs/trust.md; in short:

* Receipts, always (`node.net.protocol`): for every step of every session kind (ring, push, relay), every stage
  tells the client a digest of the input it ran and sends it its output (an echo, or its answer). A session's
  messages are the same whether or not the client will check it, and the client picks what to check after the
  stage has committed, so a stage cannot lie only when unchecked.
* Binding (`Ledger`): what a stage says it received must equal what its sender says it sent (the previous
  stage's echo; what the client fed the first stage, token ids included, in a ring the token the last stage
  announced). A mismatch is an equivocation by one of the two: the session stops at once, and both are avoided
  for a while by this client, banned by no one (the client cannot tell which of the two lied).
* Re-execution (`Auditor`): with probability `p` per step, one stage, picked at random, is re-run on another node
  holding its layers from the inputs the receipts bound (the token ids for a ring's first stage, which embeds),
  and its output compared within the tolerance of the dtypes the two nodes announce. A disagreement goes to a
  third node: a stage is called a liar only when two other nodes agree with each other and not with it. An
  unresolved dispute bans no one.
* Evidence (`node.net.evidence`): receipts are signed with a per-session key each stage's identity endorses; a
  stage outvoted by two others is published as a proof (its signed inputs and output and the two others'), which
  every reader verifies before it drops the liar. A passed check credits the stage's tokens (`node.net.credit`).
* Repair (`node.client.failover`): a caught liar or equivocator ends its chain; the answer is rebuilt on a new
  chain from the last token made before the chain with the liar opened, so the final text is the honest one.

Tolerances are measured, not guessed (benchmarks/verification.py, part 1): honest-vs-honest relative error (per
token, ‖a − b‖ / ‖b‖, max over tokens) between a served run (prefill, then decode steps batched with other
sessions) and a verifier's replay (one prefill, then the step) on SmolLM2-135M 10-layer stages on CPU reached
3.3e-6 in fp32, 7.4e-3 in fp16 and 1.9e-2 in bf16. Two stages are compared at the looser of their two dtypes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field, replace

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hivemind.proto import runtime_pb2

from node.client.replay import POOL_SIZE, Replay, Replays
from node.client.session import ChainSession, StageFailure, SwarmClient
from node.model.sampling import SamplingParams
from node.model.speculative import MAX_DRAFT_TOKENS
from node.net.evidence import (
    EvidenceError,
    Witness,
    build_proof,
    build_token_proof,
    check_receipt,
    check_token,
    equivocation_proof,
    sampling_bytes,
    session_key,
    token_equivocation_proof,
)
from node.net.protocol import (
    ProtocolError,
    digest,
    is_token_receipt,
    token_digest,
    unpack_metadata,
)
from node.net.tolerance import (  # noqa: F401 (re-exported: the checks' tolerances)
    DTYPE_NAMES,
    QUANT_TOLERANCES,
    SAME_QUANT_TOLERANCE,
    TOLERANCES,
    WIRE_TOLERANCES,
    announced_dtype,
    relative_error,
    relative_errors,
    tolerance_for,
)
from node.net.wire import decode as wire_decode
from swarm.types import Hop

logger = logging.getLogger(__name__)

ECHO_WAIT_S = 10.0  # an echo leaves a stage right after its push; this is slack for a loaded machine
DEFAULT_PROBABILITY = 0.3  # a liar on every step of a 2-stage chain is checked within 32 tokens in 99.99% of runs
PROVEN_BAN_S = 24 * 3600.0  # a liar outvoted by two other nodes
SUSPECT_AVOID_S = 60.0  # both ends of an equivocation or an unresolved dispute: avoided, not banned
# The swarm's records, read for a check's verifiers, serve the checks of the next seconds too (about 19 checks of a
# 64-token answer at p = 0.3 would each read the DHT); bans apply at once all the same.
RECORDS_MAX_AGE_S = 2.0
# Codes of a StageFailure that mean the chain's output so far cannot be trusted (the answer is rebuilt).
LIES = {"failed_verification", "equivocation", "equivocated", "disputed"}
# A verifier closing a kept session that sat idle (node.serve.admission): not a failure, it is opened again.
CLOSED_WHEN_IDLE = {"reclaimed", "idle"}


@dataclass(frozen=True)
class VerificationReport:
    peer: str  # the audited stage's node
    start: int
    end: int
    position: int  # the checked step's first position
    verifier: str | None
    error: float  # relative error between the audited output and the verifier's
    tolerance: float
    verdict: str  # "honest", "liar" (peer lied), "verifier_lied", "unresolved" (no one banned), "unchecked"
    tiebreaker: str | None = None
    # The step whose check found it (its first position), when that is not `position`: the disputed step was one the
    # verifier replayed before the checked one.
    found_at: int | None = None


@dataclass(frozen=True)
class Recomputed:
    """A verifier's re-run of a checked step."""

    output: torch.Tensor
    peer: str
    dtype: torch.dtype  # the dtype the verifier announced
    witness: Witness | None  # its signed account of the step (node.net.evidence)
    # A check of a ring's last stage: the token it sampled after the step; after a speculating ring's draft, the
    # tokens it sampled from the draft's first position (node.client.replay.Replay._kept).
    token: int | tuple[int, ...] | None = None
    # Its outputs for the positions it replayed before the step, [since, position): a kept session's catch-up since
    # its last check, or a new session's whole prefix. The check compares them too (`Auditor._replayed_lie`).
    replayed: torch.Tensor | None = None
    since: int = 0


class Ledger(asyncio.Queue):
    """A ChainSession's event queue that also keeps every stage's receipts: its outputs and the digests of its
    inputs, by stage index and position. Echoes are diverted here; answers pass through and are kept too.

    Whenever both sides of a link are known for a step, it compares them: what stage k says it received must be
    what stage k - 1 sent (its echo or answer), or what the client fed it (`fed`). A mismatch puts a
    StageFailure(code="equivocation") on the session's queue, naming the receiver and, as `reporter`, the sender.
    """

    def __init__(self, peers: list[str] | None = None, endorsements: list[object] | None = None,
                 model: str = "") -> None:
        super().__init__()
        self.peers = peers or []
        self.endorsements = endorsements or []  # each stage's session key, endorsed (node.net.evidence)
        self.model = model
        self.proofs: list[dict] = []  # proofs of equivocation found here, for the client to publish
        self.outputs: dict[int, dict[int, torch.Tensor]] = {}  # stage index -> position -> [1, tokens, hidden]
        self.sent: dict[int, dict[int, str]] = {}  # digests of those outputs
        self.received: dict[int, dict[int, str]] = {}  # what each stage says it ran
        self.signed: dict[int, dict[int, dict]] = {}  # each step's signed receipt {"in", "out", "chain", "sig"}
        self.forwarded: dict[int, dict[int, object]] = {}  # the pusher's signed receipt each stage says it ran
        self.credited: dict[int, int] = {}  # stage index -> positions credited as checked work (see Auditor.check)
        self.announced: dict[int, tuple[int, int]] = {}  # a ring: position -> (the token sampled there, by stage)
        self.tokens: dict[int, dict[int, dict]] = {}  # stage index -> position -> its token receipt for the client
        self.sampling: bytes | None = None  # a ring's sampling parameters, as token receipts sign them
        self.fed: dict[int, dict[int, tuple[str, int | None]]] = {}  # what each stage was fed, and by which stage
        # (None: the client; in a ring, the first stage is fed each token the last stage announced)
        self.equivocations: list[tuple[int, int]] = []  # (receiving stage index, position)
        self.drafts: dict[int, list[int]] = {}  # a speculating ring's first stage: position -> the draft it ran after
        self.check_turn: int | None = None  # whose turn it is to be checked (Auditor.pick_stage)
        self.checked_through: dict[int, int] = {}  # a ring: stage index -> the latest step a check was started at
        self.replays = Replays()  # the verifier sessions kept for this session's checks (node.client.replay)
        self._arrived = asyncio.Event()

    def put_nowait(self, item: tuple[int, object]) -> None:
        index, message = item
        if isinstance(message, runtime_pb2.ExpertResponse) and len(message.tensors) == 1:
            try:
                metadata = unpack_metadata(message)
            except ProtocolError:
                metadata = {}
            position = metadata.get("echo", metadata.get("position"))
            if isinstance(position, int) and "error" not in metadata:
                # Signed receipts first: a comparison that the output or input digest below triggers may need them.
                self.signed.setdefault(index, {})[position] = {k: metadata.get(k) for k in ("in", "out", "chain",
                                                                                            "sig")}
                self.forwarded.setdefault(index, {})[position] = metadata.get("prev")
                with contextlib.suppress(Exception):  # a malformed tensor is the session's to report, not ours
                    output = wire_decode(message.tensors[0])
                    self.outputs.setdefault(index, {})[position] = output
                    self._note(self.sent, index, position, digest(output))
                if isinstance(metadata.get("in"), str):
                    self._note(self.received, index, position, metadata["in"])
                if index == 0 and _is_draft(metadata.get("draft")):
                    self.drafts[position] = metadata["draft"]
                self._arrived.set()
            if "echo" in metadata:
                return
        elif isinstance(message, runtime_pb2.ExpertResponse) and not message.tensors:
            self._note_token(index, message)
        super().put_nowait(item)

    def _note_token(self, index: int, message: runtime_pb2.ExpertResponse) -> None:
        """Keeps a ring's sampled token with its signature (node.net.evidence), for a proof if it was a lie."""
        try:
            metadata = unpack_metadata(message)
        except ProtocolError:
            return
        position, receipt = metadata.get("position"), metadata.get("receipt")
        if isinstance(position, int) and is_token_receipt(receipt) and receipt["token"] == metadata.get("token"):
            self.tokens.setdefault(index, {})[position] = receipt

    def feed(self, index: int, position: int, input_digest: str, sender: int | None = None) -> None:
        """Stage `index` was fed a step at `position` whose digest is `input_digest`, by the client (`sender`
        None) or by stage `sender` (a ring's last stage, which announced the token to the client)."""
        self._note(self.fed, index, position, (input_digest, sender))

    def feed_tokens(self, position: int, token_ids: list[int], sender: int | None = None) -> None:
        if sender is not None and len(token_ids) == 1:  # a ring's token, as stage `sender` announced it
            self.announced[position] = (token_ids[0], sender)
        self.feed(0, position, token_digest(token_ids), sender)

    def _note(self, table: dict, index: int, position: int, value: object) -> None:
        table.setdefault(index, {})[position] = value
        self._compare(index, position)
        if table is self.sent:
            self._compare(index + 1, position)

    def _compare(self, index: int, position: int) -> None:
        received = self.received.get(index, {}).get(position)
        expected, sender = self.fed.get(index, {}).get(position, (None, None))
        if expected is None and index > 0:
            expected, sender = self.sent.get(index - 1, {}).get(position), index - 1
        if received is None or expected is None or received == expected or (index, position) in self.equivocations:
            return
        self.equivocations.append((index, position))
        receiver = self._peer(index)
        blamed = receiver if sender is None else self._peer(sender)  # the client trusts itself
        logger.warning("equivocation at position %d: %s says it received other than %s sent", position, receiver,
                       blamed)
        culprit = (self._culprit(index, position, sender) if sender == index - 1
                   else self._token_culprit(position, sender) if index == 0 and sender not in (None, 0) else None)
        if culprit is not None:  # the signatures say who: it is banned, the other is not touched
            failure = StageFailure(culprit, f"at position {position} it signed other than it sent or received",
                                   code="equivocated")
        else:
            failure = StageFailure(receiver, f"at position {position} it says it received other than {blamed} sent",
                                   code="equivocation", reporter=blamed)
        super().put_nowait((index, failure))

    def _culprit(self, index: int, position: int, sender: int) -> str | None:
        """Which end of the link from stage `sender` to stage `index` lied at `position`, by their signatures:
        an honest receiver runs only a push its sender signed for, and names that receipt in its own, so a receiver
        without a valid one lied; a sender whose receipt to this client is unsigned, or names another output than it
        signed for pushing at the same step, lied (a proof of that is kept in `proofs`). None: cannot tell."""
        key, rows = self._session_key(sender), self.outputs.get(sender, {}).get(position)
        if key is None or rows is None:
            return None
        pushed, told = self.forwarded.get(index, {}).get(position), self.signed.get(sender, {}).get(position)
        try:
            check_receipt(key, position, rows.shape[1], pushed, self.received[index][position])
        except EvidenceError:
            return self._peer(index)
        try:
            check_receipt(key, position, rows.shape[1], told, self.sent[sender][position])
        except EvidenceError:
            return self._peer(sender)
        if (pushed["in"], pushed["chain"]) != (told["in"], told["chain"]):
            return None  # two different steps at one position (a rewind?): not the same statement twice
        self.proofs.append(equivocation_proof(self.model, self._peer(sender), self.endorsements[sender], position,
                                              rows.shape[1], [pushed, told]))
        return self._peer(sender)

    def _token_culprit(self, position: int, sender: int) -> str | None:
        """Which end of a ring's token feed lied at `position`, by their signatures, when the first stage says it ran
        another token than the last stage (`sender`) announced: an honest first stage runs only a token its sender
        signed, and names that receipt in its own, so a first stage without a valid one lied; a last stage whose
        announced token is unsigned lied to the client; a last stage that signed two tokens for one output (one
        fed, one announced) equivocated, and the two receipts are a proof kept in `proofs`. None: cannot tell."""
        key = self._session_key(sender)
        if key is None or self.sampling is None:
            return None
        fed, told = self.forwarded.get(0, {}).get(position), self.tokens.get(sender, {}).get(position)
        try:
            check_token(key, position, fed, self.sampling)
            if token_digest([fed["token"]]) != self.received[0][position]:
                raise EvidenceError("the first stage names another token than it ran")
        except EvidenceError:
            return self._peer(0)
        try:
            check_token(key, position, told, self.sampling)
        except EvidenceError:
            return self._peer(sender)
        if (fed["out"], fed["chain"]) != (told["out"], told["chain"]) or fed["token"] == told["token"]:
            return None
        self.proofs.append(token_equivocation_proof(self.model, self._peer(sender), self.endorsements[sender],
                                                    position, self.sampling, [fed, told]))
        return self._peer(sender)

    def _session_key(self, index: int) -> Ed25519PublicKey | None:
        endorsement = self.endorsements[index] if 0 <= index < len(self.endorsements) else None
        try:
            session = endorsement["session"] if isinstance(endorsement, dict) else None
            return session_key(endorsement, peer=self._peer(index), session=session, client=None)
        except (EvidenceError, KeyError, TypeError):
            return None

    def _peer(self, index: int) -> str:
        return self.peers[index] if 0 <= index < len(self.peers) else "?"

    async def output(self, index: int, position: int, timeout_s: float = ECHO_WAIT_S) -> torch.Tensor | None:
        async with asyncio.timeout(timeout_s):
            while (found := self.outputs.get(index, {}).get(position)) is None:
                self._arrived.clear()
                await self._arrived.wait()
        return found

    def witness(self, index: int, position: int, endorsement: object) -> Witness | None:
        """Stage `index`'s signed account of its step at `position` (node.net.evidence), if it sent one."""
        outputs = self.outputs.get(index, {})
        if position not in outputs or not isinstance(endorsement, dict):
            return None
        steps = [(p, output.shape[1]) for p, output in sorted(outputs.items()) if p <= position]
        token = self.tokens.get(index, {}).get(position + outputs[position].shape[1])  # sampled right after it
        return Witness(endorsement, steps, self.signed.get(index, {}).get(position, {}), outputs[position], token)

    def step_inputs(self, index: int, position: int) -> torch.Tensor | None:
        """What stage `index` (> 0) ran through its step at `position`: the inputs before it as they stand, then the
        previous stage's output of that very step. Not `inputs(index - 1, end)`: in a speculating ring the rows of a
        draft the last stage rejected are replaced by the next step's, which may have come in since."""
        before, step = self.inputs(index - 1, position), self.outputs.get(index - 1, {}).get(position)
        if step is None or (before is None and position > 0):
            return None
        return step if before is None else torch.cat([before, step], dim=1)

    def inputs(self, index: int, end: int) -> torch.Tensor | None:
        """Stage `index + 1`'s inputs for positions [0, end): stage `index`'s outputs, in order. A step that starts
        before the previous one's rows end replaces them from there (a speculating ring's rejected draft: the
        stages dropped those rows from their caches too)."""
        rows: torch.Tensor | None = None
        for position, output in sorted(self.outputs.get(index, {}).items()):
            if position >= end:
                break
            if position > (0 if rows is None else rows.shape[1]):
                return None  # a gap: the record is incomplete
            rows = output if rows is None else torch.cat([rows[:, :position], output], dim=1)
        return rows[:, :end] if rows is not None and rows.shape[1] >= end else None


def _is_draft(draft: object) -> bool:
    return (isinstance(draft, list) and 0 < len(draft) <= MAX_DRAFT_TOKENS
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in draft))


def attach_ledger(session: ChainSession, model: str = "") -> Ledger:
    """Swaps the session's event queue for a ledger (before any step: the queue holds nothing yet); `model` names
    the proofs it makes."""
    ledger = Ledger([hop.node_id for hop in session.chain],
                    [stream.opened.get("endorsement") for stream in session.streams], model)
    while not session.events.empty():
        ledger.put_nowait(session.events.get_nowait())
    session.events = ledger
    session.ledger = ledger
    if session.sampling is not None:
        params = session.sampling
        ledger.sampling = sampling_bytes(params.temperature, params.top_p, params.seed)
    for stream in session.streams:
        stream.events = ledger
    return ledger


@dataclass
class Auditor:
    """Re-runs a random sample of a session's steps on other nodes; `reports` keeps every check's outcome."""

    client: SwarmClient
    probability: float = DEFAULT_PROBABILITY  # chance that a step is checked (one stage of it: see pick_stage)
    wire: str = "none"
    step_timeout_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    reports: list[VerificationReport] = field(default_factory=list)
    quants: dict[str, str] = field(default_factory=dict)  # peer -> the quantization its record announces
    published: list[dict] = field(default_factory=list)  # proofs of lies this auditor published
    positions_run: int = 0  # positions its checks sent to verifiers, replays included (what verifying cost them)
    # Positions compared with the stage's echoes: the checked steps' and those the verifiers replayed before them.
    positions_compared: int = 0
    rows_returned: int = 0  # rows of outputs the verifiers sent back (the replayed rows' included)
    # (read at, the swarm's records) for the checks' verifiers: see RECORDS_MAX_AGE_S
    _records: tuple[float, list] = field(default=(float("-inf"), []), init=False, repr=False)

    def tolerance_between(self, *nodes: tuple[str | None, torch.dtype]) -> float:
        """Between the outputs of `nodes` (peer, the dtype it announced): the looser of their dtypes', and the
        slack of the quantizations their records announce. A node that announces int4 gets int4's slack: the price
        of letting quantized nodes serve (see QUANT_TOLERANCES)."""
        quants = tuple(self.quants.get(peer, "none") for peer, _ in nodes if peer)
        return max(tolerance_for(dtype, self.wire, quants) for _, dtype in nodes)

    def sample(self) -> bool:
        """Whether to check the step just run (drawn after the stages committed to it, so none can tell)."""
        return self.probability > 0 and self.rng.random() < self.probability

    def pick_stage(self, session: ChainSession) -> int:
        """The stage a sampled step checks: the chain's stages in turn, from a random one, so each of n stages is
        checked once every n sampled steps. Picked at random each time, a stage goes unchecked over long runs by
        chance: a liar at one stage of two, p = 0.3, went unchecked through a 32-token answer in 0.85^32 = 0.55% of
        answers (2 of 50 in benchmarks/verification.py), in turn in 0.7^32 + 32 x 0.3 x 0.7^31 / 2 = 0.009%. A stage
        cannot see the turn: the checks run on other nodes, after it has sent its step."""
        ledger, stages = session.ledger, len(session.chain)
        if ledger is None:  # a session without receipts cannot be checked anyway
            return self.rng.randrange(stages)
        if ledger.check_turn is None:
            ledger.check_turn = self.rng.randrange(stages)
        index, ledger.check_turn = ledger.check_turn % stages, ledger.check_turn + 1
        return index

    async def check(self, session: ChainSession, index: int, position: int, *, chain_inputs: torch.Tensor | None = None,
                    token_ids: list[int] | None = None) -> VerificationReport:
        """Checks stage `index`'s step at `position`: its inputs are the client's (`chain_inputs`, ending with the
        step's, or a ring's `token_ids` through the step) for the first stage, else the previous stage's echoes.
        Raises StageFailure(code="failed_verification") if it lied, ("disputed") if no one can tell."""
        replays = session.ledger.replays
        previous, mine = replays.turn(index)  # now, before any await: in the order checks began
        try:
            async with replays.running():
                return await self._check(session, index, position, (previous, mine), chain_inputs=chain_inputs,
                                         token_ids=token_ids)
        finally:
            if not mine.done():
                mine.set_result(None)

    async def _check(self, session: ChainSession, index: int, position: int,
                     turn: tuple[asyncio.Future | None, asyncio.Future], *, chain_inputs: torch.Tensor | None,
                     token_ids: list[int] | None) -> VerificationReport:
        ledger, hop = session.ledger, session.chain[index]
        previous, mine = turn
        try:
            claimed = await ledger.output(index, position)
            if index > 0:  # the previous stage's echo of this step may still be on its way
                await ledger.output(index - 1, position)
        except TimeoutError:
            claimed = None
        end = position + (claimed.shape[1] if claimed is not None else 0)
        if index == 0 and token_ids is not None and position in ledger.drafts:  # a speculating ring's first stage
            draft = ledger.drafts[position]  # it ran the tokens it was fed, then its draft
            token_ids = [*token_ids[:end - len(draft)], *draft]
        inputs = ((chain_inputs if token_ids is None else token_ids) if index == 0
                  else ledger.step_inputs(index, position))
        if inputs is None or claimed is None:
            return self._report(hop, position, None, float("nan"), "unchecked", float("nan"))
        stage_dtype = announced_dtype(session.streams[index].opened.get("dtype"))
        candidates = await self._verifiers(hop)  # (which also learns every node's quantization)
        sampled, announcer = self._sampled_token(session, index, position, end)
        if not self._exact(hop.node_id, stage_dtype):
            sampled = None  # its token is not compared (see `_exact`)
        sampling = session.sampling if sampled is not None else None
        if previous is not None:  # the stage's kept sessions are this check's once the checks before it are done
            await asyncio.wait({previous})
        pool = None if ledger.replays.closed else ledger.replays.pool(index, sampling is not None)
        if pool is not None:
            await ledger.replays.prune(pool, candidates)
            candidates = self._kept_first(candidates, pool, stage_dtype)
        rerun = {"pool": pool, "max_length": session.max_length, "want": stage_dtype, "sampling": sampling,
                 "draft": self._draft(ledger, position, sampling)}
        # The first re-run is signed for no proof (most checks pass: it runs with its catch-up, in one forward);
        # the tie-breaker's is, and the first verifier's is re-run as a witness if the stage is outvoted.
        first = await self._recompute_on_any(candidates, hop, inputs, position, end, witnessed=False, **rerun)
        if first is None:
            return self._report(hop, position, None, float("nan"), "unchecked", float("nan"))
        if isinstance(sampled, tuple):  # a speculating step's tokens: re-read, all announced by now (they come at once)
            sampled, announcer = self._sampled_token(session, index, position, end)
            first = self._cut_at_answer_end(first, sampled, end - len(rerun["draft"]), ledger.announced)
        tolerance = self.tolerance_between((hop.node_id, stage_dtype), (first.peer, first.dtype))
        found_at, provable = None, True
        if (lie := self._replayed_lie(ledger, index, first, position, tolerance)) is not None:
            # An earlier step disagrees: that step is disputed, evidence and all, as if it had been the one sampled.
            found_at, (position, end, provable) = position, lie
            claimed = ledger.inputs(index, end)[:, position:]
            first = Recomputed(first.replayed[:, position - first.since:end - first.since], first.peer, first.dtype,
                               None)
            sampled, announcer, rerun["draft"] = None, None, ()  # (outputs disagree: tokens are not compared)
            logger.warning("check of %s (layers %d:%d) at position %d: its replayed step at position %d disagrees",
                           hop.node_id, hop.start, hop.end, found_at, position)
        error = relative_error(claimed, first.output)
        if error <= tolerance and self._token(first) in (None, sampled):
            self.positions_compared += end - position
            self._credit(ledger, index, hop.node_id, end)
            return self._report(hop, position, first.peer, error, "honest", tolerance)
        if any(at == index and p < end for at, p in ledger.equivocations):
            # What the stage received is itself in dispute: its sender signed one thing to it and told this client
            # another (a ring's token forker, an equivocator). The client's view of its inputs is then no evidence
            # against it; the equivocation's own path settles who lied, by their signatures (`Ledger._compare`).
            return self._report(hop, position, first.peer, error, "unchecked", tolerance)
        # A dispute: a third node decides; no one is called a liar unless two others agree against it.
        second = await self._recompute_on_any(candidates, hop, inputs, position, end, **rerun)
        if second is not None:
            second = self._cut_at_answer_end(second, sampled, end - len(rerun["draft"]), ledger.announced)
        # One tolerance for the three comparisons: the loosest of the three nodes' dtypes and quantizations.
        tolerance = self.tolerance_between((hop.node_id, stage_dtype), (first.peer, first.dtype),
                                           *(((second.peer, second.dtype),) if second else ()))

        def agree(output: torch.Tensor, token: int | None, other: Recomputed) -> bool:
            """Outputs within the tolerance, and the same token where both are compared."""
            other_token = self._token(other)
            same_token = token is None or other_token is None or token == other_token
            return relative_error(output, other.output) <= tolerance and same_token

        outvoted = second is not None and agree(first.output, self._token(first), second) and not agree(
            claimed, sampled, second)
        if outvoted and announcer not in (None, index) and relative_error(claimed, second.output) <= tolerance:
            # Its output is right but the token is not, and the first stage sampled it from the LM head the two
            # shared: either may have lied (its part of the logits, or the merge). Both are avoided, neither banned.
            verdict = "unresolved"
            for peer in (hop.node_id, session.chain[announcer].node_id):
                self.client.ban(peer, for_s=SUSPECT_AVOID_S)
        elif outvoted:
            verdict = "liar"
            self.client.ban(hop.node_id, for_s=PROVEN_BAN_S)
            accused = ledger.witness(index, position, session.streams[index].opened.get("endorsement"))
            # One proof is enough; a step a speculating ring's rejected draft partly replaced makes none (the stage
            # signed inputs that are no longer the session's).
            if provable and not any(proof["accused"] == hop.node_id for proof in self.published):
                first = await self._witnessed(first, hop, inputs, position, end, sampling)
                if not mine.done():  # done with the kept sessions: the next check need not wait for the DHT
                    mine.set_result(None)
                token_lie = relative_error(claimed, second.output) <= tolerance  # right output, wrong token
                if token_lie and isinstance(sampled, tuple):  # (a token proof signs one token after one step)
                    logger.warning("no proof of %s's tokens of a speculating step: its ban is this client's",
                                   hop.node_id)
                else:
                    await self._publish(hop, inputs, [accused, first.witness, second.witness],
                                        sampling=session.sampling if token_lie else None)
        elif second is not None and agree(claimed, sampled, second) and not agree(
                first.output, self._token(first), second):
            verdict = "verifier_lied"
            self.client.ban(first.peer, for_s=PROVEN_BAN_S)
        else:
            verdict = "unresolved"
            for peer in (hop.node_id, first.peer):
                self.client.ban(peer, for_s=SUSPECT_AVOID_S)
        report = self._report(hop, position, first.peer, error, verdict, tolerance, second and second.peer, found_at)
        checked = self._token(first)
        tokens = f", sampled {sampled} where the check sampled {checked}" if checked not in (None, sampled) else ""
        logger.warning("check of %s (layers %d:%d) at position %d: error %.2e (tolerance %.2e)%s: %s", hop.node_id,
                       hop.start, hop.end, position, error, tolerance, tokens, verdict)
        if verdict != "verifier_lied":
            raise StageFailure(hop.node_id, f"failed verification at position {position}: relative error "
                               f"{error:.2e} (tolerance {tolerance:.1e}){tokens} ({verdict})",
                               code="failed_verification" if verdict == "liar" else "disputed")
        return report

    def _exact(self, peer: str, dtype: torch.dtype) -> bool:
        """Whether a node's sampled token is compared with another's: only between fp32 nodes of unquantized layers.
        A check samples from its own re-run of the step, whose hidden state differs from the served one by the
        dtypes' noise; in fp32 (3e-6) that flips a token only at a near-exact tie of two logits, but bf16 chains
        were measured to pick another greedy token now and then, which would convict an honest node."""
        return dtype == torch.float32 and self.quants.get(peer, "none") == "none"

    def _token(self, found: Recomputed) -> int | None:
        """A verifier's sampled token, where it counts (`_exact`)."""
        return found.token if found.token is not None and self._exact(found.peer, found.dtype) else None

    @staticmethod
    def _sampled_token(session: ChainSession, index: int, position: int, end: int
                       ) -> tuple[int | tuple[int, ...] | None, int | None]:
        """At a ring's last stage (`index`): the token sampled after its step [position, end), which its check
        re-derives, and the stage that announced it (itself, or the first stage when they shared the LM head); after
        a speculating ring's step that ran a draft, the tokens sampled for the draft's positions and after
        (`_kept_run`). (None, None) when there is none to check: not a ring's last stage, or sampling with no seed
        (each draw is fresh: no one can re-derive it)."""
        params, ledger = session.sampling, session.ledger
        if params is None or index == 0 or index != len(session.chain) - 1 or (
                params.temperature > 0 and params.seed is None):
            return None, None  # (a one-stage ring embeds: its check takes token ids and samples nothing)
        draft = ledger.drafts.get(position)
        if draft and len(draft) < end - position:
            return Auditor._kept_run(ledger.announced, end - len(draft), draft)
        return ledger.announced.get(end, (None, None))

    @staticmethod
    def _kept_run(announced: dict[int, tuple[int, int]], at: int, draft: list[int]
                  ) -> tuple[tuple[int, ...] | None, int | None]:
        """The tokens announced from position `at` on for a step that ran `draft` there: each kept draft token, then
        the stage's own one (node.model.speculative.verify_draft): (those tokens, who announced them), or (None,
        None) if none was announced."""
        tokens: list[int] = []
        announcer = None
        while (found := announced.get(at + len(tokens))) is not None:
            token, announcer = found
            tokens.append(token)
            if len(tokens) > len(draft) or token != draft[len(tokens) - 1]:
                break
        return (tuple(tokens), announcer) if tokens else (None, None)

    @staticmethod
    def _draft(ledger: Ledger, position: int, sampling: SamplingParams | None) -> tuple[int, ...]:
        """The draft a speculating ring's step at `position` ran, for a check that samples after it."""
        return tuple(ledger.drafts.get(position, ())) if sampling is not None else ()

    @staticmethod
    def _cut_at_answer_end(found: Recomputed, sampled: object, at: int, announced: dict[int, tuple[int, int]]
                           ) -> Recomputed:
        """`found`, its tokens for a speculating step cut to the stage's run `sampled` (from position `at`) where the
        answer ended with that run: the ring stops at its max_new_tokens, which a check's session does not count
        (`_open_replay`). Only a shorter run that agrees and after which nothing was announced: a stage that wrongly
        rejected a draft token announced another token there than the check's."""
        tokens = found.token
        if not (isinstance(tokens, tuple) and isinstance(sampled, tuple) and len(sampled) < len(tokens)
                and tokens[:len(sampled)] == sampled):
            return found
        if any(q >= at + len(sampled) for q in announced):
            return found
        return replace(found, token=sampled)

    def _replayed_lie(self, ledger: Ledger, index: int, found: Recomputed, position: int, tolerance: float
                      ) -> tuple[int, int, bool] | None:
        """The earliest of stage `index`'s steps before `position` whose echoed output disagrees, beyond
        `tolerance`, with the rows `found`'s verifier replayed before the checked step: (its position, the end of
        its rows that still stand, whether they all do), or None. A check thereby covers every position its verifier
        computed, not only the sampled step: all of them up to the step, as a kept session replays what it has not
        run yet and a new one the whole prefix."""
        if found.replayed is None or not found.replayed.shape[1]:
            return None
        claimed = ledger.inputs(index, position)  # the stage's outputs as they stand (replaced drafts replaced)
        if (claimed is None or claimed.shape[1] != position
                or claimed[:, found.since:].shape != found.replayed.shape):  # a verifier's rows are a peer's input:
            return None  # a wrong count would broadcast (one row against all); the step's own comparison flags it
        self.positions_compared += position - found.since
        bad = (relative_errors(claimed[:, found.since:], found.replayed) > tolerance).nonzero()
        if not len(bad):
            return None
        row, steps = found.since + int(bad[0]), ledger.outputs[index]
        start = max(p for p in steps if p <= row)  # the step whose output stands at `row` (see Ledger.inputs)
        stop = min([start + steps[start].shape[1], *(p for p in steps if p > start), position])
        return start, stop, stop == start + steps[start].shape[1]

    def _credit(self, ledger: Ledger, index: int, peer: str, end: int) -> None:
        """A check passed at a stage: the tokens it ran in this session through the checked step, not credited yet,
        count as its checked work (node.net.credit). Each was compared: the check's verifier replayed every position
        since its own last check of the stage (`_replayed_lie`), and checked the positions before then."""
        gained = end - ledger.credited.get(index, 0)
        if gained > 0:
            ledger.credited[index] = end
            self.client.checked_credit[peer] = self.client.checked_credit.get(peer, 0) + gained

    async def _publish(self, hop: Hop, inputs: torch.Tensor | list[int], witnesses: list[Witness | None], *,
                       sampling: SamplingParams | None = None) -> None:
        """Publishes the proof that `hop` lied (node.net.evidence), so that other clients and the planners drop it
        without catching it themselves: about its output, or with `sampling` about the token it sampled (the three
        witnesses' signed tokens). A lie whose proof would not check out (too long to carry, unsigned) stays this
        client's to know."""
        if any(w is None for w in witnesses):
            logger.info("no proof to publish against %s: a witness did not sign its step", hop.node_id)
            return
        end = witnesses[0].steps[-1][0] + witnesses[0].steps[-1][1]
        inputs = inputs[:end] if isinstance(inputs, list) else inputs[:, :end]
        if sampling is None:
            proof = build_proof(self.client.model, hop.node_id, hop.start, hop.end, inputs, witnesses)
        else:
            proof = build_token_proof(self.client.model, hop.node_id, hop.start, hop.end, inputs, witnesses, {
                "temperature": float(sampling.temperature), "top_p": float(sampling.top_p), "seed": sampling.seed})
        try:
            async with asyncio.timeout(self.step_timeout_s):
                stored = await self.client.peer.proof_book(self.client.model).publish(proof)
            self.published.append(proof)
            logger.warning("published the proof that %s lied (stored: %s)", hop.node_id, stored)
        except (EvidenceError, TimeoutError) as e:
            logger.warning("could not publish a proof that %s lied: %s", hop.node_id, e)

    async def _verifiers(self, hop: Hop) -> list[str]:
        """Other online, unbanned nodes that hold all of the hop's layers, in random order, those of the hop's
        quantization first (the tightest tolerance); records every node's quantization on the way."""
        read_at, records = self._records
        if time.monotonic() - read_at > RECORDS_MAX_AGE_S:
            records = await self.client.servers()
            self._records = (time.monotonic(), records)
        banned = self.client.banned
        self.quants.update({r.peer_id: r.quant for r in records})
        peers = sorted({r.peer_id for r in records
                        if r.state == "online" and r.start <= hop.start and hop.end <= r.end
                        and r.peer_id != hop.node_id and r.peer_id not in banned})
        self.rng.shuffle(peers)
        mine = self.quants.get(hop.node_id, "none")
        return sorted(peers, key=lambda peer: self.quants.get(peer, "none") != mine)  # stable: random within each

    @staticmethod
    def _kept_first(candidates: list[str], pool: dict[str, Replay], want: torch.dtype) -> list[str]:
        """The order to try verifiers in: `candidates` as drawn (at random), unless the pool of kept sessions is
        full: then its verifiers first, in that random order, those computing at least as precisely as `want`."""
        kept = [peer for peer in candidates if peer in pool and TOLERANCES[pool[peer].dtype] <= TOLERANCES[want]]
        if len(pool) < POOL_SIZE or not kept:
            return candidates
        return [*kept, *(peer for peer in candidates if peer not in kept)]

    async def release(self, session: ChainSession) -> None:
        """Closes the verifier sessions kept for `session`'s checks, once those running end: call it when the
        session ends."""
        if session.ledger is not None:
            await session.ledger.replays.close()

    async def _recompute_on_any(self, candidates: list[str], hop: Hop, inputs: torch.Tensor | list[int],
                                position: int, end: int, *, want: torch.dtype, sampling: SamplingParams | None = None,
                                pool: dict[str, Replay] | None = None, max_length: int | None = None,
                                witnessed: bool = True, draft: tuple[int, ...] = ()) -> Recomputed | None:
        """Recomputes on the first candidate that answers (popping those tried), preferring one that computes at
        least as precisely as `want` (a looser dtype loosens the check); None if none answers. With `sampling`
        (a ring's last stage), the candidate also samples the token after the step (the tokens, after a `draft`).
        `pool`: the verifier sessions kept for these checks (see `_recompute`)."""
        looser: list[str] = []
        while candidates or looser:
            precise = bool(candidates)
            peer = (candidates or looser).pop(0)
            try:
                found = await self._recompute(Hop(peer, hop.start, hop.end), inputs, position, end,
                                              at_most=TOLERANCES[want] if precise else None, sampling=sampling,
                                              pool=pool, max_length=max_length, witnessed=witnessed, draft=draft)
                if found is not None:
                    return found
                looser.append(peer)
            except (StageFailure, TimeoutError) as e:
                logger.info("verifier %s could not recompute: %s", peer, e)
        return None

    async def _recompute(self, hop: Hop, inputs: torch.Tensor | list[int], position: int, end: int, *,
                         at_most: float | None = None, sampling: SamplingParams | None = None,
                         pool: dict[str, Replay] | None = None, max_length: int | None = None,
                         witnessed: bool = True, draft: tuple[int, ...] = ()) -> Recomputed | None:
        """Runs the step [position, end) on `hop` after the inputs before it, with the verifier's signed account of
        the step (a witness for a proof); given token ids, the verifier embeds them as the checked first stage did;
        with `sampling` (a ring's last stage: hidden states in) also the token it samples after the step, or for
        a speculating ring's step that ran a `draft`, the tokens it keeps of the draft and its own after them. None,
        without running anything, if the node announces a dtype whose tolerance exceeds `at_most`.

        In the verifier's session kept in `pool` (node.client.replay), if it has one that ran a prefix of these
        inputs and not past `position`: it replays only the inputs since. Else in a new one-stage session, opened
        for `max_length` tokens and kept in the pool if it has room, else opened for `end` and closed after."""
        kept = pool.get(hop.node_id) if pool is not None else None
        if kept is not None:
            if at_most is not None and TOLERANCES[kept.dtype] > at_most:
                return None
            async with kept.lock:
                if kept.closed or not kept.follows(inputs):  # (inputs replaced since: it cannot rewind)
                    await Replays.drop(pool, kept)
                elif not kept.ahead_of(position):
                    try:
                        return await self._rerun(kept, inputs, position, end, sampling, witnessed, draft)
                    except StageFailure as e:
                        await Replays.drop(pool, kept)
                        if e.code not in CLOSED_WHEN_IDLE:
                            raise
                    except BaseException:
                        await Replays.drop(pool, kept)
                        raise
        # (else ahead of this check, one that ran out of order: this one runs in a session of its own)
        keep = pool is not None and hop.node_id not in pool and len(pool) < POOL_SIZE
        replay = await self._open_replay(hop, inputs, max_length if keep and max_length else end, end, sampling)
        keep = keep and replay.session.max_length > end and hop.node_id not in pool and len(pool) < POOL_SIZE
        if keep:
            pool[hop.node_id] = replay
        try:
            if at_most is not None and TOLERANCES[replay.dtype] > at_most:
                await Replays.drop(pool, replay)
                return None
            async with replay.lock:
                return await self._rerun(replay, inputs, position, end, sampling, witnessed, draft)
        except BaseException:
            await Replays.drop(pool, replay)
            raise
        finally:
            if not keep:
                await replay.close()

    async def _witnessed(self, found: Recomputed, hop: Hop, inputs: torch.Tensor | list[int], position: int,
                         end: int, sampling: SamplingParams | None) -> Recomputed:
        """`found`, or if it has no witness (a merged re-run), the same verifier's re-run of the step as a step of
        its own in a fresh session, whose signed account can go in a proof. Unchanged if that fails."""
        if found.witness is not None:
            return found
        try:
            again = await self._recompute(Hop(found.peer, hop.start, hop.end), inputs, position, end, sampling=sampling)
        except (StageFailure, TimeoutError) as e:
            logger.info("verifier %s could not re-run the step as a witness: %s", found.peer, e)
            return found
        return again or found

    async def _open_replay(self, hop: Hop, inputs: torch.Tensor | list[int], max_length: int, end: int,
                           sampling: SamplingParams | None) -> Replay:
        """A one-stage session on `hop` for re-running checks; if the verifier has no room for `max_length`
        tokens, one for `end`, which ends with this check. A check of sampling may re-run a speculating ring's
        drafts, and samples at most one token a position (no count of them ends it early: `Replay._kept`)."""
        embed = isinstance(inputs, list)
        speculate = MAX_DRAFT_TOKENS if sampling is not None else 0
        if sampling is not None:
            sampling = replace(sampling, max_new_tokens=max_length + 1)
        try:
            session = await self.client.open_session([hop], max_length=max_length, wire=self.wire, embed=embed,
                                                     sampling=sampling, step_timeout_s=self.step_timeout_s,
                                                     speculate=speculate)
        except StageFailure as e:
            if e.code != "no_capacity" or max_length <= end:
                raise
            session = await self.client.open_session([hop], max_length=end, wire=self.wire, embed=embed,
                                                     sampling=sampling, step_timeout_s=self.step_timeout_s,
                                                     speculate=speculate)
        return Replay(session, attach_ledger(session), announced_dtype(session.streams[0].opened.get("dtype")))

    async def _rerun(self, replay: Replay, inputs: torch.Tensor | list[int], position: int, end: int,
                     sampling: SamplingParams | None, witnessed: bool, draft: tuple[int, ...] = ()) -> Recomputed:
        """The step [position, end) re-run on `replay`, which catches up from where it was: with `witnessed`, as
        a step of its own, which the verifier signs (a witness for a proof); else in one forward with the catch-up
        (no witness: see `_check`)."""
        since = replay.length
        self.positions_run += end - since
        merged = not witnessed and since < position
        rows, token = await replay.run(inputs, position, end, sample=sampling is not None, merged=merged,
                                       draft=draft if sampling is not None else ())
        self.rows_returned += rows.shape[1]
        endorsement = replay.session.streams[0].opened.get("endorsement")
        witness = None if merged else replay.ledger.witness(0, position, endorsement)
        return Recomputed(rows[:, position - since:], replay.peer, replay.dtype, witness, token,
                          replayed=rows[:, :position - since], since=since)

    def _report(self, hop: Hop, position: int, verifier: str | None, error: float, verdict: str, tolerance: float,
                tiebreaker: str | None = None, found_at: int | None = None) -> VerificationReport:
        report = VerificationReport(hop.node_id, hop.start, hop.end, position, verifier, error, tolerance, verdict,
                                    tiebreaker, found_at)
        self.reports.append(report)
        return report
