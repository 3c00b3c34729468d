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
A new request is prefilled alone (batch 1, its whole prompt) between steps, its first token is sent
at once, and its cache joins the batch (the shorter side is zero-padded on the left). A finished or
cancelled row is removed before the next step, and columns that only padding still uses are cut off,
so T is always the longest row's length.
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


class Decoder:
    """The ONNX decoder run by one ONNX Runtime session: a prefill of one prompt, a decode step of a batch."""

    def __init__(self, session, eos: set[int], names: GraphNames = GraphNames()):
        self.session, self.eos, self.names = session, set(eos), names
        self.output_names = [value.name for value in session.get_outputs()]
        self.past = [value for value in session.get_inputs() if value.name.startswith(names.past_prefix)]
        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self.cache_dtype = dtypes[self.past[0].type]
        self.kv_heads, self.head_dim = self.past[0].shape[1], self.past[0].shape[3]

    def run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
            past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Last-position logits [rows, vocab] and the presents, in the order of the past inputs."""
        n = self.names
        feed = {n.input_ids: ids, n.attention_mask: mask, n.position_ids: positions,
                **{value.name: array for value, array in zip(self.past, past)}}
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        presents = [outputs[value.name.replace(n.past_prefix, n.present_prefix, 1)] for value in self.past]
        return outputs[n.logits][:, -1], presents

    def prefill(self, prompt: Sequence[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        length = len(prompt)
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.cache_dtype)
        logits, presents = self.run(np.array([prompt], dtype=np.int64), np.ones((1, length), dtype=np.int64),
                                    np.arange(length, dtype=np.int64)[None], [empty] * len(self.past))
        return logits[0], presents


class BatchCache:
    """The right-aligned per-row KV cache of the rows in flight (see the module docstring)."""

    def __init__(self):
        self.tensors: list[np.ndarray] = []
        self.lengths: list[int] = []

    @property
    def width(self) -> int:
        return self.tensors[0].shape[2] if self.tensors else 0

    def add(self, presents: Sequence[np.ndarray]) -> None:
        """Append one prefilled row (its presents, [1, kv, length, dim]) as the last row."""
        length = presents[0].shape[2]
        if not self.tensors:
            self.tensors, self.lengths = list(presents), [length]
            return
        width = max(self.width, length)
        self.tensors = [np.concatenate((_pad_left(batch, width), _pad_left(row, width)))
                        for batch, row in zip(self.tensors, presents)]
        self.lengths.append(length)

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

    def __init__(self, decoder: Decoder, max_batch: int = 16, max_queue: int = 64, metrics: Metrics | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch {max_batch} must be >= 1 and max_queue {max_queue} >= 0")
        self.decoder, self.max_batch, self.max_queue = decoder, max_batch, max_queue
        self.metrics = metrics or Metrics()
        self.waiting: collections.deque[Job] = collections.deque()
        self.rows: list[_Row] = []
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

    def idle(self) -> bool:
        with self._wake:
            return not self.waiting and not self.rows

    # -- the scheduler thread -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self.waiting and not self.rows and not self._closing:
                    self._wake.wait()
                if self._closing and not self.waiting and not self.rows:
                    return
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 -- a bug must not leave every client waiting forever
                self._fail_rows(f"{type(exc).__name__}: {exc}")

    def step(self) -> None:
        """Retire cancelled rows, admit waiting jobs up to `max_batch`, then decode one token for every row."""
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
        for row in self.rows:
            row.job.on_finish(FINISH_STOP, message)
        self.rows, self.cache = [], BatchCache()

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
        while len(self.rows) < self.max_batch:
            with self._wake:
                if not self.waiting:
                    return
                job = self.waiting.popleft()
                self.metrics.queue(len(self.waiting))
            if job.cancelled():
                job.on_finish(FINISH_CANCELLED, None)
                continue
            try:
                logits, presents = self.decoder.prefill(job.prompt)
            except Exception as exc:  # noqa: BLE001 -- this job fails with the error; the model goes on
                job.on_finish(FINISH_STOP, f"{type(exc).__name__}: {exc}")
                continue
            rng = np.random.default_rng(job.sampling.seed)
            token = pick_token(logits, job.sampling, rng)
            self.metrics.first_token(time.monotonic() - job.submitted)
            reason = self._deliver(job, token, 0)
            if reason:
                job.on_finish(reason, None)
                continue
            self.rows.append(_Row(job, rng, token))
            self.cache.add(presents)
