"""Spot checks of volunteers' outputs: re-run a stage's step on another node and compare.

Nobody in the field checks what volunteers compute (Petals, Parallax, exo trust them; BOINC
recomputes every work unit twice). Here the client audits a random sample of steps instead:

* An audited session is opened with `audit`: each pushing stage also echoes its output to the
  client (`{"echo": position}`), off the critical path. `EchoRecorder` taps the session's event
  queue and keeps every stage's outputs, so the client knows each stage's inputs (the chain's
  inputs for stage 0, the previous stage's outputs after that).
* After a step, with probability `p`, `Auditor` picks one stage of the chain at random, opens a
  one-stage session on another node that holds those layers (a sub-range is fine), replays that
  stage's inputs before the step as a chunked prefill, runs the step, and compares the outputs.
* On a mismatch a third node breaks the tie when there is one. The liar is banned and reported;
  if it is in the chain, `StageFailure(code="failed_verification")` lets `ResilientSession`
  re-route and replay, so the answer continues on honest nodes. With no tie-breaker both peers
  are dropped: the client cannot tell who lied, and the answer's integrity comes first.

The tolerance is measured, not guessed (benchmarks/verification.py): honest-vs-honest relative
error (per token, ‖a − b‖ / ‖b‖, max over tokens) between the original run (prefill, then decode
steps batched with other sessions) and a verifier's replay (one prefill, then the step) on
SmolLM2-135M 10-layer stages on CPU reached 3.3e-6 in fp32, 7.4e-3 in fp16 and 1.9e-2 in bf16.
Nodes may compute in different dtypes, and the client cannot see which, so the tolerance follows
the least precise dtype the caller says the swarm may use (and the wire codec).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field

import torch
from hivemind.proto import runtime_pb2

from node.client.session import ChainSession, StageFailure, SwarmClient
from node.net.protocol import PREFILL_CHUNK_TOKENS, ProtocolError, unpack_metadata
from node.net.wire import decode as wire_decode
from swarm.types import Hop

logger = logging.getLogger(__name__)

# Relative error allowed between two honest runs of a step, by the least precise dtype involved:
# about 30x (fp32), 4x (fp16) and 5x (bf16) the largest honest error measured (see the docstring).
TOLERANCES = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}
ECHO_WAIT_S = 10.0  # an echo leaves a stage before its push reaches the end of the chain; this is slack


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


def relative_error(claimed: torch.Tensor, reference: torch.Tensor) -> float:
    """Max over tokens of ‖claimed − reference‖ / ‖reference‖ (scale-free, so one tolerance fits all layers)."""
    claimed, reference = claimed.float(), reference.float()
    if claimed.shape != reference.shape:
        return float("inf")
    per_token = (claimed - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-12)
    return per_token.max().item()


@dataclass(frozen=True)
class VerificationReport:
    peer: str  # the audited stage's node
    start: int
    end: int
    position: int  # the checked step's first position
    verifier: str | None
    error: float  # relative error between the audited output and the verifier's
    tolerance: float
    verdict: str  # "honest", "liar" (peer lied), "verifier_lied", "unresolved" (both dropped), "unchecked"
    tiebreaker: str | None = None


class EchoRecorder(asyncio.Queue):
    """A ChainSession's event queue that also keeps every stage's step outputs, by stage index.

    Echoes are diverted here (the session has no use for them); answers pass through and are kept too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.outputs: dict[int, dict[int, torch.Tensor]] = {}  # stage index -> position -> [1, tokens, hidden]
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
                with contextlib.suppress(Exception):  # a malformed tensor is the session's to report, not ours
                    self.outputs.setdefault(index, {})[position] = wire_decode(message.tensors[0])
                self._arrived.set()
            if "echo" in metadata:
                return
        super().put_nowait(item)

    async def output(self, index: int, position: int, timeout_s: float = ECHO_WAIT_S) -> torch.Tensor | None:
        async with asyncio.timeout(timeout_s):
            while (found := self.outputs.get(index, {}).get(position)) is None:
                self._arrived.clear()
                await self._arrived.wait()
        return found

    def inputs(self, index: int, end: int) -> torch.Tensor | None:
        """Stage `index + 1`'s inputs for positions [0, end): stage `index`'s outputs, in order."""
        pieces, covered = [], 0
        for position, output in sorted(self.outputs.get(index, {}).items()):
            if position != covered:
                return None  # a gap (or overlap): the record is incomplete
            pieces.append(output)
            covered += output.shape[1]
            if covered >= end:
                return torch.cat(pieces, dim=1)[:, :end]
        return None


def attach_recorder(session: ChainSession) -> EchoRecorder:
    """Swaps the session's event queue for a recorder (before any step: the queue holds nothing yet)."""
    recorder = EchoRecorder()
    while not session.events.empty():
        recorder.put_nowait(session.events.get_nowait())
    session.events = recorder
    for stream in session.streams:
        stream.events = recorder
    return recorder


