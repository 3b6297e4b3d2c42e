"""Evidence that travels (node.net.evidence): a proof of a lie checks out only if the accused signed a wrong output
for inputs it signed, and two other nodes signed agreeing outputs for the same inputs; any forgery is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey

from node.net.evidence import (
    MAX_PROOF_BYTES,
    EvidenceError,
    ReceiptSigner,
    Witness,
    build_proof,
    build_token_proof,
    endorsed_peer,
    sampling_bytes,
    token_equivocation_proof,
    verify_proof,
    wire_digest,
)
from node.net.identity import NodeIdentity
from node.net.proofbook import (
    MAX_ENTRY_BYTES,
    ProofValidator,
    assemble_proofs,
    proof_entries,
    proof_subkey,
    proofs_key,
)
from node.net.protocol import digest

MODEL = "tiny"
KEYS = [RSAPrivateKey() for _ in range(3)]
PEERS = [NodeIdentity(key).peer_id for key in KEYS]


def _layer(hidden: torch.Tensor) -> torch.Tensor:
    """The stage's honest computation in this test: any deterministic function of all inputs so far."""
    return torch.tanh(hidden.cumsum(dim=1))


def _witness(key: RSAPrivateKey, inputs: torch.Tensor, steps: list[tuple[int, int]], *, noise: float = 0.0,
             session: str = "s") -> Witness:
    signer = ReceiptSigner(key, session=session, client="client", start=0, end=3, dtype="float32", quant="none",
                           wire="none")
    for position, tokens in steps:
        rows = inputs[:, position:position + tokens]
        output = _layer(inputs[:, :position + tokens])[:, position:]
        output = output + noise * torch.randn_like(output)
        signer.step(position, tokens, digest(rows))
        receipt = signer.receipt(wire_digest(output, "none"))
    return Witness(signer.endorsement, steps, receipt, output)


def _proof(noise: float = 0.05) -> tuple[dict, torch.Tensor]:
    inputs = torch.randn(1, 6, 8)
    witnesses = [_witness(KEYS[0], inputs, [(0, 4), (4, 1), (5, 1)], noise=noise),  # served: prompt, two decodes
                 _witness(KEYS[1], inputs, [(0, 5), (5, 1)]), _witness(KEYS[2], inputs, [(0, 5), (5, 1)])]
    return build_proof(MODEL, PEERS[0], 0, 3, inputs, witnesses), inputs


def test_a_proof_convicts_the_liar_and_only_it():
    proof, inputs = _proof()
    assert verify_proof(proof, model=MODEL) == PEERS[0]
    assert verify_proof(MSGPackSerializer.loads(MSGPackSerializer.dumps(proof)), model=MODEL, accused=PEERS[0])
    assert endorsed_peer(proof["witnesses"][1]["endorsement"]) == PEERS[1]
    # An honest node's signed output agrees with the others: no proof against it, however the accuser dresses it.
    honest, _ = _proof(noise=0.0)
    with pytest.raises(EvidenceError, match="do not convict"):
        verify_proof(honest, model=MODEL)


def _forgeries(proof: dict) -> dict[str, dict]:
    forged = {}
    swapped = copy.deepcopy(proof)  # accuse an honest verifier, with the liar as a witness against it
    swapped["accused"] = PEERS[1]
    swapped["witnesses"][:2] = swapped["witnesses"][1::-1]
    forged["honest accused"] = swapped
    edited = copy.deepcopy(proof)  # the accused's output replaced by a wrong one it never signed
    edited["witnesses"][0]["output"] = Witness({}, [], {}, torch.zeros(1, 1, 8)).to_wire()["output"]
    forged["unsigned output"] = edited
    renamed = copy.deepcopy(proof)  # the proof of one peer's lie pinned on another
    renamed["accused"] = PEERS[2]
    forged["another accused"] = renamed
    other_inputs = copy.deepcopy(proof)  # inputs the witnesses did not sign
    other_inputs["inputs"] = build_proof(MODEL, PEERS[0], 0, 3, torch.randn(1, 6, 8), [])["inputs"]
    forged["other inputs"] = other_inputs
    endorsement = copy.deepcopy(proof)  # a session key the accused's identity never endorsed
    endorsement["witnesses"][0]["endorsement"]["key"] = bytes(32)
    forged["unendorsed key"] = endorsement
    twice = copy.deepcopy(proof)  # one verifier counted twice
    twice["witnesses"][2] = twice["witnesses"][1]
    forged["same verifier twice"] = twice
    layers = copy.deepcopy(proof)
    layers["end"] = 4
    forged["other layers"] = layers
    huge = copy.deepcopy(proof)
    huge["padding"] = bytes(MAX_PROOF_BYTES)
    forged["oversized"] = huge
    forged["junk"] = {"v": 1, "model": MODEL, "accused": PEERS[0], "witnesses": "x"}
    return forged


