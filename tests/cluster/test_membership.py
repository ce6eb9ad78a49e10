"""Membership as plain Python: who is in each group, in which rank order, under which epoch."""

from __future__ import annotations

import pytest

from latentmoe.cluster.membership import ATTENTION, EXPERT, Group, Member, Membership


def expert(slot: int, incarnation: int = 1) -> Member:
    return Member(f"expert-{slot}.{incarnation}", EXPERT, doorbell=("h", 100 + slot), slot=slot)


def attention(name: str) -> Member:
    return Member(f"attention-{name}", ATTENTION, doorbell=("h", 200 + len(name)))


def test_groups_put_experts_first_in_slot_order_then_attention_in_join_order():
    m = Membership(num_expert=2)
    m.join(expert(1))
    assert not m.complete()
    m.join(expert(0))
    m.join(attention("b"))
    m.join(attention("a"))
    assert m.needs_new_group()
    group = m.new_group("gloo", "tcp://h:1")
    assert group.epoch == 1 and [x.id for x in group.members] == [
        "expert-0.1", "expert-1.1", "attention-b", "attention-a"]
    assert group.expert_ranks == [0, 1] and group.attention_ids == ["attention-b", "attention-a"]
    assert group.rank_of("attention-a") == 3 and group.rank_of("nobody") is None
    assert set(group.peers_of("attention-b")) == {("h", 100), ("h", 101), ("h", 201)}
    assert not m.needs_new_group()


def test_scale_out_scale_in_and_a_replaced_expert_each_make_a_new_epoch():
    m = Membership(num_expert=2)
    for slot in (0, 1):
        m.join(expert(slot))
    m.join(attention("a"))
    assert m.new_group("gloo", None).epoch == 1
    m.join(attention("b"))  # scale-out
    g2 = m.new_group("gloo", None)
    assert g2.epoch == 2 and g2.attention_ids == ["attention-a", "attention-b"]
    m.leave("attention-a")  # scale-in: still in force until the next group
    assert m.group.rank_of("attention-a") == 2 and m.needs_new_group()
    g3 = m.new_group("gloo", None)
    assert g3.epoch == 3 and g3.attention_ids == ["attention-b"] and "attention-a" not in m.attention
    lost = m.drop("expert-1.1")  # an expert shard died: the group cannot form until its slot is filled
    assert lost.slot == 1 and not m.complete()
    with pytest.raises(AssertionError, match="not all are up"):
        m.new_group("gloo", None)
    m.join(expert(1, incarnation=2))
    g4 = m.new_group("gloo", None)
    assert [x.id for x in g4.members] == ["expert-0.1", "expert-1.2", "attention-b"] and g4.expert_ranks == [0, 1]


def test_a_restarted_coordinator_adopts_the_running_group():
    group = Group(7, (expert(0), expert(1), attention("a")), "gloo", "tcp://h:1")
    m = Membership(num_expert=2)
    m.adopt(group)
    assert m.epoch == 7 and m.complete() and not m.needs_new_group()
    m.adopt(Group(5, (expert(0),), "gloo", None))  # an older group: ignored
    assert m.epoch == 7
    m.join(attention("b"))
    assert m.new_group("gloo", None).epoch == 8


def test_more_and_fewer_expert_shards_make_one_new_epoch_each():
    m = Membership(num_expert=2)
    for slot in (0, 1):
        m.join(expert(slot))
    m.join(attention("a"))
    m.new_group("gloo", None)
    assert m.resize(4, [expert(2), expert(3)]) == [] and m.complete()
    group = m.new_group("gloo", None)
    assert group.epoch == 2 and [x.id for x in group.members] == [
        "expert-0.1", "expert-1.1", "expert-2.1", "expert-3.1", "attention-a"]
    with pytest.raises(AssertionError, match="expert slot 4 of 4"):
        m.join(expert(4))
    gone = m.resize(1)
    assert [x.id for x in gone] == ["expert-1.1", "expert-2.1", "expert-3.1"] and m.complete()
    group = m.new_group("gloo", None)
    assert group.epoch == 3 and group.expert_ranks == [0] and group.attention_ids == ["attention-a"]
    m.resize(2)  # a slot without its shard yet: no group until it joins
    assert not m.complete()
    m.join(expert(1, incarnation=2))
    assert m.complete() and m.next_members()[1].id == "expert-1.2"


def test_member_kinds_are_checked():
    with pytest.raises(AssertionError, match="unknown member kind"):
        Member("x", "router")
    with pytest.raises(AssertionError, match="slot"):
        Member("attention-x", ATTENTION, slot=0)
