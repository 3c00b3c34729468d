"""Optimum loads an exported folder, tokenizer included, and generates our greedy tokens.

    python scripts/check_optimum.py OUT/onnx [--prompt TEXT ...] [--max-new-tokens N] [--venv DIR]

Optimum pins transformers < 4.58 while this project runs 5.x, so the check runs in a virtualenv of its
own (default: <cqil cache>/venvs/optimum-onnx-0.1.0, made once with pip: optimum-onnx[onnxruntime]
and the CPU torch of this venv). There `AutoTokenizer.from_pretrained(folder)` and
`ORTModelForCausalLM.from_pretrained(folder)` load the folder and greedily generate from each prompt
(chat template applied, as `cqil generate` does); here our tokenizer (transformers 5) and our ONNX
Runtime runner with `greedy_generate` do the same. Prompt ids, chat text and new tokens must agree.
Exit status 0 when they do, 1 when not (what differs is printed), 2 when the check cannot run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPTIMUM = "optimum-onnx[onnxruntime]==0.1.0"
PROMPTS = ("What is Python?", "Name three uses of a dictionary.")

# Runs inside the Optimum virtualenv: prints what its transformers and Optimum make of the folder.
CHILD = r"""
import json, sys
import transformers
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer

folder, max_new, messages = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = ORTModelForCausalLM.from_pretrained(folder, provider="CPUExecutionProvider")
results = []
for message in messages:
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True) if tokenizer.chat_template else message
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=max_new, do_sample=False)
    results.append({"text": text, "prompt_ids": batch["input_ids"][0].tolist(),
                    "new": out[0, batch["input_ids"].shape[1]:].tolist()})
print(json.dumps({"transformers": transformers.__version__, "tokenizer_class": type(tokenizer).__name__,
                  "results": results}))
"""


def default_venv() -> Path:
    from cqil.model.fsutil import cache_dir

    return cache_dir() / "venvs" / "optimum-onnx-0.1.0"


def ensure_venv(venv: Path) -> Path:
    """The Optimum virtualenv's python, made once (in a temporary sibling renamed into place)."""
    python = venv / "bin" / "python"
    if python.is_file():
        return python
    torch = "torch==" + metadata.version("torch").split("+")[0]  # the same CPU build pip found for this venv
    print(f"making {venv} ({OPTIMUM}, {torch}; a few minutes, once) ...", file=sys.stderr)
    venv.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{venv.name}.", dir=venv.parent))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
        subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", torch, OPTIMUM], check=True)
        tmp.rename(venv)  # bin/python still works after the move (only pip's own scripts name the folder)
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"check_optimum: could not make {venv} ({exc}): check that pip reaches PyPI") from exc
    return python


def theirs(python: Path, folder: Path, messages: list[str], max_new: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": ""}
    result = subprocess.run([str(python), "-c", CHILD, str(folder), str(max_new), json.dumps(messages)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-8:])
        raise SystemExit(f"check_optimum: Optimum failed on {folder}:\n{tail}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def ours(folder: Path, texts: list[str], max_new: int) -> list[dict]:
    import torch
    from cqil.engines.onnxruntime import OrtRunner
    from cqil.model.steps import greedy_generate
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    runner = OrtRunner(folder)
    results = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        new = greedy_generate(runner, ids, torch.ones_like(ids), max_new, tokenizer.eos_token_id)[0].tolist()
        results.append({"prompt_ids": ids[0].tolist(), "new": new})
    return results


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[:index + 1]
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a `cqil export` folder (model.onnx, config, tokenizer)")
    parser.add_argument("--prompt", action="append", help="user message (repeat; default: two built in)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--venv", type=Path, default=None, help="Optimum virtualenv (made when missing)")
    args = parser.parse_args(argv)
    if not (args.folder / "model.onnx").is_file():
        print(f"check_optimum: '{args.folder}' has no model.onnx: pass a `cqil export` folder", file=sys.stderr)
        return 2
    messages = args.prompt or list(PROMPTS)
    report = theirs(ensure_venv(args.venv or default_venv()), args.folder, messages, args.max_new_tokens)
    mine = ours(args.folder, [r["text"] for r in report["results"]], args.max_new_tokens)
    eos = json.loads((args.folder / "generation_config.json").read_text()).get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos])
    print(f"Optimum (transformers {report['transformers']}, {report['tokenizer_class']}) on {args.folder}")
    ok = True
    for message, their, our in zip(messages, report["results"], mine):
        same_ids = their["prompt_ids"] == our["prompt_ids"]
        same_new = until_eos(their["new"], eos) == until_eos(our["new"], eos)
        ok &= same_ids and same_new
        print(f"  {message!r}: prompt ids {'same' if same_ids else 'DIFFER'} ({len(our['prompt_ids'])}), "
              f"new tokens {'same' if same_new else 'DIFFER'} ({len(until_eos(our['new'], eos))})")
        if not same_new:
            print(f"    Optimum {their['new']}\n    ours    {our['new']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
