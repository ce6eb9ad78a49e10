"""The ``latentmoe`` command: one CLI, subcommands (Typer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="latentmoe: serve DeepSeek-V2-family MoE models on Ray.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@app.command("make-tiny")
def make_tiny_cmd(
    out_dir: Path = typer.Argument(..., help="Directory to write the checkpoint to."),
    seed: int = typer.Option(0, help="Random seed: the same seed writes the same bytes."),
    config: Optional[str] = typer.Option(
        None, help="'tiny' (the default), 'tiny-v3' (DeepSeek-V3's architecture, small), a published config "
                   "('deepseek-v2', 'deepseek-v2-lite', 'deepseek-v3', 'kimi-k2', 'moonlight': full size) or a "
                   "config.json path (random weights of that shape)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    max_shard_size: Optional[int] = typer.Option(None, help="Shard the safetensors at this many bytes."),
    fp8: bool = typer.Option(False, "--fp8", help="Write the linear weights in DeepSeek's FP8 (float8_e4m3fn, "
                                                  "one scale per 128x128 block), as DeepSeek-V3 and Kimi-K2 ship."),
):
    """Write a random-weight DeepSeek-V2/V3-architecture checkpoint in the Hugging Face format."""
    from latentmoe.model.loader import resolve_dtype
    from latentmoe.model.tiny import make_tiny, named_config

    cfg = None
    if config is not None:
        try:
            cfg = json.loads(Path(config).read_text()) if Path(config).exists() else named_config(config)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--config") from None
    make_tiny(out_dir, seed=seed, config=cfg, dtype=resolve_dtype(dtype), max_shard_bytes=max_shard_size,
              fp8_block_size=(128, 128) if fp8 else None)
    typer.echo(f"wrote {out_dir}")


@app.command()
def info(model: Optional[Path] = typer.Option(None, help="Checkpoint directory (default: the built-in tiny model).")):
    """Print a checkpoint's architecture and its latent-cache size per token."""
    from latentmoe.model.config import ModelConfig
    from latentmoe.model.tiny import default_model_dir

    cfg = ModelConfig.from_json(model or default_model_dir())
    layers = cfg.num_hidden_layers
    typer.echo(json.dumps({
        "layers": layers, "moe_layers": len(cfg.moe_layers), "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads, "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
        "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
        "topk_method": cfg.topk_method, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "latent_values_per_token_per_layer": cfg.latent_dim,
        "mha_values_per_token_per_layer": cfg.mha_cache_values_per_token(),
        "latent_cache_bytes_per_token_bf16": cfg.latent_dim * layers * 2,
        "mha_over_latent": round(cfg.mha_cache_values_per_token() / cfg.latent_dim, 2),
    }, indent=2))


