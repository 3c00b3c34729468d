"""In-flight batching (engines/triton_text_scheduler.py) without a server: the scheduler stepped by hand over
the tiny CQIL export, held to a plain batch-1 greedy loop over the same graph written here."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from cqil.engines.triton_text_scheduler import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    BatchCache,
    Decoder,
    Job,
    Metrics,
    QueueFull,
    Sampling,
    Scheduler,
)
from cqil.export.last_logits import keep_last_position_logits

EOS = 2  # tests/helpers.py: eos_token_id of the tiny models
# Prompts of different lengths (token ids of the tiny vocabulary), joining at different steps.
PROMPTS = ([5, 17, 200, 33], [9, 9, 40, 41, 42, 43, 44, 45, 46, 47, 300], [120], [7, 8, 250, 251, 252, 31, 60])


@pytest.fixture(scope="module", params=["every-position", "last-position"])
def session(request, tiny_cqil_onnx):
    """The export's graph (logits at every position) and the graph `cqil triton` serves (the last only)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    model = onnx.load(str(tiny_cqil_onnx[1] / "model.onnx"))
    if request.param == "last-position":
        model = keep_last_position_logits(model)
    return onnxruntime.InferenceSession(model.SerializeToString(), sess_options=options,
                                        providers=["CPUExecutionProvider"])


def alone(session, prompt: list[int], max_tokens: int, stop_at_eos: bool = True) -> list[int]:
    """Greedy tokens of one prompt, batch 1, feeding each step's presents back (the contract's own loop)."""
    past_inputs = [v for v in session.get_inputs() if v.name.startswith("past_key_values.")]
    outputs = [v.name for v in session.get_outputs()]
    kv, dim = past_inputs[0].shape[1], past_inputs[0].shape[3]
    past = {v.name: np.zeros((1, kv, 0, dim), dtype=np.float32) for v in past_inputs}
    ids, done, tokens = list(prompt), 0, []
    while len(tokens) < max_tokens:
        total = done + len(ids)
        result = dict(zip(outputs, session.run(outputs, {
            "input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, total), dtype=np.int64),
            "position_ids": np.arange(done, total, dtype=np.int64)[None], **past})))
        token = int(np.argmax(result["logits"][0, -1]))
        if token == EOS and stop_at_eos:
            break
        tokens.append(token)
        past = {name: result[name.replace("past_key_values.", "present.")] for name in past}
        ids, done = [token], total
    return tokens


class Record(Metrics):
    def __init__(self):
        self.rows, self.generated, self.queued, self.first, self.refused = [], 0, [], [], 0

    def step(self, rows):
        self.rows.append(rows)

    def tokens(self, count):
        self.generated += count

    def queue(self, length):
        self.queued.append(length)

    def first_token(self, seconds):
        self.first.append(seconds)

    def rejected(self):
        self.refused += 1


class Collect:
    """A job's callbacks: the tokens it got and how it ended."""

    def __init__(self, prompt, max_tokens, sampling=Sampling(), stop_after: int | None = None):
        self.tokens, self.finish, self.cancel = [], [], False
        self.stop_after = stop_after
        self.job = Job(prompt, max_tokens, self.on_token, self.on_finish, sampling, lambda: self.cancel)

    def on_token(self, token):
        self.tokens.append(token)
        return self.stop_after is None or len(self.tokens) < self.stop_after

    def on_finish(self, reason, error):
        self.finish.append((reason, error))


def make(session, **kwargs) -> tuple[Scheduler, Record]:
    record = Record()
    return Scheduler(Decoder(session, {EOS}), metrics=record, **kwargs), record


