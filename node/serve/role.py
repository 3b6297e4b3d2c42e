"""A session's role at this stage, decided once from its open (`node.net.protocol.OpenSession`).

The open's flags combine into what the stage does with the session; every rule that reads them is here,
and the server dispatches on the `SessionRole` alone. A combination that means nothing is refused here,
when the session opens, with code "bad_request".

Steps come from the client's stream when this stage is the chain's first (no `prev`), when the session is
relayed, or when it embeds (a ring's first stage takes the prompt from the client); and from the push
stream of `prev` when one is named and the session is not relayed. Outputs go to the push stream of
`next` when one is named and the session is not relayed, else to the client. A stage whose output does
not go to the client (it pushes, or samples a token) echoes it there with its receipt (`node.net.protocol`).

A ring (opened with `sampling`; never relayed) has three kinds of stage:
- FIRST: `embed`, at layer 0, short of the model's end; names `next` and `prev` (the last stage, which
  sends the sampled tokens back). It splits the LM head's work with the last stage when the open allows
  (`share_head`) and this stage holds a share of the head.
- LAST: the model's last layer, no `embed`; names `next` (the first stage) and sends it each token. Named
  neither `prev` nor `next`, it is a check (`node.client.verify`): the client sends it hidden states and it
  answers with its output (an echo) and the token it samples after a step flagged `sample`, and feeds no one.
- WHOLE: `embed` and the model's last layer: one stage is the ring, names no neighbour, feeds itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NoReturn

from node.net.protocol import OpenSession, ProtocolError


class Ring(Enum):
    FIRST = "first"
    LAST = "last"
    WHOLE = "whole"


@dataclass(frozen=True)
class SessionRole:
    ring: Ring | None  # None: a chain whose client samples (and, unless `embeds`, embeds) itself
    embeds: bool  # steps carry token ids, which this stage embeds
    client_steps: bool  # the client may send steps on its stream
    takes_pushes: bool  # the stage named `prev` may push steps
    pushes: bool  # outputs go to the next stage's push stream; else to the client
    echoes: bool  # a copy of each output goes to the client with the step's receipt (it is not the client's answer)
    shares_head: bool  # a ring's first stage offering to split the LM head's work with the last one

    @property
    def samples(self) -> bool:
        """Samples a token after a step flagged `sample`: the ring's stage at the model's last layer."""
        return self.ring in (Ring.LAST, Ring.WHOLE)

    @property
    def checks_sampling(self) -> bool:
        """A check of a ring's sampling (node.client.verify): the client sends the steps, with a speculating ring's
        drafts, and takes the tokens; it feeds no one."""
        return self.ring is Ring.LAST and self.client_steps and not self.takes_pushes


def session_role(opened: OpenSession, *, num_layers: int, has_embedder: bool, has_head: bool,
                 has_head_share: bool) -> SessionRole:
    """The role of `opened` at a stage of a `num_layers`-layer model holding the embeddings, the LM head and
    a share of the LM head as said; raises ProtocolError("bad_request") for a combination that means nothing."""
    if opened.sampling is not None and opened.relay:
        _refuse("a relayed session cannot sample at its last stage")
    if opened.embed and (opened.start != 0 or not has_embedder):
        _refuse("only a session's first stage, at layer 0, takes token ids")
    ring = None if opened.sampling is None else _ring(opened, ends_model=opened.end == num_layers, has_head=has_head)
    pushes = opened.next_peer is not None and not opened.relay
    return SessionRole(
        ring=ring,
        embeds=opened.embed,
        client_steps=opened.prev_peer is None or opened.relay or opened.embed,
        takes_pushes=opened.prev_peer is not None and not opened.relay,
        pushes=pushes,
        echoes=pushes or ring in (Ring.LAST, Ring.WHOLE),
        # A draft's logits are computed at the last stage in one go: a speculating ring keeps its head whole there.
        shares_head=ring is Ring.FIRST and opened.share_head and has_head_share and not opened.speculate,
    )


def _ring(opened: OpenSession, *, ends_model: bool, has_head: bool) -> Ring:
    """Which stage of a ring `opened` (opened with `sampling`, not relayed) is."""
    if not (has_head if ends_model else opened.embed and opened.next_peer is not None):
        _refuse("only a session's last stage, at the model's last layer, samples "
                "(and its first stage, which may share the LM head's work)")
    if not ends_model:
        if opened.prev_peer is None:
            _refuse("a ring's first stage takes the sampled tokens back from the last stage: name it as 'prev'")
        return Ring.FIRST
    if not opened.embed:
        if opened.next_peer is None and opened.prev_peer is not None:
            _refuse("a sampling stage feeds its tokens to the first stage: name it as 'next' (and 'prev'), or also "
                    "'embed' when this stage is the whole chain, or neither to check a ring's sampling")
        return Ring.LAST
    if opened.prev_peer is not None or opened.next_peer is not None:
        _refuse("a stage that is the whole ring feeds itself its tokens: it names no 'prev' or 'next'")
    return Ring.WHOLE


def _refuse(message: str) -> NoReturn:
    raise ProtocolError("bad_request", message)
