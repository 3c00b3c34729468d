"""CQIL on P processes (gloo, CPU) against the one-process CqilModel, and tensor parallel against HF.

Each test starts real processes (tests/distributed_worker.py, or `cqil generate --ranks`), because the
process boundary is the point: the weights each rank loads, the collectives, and how a failure
on one rank reaches the others. Launches are few and batched (several cases per launch).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_model

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "distributed_worker.py"
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(world: int, *args: str, timeout_s: float = 60) -> list[subprocess.Popen]:
    """P worker processes with the environment torchrun would give them."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args, str(timeout_s)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    results = []
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail("a rank hung past the test's timeout")
        results.append((proc.returncode, out, err))
    return results


def save_model(path: Path, tokenizer, family: str, layers: int, **overrides) -> Path:
    tiny_model(family, layers, **overrides).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def inputs(path: Path) -> dict[str, torch.Tensor]:
    """A left-padded batch of two rows, and three decode tokens per row."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (2, 7), generator=generator)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    steps = torch.randint(3, 300, (2, 3), generator=generator)
    data = {"ids": ids, "mask": mask, "steps": steps}
    torch.save(data, path)
    return data


def run_parity(out: Path, world: int, cases: dict) -> dict:
    """One launch of P ranks over every case {name: {model, groups, bypass}}; what rank 0 saved."""
    data_file = out / "inputs.pt"
    data = inputs(data_file)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "inputs": str(data_file), "cases": cases}))
    for code, _, err in finish(start_ranks(world, "parity", str(spec))):
        assert code == 0, err
    return {"data": data, "logits": torch.load(out / "logits.pt"),
            "ranks": {name: [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(world)]
                      for name in cases}}


@functools.lru_cache(maxsize=4)
def full_model(model_dir: Path):
    """The whole checkpoint in one process (read-only here: CqilModel and the HF forward do not change it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference(model_dir: Path, groups, bypass, data, dropped=()):
    """The one-process CqilModel on the same inputs: prefill, three cached decode steps, greedy tokens."""
    from cqil.model.cqil import CqilModel
    from cqil.model.plan import from_parallel_groups
    from cqil.model.steps import greedy_generate

    hf = full_model(model_dir)
    model = CqilModel(hf, from_parallel_groups(groups, hf.config.num_hidden_layers, bypass, dropped=tuple(dropped)))
    ids, mask = data["ids"], data["mask"]
    with torch.no_grad():
        prefill, past = model(ids, mask)
        decoded = []
        for token in data["steps"].T:
            mask = torch.cat((mask, mask.new_ones(2, 1)), 1)
            logits, past = model(token[:, None], mask, past_key_values=past)
            decoded.append(logits)
    return prefill, torch.cat(decoded, 1), greedy_generate(model, ids, data["mask"], 6)


def original_hf(model_dir: Path, data):
    """The unsharded HF model's own forward with its cache (what tensor parallel must equal)."""
    from cqil.model.decoder import positions_from_mask
    from transformers import DynamicCache

    hf = full_model(model_dir)
    ids, mask, cache = data["ids"], data["mask"], DynamicCache()
    with torch.no_grad():
        prefill = hf(ids, attention_mask=mask, position_ids=positions_from_mask(mask, 7), past_key_values=cache).logits
        decoded = []
        for token in data["steps"].T:
            mask = torch.cat((mask, mask.new_ones(2, 1)), 1)
            decoded.append(hf(token[:, None], attention_mask=mask, position_ids=positions_from_mask(mask, 1),
                              past_key_values=cache).logits)
    return prefill, torch.cat(decoded, 1)


def layer_parameters(model_dir: Path, layers: list[int]) -> int:
    """Parameters of embeddings, final norm, untied head and the given decoder layers, from the full model."""
    hf = full_model(model_dir)
    shared = sum(p.numel() for p in hf.model.embed_tokens.parameters()) + sum(p.numel() for p in hf.model.norm.parameters())
    if not hf.config.tie_word_embeddings:
        shared += hf.lm_head.weight.numel()
    return shared + sum(p.numel() for i in layers for p in hf.model.layers[i].parameters())


def check_against_one_process(result, cases, held, tolerance=TOLERANCE):
    """Every case's logits and tokens equal one process; every rank holds exactly its layers' parameters;
    tensor parallel equals the original HF model."""
    real = result["data"]["mask"].bool()  # the padding positions' logits are garbage on both sides
    for name, case in cases.items():
        model_dir = Path(case["model"])
        got = result["logits"][name]
        prefill, decode, tokens = reference(model_dir, case["groups"], case["bypass"], result["data"],
                                            case.get("dropped", ()))
        assert (got["prefill"] - prefill)[real].abs().max() <= tolerance, name
        assert (got["decode"] - decode).abs().max() <= tolerance, name
        assert torch.equal(got["tokens"], tokens), name
        for rank, record in enumerate(result["ranks"][name]):
            assert record["layers"] == held[rank]
            assert record["parameters"] == layer_parameters(model_dir, held[rank])
    for model_dir in {case["model"] for case in cases.values()}:
        prefill, decode = original_hf(Path(model_dir), result["data"])
        tp = result["logits"][f"tensor_parallel:{model_dir}"]
        assert (tp["prefill"] - prefill)[real].abs().max() <= tolerance, model_dir
        assert (tp["decode"] - decode).abs().max() <= tolerance, model_dir


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tokenizer):
    """llama and mistral, groups 1-2 and 3-4, d = 0 and 1, all in one launch of 2 ranks."""
    out = tmp_path_factory.mktemp("two-ranks")
    cases = {}
    for family in ("llama", "mistral"):
        model_dir = save_model(out / family, tokenizer, family, 6)
        cases.update({f"{family}-d{d}": {"model": str(model_dir), "groups": [[1, 2], [3, 4]], "bypass": d}
                      for d in (0, 1)})
    cases["hybrid-llama"] = {"model": str(out / "llama"), "groups": [[1, 2]], "bypass": 1, "dropped": [0, 4]}
    return run_parity(out, 2, cases), cases


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_two_ranks_equal_one_process(two_ranks, family):
    result, cases = two_ranks
    mine = {name: case for name, case in cases.items() if name.startswith(family)}
    check_against_one_process(result, mine, held=[[0, 1, 3, 5], [0, 2, 4, 5]])


