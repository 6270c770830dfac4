"""Serving: a continuous-batching engine over a paged KV cache, and an HTTP server.

paged_cache.py     the block pool, block tables, gather / scatter, the block allocator
sampling.py        per-row temperature / top-k / top-p (decode.sample_logits as arrays)
engine.py          Engine: slots, admission, prefill buckets, one jitted decode step
metrics.py         Prometheus counters, histograms and gauges
server.py          FastAPI app: POST /v1/completions (SSE streaming), /health, /metrics
export.py          the engine's steps as jax.export StableHLO + manifest; served without model code
speculative.py     speculative decoding: a draft proposes, the target verifies in one call
default_model.py   what `python -m jaxcourse.serve` serves without --model
__main__.py        python -m jaxcourse.serve [--model DIR] [--host] [--port] [--workdir]
                   [--export DIR | --from-export DIR]

Chapter text: chapters/ch04_serving.md.
"""
