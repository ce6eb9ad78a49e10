"""Where shards go: nodes say what they are with custom resources, and shards ask for them.

``ray start --resources='{"attention_node": 8}'`` on an attention node, ``expert_node`` on an expert node
(one unit per shard the node can hold, usually its GPU count). Attention shards (Serve replicas, or the
offline ``LLM``'s actors) ask for one ``attention_node`` unit, expert shards for one ``expert_node`` unit,
so that Ray's autoscaler launches the right node type for each. A cluster with no such nodes gets every
shard wherever there is room, with a warning (``latentmoe.actors.cluster.has_role_nodes``).
"""

ATTENTION_RESOURCE = "attention_node"
EXPERT_RESOURCE = "expert_node"