def test_two_ranks_hybrid_plan_holds_no_dropped_layer(two_ranks):
    result, cases = two_ranks
    mine = {name: case for name, case in cases.items() if name.startswith("hybrid")}
    check_against_one_process(result, mine, held=[[1, 3, 5], [2, 3, 5]])


def test_three_ranks_equal_one_process_with_a_shorter_group(tmp_path, tokenizer):
    """qwen2 (q/k/v biases), 6 heads over 3 KV heads; group 3-4 has no layer for rank 2."""
    model_dir = save_model(tmp_path / "model", tokenizer, "qwen2", 6, hidden_size=96, num_attention_heads=6,
                           num_key_value_heads=3)
    cases = {f"d{d}": {"model": str(model_dir), "groups": [[0, 1, 2], [3, 4]], "bypass": d} for d in (0, 1, 2)}
    check_against_one_process(run_parity(tmp_path, 3, cases), cases, held=[[0, 3, 5], [1, 4, 5], [2, 5]])


def test_head_split_keeps_each_rank_on_whole_kv_groups():
    from cqil.engines.distributed.tensor_parallel import head_split
    from cqil.model.errors import CqilError

    # SmolLM2: 9 query heads over 3 KV heads on 2 ranks -> 2 KV groups and 1.
    assert head_split(9, 3, 2) == [(range(6), range(2)), (range(6, 9), range(2, 3))]
    # Fewer KV heads than ranks: each KV head on 2 ranks, half its query heads each.
    assert head_split(8, 2, 4) == [(range(2), range(1)), (range(2, 4), range(1)),
                                   (range(4, 6), range(1, 2)), (range(6, 8), range(1, 2))]
    with pytest.raises(CqilError, match="cannot split 4 query heads over 2 KV heads"):
        head_split(4, 2, 3)


