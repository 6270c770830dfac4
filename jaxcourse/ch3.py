"""Chapter 3: transformers.

    python -m jaxcourse.ch3                                   # char GPT on the stdlib corpus
    python -m jaxcourse.ch3 --config=configs/ch3_context.py   # perplexity vs context length
    python -m jaxcourse.ch3 --config=configs/ch3_norm.py      # pre-LN vs post-LN stability
    python -m jaxcourse.ch3 --config=configs/ch3_window.py    # sliding-window attention
    python -m jaxcourse.ch3 --config=configs/ch3_decode.py    # KV cache vs recompute speed

Lab: a character-level GPT (jaxcourse.models.transformer) trained with the shared loop on
any text (default: the embedded stdlib corpus; `--config.data.path=FILE` for your own),
sampled with a KV cache, its attention maps drawn, and four controlled comparisons. Every
experiment writes summary.json, a results.md table and its PNGs to the workdir.
"""
import json
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxcourse import cli, config, lm  # noqa: E402
from jaxcourse.data import pipeline  # noqa: E402
from jaxcourse.errors import UserError  # noqa: E402
from jaxcourse.figures import save_figure  # noqa: E402
from jaxcourse.lm import Corpus, count_params, eval_windows, lm_task  # noqa: E402
from jaxcourse.models import decode  # noqa: E402
from jaxcourse.models.transformer import GPT, attention_maps, gpt_config  # noqa: E402
from jaxcourse.report import markdown_table, write_results  # noqa: E402
from jaxcourse.train import TrainingDiverged, train  # noqa: E402


# ---------------------------------------------------------------------------------------
# Data and training (configs: jaxcourse.lm.configs.char_gpt_config).

def load_corpus(cfg) -> Corpus:
    """Character tokens of the configured text; the last lm.val_fraction is held out."""
    return lm.load_corpus(cfg.data, max_chars=cfg.lm.max_chars,
                          val_fraction=cfg.lm.val_fraction, context=cfg.model.context)


def fit(cfg, workdir: pathlib.Path, corpus: Corpus, **model_overrides):
    """Trains one GPT; returns (state, loop metrics + perplexity, model config)."""
    vocab = cfg.model.vocab_size or corpus.tokenizer.vocab_size
    model_cfg = gpt_config(cfg.model, vocab_size=vocab, **model_overrides)
    data = pipeline.lm_batches(corpus.train, cfg.train.batch_size, model_cfg.context,
                               cfg.train.seed)
    evals = eval_windows(corpus.val, model_cfg.context, cfg.lm.eval_tokens,
                         cfg.lm.eval_batch_size)
    state, metrics = train(lm_task(model_cfg), cfg, workdir, data, evals)
    metrics["eval/perplexity"] = math.exp(metrics["eval/loss"])
    metrics["eval/bits_per_char"] = metrics["eval/loss"] / math.log(2)
    return state, metrics, model_cfg


def loss_by_position(model_cfg, params, corpus: Corpus, cfg) -> np.ndarray:
    """Mean validation loss at each position t of the window (t tokens of context).

    Uses cfg.lm.position_windows evenly spaced (overlapping) windows over the whole
    validation split: many more windows than the eval set, so the per-position means of
    long contexts are not noise.
    """
    n, context = cfg.lm.position_windows, model_cfg.context
    starts = np.linspace(0, len(corpus.val) - context - 1, n).astype(np.int64)
    chunk = corpus.val[starts[:, None] + np.arange(context + 1)]
    batches = pipeline.eval_batches({"inputs": chunk[:, :-1], "targets": chunk[:, 1:]},
                                    cfg.lm.eval_batch_size)

    @jax.jit
    def nll(batch):
        logits = GPT(model_cfg).apply({"params": params}, batch["inputs"])
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0].sum(0)

    return sum(np.asarray(nll(b)) for b in batches) / n


# ---------------------------------------------------------------------------------------
# Decoding, sampling, timing.

