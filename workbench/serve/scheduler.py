"""Continuous batching: one engine worker thread, requests joining and leaving the decode batch at step
boundaries (iteration-level scheduling, Yu et al. 2022, "Orca").

Each iteration the worker samples one token for every row, hands the tokens to their requests, drops the rows
that finished or whose client went away, feeds the others their token, and admits waiting requests (prefilled
together, then merged into the batch with :meth:`Session.regroup <workbench.engine.step.Session.regroup>`).
A row's tokens depend only on its own prompt, parameters and seed: every row keeps its own positions, keys,
penalty counts and random generator, so a request gives the same tokens alone or in any batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from workbench.engine import processors, sampling
from workbench.engine.config import GenerationConfig
from workbench.engine.results import GenerationResult, TokenLogprob, token_logprobs

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The scheduler's queue is at its bound."""


@dataclass
class Event:
    """A token of one choice of a job (``text`` may be empty; ``token_id`` None for the EOS that ended it, or
    for the closing event of a strategy that does not stream)."""
    choice: int
    token_id: int | None
    text: str
    logprob: TokenLogprob | None
    finished: bool
    finish_reason: str | None


@dataclass
class Job:
    """One API request: ``n`` choices of one prompt. ``emit`` receives events from the worker thread (it
    must be thread-safe and quick); ``cancel()`` frees the job's rows at the next step."""
    prompt_ids: list[int]
    config: GenerationConfig
    emit: Callable[[Event | BaseException], None]
    n: int = 1
    strategy: str = "sample"
    strategy_config: object | None = None
    adapter: str | None = None  # LoRA adapter name (None: the base model)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Row:
    job: Job
    choice: int
    stop: object  # engine.stopping.Stopper
    generator: torch.Generator

    @property
    def done(self) -> bool:
        return self.stop.done or self.job.cancelled.is_set()

    @property
    def remaining(self) -> int:
        return self.job.config.max_new_tokens - len(self.stop.result.token_ids)


def choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice ``i`` of a seeded request draws from seed ``seed + i`` (so ``n`` choices differ, and choice 0
    equals the same request with ``n = 1``)."""
    return None if seed is None else seed + choice


class Scheduler:
    """The engine worker. ``submit`` a :class:`Job` from any thread; ``tasks`` run between steps (embeddings,
    solo strategies) on the same thread, so the model only ever runs on one thread.

    ``max_batch``: rows decoded together (``n`` choices take ``n`` rows); ``max_queue``: jobs that may wait
    for a row when the batch is full; one more is refused with :class:`QueueFull`.
    """

    def __init__(self, engine, *, max_batch: int = 16, max_queue: int = 64, on_step: Callable | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.engine = engine
        self.max_batch, self.max_queue = max_batch, max_queue
        self.on_step = on_step  # called with the batch size after every step (metrics)
        self._waiting: list[Job] = []
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.rows: list[_Row] = []
        self._session = None
        self._parked = None  # (prefilled session, rows) waiting for the batch to drain (another backend)
        self._seen = self._counts = None

    # -- API (any thread) ---------------------------------------------------------------------------

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="daert-engine", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        with self._cv:
            return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def submit(self, job: Job) -> None:
        if job.n > self.max_batch:
            raise ValueError(f"n={job.n} exceeds the batch of {self.max_batch} rows")
        rows = self.rows  # the worker replaces the list, never mutates it
        with self._cv:
            busy = sum(1 for r in rows if not r.done) + sum(j.n for j in self._waiting)
            if busy + job.n > self.max_batch and len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {self.max_batch} rows decoding and {len(self._waiting)} "
                                "requests waiting")
            self._waiting.append(job)
            self._cv.notify_all()

    def run_task(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on the engine thread between steps and return its result (blocking the caller)."""
        done = threading.Event()
        box: dict = {}

        def task():
            try:
                box["value"] = fn()
            except BaseException as e:  # handed back to the caller
                box["error"] = e
            finally:
                done.set()

        self._tasks.put(task)
        with self._cv:
            self._cv.notify_all()
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    # -- the worker ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self._waiting or self.rows or not self._tasks.empty()):
                    self._cv.wait(0.5)
                if self._stop:
                    break
            try:
                self._iteration()
            except Exception as e:  # a bug or an engine error: fail the jobs in flight, keep serving
                log.exception("engine step failed")
                for job in {id(r.job): r.job for r in self.rows}.values():
                    job.emit(e)
                self.rows, self._session = [], None
        parked = self._parked[1] if self._parked is not None else []
        for job in {id(r.job): r.job for r in [*self.rows, *parked]}.values():
            job.emit(RuntimeError("the server is shutting down"))

    def _run_tasks(self) -> None:
        while not self._tasks.empty():
            self._tasks.get()()

    def _take(self) -> list[Job]:
        """Waiting jobs that fit in the batch (first come, first served; none while rows are parked)."""
        if self._parked is not None:
            return []
        out, free = [], self.max_batch - sum(1 for r in self.rows if not r.done)
        with self._cv:
            while self._waiting and self._waiting[0].n <= free:
                job = self._waiting.pop(0)
                if job.cancelled.is_set():
                    continue
                out.append(job)
                free -= job.n
        return out

    @torch.inference_mode()
    def _iteration(self) -> None:
        self._run_tasks()
        if self.rows:
            tokens = self._sample()
            keep = [i for i, r in enumerate(self.rows) if not r.done]
        else:
            tokens, keep = None, []
        solo = []
        joining = []
        for job in self._take():
            (solo if job.strategy != "sample" else joining).append(job)
        for job in solo:
            self._run_solo(job)
        if keep and not joining and len(keep) < len(self.rows):
            self._regroup(keep, None)  # rows left: shrink before the decode
            tokens, keep = tokens[keep], list(range(len(keep)))
        if keep:
            self._session.decode(tokens)  # finished rows (if any) ride along once and are dropped below
        if joining:
            self._admit(keep, joining)
        elif not keep:
            self.rows, self._session = [], None
            if self._parked is not None:  # the batch drained: the parked rows start
                (session, rows), self._parked = self._parked, None
                self._install(session, rows)  # cancelled ones count as done and leave at the next step
        if self.on_step is not None:
            self.on_step(len(self.rows))

    def _sample(self) -> torch.Tensor:
        rows, session, dev = self.rows, self._session, self.engine.device
        logits = session.logits
        guided = [i for i, r in enumerate(rows) if r.stop.guide is not None]
        if guided:
            allowed = torch.ones(logits.shape, dtype=torch.bool, device=dev)
            for i in guided:
                allowed[i] = rows[i].stop.guide.allowed().to(dev)
            logits = logits.masked_fill(~allowed, float("-inf"))
        params = [r.job.config.sampling for r in rows]
        x = processors.process(logits, params, self._seen, self._counts)
        tokens = sampling.choose(x, [p.greedy for p in params], [r.generator for r in rows])
        want = [r.job.config.logprobs for r in rows]
        token_list = tokens.tolist()
        lps = (token_logprobs(torch.log_softmax(x.float(), -1), token_list, want) if any(k is not None for k in want)
               else [None] * len(rows))
        now = time.perf_counter()
        for i, r in enumerate(rows):
            if r.done:  # cancelled: no more events
                continue
            tok = token_list[i]
            self._seen[i, tok] = True
            self._counts[i, tok] += 1
            delta, kept = r.stop.push(tok, lps[i])
            if r.job.first_token is None:
                r.job.first_token = now
            r.job.emit(Event(r.choice, tok if kept else None, delta, lps[i] if kept else None, r.stop.done,
                             r.stop.result.finish_reason))
        return tokens

    def _state_rows(self, index: list[int]):
        dev = self.engine.device
        idx = torch.tensor(index, dtype=torch.long, device=dev)
        return self._seen.index_select(0, idx), self._counts.index_select(0, idx)

    def _regroup(self, keep: list[int], joining, new_rows: list[_Row] = ()) -> None:
        rows = [self.rows[i] for i in keep] + list(new_rows)
        extra = max(r.remaining for r in rows)
        seen, counts = self._state_rows(keep) if keep else (None, None)
        if joining is not None:
            js, jc = self._fresh_state(new_rows)
            seen = js if seen is None else torch.cat([seen, js])
            counts = jc if counts is None else torch.cat([counts, jc])
        self._session.regroup(keep, joining, extra)
        self.rows, self._seen, self._counts = rows, seen, counts

    def _fresh_state(self, rows: list[_Row]):
        V, dev = self.engine.vocab_size, self.engine.device
        seen = torch.zeros((len(rows), V), dtype=torch.bool, device=dev)
        for i, r in enumerate(rows):
            seen[i, torch.tensor(r.job.prompt_ids, device=dev)] = True  # the repetition penalty counts the prompt
        return seen, torch.zeros((len(rows), V), dtype=torch.int32, device=dev)

    def _new_rows(self, job: Job) -> list[_Row]:
        cfg, eng = job.config, self.engine
        out = []
        for c in range(job.n):
            guide = eng.guide(cfg.constraint) if cfg.constraint is not None else None
            stop = eng.stopper(job.prompt_ids, cfg.max_new_tokens, eos_token_ids=cfg.eos_token_ids,
                               ignore_eos=cfg.ignore_eos, stop_strings=cfg.stop_strings, guide=guide, stream=True,
                               logprobs=cfg.logprobs)
            out.append(_Row(job, c, stop, eng.generator(choice_seed(cfg.seed, c))))
        return out

    def _admit(self, keep: list[int], jobs: list[Job]) -> None:
        new_rows = []
        for job in jobs:
            try:
                new_rows += self._new_rows(job)
            except Exception as e:  # e.g. a constraint that does not compile: only this job fails
                job.emit(e)
        if not new_rows:
            self._keep_only(keep)
            return
        extra = max(r.remaining for r in new_rows)
        adapters = [r.job.adapter for r in new_rows]
        try:
            joining = self.engine.start([r.job.prompt_ids for r in new_rows], 0 if keep else extra,
                                        adapters=adapters if any(adapters) else None)
        except Exception as e:  # e.g. every adapter slot held by running rows: these jobs fail, the batch goes on
            self._fail(new_rows, e)
            self._keep_only(keep)
            return
        if not keep:
            self._install(joining, new_rows)
            return
        if joining.backend is not self._session.backend:
            # e.g. an adapter on the LM head runs on the model's own forward: its rows cannot share this cache, so
            # they wait, prefilled, until the batch drains (no job is admitted before them)
            joining.regroup(list(range(joining.B)), None, extra)  # room to decode alone (prefilled for joining)
            self._parked = (joining, new_rows)
            self._keep_only(keep)
            return
        try:
            self._regroup(keep, joining, new_rows)
        except ValueError as e:  # checked before anything moves: the running rows go on
            self._fail(new_rows, e)
            self._keep_only(keep)

    def _install(self, session, rows: list[_Row]) -> None:
        self.rows, self._session = rows, session
        self._seen, self._counts = self._fresh_state(rows)

    @staticmethod
    def _fail(rows: list[_Row], error: BaseException) -> None:
        for job in {id(r.job): r.job for r in rows}.values():
            job.emit(error)

    def _keep_only(self, keep: list[int]) -> None:
        """The batch shrinks to rows ``keep`` (or ends)."""
        if not keep:
            self.rows, self._session = [], None
        elif len(keep) < len(self.rows):
            self._regroup(keep, None)

    def _run_solo(self, job: Job) -> None:
        """A strategy that does not batch (speculative decoding): run it alone between steps."""
        try:
            with self.engine.intervene(adapters=job.adapter):
                results: list[GenerationResult] = [
                    self.engine.generate([job.prompt_ids], job.strategy_config, strategy=job.strategy)[0]]
        except Exception as e:
            job.emit(e)
            return
        job.first_token = time.perf_counter()
        for res in results:
            lps = res.logprobs or [None] * len(res.token_ids)
            for tok, lp in zip(res.token_ids, lps, strict=False):
                job.emit(Event(0, tok, "", lp, False, None))
            job.emit(Event(0, None, res.text, None, True, res.finish_reason))
