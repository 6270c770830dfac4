"""Chapter 10: emerging architectures (S4D, Mamba, Mamba-2, RWKV-6, RetNet, hybrids).

    python -m jaxcourse.ch10                                   # every mixer as a char LM
    python -m jaxcourse.ch10 --config=configs/ch10_recall.py   # associative recall per mixer

Lab: the chapter-3 character GPT with each token mixer of models/registry.py in turn
(attention, s4d, mamba, mamba2, rwkv with its channel-mix ffn, retnet) and one hybrid
(`lab.hybrid_pattern`, default attention,mamba), at about equal parameter count (each model's
ffn width is chosen to match the attention GPT's count), trained with the one loop on the
same corpus (`data.path` for any text) for the same steps. It reports validation loss and
training tokens per second, then what one more decoded token costs with a cache already at
contexts of 256 to 16k tokens: the decode state's bytes and ms per token (the trained
weights, a cache of zeros at that fill level, batch 1). The recall experiment trains each mixer briefly on multi-query associative recall
and reports answer accuracy. Every experiment writes summary.json, results.md and PNGs.
"""
import math
import pathlib

import jax
import numpy as np

from jaxcourse import cli, lm
from jaxcourse.data import pipeline, recall
from jaxcourse.errors import ConfigError, UserError
from jaxcourse.lm import count_params, eval_windows, lm_task
from jaxcourse.report import markdown_table, write_results
from jaxcourse.ssm_lab import cost, plots
from jaxcourse.ssm_lab.configs import lab_models
from jaxcourse.train import train


def _title(cfg, what: str) -> str:
    return f"ch10 {cfg.experiment} ({cfg.lab.preset} preset): {what}"


def _mixer(model_cfg) -> str:
    return model_cfg.layer_pattern or model_cfg.mixer


def run_mixers(cfg, workdir: pathlib.Path) -> dict:
    """Every model of lab.models on the same corpus, steps and seed; then decode cost."""
    corpus = lm.load_corpus(cfg.data, max_chars=cfg.lm.max_chars,
                            val_fraction=cfg.lm.val_fraction, context=cfg.model.context)
    models = lab_models(cfg, corpus.tokenizer.vocab_size)  # bad settings fail before training
    evals = eval_windows(corpus.val, cfg.model.context, cfg.lm.eval_tokens,
                         cfg.lm.eval_batch_size)
    rows, curves, trained = [], {}, {}
    for name, mcfg in models.items():
        print(f"ch10: training {name} ({_mixer(mcfg)}, ffn {mcfg.ffn} {mcfg.ff_dim})",
              flush=True)
        data = pipeline.lm_batches(corpus.train, cfg.train.batch_size, mcfg.context,
                                   cfg.train.seed)
        state, final = train(lm_task(mcfg), cfg, workdir / name, data, evals)
        curves[name] = plots.read_curve(workdir / name, "eval/loss")
        trained[name] = state.params
        rows.append({"model": name, "mixer": _mixer(mcfg), "ffn": f"{mcfg.ffn} {mcfg.ff_dim}",
                     "params": count_params(state.params), "val_loss": final["eval/loss"],
                     "tokens_per_second": final["steps_per_second"] * cfg.train.batch_size
                     * mcfg.context})
    d = cfg.decode
    cost_rows, ms, mib = [], {}, {}
    for name, mcfg in models.items():
        print(f"ch10: decode cost of {name} at contexts {tuple(d.contexts)}", flush=True)
        ms[name] = cost.decode_ms_per_token(mcfg, d.contexts, params=trained[name],
                                            new_tokens=d.new_tokens,
                                            batch_size=d.batch_size, repeats=d.repeats,
                                            seed=cfg.train.seed)
        state = [cost.state_bytes(mcfg, c, d.batch_size) for c in d.contexts]
        mib[name] = [b / 2**20 for b in state]
        row = {"model": name}
        for c, t, b in zip(d.contexts, ms[name], state):
            row[f"decode_ms@{c}"] = t
            row[f"state_bytes@{c}"] = b
        cost_rows.append(row)
    plots.plot_curves(curves, _title(cfg, f"validation loss, {len(models)} models of "
                                          f"~{rows[0]['params']:,} params"),
                      "validation loss (nats per token)", workdir / "val_loss.png")
    plots.plot_decode_cost(
        d.contexts, ms, mib, _title(cfg, f"decode cost vs context (cache of zeros, batch "
                                         f"{d.batch_size}, {jax.devices()[0].platform})"),
        workdir / "decode_cost.png")
    ln_v = math.log(corpus.tokenizer.vocab_size)
    ms_cols = [f"decode_ms@{c}" for c in d.contexts]
    b_cols = [f"state_bytes@{c}" for c in d.contexts]
    write_results(workdir, "Chapter 10: token mixers at equal parameter count", [
        (f"{cfg.train.steps} steps, batch {cfg.train.batch_size}, context {cfg.model.context},"
         f" vocab {corpus.tokenizer.vocab_size} (uniform loss ln V = {ln_v:.3f})",
         markdown_table(rows, list(rows[0]))),
        (f"decode: ms per token, cache already at the context (cache of zeros, batch "
         f"{d.batch_size}, {d.new_tokens} tokens, best of {d.repeats})",
         markdown_table(cost_rows, ["model", *ms_cols])),
        ("decode state (bytes)", markdown_table(cost_rows, ["model", *b_cols])),
    ])
    metrics = {"uniform_loss": ln_v}
    for r in rows:
        metrics.update({f"{r['model']}/{k}": v for k, v in r.items()
                        if k in ("params", "val_loss", "tokens_per_second")})
        metrics[f"{r['model']}/d_ff"] = models[r["model"]].ff_dim
    for r in cost_rows:
        metrics.update({f"{r['model']}/{k}": v for k, v in r.items() if k != "model"})
    return metrics


