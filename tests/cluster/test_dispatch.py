"""Dispatch planning, placement and the communicators, without Ray."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.multiprocessing as mp

from latentmoe.cluster.communicator import GlooCommunicator, free_port
from latentmoe.cluster.dispatch import plan_dispatch
from latentmoe.cluster.placement import ExpertPlacement
from latentmoe.model.config import ModelConfig
from latentmoe.model.tiny import TINY_CONFIG


def test_each_token_goes_once_to_each_device_it_needs():
    cfg = ModelConfig.from_dict(TINY_CONFIG)  # 16 experts, 4 groups of 4, top-2 groups
    placement = ExpertPlacement.build(cfg, 2)
    shard_of, slot_of = placement.tensors()
    topk_ids = torch.tensor([[0, 1, 8, 9], [4, 5, 6, 7], [15, 14, 13, 12]])  # shards {0,1}, {0}, {1}
    weights = torch.rand(3, 4) + 0.1
    plan = plan_dispatch(topk_ids, weights, shard_of, slot_of, 2)
    assert plan.send_counts == [2, 2] and plan.devices_per_token.tolist() == [2, 1, 1]
    assert plan.token_index.tolist() == [0, 1, 0, 2]
    # on shard 0, token 0 computes experts 0 and 1 (slots 0, 1); 8 and 9 live on shard 1
    assert plan.slot_ids[0].tolist() == [0, 1, -1, -1]
    assert plan.slot_ids[2].tolist() == [-1, -1, 0, 1]  # experts 8, 9 are slots 0, 1 of shard 1
    assert torch.equal(plan.weights[0], weights[0])


@pytest.mark.parametrize("num_shards,limit", [(1, 2), (2, 2), (4, 2), (8, 4)])
def test_groups_are_placed_whole(num_shards, limit):
    cfg = ModelConfig.from_dict(TINY_CONFIG)
    placement = ExpertPlacement.build(cfg, num_shards)
    assert placement.max_devices_per_token == min(limit, num_shards)
    if num_shards <= cfg.n_group:
        for g in range(cfg.n_group):
            group = range(g * cfg.experts_per_group, (g + 1) * cfg.experts_per_group)
            assert len({placement.shard_of_expert[e] for e in group}) == 1
    assert sorted(e for s in range(num_shards) for e in placement.experts_on(s)) == list(range(16))


def test_placement_rejects_what_cannot_hold_groups_whole():
    cfg = ModelConfig.from_dict(TINY_CONFIG)
    with pytest.raises(ValueError, match="cannot hold 4 expert groups whole"):
        ExpertPlacement.build(cfg, 3)
    greedy = copy.deepcopy(TINY_CONFIG) | dict(topk_method="greedy", n_group=None, topk_group=None)
    assert ExpertPlacement.build(ModelConfig.from_dict(greedy), 3).max_devices_per_token is None
    with pytest.raises(ValueError, match="expert shards must be in"):
        ExpertPlacement.build(cfg, 17)


def _all_to_all_worker(rank, world, address, results):
    comm = GlooCommunicator(rank, world, address, timeout_s=30)
    # rank r sends (r + 1) * dest rows to rank dest (rank 0 sends nothing to anyone): uneven and empty splits
    send_splits = [0 if rank == 0 else (rank + 1) * dest for dest in range(world)]
    send = torch.cat([torch.full((n, 2), float(10 * rank + dest)) for dest, n in enumerate(send_splits)])
    recv_splits = comm.exchange_counts(send_splits)
    out = comm.all_to_all(send, send_splits, recv_splits)
    results[rank] = (recv_splits, out[:, 0].tolist())
    comm.close()


def test_gloo_all_to_all_uneven_splits():
    world = 3
    address = f"tcp://127.0.0.1:{free_port()}"
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_all_to_all_worker, args=(world, address, results), nprocs=world, start_method="fork")
        results = dict(results)
    for rank in range(world):
        expected_splits = [0 if src == 0 else (src + 1) * rank for src in range(world)]
        recv_splits, values = results[rank]
        assert recv_splits == expected_splits
        assert values == [float(10 * src + rank) for src in range(world) for _ in range(expected_splits[src])]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and CuPy")
def test_nccl_one_rank_group():
    pytest.importorskip("cupy")
    from latentmoe.cluster.communicator import NcclCommunicator

    comm = NcclCommunicator(0, 1, NcclCommunicator.new_unique_id(), device=0)
    send = torch.randn(5, 3, device="cuda")
    assert comm.exchange_counts([5]) == [5]
    assert torch.equal(comm.all_to_all(send, [5], [5]), send)
    comm.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_and_metadata_travel_packed(dtype):
    from latentmoe.cluster.dispatch import pack_rows, unpack_rows

    hidden = torch.randn(5, 6).to(dtype)
    meta = torch.cat([torch.tensor([[0, -1, 3]] * 5).float(), torch.rand(5, 3)], dim=1)
    back_hidden, back_meta = unpack_rows(pack_rows(hidden, meta), 6, dtype)
    assert torch.equal(back_hidden, hidden) and torch.equal(back_meta, meta)
    assert torch.equal(unpack_rows(pack_rows(hidden[:0], meta[:0]), 6, dtype)[0], hidden[:0])
