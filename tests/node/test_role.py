"""A session's role at a stage (`node.serve.role`) for every combination of an open's flags, as a table."""

from __future__ import annotations

import itertools

import pytest

from node.model.sampling import SamplingParams
from node.net.protocol import OpenSession, ProtocolError
from node.serve.role import Ring, SessionRole, session_role

NUM_LAYERS = 4

RELAYED = "a relayed session cannot sample"
LAYER_0 = "at layer 0, takes token ids"
NOT_A_SAMPLER = "only a session's last stage, at the model's last layer, samples"
NO_PREV = "name it as 'prev'"
NO_NEXT = "name it as 'next'"
WHOLE_WITH_NEIGHBOURS = "names no 'prev' or 'next'"

# Every combination of the flags that decide a role matches exactly one row ("*": either value). A role reads
# "<ring or chain>: <who sends steps> -> <where outputs go>"; anything else is the refusal's words.
#  relay embed sampling ends_model prev next
ROLES = [
    ("1 * 0 * * *", "chain: client -> client"),
    ("1 * 1 * * *", RELAYED),
    ("0 0 0 * 0 0", "chain: client -> client"),
    ("0 0 0 * 0 1", "chain: client -> next"),
    ("0 0 0 * 1 0", "chain: prev -> client"),
    ("0 0 0 * 1 1", "chain: prev -> next"),
    ("0 1 0 * 0 0", "chain: client -> client"),
    ("0 1 0 * 0 1", "chain: client -> next"),
    ("0 1 0 * 1 0", "chain: client+prev -> client"),
    ("0 1 0 * 1 1", "chain: client+prev -> next"),
    ("0 * 1 0 * 0", NOT_A_SAMPLER),
    ("0 0 1 0 * 1", NOT_A_SAMPLER),
    ("0 1 1 0 0 1", NO_PREV),
    ("0 1 1 0 1 1", "first: client+prev -> next"),
    ("0 0 1 1 0 0", "last: client -> client"),  # a check of a ring's sampling (node.client.verify)
    ("0 0 1 1 1 0", NO_NEXT),
    ("0 0 1 1 0 1", "last: client -> next"),
    ("0 0 1 1 1 1", "last: prev -> next"),
    ("0 1 1 1 0 0", "whole: client -> itself"),
    ("0 1 1 1 1 *", WHOLE_WITH_NEIGHBOURS),
    ("0 1 1 1 0 1", WHOLE_WITH_NEIGHBOURS),
]


def _opening(relay: bool, embed: bool, sampling: bool, ends_model: bool, prev: bool, next_: bool, *,
             audit: bool = False, share_head: bool = True, start: int = 0) -> OpenSession:
    return OpenSession(
        "s", start, NUM_LAYERS if ends_model else 2, max_length=8, prev_peer="P" if prev else None,
        next_peer="N" if next_ else None, relay=relay, audit=audit, embed=embed,
        sampling=SamplingParams(max_new_tokens=4) if sampling else None, share_head=share_head,
    )


def _role(opened: OpenSession, *, has_embedder: bool = True, has_head: bool = True,
          has_head_share: bool = True) -> SessionRole | str:
    """The role, or the words of the refusal (always code "bad_request")."""
    try:
        return session_role(opened, num_layers=NUM_LAYERS, has_embedder=has_embedder, has_head=has_head,
                            has_head_share=has_head_share)
    except ProtocolError as e:
        assert e.code == "bad_request"
        return str(e)


def _describe(role: SessionRole) -> str:
    senders = "+".join(name for name, yes in (("client", role.client_steps), ("prev", role.takes_pushes)) if yes)
    receiver = "itself" if role.ring is Ring.WHOLE else "next" if role.pushes else "client"
    return f"{role.ring.value if role.ring else 'chain'}: {senders} -> {receiver}"


def _matches(pattern: str, flags: tuple[bool, ...]) -> bool:
    return all(want == "*" or (want == "1") == flag for want, flag in zip(pattern.split(), flags, strict=True))


@pytest.mark.parametrize("flags", list(itertools.product((False, True), repeat=6)),
                         ids=lambda flags: "".join(str(int(f)) for f in flags))
def test_every_combination_of_an_opens_flags_has_one_role_or_a_clear_refusal(flags):
    rows = [outcome for pattern, outcome in ROLES if _matches(pattern, flags)]
    assert len(rows) == 1, f"the table must give every combination one row, {flags} matches {rows}"
    for audit, share_head in itertools.product((False, True), repeat=2):
        role = _role(_opening(*flags, audit=audit, share_head=share_head))
        if not isinstance(role, SessionRole):
            assert rows[0] in role
            continue
        assert _describe(role) == rows[0]
        embed = flags[1]
        assert role.embeds == embed
        assert role.samples == (role.ring in (Ring.LAST, Ring.WHOLE))
        # Every output that is not the client's answer is echoed to it, whatever the audit flag says.
        assert role.echoes == (role.pushes or role.samples)
        # Only a ring's first stage shares the LM head, and only when the open allows it.
        assert role.shares_head == (role.ring is Ring.FIRST and share_head)


def test_a_stage_refuses_a_role_it_lacks_the_parts_for():
    first = _opening(relay=False, embed=True, sampling=True, ends_model=False, prev=True, next_=True)
    assert LAYER_0 in _role(_opening(False, True, False, False, False, True, start=1))  # embedding past layer 0
    assert LAYER_0 in _role(first, has_embedder=False)
    assert _role(first, has_head=False).ring is Ring.FIRST  # the head a first stage may share is its own share
    assert _role(first, has_head_share=False).shares_head is False  # no share held here: the last stage samples
    last = _opening(relay=False, embed=False, sampling=True, ends_model=True, prev=True, next_=True)
    whole = _opening(relay=False, embed=True, sampling=True, ends_model=True, prev=False, next_=False)
    for sampler in (last, whole):
        assert NOT_A_SAMPLER in _role(sampler, has_head=False)
        assert _role(sampler, has_head_share=False).ring in (Ring.LAST, Ring.WHOLE)
    chain = _opening(relay=False, embed=False, sampling=False, ends_model=True, prev=True, next_=False)
    assert _describe(_role(chain, has_embedder=False, has_head=False, has_head_share=False)) == "chain: prev -> client"
