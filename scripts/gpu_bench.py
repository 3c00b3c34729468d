#!/usr/bin/env python
"""Batch-1 decode latency of CQIL on one CUDA GPU, random weights of real shapes.

For each model shape (SmolLM2-135M; a LLaMA-7B-shaped stack of 8 layers) and group size p = 2, 4,
times one decode step at a fixed past length for:
  baseline    the original model (every group one layer), sequential;
  sequential  the CQIL plan, branches one after another (CqilModel);
  streams     the CQIL plan, each group's branches on their own CUDA streams (StreamSchedule; CUDA only);
  packed      the CQIL plan, each group's p layers as wide matmuls (CqilModel(packed=True));
each step captured in a CUDA graph, all variants timed interleaved in one run after warm-up. Before
timing, every CQIL variant's logits are checked against the sequential CQIL model ("max diff").
The ideal depth ratio (groups / layers) is what perfect branch concurrency would give the decoder.

    python scripts/gpu_bench.py                      # one CUDA GPU, about 1-2 minutes
    python scripts/gpu_bench.py --device cpu --quick # tiny shapes, no graphs: a smoke test anywhere
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cqil.engines.cuda_streams import DecodeStep, StreamSchedule  # noqa: E402
from cqil.engines.latency import interleaved_times, ratio_ci  # noqa: E402
from cqil.model.cqil import CqilModel  # noqa: E402
from cqil.model.plan import identity_plan, uniform_plan  # noqa: E402

# name: (config, CQIL span [S, E) grouped into groups of p)
SHAPES = {
    "SmolLM2-135M": (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True), (14, 30)),
    "LLaMA-7B x8 layers": (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=8,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000), (0, 8)),
}
QUICK_SHAPES = {
    "tiny-smollm2": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True), (2, 8)),
    "tiny-llama": (dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=256), (0, 4)),
}
GROUP_SIZES = (2, 4)


def random_model(config_kwargs: dict, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **config_kwargs)
    with torch.device(device):  # initialise on the device: seconds for a 1.6B-parameter stack on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def bench_shape(name: str, config_kwargs: dict, span: tuple[int, int], args, device, dtype) -> list[dict]:
    hf = random_model(config_kwargs, device, dtype)
    layers = config_kwargs["num_hidden_layers"]
    use_graph = device.type == "cuda"

    def step(model):
        return DecodeStep(model, args.past, device, dtype, use_graph=use_graph)

    baseline = step(CqilModel(hf, identity_plan(layers)))
    rows = []
    for p in GROUP_SIZES:
        plan = uniform_plan(span[0], span[1], p, layers)
        variants = {"sequential": step(CqilModel(hf, plan)), "packed": step(CqilModel(hf, plan, packed=True))}
        if device.type == "cuda":
            variants["streams"] = step(CqilModel(hf, plan, schedule=StreamSchedule()))
        want = variants["sequential"]().float().clone()
        diffs = {key: float((s().float() - want).abs().max()) for key, s in variants.items()}
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        callables = {"baseline": baseline, **variants}
        times = interleaved_times(callables, args.repeats, args.warmup, sync)
        base = np.median(times["baseline"])
        for key, t in times.items():
            low, high = ratio_ci(times["baseline"], t)
            rows.append({"model": name, "p": p, "variant": key, "layers": layers,
                         "depth": layers if key == "baseline" else plan.depth,
                         "median_ms": round(float(np.median(t)) * 1e3, 4),
                         "ratio": round(float(np.median(t) / base), 4), "ratio_ci": [low, high],
                         "ideal_depth_ratio": round(plan.depth / layers, 4),
                         "max_diff": diffs.get(key, 0.0)})
        del variants
    del hf, baseline
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    print(f"{'model':<20} {'p':>2} {'variant':<11} {'depth':>7} {'median ms':>10} {'ratio':>7} "
          f"{'ratio 95% CI':>15} {'ideal':>6} {'max diff':>9}")
    for r in rows:
        ci = f"{r['ratio_ci'][0]:.3f}-{r['ratio_ci'][1]:.3f}"
        print(f"{r['model']:<20} {r['p']:>2} {r['variant']:<11} {r['depth']:>3}/{r['layers']:<3} "
              f"{r['median_ms']:>10.3f} {r['ratio']:>7.3f} {ci:>15} {r['ideal_depth_ratio']:>6.3f} {r['max_diff']:>9.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (a smoke test)")
    parser.add_argument("--past", type=int, default=None, help="cache length of the decode step (default 128; quick 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 200; quick 5)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: error: no CUDA GPU here; use --device cpu --quick for a smoke test", file=sys.stderr)
        return 2
    args.past = args.past or (16 if args.quick else 128)
    args.repeats = args.repeats or (5 if args.quick else 200)
    if args.quick:
        args.warmup = min(args.warmup, 2)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    start = time.perf_counter()
    rows = []
    with torch.no_grad():
        for name, (config, span) in (QUICK_SHAPES if args.quick else SHAPES).items():
            rows += bench_shape(name, config, span, args, device, dtype)
    header = (f"batch-1 decode, past {args.past}, {str(dtype).removeprefix('torch.')}, "
              f"{'CUDA graphs' if device.type == 'cuda' else 'eager (no CUDA graphs off GPU)'}, "
              f"{args.repeats} interleaved rounds, on {where} (torch {torch.__version__})")
    print_table(rows, header)
    print(f"ratio = median / baseline median; ideal = depth ratio groups/layers; {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
