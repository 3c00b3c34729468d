"""A recovery step of the default model on an idle and on a busy machine, with and without cqil's
OpenMP wait policy (cqil/__init__.py), each in a fresh process.

    flock /tmp/cqil-bench.lock nice -n -15 python scripts/busy_recovery.py [--steps 3] [--out FILE]

"busy" is one other CPU-bound process (`python -c 'while True: pass'`) at the same priority for the
whole run. "before" imports PyTorch before cqil, so OpenMP starts with its own defaults (threads that
spin while they wait); "passive" imports cqil first, as every cqil entry point does (passive wait). Both
run as many threads as cores (OMP_NUM_THREADS), which the step divides among its rows (each row runs
in a thread of its own, pipeline/recovery.py). The step is the
default build's: LoRA rank 32 on every projection, 4 x 256 tokens, on the uniform plan S15:30:2 d=1
(the automatic plan's depth; a plan changes little in the step's cost). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("before", "passive")


def child(policy: str, steps: int) -> None:
    at_torch_import = os.environ.get("OMP_WAIT_POLICY", "(unset)") if policy == "before" else None
    if policy == "before":
        import torch  # noqa: F401 - OpenMP reads its settings now, before cqil could set them
    sys.path.insert(0, str(ROOT))
    import cqil  # noqa: F401 - "passive": the wait policy is set here, before PyTorch loads
    at_torch_import = at_torch_import or os.environ.get("OMP_WAIT_POLICY", "(unset)")
    import torch  # noqa: F811 - already imported under "before"
    from cqil.model.plan import parse_uniform_spec
    from cqil.pipeline.data import load_split
    from cqil.pipeline.recovery import FinetuneSettings, finetune
    from cqil.pipeline.sources import load_model

    loaded = load_model(None)
    plan = parse_uniform_spec("15:30:2", loaded.model.config.num_hidden_layers, bypass=1)
    split = load_split(loaded.tokenizer, seq_len=256)
    settings = FinetuneSettings(steps=steps + 1, lr=1e-3, batch_size=4, rank=32, eval_every=0, eval_chunks=1,
                                save_every=0)
    with tempfile.TemporaryDirectory() as tmp:  # the median step, the first (warm-up) one included
        record = finetune(loaded.model, plan, split.train, split.held_out, settings, Path(tmp) / "adapter",
                          progress=False)
    print(json.dumps({"policy": policy, "threads": [torch.get_num_threads()],
                      "omp_wait_policy": at_torch_import,
                      "seconds_per_step": record["seconds_per_step"]}))


def measure(policy: str, busy: bool, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS")}
    env["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, __file__, "--child", policy, "--steps", str(steps)], env=env,
                                capture_output=True, text=True, check=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    row = json.loads(result.stdout.strip().splitlines()[-1])
    return {**row, "busy": busy, "wall_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="steps per run besides a first, warm-up one")
    parser.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    rows = [measure(policy, busy, args.steps) for policy in args.policies for busy in (False, True)]
    print("| policy (OpenMP wait) | threads idle / busy | idle: s/step | busy: s/step | busy / idle |")
    print("|---|---|---:|---:|---:|")
    for policy in args.policies:
        idle, busy = (next(r for r in rows if r["policy"] == policy and r["busy"] is b) for b in (False, True))
        threads = "/".join(",".join(map(str, r["threads"])) for r in (idle, busy))
        print(f"| {policy} ({idle['omp_wait_policy']}) | {threads} | {idle['seconds_per_step']:.2f} | "
              f"{busy['seconds_per_step']:.2f} | {busy['seconds_per_step'] / idle['seconds_per_step']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
