"""Graph-call cost of the text model's step shapes on this machine: why batching gains what it gains.

Times, with ONNX Runtime's defaults as the text model opens the export, a decode step of 1, 16 and 32
rows over 100 cached positions and prefills of 1, 4 and 16 prompts of 64 tokens in one call (medians
of 3, 2 for the largest, after one untimed call). docs/serving.md quotes it. Run it alone:

    flock -x /tmp/cqil-cpu.lock nice -n -15 python scripts/load_test_probe.py out/onnx/model.onnx
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import onnxruntime


def main(path: str) -> None:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    past = [value for value in session.get_inputs() if value.name.startswith("past_key_values.")]
    outputs = [value.name for value in session.get_outputs()]
    kv_heads, head_dim = past[0].shape[1], past[0].shape[3]

    def call(rows: int, tokens: int, width: int) -> None:
        session.run(outputs, {
            "input_ids": np.full((rows, tokens), 5, np.int64),
            "attention_mask": np.ones((rows, width + tokens), np.int64),
            "position_ids": np.tile(np.arange(width, width + tokens), (rows, 1)),
            **{value.name: np.zeros((rows, kv_heads, width, head_dim), np.float32) for value in past}})

    def median_ms(rows: int, tokens: int, width: int, repeats: int = 3) -> float:
        call(rows, tokens, width)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call(rows, tokens, width)
            times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1000, 1)

    for rows in (1, 16, 32):
        print(f"decode step, {rows} rows over 100 positions: {median_ms(rows, 1, 100)} ms", flush=True)
    for rows in (1, 4, 16):
        print(f"prefill, {rows} x 64 tokens in one call: {median_ms(rows, 64, 0, 2 if rows == 16 else 3)} ms",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
