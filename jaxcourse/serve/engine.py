"""A continuous-batching decode engine over a paged KV cache (Yu et al. 2022, "Orca";
Kwon et al. 2023, "vLLM").

    engine = Engine(model_cfg, params, slots=8, decode_text=tok.decode)
    results = engine.complete([Request(prompt_ids, SamplingParams(max_tokens=32))])

A fixed number of decode slots; requests wait in a queue, join a free slot when its blocks
can be reserved (paged_cache.BlockAllocator), are prefilled into that slot's blocks (prompts
padded to a few bucket lengths, those of one bucket together), then advance together with
every other running request, `decode_steps` tokens per engine step, and leave as soon as
they finish, freeing slot and blocks.

One decode call produces `decode_steps` tokens for every running slot (a `lax.scan` on
device, serve/steps.py): small models are dispatch-bound, and one host round trip per token
cost more than the model itself. The running slots are the rows of the model's batch, each
at its own cache position; the call gathers their blocks once into the dense, heads-major
cache of the attention mixer (models/attention.py), cut to the positions the chunk can
reach, samples on device, stops each row at its own max_tokens (the rest of the chunk
idles), and scatters the chunk's new keys and values back into the pool at the end. The
host then reads the [steps, rows] tokens once, applies stop strings and cancellations, and
streams each request's new tokens as one event. Stop strings end a request at the token
that completes them; tokens computed after it in the same chunk are dropped.

Both compiled functions have static shapes (row counts, view widths, prefill batch sizes,
bucket lengths, the chunk length), so after `warmup()` a new request never compiles
anything.

The engine is driven by `step()`; `start()` runs it in one background thread (the server),
`complete()` runs it in the caller's thread (tests, benchmarks). `submit` and `cancel` are
thread-safe; everything else belongs to the thread that steps.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import secrets
import threading
import time
import traceback
from typing import TYPE_CHECKING, Callable

import flax.linen as nn
import jax
import numpy as np

from jaxcourse.errors import UserError
from jaxcourse.serve import paged_cache
from jaxcourse.serve import steps as steps_lib
from jaxcourse.serve.requests import (Event, Request, SamplingParams, _Running,  # noqa: F401
                                      default_buckets)

if TYPE_CHECKING:
    from jaxcourse.models.transformer import GPTConfig


class Engine:
    def __init__(self, model_cfg: GPTConfig, params, *, slots: int = 8, block_size: int = 16,
                 num_blocks: int = 0, buckets: tuple[int, ...] = (),
                 decode_text: Callable[[list[int]], str] | None = None, metrics=None,
                 decode_steps: int = 8, prefill_batch: int = 8,
                 steps: tuple[Callable, Callable] | None = None):
        """`decode_steps`: tokens per slot per decode call (latency of a new request's
        admission vs dispatch cost). `prefill_batch`: prompts of one bucket admitted
        together are prefilled up to this many per call (padded with empty rows; a lone
        prompt is prefilled alone). `steps`: (prefill, decode chunk) with the signatures of
        `steps.prefill` / `steps.decode_chunk` less the model and the chunk length
        (serve/export.py's exported ones); then `model_cfg` need only carry
        context, n_layer, kv_heads, head_dim, compute_dtype and require_attention, and no model module
        is imported (serve/export.py passes (None, None) and sets prefill_fn / step_fn once
        the engine knows its shapes). Default: the GPT's own jitted steps."""
        model_cfg.require_attention("serve (its paged cache holds attention keys and values)")
        self.cfg = model_cfg
        self.params = nn.meta.unbox(params)
        self.layout = paged_cache.PagedLayout(
            model_cfg.n_layer, model_cfg.kv_heads, model_cfg.head_dim, model_cfg.context,
            block_size=block_size, num_blocks=num_blocks, slots=slots)
        self.buckets = tuple(sorted(set(buckets))) or default_buckets(model_cfg.context)
        if self.buckets[-1] > model_cfg.context or self.buckets[0] < 1:
            raise UserError(f"serve: buckets {self.buckets} must lie in 1..context "
                            f"{model_cfg.context}")
        if decode_steps < 1 or prefill_batch < 1:
            raise UserError(f"serve: decode_steps={decode_steps} and prefill_batch="
                            f"{prefill_batch} must be >= 1")
        self.prefill_sizes = tuple(sorted({1, min(prefill_batch, slots)}))
        self.decode_steps = decode_steps
        # Decode calls read a dense view of the first `w` table columns only, w the smallest
        # of these widths that holds every running slot's positions of the chunk: attention
        # reads every view position of every slot each step.
        self.view_widths = tuple(sorted({self.layout.blocks_for(b) for b in self.buckets}
                                        | {self.layout.blocks_per_slot}))
        # ... and computes only as many rows as running slots, rounded up to one of these
        # (1, 4, 16, .., slots): a lone request does not pay for 32 slots' attention.
        self.decode_rows = tuple(sorted({min(4 ** i, slots) for i in range(8)}))
        self.decode_text = decode_text
        self.metrics = metrics
        if metrics is not None:
            metrics.blocks_total.set(self.layout.num_blocks - 1)
        self.pool = paged_cache.init_pool(self.layout, model_cfg.compute_dtype)
        self.allocator = paged_cache.BlockAllocator(self.layout.num_blocks)
        self.tables = np.zeros((slots, self.layout.blocks_per_slot), np.int32)
        self.running: list[_Running | None] = [None] * slots
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        if steps is None:
            from jaxcourse.models.transformer import GPT  # noqa: PLC0415 - export serves without

            # Shared by engines of one model config: their compiled steps are reused.
            self.model = GPT(model_cfg)
            steps = (functools.partial(steps_lib.prefill_jit, self.model),
                     functools.partial(steps_lib.decode_chunk_jit, self.model, decode_steps))
        self.prefill_fn, self.step_fn = steps

    # ---- the thread-safe interface ------------------------------------------------------

    def submit(self, req: Request) -> int:
        """Queues a request (UserError if it cannot fit the context); returns its id.
        max_tokens is cut to what the context leaves after the prompt."""
        n = len(req.prompt)
        if n < 1:
            raise UserError("the prompt must hold at least one token")
        if n >= self.cfg.context:
            raise UserError(f"prompt has {n} tokens; the model context {self.cfg.context} "
                            "leaves no room for a completion")
        if self.layout.blocks_for(n + self.layout.block_size) > self.layout.num_blocks - 1:
            raise UserError("the KV pool is too small for this prompt")
        if req.params.stop and self.decode_text is None:
            raise UserError("stop strings need an engine with a tokenizer (decode_text)")
        with self._cond:
            req.id = next(self._ids)
            req.arrival = req.arrival or time.perf_counter()
            self._waiting.append(req)
            self._cond.notify()
        return req.id

    def cancel(self, request_id: int) -> None:
        """Stops a queued or running request (its sink gets finish_reason "cancelled")."""
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify()

    @property
    def queue_length(self) -> int:
        with self._cond:
            return len(self._waiting)

    def start(self) -> None:
        """Steps the engine in a background thread until `stop()`."""
        self._thread = threading.Thread(target=self._loop, name="serve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- driving it ----------------------------------------------------------------------

    def warmup(self) -> None:
        """Compiles a decode chunk per (row count, view width) and a prefill per (bucket,
        batch); their writes go to scratch."""
        m = self.tables.shape[1]
        for n, w in itertools.product(self.decode_rows, self.view_widths):
            z = np.zeros(n, np.int32)
            self.pool, _ = self.step_fn(self.params, self.pool, self.tables[:n, :w], z, z, z,
                                        z, z.astype(np.float32), z, np.ones(n, np.float32), z)
        for t, b in itertools.product(self.buckets, self.prefill_sizes):
            self.pool, _ = self.prefill_fn(self.params, self.pool, *_PrefillRows(b, t, m).args)
        jax.block_until_ready(self.pool)

    @staticmethod
    def compilations() -> int:
        """Compiled variants of the two step functions, over all engines of this process
        (constant after warmup)."""
        return steps_lib.prefill_jit._cache_size() + steps_lib.decode_chunk_jit._cache_size()

    def has_work(self) -> bool:
        with self._cond:
            return bool(self._waiting or self._cancelled) or any(self.running)

    def step(self) -> None:
        """Cancellations, admissions (each one prefill), then one decode chunk."""
        self._handle_cancelled()
        self._admit()
        self._decode()
        if self.metrics is not None:
            self.metrics.state(self.allocator.in_use, self.queue_length,
                               sum(r is not None for r in self.running))

    def complete(self, requests: list[Request]) -> list[dict]:
        """Runs `requests` to the end in this thread: [{"tokens", "text", "finish_reason"}]."""
        results = [{"tokens": [], "text": "", "finish_reason": None} for _ in requests]
        for req, res in zip(requests, results):
            def sink(ev, res=res, inner=req.sink):
                res["tokens"] += ev.tokens
                res["text"] += ev.text
                res["finish_reason"] = ev.finish_reason or res["finish_reason"]
                if inner is not None:
                    inner(ev)
            self.submit(dataclasses.replace(req, sink=sink))
        while self.has_work():
            self.step()
        return results

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not (self._waiting or self._cancelled
                                              or any(self.running)):
                    self._cond.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a failed step must not kill the server
                traceback.print_exc()
                self._fail_all(f"engine step failed: {type(e).__name__}: {e}")

    # ---- internals -------------------------------------------------------------------------

    def _handle_cancelled(self) -> None:
        with self._cond:
            cancelled, self._cancelled = self._cancelled, set()
            kept = [r for r in self._waiting if r.id not in cancelled]
            dropped = [r for r in self._waiting if r.id in cancelled]
            self._waiting = collections.deque(kept)
        for req in dropped:
            _send(req, Event([], "", "cancelled"))
        for slot, run in enumerate(self.running):
            if run is not None and run.req.id in cancelled:
                self._finish(slot, "cancelled")

    def _admit(self) -> None:
        """Takes queued requests into free slots while their blocks can be reserved, then
        prefills them, those of one bucket together (up to prefill_batch per call)."""
        admitted: dict[int, list[int]] = collections.defaultdict(list)  # bucket -> slots
        while None in self.running:
            with self._cond:
                if not self._waiting:
                    break
                req = self._waiting[0]
                n = len(req.prompt)
                max_tokens = min(req.params.max_tokens, self.cfg.context - n)
                # Positions written: the prompt and every generated token but the last.
                need = self.layout.blocks_for(n + max_tokens - 1)
                if not self.allocator.reserve(need):
                    break  # admission waits for blocks; the queue keeps its order
                self._waiting.popleft()
            slot = self.running.index(None)
            seed = req.params.seed if req.params.seed is not None else secrets.randbits(31)
            self.running[slot] = _Running(req, seed % 2**31, max_tokens, [], need, n)
            self._grow(slot, n)
            admitted[next(b for b in self.buckets if b >= n)].append(slot)
        for bucket, slots in admitted.items():
            big = self.prefill_sizes[-1]
            for i in range(0, len(slots), big):
                group = slots[i:i + big]
                rows = _PrefillRows(1 if len(group) == 1 else big, bucket, self.tables.shape[1])
                for j, slot in enumerate(group):
                    rows.put(j, self.running[slot], self.tables[slot])
                self.pool, first_B = self.prefill_fn(self.params, self.pool, *rows.args)
                first_B = np.asarray(first_B)
                for j, slot in enumerate(group):
                    if self.metrics is not None:
                        self.metrics.prompt(self.running[slot].length)
                    self._emit(slot, [int(first_B[j])])

    def _grow(self, slot: int, n_positions: int) -> None:
        """Takes blocks until the slot holds n_positions."""
        run = self.running[slot]
        while len(run.blocks) < self.layout.blocks_for(n_positions):
            block = self.allocator.take()
            run.reserved -= 1
            self.tables[slot, len(run.blocks)] = block
            run.blocks.append(block)

    def _decode(self) -> None:
        """One decode chunk for the running slots, as the first rows of a call of the
        smallest row count that holds them (the rest: empty rows, limit 0)."""
        active = [i for i, r in enumerate(self.running) if r is not None]
        if not active:
            return
        steps = self.decode_steps
        s = next(n for n in self.decode_rows if n >= len(active))
        tokens, positions = np.zeros(s, np.int32), np.zeros(s, np.int32)
        counters, limits = np.zeros(s, np.int32), np.zeros(s, np.int32)
        temp, top_k = np.zeros(s, np.float32), np.zeros(s, np.int32)
        top_p, seeds = np.ones(s, np.float32), np.zeros(s, np.int32)
        tables = np.full((s, self.tables.shape[1]), paged_cache.SCRATCH, np.int32)
        for j, i in enumerate(active):
            run = self.running[i]
            self._grow(i, run.length + min(steps, run.max_tokens - len(run.generated)))
            p = run.req.params
            tokens[j], positions[j], tables[j] = run.generated[-1], run.length, self.tables[i]
            counters[j], limits[j] = len(run.generated), run.max_tokens
            temp[j], top_k[j], top_p[j], seeds[j] = p.temperature, p.top_k, p.top_p, run.seed
        reach = int(positions.max()) + steps
        w = next((w for w in self.view_widths if w * self.layout.block_size >= reach),
                 self.view_widths[-1])
        self.pool, out_KxS = self.step_fn(self.params, self.pool, tables[:, :w], tokens,
                                          positions, counters, limits, temp, top_k, top_p,
                                          seeds)
        out_KxS = np.asarray(out_KxS)
        for j, i in enumerate(active):
            run = self.running[i]
            n = min(steps, run.max_tokens - len(run.generated))
            run.length += n
            self._emit(i, out_KxS[:n, j].tolist())

    def _emit(self, slot: int, tokens: list[int]) -> None:
        """Streams a slot's new tokens as one event (up to a stop string or max_tokens)."""
        run = self.running[slot]
        now = time.perf_counter()
        if self.metrics is not None:  # inter-token: the delivery's wait over its tokens
            first = not run.generated
            wait = now - (run.req.arrival if first else run.last_time)
            for _ in tokens:
                self.metrics.token(wait if first else wait / len(tokens), first)
        run.last_time = now
        stops, text, reason, sent = run.req.params.stop, "", None, []
        for token in tokens:
            run.generated.append(token)
            sent.append(token)
            if self.decode_text is None:
                if len(run.generated) >= run.max_tokens:
                    reason = "length"
                    break
                continue
            text = self.decode_text(run.generated)
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            if hits:  # the text ends before the earliest stop string, which is not sent
                text, reason = text[:max(min(hits), run.emitted)], "stop"
                break
            if len(run.generated) >= run.max_tokens:
                reason = "length"
                break
        if self.decode_text is not None and reason is None:
            # Hold back what could be the start of a stop string, or half a UTF-8 character.
            safe = len(text) - max((len(s) - 1 for s in stops), default=0)
            while safe > run.emitted and text[safe - 1] == "\ufffd":
                safe -= 1
            text = text[:max(safe, run.emitted)]
        _send(run.req, Event(sent, text[run.emitted:], reason))
        run.emitted = max(run.emitted, len(text))
        if reason is not None:
            self._finish(slot, reason, send=False)

    def _finish(self, slot: int, reason: str, error: str = "", *, send: bool = True):
        """Frees the slot and its blocks; `send`: the last event (else already sent)."""
        run = self.running[slot]
        self.running[slot] = None
        self.allocator.release(run.blocks, run.reserved)
        self.tables[slot] = paged_cache.SCRATCH
        if self.metrics is not None:
            self.metrics.finished(reason)
        if send:
            _send(run.req, Event([], "", reason, error or None))

    def _fail_all(self, message: str) -> None:
        for slot, run in enumerate(self.running):
            if run is not None:
                self._finish(slot, "error", message)


def _send(req: Request, event: Event) -> None:
    if req.sink is not None:
        req.sink(event)


class _PrefillRows:
    """The host arrays of one prefill call: B rows of T tokens (empty rows: length 0)."""

    def __init__(self, b: int, t: int, m: int):
        self.tokens, self.lengths = np.zeros((b, t), np.int32), np.zeros(b, np.int32)
        self.tables = np.full((b, m), paged_cache.SCRATCH, np.int32)
        self.temp, self.top_k = np.zeros(b, np.float32), np.zeros(b, np.int32)
        self.top_p, self.seeds = np.ones(b, np.float32), np.zeros(b, np.int32)

    def put(self, j: int, run: _Running, table_M) -> None:
        p, n = run.req.params, len(run.req.prompt)
        self.tokens[j, :n], self.lengths[j], self.tables[j] = run.req.prompt, n, table_M
        self.temp[j], self.top_k[j], self.top_p[j] = p.temperature, p.top_k, p.top_p
        self.seeds[j] = run.seed

    @property
    def args(self) -> tuple:
        return (self.tokens, self.lengths, self.tables, self.temp, self.top_k, self.top_p,
                self.seeds)
