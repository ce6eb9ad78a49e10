"""``latentmoe loadtest``: the command line of a load test (registered in ``latentmoe.cli``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

import typer

DEFAULT_NUM_REQUESTS = 100
DEFAULT_CONCURRENCY = 4


def loadtest(
    url: Optional[str] = typer.Option(None, help="HTTP base of the server, e.g. http://127.0.0.1:8000."),
    grpc: Optional[str] = typer.Option(None, "--grpc", help="Test the gRPC door instead: HOST:PORT."),
    http_url: Optional[str] = typer.Option(
        None, help="With --grpc: the HTTP base to ask for the model list and the expert load "
                   "(default: the server's model, and gRPC GetExpertLoad)."),
    model: Optional[str] = typer.Option(None, help="Model name (default: the first of GET /v1/models)."),
    endpoint: str = typer.Option("completions", help="HTTP: 'completions' (token-id prompts) or 'chat' (words)."),
    concurrency: Optional[int] = typer.Option(
        None, help=f"Closed loop: requests in flight (default {DEFAULT_CONCURRENCY} without --request-rate)."),
    request_rate: Optional[float] = typer.Option(
        None, help="Open loop: Poisson arrivals at this many requests/s ('inf': all at once)."),
    max_concurrency: Optional[int] = typer.Option(None, help="Open loop: at most this many in flight."),
    num_requests: Optional[int] = typer.Option(
        None, help=f"Requests to send (default {DEFAULT_NUM_REQUESTS} without --duration)."),
    duration: Optional[float] = typer.Option(None, help="Stop sending after this many seconds."),
    input_len: int = typer.Option(128, help="Prompt length: tokens (completions, gRPC) or words (chat)."),
    input_len_std: float = typer.Option(0.0, help="Standard deviation of the prompt length (normal)."),
    input_len_range: Optional[str] = typer.Option(None, help="LOW:HIGH uniform prompt lengths (wins over mean/std)."),
    output_len: int = typer.Option(128, help="Tokens to generate (max_tokens)."),
    output_len_std: float = typer.Option(0.0, help="Standard deviation of the output length (normal)."),
    output_len_range: Optional[str] = typer.Option(None, help="LOW:HIGH uniform output lengths."),
    prompts_file: Optional[Path] = typer.Option(
        None, help='JSONL of {"prompt": text or token ids, "max_tokens": N (optional)}, sent in turn.'),
    vocab_size: int = typer.Option(1024, help="Synthetic token ids are drawn from [0, vocab-size)."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Stream (TTFT and ITL need it)."),
    ignore_eos: bool = typer.Option(True, "--ignore-eos/--no-ignore-eos",
                                    help="Generate max_tokens whatever the model says."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (each request gets its own seed)."),
    seed: int = typer.Option(0, help="Seed of the workload: the same seed sends the same requests."),
    timeout: float = typer.Option(600.0, help="Per-request timeout in seconds."),
    api_key: Optional[str] = typer.Option(None, envvar="LATENTMOE_API_KEY",
                                          help="The server's API key, if it has one (env LATENTMOE_API_KEY)."),
    out: Optional[Path] = typer.Option(
        None, help="Write result.json, the PNG plots and report.html to this directory."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Load-test a running server over HTTP (OpenAI API) or gRPC: TTFT, ITL, E2E, throughput, errors,
    and the expert load of the run."""
    from latentmoe.loadtest.report import format_summary, write_report
    from latentmoe.loadtest.runner import Schedule, Target, run_loadtest
    from latentmoe.loadtest.workload import LengthDist, Workload, load_prompts

    try:
        target = Target(url=url, grpc=grpc, http_url=http_url, model=model, endpoint=endpoint, stream=stream,
                        ignore_eos=ignore_eos, temperature=temperature, timeout_s=timeout,
                        api_key=api_key)
        if concurrency is None and request_rate is None:
            concurrency = DEFAULT_CONCURRENCY
        if num_requests is None and duration is None:
            num_requests = DEFAULT_NUM_REQUESTS
        schedule = Schedule(concurrency=concurrency, request_rate=request_rate, max_concurrency=max_concurrency,
                            num_requests=num_requests, duration_s=duration, seed=seed)
        prompts = load_prompts(prompts_file) if prompts_file is not None else None
        if endpoint == "chat" and prompts and any(not isinstance(p["prompt"], str) for p in prompts):
            raise ValueError("the chat endpoint takes text prompts; the prompts file has token ids")
        workload = Workload(LengthDist.parse(input_len, input_len_std, input_len_range),
                            LengthDist.parse(output_len, output_len_std, output_len_range), seed=seed,
                            text=endpoint == "chat", vocab_size=vocab_size, prompts=prompts)
    except (ValueError, OSError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2)

    with _progress(progress, num_requests, duration) as on_result:
        result, results = asyncio.run(run_loadtest(target, schedule, workload, on_result))
    typer.echo(format_summary(result))
    if out is not None:
        files = write_report(result, out, results)
        typer.echo(f"wrote {', '.join(str(p) for p in files)}")
    else:
        typer.echo("nothing written: give --out DIR for result.json, the plots and report.html")
    if result["summary"]["num_completed"] == 0:
        raise typer.Exit(1)


class _progress:
    """A rich progress bar over requests (or over seconds with only a duration); a no-op if disabled."""

    def __init__(self, enabled: bool, num_requests: int | None, duration: float | None):
        self.enabled, self.num_requests, self.duration = enabled, num_requests, duration
        self.num_done = self.num_errors = 0

    def __enter__(self):
        if not self.enabled:
            return None
        import time

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        by_count = self.num_requests is not None
        columns = [TextColumn("{task.description}"), BarColumn(),
                   MofNCompleteColumn() if by_count else TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
                   TimeElapsedColumn()]
        self.bar = Progress(*columns, transient=False)
        self.task = self.bar.add_task("requests", total=self.num_requests if by_count else self.duration)
        self.bar.start()
        t0 = time.perf_counter()

        def on_result(result) -> None:
            self.num_done += 1
            self.num_errors += not result.ok
            description = f"done {self.num_done}, errors {self.num_errors}"
            completed = self.num_done if by_count else min(self.duration, time.perf_counter() - t0)
            self.bar.update(self.task, completed=completed, description=description)

        return on_result

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
