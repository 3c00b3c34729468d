"""Recovery by LoRA self-distillation: the loss, training, resume, merging and eval side by side."""

from __future__ import annotations

import json
import signal
import threading

import pytest
import torch
import torch.nn.functional as F
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.fsutil import sha256_file
from cqil.model.plan import CONFIG_KEY, identity_plan, plan_from_config, uniform_plan
from cqil.pipeline import recovery
from cqil.pipeline.adapters import RUN_RECORD, load_adapter
from cqil.pipeline.data import load_split
from cqil.pipeline.merge import BASE_KEY, merge_adapter
from cqil.pipeline.recovery import DataOrder, FinetuneSettings, distill_loss, finetune
from cqil.pipeline.sources import load_model

from tests.helpers import tiny_model

SEQ = 32
PLAN = uniform_plan(1, 5, 2, 6, bypass=1)
SETTINGS = FinetuneSettings(steps=24, lr=3e-3, warmup_steps=2, batch_size=4, rank=8, eval_every=12,
                            eval_chunks=12, save_every=0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread than on two shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def split(tokenizer):
    return load_split(tokenizer, None, None, SEQ)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, split):
    """One short recovery run on the tiny LLaMA (tied embeddings): (adapter dir, run record)."""
    out = tmp_path_factory.mktemp("recover") / "adapter"
    torch.set_num_threads(1)
    record = finetune(tiny_model("llama", 6), PLAN, split.train, split.held_out, SETTINGS, out, progress=False)
    return out, record


def test_distill_loss_is_mean_token_kl_teacher_to_student():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    p = teacher.softmax(-1)
    expected = (p * (p.log() - student.log_softmax(-1))).sum(-1).mean()
    assert torch.allclose(distill_loss(teacher, student), expected, atol=1e-6)
    assert float(distill_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def test_data_order_is_a_function_of_seed_and_index():
    chunks = torch.arange(10)[:, None]
    a, b = DataOrder(chunks, 3, 4), DataOrder(chunks, 3, 4)
    first_epoch = torch.cat([a.batch(0), a.batch(1), a.batch(2)[:2]]).flatten()
    assert sorted(first_epoch.tolist()) == list(range(10))  # every chunk once per epoch
    assert torch.equal(b.batch(7), a.batch(7))  # no hidden state: index 7 straight away
    assert not torch.equal(DataOrder(chunks, 4, 4).batch(0), a.batch(0))


def test_finetune_reduces_held_out_kl_and_saves_what_it_trained(trained, split):
    out, record = trained
    curve = [point["kl"] for point in record["held_out"]]
    assert [point["step"] for point in record["held_out"]] == [0, 12, 24]
    assert curve[-1] < 0.8 * curve[0], curve
    assert len(record["losses"]) == 24 and record["tokens_seen"] == 24 * 4 * SEQ
    assert record["seconds_per_step"] > 0 and record["peak_memory_mb"] > 0
    assert json.loads((out / RUN_RECORD).read_text())["losses"] == record["losses"]
    assert not (out.parent / "adapter.checkpoint").exists()

    # Independently: the saved adapter on a fresh copy of the base model gives the recorded KL.
    base = tiny_model("llama", 6)
    peft_model = load_adapter(base, out)
    student = CqilModel(base, PLAN)
    with torch.no_grad(), peft_model.disable_adapter():
        reference = [F.log_softmax(CqilModel(base, identity_plan(6))(c[None])[0], -1) for c in split.held_out[:12]]
    with torch.no_grad():
        kl = torch.stack([(r.exp() * (r - F.log_softmax(student(c[None])[0], -1))).sum(-1).mean()
                          for r, c in zip(reference, split.held_out[:12])]).mean()
    assert float(kl) == pytest.approx(curve[-1], rel=1e-4)


def test_finetune_trains_only_the_adapter(split, tmp_path):
    model = tiny_model("llama", 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = FinetuneSettings(steps=2, lr=1e-2, batch_size=2, rank=4, eval_chunks=2, save_every=0)
    finetune(model, PLAN, split.train, split.held_out, settings, tmp_path / "a", progress=False)
    after = model.state_dict()
    base_keys = [k.replace("base_layer.", "") for k in after if "lora_" not in k]
    changed = [k for k in after if "lora_" not in k and not torch.equal(after[k], before[k.replace("base_layer.", "")])]
    assert len(base_keys) == len(before) and changed == []


def test_resume_after_ctrl_c_reproduces_the_uninterrupted_run(split, tmp_path, monkeypatch):
    settings = FinetuneSettings(steps=6, lr=3e-3, warmup_steps=1, batch_size=2, grad_accum=2, rank=4,
                                dropout=0.1, eval_every=2, eval_chunks=4, save_every=0)
    whole = finetune(tiny_model("llama", 6), PLAN, split.train, split.held_out, settings, tmp_path / "whole",
                     progress=False)

    calls = {"n": 0}
    real_loss = recovery.distill_loss

    def interrupting_loss(teacher, student):
        calls["n"] += 1
        if calls["n"] == 9:  # during step 3 (two micro-batches of two rows per step): a real SIGINT
            signal.raise_signal(signal.SIGINT)
        return real_loss(teacher, student)

    monkeypatch.setattr(recovery, "distill_loss", interrupting_loss)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_model("llama", 6), PLAN, split.train, split.held_out, settings, out, progress=False)
    assert not out.exists()
    saved = torch.load(out.with_name("resumed.checkpoint") / "state.pt", weights_only=False)
    assert saved["run"]["step"] == 3
    with pytest.raises(CqilError, match="--resume"):
        finetune(tiny_model("llama", 6), PLAN, split.train, split.held_out, settings, out, progress=False)
    other = FinetuneSettings(**{**settings.__dict__, "lr": 1e-3})
    with pytest.raises(CqilError, match="--lr"):
        finetune(tiny_model("llama", 6), PLAN, split.train, split.held_out, other, out, resume=True, progress=False)

    monkeypatch.setattr(recovery, "distill_loss", real_loss)
    resumed = finetune(tiny_model("llama", 6), PLAN, split.train, split.held_out, settings, out, resume=True,
                       progress=False)
    assert resumed["losses"] == whole["losses"]
    assert resumed["held_out"] == whole["held_out"]
    assert sha256_file(out / "adapter_model.safetensors") == sha256_file(tmp_path / "whole" / "adapter_model.safetensors")


def test_merged_checkpoint_equals_unmerged_adapter_and_reloads_with_its_plan(trained, tiny_model_dir, tmp_path):
    adapter, _ = trained
    base_dir = tiny_model_dir("llama", 6)
    ids = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(1))

    loaded = load_model(base_dir)
    load_adapter(loaded.model, adapter)
    unmerged = CqilModel(loaded.model, PLAN)(ids)[0]

    first, second = tmp_path / "m1", tmp_path / "m2"
    merge_adapter(load_model(base_dir), PLAN, adapter, first)
    merge_adapter(load_model(base_dir), PLAN, adapter, second)
    hashes = {p.name: sha256_file(p) for p in sorted(first.iterdir())}
    assert hashes == {p.name: sha256_file(p) for p in sorted(second.iterdir())}

    merged = load_model(first)
    config = json.loads((first / "config.json").read_text())
    assert config[CONFIG_KEY] == PLAN.to_dict()
    assert config[BASE_KEY]["path"] == str(base_dir.resolve())
    plan = plan_from_config(merged.model.config)
    assert plan == PLAN
    assert merged.model.lm_head.weight is merged.model.model.embed_tokens.weight
    assert not any("lora" in name for name, _ in merged.model.named_modules())
    logits = CqilModel(merged.model, plan)(ids)[0]
    assert (logits - unmerged).abs().max() <= 1e-4
    assert (logits - CqilModel(load_model(base_dir).model, PLAN)(ids)[0]).abs().max() > 1e-3  # adapter did something


