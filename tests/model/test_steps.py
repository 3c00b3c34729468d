"""model/steps.py: the one step harness, held to independent computations on tiny models.

HF's own forward without a cache (the whole sequence at once) is the independent reference for
prefill-then-decode; a step that is not `CqilModel` (HFStep) must give `CqilModel`'s logits.
"""

from __future__ import annotations

import torch
from cqil.model.cqil import CqilModel
from cqil.model.plan import Plan, from_parallel_groups, identity_plan
from cqil.model.steps import HFStep, forced, greedy_generate, prefill_then_decode, timing_calls

from tests.helpers import tiny_model

TOL = 1e-5


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 384, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_prefill_then_decode_equals_the_whole_sequence_at_once():
    hf = tiny_model("llama", 4).eval()
    ids = _ids(2, 9)
    full = hf(ids).logits  # no cache: the independent computation
    for step in (HFStep(hf), CqilModel(hf, identity_plan(4))):
        outputs = list(prefill_then_decode(step, ids[:, :6], torch.ones(2, 6, dtype=torch.long), forced(ids[:, 6:])))
        assert len(outputs) == 1 + 3  # the prefill, then one output per forced token
        assert (outputs[0][0] - full[:, :6]).abs().max() < TOL
        for index, (logits, presents) in enumerate(outputs[1:]):
            assert (logits[:, 0] - full[:, 6 + index]).abs().max() < TOL
            assert presents[0].shape[2] == 7 + index  # each step chains on its own, grown cache


@torch.no_grad()
def test_hf_step_and_cqil_model_agree_on_a_left_padded_batch_and_generate_the_same_tokens():
    hf = tiny_model("qwen2", 4).eval()
    ids = _ids(2, 7, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    cqil = CqilModel(hf, identity_plan(4))
    for (hf_logits, hf_past), (logits, past) in zip(
            prefill_then_decode(HFStep(hf), ids, mask, forced(ids[:, :2])),
            prefill_then_decode(cqil, ids, mask, forced(ids[:, :2]))):
        masked = mask[:, -hf_logits.shape[1]:].bool() if hf_logits.shape[1] > 1 else slice(None)
        assert (hf_logits[masked] - logits[masked]).abs().max() < TOL
        real = torch.cat((mask, torch.ones(2, 2, dtype=torch.long)), 1)[:, :past[0].shape[2]].bool()
        # Padding rows attend to nothing: only the cache of real tokens is defined.
        assert max(float((a.transpose(1, 2)[real] - b.transpose(1, 2)[real]).abs().max())
                   for a, b in zip(hf_past, past)) < TOL
    assert torch.equal(greedy_generate(HFStep(hf), ids, mask, 5), greedy_generate(cqil, ids, mask, 5))


def test_greedy_generate_stops_when_every_row_has_ended():
    model = CqilModel(tiny_model("llama", 4).eval(), Plan(((0,), (1, 2), (3,)), 1))
    ids = _ids(2, 5, seed=2)
    free = greedy_generate(model, ids, torch.ones_like(ids), 6)
    eos = int(free[0, 1])  # row 0 emits it second: from then on row 0 repeats it
    stopped = greedy_generate(model, ids, torch.ones_like(ids), 6, eos_token_id=eos)
    assert stopped[0, :2].tolist() == free[0, :2].tolist() and set(stopped[0, 1:].tolist()) == {eos}
    # Rows are independent: each matches its free run up to its first EOS; decoding ends when all have one.
    firsts = [row.index(eos) if eos in row else None for row in free.tolist()]
    length = 6 if None in firsts else max(firsts) + 1
    assert stopped.shape[1] == length
    for row, first in enumerate(firsts):
        assert stopped[row, :(first if first is not None else 6)].tolist() == free[row, :(first if first is not None else 6)].tolist()

@torch.no_grad()
def test_timing_calls_repeat_one_step_over_a_cache_that_does_not_grow():
    hf = tiny_model("mistral", 4).eval()
    model = CqilModel(hf, Plan(((0, 1), (2, 3)), 0))
    ids = _ids(1, 10, seed=3)
    for step in (model, HFStep(hf)):
        prefill, decode = timing_calls(step, ids, past_len=6)
        first, second = decode(), decode()
        assert torch.equal(first[0], second[0]) and first[1][0].shape[2] == second[1][0].shape[2] == 7
        assert prefill()[0].shape == (1, 4, 384)
    # Against the model called directly: the prefill is ids[:, 6:] alone, the decode ids[:, :1] after ids[:, :6].
    _, past = model(ids[:, :6])
    prefill, decode = timing_calls(model, ids, past_len=6)
    assert torch.equal(prefill()[0], model(ids[:, 6:])[0])
    assert torch.equal(decode()[0], model(ids[:, :1], past_key_values=past)[0])


def _cqil() -> CqilModel:
    """The model these two tests used in tests/model/test_cqil_model.py: 6 layers, groups 0-1 and 2-4, d = 1."""
    return CqilModel(tiny_model("llama", 6), from_parallel_groups([[0, 1], [2, 3, 4]], 6, 1))


def test_greedy_generate_matches_manual_argmax_loop():
    model = _cqil()
    ids = torch.randint(3, model.hf.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        new = greedy_generate(model, ids, torch.ones_like(ids), max_new_tokens=5)
        seq = ids
        for _ in range(5):
            token = model(seq)[0][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], 1)
    assert new.tolist() == seq[:, 6:].tolist()


def test_greedy_generate_left_padded_batch_matches_single_rows():
    model = _cqil()
    vocab = model.hf.config.vocab_size
    short = torch.randint(3, vocab, (1, 4), generator=torch.Generator().manual_seed(5))
    long = torch.randint(3, vocab, (1, 7), generator=torch.Generator().manual_seed(6))
    batch = torch.cat([torch.cat([torch.full((1, 3), 2), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    new = greedy_generate(model, batch, mask, max_new_tokens=4)
    assert new[0].tolist() == greedy_generate(model, short, torch.ones_like(short), 4)[0].tolist()
    assert new[1].tolist() == greedy_generate(model, long, torch.ones_like(long), 4)[0].tolist()
