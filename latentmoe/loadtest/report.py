"""A run's result on paper: the text summary printed at the end, ``result.json``, PNG plots and
``report.html`` (one file, the plots embedded). Takes the result dict of ``run_loadtest``; no network.

Plots use matplotlib's object API (``Figure``, no pyplot), so nothing here touches a display or a
global backend.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import jinja2
import numpy as np

from latentmoe.loadtest.metrics import RequestResult, request_itls

LATENCIES = (("ttft_ms", "Time to first token", "TTFT"), ("tpot_ms", "Time per output token (excl. 1st)", "TPOT"),
             ("itl_ms", "Inter-token latency", "ITL"), ("e2e_ms", "End-to-end latency", "E2E"))


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def target_line(config: dict) -> str:
    t = config["target"]
    where = t["url"] or f"grpc://{t['grpc']}"
    door = t["endpoint"] if t["url"] else "GenerateStream" if t["stream"] else "Generate"
    s = config["schedule"]
    how = (f"concurrency {s['concurrency']}" if s["concurrency"] else
           f"{s['request_rate']} req/s Poisson" + (f", max concurrency {s['max_concurrency']}"
                                                    if s["max_concurrency"] else ""))
    return f"{where} ({door}, {'stream' if t['stream'] else 'no stream'}), {how}"


def format_summary(result: dict) -> str:
    """The figures llmperf and vLLM's serving benchmark print, and the expert load of the run."""
    s, config = result["summary"], result["config"]
    width = 56
    lines = [" Load test result ".center(width, "="),
             f"{'Target:':<36}{target_line(config)}",
             f"{'Model:':<36}{config['target']['model'] or '(the server default)'}"]

    def row(name, value, digits=2):
        lines.append(f"{name:<44}{_fmt(value, digits):>12}")

    row("Requests sent:", s["num_requests"])
    row("Requests completed:", s["num_completed"])
    row("Errors:", s["num_errors"])
    row("Error rate (%):", 100.0 * s["error_rate"])
    row("Duration (s):", s["duration_s"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total output tokens:", s["total_output_tokens"])
    row("Completed with fewer tokens than asked:", s["num_short_outputs"])
    row("Request throughput (req/s):", s["request_throughput"])
    row("Input token throughput (tok/s):", s["input_token_throughput"])
    row("Output token throughput (tok/s):", s["output_token_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    for key, title, short in LATENCIES:
        lines.append(f" {title} ".center(width, "-"))
        for stat in ("mean", "p50", "p90", "p99"):
            row(f"{stat.capitalize() if stat == 'mean' else stat.upper()} {short} (ms):", s[key][stat])
    if s["errors"]:
        lines.append(" Errors ".center(width, "-"))
        for message, count in s["errors"].items():
            lines.append(f"{count:>6} x {message[:width + 40]}")
    lines.append(" Expert load ".center(width, "-"))
    lines += expert_load_lines(result["expert_load"])
    lines.append("=" * width)
    return "\n".join(lines)


def expert_load_lines(load: dict) -> list[str]:
    if not load["available"]:
        return [f"not available: {load['reason']}"]
    e = load["summary"]
    layers = ", ".join(f"{k}: {v:.2f}" for k, v in e["imbalance_per_layer"].items())
    hottest = ", ".join(f"L{h['layer']}/E{h['expert']} ({h['tokens']})" for h in e["hottest_experts"][:5])
    histogram = " ".join(f"{i}:{n}" for i, n in enumerate(e["devices_histogram"]))
    return [f"{'Window (s), token-layer pairs:':<36}{e['window_s']}, {_fmt(e['num_tokens'])}",
            f"{'Imbalance per layer (max/mean):':<36}{layers or 'n/a'}",
            f"{'Shard imbalance (max/mean):':<36}{_fmt(e['shard_imbalance'])}",
            f"{'Tokens per shard:':<36}{e['tokens_per_shard']}",
            f"{'Hottest experts (layer/expert):':<36}{hottest or 'n/a'}",
            f"{'Devices per token (mean):':<36}{_fmt(e['mean_devices_per_token'])}",
            f"{'Devices per token (histogram):':<36}{histogram or 'n/a'}",
            f"{'All-to-all bytes / ideal:':<36}{_fmt(e['a2a_over_ideal'])}",
            f"{'Expert placement (version, copies):':<36}{_fmt(e.get('placement_version'))}, "
            f"{_fmt(e.get('placement_copies'))}",
            f"{'Placement changes in the run:':<36}" + (", ".join(
                _placement_change(c) for c in e.get("placement_changes") or []) or "none")]


# ---- plots -----------------------------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 3.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_distribution(values_ms: list[float], figures: dict, title: str, path: Path) -> None:
    fig = _figure()
    ax = fig.subplots()
    values = np.asarray(values_ms, dtype=float)
    if values.size:
        low, high = float(values.min()), float(values.max())
        if high - low < 1e-6 * max(1.0, abs(high)):  # (nearly) all equal: numpy cannot cut that range into bins
            low, high = low - 0.5, high + 0.5
        ax.hist(values, bins=min(50, max(5, int(math.sqrt(values.size)))), range=(low, high), color="#4c72b0",
                alpha=0.85)
        for stat, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
            if figures.get(stat) is not None:
                ax.axvline(figures[stat], color="#c44e52", linestyle=style, label=f"{stat} {figures[stat]:.1f} ms")
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{title} ({values.size} samples)")
    ax.set_xlabel("ms")
    ax.set_ylabel("count")
    fig.savefig(path)


def plot_throughput(series: dict, path: Path) -> None:
    fig = _figure(7.0, 5.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    t = np.asarray(series["t"]) + series["bin_s"] / 2
    top.plot(t, series["output_tokens_per_s"], color="#4c72b0", marker=".")
    top.set_ylabel("output tokens / s")
    top.set_title(f"Throughput over time ({series['bin_s']:.2f} s bins)")
    ends = np.asarray(series["t"]) + series["bin_s"]
    completed = np.cumsum(series["completed_per_s"]) * series["bin_s"]
    failed = np.cumsum(series["failed_per_s"]) * series["bin_s"]
    bottom.step(ends, completed, where="pre", color="#55a868", label="completed (total)")
    bottom.step(ends, failed, where="pre", color="#c44e52", label="failed (total)")
    bottom.step(np.asarray(series["t"]), series["in_flight"], where="post", color="#8172b2", label="in flight")
    bottom.set_xlabel("seconds since start")
    bottom.set_ylabel("requests")
    bottom.legend(loc="best")
    fig.savefig(path)


def plot_expert_heatmap(data: dict, path: Path) -> None:
    per_layer = data["tokens_per_expert"]  # {layer: [E]}
    layers = sorted(per_layer, key=int)
    counts = np.asarray([per_layer[k] for k in layers], dtype=float)  # [L, E]
    fig = _figure(7.0, 1.2 + 0.35 * len(layers))
    ax = fig.subplots()
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(layers)), [f"layer {k}" for k in layers])
    ax.set_xlabel("expert")
    ax.set_title("Tokens per (layer, expert)")
    fig.colorbar(image, ax=ax, label="tokens")
    fig.savefig(path)


def plot_shards(data: dict, path: Path) -> None:
    fig = _figure(7.0, 3.2)
    left, right = fig.subplots(1, 2)
    shards = data.get("tokens_per_shard") or []
    left.bar(range(len(shards)), shards, color="#4c72b0")
    left.set_xticks(range(len(shards)))
    left.set_xlabel("expert shard")
    left.set_ylabel("tokens, summed over MoE layers")
    left.set_title("Tokens per expert shard")
    histogram = data.get("devices_histogram") or []
    right.bar(range(len(histogram)), histogram, color="#dd8452")
    right.set_xticks(range(len(histogram)))
    right.set_xlabel("expert shards reached")
    right.set_ylabel("(token, MoE layer) pairs")
    right.set_title("Expert shards reached per token")
    fig.savefig(path)


def write_plots(result: dict, out_dir: Path, results: list[RequestResult] | None = None) -> list[Path]:
    """The PNGs of a run; the ITL one needs the raw ``results`` (else it is empty), the expert-load ones
    the server's expert load."""
    requests = [r for r in result["requests"] if r["ok"]]
    ttft_ms = [r["ttft"] * 1e3 for r in requests if r["ttft"] is not None]
    itl_ms = [x * 1e3 for r in results or [] for x in request_itls(r)]
    paths = []
    for name, key, title, values in (
            ("ttft.png", "ttft_ms", "Time to first token", ttft_ms),
            ("itl.png", "itl_ms", "Inter-token latency (per output token)", itl_ms),
            ("e2e.png", "e2e_ms", "End-to-end latency", [r["e2e"] * 1e3 for r in requests])):
        plot_distribution(values, result["summary"][key], title, out_dir / name)
        paths.append(out_dir / name)
    plot_throughput(result["timeseries"], out_dir / "throughput.png")
    paths.append(out_dir / "throughput.png")
    load = result["expert_load"]
    if load["available"] and load["data"].get("tokens_per_expert"):
        plot_expert_heatmap(load["data"], out_dir / "expert_load.png")
        paths.append(out_dir / "expert_load.png")
    if load["available"] and (load["data"].get("tokens_per_shard") or load["data"].get("devices_histogram")):
        plot_shards(load["data"], out_dir / "shard_load.png")
        paths.append(out_dir / "shard_load.png")
    return paths


# ---- files -----------------------------------------------------------------------------------------------------

HTML = jinja2.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>latentmoe load test</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 960px; color: #222; }
 table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
 td, th { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
 td:first-child, th:first-child { text-align: left; }
 img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
 .note { color: #a33; }
 code { background: #f4f4f4; padding: 0 0.2em; }
</style></head><body>
<h1>Load test</h1>
<p><code>{{ target }}</code><br>model <code>{{ model }}</code></p>
<h2>Summary</h2>
<table>
{% for name, value in overview %}<tr><td>{{ name }}</td><td>{{ value }}</td></tr>
{% endfor %}</table>
<h2>Latency (ms)</h2>
<table><tr><th></th><th>mean</th><th>p50</th><th>p90</th><th>p99</th><th>max</th><th>samples</th></tr>
{% for name, f in latencies %}<tr><td>{{ name }}</td><td>{{ fmt(f.mean) }}</td><td>{{ fmt(f.p50) }}</td>
<td>{{ fmt(f.p90) }}</td><td>{{ fmt(f.p99) }}</td><td>{{ fmt(f.max) }}</td><td>{{ f.count }}</td></tr>
{% endfor %}</table>
<h2>Errors</h2>
{% if errors %}<table><tr><th>status: message</th><th>count</th></tr>
{% for message, count in errors.items() %}<tr><td>{{ message }}</td><td>{{ count }}</td></tr>{% endfor %}
</table>{% else %}<p>none</p>{% endif %}
<h2>Expert load</h2>
{% if load.available %}
<table>
<tr><td>window (s)</td><td>{{ load.summary.window_s }}</td></tr>
<tr><td>(token, MoE layer) pairs routed</td><td>{{ fmt(load.summary.num_tokens) }}</td></tr>
<tr><td>shard imbalance (max / mean)</td><td>{{ fmt(load.summary.shard_imbalance) }}</td></tr>
<tr><td>devices per token (mean)</td><td>{{ fmt(load.summary.mean_devices_per_token) }}</td></tr>
<tr><td>all-to-all bytes / ideal</td><td>{{ fmt(load.summary.a2a_over_ideal) }}</td></tr>
</table>
<table><tr><th>layer</th><th>imbalance (max / mean tokens per expert)</th></tr>
{% for layer, value in load.summary.imbalance_per_layer.items() %}<tr><td>{{ layer }}</td><td>{{ fmt(value) }}</td></tr>
{% endfor %}</table>
<table><tr><th>hottest experts</th><th>layer</th><th>expert</th><th>tokens</th></tr>
{% for h in load.summary.hottest_experts %}<tr><td>{{ loop.index }}</td><td>{{ h.layer }}</td><td>{{ h.expert }}</td>
<td>{{ h.tokens }}</td></tr>{% endfor %}</table>
{% else %}<p class="note">Not available: {{ load.reason }}</p>{% endif %}
<h2>Plots</h2>
{% for name, data in images %}<img alt="{{ name }}" src="data:image/png;base64,{{ data }}">
{% endfor %}
</body></html>
""", autoescape=True)


def write_html(result: dict, images: list[Path], path: Path) -> None:
    s = result["summary"]
    counts = f"{s['num_requests']} / {s['num_completed']} / {s['num_errors']}"
    overview = [("requests sent / completed / errors", counts),
                ("error rate", f"{100 * s['error_rate']:.2f} %"), ("duration (s)", _fmt(s["duration_s"])),
                ("request throughput (req/s)", _fmt(s["request_throughput"])),
                ("output token throughput (tok/s)", _fmt(s["output_token_throughput"])),
                ("input token throughput (tok/s)", _fmt(s["input_token_throughput"])),
                ("total input / output tokens", f"{s['total_input_tokens']:,} / {s['total_output_tokens']:,}"),
                ("completed with fewer tokens than asked", s["num_short_outputs"])]
    html = HTML.render(
        target=target_line(result["config"]), model=result["config"]["target"]["model"] or "(the server default)",
        overview=overview, latencies=[(title, s[key]) for key, title, _ in LATENCIES], errors=s["errors"],
        load=result["expert_load"], fmt=_fmt,
        images=[(p.stem, base64.b64encode(p.read_bytes()).decode("ascii")) for p in images])
    path.write_text(html)


def write_report(result: dict, out_dir: str | Path, results: list[RequestResult] | None = None) -> list[Path]:
    """``result.json``, the PNGs and ``report.html`` in ``out_dir`` (created); the paths written.
    ``results`` (the raw per-request results) give the ITL plot its samples."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = write_plots(result, out_dir, results)
    (out_dir / "report.html").write_text("")  # listed in result.json, written last
    files = [out_dir / "result.json", *images, out_dir / "report.html"]
    result = {**result, "files": [p.name for p in files]}
    (out_dir / "result.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    write_html(result, images, out_dir / "report.html")
    return files


def _placement_change(c: dict) -> str:
    if c.get("kind") == "expert_shards":
        what = f"{c.get('expert_shards_before')} -> {c.get('expert_shards')} expert shards"
    else:
        what = f"imbalance {_fmt(c.get('imbalance_before'))} -> {_fmt(c.get('imbalance_predicted'))}"
    return f"v{c['version']} ({what}, {_fmt(c.get('total_s'))} s)"
