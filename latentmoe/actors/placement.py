"""Where shards go: nodes say what they are with custom resources, and shards ask for them.

``ray start --resources='{"attention_node": 8}'`` on an attention node, ``expert_node`` on an expert node
(one unit per shard the node can hold, usually its GPU count). Attention shards (Serve replicas, or the
offline ``LLM``'s actors) ask for one ``attention_node`` unit, expert shards for one ``expert_node`` unit,
so that Ray's autoscaler launches the right node type for each. A cluster with no such nodes gets every
shard wherever there is room, with a warning (``latentmoe.actors.cluster.has_role_nodes``).

A role node also carries the node label ``latentmoe.io/role`` (``attention`` / ``expert``:
``ray start --labels=latentmoe.io/role=attention``), so that what must outlive a shard's node (the ingress
replicas) can ask for any other node by label (``off_shard_nodes``). A resource cannot say "not here"; a
label selector can.
"""

ATTENTION_RESOURCE = "attention_node"
EXPERT_RESOURCE = "expert_node"
ROLE_LABEL = "latentmoe.io/role"
ROLE_NAMES = {ATTENTION_RESOURCE: "attention", EXPERT_RESOURCE: "expert"}


def role_labels(role: str) -> dict[str, str]:
    """The node labels of a node in ``role`` (``ATTENTION_RESOURCE`` / ``EXPERT_RESOURCE``)."""
    return {ROLE_LABEL: ROLE_NAMES[role]}


def role_node(role: str, units: int) -> dict:
    """What a node in ``role`` holding ``units`` shards advertises: ``{"resources": ..., "labels": ...}``, as
    ``Cluster.add_node`` takes them."""
    return {"resources": {role: units}, "labels": role_labels(role)}


def off_shard_nodes() -> dict:
    """Ray actor options that put an actor on a node without a shard role (by its ``ROLE_LABEL``; a node with
    no label counts as one without a role), or, when no such node can take it, on any node: an ingress replica
    placed on a shard's node would die with that node and take its streams with it."""
    return {"label_selector": {ROLE_LABEL: f"!in({','.join(ROLE_NAMES.values())})"},
            "fallback_strategy": [{"label_selector": {}}]}