def test_generate_with_ranks_prints_what_one_process_prints(tiny_model_dir, capfd):
    from cqil.pipeline.cli import main

    argv = ["generate", "--model", str(tiny_model_dir("llama", 6)), "--groups", "1-2,3-4", "--bypass", "1",
            "--prompt", "The function", "--prompt", "A", "--max-new-tokens", "5"]
    assert main(argv) == 0
    one = capfd.readouterr().out
    assert main([*argv, "--ranks", "2", "--backend", "gloo"]) == 0
    assert capfd.readouterr().out == one


def test_bench_with_ranks_writes_what_the_gate_reads(tiny_model_dir, tmp_path, capfd):
    from cqil.engines.gate import load_bench
    from cqil.pipeline.cli import main

    out = tmp_path / "dist.json"
    assert main(["bench", "--ranks", "2", "--model", str(tiny_model_dir("llama", 6)), "--groups", "1-2,3-4",
                 "--bypass", "1", "--seq", "8", "--past", "8", "--prefill-repeats", "2", "--decode-repeats", "3",
                 "--warmup", "1", "--out", str(out)]) == 0
    bench = load_bench(out)  # the gate's own reader
    assert set(bench.scenarios) == {"prefill", "decode"}
    assert bench.scenarios["decode"].reference.n == 3 and bench.ideal_depth_ratio == pytest.approx(4 / 6)
    rows = json.loads(out.read_text())["scenarios"]["prefill"]["rows"]
    assert set(rows) == {"one_process", "tensor_parallel", "cqil"} and rows["cqil"]["n"] == 2
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    capfd.readouterr()
    assert main(["gate", str(out), "--max-ratio", "1000"]) == 0


def test_plan_that_does_not_fit_the_ranks_is_refused_before_launch(tiny_model_dir, capfd):
    from cqil.pipeline.cli import main

    argv = ["generate", "--model", str(tiny_model_dir("llama", 6)), "--groups", "1-2,3-4", "--prompt", "A"]
    assert main([*argv, "--ranks", "3"]) == 2
    assert "3 rank(s) do not fit the plan" in capfd.readouterr().err
    assert main([*argv, "--ranks", "2", "--backend", "nccl"]) == 2  # no CUDA here
    assert "--backend nccl needs CUDA GPUs" in capfd.readouterr().err


def test_every_rank_stops_with_one_line_when_one_fails_to_load():
    results = finish(start_ranks(2, "fail-load"), timeout=60)
    assert results[1][0] == 4 and results[1][2].strip().endswith("failed to load: OSError: disk on fire")
    assert results[0][0] == 4 and "rank 1 failed to load" in results[0][2]
    assert all(len(err.strip().splitlines()) == 1 for _, _, err in results)


def test_killed_rank_makes_the_other_exit_instead_of_hanging(tiny_model_dir):
    procs = start_ranks(2, "loop", str(tiny_model_dir("llama", 6)), timeout_s=10)
    assert procs[1].stdout.readline().strip() == "ready"
    time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    started = time.monotonic()
    (code, _, err), _ = finish(procs, timeout=30)
    assert code == 4 and "error: the run failed" in err and len(err.strip().splitlines()) == 1
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_default_model_two_ranks_equal_one_process(tmp_path):
    """SmolLM2-135M (pipeline.sources, cached after the first fetch), S15:30:2 d=1, 2 ranks on gloo;
    tensor parallel too (its 9 query heads split 6 + 3). Logits of this size (|logit| ~ 20) after 30
    layers differ by float reassociation of the all-reduced sums: measured 3.5e-5, so 1e-4 here."""
    from cqil.pipeline.sources import resolve_model_dir

    groups = [list(range(s, min(s + 2, 30))) for s in range(15, 30, 2)]
    cases = {"d1": {"model": str(resolve_model_dir(None)), "groups": groups, "bypass": 1}}
    held = [list(range(15)) + list(range(15 + r, 29, 2)) + [29] for r in (0, 1)]
    check_against_one_process(run_parity(tmp_path, 2, cases), cases, held, tolerance=1e-4)