def test_cli_finetune_merge_eval(tiny_model_dir, tmp_path, capsys):
    from cqil.pipeline.cli import main

    model = str(tiny_model_dir("llama", 6))
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    common = ["--seq-len", "32", "--max-chunks", "64"]
    assert main(["finetune", "--model", model, "--uniform", "1:5:2", "--bypass", "1", "--steps", "3",
                 "--rank", "4", "--lr", "1e-2", "--batch-size", "2", "--eval-chunks", "2", "--out", str(adapter),
                 *common]) == 0
    assert main(["merge", "--model", model, "--adapter", str(adapter), "--out", str(merged)]) == 0
    capsys.readouterr()

    assert main(["eval", "--model", model, "--adapter", str(adapter), "--json", *common]) == 0
    with_adapter = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(merged), "--json", *common]) == 0
    from_merged = json.loads(capsys.readouterr().out)
    for result in (with_adapter, from_merged):
        assert set(result) >= {"original", "cqil_no_adapter", "cqil"}
        assert (result["plan"]["groups"], result["plan"]["bypass"]) == ([list(g) for g in PLAN.groups], 1)
    assert from_merged["base_model"]["path"] == model
    for name in ("original", "cqil_no_adapter", "cqil"):
        for metric, value in with_adapter[name].items():
            assert from_merged[name][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, metric)
    assert with_adapter["cqil"]["kl"] != pytest.approx(with_adapter["cqil_no_adapter"]["kl"], rel=1e-3)

    assert main(["eval", "--model", str(merged), *common]) == 0
    table = capsys.readouterr().out
    assert "cqil+adapter" in table and "original" in table


def test_finetune_refuses_bad_options(split, tmp_path):
    with pytest.raises(CqilError, match="--targets wq"):
        finetune(tiny_model("llama", 6), PLAN, split.train, split.held_out,
                 FinetuneSettings(steps=1, targets=("wq",)), tmp_path / "a", progress=False)
    with pytest.raises(CqilError, match="--batch-size"):
        finetune(tiny_model("llama", 6), PLAN, split.train[:2], split.held_out,
                 FinetuneSettings(steps=1, batch_size=4), tmp_path / "a", progress=False)
    with pytest.raises(CqilError, match="no checkpoint"):
        finetune(tiny_model("llama", 6), PLAN, split.train, split.held_out,
                 FinetuneSettings(steps=1), tmp_path / "a", resume=True, progress=False)