def test_every_forgery_is_refused():
    proof, _ = _proof()
    for name, forged in _forgeries(proof).items():
        with pytest.raises(EvidenceError):
            verify_proof(forged, model=MODEL)
            pytest.fail(f"{name}: a forged proof verified")
    with pytest.raises(EvidenceError):
        verify_proof(proof, model="another model")


GREEDY = {"temperature": 0.0, "top_p": 1.0, "seed": None}


def _token_witness(key: RSAPrivateKey, inputs: torch.Tensor, steps: list[tuple[int, int]], token: int,
                   sampling: dict = GREEDY) -> Witness:
    """A ring's last stage's account of its step (an honest output) and of the token it sampled after it."""
    signer = ReceiptSigner(key, session="s", client="client", start=3, end=6, dtype="float32", quant="none",
                           wire="none")
    for position, tokens in steps:
        output = _layer(inputs[:, :position + tokens])[:, position:]
        signer.step(position, tokens, digest(inputs[:, position:position + tokens]))
        receipt = signer.receipt(wire_digest(output, "none"))
    end = steps[-1][0] + steps[-1][1]
    return Witness(signer.endorsement, steps, receipt, output,
                   signer.token(receipt["out"], end, token, sampling_bytes(**sampling)))


def _token_proof(tokens: tuple[int, int, int] = (8, 7, 7), sampling: dict = GREEDY,
                 signed_sampling: dict = GREEDY) -> dict:
    inputs = torch.randn(1, 6, 8)
    witnesses = [_token_witness(KEYS[0], inputs, [(0, 5), (5, 1)], tokens[0], signed_sampling),
                 _token_witness(KEYS[1], inputs, [(0, 2), (2, 3), (5, 1)], tokens[1], signed_sampling),
                 _token_witness(KEYS[2], inputs, [(0, 5), (5, 1)], tokens[2], signed_sampling)]
    return build_token_proof(MODEL, PEERS[0], 3, 6, inputs, witnesses, sampling)


def test_a_token_lie_is_proven_by_the_signed_tokens_and_a_forged_one_is_refused():
    proof = _token_proof()
    assert verify_proof(MSGPackSerializer.loads(MSGPackSerializer.dumps(proof)), model=MODEL) == PEERS[0]
    seeded = {"temperature": 0.7, "top_p": 0.9, "seed": 11}
    assert verify_proof(_token_proof(sampling=seeded, signed_sampling=seeded), model=MODEL) == PEERS[0]
    forged = {
        "honest token": _token_proof((7, 7, 7)),
        "the others disagree": _token_proof((8, 7, 6)),
        "other sampling than signed": _token_proof(sampling={**GREEDY, "seed": 3}),
        "unseeded draw": _token_proof(sampling={**seeded, "seed": None},
                                      signed_sampling={**seeded, "seed": None}),
    }
    edited = copy.deepcopy(proof)  # the honest verifier's token changed to the liar's: its signature fails
    edited["witnesses"][1]["token"]["token"] = 8
    forged["edited token"] = edited
    swapped = copy.deepcopy(proof)  # an honest verifier accused, the liar's signed token as a witness against it
    swapped["accused"], swapped["witnesses"][:2] = PEERS[1], swapped["witnesses"][1::-1]
    forged["honest accused"] = swapped
    unsigned = copy.deepcopy(proof)
    del unsigned["witnesses"][2]["token"]
    forged["a witness signed no token"] = unsigned
    bf16 = copy.deepcopy(proof)  # tokens of a bf16 node are not compared (its honest noise flips near ties)
    bf16["witnesses"][0]["endorsement"]["dtype"] = "bfloat16"
    forged["a bf16 witness"] = bf16
    for name, bad in forged.items():
        with pytest.raises(EvidenceError):
            verify_proof(bad, model=MODEL)
            pytest.fail(f"{name}: a forged token proof verified")