def sample_text(model_cfg, params, corpus: Corpus, cfg, seed: int = 0) -> str:
    """cfg.lm.sample_tokens characters after the prompt (default: 8 validation characters)."""
    s = cfg.lm
    prompt = s.prompt or corpus.tokenizer.decode(corpus.val[:8])
    return lm.sample_text(model_cfg, params, corpus.tokenizer, prompt, s.sample_tokens,
                          temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=seed)


def decode_speed_rows(model_cfg, params, cfg) -> list[dict]:
    d = cfg.decode
    rows = []
    for n in d.new_tokens:
        if d.prompt_len + n > model_cfg.context:
            continue
        t_cache, out_cache = decode.time_generate(GPT(model_cfg), params, d.batch_size,
                                                  d.prompt_len, n, True, d.repeats)
        t_full, out_full = decode.time_generate(GPT(model_cfg), params, d.batch_size,
                                                d.prompt_len, n, False, d.repeats)
        rows.append({"new_tokens": n, "kv_cache_tok_s": d.batch_size * n / t_cache,
                     "recompute_tok_s": d.batch_size * n / t_full,
                     "speedup": t_full / t_cache,
                     "same_tokens": bool(np.array_equal(out_cache, out_full))})
    return rows


# ---------------------------------------------------------------------------------------
# Output: markdown tables and figures.

