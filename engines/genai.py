"""ONNX Runtime GenAI: its Model and Generator run an exported folder (genai_config.json beside the ONNX).

Used by the tests, to hold its greedy tokens to `cqil generate`, and by scripts/genai_bench.py, to time
decode steps of our exports against the model builder's export under the same generator.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cqil.export.genai_config import GENAI_CONFIG_FILE
from cqil.model.errors import CqilError


class GenaiModel:
    """An `onnxruntime_genai.Model` on the CPU with the token ids its genai_config.json names."""

    def __init__(self, folder: Path, threads: int | None = None):
        import onnxruntime_genai as og

        folder = Path(folder)
        path = folder / GENAI_CONFIG_FILE
        if not path.is_file():
            raise CqilError(f"'{folder}' has no {GENAI_CONFIG_FILE}: export it again with `cqil export`")
        settings = json.loads(path.read_text())["model"]
        eos = settings.get("eos_token_id")
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad = int(settings.get("pad_token_id") or 0)
        config = og.Config(str(folder))
        config.clear_providers()  # the CPU
        if threads:
            options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def _generator(self, prompts: Sequence[Sequence[int]], max_length: int, min_length: int = 0) -> Any:
        import numpy as np
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=max_length, min_length=min_length,
                                  batch_size=len(prompts))
        generator = og.Generator(self.model, params)
        longest = max(len(p) for p in prompts)
        # The runtime reads trailing pad tokens as padding (masked, positions continue after the last
        # real token): the same computation as our left-padded batches, so the same greedy tokens.
        rows = [list(p) + [self.pad] * (longest - len(p)) for p in prompts]
        generator.append_tokens(np.array(rows, dtype=np.int32))
        return generator

    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy new tokens for each prompt of a batch; a row ends with its EOS token, as in `greedy_generate`."""
        generator = self._generator(prompts, max(len(p) for p in prompts) + max_new_tokens)
        new: list[list[int]] = [[] for _ in prompts]
        while not generator.is_done():
            generator.generate_next_token()
            for row, token in zip(new, generator.get_next_tokens()):
                if len(row) < max_new_tokens and not (row and row[-1] in self.eos):
                    row.append(int(token))
        return new

    def prefill_seconds(self, prompt: Sequence[int]) -> float:
        """Wall time of the prefill of `prompt` (batch 1): appending the tokens runs the decoder on all of them."""
        import numpy as np
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + 1)
        generator = og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens(np.array([list(prompt)], dtype=np.int32))
        return time.perf_counter() - start

    def decode_step_seconds(self, prompt: Sequence[int], steps: int) -> list[float]:
        """Wall time of each of `steps` decode steps after the prefill, batch 1; EOS does not stop it."""
        length = len(prompt) + steps + 1
        generator = self._generator([prompt], length, min_length=length)
        generator.generate_next_token()  # picks the first token from the prefill's logits: no model run
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            generator.generate_next_token()  # runs the decoder on the last token, then picks the next
            times.append(time.perf_counter() - start)
        return times