def test_two_tokens_signed_for_one_output_prove_a_token_equivocation():
    signer = ReceiptSigner(KEYS[0], session="s", client="client", start=3, end=6, dtype="float32", quant="none",
                           wire="none")
    signer.step(5, 1, "in")
    sampling = sampling_bytes(**GREEDY)
    fed, told = signer.token("out", 6, 8, sampling), signer.token("out", 6, 7, sampling)
    proof = token_equivocation_proof(MODEL, PEERS[0], signer.endorsement, 6, sampling, [fed, told])
    assert verify_proof(MSGPackSerializer.loads(MSGPackSerializer.dumps(proof)), model=MODEL) == PEERS[0]
    signer.step(6, 1, "in2")  # a later step's token at another position: not the same statement twice
    later = signer.token("out", 7, 9, sampling)
    forged = {"same token twice": [fed, fed], "another step": [fed, later],
              "edited token": [fed, {**told, "token": 9}], "one receipt": [fed]}
    for name, receipts in forged.items():
        with pytest.raises(EvidenceError):
            verify_proof(token_equivocation_proof(MODEL, PEERS[0], signer.endorsement, 6, sampling, receipts),
                         model=MODEL)
            pytest.fail(f"{name}: a forged token equivocation verified")
    with pytest.raises(EvidenceError):  # pinned on another peer
        verify_proof({**proof, "accused": PEERS[1]}, model=MODEL)


def test_a_proof_travels_in_small_parts_and_the_dht_refuses_oversized_or_misplaced_ones():
    proof, _ = _proof()
    big = {**proof, "inputs": build_proof(MODEL, PEERS[0], 0, 3, torch.randn(1, 200, 64), [])["inputs"]}
    entries = proof_entries(big)
    assert len(entries) > 5 and all(len(MSGPackSerializer.dumps(e)) <= MAX_ENTRY_BYTES for e in entries)
    assert assemble_proofs(entries) == [MSGPackSerializer.loads(MSGPackSerializer.dumps(big))]
    assert assemble_proofs(entries[1:]) == []  # a part missing: nothing to verify
    validator = ProofValidator()
    value = MSGPackSerializer.dumps(entries[0])

    def record(value: bytes, subkey: str, accused: str = PEERS[0]) -> DHTRecord:
        from hivemind.dht.routing import DHTID
        return DHTRecord(key=DHTID.generate(source=proofs_key(MODEL, accused)).to_bytes(),
                         subkey=MSGPackSerializer.dumps(subkey), value=value, expiration_time=0.0)

    assert validator.validate(record(value, proof_subkey(value)))
    junk = MSGPackSerializer.dumps({**entries[0], "part": b"junk"})  # overwriting the part's subkey with junk
    assert not validator.validate(record(junk, proof_subkey(value)))
    assert not validator.validate(record(value, proof_subkey(value), accused=PEERS[1]))  # under another's key
    huge = MSGPackSerializer.dumps({**entries[0], "part": bytes(MAX_ENTRY_BYTES)})
    assert not validator.validate(record(huge, proof_subkey(huge)))
    assert validator.validate(record(MSGPackSerializer.dumps({"model": MODEL}), "x"))  # not a proof: not ours


