"""The team spares' policy (``vmmgr/pool.py`` ``TeamDemand``), as its decision table: which
(team, template) keys deserve a warm spare, given the creates counted, the window and the
host and per-team bounds (least recently used loses). No VM: the VM behaviour is in
``test_team_spares_vm.py``."""

from __future__ import annotations

from dovecote.vmmgr.pool import TeamDemand

A1, A2, A3 = ("team-a", "tpl-1"), ("team-a", "tpl-2"), ("team-a", "tpl-3")
B1 = ("team-b", "tpl-1")  # another team, a template id that another team's key has too


def test_a_template_created_from_once_gets_no_spare_twice_does() -> None:
    demand = TeamDemand(host_max=2, team_max=2)
    demand.note(A1, 0.0)
    assert demand.wanted(1.0) == []
    demand.note(A1, 5.0)
    assert demand.wanted(6.0) == [A1]


def test_creates_spread_wider_than_the_window_do_not_count_and_a_cold_key_is_forgotten() -> None:
    demand = TeamDemand(host_max=2, team_max=2, window_s=100.0)
    demand.note(A1, 0.0)
    demand.note(A1, 150.0)  # the first one is outside the window by now
    assert demand.wanted(151.0) == []
    demand.note(A1, 160.0)
    assert demand.wanted(161.0) == [A1]
    assert demand.wanted(249.0) == [A1]
    assert demand.wanted(251.0) == []  # one create left in the window: no spare
    assert A1 in demand
    assert demand.wanted(261.0) == []  # none left: cold, forgotten
    assert A1 not in demand


def test_the_host_bound_keeps_the_most_recently_used() -> None:
    demand = TeamDemand(host_max=2, team_max=2)
    for t, key in enumerate([A1, A1, B1, B1, A2, A2]):
        demand.note(key, float(t))
    assert demand.wanted(10.0) == [A2, B1]  # A1 used least recently: evicted
    demand.note(A1, 11.0)  # used again: hot again, B1 now least recent
    assert demand.wanted(12.0) == [A1, A2]


def test_the_per_team_bound_leaves_room_for_other_teams() -> None:
    demand = TeamDemand(host_max=3, team_max=1)
    for t, key in enumerate([B1, B1, A1, A1, A2, A2, A3, A3]):
        demand.note(key, float(t))
    assert demand.wanted(10.0) == [A3, B1]


def test_keys_are_per_team_and_a_deleted_template_is_forgotten() -> None:
    demand = TeamDemand(host_max=4, team_max=4)
    demand.note(A1, 0.0)
    demand.note(B1, 1.0)  # one create each: the same template id of two teams is two keys
    assert demand.wanted(2.0) == []
    for key in (A1, B1, A2, A2):
        demand.note(key, 3.0)
    assert set(demand.wanted(4.0)) == {A1, B1, A2}
    demand.forget_template("tpl-1")
    assert demand.wanted(5.0) == [A2]
    assert A1 not in demand and B1 not in demand


def test_no_spares_when_the_host_bound_is_zero() -> None:
    demand = TeamDemand(host_max=0, team_max=1)
    demand.note(A1, 0.0)
    demand.note(A1, 1.0)
    assert demand.wanted(2.0) == []
