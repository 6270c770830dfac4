"""Serving without the model code: the engine's steps as serialized StableHLO (`jax.export`).

    export_engine(engine, tok, "runs/serve/export")       # needs the model code
    eng, tok = load_exported("runs/serve/export")        # needs only jax and this file

`python -m jaxcourse.serve --export DIR` writes, `--from-export DIR` serves. The folder:

    manifest.json        format, jax version, platform, cache and slot shapes, buckets,
                         tokenizer file, sampling defaults, parameter names / shapes / dtypes
    prefill_<T>x<B>.jaxexp  one prefill per prompt bucket T and batch B (1, prefill_batch)
                         (jax.export serialized bytes)
    decode_<N>x<W>.jaxexp  the decode chunk of N rows (running slots) reading W table
                         columns, one per row count and view width (decode_steps tokens)
    params.npz           the parameters, flat, by tree path (numpy, no pickle)
    tokenizer.json

The parameters are arguments of the exported functions, not constants baked into them:
baked in, every one of the (buckets + 1) functions would carry its own copy of the weights
(5 copies of a 10 MB model for the default buckets), and serialized constants bloat the
StableHLO text the compiler reads at load. As arguments they are stored once, in params.npz,
and a new checkpoint of the same shapes needs no new export. Every shape is static (slots,
table width, buckets), like the in-process engine: nothing compiles after warm-up.

This module imports no model module (`jaxcourse.models`, `jaxcourse.lm`) at load time, and
`load_exported` never does (tests/test_serve_export.py checks it in a fresh process).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.errors import UserError
from jaxcourse.serve.engine import Engine

FORMAT = "jaxcourse-serve-export/4"  # 2: the decode call is a chunk of decode_steps;
# 3: prefills per (bucket, batch), decode chunks per (rows, view width), heads-major views;
# 4: one KV pool per layer (a list), not one stacked array
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class ExportedConfig:
    """What the engine reads of a model config, from the manifest (no GPTConfig)."""
    context: int
    n_layer: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def require_attention(self, what: str) -> None:
        """GPTConfig's guard: an export is written from an engine, so its mixers are attention."""


