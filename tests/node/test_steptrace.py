"""Step marks (node.net.steptrace) and how benchmarks/ring_timeline.py reads a token's way round a ring from them."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from ring_timeline import cycles  # noqa: E402

_MARK_TWICE = "from node.net.steptrace import mark; mark('run', 3); mark('rx'); print(__import__('os').getpid())"


def test_marks_reach_a_file_per_process_only_when_asked(tmp_path):
    prefix = str(tmp_path / "steps")
    env = {**os.environ, "PYTHONPATH": ROOT, "LAYERHIVE_STEP_TRACE": prefix}
    pid = subprocess.run([sys.executable, "-c", _MARK_TWICE], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    with open(f"{prefix}.{pid}") as marks:
        lines = [line.split() for line in marks]
    assert [(event, int(position)) for _, event, position in lines] == [("run", 3), ("rx", -1)]
    assert int(lines[0][0]) <= int(lines[1][0])
    env.pop("LAYERHIVE_STEP_TRACE")
    subprocess.run([sys.executable, "-c", _MARK_TWICE], env=env, capture_output=True, check=True)
    assert os.listdir(tmp_path) == [f"steps.{pid}"]


def test_a_tokens_way_round_a_three_stage_ring_is_cut_into_its_segments():
    # Position 10's token, moment by moment (ns), as three stages mark it; then the first stage's step at 11.
    first = [(0, "run", 10), (15, "computed", 10), (16, "push", 10),
             (70, "rx", -1), (71, "head_in", 11), (75, "head_own", 11), (76, "token", 11), (77, "run", 11)]
    second = [(36, "rx", -1), (37, "parsed", 10), (38, "run", 10), (50, "computed", 10), (51, "push", 10)]
    third = [(5, "rx", -1), (52, "rx", -1), (54, "parsed", 10), (55, "run", 10), (67, "computed", 10),
             (68, "push_head", 11)]
    (found,) = cycles([first, second, third], (0, 100))
    assert found == [
        ("stage 1: layers", 15), ("stage 1: digest, sign, pack", 1), ("link 1->2 (delay included)", 20),
        ("stage 2: parse", 1), ("stage 2: digest, verify receipt", 1), ("stage 2: layers", 12),
        ("stage 2: digest, sign, pack", 1), ("link 2->3 (delay included)", 1),
        ("stage 3: parse", 2), ("stage 3: digest, verify receipt", 1), ("stage 3: layers", 12),
        ("stage 3: digest, sign, pack", 1), ("link 3->1 (delay included)", 2),
        ("stage 1: parse head input", 1), ("stage 1: its share of the head", 4),
        ("stage 1: wait for the other share, merge", 1), ("stage 1: token to next step", 1),
    ]
    assert sum(ns for _, ns in found) == 77
    assert cycles([first, second, third], (0, 60)) == []  # a token that left the window is not counted
