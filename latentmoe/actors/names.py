"""Names shared by processes that must not import the engine (Serve's gRPC proxy imports this)."""

ROUTER_NAMESPACE = "latentmoe"  # the Ray namespace of coordinators and expert shards (detached, named)
INGRESS_DEPLOYMENT = "LatentMoEServer"  # the Serve deployment of latentmoe.actors.serve_app
ATTENTION_DEPLOYMENT = "AttentionShard"  # the Serve deployment of attention shards (latentmoe.actors.attention_shard)
COORDINATOR_NAME = "latentmoe-coordinator"  # the default name of the coordinator (detached, in ROUTER_NAMESPACE)
