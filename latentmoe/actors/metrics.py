"""The Prometheus metrics, through ``ray.util.metrics`` (Ray exports them from every node's metrics
port, prefixed ``ray_``). Few labels: per shard, per MoE layer, per devices-reached count; the full
(layer x expert) counts stay out of Prometheus and are served as JSON (``/v1/expert-load``).
"""

from __future__ import annotations

from ray.util import metrics

_LATENCY_BOUNDARIES = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60]


def requests_counter() -> metrics.Counter:
    """Requests by how they ended: the router counts those it saw; the ingress those it refused first (invalid)."""
    return metrics.Counter("latentmoe_requests_total", "Requests that ended, by status (stop, length, abort, error, "
                           "overloaded, invalid).", tag_keys=("status",))


class ServingMetrics:
    """The ingress's: how requests went, as its clients saw them."""

    def __init__(self):
        self.requests = requests_counter()
        self.ttft = metrics.Histogram("latentmoe_time_to_first_token_seconds", "Admission to first token.",
                                      boundaries=_LATENCY_BOUNDARIES)
        self.itl = metrics.Histogram("latentmoe_inter_token_latency_seconds", "Time between output tokens.",
                                     boundaries=[0.001, 0.002] + _LATENCY_BOUNDARIES[:9])
        self.e2e = metrics.Histogram("latentmoe_e2e_request_latency_seconds", "Admission to last token.",
                                     boundaries=_LATENCY_BOUNDARIES)
        self.prompt_tokens = metrics.Counter("latentmoe_prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = metrics.Counter("latentmoe_generation_tokens_total", "Tokens generated.")
        self.moved = metrics.Counter("latentmoe_requests_moved_total",
                                     "Requests handed to another attention shard (theirs died or drained), "
                                     "recomputed there.")


class ShardMetrics:
    """An attention shard's: its queue and its latent cache."""

    def __init__(self):
        self.waiting = metrics.Gauge("latentmoe_num_requests_waiting", "Requests queued on attention shards.")
        self.running = metrics.Gauge("latentmoe_num_requests_running", "Requests running on attention shards.")
        self.cache_usage = metrics.Gauge("latentmoe_latent_cache_usage_ratio",
                                         "Used fraction of an attention shard's latent cache blocks.",
                                         tag_keys=("shard",))


class ClusterMetrics:
    """The coordinator's: membership, faults, expert load."""

    def __init__(self):
        self.live_shards = metrics.Gauge("latentmoe_live_shards", "Shards in the collective group, by kind.",
                                         tag_keys=("kind",))
        self.scale_outs = metrics.Counter("latentmoe_scale_outs_total", "Attention shards that joined a running "
                                          "group (scale-out or replacement).")
        self.scale_ins = metrics.Counter("latentmoe_scale_ins_total", "Attention shards that drained and left.")
        self.shard_tokens = metrics.Counter("latentmoe_expert_shard_tokens_total",
                                            "Tokens dispatched to an expert shard (once per token per layer).",
                                            tag_keys=("shard",))
        self.layer_imbalance = metrics.Gauge("latentmoe_expert_imbalance",
                                             "Max over mean tokens per expert in an MoE layer, last 10 s "
                                             "(0: no tokens).",
                                             tag_keys=("layer",))
        self.shard_imbalance = metrics.Gauge("latentmoe_expert_shard_imbalance",
                                             "Max over mean tokens per expert shard, last 10 s.")
        self.devices = metrics.Counter("latentmoe_tokens_by_devices_total",
                                       "Token-layer dispatches by the number of expert shards reached.",
                                       tag_keys=("devices",))
        self.a2a_bytes = metrics.Counter("latentmoe_all_to_all_bytes_total",
                                         "Bytes the communicators moved to and back from expert shards "
                                         "(hidden states and routing).")
        self.shard_faults = metrics.Counter("latentmoe_shard_faults_total",
                                            "Shards that died or hung in a step, by kind (attention, expert).",
                                            tag_keys=("kind",))
        self.shard_work_imbalance = metrics.Gauge("latentmoe_expert_shard_work_imbalance",
                                                  "Max over mean (token, expert) pairs computed per expert shard, "
                                                  "last 10 s.")
        self.placement_version = metrics.Gauge("latentmoe_expert_placement_version",
                                               "Version of the expert placement in force.")
        self.expert_copies = metrics.Gauge("latentmoe_expert_copies", "Redundant expert copies in the placement.")
        self.rebalances = metrics.Counter("latentmoe_expert_rebalances_total",
                                          "Expert placement changes applied (rebalancing).")
        self.rebalance_seconds = metrics.Gauge("latentmoe_expert_rebalance_seconds",
                                               "Time the latest rebalance took, from plan to switch.")
        self.expert_shard_changes = metrics.Counter("latentmoe_expert_shard_changes_total",
                                                    "Changes of the number of expert shards under traffic.")
        self.recoveries = metrics.Counter("latentmoe_recoveries_total",
                                          "Faults recovered from: shards replaced, group re-formed, requests kept.")