def test_credit_sums_signed_tallies_skips_malformed_ones_and_self_credit():
    from types import SimpleNamespace

    from hivemind.utils import ValueWithExpiration

    from node.net.credit import MAX_CREDIT_PEERS, CheckedCredit, sum_tallies
    from node.net.membership import owner_subkey

    subkeys = [owner_subkey(NodeIdentity(key)) for key in KEYS]
    tallies = {subkeys[0]: {"credit": {"A": 10, "B": 5, PEERS[0]: 1000}},  # its own node: not counted
               subkeys[1]: {"credit": {"A": 7}},
               subkeys[2]: {"credit": {"A": -3}},  # malformed: skipped whole
               "unsigned": {"credit": {"A": 1000}},  # no owner: skipped
               }
    too_many = {f"n{i}": 1 for i in range(MAX_CREDIT_PEERS + 1)}
    found = SimpleNamespace(value={k: ValueWithExpiration(v, 0.0) for k, v in tallies.items()})
    assert sum_tallies(found) == {"A": CheckedCredit(17, 2), "B": CheckedCredit(5, 1)}
    found.value[subkeys[2]] = ValueWithExpiration({"credit": too_many}, 0.0)
    assert sum_tallies(found) == {"A": CheckedCredit(17, 2), "B": CheckedCredit(5, 1)}
    assert sum_tallies(None) == {}


def _stage(key: RSAPrivateKey, session: str = "s") -> ReceiptSigner:
    return ReceiptSigner(key, session=session, client="client", start=0, end=3, dtype="float32", quant="none",
                         wire="none")


def test_an_equivocation_is_proven_by_the_signed_receipts_and_pinned_on_the_right_end():
    from node.client.session import StageFailure
    from node.client.verify import Ledger
    from node.net.evidence import equivocation_proof
    from node.net.protocol import pack_response

    inputs, honest, noisy = torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8)

    def link(*, sender_lies: bool = False, receiver_lies: bool = False) -> tuple[Ledger, StageFailure]:
        sender, receiver = _stage(KEYS[0]), _stage(KEYS[1])
        sender.step(0, 1, digest(inputs))
        pushed = sender.receipt(digest(noisy if sender_lies else honest))  # what it signs for its push
        received = noisy if sender_lies or receiver_lies else honest
        receiver.step(0, 1, digest(received))
        ledger = Ledger(PEERS[:2], [sender.endorsement, receiver.endorsement], MODEL)
        ledger.put_nowait((0, pack_response({"echo": 0, **sender.receipt(digest(honest))}, [honest])))
        ledger.put_nowait((1, pack_response({"position": 0, **receiver.receipt(digest(received)), "prev": pushed},
                                            [received])))
        failures = [item for _, item in (ledger.get_nowait() for _ in range(ledger.qsize()))
                    if isinstance(item, StageFailure)]
        return ledger, failures[0]

    ledger, failure = link(sender_lies=True)  # pushed one output, told the client another: its own two signatures
    assert (failure.code, failure.peer, failure.reporter) == ("equivocated", PEERS[0], PEERS[0])
    assert verify_proof(ledger.proofs[0], model=MODEL, accused=PEERS[0]) == PEERS[0]
    ledger, failure = link(receiver_lies=True)  # says it ran what its sender never signed for: no proof, but its fault
    assert (failure.code, failure.peer) == ("equivocated", PEERS[1]) and not ledger.proofs

    proof = link(sender_lies=True)[0].proofs[0]
    same = copy.deepcopy(proof)
    same["receipts"][1] = same["receipts"][0]  # one statement twice is no contradiction
    rewound = copy.deepcopy(proof)
    rewound["receipts"][1]["chain"] = bytes(16)  # two different steps at one position (after a rewind)
    other = _stage(KEYS[2])
    other.step(0, 1, "x")
    pinned = equivocation_proof(MODEL, PEERS[2], other.endorsement, 0, 1, proof["receipts"])  # another's receipts
    for forged in (same, rewound, pinned, {**proof, "position": 1}):
        with pytest.raises(EvidenceError):
            verify_proof(forged, model=MODEL)
