"""What the engine serves: per-request sampling settings, the request itself, the events it
streams back, a running request's bookkeeping, and the prompt-length buckets."""
from __future__ import annotations

import dataclasses
from typing import Callable

from jaxcourse.errors import UserError

@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's settings (OpenAI's completion fields). seed None: a random seed."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise UserError("temperature and top_k must be >= 0 and top_p in (0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UserError("stop must be non-empty strings")


@dataclasses.dataclass
class Event:
    """What a request's sink receives: one per token, the last with a finish_reason
    ("length", "stop", "cancelled" or "error", then `error` says why)."""
    tokens: list[int]
    text: str
    finish_reason: str | None = None
    error: str | None = None


@dataclasses.dataclass
class Request:
    prompt: list[int]
    params: SamplingParams = SamplingParams()
    sink: Callable[[Event], None] | None = None
    id: int = -1
    arrival: float = 0.0


@dataclasses.dataclass
class _Running:
    req: Request
    seed: int
    max_tokens: int
    blocks: list[int]
    reserved: int            # blocks reserved but not taken yet
    length: int              # positions whose keys / values are in the pool
    generated: list[int] = dataclasses.field(default_factory=list)
    emitted: int = 0         # characters of the text already sent
    last_time: float = 0.0


def default_buckets(context: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` up to the context, and the context itself."""
    out, n = [], min(smallest, context)
    while n < context:
        out.append(n)
        n *= 2
    return (*out, context)
