"""Exact-match completion cache in Redis (the daert stack's "LLM Cache").

Only deterministic requests are cached (greedy, or sampling with a seed). The key is the SHA-256 of a
canonical JSON of everything that shapes the output: the model identity (name, weight fingerprint, the
interventions in force: edits change the fingerprint, control vectors and adapters are interventions), the
prompt token ids and every generation parameter (see :func:`workbench.serve.protocol.parse`). A key that
leaves a parameter out returns one request's answer to another.

Redis being down never fails a request: every call is guarded, logs a warning (once per outage) and the
request is served uncached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

KEY_PREFIX = "daert:completion:v1:"


def cache_key(identity: dict, canonical: dict) -> str:
    text = json.dumps({"model": identity, "request": canonical}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, default=str)
    return KEY_PREFIX + hashlib.sha256(text.encode()).hexdigest()


@dataclass
class CacheConfig:
    url: str  # redis://HOST:PORT/DB
    ttl_s: int = 7 * 24 * 3600  # 0: no expiry
    max_entry_bytes: int = 1 << 20
    timeout_s: float = 0.5

    def __post_init__(self):
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"cache URL must start with redis://, rediss:// or unix://, got {self.url!r}")
        if self.ttl_s < 0 or self.max_entry_bytes < 1 or self.timeout_s <= 0:
            raise ValueError("cache ttl must be >= 0, max entry size >= 1 byte and timeout > 0")


class CompletionCache:
    """Async get/put of JSON records; failures count as misses (``get``) or drops (``put``)."""

    def __init__(self, config: CacheConfig):
        import redis.asyncio as aioredis

        self.config = config
        self.client = aioredis.Redis.from_url(config.url, socket_timeout=config.timeout_s,
                                              socket_connect_timeout=config.timeout_s)
        self.hits = self.misses = self.errors = self.too_big = 0
        self._down = False

    def _failed(self, e: Exception) -> None:
        self.errors += 1
        if not self._down:
            log.warning("Redis cache unavailable (%s: %s); serving uncached until it is back", type(e).__name__, e)
        self._down = True

    def _ok(self) -> None:
        if self._down:
            log.warning("Redis cache is back")
        self._down = False

    async def get(self, key: str) -> dict | None:
        try:
            raw = await self.client.get(key)
        except Exception as e:  # redis.RedisError, OSError, timeouts: serve uncached
            self._failed(e)
            self.misses += 1
            return None
        self._ok()
        if raw is None:
            self.misses += 1
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            log.warning("dropping a corrupt cache entry %s", key)
            self.misses += 1
            return None
        self.hits += 1
        return value

    async def put(self, key: str, value: dict) -> bool:
        raw = json.dumps(value, separators=(",", ":"))
        if len(raw) > self.config.max_entry_bytes:
            self.too_big += 1
            return False
        try:
            await self.client.set(key, raw, ex=self.config.ttl_s or None)
        except Exception as e:
            self._failed(e)
            return False
        self._ok()
        return True

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a dead connection
            await self.client.aclose()