def plot_attention(maps_LxHxTxT, text: str, path: pathlib.Path):
    """A grid: one row per layer, one column per head, characters on the axes (queries down
    the left, keys along the bottom), one colour scale for all."""
    n_layer, n_head, t, _ = maps_LxHxTxT.shape
    side = max(2.6, 0.11 * t)  # room for one legible character per tick
    fig, axes = plt.subplots(n_layer, n_head, figsize=(side * n_head + 1.2, side * n_layer + 0.8),
                             squeeze=False, layout="constrained")
    labels = [c if c.isprintable() and c != " " else "·" for c in text]
    for layer in range(n_layer):
        for head in range(n_head):
            im = axes[layer, head].imshow(maps_LxHxTxT[layer, head], cmap="viridis", vmin=0,
                                          vmax=1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for head in range(n_head):  # Characters along the bottom (keys) and left (queries).
        axes[-1, head].set_xticks(range(t), labels, fontsize=7)
        axes[0, head].set_title(f"head {head}", fontsize=9)
    for layer in range(n_layer):
        axes[layer, 0].set_yticks(range(t), labels, fontsize=7)
        axes[layer, 0].set_ylabel(f"layer {layer}")
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention weight (softmax probability)")
    fig.supxlabel("key: the character attended to")
    fig.supylabel("query: the character attending (each row sums to 1)")
    fig.suptitle(f"causal self-attention of the trained GPT on {t} validation characters")
    save_figure(fig, path, dpi=80)


def read_curve(workdir: pathlib.Path, key: str) -> tuple[list, list]:
    path = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    points = [(r["step"], r[key]) for r in rows if key in r]
    return tuple(map(list, zip(*points))) if points else ([], [])


def plot_lines(curves: dict[str, tuple], path: pathlib.Path, **axes_settings):
    """One line per entry of `curves` ({label: (x, y)}); axes_settings (title, xlabel,
    ylabel, scales) go to ax.set."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in curves.items():
        ax.plot(x, y, "o-" if len(x) <= 8 else "-", label=name)
    ax.set(**axes_settings)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


# ---------------------------------------------------------------------------------------
# Experiments.

def run_train(cfg, workdir: pathlib.Path) -> dict:
    """Train a char GPT, then sample from it, draw its attention and time its decoding."""
    corpus = load_corpus(cfg)
    state, metrics, mcfg = fit(cfg, workdir, corpus)
    params = state.ema_params if state.ema_params is not None else state.params
    sample = sample_text(mcfg, params, corpus, cfg, seed=cfg.train.seed)
    (workdir / "sample.txt").write_text(sample)
    ids = corpus.val[:min(cfg.lm.attention_len, mcfg.context)]
    maps = attention_maps(mcfg, params, jnp.asarray(ids)[None])[:, 0]
    plot_attention(np.asarray(maps), corpus.tokenizer.decode(ids), workdir / "attention.png")
    speed = decode_speed_rows(mcfg, params, cfg)
    model_row = {"params": count_params(params), "vocab": mcfg.vocab_size, "context": mcfg.context,
                 "steps": metrics["steps"], "train_loss": metrics.get("train/loss", math.nan),
                 "val_loss": metrics["eval/loss"], "val_ppl": metrics["eval/perplexity"],
                 "bits_per_char": metrics["eval/bits_per_char"],
                 "steps_per_s": metrics["steps_per_second"]}
    write_results(workdir, "Chapter 3: character-level GPT", [
        ("Model", markdown_table([model_row], list(model_row))),
        ("KV-cache decode vs recompute (greedy, compiled loop)",
         markdown_table(speed, ["new_tokens", "kv_cache_tok_s", "recompute_tok_s", "speedup",
                                "same_tokens"])),
        ("Sample", "```\n" + sample + "\n```"),
    ])
    out = {**metrics, "params": model_row["params"], "vocab_size": mcfg.vocab_size}
    for r in speed:
        out.update({f"decode/{r['new_tokens']}/{k}": v for k, v in r.items()
                    if k != "new_tokens"})
    return out


def run_context(cfg, workdir: pathlib.Path) -> dict:
    """Same tokens per step, growing context: how much does more context buy?"""
    corpus = load_corpus(cfg)
    rows, curves = [], {}
    for context in cfg.sweep.contexts:
        batch = max(1, cfg.sweep.tokens_per_step // context)
        v = config.derive(cfg, {"train.batch_size": batch})
        state, m, mcfg = fit(v, workdir / f"context_{context}", corpus, context=context)
        by_pos = loss_by_position(mcfg, state.params, corpus, v)
        curves[f"context {context}"] = (np.arange(1, context + 1), np.exp(by_pos))
        rows.append({"context": context, "batch": batch, "val_loss": m["eval/loss"],
                     "val_ppl": m["eval/perplexity"], "last_position_loss": float(by_pos[-1]),
                     "steps_per_s": m["steps_per_second"]})
    plot_lines(curves, workdir / "context.png", xscale="log", yscale="log",
               title="perplexity vs context length (same tokens per step)",
               xlabel="position in window (tokens of context)", ylabel="validation perplexity")
    write_results(workdir, "Perplexity vs context length", [
        ("Validation perplexity (same tokens per step)", markdown_table(rows, list(rows[0])))])
    return {f"context_{r['context']}/{k}": v for r in rows for k, v in r.items()
            if k != "context"}


def run_norm(cfg, workdir: pathlib.Path) -> dict:
    """Pre-LN vs post-LN at an aggressive learning rate, with and without warmup."""
    corpus = load_corpus(cfg)
    rows, losses, grads = [], {}, {}
    for name in cfg.sweep.variants:
        position, _, warm = name.partition("_")
        v = config.derive(cfg, {
            "optimizer.warmup_steps": cfg.sweep.warmup_steps if warm else 0,
            "optimizer.schedule": "warmup_cosine" if warm else cfg.optimizer.schedule})
        vdir = workdir / name
        try:
            _, m, _ = fit(v, vdir, corpus, norm_position=position)
            diverged = False
        except TrainingDiverged:
            m, diverged = {"train/loss": float("nan"), "eval/loss": float("nan")}, True
        losses[name] = read_curve(vdir, "train/loss")
        grads[name] = read_curve(vdir, "train/grad_norm")
        rows.append({"variant": name, "final_train_loss": m.get("train/loss", math.nan),
                     "val_loss": m["eval/loss"], "max_grad_norm": max(grads[name][1] or [0]),
                     "diverged": diverged})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, curves, label in [(axes[0], losses, "train loss (nats / char)"),
                              (axes[1], grads, "grad norm")]:
        for name, (x, y) in curves.items():
            ax.plot(x, y, label=name)
        ax.set(xlabel="step", ylabel=label, yscale="log" if label == "grad norm" else "linear",
               title=f"{label} per step")
        ax.legend()
    fig.suptitle(f"pre-LN vs post-LN at lr {cfg.optimizer.lr}, {cfg.model.n_layer} layers")
    fig.tight_layout()
    save_figure(fig, workdir / "norm.png", dpi=90)
    write_results(workdir, "Pre-LN vs post-LN", [
        (f"lr {cfg.optimizer.lr}, {cfg.model.n_layer} layers",
         markdown_table(rows, list(rows[0])))])
    return {f"{r['variant']}/{k}": v for r in rows for k, v in r.items() if k != "variant"}


def run_window(cfg, workdir: pathlib.Path) -> dict:
    """Sliding-window attention: a local window per layer, a receptive field per stack."""
    corpus = load_corpus(cfg)
    rows, curves = [], {}
    for window in cfg.sweep.windows:
        state, m, mcfg = fit(cfg, workdir / f"window_{window}", corpus, window=window)
        field = mcfg.context if window == 0 else min(mcfg.context,
                                                     mcfg.n_layer * (window - 1) + 1)
        by_pos = loss_by_position(mcfg, state.params, corpus, cfg)
        label = "full" if window == 0 else f"window {window}"
        curves[label] = (np.arange(1, mcfg.context + 1), np.exp(by_pos))
        rows.append({"window": label, "receptive_field": field, "val_loss": m["eval/loss"],
                     "val_ppl": m["eval/perplexity"], "steps_per_s": m["steps_per_second"]})
    plot_lines(curves, workdir / "window.png", xscale="log", yscale="log",
               title=f"sliding-window attention, {cfg.model.n_layer} layers",
               xlabel="position in window (tokens of context)", ylabel="validation perplexity")
    write_results(workdir, "Sliding-window attention", [
        (f"context {cfg.model.context}, {cfg.model.n_layer} layers",
         markdown_table(rows, list(rows[0])))])
    return {f"{r['window']}/{k}": v for r in rows for k, v in r.items() if k != "window"}


def run_decode(cfg, workdir: pathlib.Path) -> dict:
    """KV-cache decoding vs recomputing the whole prefix, on an untrained model (speed
    does not depend on the weights)."""
    mcfg = gpt_config(cfg.model, vocab_size=cfg.model.vocab_size or 128)
    params = jax.jit(lambda r: GPT(mcfg).init(r, jnp.zeros((1, 8), jnp.int32)))(
        jax.random.key(cfg.train.seed))["params"]
    params = nn.meta.unbox(params)
    rows = decode_speed_rows(mcfg, params, cfg)
    if not rows:
        raise UserError(f"no decode.new_tokens value fits: prompt_len {cfg.decode.prompt_len} "
                        f"+ new tokens must be <= model.context {mcfg.context}")
    n = [r["new_tokens"] for r in rows]
    plot_lines({"KV cache": (n, [r["kv_cache_tok_s"] for r in rows]),
                "recompute": (n, [r["recompute_tok_s"] for r in rows])},
               workdir / "decode.png", xscale="log", yscale="log", xlabel="new tokens",
               ylabel="tokens / second", title="KV-cache decoding vs recomputing the prefix")
    d = cfg.decode
    write_results(workdir, "KV-cache decode vs recompute", [
        (f"{count_params(params)} params, {mcfg.n_layer} layers x {mcfg.d_model}, batch "
         f"{d.batch_size}, prompt {d.prompt_len}, {jax.devices()[0].platform}",
         markdown_table(rows, list(rows[0])))])
    return {f"{r['new_tokens']}/{k}": v for r in rows for k, v in r.items()
            if k != "new_tokens"}


EXPERIMENTS = {"train": run_train, "context": run_context, "norm": run_norm,
               "window": run_window, "decode": run_decode}


def main(argv=None):
    cli.run_chapter("ch3", EXPERIMENTS, default_config="ch3_gpt", argv=argv)


if __name__ == "__main__":
    main()