def run_recall(cfg, workdir: pathlib.Path) -> dict:
    """Multi-query associative recall per mixer: where a fixed-size state forgets."""
    r = cfg.recall
    task = dict(n_keys=r.n_keys, n_values=r.n_values, pairs=r.pairs, queries=r.queries)
    try:
        recall.check(**task)
    except UserError as e:  # a config setting: exit 2 like the other bad settings
        raise ConfigError(str(e)) from None
    length = recall.seq_len(r.pairs, r.queries)
    if length > cfg.model.context:
        raise ConfigError(f"recall sequences of {length} tokens need model.context >= "
                              f"{length}, got {cfg.model.context}")
    models = lab_models(cfg, recall.vocab_size(r.n_keys, r.n_values))
    held_out = recall.recall_batch(np.random.default_rng([cfg.train.seed, 2**31]),
                                   r.eval_examples, **task)
    evals = pipeline.eval_batches(held_out, 128)
    rows, curves = [], {}
    for name, mcfg in models.items():
        print(f"ch10: recall with {name} ({_mixer(mcfg)})", flush=True)
        data = recall.recall_batches(cfg.train.batch_size, cfg.train.seed, **task)
        state, final = train(lm_task(mcfg), cfg, workdir / name, data, evals)
        curves[name] = plots.read_curve(workdir / name, "eval/accuracy")
        rows.append({"model": name, "mixer": _mixer(mcfg), "params": count_params(state.params),
                     "accuracy": final["eval/accuracy"], "answer_loss": final["eval/loss"]})
    chance = 1.0 / r.n_values
    what = f"{r.pairs} pairs, {r.queries} queries, {r.n_values} values"
    plots.plot_accuracy([x["model"] for x in rows], [x["accuracy"] for x in rows], chance,
                        _title(cfg, f"associative recall accuracy ({what}, "
                                    f"{cfg.train.steps} steps)"), workdir / "recall.png")
    plots.plot_curves(curves, _title(cfg, f"recall accuracy during training ({what})"),
                      "answer accuracy (fraction)", workdir / "recall_curves.png")
    write_results(workdir, "Chapter 10: multi-query associative recall", [
        (f"{what}; chance {chance:.3f}; {cfg.train.steps} steps of batch "
         f"{cfg.train.batch_size}; {r.eval_examples} held-out sequences",
         markdown_table(rows, list(rows[0])))])
    metrics = {"chance_accuracy": chance}
    for x in rows:
        metrics.update({f"{x['model']}/{k}": v for k, v in x.items()
                        if k in ("params", "accuracy", "answer_loss")})
    return metrics


EXPERIMENTS = {"mixers": run_mixers, "recall": run_recall}


def main(argv=None):
    cli.run_chapter("ch10", EXPERIMENTS, default_config="ch10_mixers", argv=argv)


if __name__ == "__main__":
    main()
