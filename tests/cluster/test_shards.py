"""The plain helpers of the shard classes (the shards themselves are exercised through the cluster tests)."""

import pytest

from latentmoe.cluster.shards import PREFILL_MIN_TOKENS, max_lanes, pass_threads, shard_threads, split_chunks


def test_shard_threads_follow_the_bundle():
    assert shard_threads(1.0, cores=16) == 1
    assert shard_threads(4.0, cores=16) == 4
    assert shard_threads(2.5, cores=16) == 2  # whole CPUs only
    assert shard_threads(0.5, cores=16) == 1  # at least one
    assert shard_threads(None, cores=16) == 1  # an actor given no CPU
    assert shard_threads(8.0, cores=2) == 2  # never more than the cores the process may use


def test_prefill_passes_take_the_prefill_threads():
    assert pass_threads(16, own=1, prefill=2) == 1  # a decode pass: the shard's own
    assert pass_threads(PREFILL_MIN_TOKENS - 1, own=1, prefill=2) == 1
    assert pass_threads(PREFILL_MIN_TOKENS, own=1, prefill=2) == 2
    assert pass_threads(2048, own=4, prefill=2) == 4  # never fewer than the shard's own


def test_prefill_threads_setting():
    from latentmoe.engine.engine_config import EngineConfig

    assert EngineConfig(model="m").prefill_threads == 0  # the cores the shard may run on
    assert EngineConfig(model="m", prefill_threads=3).prefill_threads == 3
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="prefill_threads must be a non-negative integer"):
            EngineConfig(model="m", prefill_threads=bad)


def test_split_chunks_keeps_order_and_balances_tokens():
    from latentmoe.engine.scheduler import Chunk

    def chunks(*sizes):
        return [Chunk(seq=None, start=0, num_tokens=n, sample=True) for n in sizes]

    whole = chunks(128, 1, 1, 1, 64, 1)
    first, second = split_chunks(whole, 2)
    assert first + second == whole  # contiguous, in order: the logits keep the chunks' order
    assert [c.num_tokens for c in first] == [128] and sum(c.num_tokens for c in second) == 68
    first, second = split_chunks(chunks(*[1] * 7), 2)
    assert (len(first), len(second)) == (3, 4)
    assert split_chunks(chunks(5), 2) == [chunks(5), []]  # one chunk: the second lane only joins the exchanges
    assert split_chunks(whole, 1) == [whole]


def test_max_lanes_by_setting_and_device():
    from latentmoe.engine.engine_config import EngineConfig

    assert max_lanes(EngineConfig(model="m", micro_batches=1)) == 1
    assert max_lanes(EngineConfig(model="m", micro_batches=2)) == 2
    assert max_lanes(EngineConfig(model="m", micro_batches=0)) == 1  # CPU: measured slower with two
    assert max_lanes(EngineConfig(model="m", micro_batches=0, device="cuda")) == 2
    with pytest.raises(ValueError, match="micro_batches must be"):
        EngineConfig(model="m", micro_batches=3)