def export_engine(engine: Engine, tok, out_dir, sampling_defaults: dict | None = None) -> None:
    """Writes the engine's prefill (one per bucket) and decode step, its parameters, the
    tokenizer and the manifest to `out_dir` (validated and written in full, or refused)."""
    from jaxcourse.serve.steps import decode_chunk, prefill  # noqa: PLC0415

    out = pathlib.Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UserError(f"--export {out}: the folder holds files but no {MANIFEST}; "
                        "choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    named, treedef = _flatten(engine.params)
    leaves = [a for _, a in named]
    spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype)  # noqa: E731
    pool_spec = jax.tree.map(spec, engine.pool)
    s, m = engine.tables.shape
    i32, f32 = jnp.int32, jnp.float32
    sd = jax.ShapeDtypeStruct

    def with_tree(fn):  # flat parameter list in, the model's tree inside
        return lambda flat, *args: fn(engine.model, jax.tree.unflatten(treedef, flat), *args)

    files = {}
    for t in engine.buckets:
        for b in engine.prefill_sizes:
            exp = jax.export.export(jax.jit(with_tree(prefill)))(
                [spec(a) for a in leaves], pool_spec, sd((b, t), i32), sd((b,), i32),
                sd((b, m), i32), sd((b,), f32), sd((b,), i32), sd((b,), f32), sd((b,), i32))
            files[f"prefill_{t}x{b}"] = _write(out / f"prefill_{t}x{b}.jaxexp",
                                               exp.serialize())
    chunk = lambda model, *a: decode_chunk(model, engine.decode_steps, *a)  # noqa: E731
    for n, w in itertools.product(engine.decode_rows, engine.view_widths):
        exp = jax.export.export(jax.jit(with_tree(chunk)))(
            [spec(a) for a in leaves], pool_spec, sd((n, w), i32), *[sd((n,), i32)] * 4,
            sd((n,), f32), sd((n,), i32), sd((n,), f32), sd((n,), i32))
        files[f"decode_{n}x{w}"] = _write(out / f"decode_{n}x{w}.jaxexp", exp.serialize())
    np.savez(out / "params.npz", **{name: np.asarray(a) for name, a in named})
    tok.save(out / "tokenizer.json")
    c = engine.cfg
    manifest = {
        "format": FORMAT, "jax_version": jax.__version__, "platforms": list(exp.platforms),
        "model": {"context": c.context, "n_layer": c.n_layer, "kv_heads": c.kv_heads,
                  "head_dim": c.head_dim, "vocab_size": c.vocab_size,
                  "dtype": jnp.dtype(c.compute_dtype).name},
        "engine": {"slots": s, "block_size": engine.layout.block_size,
                   "decode_steps": engine.decode_steps, "prefill_batch": engine.prefill_sizes[-1],
                   "num_blocks": engine.layout.num_blocks, "buckets": list(engine.buckets)},
        "tokenizer": {"file": "tokenizer.json", "kind": type(tok).__name__,
                      "vocab_size": c.vocab_size},
        "sampling_defaults": sampling_defaults or {"max_tokens": 16, "temperature": 1.0,
                                                   "top_k": 0, "top_p": 1.0},
        "params": {"file": "params.npz", "names": [n for n, _ in named],
                   "shapes": [list(np.shape(a)) for a in leaves],
                   "dtypes": [jnp.asarray(a).dtype.name for a in leaves]},
        "functions": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def load_exported(export_dir, *, metrics=None):
    """(Engine over the exported steps, tokenizer); UserError if the folder is missing,
    incomplete or corrupt. The engine is warmed up."""
    from jaxcourse.data.tokenizers import load_tokenizer  # noqa: PLC0415 - no model code

    d = pathlib.Path(export_dir)
    if not (d / MANIFEST).is_file():
        raise UserError(f"{d} is not a serve export ({MANIFEST} missing); write one with "
                        "python -m jaxcourse.serve --export DIR")
    try:
        man = json.loads((d / MANIFEST).read_text())
        if man.get("format") != FORMAT:
            raise UserError(f"{d / MANIFEST}: format {man.get('format')!r}, expected {FORMAT!r}")
        cfg = ExportedConfig(**man["model"])
        eng_cfg, p = man["engine"], man["params"]
        with np.load(d / p["file"], allow_pickle=False) as z:
            flat = [jnp.asarray(z[name]) for name in p["names"]]
        for name, a, shape, dtype in zip(p["names"], flat, p["shapes"], p["dtypes"]):
            if list(a.shape) != shape or a.dtype.name != dtype:
                raise UserError(f"{d / p['file']}: {name} is {a.dtype.name}{list(a.shape)}, "
                                f"the manifest says {dtype}{shape}")
        calls = {name: _deserialize(d / f) for name, f in man["functions"].items()}
        tok = load_tokenizer(d / man["tokenizer"]["file"])
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{d} is not a readable serve export: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    eng = Engine(cfg, flat, slots=eng_cfg["slots"], block_size=eng_cfg["block_size"],
                 num_blocks=eng_cfg["num_blocks"], buckets=tuple(eng_cfg["buckets"]),
                 decode_text=tok.decode, metrics=metrics, decode_steps=eng_cfg["decode_steps"],
                 prefill_batch=eng_cfg["prefill_batch"], steps=(None, None))
    names = [f"prefill_{t}x{b}" for t in eng.buckets for b in eng.prefill_sizes]
    names += [f"decode_{n}x{w}" for n in eng.decode_rows for w in eng.view_widths]
    if any(name not in calls for name in names):
        raise UserError(f"{d / MANIFEST}: a function of the buckets {eng.buckets} is missing")
    jitted = {name: jax.jit(calls[name].call, donate_argnums=1) for name in names}

    def prefill(params, pool, tokens_BxT, *args):  # one exported function per shape
        b, t = tokens_BxT.shape
        return jitted[f"prefill_{t}x{b}"](params, pool, tokens_BxT, *args)

    def decode(params, pool, table_NxW, *args):
        n, w = table_NxW.shape
        return jitted[f"decode_{n}x{w}"](params, pool, table_NxW, *args)

    eng.prefill_fn, eng.step_fn = prefill, decode
    eng.sampling_defaults = man.get("sampling_defaults", {})
    eng.warmup()
    return eng, tok


def _flatten(params):
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in with_path], treedef


def _write(path: pathlib.Path, data: bytes | bytearray) -> str:
    path.write_bytes(bytes(data))
    return path.name


@functools.lru_cache(maxsize=None)
def _deserialize_bytes(data: bytes):
    return jax.export.deserialize(bytearray(data))


def _deserialize(path: pathlib.Path):
    try:
        return _deserialize_bytes(path.read_bytes())
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - flatbuffer / MLIR errors of a damaged file
        raise UserError(f"{path}: not a jax.export serialization ({type(e).__name__})") from None