@dataclass
class Auditor:
    """Spot-checks steps of a ResilientSession's chains; `reports` keeps every check's outcome."""

    client: SwarmClient
    probability: float  # chance that a step is checked (one stage of it, picked at random)
    compute_dtype: torch.dtype = torch.bfloat16  # the least precise dtype any node may compute in
    wire: str = "none"
    step_timeout_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    reports: list[VerificationReport] = field(default_factory=list)
    quants: dict[str, str] = field(default_factory=dict)  # peer -> the quantization its record announces

    @property
    def tolerance(self) -> float:
        """Between two nodes that hold their layers unquantized."""
        return tolerance_for(self.compute_dtype, self.wire)

    def tolerance_between(self, a: str | None, b: str | None) -> float:
        """Between the outputs of peers `a` and `b`, by the quantizations their records announce. A node that
        announces int4 gets int4's slack: the price of letting quantized nodes serve (see QUANT_TOLERANCES)."""
        return tolerance_for(self.compute_dtype, self.wire, tuple(self.quants.get(p, "none") for p in (a, b) if p))

    def sample(self) -> bool:
        """Whether to check the step just run (drawn per step, so a liar cannot tell which steps count)."""
        return self.probability > 0 and self.rng.random() < self.probability

    async def check_step(self, session: ChainSession, recorder: EchoRecorder, chain_inputs: torch.Tensor,
                         position: int) -> VerificationReport:
        """Checks one stage, picked at random, of the step at `position` (`chain_inputs` ends with that step's
        inputs); raises StageFailure(code="failed_verification") if that stage lied."""
        index = self.rng.randrange(len(session.chain))
        return await self.check(session.chain[index], index, recorder, chain_inputs, position)

    async def check(self, hop: Hop, index: int, recorder: EchoRecorder, chain_inputs: torch.Tensor,
                    position: int) -> VerificationReport:
        end = chain_inputs.shape[1]
        try:
            claimed = await recorder.output(index, position)
            if index > 0:  # the previous stage's echo of this step may still be on its way
                await recorder.output(index - 1, position)
        except TimeoutError:
            claimed = None
        inputs = chain_inputs if index == 0 else recorder.inputs(index - 1, end)
        if inputs is None or claimed is None:
            return self._report(hop, position, None, float("nan"), self.tolerance, "unchecked")
        candidates = await self._verifiers(hop)
        reference, verifier = await self._recompute_on_any(candidates, hop, inputs, position)
        if reference is None:
            return self._report(hop, position, None, float("nan"), self.tolerance, "unchecked")
        error, tolerance = relative_error(claimed, reference), self.tolerance_between(hop.node_id, verifier)
        if error <= tolerance:
            return self._report(hop, position, verifier, error, tolerance, "honest")
        # A dispute: a third opinion decides who lied.
        third, tiebreaker = await self._recompute_on_any(candidates, hop, inputs, position)
        claimed_fits = third is not None and \
            relative_error(claimed, third) <= self.tolerance_between(hop.node_id, tiebreaker)
        if third is not None and not claimed_fits and \
                relative_error(reference, third) <= self.tolerance_between(verifier, tiebreaker):
            liars, verdict = [hop.node_id], "liar"
        elif claimed_fits:
            liars, verdict = [verifier], "verifier_lied"
        else:
            liars, verdict = [hop.node_id, verifier], "unresolved"
        for peer in liars:
            self.client.ban(peer, for_s=3600.0)
        report = self._report(hop, position, verifier, error, tolerance, verdict, tiebreaker)
        logger.warning("spot check of %s (layers %d:%d) at position %d: error %.2e > %.2e, %s",
                       hop.node_id, hop.start, hop.end, position, error, tolerance, verdict)
        if hop.node_id in liars:
            raise StageFailure(hop.node_id, f"failed verification at position {position}: relative error "
                               f"{error:.2e} > {tolerance:.1e} ({verdict})", code="failed_verification")
        return report

    async def _verifiers(self, hop: Hop) -> list[str]:
        """Other online, unbanned nodes that hold all of the hop's layers, in random order, those of the hop's
        quantization first (the tightest tolerance); records every node's quantization on the way."""
        banned, records = self.client.banned, await self.client.servers()
        self.quants.update({r.peer_id: r.quant for r in records})
        peers = sorted({r.peer_id for r in records
                        if r.state == "online" and r.start <= hop.start and hop.end <= r.end
                        and r.peer_id != hop.node_id and r.peer_id not in banned})
        self.rng.shuffle(peers)
        mine = self.quants.get(hop.node_id, "none")
        return sorted(peers, key=lambda peer: self.quants.get(peer, "none") != mine)  # stable: random within each

    async def _recompute_on_any(self, candidates: list[str], hop: Hop, inputs: torch.Tensor,
                                position: int) -> tuple[torch.Tensor | None, str | None]:
        """Recomputes on the first candidate that answers (popping those tried); (None, None) if none does."""
        while candidates:
            peer = candidates.pop(0)
            try:
                return await self._recompute(Hop(peer, hop.start, hop.end), inputs, position), peer
            except (StageFailure, TimeoutError) as e:
                logger.info("verifier %s could not recompute: %s", peer, e)
        return None, None

    async def _recompute(self, hop: Hop, inputs: torch.Tensor, position: int) -> torch.Tensor:
        """Runs the step at `position` on `hop` after replaying its inputs before it, in a fresh session."""
        session = await self.client.open_session([hop], max_length=inputs.shape[1], wire=self.wire,
                                                 step_timeout_s=self.step_timeout_s)
        try:
            for offset in range(0, position, PREFILL_CHUNK_TOKENS):
                await session.step(inputs[:, offset:min(position, offset + PREFILL_CHUNK_TOKENS)], offset)
            return await session.step(inputs[:, position:], position)
        finally:
            await session.close()

    def _report(self, hop: Hop, position: int, verifier: str | None, error: float, tolerance: float, verdict: str,
                tiebreaker: str | None = None) -> VerificationReport:
        report = VerificationReport(hop.node_id, hop.start, hop.end, position, verifier, error, tolerance,
                                    verdict, tiebreaker)
        self.reports.append(report)
        return report
