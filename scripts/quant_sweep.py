"""Held-out quality of int8/int4 recipes on one fp32 export, without exporting again: how docs/export.md's
table of quantization recipes was measured.

    python scripts/quant_sweep.py FP32_EXPORT_DIR --chunks 8 \
        --recipe '{"method": "rtn"}' --recipe '{"method": "rtn", "block_size": 16}' --recipe '{"precision": "int8"}'

The folder's graph is loaded once (weights in memory); each recipe (`export.precision.Quantization` fields,
plus "precision": int4 by default) is applied by the same `quantize` that `cqil export` runs, then the
quantized graph and the fp32 one prefill the first `--chunks` held-out chunks of the default text (128
tokens) in ONNX Runtime. Printed per recipe, one JSON line: top-1 agreement and mean KL against the
fp32 file's logits, the perplexity ratio, the seconds of quantization and the initializers' size. The fp32
file matches PyTorch to ~1e-4 (`cqil validate`), so "against the fp32 file" is against the fp32 model.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
import torch.nn.functional as F
from cqil.export.precision import Quantization, constant_weights, quantize
from cqil.pipeline.data import load_split
from transformers import AutoTokenizer


def feeds(proto, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """A prefill of `ids` [1, n] from an empty cache, fed by the graph's own input names."""
    names = [value.name for value in proto.graph.input]
    past = next(value for value in proto.graph.input if value.name.startswith("past_key_values."))
    dims = [dim.dim_value for dim in past.type.tensor_type.shape.dim]
    n = ids.shape[1]
    out = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, n), np.int64),
           "position_ids": np.arange(n)[None]}
    out.update({name: np.zeros((1, dims[1], 0, dims[3]), np.float32) for name in names
                if name.startswith("past_key_values.")})
    return {name: value for name, value in out.items() if name in names}


def logits(proto, chunks: torch.Tensor, threads: int) -> torch.Tensor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return torch.cat([torch.from_numpy(session.run(["logits"], feeds(proto, chunks[i:i + 1]))[0])
                      for i in range(len(chunks))]).double()


def perplexity(log_probs: torch.Tensor, chunks: torch.Tensor) -> float:
    return math.exp(float(-log_probs[:, :-1].gather(-1, chunks[:, 1:, None]).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an fp32 `cqil export` folder (portable target)")
    parser.add_argument("--recipe", action="append", required=True, help="JSON: Quantization fields and 'precision'")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    chunks = load_split(AutoTokenizer.from_pretrained(args.folder), None, None, 128).held_out[: args.chunks]
    model = ir.external_data.load_to_model(ir.load(args.folder / "model.onnx"))
    constant_weights(model.graph)
    fp32 = ir.to_proto(model)
    del model
    reference = F.log_softmax(logits(fp32, chunks, args.threads), -1)
    print(json.dumps({"folder": str(args.folder), "perplexity": perplexity(reference, chunks),
                      "positions": reference.shape[0] * reference.shape[1]}), flush=True)
    for text in args.recipe:
        recipe = json.loads(text)
        precision = recipe.pop("precision", "int4")
        if "int8_matmuls" in recipe:
            recipe["int8_matmuls"] = tuple(recipe["int8_matmuls"])
        start = time.perf_counter()
        quantized = quantize(copy.deepcopy(fp32), precision, Quantization(**recipe))
        seconds = time.perf_counter() - start
        log_probs = F.log_softmax(logits(quantized, chunks, args.threads), -1)
        kl = float((reference.exp() * (reference - log_probs)).sum(-1).mean())
        top1 = float((reference.argmax(-1) == log_probs.argmax(-1)).double().mean())
        size = sum(len(init.raw_data) for init in quantized.graph.initializer) / 1e6
        print(json.dumps({"precision": precision, **recipe, "top1": round(top1, 4), "kl": round(kl, 4),
                          "ppl_ratio": round(perplexity(log_probs, chunks) / perplexity(reference, chunks), 4),
                          "quantize_s": round(seconds, 1), "initializers_mb": round(size, 1)}), flush=True)


if __name__ == "__main__":
    main()
