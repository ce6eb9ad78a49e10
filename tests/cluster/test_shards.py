"""The plain helpers of the shard classes (the shards themselves are exercised through the cluster tests)."""

from latentmoe.cluster.shards import shard_threads


def test_shard_threads_follow_the_bundle():
    assert shard_threads(1.0, cores=16) == 1
    assert shard_threads(4.0, cores=16) == 4
    assert shard_threads(2.5, cores=16) == 2  # whole CPUs only
    assert shard_threads(0.5, cores=16) == 1  # at least one
    assert shard_threads(None, cores=16) == 1  # an actor given no CPU
    assert shard_threads(8.0, cores=2) == 2  # never more than the cores the process may use
