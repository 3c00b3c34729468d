"""In-flight (continuous) batching for the Triton text model: one thread, one ONNX Runtime session, one
graph call per step for every active request's next token.

`cqil triton` copies this file beside the text model's `model.py`, which imports it: Triton's Python
backend loads model.py from the repository folder, where the `cqil` package is not installed, so the
scheduler must not import it. It knows token ids only (the text side lives in model.py) and nothing of
Triton, so the tests drive it directly, step by step, without a server.

Why batch: decoding one token reads every weight once, whatever the batch, and on a CPU that read is
most of a step's time. One step for 16 rows costs far less than 16 steps for one row each.

The cache is one tensor per layer and key/value, [rows, kv_heads, T, head_dim], with every row's
entries **right-aligned**: row r holds `lengths[r]` real positions at the end and zeros before them.
The attention mask (zeros over the padding) and per-row position ids make each row compute what it
computes alone; this is the left-padded batch the ONNX contract already serves (DESIGN.md section 4).
Requests join between steps (while rows decode, a few may wait up to `join_wait_steps` steps for more to
share their prefill: Scheduler._hold): the waiting requests that fit are prefilled together in one graph call
(their prompts left-padded to the longest, the same layout), each one's first token is sent at once,
and their cache rows join the batch (the shorter side is zero-padded on the left). A step's prefill
is capped at `max_prefill_tokens` padded prompt tokens (rows x longest prompt), so the stall it puts
on every running row is bounded; a prompt longer than the cap is prefilled alone in chunks of the
cap, one chunk per step, and joins after its last one. A finished or cancelled row is removed before
the next step, and columns that only padding still uses are cut off, so T is always the longest
row's length.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"  # vLLM's finish_reason words


class QueueFull(RuntimeError):
    """The waiting queue holds `max_queue` requests: answered at once, the client may retry."""


@dataclass(frozen=True)
class GraphNames:
    """The decoder's tensor names (DESIGN.md section 4); model.py passes its own, kept in one place there."""

    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    position_ids: str = "position_ids"
    logits: str = "logits"
    past_prefix: str = "past_key_values."
    present_prefix: str = "present."


@dataclass(frozen=True)
class Sampling:
    """Greedy without a positive temperature (as `cqil generate`), else a sample from the filtered softmax."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    ignore_eos: bool = False


def pick_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token from one row's last logits."""
    temperature = sampling.temperature
    if not temperature or temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    order = np.argsort(-scaled, kind="stable")
    if sampling.top_k and sampling.top_k > 0:
        order = order[:sampling.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if sampling.top_p is not None and 0 < sampling.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1  # the smallest head reaching top_p
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])


@dataclass(eq=False)
class Job:
    """One request as the scheduler sees it.

    `on_token(token)` gets each new token (EOS is not passed on) and returns False to end the request
    early (a stop string); `on_finish(reason, error)` is called exactly once, with `error` set when the
    graph call failed; `cancelled()` is polled before every step (the client went away).
    """

    prompt: Sequence[int]
    max_tokens: int
    on_token: Callable[[int], bool]
    on_finish: Callable[[str, str | None], None]
    sampling: Sampling = field(default_factory=Sampling)
    cancelled: Callable[[], bool] = lambda: False
    submitted: float = field(default_factory=time.monotonic)


