"""Server counters in the Prometheus text format (``GET /metrics``)."""

from __future__ import annotations

import threading
from collections import Counter

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.batch_size = 0
        self.steps = 0
        self.ttft = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def first_token(self, seconds: float) -> None:
        with self._lock:
            i = next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))
            self.ttft[i] += 1
            self.ttft_sum += seconds

    def step(self, batch: int) -> None:
        self.batch_size = batch  # a gauge; written by the engine thread only
        self.steps += 1

    def render(self, *, queue_depth: int, cache=None) -> str:
        with self._lock:
            lines = ["# HELP daert_requests_total API requests by endpoint and HTTP status.",
                     "# TYPE daert_requests_total counter"]
            for (ep, st), n in sorted(self.requests.items()):
                lines.append(f'daert_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            lines += ["# HELP daert_prompt_tokens_total Prompt tokens of completed requests.",
                      "# TYPE daert_prompt_tokens_total counter", f"daert_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP daert_completion_tokens_total Generated tokens.",
                      "# TYPE daert_completion_tokens_total counter",
                      f"daert_completion_tokens_total {self.completion_tokens}",
                      "# HELP daert_queue_depth Requests waiting for a batch slot.", "# TYPE daert_queue_depth gauge",
                      f"daert_queue_depth {queue_depth}",
                      "# HELP daert_batch_size Rows in the decode batch after the last step.",
                      "# TYPE daert_batch_size gauge", f"daert_batch_size {self.batch_size}",
                      "# HELP daert_engine_steps_total Decode iterations.", "# TYPE daert_engine_steps_total counter",
                      f"daert_engine_steps_total {self.steps}",
                      "# HELP daert_time_to_first_token_seconds Submission to first token.",
                      "# TYPE daert_time_to_first_token_seconds histogram"]
            acc = 0
            for b, n in zip(TTFT_BUCKETS, self.ttft, strict=False):
                acc += n
                lines.append(f'daert_time_to_first_token_seconds_bucket{{le="{b}"}} {acc}')
            acc += self.ttft[-1]
            lines += [f'daert_time_to_first_token_seconds_bucket{{le="+Inf"}} {acc}',
                      f"daert_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                      f"daert_time_to_first_token_seconds_count {acc}"]
        hits, misses, errors = (cache.hits, cache.misses, cache.errors) if cache is not None else (0, 0, 0)
        lines += ["# HELP daert_cache_hits_total Completion cache hits.", "# TYPE daert_cache_hits_total counter",
                  f"daert_cache_hits_total {hits}",
                  "# HELP daert_cache_misses_total Completion cache misses (deterministic requests only).",
                  "# TYPE daert_cache_misses_total counter", f"daert_cache_misses_total {misses}",
                  "# HELP daert_cache_errors_total Redis calls that failed (served uncached).",
                  "# TYPE daert_cache_errors_total counter", f"daert_cache_errors_total {errors}"]
        return "\n".join(lines) + "\n"