def test_batched_steps_give_every_request_its_tokens_alone(session):
    scheduler, record = make(session, max_batch=8)
    limits = (12, 7, 15, 9)
    jobs = [Collect(prompt, limit) for prompt, limit in zip(PROMPTS, limits)]
    ignore = Collect(PROMPTS[0], 10, Sampling(ignore_eos=True))
    scheduler.submit(jobs[0].job)
    for step in range(40):  # requests join at steps 0, 2, 3, 6 and 6: different lengths, different times
        if step == 2:
            scheduler.submit(jobs[1].job)
        if step == 3:
            scheduler.submit(jobs[2].job)
        if step == 6:
            scheduler.submit(jobs[3].job)
            scheduler.submit(ignore.job)
        scheduler.step()
    assert scheduler.idle() and scheduler.cache.tensors == []  # every row left and freed its cache
    for collect, prompt, limit in zip(jobs, PROMPTS, limits):
        assert collect.tokens == alone(session, prompt, limit)
        assert len(collect.finish) == 1 and collect.finish[0][1] is None
    assert ignore.tokens == alone(session, PROMPTS[0], 10, stop_at_eos=False) and len(ignore.tokens) == 10
    assert max(record.rows) == 5  # all five were in one graph call
    assert record.generated == sum(len(c.tokens) for c in (*jobs, ignore))
    assert len(record.first) == 5


def test_rows_leave_at_once_and_the_cache_shrinks(session):
    scheduler, _ = make(session)
    long, short = Collect(PROMPTS[1], 20, Sampling(ignore_eos=True)), Collect(PROMPTS[2], 3, Sampling(ignore_eos=True))
    scheduler.submit(long.job)
    scheduler.submit(short.job)
    scheduler.step()  # both prefilled (first tokens sent), one decode step
    assert len(scheduler.rows) == 2 and scheduler.cache.lengths == [12, 2]
    assert scheduler.cache.width == 12  # the short row is padded on the left
    scheduler.step()  # the short row's third token: it finishes and leaves
    assert short.finish == [(FINISH_LENGTH, None)] and len(short.tokens) == 3
    assert len(scheduler.rows) == 1 and scheduler.cache.tensors[0].shape[0] == 1
    assert scheduler.cache.width == scheduler.cache.lengths[0] == 13
    while not scheduler.idle():
        scheduler.step()
    assert long.tokens == alone(session, PROMPTS[1], 20, stop_at_eos=False)


def test_cancellation_frees_the_row_and_the_others_go_on(session):
    scheduler, _ = make(session)
    kept, gone = Collect(PROMPTS[0], 10, Sampling(ignore_eos=True)), Collect(PROMPTS[3], 30, Sampling(ignore_eos=True))
    scheduler.submit(gone.job)
    scheduler.submit(kept.job)
    for _ in range(3):
        scheduler.step()
    gone.cancel = True
    scheduler.step()
    assert gone.finish == [(FINISH_CANCELLED, None)] and len(gone.tokens) == 4
    assert len(scheduler.rows) == 1 and scheduler.cache.tensors[0].shape[0] == 1
    assert scheduler.cache.width == scheduler.cache.lengths[0]  # its padding went with it
    waiting = Collect(PROMPTS[1], 5)
    waiting.cancel = True  # cancelled while it waited: never prefilled
    scheduler.submit(waiting.job)
    while not scheduler.idle():
        scheduler.step()
    assert waiting.finish == [(FINISH_CANCELLED, None)] and waiting.tokens == []
    assert kept.tokens == alone(session, PROMPTS[0], 10, stop_at_eos=False)


def test_queue_and_batch_limits(session):
    scheduler, record = make(session, max_batch=2, max_queue=2)
    jobs = [Collect(prompt, 4, Sampling(ignore_eos=True)) for prompt in PROMPTS]
    scheduler.submit(jobs[0].job)
    scheduler.submit(jobs[1].job)
    with pytest.raises(QueueFull, match="queue is full"):
        scheduler.submit(jobs[2].job)
    assert record.refused == 1 and jobs[2].finish == []
    scheduler.step()  # both admitted: the queue has room again
    scheduler.submit(jobs[2].job)
    scheduler.submit(jobs[3].job)
    while not scheduler.idle():
        scheduler.step()
    assert max(record.rows) == 2  # never more rows than max_batch
    for collect, prompt in zip(jobs, PROMPTS):
        assert collect.tokens == alone(session, prompt, 4, stop_at_eos=False)


