"""Decode steps under ONNX Runtime's sequential and parallel executors, several exports interleaved in one process.

    flock -x /tmp/cqil-cpu.lock nice -n -15 python scripts/executor_bench.py builder=DIR cqil=DIR ... \
        [--rounds 9] [--steps 24] [--prompt 64] [--out FILE]

CQIL's branches are independent nodes, but ONNX Runtime's CPU executor runs one node at a time
(engines/onnxruntime.py: sequential mode, one inter-op thread). `SessionOptions.execution_mode =
ORT_PARALLEL` runs independent nodes on an inter-op thread pool. This script times each export
(`NAME=FOLDER`: a `cqil export` folder of either target, or the GenAI model builder's) under each
option set of OPTIONS: an InferenceSession per pair, a prefill of --prompt tokens of a fixed random
prompt (untimed), then --steps decode steps timed one by one, each round running every pair once in a
rotating order (with a pause after each, so a spinning thread pool is idle before the next pair runs).
Reported: the median step over all rounds, and ratios with a 95 % bootstrap interval over rounds to the
same export's sequential run and to the first export's fastest option set. The greedy tokens of each
pair are checked against the same export's sequential run. The load average goes in the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cqil.engines.latency import ratio_ci

# name: (execution mode, inter-op threads, intra-op threads, spinning allowed)
OPTIONS = {
    "sequential, 2 intra": (ort.ExecutionMode.ORT_SEQUENTIAL, 1, 2, False),
    "sequential, 2 intra, spin": (ort.ExecutionMode.ORT_SEQUENTIAL, 1, 2, True),
    "parallel, 2 inter x 1 intra": (ort.ExecutionMode.ORT_PARALLEL, 2, 1, False),
    "parallel, 2 inter x 2 intra": (ort.ExecutionMode.ORT_PARALLEL, 2, 2, False),
    "parallel, 2 inter x 1 intra, spin": (ort.ExecutionMode.ORT_PARALLEL, 2, 1, True),
}
BASELINE = "sequential, 2 intra"


class Decoder:
    """One InferenceSession of a decoder with a KV cache (our contract or the builder's: no position_ids)."""

    def __init__(self, folder: Path, mode: ort.ExecutionMode, inter: int, intra: int, spin: bool):
        options = ort.SessionOptions()
        options.execution_mode, options.inter_op_num_threads, options.intra_op_num_threads = mode, inter, intra
        options.log_severity_level = 3
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.pasts = [name for name in self.inputs if name.startswith("past_key_values.")]
        decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]  # the builder's dims are symbolic
        self.empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)

    def _run(self, ids: np.ndarray, past: dict[str, np.ndarray] | None, past_len: int):
        total = past_len + ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64)}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(past_len, total, dtype=np.int64)[None]
        for name in self.pasts:
            feed[name] = past[name] if past else self.empty
        out = dict(zip(self.outputs, self.session.run(self.outputs, feed)))
        return out["logits"], {name: out[name.replace("past_key_values.", "present.")] for name in self.pasts}

    def decode(self, prompt: np.ndarray, steps: int) -> tuple[list[float], list[int]]:
        """Seconds of each greedy decode step after an untimed prefill of `prompt`, and the tokens."""
        logits, past = self._run(prompt, None, 0)
        length, times, tokens = prompt.shape[1], [], []
        for _ in range(steps):
            tokens.append(int(logits[0, -1].argmax()))
            start = time.perf_counter()
            logits, past = self._run(np.array([[tokens[-1]]], np.int64), past, length)
            times.append(time.perf_counter() - start)
            length += 1
        return times, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", help="NAME=FOLDER; the first is the reference of the last column")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed per run")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens before the decode steps")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    folders = dict(item.split("=", 1) for item in args.exports)
    load_before = os.getloadavg()
    prompt = np.random.default_rng(0).integers(100, 40_000, size=(1, args.prompt)).astype(np.int64)
    pairs = [(name, option) for name in folders for option in OPTIONS]
    decoders = {(name, option): Decoder(Path(folders[name]), *OPTIONS[option]) for name, option in pairs}
    tokens = {pair: decoder.decode(prompt, 8)[1] for pair, decoder in decoders.items()}  # also the warm-up
    rounds: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}  # median step of each round
    started = time.time()
    for index in range(args.rounds):
        for pair in pairs[index % len(pairs):] + pairs[:index % len(pairs)]:
            rounds[pair].append(float(np.median(decoders[pair].decode(prompt, args.steps)[0])))
            time.sleep(0.05)  # a spinning pool goes idle before the next InferenceSession runs
    reference = next(iter(folders))
    best = min(OPTIONS, key=lambda option: np.median(rounds[(reference, option)]))
    rows = []
    for name, option in pairs:
        mine, same, ref = (np.array(rounds[p]) for p in ((name, option), (name, BASELINE), (reference, best)))
        rows.append({"export": name, "options": option, "median_ms": 1e3 * float(np.median(mine)),
                     "vs_sequential": float(np.median(mine) / np.median(same)), "vs_sequential_95": ratio_ci(same, mine),
                     "vs_reference_best": float(np.median(mine) / np.median(ref)), "vs_reference_best_95": ratio_ci(ref, mine),
                     "tokens_as_sequential": tokens[(name, option)] == tokens[(name, BASELINE)]})
    result = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "cpu_count": os.cpu_count(), "rounds": args.rounds,
              "steps": args.steps, "prompt": args.prompt, "seconds": round(time.time() - started, 1),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "reference": reference, "reference_best_options": best, "folders": folders, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"decode after {args.prompt} tokens, {args.rounds} interleaved rounds x {args.steps} steps; load "
          f"{load_before[0]:.2f} before, {result['load_average_after'][0]:.2f} after; {reference}'s best: {best}")
    print(f"| export | options | decode ms (median) | vs its sequential (95 % CI) | vs {reference}, {best} (95 % CI) | tokens |")
    print("|---|---|---:|---:|---:|---|")
    for row in rows:
        (a, b), (c, d) = row["vs_sequential_95"], row["vs_reference_best_95"]
        print(f"| {row['export']} | {row['options']} | {row['median_ms']:.2f} | {row['vs_sequential']:.3f} ({a:.3f}-{b:.3f}) | "
              f"{row['vs_reference_best']:.3f} ({c:.3f}-{d:.3f}) | {'same' if row['tokens_as_sequential'] else 'differ'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
