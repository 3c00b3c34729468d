"""Graph-call cost of the text model's step shapes on this machine: why batching gains what it gains.

Times, for each export given, with ONNX Runtime's defaults as the text model opens it, a decode step
of 1, 16 and 32 rows over 100 cached positions (and the 16-row step over the 1-row one: the most a
16-row batch can gain over one row) and prefills of 1, 4 and 16 prompts of 64 tokens in one call
(medians of 3, 2 for the largest, after one untimed call). docs/serving.md quotes it. Run it alone:

    flock -x /tmp/cqil-cpu.lock nice -n -15 python scripts/load_test_probe.py out/onnx/model.onnx [more.onnx ...]
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import onnxruntime


def probe(path: str) -> None:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    inputs = {value.name for value in session.get_inputs()}
    past = [value for value in session.get_inputs() if value.name.startswith("past_key_values.")]
    outputs = [value.name for value in session.get_outputs()]
    kv_heads, head_dim = past[0].shape[1], past[0].shape[3]

    def call(rows: int, tokens: int, width: int) -> None:
        feed = {"input_ids": np.full((rows, tokens), 5, np.int64),
                "attention_mask": np.ones((rows, width + tokens), np.int64),
                "position_ids": np.tile(np.arange(width, width + tokens), (rows, 1)),
                **{value.name: np.zeros((rows, kv_heads, width, head_dim), np.float32) for value in past}}
        session.run(outputs, {name: array for name, array in feed.items() if name in inputs})

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


if __name__ == "__main__":
    for model in sys.argv[1:]:
        probe(model)