def test_a_stop_from_the_job_and_a_failing_graph_call(session):
    scheduler, _ = make(session)
    stopped = Collect(PROMPTS[0], 10, Sampling(ignore_eos=True), stop_after=3)
    ended = Collect(PROMPTS[1], 3, Sampling(ignore_eos=True))
    going = Collect(PROMPTS[3], 8, Sampling(ignore_eos=True))
    for collect in (stopped, ended, going):
        scheduler.submit(collect.job)
    scheduler.step()
    scheduler.step()  # the first two leave in the same step, for different reasons
    assert stopped.finish == [("stop", None)] and ended.finish == [(FINISH_LENGTH, None)]
    assert len(stopped.tokens) == 3 and len(ended.tokens) == 3 and len(scheduler.rows) == 1
    while not scheduler.idle():
        scheduler.step()
    assert going.tokens == alone(session, PROMPTS[3], 8, stop_at_eos=False)

    broken, fine = Collect(PROMPTS[0], 5), Collect(PROMPTS[1], 5)
    real_run = scheduler.decoder.run
    scheduler.submit(broken.job)
    scheduler.step()  # prefilled; now the decode step fails
    scheduler.decoder.run = lambda *args: (_ for _ in ()).throw(RuntimeError("out of memory"))
    scheduler.step()
    assert broken.finish == [("stop", "RuntimeError: out of memory")] and scheduler.cache.tensors == []
    scheduler.decoder.run = real_run
    scheduler.submit(fine.job)  # the model serves the next one
    while not scheduler.idle():
        scheduler.step()
    assert fine.tokens == alone(session, PROMPTS[1], 5) and fine.finish[0][1] is None


def test_the_thread_serves_until_close(session):
    scheduler, record = make(session)
    scheduler.start()
    jobs = [Collect(prompt, 6) for prompt in PROMPTS]
    for collect in jobs:
        scheduler.submit(collect.job)
    scheduler.close()  # finishes what was accepted
    for collect, prompt in zip(jobs, PROMPTS):
        assert collect.tokens == alone(session, prompt, 6) and len(collect.finish) == 1
    with pytest.raises(QueueFull, match="shutting down"):
        scheduler.submit(Collect(PROMPTS[0], 2).job)


def test_batch_cache_alignment():
    cache = BatchCache()
    row = lambda length, value: [np.full((1, 1, length, 2), value, dtype=np.float32)]  # noqa: E731
    cache.add(row(2, 1.0), [2])
    cache.add(row(4, 2.0), [4])  # longer: the first row is padded on the left
    cache.add(row(1, 3.0), [1])
    assert cache.lengths == [2, 4, 1] and cache.width == 4
    np.testing.assert_array_equal(cache.tensors[0][:, 0, :, 0], [[0, 0, 1, 1], [2, 2, 2, 2], [0, 0, 0, 3]])
    mask, positions = cache.step_inputs()
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(positions, [[2], [4], [1]])
    cache.keep([0, 2])  # the longest row left: two columns only padding used go
    assert cache.width == 2 and cache.lengths == [2, 1]
    np.testing.assert_array_equal(cache.tensors[0][:, 0, :, 0], [[1, 1], [0, 3]])

    # Rows prefilled together arrive padded to their group's longest prompt; columns only padding uses go.
    cache.add([np.array([[[[0, 0], [0, 0], [4, 4]]], [[[0, 0], [5, 5], [5, 5]]]], dtype=np.float32)], [1, 2])
    assert cache.lengths == [2, 1, 1, 2] and cache.width == 2
    np.testing.assert_array_equal(cache.tensors[0][:, 0, :, 0], [[1, 1], [0, 3], [0, 4], [5, 5]])


