"""When the node may run: desktop.policy.decide, a pure function of the rules and the machine's readings."""

from __future__ import annotations

from datetime import datetime, time

from desktop.policy import TEMPERATURE_HYSTERESIS_C, Conditions, Policy, decide, in_schedule

NOON = datetime(2026, 5, 4, 12, 0)


def at(hour: int, minute: int = 0, **readings) -> Conditions:
    return Conditions(now=NOON.replace(hour=hour, minute=minute), **readings)


def test_no_rules_always_run():
    decision = decide(Policy(pause_on_battery=False), at(3), running=False)
    assert decision.run and decision.reason == "" and decision.notes == ()


def test_battery_pauses_only_when_asked_and_only_on_battery():
    rules = Policy(pause_on_battery=True)
    assert decide(rules, at(12, on_battery=True), running=True) == decide(rules, at(12, on_battery=True),
                                                                          running=False)
    assert not decide(rules, at(12, on_battery=True), running=True).run
    assert decide(rules, at(12, on_battery=True), running=True).reason == "on battery power"
    assert decide(rules, at(12, on_battery=False), running=True).run
    assert decide(rules, at(12, on_battery=None), running=True).run  # a desktop PC has no battery
    assert decide(Policy(pause_on_battery=False), at(12, on_battery=True), running=True).run


def test_only_when_idle_waits_for_the_idle_time():
    rules = Policy(only_when_idle=True, idle_after_s=300, pause_on_battery=False)
    assert not decide(rules, at(12, idle_s=10), running=True).run
    assert decide(rules, at(12, idle_s=10), running=True).reason == "the computer is in use"
    assert decide(rules, at(12, idle_s=301), running=False).run
    unknown = decide(rules, at(12, idle_s=None), running=False)  # Wayland, or no X screensaver extension
    assert unknown.run and "idle time" in unknown.notes[0]


def test_temperature_limit_with_hysteresis_and_without_a_sensor():
    rules = Policy(max_gpu_temp_c=80, pause_on_battery=False)
    assert decide(rules, at(12, gpu_temp_c=79), running=True).run
    hot = decide(rules, at(12, gpu_temp_c=81), running=True)
    assert not hot.run and hot.reason == "GPU at 81 °C (limit 80 °C)"
    # Paused for heat, it resumes only once cooler than the limit by the hysteresis: no flapping at 79-81.
    assert not decide(rules, at(12, gpu_temp_c=79), running=False).run
    assert decide(rules, at(12, gpu_temp_c=80 - TEMPERATURE_HYSTERESIS_C), running=False).run
    no_gpu = decide(rules, at(12, gpu_temp_c=None), running=True)
    assert no_gpu.run and "temperature" in no_gpu.notes[0]


def test_daily_schedule_including_one_over_midnight():
    night = Policy(schedule=(time(22, 0), time(7, 0)), pause_on_battery=False)
    assert decide(night, at(23), running=False).run and decide(night, at(6, 59), running=False).run
    day = decide(night, at(12), running=True)
    assert not day.run and day.reason == "outside the schedule (22:00–07:00)"
    office = Policy(schedule=(time(9, 0), time(17, 30)), pause_on_battery=False)
    assert decide(office, at(9), running=False).run and not decide(office, at(17, 30), running=True).run
    assert in_schedule(time(4), time(8), time(8))  # an empty window reads as all day, not never


def test_every_reason_is_given_at_once():
    rules = Policy(only_when_idle=True, pause_on_battery=True, schedule=(time(1), time(2)))
    decision = decide(rules, at(12, idle_s=0, on_battery=True), running=True)
    assert not decision.run
    assert decision.reason == "outside the schedule (01:00–02:00); on battery power; the computer is in use"