class Metrics:
    """What the scheduler reports; the default ignores it (model.py forwards it to Triton's metrics)."""

    def step(self, rows: int) -> None: ...
    def tokens(self, count: int) -> None: ...
    def queue(self, length: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def rejected(self) -> None: ...


@dataclass(eq=False)
class _Row:
    job: Job
    rng: np.random.Generator
    next_token: int
    produced: int = 1


@dataclass(eq=False)
class _Chunked:
    """A prompt longer than `max_prefill_tokens`, prefilled one chunk per step before it joins."""

    job: Job
    past: list[np.ndarray]

    @property
    def done(self) -> int:
        return self.past[0].shape[2]


class Decoder:
    """The ONNX decoder run by one ONNX Runtime session: a prefill of one prompt, a decode step of a batch."""

    def __init__(self, session, eos: set[int], names: GraphNames = GraphNames()):
        self.session, self.eos, self.names = session, set(eos), names
        self.past = [value for value in session.get_inputs() if value.name.startswith(names.past_prefix)]
        self.present_names = [value.name.replace(names.past_prefix, names.present_prefix, 1) for value in self.past]
        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self.cache_dtype = dtypes[self.past[0].type]
        self.kv_heads, self.head_dim = self.past[0].shape[1], self.past[0].shape[3]
        logits = next(value for value in session.get_outputs() if value.name == names.logits)
        self.logits_dtype, self.vocab = dtypes[logits.type], logits.shape[-1]
        # `cqil triton` serves a graph returning the last position's logits only (export/last_logits.py);
        # the contract's own graph returns every position's.
        self.last_position_only = logits.shape[1] == 1
        self._logits = np.empty(0, dtype=self.logits_dtype)  # reused by every call: see run

    def run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
            past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Last-position logits [rows, vocab] and the presents, in the order of the past inputs.

        The contract's graph writes every position's logits ([rows, tokens, vocab]: 200 MB for a
        1024-token prefill of a 49k vocabulary) of which only the last are used; the served graph writes
        the last only. They go into one buffer kept across calls, as large as the largest call so far
        (the warm-up's), instead of a new array per call that is mapped and unmapped again: the server's
        memory stays level instead of jumping by a prefill's logits whenever one runs."""
        n = self.names
        rows, tokens = ids.shape
        scored = 1 if self.last_position_only else tokens  # positions whose logits the graph writes
        if self._logits.size < rows * scored * self.vocab:
            self._logits = np.empty(rows * scored * self.vocab, dtype=self.logits_dtype)
        logits = self._logits[:rows * scored * self.vocab].reshape(rows, scored, self.vocab)
        binding = self.session.io_binding()
        feed = {n.input_ids: ids, n.attention_mask: mask, n.position_ids: positions,
                **{value.name: array for value, array in zip(self.past, past)}}
        for name, array in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        binding.bind_output(n.logits, "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
        width = past[0].shape[2] + tokens
        presents = [np.empty((rows, self.kv_heads, width, self.head_dim), dtype=self.cache_dtype) for _ in self.past]
        for name, present in zip(self.present_names, presents):
            binding.bind_output(name, "cpu", 0, present.dtype, present.shape, present.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits[:, -1].copy(), presents

    def empty_cache(self, rows: int) -> list[np.ndarray]:
        return [np.zeros((rows, self.kv_heads, 0, self.head_dim), dtype=self.cache_dtype)] * len(self.past)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call for several prompts, left-padded to the longest: each one's last logits [rows, vocab]
        and the presents, right-aligned with zeros over the padding (the BatchCache layout)."""
        width = max(len(prompt) for prompt in prompts)
        ids, mask, positions = (np.zeros((len(prompts), width), dtype=np.int64) for _ in range(3))
        for row, prompt in enumerate(prompts):
            pad = width - len(prompt)
            ids[row, pad:], mask[row, pad:], positions[row, pad:] = prompt, 1, np.arange(len(prompt))
        logits, presents = self.run(ids, mask, positions, self.empty_cache(len(prompts)))
        for row, prompt in enumerate(prompts):
            for tensor in presents:
                tensor[row, :, :width - len(prompt)] = 0  # what the padding tokens computed: masked, but kept clean
        return logits, presents

    def extend(self, tokens: Sequence[int], past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """The next chunk of one prompt (batch 1) after `past` (its earlier chunks): last logits [vocab], presents."""
        done, total = past[0].shape[2], past[0].shape[2] + len(tokens)
        logits, presents = self.run(np.array([tokens], dtype=np.int64), np.ones((1, total), dtype=np.int64),
                                    np.arange(done, total, dtype=np.int64)[None], past)
        return logits[0], presents


class BatchCache:
    """The right-aligned per-row KV cache of the rows in flight (see the module docstring)."""

    def __init__(self):
        self.tensors: list[np.ndarray] = []
        self.lengths: list[int] = []

    @property
    def width(self) -> int:
        return self.tensors[0].shape[2] if self.tensors else 0

    def add(self, presents: Sequence[np.ndarray], lengths: Sequence[int]) -> None:
        """Append prefilled rows (presents [rows, kv, width, dim], right-aligned, zeros over the padding)."""
        cut = presents[0].shape[2] - max(lengths)  # columns only padding uses (a longer row finished at once)
        presents = [tensor[:, :, cut:] for tensor in presents]
        if not self.tensors:
            self.tensors, self.lengths = presents, list(lengths)
            return
        width = max(self.width, presents[0].shape[2])
        self.tensors = [np.concatenate((_pad_left(batch, width), _pad_left(rows, width)))
                        for batch, rows in zip(self.tensors, presents)]
        self.lengths += lengths

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (indices, in order), then drop the columns no row uses any more."""
        if not rows:
            self.tensors, self.lengths = [], []
            return
        self.lengths = [self.lengths[r] for r in rows]
        cut = self.width - max(self.lengths)
        index = np.asarray(rows)
        self.tensors = [tensor[index, :, cut:] for tensor in self.tensors]

    def step_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """The attention mask over past + the new token, and each row's position id."""
        width = self.width
        lengths = np.asarray(self.lengths)
        mask = (np.arange(width + 1)[None] >= (width - lengths)[:, None]).astype(np.int64)
        return mask, lengths[:, None].astype(np.int64)

    def advance(self, presents: Sequence[np.ndarray]) -> None:
        self.tensors = list(presents)
        self.lengths = [length + 1 for length in self.lengths]


def _pad_left(tensor: np.ndarray, width: int) -> np.ndarray:
    missing = width - tensor.shape[2]
    return tensor if missing == 0 else np.pad(tensor, ((0, 0), (0, 0), (missing, 0), (0, 0)))


class Scheduler:
    """Admits waiting jobs between steps, runs one batched graph call per step, retires rows at once.

    `step()` does one round (the tests call it directly); `start()` runs rounds on a thread until
    `close()`, sleeping while there is nothing to do.
    """

    def __init__(self, decoder: Decoder, max_batch: int = 16, max_queue: int = 64, max_prefill_tokens: int = 0,
                 join_wait_steps: int = 0, metrics: Metrics | None = None):
        if max_batch < 1 or max_queue < 0 or max_prefill_tokens < 0 or join_wait_steps < 0:
            raise ValueError(f"max_batch {max_batch} must be >= 1, max_queue {max_queue}, max_prefill_tokens "
                             f"{max_prefill_tokens} and join_wait_steps {join_wait_steps} >= 0")
        self.decoder, self.max_batch, self.max_queue = decoder, max_batch, max_queue
        self.max_prefill_tokens = max_prefill_tokens  # padded prompt tokens prefilled per step; 0: no cap
        # Decode steps waiting requests may be held while rows run, so that later arrivals share their prefill
        # (see _hold); 0: every waiting request joins at the next step.
        self.join_wait_steps = join_wait_steps
        self._held_steps = 0
        self.metrics = metrics or Metrics()
        self.waiting: collections.deque[Job] = collections.deque()
        self.rows: list[_Row] = []
        self.chunked: _Chunked | None = None
        self.cache = BatchCache()
        self._wake = threading.Condition()
        self._closing = False
        self._delivered = 0  # tokens handed to jobs since the last report to `metrics`
        self._thread: threading.Thread | None = None

    # -- the public side: any thread ---------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull at once when `max_queue` jobs are already waiting."""
        with self._wake:
            if self._closing:
                raise QueueFull("the model is shutting down")
            if len(self.waiting) >= self.max_queue:
                self.metrics.rejected()
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting, {len(self.rows)} in flight): "
                                "retry later")
            self.waiting.append(job)
            self.metrics.queue(len(self.waiting))
            self._wake.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cqil-text-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Finish every job already accepted, then stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def warm_up(self, context: int | None = None) -> None:
        """Run the largest prefills a step may run, once, before serving.

        ONNX Runtime's CPU arena keeps what it grows to; a prefill of `max_prefill_tokens` tokens (logits
        alone are tokens x vocab floats) is the largest working set a step has, and the arena reuses it
        for every smaller call. Warmed here, the server's memory is at its working size when it opens,
        instead of growing for minutes as ever larger shapes come by (docs/serving.md, Soak). `context`: the
        model's longest sequence, when shorter than the cap."""
        tokens = min(self.max_prefill_tokens or 1024, context or 1024 * 1024)
        rows = min(self.max_batch, tokens)
        for prompts in ([[0] * tokens], [[0] * (tokens // rows)] * rows):
            self.decoder.prefill(prompts)

    def idle(self) -> bool:
        with self._wake:
            return not self._busy()

    def _busy(self) -> bool:
        return bool(self.waiting or self.rows or self.chunked)

    # -- the scheduler thread -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._busy() and not self._closing:
                    self._wake.wait()
                if self._closing and not self._busy():
                    return
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 -- a bug must not leave every client waiting forever
                self._fail_rows(f"{type(exc).__name__}: {exc}")

    def step(self) -> None:
        """Retire cancelled rows, prefill the joining jobs (up to `max_batch` rows and `max_prefill_tokens`),
        then decode one token for every row."""
        self._step()
        if self._delivered:
            self.metrics.tokens(self._delivered)
            self._delivered = 0

    def _step(self) -> None:
        self._retire({i: FINISH_CANCELLED for i, row in enumerate(self.rows) if row.job.cancelled()})
        self._admit()
        if not self.rows:
            return
        mask, positions = self.cache.step_inputs()
        ids = np.array([[row.next_token] for row in self.rows], dtype=np.int64)
        self.metrics.step(len(self.rows))
        try:
            logits, presents = self.decoder.run(ids, mask, positions, self.cache.tensors)
        except Exception as exc:  # noqa: BLE001 -- the rows in this step fail with the error; the model goes on
            self._fail_rows(f"{type(exc).__name__}: {exc}")
            return
        self.cache.advance(presents)
        finished: dict[int, str] = {}
        for i, row in enumerate(self.rows):
            row.next_token = pick_token(logits[i], row.job.sampling, row.rng)
            reason = self._deliver(row.job, row.next_token, row.produced)
            row.produced += 1
            if reason:
                finished[i] = reason
        self._retire(finished)

    def _deliver(self, job: Job, token: int, produced_before: int) -> str | None:
        """Hand `token` to the job; the finish reason when it ends the job (EOS, stop string, max_tokens)."""
        if token in self.decoder.eos and not job.sampling.ignore_eos:
            return FINISH_STOP
        self._delivered += 1
        if not job.on_token(token):
            return FINISH_STOP
        return FINISH_LENGTH if produced_before + 1 >= job.max_tokens else None

    def _fail_rows(self, message: str) -> None:
        for job in [row.job for row in self.rows] + ([self.chunked.job] if self.chunked else []):
            job.on_finish(FINISH_STOP, message)
        self.rows, self.cache, self.chunked = [], BatchCache(), None

    def _retire(self, reasons: dict[int, str]) -> None:
        """Remove the rows `reasons` names (row index -> finish reason), telling each job, in one cache copy."""
        if not reasons:
            return
        for i, reason in sorted(reasons.items()):
            self.rows[i].job.on_finish(reason, None)
        keep = [i for i in range(len(self.rows)) if i not in reasons]
        self.rows = [self.rows[i] for i in keep]
        self.cache.keep(keep)

    def _admit(self) -> None:
        """Prefill what joins this step: the next chunk of a long prompt, or the waiting jobs that fit."""
        if self.chunked is not None:
            self._extend_chunked()
            return
        if self._hold():
            return
        joining: list[Job] = []
        while len(self.rows) + len(joining) < self.max_batch:
            with self._wake:
                if not self.waiting:
                    break
                job = self.waiting[0]
                longest = max([len(job.prompt), *(len(j.prompt) for j in joining)])
                if joining and self._over_prefill_cap(len(joining) + 1, longest):
                    break  # the cap: it joins at a later step
                self.waiting.popleft()
                self.metrics.queue(len(self.waiting))
            if job.cancelled():
                job.on_finish(FINISH_CANCELLED, None)
            elif self.max_prefill_tokens and len(job.prompt) > self.max_prefill_tokens:
                self.chunked = _Chunked(job, self.decoder.empty_cache(1))  # alone, a chunk per step
                self._extend_chunked()
                return
            else:
                joining.append(job)
        if not joining:
            return
        try:
            logits, presents = self.decoder.prefill([job.prompt for job in joining])
        except Exception as exc:  # noqa: BLE001 -- these jobs fail with the error; the model goes on
            for job in joining:
                job.on_finish(FINISH_STOP, f"{type(exc).__name__}: {exc}")
            return
        joined = [i for i, job in enumerate(joining) if self._first_token(job, logits[i])]
        if joined:
            self.cache.add([tensor[joined] for tensor in presents], [len(joining[i].prompt) for i in joined])

    def _over_prefill_cap(self, prompts: int, longest: int) -> bool:
        """Whether `prompts` prompts left-padded to `longest` tokens exceed a step's `max_prefill_tokens`."""
        return bool(self.max_prefill_tokens) and prompts * longest > self.max_prefill_tokens

    def _hold(self) -> bool:
        """Whether the waiting jobs wait one more step for others to join them in one prefill.

        Every joining prefill stalls all running rows for one graph call, and prefilling prompts together
        costs far less per prompt than one at a time (docs/serving.md: 16 x 64 tokens in one call take 8x
        one prompt's time, not 16x). So while rows are decoding, waiting jobs that would not fill the free
        rows are held for up to `join_wait_steps` steps, as TGI's `max_waiting_tokens` does; they join at
        once when nothing runs (no stall to save), when they fill the batch or the prefill cap, or when
        the wait is over. The cost is at most that many steps of time to first token."""
        with self._wake:
            waiting = [len(job.prompt) for job in self.waiting]
        full = (len(waiting) >= self.max_batch - len(self.rows)
                or self._over_prefill_cap(len(waiting) + 1, max(waiting, default=0)))
        if not waiting or not self.rows or full or self._held_steps >= self.join_wait_steps:
            self._held_steps = 0
            return False
        self._held_steps += 1
        return True

    def _extend_chunked(self) -> None:
        chunked = self.chunked
        if chunked.job.cancelled():
            chunked.job.on_finish(FINISH_CANCELLED, None)
            self.chunked = None
            return
        prompt = chunked.job.prompt
        try:
            logits, chunked.past = self.decoder.extend(prompt[chunked.done:chunked.done + self.max_prefill_tokens],
                                                       chunked.past)
        except Exception as exc:  # noqa: BLE001 -- this job fails with the error; the model goes on
            chunked.job.on_finish(FINISH_STOP, f"{type(exc).__name__}: {exc}")
            self.chunked = None
            return
        if chunked.done == len(prompt):
            self.chunked = None
            if self._first_token(chunked.job, logits):
                self.cache.add(chunked.past, [len(prompt)])

    def _first_token(self, job: Job, logits: np.ndarray) -> bool:
        """Pick and send a prefilled job's first token; True when the job goes on as a new last row."""
        rng = np.random.default_rng(job.sampling.seed)
        token = pick_token(logits, job.sampling, rng)
        self.metrics.first_token(time.monotonic() - job.submitted)
        reason = self._deliver(job, token, 0)
        if reason:
            job.on_finish(reason, None)
            return False
        self.rows.append(_Row(job, rng, token))
        return True
