"""Names shared by processes that must not import the engine (Serve's gRPC proxy imports this)."""

ROUTER_NAMESPACE = "latentmoe"  # the Ray namespace of the routers (detached, named actors)
INGRESS_DEPLOYMENT = "LatentMoEServer"  # the Serve deployment of latentmoe.actors.serve_app
