"""Load test of the Triton text model with AIPerf (NVIDIA's LLM load tool), run by scripts/load_test.sh.

With `--onnx DIR` it writes the model repository (`cqil triton`), starts the same local `tritonserver`
as the slow tests (engines/triton_server.py) and drives `/v2/models/<name>_text/generate_stream`;
with `--url URL` it drives any Triton already serving the text model (nothing is started).

AIPerf reaches Triton's generate endpoints through its `template` endpoint: a Jinja payload template
(`text_input`, `max_tokens`, `stream`, `sampling_parameters` with `ignore_eos` so every request yields
exactly the asked output length) and `response_field: text_output` to read the server-sent events.
It counts tokens with the model's own tokenizer (the export folder). Per concurrency it reports time
to first token, inter-token latency (AIPerf's: per request, (latency - TTFT) / (tokens - 1)), output
tokens/s and failed requests; Triton's metrics endpoint adds the server's side (failures, queue-full
rejections). Requests go out at most `PACING_RATE` a second, far more than the server completes, so
`--concurrency` alone decides how many are in flight: with a concurrency and no rate, AIPerf's timing
manager polls for a free slot without ever sleeping (0-interval yields to its event loop), a whole
core for as long as requests remain to be sent, and on a 2-core machine that core is taken from the
server (every step of the first wave at concurrency 16 took twice as long as the last wave's, until
the last request was sent). With a rate it sleeps between ticks, a freed slot waiting at most one
tick (10 ms). AIPerf runs from its own virtualenv in the cqil cache (it pins huggingface-hub < 2,
which would downgrade this project's transformers).

    scripts/load_test.sh --onnx out/onnx                      # concurrency 1, 4, 16, 32 -> docs/serving-load.json
    scripts/load_test.sh --quick --onnx out/onnx --out /tmp/q.json
    scripts/load_test.sh --url http://host:8000 --model cqil_text --tokenizer out/onnx
    scripts/load_test.sh --soak 600 --onnx out/onnx --hf-model DIR --plan-args "--uniform 15:30:2 --bypass 1"
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from cqil.model.fsutil import cache_dir

AIPERF = "aiperf==0.13.0"
TEMPLATE = ('{"text_input": {{ text|tojson }}, "max_tokens": {{ max_tokens }}, "stream": true, '
            '"sampling_parameters": "{\\"ignore_eos\\": true}"}')
FULL = {"concurrency": [1, 4, 16, 32], "input_tokens": 64, "output_tokens": 64, "requests_per_slot": 2}
QUICK = {"concurrency": [1, 4], "input_tokens": 16, "output_tokens": 8, "requests_per_slot": 1}
PACING_RATE = 100  # requests/s, constant arrivals: the tick the timing manager sleeps to (docstring)
MAX_REQUESTS = 48  # per concurrency level: three waves of 16 rows at the top levels, ~3 min on the 2-core CPU
SOAK_TOKENS = 24
SOAK_PROMPTS = ("The object model of Python", "A for statement iterates over", "Lambda expressions create")


def machine() -> str:
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {memory / 2**20:.0f} GB"


def load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def aiperf_python() -> Path:
    """The python of AIPerf's own virtualenv (made once with pip)."""
    venv = cache_dir() / "venvs" / AIPERF.replace("==", "-")
    python = venv / "bin" / "python"
    if not (venv / ".complete").is_file():
        print(f"installing {AIPERF} into {venv} (once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", AIPERF], check=True)
        (venv / ".complete").touch()
    return python


def scrape(metrics_url: str | None) -> dict[str, float]:
    """Triton's metrics endpoint as {'name{labels}': value} (empty without one)."""
    if not metrics_url:
        return {}
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        lines = response.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line and line[0] != "#"}


def counter(values: dict[str, float], name: str, model: str) -> float:
    return sum(v for k, v in values.items() if k.startswith(name + "{") and f'model="{model}"' in k)


