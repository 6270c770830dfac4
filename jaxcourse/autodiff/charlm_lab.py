"""Chapter 1's makemore lab: bigram and MLP character models through the shared loop.

The bigram table trained by gradient descent should reach the loss of the
count-based bigram model (makemore part 1), computed in closed form; the MLP,
seeing `context` characters instead of one, should beat both.
"""

from __future__ import annotations

import math
import pathlib

import flax.linen as nn
import jax
import numpy as np

from jaxcourse import report
from jaxcourse.autodiff import plots
from jaxcourse.autodiff.runs import sub_config
from jaxcourse.data import pipeline, sources
from jaxcourse.data.tokenizers import CharTokenizer
from jaxcourse.errors import UserError
from jaxcourse.models.charlm import CharLM, CharLMConfig, count_bigram_nll, next_token_loss, sample
from jaxcourse.train import Task, train


def load_corpus(cfg) -> tuple[CharTokenizer, np.ndarray, np.ndarray]:
    """Tokenizer plus 90/10 train/validation character ids of the configured corpus."""
    text = sources.load_text(cfg.data)[:cfg.charlm.corpus_chars]
    if len(text) < 10 * (cfg.charlm.seq_len + 1):
        raise UserError(f"corpus has {len(text)} characters; need at least "
                        f"{10 * (cfg.charlm.seq_len + 1)} for charlm.seq_len={cfg.charlm.seq_len}")
    tok = CharTokenizer.from_text(text)
    ids = np.asarray(tok.encode(text), np.int32)
    split = int(0.9 * len(ids))
    return tok, ids[:split], ids[split:]


def eval_windows(ids: np.ndarray, seq_len: int, count: int, batch_size: int = 64) -> list[dict]:
    """Up to `count` non-overlapping windows of the validation ids, in order, batched."""
    n = min(count, (len(ids) - 1) // seq_len)
    if n < 1:
        raise UserError(f"validation split of {len(ids)} characters is shorter than seq_len={seq_len}")
    starts = np.arange(n) * seq_len
    span = np.arange(seq_len + 1)
    chunk = ids[starts[:, None] + span]
    return pipeline.eval_batches({"inputs": chunk[:, :-1], "targets": chunk[:, 1:]}, batch_size)


def charlm_task(model: CharLM) -> Task:
    def init(rng, batch):
        return nn.meta.unbox(model.init(rng, batch["inputs"])["params"]), {}

    def loss(params, model_state, batch, rng, train):
        value = next_token_loss(model.apply({"params": params}, batch["inputs"]), batch["targets"])
        return value, ({"bits_per_char": value / math.log(2.0)}, model_state)

    return Task(init=init, loss=loss)


def _train_one(cfg, model: CharLM, run_dir: pathlib.Path, train_ids, eval_data, lr: float):
    sub = sub_config(cfg, optimizer={"lr": float(lr)})
    data = pipeline.lm_batches(train_ids, cfg.train.batch_size, cfg.charlm.seq_len, cfg.train.seed)
    with report.stage(f"model {run_dir.name}"):
        state, final = train(charlm_task(model), sub, run_dir, data, eval_data)
    rows = plots.read_metrics(run_dir)
    return state.params, final, rows


def lab_charlm(cfg, digits, workdir: pathlib.Path) -> dict:
    c = cfg.charlm
    tok, train_ids, val_ids = load_corpus(cfg)
    eval_data = eval_windows(val_ids, c.seq_len, c.eval_windows)
    v = tok.vocab_size
    out = {"charlm_vocab_size": v, "charlm_train_chars": len(train_ids),
           "charlm_uniform_nll": math.log(v),
           "charlm_count_bigram_eval_nll": count_bigram_nll(train_ids, val_ids, v)}
    models = {"bigram": (CharLMConfig(vocab_size=v, kind="bigram"), c.bigram_lr),
              "mlp": (CharLMConfig(vocab_size=v, kind="mlp", context=c.context,
                                   embed_dim=c.embed_dim, hidden_dim=c.hidden_dim), cfg.optimizer.lr)}
    panels = {"train": {}, "eval": {}}
    samples = []
    for name, (model_cfg, lr) in models.items():
        model = CharLM(model_cfg)
        params, final, rows = _train_one(cfg, model, workdir / f"charlm_{name}", train_ids, eval_data, lr)
        panels["train"][name] = plots.series(rows, "train/loss")
        panels["eval"][name] = plots.series(rows, "eval/loss")
        prompt = val_ids[:max(model_cfg.context, 1)].tolist()
        text = tok.decode(sample(model, params, prompt, c.sample_chars, jax.random.key(cfg.train.seed)))
        samples.append(f"=== {name} (prompt {tok.decode(prompt)!r}) ===\n{text}\n")
        out.update({f"charlm_{name}_train_loss": float(plots.series(rows, "train/loss")[1][-1]),
                    f"charlm_{name}_eval_loss": final["eval/loss"],
                    f"charlm_{name}_eval_bits_per_char": final["eval/bits_per_char"],
                    f"charlm_{name}_steps_per_second": final["steps_per_second"],
                    f"charlm_{name}_sample": text[:200]})
    out["charlm_bigram_gap_to_counts"] = (out["charlm_bigram_eval_loss"]
                                          - out["charlm_count_bigram_eval_nll"])
    (workdir / "charlm_samples.txt").write_text("\n".join(samples))
    refs = {"count bigram (closed form)": out["charlm_count_bigram_eval_nll"],
            f"uniform log {v}": out["charlm_uniform_nll"]}
    plots.plot_panels(
        [{"title": f"{split} loss", "ylabel": "nats / char", "curves": panels[split],
          "hlines": refs} for split in ("train", "eval")],
        workdir / "charlm_loss.png", title=f"character models, {len(train_ids):,} training chars")
    return out