@app.command()
def generate(
    prompt: list[str] = typer.Option(["The experts of a mixture"], help="Prompt text (repeat for a batch)."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint directory (default: the built-in tiny model)."),
    max_tokens: int = typer.Option(32, help="Tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, help="0 is greedy."),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0),
    seed: Optional[int] = typer.Option(None),
    dtype: str = typer.Option("float32"),
    attention_shards: Optional[int] = typer.Option(
        None, help="Run disaggregated on the Ray cluster: this many attention shards (default: one process)."),
    expert_shards: Optional[int] = typer.Option(None, help="... and this many expert shards."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: the one on this machine)."),
):
    """Generate from prompts and print the completions (single process, or attention and expert shards on Ray)."""
    import time

    from latentmoe.engine.sampling_params import SamplingParams
    from latentmoe.llm import LLM

    llm = LLM(model=str(model) if model else None, dtype=dtype, attention_shards=attention_shards,
              expert_shards=expert_shards, ray_address=ray_address)
    try:
        if llm.router is not None:
            for role, shards in llm.shards().items():
                for i, shard in enumerate(shards):
                    typer.echo(f"{role} shard {i}: node {shard['node_id'][:12]} pid {shard['pid']}", err=True)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        start = time.perf_counter()
        outs = llm.generate(list(prompt), params)
        elapsed = time.perf_counter() - start
        for p, out in zip(prompt, outs):
            typer.echo(json.dumps({"prompt": p, "text": out.text, "token_ids": out.token_ids,
                                   "finish_reason": out.finish_reason}, ensure_ascii=False))
        n = sum(len(o.token_ids) for o in outs)
        typer.echo(f"{n} tokens in {elapsed:.3f} s; cache: {json.dumps(llm.cache_stats())}", err=True)
        if llm.router is not None:
            stats = llm.dispatch_stats()
            typer.echo(f"expert shards reached per token (histogram): {stats['devices_histogram']}; "
                       f"tokens per expert shard: {stats['tokens_per_shard']}; all-to-all bytes: "
                       f"{stats['a2a_bytes']} (ideal {stats['ideal_bytes']})", err=True)
    finally:
        llm.shutdown()


@app.command()
def serve(
    model: Optional[Path] = typer.Option(None, help="Checkpoint directory (default: the built-in tiny model)."),
    attention_shards: str = typer.Option("1", help="Attention shards (data-parallel, each with its latent cache): "
                                         "N, or MIN:MAX for Serve to autoscale them on load."),
    expert_shards: int = typer.Option(2, help="Expert shards (each a slice of the routed experts)."),
    target_shard_requests: float = typer.Option(16, help="Autoscaling: ongoing requests per attention shard."),
    downscale_delay_s: float = typer.Option(60, help="Autoscaling: how long load stays low before a shard goes."),
    http_port: int = typer.Option(8000, help="OpenAI-compatible HTTP API."),
    grpc_port: int = typer.Option(9000, help="gRPC latentmoe.v1.Generator and grpc.health.v1."),
    host: str = typer.Option("127.0.0.1", help="Where HTTP listens; 0.0.0.0 exposes it to the network."),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu", help="cpu, or cuda (one GPU per shard)."),
    micro_batches: int = typer.Option(0, help="Micro-batches per cluster step: 1, 2 (ping-pong: one runs attention "
                                      "while the other is at the experts), or 0: by batch size (two on CUDA "
                                      "from 4 requests; one on CPU)."),
    prefill_threads: int = typer.Option(0, help="CPU: torch threads for an attention shard's prefill passes (128 "
                                        "tokens or more; decode runs on the shard's own threads). 0: the cores "
                                        "the shard may run on."),
    redundant_experts: int = typer.Option(0, help="Expert load balancing: redundant slots per expert shard, for "
                                          "copies of hot experts."),
    eplb_interval_s: float = typer.Option(0, help="Expert load balancing: how often the coordinator checks the "
                                          "expert shards' imbalance and rebalances when it is over "
                                          "--eplb-threshold (0: only on `latentmoe rebalance`)."),
    eplb_threshold: float = typer.Option(1.2, help="Expert load balancing: max / mean work per expert shard "
                                         "above which the policy rebalances."),
    eplb_mode: str = typer.Option("repack", help="Expert load balancing: 'repack' (DeepSeek's: groups packed onto "
                                  "shards by load, then copies of hot experts) or 'copies' (move only the copies; "
                                  "tokens keep their shards)."),
    expert_shards_policy: Optional[str] = typer.Option(
        None, help="The number of expert shards by a policy, 'module:function', asked every --eplb-interval-s "
        "(built in: latentmoe.cluster.eplb:shards_for_work)."),
    expert_shards_policy_args: str = typer.Option("{}", help="Keyword arguments of the policy, as JSON (e.g. "
                                                  "'{\"target_pairs_per_s\": 5000, \"max_shards\": 8}')."),
    max_expert_shards: Optional[int] = typer.Option(None, help="The most expert shards the local cluster started "
                                                    "when none runs has room for (default: --expert-shards), for "
                                                    "`latentmoe expert-shards` or the policy to grow into."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster (default: the one on this machine; with "
                                              "none running, a local multi-node cluster is started and stopped)."),
    ray_port: int = typer.Option(6379, help="GCS port of the local cluster started when none runs."),
    ray_dashboard: bool = typer.Option(True, help="Ray's dashboard on that cluster's head (about 150 MiB; "
                                       "ray list, Prometheus service discovery)."),
    max_replicas: int = typer.Option(2, help="Autoscaling: most ingress replicas."),
    api_key: Optional[str] = typer.Option(None, envvar="LATENTMOE_API_KEY", show_default=False,
                                          help="Require 'Authorization: Bearer KEY' on /v1/* and on gRPC Generator "
                                               "calls (env LATENTMOE_API_KEY). /health stays open."),
):
    """Serve the OpenAI HTTP API and the gRPC Generate service from a disaggregated cluster (Ray Serve)."""
    import signal
    import threading

    import ray
    from ray import serve as ray_serve
    from ray.serve.config import gRPCOptions

    from latentmoe.actors.cluster import ensure_ray, stop_coordinator
    from latentmoe.actors.serve_app import GRPC_SERVICERS, ServeArgs, build_app

    import json

    echo = lambda m: typer.echo(m, err=True)  # noqa: E731
    try:
        policy_args = json.loads(expert_shards_policy_args)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"--expert-shards-policy-args is not JSON: {e}") from None
    args = {"model": str(model) if model else None, "attention_shards": attention_shards,
            "expert_shards": expert_shards,
            "engine": {"dtype": dtype, "device": device, "micro_batches": micro_batches,
                       "prefill_threads": prefill_threads,
                       "redundant_experts": redundant_experts, "eplb_interval_s": eplb_interval_s,
                       "eplb_threshold": eplb_threshold, "eplb_mode": eplb_mode,
                       "expert_shards_policy": expert_shards_policy, "expert_shards_policy_args": policy_args},
            "max_replicas": max_replicas, "api_key": api_key or None,
            "target_shard_requests": target_shard_requests, "downscale_delay_s": downscale_delay_s}
    try:
        _, most_attention = ServeArgs.from_dict(args).attention_range
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    # the cluster given, or the one on this machine; with none, a local multi-node one that ends with the server
    started_cluster = ensure_ray(ray_address, most_attention, max(expert_shards, max_expert_shards or 0), echo=echo,
                                 record=True, port=ray_port, dashboard=ray_dashboard)
    stop = threading.Event()
    # Ctrl-C from here on stops the server, once the application is up if it comes during the deploy (a SIGINT
    # that came while Serve deployed, before the handler was set, was lost there: the server never stopped)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        ray_serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": http_port},
                        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS))
        ray_serve.run(build_app(args), name="latentmoe", route_prefix="/")
        # HAProxy (RAY_SERVE_ENABLE_HA_PROXY=1 on the local cluster) listens for gRPC on the HTTP host; Ray Serve
        # 2.60's gRPC proxy actor on every interface ([::])
        from latentmoe.actors.local_cluster import serve_env

        haproxy = started_cluster is not None and serve_env()["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        grpc_at = f"{host}:{grpc_port}" if haproxy else f"[::]:{grpc_port}"
        typer.echo(f"serving: http://{host}:{http_port}/v1 (OpenAI API), grpc {grpc_at} (latentmoe.v1.Generator"
                   f"{', through HAProxy' if haproxy else ', all interfaces'}); API key "
                   f"{'required' if api_key else 'not set'}; Ctrl-C stops", err=True)
        stop.wait()
    finally:
        try:
            ray_serve.shutdown()
            stop_coordinator()
        except Exception as e:  # noqa: BLE001 (best effort on the way out)
            typer.echo(f"shutdown: {e!r}", err=True)
        ray.shutdown()
        if started_cluster is not None:
            started_cluster.stop(echo)


@app.command()
def rebalance(
    window_s: float = typer.Option(60, help="Balance the expert load of the last this many seconds."),
    mode: Optional[str] = typer.Option(None, help="'copies' (move only the copies of hot experts) or 'repack' "
                                       "(groups packed onto shards by load too); default: the server's eplb_mode."),
    if_needed: bool = typer.Option(False, "--if-needed", help="Only if the imbalance is over the threshold "
                                   "the server was started with, and the new placement lowers it."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster (default: the one on this machine)."),
    ray_port: int = typer.Option(6379, help="GCS port of the local cluster, when it was started here."),
):
    """Rebalance a running server's expert placement (copies of hot experts, groups packed by load): the
    expert shards load their new slots while serving, then every shard switches at one step boundary."""
    _call_coordinator("rebalance", "rebalance", (not if_needed, window_s, mode), ray_address, ray_port)


@app.command("expert-shards")
def expert_shards(
    num: int = typer.Argument(..., help="The number of expert shards to run."),
    window_s: float = typer.Option(60, help="Place the experts on the new shards by the expert load of the last "
                                   "this many seconds (the start-up placement when nothing was measured)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster (default: the one on this machine)."),
    ray_port: int = typer.Option(6379, help="GCS port of the local cluster, when it was started here."),
):
    """Change a running server's number of expert shards: the new shards start with their slices (Ray's
    autoscaler brings expert nodes for them), the staying ones load theirs while serving, then every shard
    switches at one step boundary and the shards no longer needed stop."""
    _call_coordinator("expert-shards", "scale_experts", (num, window_s), ray_address, ray_port)


def _call_coordinator(command: str, method: str, args: tuple, ray_address: Optional[str], ray_port: int) -> None:
    """Call a running server's coordinator and print its JSON answer; exit 1 with the reason on an error."""
    import json

    import ray

    from latentmoe.actors.cluster import ensure_ray
    from latentmoe.actors.names import COORDINATOR_NAME, ROUTER_NAMESPACE

    try:
        ensure_ray(ray_address, port=ray_port, start=False)
        coordinator = ray.get_actor(COORDINATOR_NAME, namespace=ROUTER_NAMESPACE)
    except (RuntimeError, ValueError) as e:
        typer.echo(f"{command}: {e}", err=True)
        raise typer.Exit(1) from None
    try:
        report = ray.get(getattr(coordinator, method).remote(*args), timeout=600)
    except ray.exceptions.RayTaskError as e:
        typer.echo(f"{command}: {e.cause!r}" if getattr(e, "cause", None) else f"{command}: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(report, indent=2))


from latentmoe.loadtest.cli import loadtest  # noqa: E402 (imports its pieces lazily)

app.command("loadtest")(loadtest)

cluster_app = typer.Typer(help="A local multi-node Ray cluster on this machine (attention and expert nodes).",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


def _auth_mode_option():
    return typer.Option(None, "--ray-auth", show_default=False,
                        help="Ray's token authentication on every node: 'token' (the default, also when "
                             "RAY_AUTH_MODE is unset) or 'disabled' (also RAY_AUTH_MODE=disabled).")


@cluster_app.command("start")
def cluster_start(
    attention_nodes: int = typer.Option(1, help="Worker nodes advertising attention_node."),
    expert_nodes: int = typer.Option(2, help="Worker nodes advertising expert_node."),
    shards_per_node: int = typer.Option(2, help="Shards each worker node can hold (its role resource)."),
    cpus_per_node: Optional[int] = typer.Option(None, help="Logical CPUs each worker node advertises "
                                                "(default: one per shard)."),
    port: int = typer.Option(6379, help="The head node's GCS port."),
    dashboard: bool = typer.Option(True, help="Run Ray's dashboard on the head (ray list, Prometheus discovery)."),
    ray_auth: Optional[str] = _auth_mode_option(),
):
    """Start a Ray head and worker nodes on this machine, each worker advertising its role."""
    from latentmoe.actors.local_cluster import start_local_cluster

    cluster = start_local_cluster(attention_nodes, expert_nodes, shards_per_node=shards_per_node,
                                  cpus_per_node=cpus_per_node, port=port, dashboard=dashboard, auth_mode=ray_auth,
                                  echo=lambda m: typer.echo(m, err=True))
    typer.echo(f"for `ray status`, `ray list actors` and other Ray clients: eval \"$(latentmoe cluster env"
               f"{'' if port == 6379 else f' --port {port}'})\"", err=True)
    typer.echo(cluster.address)


def _recorded_cluster(port: int):
    from latentmoe.actors.local_cluster import find_local_cluster

    cluster = find_local_cluster(port)
    if cluster is None:
        typer.echo(f"no cluster started by `latentmoe cluster start` runs on port {port}", err=True)
        raise typer.Exit(1)
    return cluster


@cluster_app.command("env")
def cluster_env(port: int = typer.Option(6379, help="The head node's GCS port.")):
    """Print the shell exports that make Ray's own tools (ray status, ray list) clients of the local cluster."""
    import shlex

    cluster = _recorded_cluster(port)
    for key, value in {**cluster.env, "RAY_ADDRESS": cluster.address}.items():
        typer.echo(f"export {key}={shlex.quote(value)}")


@cluster_app.command("stop")
def cluster_stop(port: int = typer.Option(6379, help="The head node's GCS port.")):
    """Stop the cluster `latentmoe cluster start` started (only its processes; other Ray clusters go on)."""
    _recorded_cluster(port).stop(echo=lambda m: typer.echo(m, err=True))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