def run_aiperf(python: Path, args, concurrency: int, work: Path, requests: int | None = None,
               duration: int | None = None, extra: list[str] = ()) -> dict:
    """One AIPerf profile at `concurrency`; its summary JSON."""
    artifacts = work / f"aiperf-c{concurrency}{'-soak' if duration else ''}"
    template = work / "payload.jinja"
    template.write_text(TEMPLATE)
    command = [str(python), "-m", "aiperf", "profile", "--model", args.model, "--url", args.url,
               "--endpoint-type", "template", "--custom-endpoint", f"/v2/models/{args.model}/generate_stream",
               "--streaming", "--extra-inputs", f"payload_template:{template}",
               "--extra-inputs", "response_field:text_output", "--tokenizer", str(args.tokenizer),
               "--synthetic-input-tokens-mean", str(args.input_tokens),
               "--synthetic-input-tokens-stddev", str(args.input_stddev),
               "--output-tokens-mean", str(args.output_tokens), "--output-tokens-stddev", "0",
               "--concurrency", str(concurrency), "--request-rate", str(PACING_RATE), "--arrival-pattern", "constant",
               "--random-seed", "0", "--ui-type", "none",
               "--artifact-dir", str(artifacts), *extra]
    command += ["--benchmark-duration", str(duration)] if duration else \
        ["--request-count", str(requests), "--warmup-request-count", str(min(concurrency, 4))]
    print("$ " + shlex.join(command), file=sys.stderr, flush=True)
    # No HF_HUB_OFFLINE: AIPerf's offline mode looks a local folder up in the hub cache and fails;
    # an absolute folder path is read locally without it.
    result = subprocess.run(command, capture_output=True, text=True)
    (artifacts / "aiperf.log").parent.mkdir(parents=True, exist_ok=True)
    (artifacts / "aiperf.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"aiperf failed (exit {result.returncode}), log in {artifacts / 'aiperf.log'}:\n"
                         + (result.stdout + result.stderr)[-3000:])
    return json.loads((artifacts / "profile_export_aiperf.json").read_text())  # phases/ hold per-phase copies


def stat(summary: dict, metric: str, key: str) -> float:
    value = summary.get(metric) or summary.get("records", {}).get(metric) or {}
    return float(value.get(key) or 0.0)


SOAK_CANCEL_AFTER_S = 2  # seconds; a soak request lasts ~4-6 s here (64 tokens), so most are cut mid-stream
CANCELLED_BY_CLIENT = "RequestCancellationError"  # AIPerf's error type for its deliberate cancellations (499)


def record(summary: dict, concurrency: int, before: dict, after: dict, model: str) -> dict:
    errors = [(e.get("error_details") or {}, int(e.get("count", 0))) for e in summary.get("error_summary") or []]
    cancelled = sum(count for details, count in errors if details.get("type") == CANCELLED_BY_CLIENT)
    failed = sum(count for details, count in errors if details.get("type") != CANCELLED_BY_CLIENT)
    return {
        "concurrency": concurrency,
        "output_tokens_per_s": round(stat(summary, "output_token_throughput", "avg"), 2),
        "ttft_p50_ms": round(stat(summary, "time_to_first_token", "p50"), 1),
        "ttft_p99_ms": round(stat(summary, "time_to_first_token", "p99"), 1),
        "itl_p50_ms": round(stat(summary, "inter_token_latency", "p50"), 1),
        "itl_p99_ms": round(stat(summary, "inter_token_latency", "p99"), 1),
        "inter_chunk_p99_ms": round(stat(summary, "inter_chunk_latency", "p99"), 1),  # every gap, not a mean
        "request_latency_p50_ms": round(stat(summary, "request_latency", "p50"), 1),
        "requests": int(stat(summary, "request_count", "avg")),
        "failed": failed,
        "cancelled_by_client": cancelled,
        "errors": [{**details, "count": count} for details, count in errors],
        "server_failures": int(counter(after, "nv_inference_request_failure", model)
                               - counter(before, "nv_inference_request_failure", model)),
        "rejected_queue_full": int(counter(after, "cqil_text_rejected_requests_total", model)
                                   - counter(before, "cqil_text_rejected_requests_total", model)),
    }


