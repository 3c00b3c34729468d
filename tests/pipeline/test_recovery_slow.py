"""Recovery on the real default model (SmolLM2-135M): a few distillation steps run and help."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_a_few_finetune_steps_on_the_default_model_lower_held_out_kl(tmp_path):
    from cqil.model.plan import parse_uniform_spec
    from cqil.pipeline.adapters import validate_adapter
    from cqil.pipeline.data import load_split
    from cqil.pipeline.recovery import FinetuneSettings, finetune
    from cqil.pipeline.sources import load_model

    loaded = load_model(None)
    plan = parse_uniform_spec("15:30:2", 30, bypass=1)
    split = load_split(loaded.tokenizer, None, None, seq_len=64)
    settings = FinetuneSettings(steps=4, lr=1e-3, batch_size=2, eval_every=0, eval_chunks=4, save_every=0)
    record = finetune(loaded.model, plan, split.train, split.held_out, settings, tmp_path / "adapter", progress=False)
    before, after = record["held_out"][0], record["held_out"][-1]
    assert after["step"] == 4 and after["kl"] < before["kl"]
    assert record["trainable_parameters"] == 30 * 32 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    validate_adapter(tmp_path / "adapter", load_model(None).model)