def test_the_decoder_reuses_one_logits_buffer_and_returns_what_a_plain_run_returns(session):
    decoder = Decoder(session, {EOS})
    outputs = [v.name for v in session.get_outputs()]
    past_names = [v.name for v in decoder.past]

    def plain(ids, past):
        """The graph run as ONNX Runtime returns it, without the decoder's buffers."""
        rows, tokens = ids.shape
        width = past[0].shape[2]
        result = dict(zip(outputs, session.run(outputs, {
            "input_ids": ids, "attention_mask": np.ones((rows, width + tokens), dtype=np.int64),
            "position_ids": np.tile(np.arange(width, width + tokens, dtype=np.int64), (rows, 1)),
            **dict(zip(past_names, past))})))
        return result["logits"][:, -1], [result[n.replace("past_key_values.", "present.")] for n in past_names]

    ids = np.array([PROMPTS[0], PROMPTS[0][::-1]], dtype=np.int64)
    logits, presents = decoder.prefill(ids.tolist())
    expected_logits, expected_presents = plain(ids, decoder.empty_cache(2))
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(presents, expected_presents):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    buffer = decoder._logits
    scored = 1 if decoder.last_position_only else len(PROMPTS[0])  # positions whose logits the graph writes
    assert buffer.size == 2 * scored * decoder.vocab

    # The next call writes into the same buffer (a smaller one: a decode step of both rows; one as large:
    # the rows swapped, whose last logits land where the first prefill's were); the logits already handed
    # out are a copy and stay as they were.
    step = np.array([[3], [4]], dtype=np.int64)
    mask = np.ones((2, len(PROMPTS[0]) + 1), dtype=np.int64)
    positions = np.full((2, 1), len(PROMPTS[0]), dtype=np.int64)
    step_logits, _ = decoder.run(step, mask, positions, presents)
    np.testing.assert_allclose(step_logits, plain(step, presents)[0], rtol=1e-5, atol=1e-5)
    swapped_logits, _ = decoder.prefill(ids[::-1].tolist())
    assert decoder._logits is buffer
    np.testing.assert_allclose(swapped_logits, expected_logits[::-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)


class Calls:
    """Records the decoder's graph calls: (rows, new tokens per row, past width) each."""

    def __init__(self, decoder: Decoder):
        self.shapes, self._run = [], decoder.run
        decoder.run = self

    def __call__(self, ids, mask, positions, past):
        self.shapes.append((ids.shape[0], ids.shape[1], past[0].shape[2]))
        return self._run(ids, mask, positions, past)

    def take(self) -> list[tuple[int, int, int]]:
        shapes, self.shapes = self.shapes, []
        return shapes


def test_joiners_are_prefilled_together_in_one_graph_call(session):
    scheduler, record = make(session)
    calls = Calls(scheduler.decoder)
    running = Collect(PROMPTS[0], 12)
    scheduler.submit(running.job)
    scheduler.step()
    scheduler.step()
    calls.take()
    # Three prompts of lengths 11, 1 and 7 join at one step beside the running row; the longest one asks a
    # single token, so it leaves at its first token and its padding columns are cut from the others.
    joining = [Collect(PROMPTS[2], 9), Collect(PROMPTS[3], 10), Collect(PROMPTS[1], 1)]
    for collect in joining:
        scheduler.submit(collect.job)
    scheduler.step()
    assert calls.take() == [(3, 11, 0), (3, 1, 7)]  # one prefill for the three, then one step for 1 + 2 rows
    assert scheduler.cache.width == 8 and scheduler.cache.lengths == [7, 2, 8]
    while not scheduler.idle():
        scheduler.step()
    assert running.tokens == alone(session, PROMPTS[0], 12)
    for collect, limit in zip(joining, (9, 10, 1)):
        assert collect.tokens == alone(session, collect.job.prompt, limit) and collect.finish[0][1] is None
    assert len(record.first) == 4



def test_waiting_requests_are_held_to_share_one_prefill_while_rows_decode(session):
    """join_wait_steps 2: the first request joins at once (nothing runs); a later one waits up to 2 steps,
    and one arriving meanwhile shares its prefill; enough waiting requests to fill the batch join at once."""
    scheduler, _ = make(session, max_batch=4, join_wait_steps=2)
    calls = Calls(scheduler.decoder)
    jobs = [Collect(prompt, 10, Sampling(ignore_eos=True)) for prompt in PROMPTS]
    scheduler.submit(jobs[0].job)
    scheduler.step()
    assert calls.take() == [(1, 4, 0), (1, 1, 4)]  # prefill alone, then its first step
    scheduler.submit(jobs[1].job)
    scheduler.step()
    scheduler.submit(jobs[2].job)
    scheduler.step()
    assert calls.take() == [(1, 1, 5), (1, 1, 6)]  # held two steps: only the running row decodes
    scheduler.step()
    assert calls.take() == [(2, 11, 0), (3, 1, 11)]  # the wait is over: both prefilled in one call
    scheduler.submit(jobs[3].job)
    scheduler.step()
    assert calls.take() == [(1, 7, 0), (4, 1, 12)]  # it fills the batch: no wait
    while not scheduler.idle():
        scheduler.step()
    for collect in jobs:
        assert collect.tokens == alone(session, collect.job.prompt, 10, stop_at_eos=False)


def test_the_prefill_cap_bounds_each_step_and_long_prompts_go_in_chunks(session):
    cap = 14
    scheduler, _ = make(session, max_prefill_tokens=cap)
    calls = Calls(scheduler.decoder)
    long_prompt = list(range(10, 40))  # 30 tokens: three chunks of at most 14
    jobs = [Collect(prompt, 6, Sampling(ignore_eos=True)) for prompt in (*PROMPTS, long_prompt, PROMPTS[0])]
    for collect in jobs:
        scheduler.submit(collect.job)
    while not scheduler.idle():
        scheduler.step()
    prefills = [(rows, tokens, past) for rows, tokens, past in calls.take() if tokens > 1 or past == 0]
    assert all(rows * tokens <= cap for rows, tokens, _ in prefills)
    # 4 and 11 tokens do not fit 14 together; 11 alone; 1 and 7 pad to 2 x 7; then the 30-token prompt
    # alone in chunks of 14, 14 and 2 after its own past; then the last 4-token prompt.
    assert prefills == [(1, 4, 0), (1, 11, 0), (2, 7, 0), (1, 14, 0), (1, 14, 14), (1, 2, 28), (1, 4, 0)]
    for collect in jobs:
        assert collect.tokens == alone(session, collect.job.prompt, 6, stop_at_eos=False)
        assert collect.finish == [(FINISH_LENGTH, None)]


def test_a_chunked_prompt_cancelled_between_chunks_frees_its_cache(session):
    scheduler, _ = make(session, max_prefill_tokens=8)
    gone = Collect(list(range(10, 40)), 6)
    scheduler.submit(gone.job)
    scheduler.step()
    assert scheduler.chunked is not None and scheduler.chunked.done == 8 and gone.tokens == []
    gone.cancel = True
    scheduler.step()
    assert gone.finish == [(FINISH_CANCELLED, None)] and scheduler.chunked is None and scheduler.idle()


def test_warm_up_runs_the_largest_prefills_once_and_serves_as_before(session):
    scheduler, record = make(session, max_batch=4, max_prefill_tokens=32)
    calls = Calls(scheduler.decoder)
    scheduler.warm_up(context=24)  # the context is shorter than the cap: the warm-up stays inside it
    assert calls.take() == [(1, 24, 0), (4, 6, 0)] and scheduler.idle() and record.generated == 0
    job = Collect(PROMPTS[1], 8)
    scheduler.submit(job.job)
    while not scheduler.idle():
        scheduler.step()
    assert job.tokens == alone(session, PROMPTS[1], 8)