@contextlib.contextmanager
def serving(args, work: Path):
    """Point `args` at a server: the given --url, or a local tritonserver on the export in --onnx."""
    if args.url:
        yield None
        return
    from cqil.engines import triton, triton_server

    repo = work / "repo"
    triton.write_model_repository(args.onnx, repo, model_name=args.name)
    args.model = triton.model_names(args.name)["text"]
    with triton_server.run_server(repo, work, args.model, triton_server.stub_python_bin(), metrics=True) as server:
        args.url = server.url
        args.metrics_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        yield server


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the Python-backend stub runs the model), in MB."""
    total = 0
    for child in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            total += next(int(line.split()[1]) for line in Path(f"/proc/{child}/status").read_text().splitlines()
                          if line.startswith("VmRSS"))
    return total / 1024


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += [int(child), *_children(int(child))]
    return found


def post_generate(url: str, model: str, prompt: str, max_tokens: int) -> str:
    body = json.dumps({"text_input": prompt, "max_tokens": max_tokens}).encode()
    request = urllib.request.Request(f"{url}/v2/models/{model}/generate", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())["text_output"]


def soak(args, work: Path, server, python: Path) -> dict:
    """`args.soak_warmup` seconds of warm-up, then `args.soak` seconds more, at concurrency 16 throughout
    (one AIPerf run of both), mixed prompt lengths, some clients cancelling mid-stream; the server's RSS
    sampled every 5 s; greedy answers taken during the load, compared with `cqil generate` (PyTorch: equal
    for an fp32 export) and with the same server's answers to the same prompts alone before the load.

    Times count from the start of AIPerf's load (its `start_time`), not from this script's start, which
    comes before AIPerf's own start-up. The RSS rule (the issue's "growth <= 10 % after warm-up"): of
    the samples taken `soak_warmup` seconds or more after the load started, the largest over the first
    one, minus 1."""
    samples, answers, stop = [], [], threading.Event()

    def watch():
        while not stop.wait(5):
            samples.append((time.time(), round(rss_mb(server.process.pid), 1)))

    def ask():
        for prompt in SOAK_PROMPTS * 2:
            if stop.wait(total / 8):
                return
            answers.append((prompt, post_generate(args.url, args.model, prompt, SOAK_TOKENS)))

    expected: dict[str, str] = {}

    def reference():  # `cqil generate` (PyTorch) meanwhile: it needs no server
        expected.update({prompt: cqil_generate(args, prompt, SOAK_TOKENS) for prompt in SOAK_PROMPTS})

    total = args.soak_warmup + args.soak
    # The same prompts alone on the idle server first: under load, batched with others, they must not change.
    idle = {prompt: post_generate(args.url, args.model, prompt, SOAK_TOKENS) for prompt in SOAK_PROMPTS}
    threads = [threading.Thread(target=target, daemon=True) for target in (watch, ask, reference)]
    for thread in threads:
        thread.start()
    before = scrape(args.metrics_url)
    summary = run_aiperf(python, args, 16, work, duration=total,
                         extra=["--request-cancellation-rate", "10", "--request-cancellation-delay",
                                str(SOAK_CANCEL_AFTER_S),
                                "--benchmark-grace-period", "60"])
    after = scrape(args.metrics_url)
    stop.set()
    for thread in threads:
        thread.join()
    load_start, load_end = (datetime.datetime.fromisoformat(summary[key]).timestamp()  # AIPerf's local time
                            for key in ("start_time", "end_time"))
    samples = [(round(t - load_start, 1), rss) for t, rss in samples]  # seconds since the load started
    warm = [rss for t, rss in samples if t >= args.soak_warmup]  # docs/serving.md says why this warm-up
    growth = round(max(warm) / warm[0] - 1, 4) if warm else None  # the largest sample over the first one
    result = {"seconds_of_load": round(load_end - load_start, 1), "warmup_seconds": args.soak_warmup,
              "seconds_after_warmup": round(load_end - load_start - args.soak_warmup, 1), "concurrency": 16,
              "record": record(summary, 16, before, after, args.model),
              "rss_mb_samples": samples, "rss_growth_after_warmup": growth,
              "greedy_samples": [{"prompt": p, "served": a, "served_alone_before_the_load": idle[p],
                                  "cqil_generate": expected.get(p), "equal": a.strip() == expected.get(p),
                                  "equal_alone": a == idle[p]} for p, a in answers]}
    result["goals"] = {"at_least_600_s_after_warmup": result["seconds_after_warmup"] >= 600,
                       "no_failed_request": result["record"]["failed"] == 0,
                       "rss_growth_at_most_10_percent": growth is not None and growth <= 0.10,
                       "greedy_answers_equal_cqil_generate": bool(answers) and all(
                           g["equal"] for g in result["greedy_samples"]),
                       "greedy_answers_under_load_equal_alone": bool(answers) and all(
                           g["equal_alone"] for g in result["greedy_samples"])}
    return result


def cqil_generate(args, prompt: str, tokens: int) -> str:
    command = ["cqil", "generate", "--model", str(args.hf_model), *shlex.split(args.plan_args), "--raw",
               "--prompt", prompt, "--max-new-tokens", str(tokens)]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def markdown(records: list[dict]) -> str:
    """The table docs/serving.md shows."""
    lines = ["| concurrency | output tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | inter-chunk p99 ms "
             "| requests | failed |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['concurrency']} | {r['output_tokens_per_s']:.2f} "
              f"| {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f} "
              f"| {r['inter_chunk_p99_ms']:.0f} | {r['requests']} | {r['failed']} |" for r in records]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """Two panels against concurrency: output tokens/s, and TTFT / ITL p50 and p99 (log scale)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from cqil.engines.bench_report import write_png

    records = result["records"]
    levels = [r["concurrency"] for r in records]
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "font.size": 9}):
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
        rates = [r["output_tokens_per_s"] for r in records]
        left.plot(levels, rates, "o-", color="#4c72b0")
        for x, y in zip(levels, rates):
            left.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        left.set(xscale="log", xticks=levels, xticklabels=levels, xlabel="concurrent streams",
                 ylabel="output tokens/s", title="throughput", ylim=(0, max(rates) * 1.2))
        for key, color in (("ttft", "#dd8452"), ("itl", "#55a868")):
            right.plot(levels, [r[f"{key}_p50_ms"] for r in records], "o-", color=color, label=f"{key.upper()} p50")
            right.plot(levels, [r[f"{key}_p99_ms"] for r in records], "o--", color=color, label=f"{key.upper()} p99")
        right.set(xscale="log", yscale="log", xticks=levels, xticklabels=levels, xlabel="concurrent streams",
                  ylabel="ms", title="latency")
        right.legend(fontsize=8)
        for ax in (left, right):
            ax.spines[["top", "right"]].set_visible(False)
            ax.grid(alpha=0.3)
        settings = result["settings"]
        fig.suptitle(f"cqil text model on Triton, AIPerf, {settings['input_tokens']} in / {settings['output_tokens']} "
                     f"out tokens; {result['machine']}, {result['date'][:10]}, load avg "
                     f"{result['load_average_before'][0]} -> {result['load_average_after'][0]}", fontsize=9)
        return write_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--onnx", type=Path, help="export folder (with tokenizer): serve it on a local tritonserver")
    where.add_argument("--url", help="a running Triton's HTTP URL (then give --model and --tokenizer)")
    parser.add_argument("--model", default="cqil_text", help="text model name on --url (default %(default)s)")
    parser.add_argument("--name", default="cqil", help="model name prefix for --onnx (default %(default)s)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder AIPerf counts tokens with (default --onnx)")
    parser.add_argument("--metrics-url", help="Triton's metrics URL on --url (e.g. http://host:8002/metrics)")
    parser.add_argument("--quick", action="store_true", help="concurrency 1 and 4, short requests (the slow test)")
    parser.add_argument("--concurrency", help="comma-separated levels (default 1,4,16,32)")
    parser.add_argument("--input-tokens", type=int)
    parser.add_argument("--input-stddev", type=int, help="spread of prompt lengths (default 0, soak: 32)")
    parser.add_argument("--output-tokens", type=int)
    parser.add_argument("--requests-per-slot", type=int, help="requests per concurrency slot at each level")
    parser.add_argument("--soak", type=int, default=0,
                        help="the soak at concurrency 16 instead: seconds of it after the warm-up")
    parser.add_argument("--soak-warmup", type=int, default=60,
                        help="soak: seconds of load before the soak's own seconds, when RSS growth is not counted "
                             "(default %(default)s: the first wave of 16 requests has finished and been replaced)")
    parser.add_argument("--hf-model", type=Path, help="soak: HF model the export came from, for `cqil generate`")
    parser.add_argument("--plan-args", default="--uniform 15:30:2 --bypass 1", help="soak: the export's plan flags")
    parser.add_argument("--work", type=Path, default=Path("out/load-test"), help="scratch folder (default %(default)s)")
    parser.add_argument("--out", type=Path,
                        help="JSON result (default docs/serving-load.json, soak: docs/serving-soak.json)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    levels = [int(c) for c in args.concurrency.split(",")] if args.concurrency else preset["concurrency"]
    for key in ("input_tokens", "output_tokens", "requests_per_slot"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.input_stddev is None:
        args.input_stddev = 32 if args.soak else 0
    args.tokenizer = (args.tokenizer or args.onnx).resolve() if (args.tokenizer or args.onnx) else None
    if args.tokenizer is None:
        parser.error("--url needs --tokenizer (a folder with the model's tokenizer.json)")
    if args.soak and not (args.onnx and args.hf_model):
        parser.error("--soak needs --onnx and --hf-model (its greedy answers are compared with `cqil generate`)")
    out = args.out or Path("docs/serving-soak.json" if args.soak else "docs/serving-load.json")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    python = aiperf_python()
    result = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "scripts/load_test.sh " + shlex.join(sys.argv[1:] if argv is None else argv),
              "tool": AIPERF, "load_average_before": load(),
              "settings": {"input_tokens": args.input_tokens, "input_stddev": args.input_stddev,
                           "output_tokens": args.output_tokens, "requests_per_slot": args.requests_per_slot}}
    with serving(args, work) as server:
        if args.soak:
            result["soak"] = soak(args, work, server, python)
        else:
            result["records"] = []
            for concurrency in levels:
                before = scrape(args.metrics_url)
                summary = run_aiperf(python, args, concurrency, work,
                                     requests=min(max(concurrency * args.requests_per_slot, 8), MAX_REQUESTS))
                result["records"].append(record(summary, concurrency, before, scrape(args.metrics_url), args.model))
                print(json.dumps(result["records"][-1]), file=sys.stderr, flush=True)
    result["load_average_after"] = load()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    if "records" in result:
        print(f"wrote {plot(result, out.with_suffix('.png'))}", file=sys.stderr)
        print(markdown(result["records"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