def test_stalled_is_true_only_when_the_last_points_bring_nothing():
    assert recovery.stalled([0.5, 0.5, 0.5, 0.5], patience=3)  # flat
    assert not recovery.stalled([0.5, 0.5, 0.5], patience=3)  # too few points to tell
    assert not recovery.stalled([1.0, 0.9, 0.8, 0.7, 0.6], patience=3)  # still improving
    assert recovery.stalled([1.0, 0.5, 0.5, 0.499, 0.51], patience=3)  # 0.2 % better is no improvement
    assert not recovery.stalled([1.0, 0.5, 0.5, 0.49, 0.51], patience=3)  # 2 % better is
    assert not recovery.stalled([0.5] * 10, patience=0)  # patience 0: never stops


def test_a_flat_run_stops_early_and_saves_its_adapter(split, tmp_path):
    # lr 1e-9: the adapters barely move, so the held-out KL stays flat from the first point on.
    settings = FinetuneSettings(steps=20, lr=1e-9, batch_size=2, rank=4, eval_every=2, eval_chunks=4,
                                save_every=0, patience=2)
    record = finetune(tiny_model("llama", 6), PLAN, split.train, split.held_out, settings, tmp_path / "a",
                      progress=False)
    kls = [point["kl"] for point in record["held_out"]]
    assert [point["step"] for point in record["held_out"]] == [0, 2, 4]
    assert max(kls) / min(kls) < 1.001  # the curve was flat indeed
    assert record["stopped_early"] and record["steps"] == 4 and len(record["losses"]) == 4
    assert record["tokens_seen"] == 4 * 2 * SEQ
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_patience_needs_held_out_points():
    with pytest.raises(CqilError, match="--patience 2 needs"):
        FinetuneSettings(steps=10, eval_every=0, patience=2).check(100)


def _trainer(split, **overrides):
    settings = FinetuneSettings(**{**SETTINGS.__dict__, "max_grad_norm": 0.0, **overrides})
    torch.manual_seed(0)
    return recovery.DistillTrainer(tiny_model("llama", 6), PLAN, split.train, split.held_out, settings,
                                   progress=False)


def _text_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean -log p(next token), gathered by hand."""
    log_probs = logits[:, :-1].log_softmax(-1)
    return -log_probs.gather(-1, tokens[:, 1:, None]).mean()


@pytest.mark.parametrize("label_weight", [0.0, 0.5])
def test_a_step_of_rows_in_threads_has_the_gradient_of_the_whole_batch(split, label_weight):
    """Against one batch through the same modules, backward on the batch's mean loss (the textbook step):
    the distillation KL, plus the text's next-token cross-entropy times `label_weight`."""
    trainer = _trainer(split, batch_size=3, grad_accum=2, label_weight=label_weight)
    reference = _trainer(split, batch_size=3, grad_accum=2)
    loss = trainer.step()

    expected_loss = 0.0
    for micro in range(2):
        batch = reference.order.batch(micro)
        with torch.no_grad():
            teacher_logits = reference.teacher(batch)[0]
        student_logits = reference.student(batch)[0]
        micro_loss = (distill_loss(teacher_logits, student_logits)
                      + label_weight * _text_nll(student_logits, batch)) / 2
        micro_loss.backward()
        expected_loss += micro_loss.item()
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for ours, theirs in zip(trainer.trainable, reference.trainable):
        assert theirs.grad is not None and torch.allclose(ours.grad, theirs.grad, rtol=1e-4, atol=1e-7)


def test_each_row_runs_in_a_worker_thread_with_its_share_of_the_threads(split):
    """Why rows run apart: no operator waits for a descheduled sibling (module docstring of recovery)."""
    torch.set_num_threads(4)
    trainer = _trainer(split, batch_size=2)
    seen = []
    embed = trainer.student.hf.get_input_embeddings()
    embed.register_forward_pre_hook(lambda module, args: seen.append(
        (threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled(), args[0].shape[0])))
    trainer.step()
    assert torch.get_num_threads() == 4  # the caller's own setting is left alone
    assert len(seen) == 4  # teacher and student for each of 2 rows
    assert all(ident != threading.get_ident() and threads == 2 and rows == 1 for ident, threads, _, rows in seen)
    assert sorted(grad for _, _, grad, _ in seen) == [False, False, True, True]


def test_rows_in_threads_give_the_same_bytes_every_run(split):
    """Each row's arithmetic and the summing order are fixed, whichever thread finishes first."""
    runs = []
    for _ in range(2):
        trainer = _trainer(split, batch_size=4)
        losses = [trainer.step() for _ in range(2)]
        runs.append((losses, [p.detach().clone() for p in trainer.trainable]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
