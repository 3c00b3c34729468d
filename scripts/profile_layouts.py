"""Where an exported model spends its time on ONNX Runtime CPU: kernel time by op type and by node role.

    PYTHONPATH=. python scripts/profile_layouts.py DIR [DIR ...] [--threads 2] [--seq 128] [--past 128] \
        [--repeats 10] [--statistic mean|min] [--optimized OUT_DIR] [--out FILE]

For each export folder and each scenario (prefill 1 x seq, decode 1 token after past), a fresh session
with ONNX Runtime's profiler runs the scenario once to warm up and `--repeats` times measured; the
node events of the measured runs are summed per op type (after ORT's fusions: what really ran) and per
role (the node name without its group, layer and op: `attn/q_proj`, `ffn`, `combine`, ...), in ms per
run: the mean over the runs, or with `--statistic min` each node's fastest run (on a shared machine
a kernel's wall time includes the time its thread was preempted; the fastest run is the nearest to
its own cost, good for small kernels and one thread). `--optimized` saves the graph ORT runs (`optimized_model_filepath`) as OUT_DIR/<folder>.onnx, to see
which fusions it made. Prints Markdown tables, one column per folder; --out writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cqil.engines.onnxruntime import OrtRunner
from cqil.model.steps import timing_inputs

_SCOPE = re.compile(r"^/(g\d+)(/l\d+)?/")


def role_of(node_name: str) -> str:
    """`/g1/l16/attn/q_proj/MatMul` -> `attn/q_proj`; nodes outside the groups keep their first scope."""
    match = _SCOPE.match(node_name)
    if not match:
        head = node_name.strip("/").split("/")[0]
        return f"outside:{head}" if node_name.startswith("/") else "outside:(ORT-made)"
    parts = node_name[match.end():].split("/")
    return "/".join(parts[:2]) if len(parts) > 2 else parts[0]


def kernel_events(profile: Path, skip_runs: int) -> tuple[list[dict], int]:
    """Node kernel events of the model runs after the first `skip_runs`, and how many runs they cover."""
    events = json.loads(profile.read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    kept = runs[skip_runs:]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
             and any(start <= e["ts"] <= end for start, end in kept)]
    return nodes, len(kept)


def profile(folder: Path, threads: int, seq: int, past: int, repeats: int, optimized: Path | None,
            statistic: str) -> dict:
    """Per scenario: kernel ms per run by op type and by role; `min` takes each node's fastest run."""
    import onnxruntime as ort

    runner = OrtRunner(folder, threads=threads, spin=False, optimized_model=optimized)
    ids = torch.randint(0, 1000, (1, past + seq), generator=torch.Generator().manual_seed(0))
    feeds = {scenario: runner.feeds(tokens, mask, past_key_values=cache)
             for scenario, (tokens, mask, cache) in timing_inputs(runner, ids, past).items()}
    result = {}
    with tempfile.TemporaryDirectory() as scratch:
        for scenario, feed in feeds.items():
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(scratch) / scenario)
            options.log_severity_level = 3
            session = ort.InferenceSession(str(runner.path), options, providers=["CPUExecutionProvider"])
            for _ in range(1 + repeats):
                session.run(runner.outputs, feed)
            nodes, runs = kernel_events(Path(session.end_profiling()), skip_runs=1)
            per_node: defaultdict[tuple[str, str], list[float]] = defaultdict(list)
            for event in nodes:
                per_node[event["name"][: -len("_kernel_time")], event["args"]["op_name"]].append(event["dur"] / 1000)
            by_op, by_role, count = Counter(), Counter(), Counter()
            for (name, op), times in per_node.items():
                ms = min(times) if statistic == "min" else sum(times) / runs
                by_op[op] += ms
                by_role[role_of(name)] += ms
                count[op] += 1
            result[scenario] = {"total_ms": sum(by_op.values()), "by_op": dict(by_op), "by_role": dict(by_role),
                                "nodes_by_op": dict(count)}
    return result


def _table(title: str, columns: dict[str, dict], key: str, limit: int) -> None:
    totals: defaultdict[str, float] = defaultdict(float)
    for data in columns.values():
        for name, ms in data[key].items():
            totals[name] += ms
    names = [n for n, _ in sorted(totals.items(), key=lambda kv: -kv[1])[:limit]]
    print(f"\n{title}\n\n| {key} | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    print("| total | " + " | ".join(f"{d['total_ms']:.2f}" for d in columns.values()) + " |")
    for name in names:
        print(f"| {name} | " + " | ".join(f"{d[key].get(name, 0.0):.2f}" for d in columns.values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--statistic", choices=("mean", "min"), default="mean",
                        help="per node: mean over the runs, or the fastest run (robust on a loaded machine)")
    parser.add_argument("--limit", type=int, default=25, help="rows per table")
    parser.add_argument("--optimized", type=Path, help="folder for the graphs ORT optimized")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for folder in args.folders:
        optimized = args.optimized / f"{folder.name}.onnx" if args.optimized else None
        results[folder.name] = profile(folder, args.threads, args.seq, args.past, args.repeats, optimized,
                                       args.statistic)
    for scenario in ("prefill", "decode"):
        columns = {name: data[scenario] for name, data in results.items()}
        _table(f"{scenario}: kernel ms per run by op type", columns, "by_op", args.limit)
        _table(f"{scenario}: kernel ms per run by role", columns, "by_role", args.limit)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
