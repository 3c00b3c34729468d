"""Graph-call cost of the text model's step shapes on this machine: why batching gains what it gains.

Times, for each export given, with ONNX Runtime's defaults as the text model opens it, a decode step
of 1, 16 and 32 rows over 100 cached positions (and the 16-row step over the 1-row one: the most a
16-row batch can gain over one row) and prefills of 1, 4 and 16 prompts of 64 tokens in one call
(medians of 3, 2 for the largest, after one untimed call). With `--ops`, also where the 16-row
step's time goes: ONNX Runtime's profiler in an InferenceSession of its own, kernel time per operator
type over 5 calls after one untimed. With `--paired A B`, the two graphs' calls alternate in one process
instead (each InferenceSession without spinning threads, so that neither's idle pool takes the cores from
the other), and it prints each shape's medians and the median of the per-pair ratios B / A: a side by
side comparison, e.g. of an export and the text model's last-position-logits graph beside it.
docs/serving.md quotes it. Run it alone:

    flock -x /tmp/cqil-cpu.lock nice -n -15 python scripts/load_test_probe.py [--ops] out/onnx/model.onnx [more.onnx ...]
    flock -x /tmp/cqil-cpu.lock nice -n -15 python scripts/load_test_probe.py --paired A.onnx B.onnx
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import onnxruntime


def run_call(session: onnxruntime.InferenceSession, rows: int, tokens: int, width: int) -> None:
    """One graph call of `rows` rows of `tokens` new tokens over `width` cached positions (zeros)."""
    inputs = {value.name for value in session.get_inputs()}
    past = [value for value in session.get_inputs() if value.name.startswith("past_key_values.")]
    kv_heads, head_dim = past[0].shape[1], past[0].shape[3]
    feed = {"input_ids": np.full((rows, tokens), 5, np.int64),
            "attention_mask": np.ones((rows, width + tokens), np.int64),
            "position_ids": np.tile(np.arange(width, width + tokens), (rows, 1)),
            **{value.name: np.zeros((rows, kv_heads, width, head_dim), np.float32) for value in past}}
    session.run([value.name for value in session.get_outputs()],
                {name: array for name, array in feed.items() if name in inputs})


def probe(path: str) -> None:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def call(rows: int, tokens: int, width: int) -> None:
        run_call(session, rows, tokens, width)

    def median_ms(rows: int, tokens: int, width: int, repeats: int = 3) -> float:
        call(rows, tokens, width)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call(rows, tokens, width)
            times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1000, 1)

    print(path, flush=True)
    steps = {}
    for rows in (1, 16, 32):
        steps[rows] = median_ms(rows, 1, 100)
        print(f"  decode step, {rows} rows over 100 positions: {steps[rows]} ms", flush=True)
    print(f"  16-row step / 1-row step: {steps[16] / steps[1]:.2f}x", flush=True)
    for rows in (1, 4, 16):
        print(f"  prefill, {rows} x 64 tokens in one call: {median_ms(rows, 64, 0, 2 if rows == 16 else 3)} ms",
              flush=True)


def operator_shares(path: str, rows: int = 16, calls: int = 5) -> None:
    """Kernel time per operator type of a decode step of `rows` rows over 100 positions."""
    options = onnxruntime.SessionOptions()
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = f"{folder}/ort"
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for _ in range(calls + 1):
            run_call(session, rows, 1, 100)
        with open(session.end_profiling()) as trace:
            events = json.load(trace)
    timed_from = [event["ts"] for event in events if event.get("name") == "model_run"][1]
    kernel_us = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= timed_from:
            kernel_us[event["args"]["op_name"]] += event["dur"]
    total = sum(kernel_us.values())
    print(f"  {rows}-row step, kernel time per call by operator ({total / calls / 1000:.1f} ms in all):", flush=True)
    for op, us in kernel_us.most_common(8):
        print(f"    {op:16s} {us / calls / 1000:6.1f} ms {100 * us / total:5.1f} %", flush=True)


def paired(first: str, second: str) -> None:
    """Decode steps and prefills of both graphs, calls alternating (the order flipping each round)."""
    sessions = []
    for path in (first, second):
        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions.append(onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
    print(f"A {first}\nB {second}", flush=True)
    for rows, tokens, width, rounds in ((1, 1, 100, 41), (16, 1, 100, 41), (1, 64, 0, 11), (16, 64, 0, 5)):
        times: list[list[float]] = [[], []]
        for round_ in range(rounds + 1):  # round 0 untimed
            for which in ((0, 1) if round_ % 2 else (1, 0)):
                start = time.perf_counter()
                run_call(sessions[which], rows, tokens, width)
                if round_:
                    times[which].append((time.perf_counter() - start) * 1000)
        ratios = [b / a for a, b in zip(*times)]
        kind = f"decode step, {rows} rows over {width} positions" if tokens == 1 else f"prefill, {rows} x {tokens} tokens"
        print(f"  {kind}: A {statistics.median(times[0]):.1f} ms, B {statistics.median(times[1]):.1f} ms, "
              f"B / A {statistics.median(ratios):.3f} (median of {rounds} pairs)", flush=True)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if arguments[:1] == ["--paired"]:
        paired(*arguments[1:3])
        sys.exit(0)
    for model in [argument for argument in arguments if argument != "--ops"]:
        probe(model)
        if "--ops" in arguments:
            operator_shares(model)
