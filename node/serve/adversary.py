"""TESTING AID, the one place a node lies: the hostile behaviours the trust tests and benchmark run against.

Reached only through the hidden `layerhive node --test-perturb SCALE [--test-adversary KIND]` options (tests and
benchmarks/verification.py); an honest node has no `Adversary`. Each kind is one attack of docs/trust.md:
- "liar": adds Gaussian noise of SCALE x the output's RMS to every output it sends (pushed, answered, echoed and
  sampled from alike, as a consistent cheat would).
- "equivocator": pushes (or answers) the noisy output but echoes the honest one to the client.
- "rare": lies as "liar" on about one step in 50, at random.
- "once": lies as "liar" on the ONCE_AT_STEP-th step of each session only (a rare liar whose lie tests can place).
- "late": lies as "liar" from the LATE_FROM_STEP-th step of each session on (honest before: its first checks pass).
- "sly": lies as "liar" only in sessions opened without the `audit` flag (which no client sets any more).
- "blamer": answers its third step with an error whose `peer` names its neighbour, to get that one banned.
- "missampler": a ring's last stage that computes honestly but samples another token than (seed, position) and the
  logits give (the next id up), announcing and feeding that one alike; it declines to share the LM head's work
  with the first stage (which would sample instead of it).
- "overkeeper": a speculating ring's last stage that keeps every draft token, also those the model rejects
  (announcing and feeding alike: the first stage ran them, so only the kept tokens are a lie).
- "forker": a ring's last stage that samples honestly and announces that token to the client, but feeds the first
  stage another (the next id up), signing each; it declines to share the LM head's work too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

KINDS = ("liar", "equivocator", "rare", "once", "late", "sly", "blamer", "missampler", "overkeeper", "forker")
RARE_ONE_IN = 50
LATE_FROM_STEP = 6
ONCE_AT_STEP = 4
BLAME_AT_STEP = 3


@dataclass
class Adversary:
    kind: str
    scale: float
    rng: random.Random = field(default_factory=random.Random)
    steps: dict[str, int] = field(default_factory=dict)  # session id -> steps run

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown test adversary {self.kind!r}; one of {KINDS}")

    def outputs(self, hidden: torch.Tensor, *, audited: bool, session: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """(what this node sends on and samples from, what it echoes to the client) for an honest output of a step
        of `session` (whose steps `blames_now` counted)."""
        steps = self.steps.get(session, 0)
        lies = {"liar": True, "equivocator": True, "rare": self.rng.randrange(RARE_ONE_IN) == 0,
                "once": steps == ONCE_AT_STEP, "late": steps >= LATE_FROM_STEP,
                "sly": not audited, "blamer": False, "missampler": False, "overkeeper": False,
                "forker": False}[self.kind]
        if not lies:
            return hidden, hidden
        noisy = perturb(hidden, self.scale)
        return noisy, hidden if self.kind == "equivocator" else noisy

    def sampled(self, tokens: list[int], vocab_size: int, draft: tuple[int, ...] = ()) -> list[int]:
        """The tokens this node says it sampled, for those it did (after a step that ran `draft`)."""
        if self.kind == "overkeeper" and len(tokens) <= len(draft):  # the model rejected a draft token
            return [*draft, tokens[-1]]
        return [(t + 1) % vocab_size for t in tokens] if self.kind == "missampler" else tokens

    def fed(self, token: int, vocab_size: int) -> int:
        """The token this node feeds the first stage, for the one it announces to the client."""
        return (token + 1) % vocab_size if self.kind == "forker" else token

    @property
    def shares_head(self) -> bool:
        return self.kind not in ("missampler", "overkeeper", "forker")

    def blames_now(self, session_id: str) -> bool:
        """Counts the session's steps; a blamer accuses its neighbour instead of running the BLAME_AT_STEP-th."""
        if len(self.steps) > 10_000:
            self.steps.clear()
        self.steps[session_id] = self.steps.get(session_id, 0) + 1
        return self.kind == "blamer" and self.steps[session_id] == BLAME_AT_STEP


def perturb(output: torch.Tensor, scale: float) -> torch.Tensor:
    """Gaussian noise of `scale` x the output's RMS."""
    rms = output.float().pow(2).mean().sqrt()
    return (output.float() + scale * rms * torch.randn_like(output, dtype=torch.float32)).to(output.dtype)
