"""Chapter 4: large language models: tokenizers, GPT pretraining, SFT and LoRA.

    python -m jaxcourse.ch4 --config=configs/ch4_gpt.py:cpu --config.data.path=FILE   # pretrain
    python -m jaxcourse.ch4 --config=configs/ch4_gpt2.py:gpu --config.data.path=FILE  # GPT-2 124M
    python -m jaxcourse.ch4 --config=configs/ch4_finetune.py:cpu                      # SFT vs LoRA
    python -m jaxcourse.ch4 --config=configs/ch4_compress.py:cpu   # quantization, MLA, distillation

Lab: train a tokenizer (characters or byte-level BPE) and a GPT on any text with the shared
loop, report validation loss the way nanoGPT does (mean over 200 random batches of the last
10% of the text) and tokens/s; then teach the pretrained model procedurally generated
instructions three ways: prompting with examples, full supervised fine-tuning with the loss
masked to the answer, and LoRA adapters (jaxcourse.models.lora) trained through the same loop.
"""
import dataclasses
import pathlib

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxcourse import cli, config, lm  # noqa: E402
from jaxcourse.data import pipeline, sft, sources  # noqa: E402
from jaxcourse.data import tokenizers as toklib  # noqa: E402
from jaxcourse.errors import UserError  # noqa: E402
from jaxcourse.figures import save_figure  # noqa: E402
from jaxcourse.lm import (Corpus, count_params, lm_task, load_model, logits_fn,  # noqa: E402
                          mean_loss, random_batches, save_model)
from jaxcourse.models import decode, lora  # noqa: E402
from jaxcourse.models.grad_barriers import with_grad_barriers  # noqa: E402
from jaxcourse.models.transformer import GPTConfig, gpt_config, model_section  # noqa: E402
from jaxcourse.lm.distill import distill_task  # noqa: E402
from jaxcourse.lm.params import cache_bytes_per_token  # noqa: E402
from jaxcourse.quant import evaluate as qeval  # noqa: E402
from jaxcourse.quant import model as qmodel  # noqa: E402
from jaxcourse.quant import weights as qweights  # noqa: E402
from jaxcourse.report import markdown_table, write_results  # noqa: E402
from jaxcourse.train import Task, train  # noqa: E402


# ---------------------------------------------------------------------------------------
# Data (configs: jaxcourse.lm.configs.pretrain_config, configs/ch4_finetune.py).

def load_corpus(cfg) -> Corpus:
    """Tokens of the configured text under the configured tokenizer, lm.val_fraction held
    out; or (data.name=tokens) the memory-mapped token files in data.path."""
    return lm.load_corpus(cfg.data, tokenizer=cfg.tokenizer.name,
                          vocab_size=cfg.tokenizer.vocab_size, max_chars=cfg.lm.max_chars,
                          val_fraction=cfg.lm.val_fraction, context=cfg.model.context)


def cpu_workarounds(task: Task, cfg) -> Task:
    """The task with gradient barriers when lm.grad_barriers (models/grad_barriers.py)."""
    return with_grad_barriers(task) if cfg.lm.grad_barriers else task


def sample_text(model_cfg, params, tok, cfg, seed: int = 0) -> str:
    """lm.sample_tokens tokens after lm.prompt."""
    s = cfg.lm
    return lm.sample_text(model_cfg, params, tok, s.prompt, s.sample_tokens,
                          temperature=s.temperature, top_k=s.top_k, seed=seed)


# ---------------------------------------------------------------------------------------
# Experiments.

def run_gpt(cfg, workdir: pathlib.Path) -> dict:
    """Pretrains a GPT; val_loss as nanoGPT reports it, tokens/s of the compiled steps."""
    corpus = load_corpus(cfg)
    if 0 < cfg.model.vocab_size < corpus.tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                        f"tokenizer's {corpus.tokenizer.vocab_size} tokens")
    model_cfg = gpt_config(cfg.model, vocab_size=cfg.model.vocab_size or corpus.tokenizer.vocab_size)
    t, context = cfg.train, model_cfg.context
    prompt_len = max(1, len(corpus.tokenizer.encode(cfg.lm.prompt)))
    decode.check_lengths(model_cfg, prompt_len, 1)  # fail before training, not after
    data = pipeline.lm_batches(corpus.train, t.batch_size, context, t.seed)
    val = random_batches(corpus.val, cfg.lm.eval_batches, t.batch_size, context, t.seed + 1)
    # The loop's periodic eval draws the curve on a few batches; val_loss uses all of them.
    monitor = val[:cfg.lm.monitor_batches] if cfg.lm.monitor_batches else None
    state, m = train(cpu_workarounds(lm_task(model_cfg), cfg), cfg, workdir, data, monitor)
    params = state.ema_params if state.ema_params is not None else state.params
    val_loss = mean_loss(model_cfg, params, val)
    save_model(workdir, model_cfg, params, corpus.tokenizer)
    sample = sample_text(model_cfg, params, corpus.tokenizer, cfg)
    (workdir / "sample.txt").write_text(sample)
    print(f"val loss {val_loss:.4f}; {1000 / m['steps_per_second']:.1f} ms/step\n{sample}")
    return {"val_loss": val_loss, "train/loss": m.get("train/loss", float("nan")),
            "steps": m["steps"],
            "tokens_per_second": m["steps_per_second"] * t.batch_size * context,
            "train_ms_per_step": 1000.0 / m["steps_per_second"], "params": count_params(params),
            "vocab_size": model_cfg.vocab_size, "fertility": corpus.fertility,
            "jax_version": jax.__version__}


# ---------------------------------------------------------------------------------------
# Fine-tuning: prompting vs full SFT vs LoRA.

EVAL_BATCH = 64  # one compiled forward shape for accuracy and forgetting evals.

def _derived(cfg, steps: int, lr: float, batch_size: int = 0):
    """A copy of cfg for a fine-tuning run: its own steps, batch, lr and a short warmup."""
    f = cfg.finetune
    return config.derive(cfg, {
        "train.steps": steps,
        "train.batch_size": batch_size or f.batch_size,
        "train.eval_every": steps,
        "train.log_every": 10,
        "train.steps_per_call": min(f.steps_per_call, steps),
        "train.ema_decay": 0.0,
        "optimizer.lr": lr,
        "optimizer.warmup_steps": f.warmup_steps,
        "optimizer.weight_decay": 0.0,
    })


def base_model(cfg, workdir: pathlib.Path):
    """(model config, params, tokenizer, base metrics): loaded, or pretrained here first."""
    if cfg.finetune.base:
        model_cfg, params, tok = load_model(cfg.finetune.base)
        return model_cfg, params, tok, {}
    metrics = run_gpt(cfg, workdir / "pretrain")
    model_cfg, params, tok = load_model(workdir / "pretrain")
    return model_cfg, params, tok, {f"pretrain/{k}": v for k, v in metrics.items()}


def sft_sets(cfg, tok, context: int, text: str) -> dict:
    f = cfg.finetune
    return sft.build_sets(text, f.tasks, tok, context, n_train=f.train_examples,
                          n_eval=f.eval_examples, heldout_fraction=f.heldout_fraction,
                          shots=f.shots, seed=cfg.train.seed)


def exact_match(model_cfg: GPTConfig, params, arrays: dict) -> np.ndarray:
    return sft.exact_match(lambda x: logits_fn(model_cfg, params, x), arrays, EVAL_BATCH)


def scale_memory_rows(cfg, lcfg: lora.LoRAConfig, batch_size: int) -> list[dict]:
    """Full fine-tune vs LoRA step memory of GPT-2 small (124M, context 1024), compiled only."""
    mc = gpt_config(model_section(vocab_size=50304, context=1024, n_layer=12, n_head=12,
                                  d_model=768, pos="learned", norm="layernorm"))
    c = _derived(cfg, cfg.finetune.steps, cfg.finetune.lr, batch_size)
    return [{**row, "method": f"{row['method']} gpt2-124M b{batch_size}"}
            for row in lora.memory_rows(mc, lcfg, c, batch_size)]


def fine_tune(name: str, task: Task, cfg, workdir: pathlib.Path, sets: dict):
    """One fine-tuning run through the shared loop; returns (state, row of the table)."""
    data = pipeline.batches(sets["train"], cfg.train.batch_size, cfg.train.seed)
    task = cpu_workarounds(task, cfg)
    state, m = train(task, cfg, workdir / name, data)  # held-out accuracy is measured after.
    row = {"method": name, "steps": m["steps"], "train_loss": m.get("train/loss", float("nan")),
           "step_ms": 1000 / m["steps_per_second"]}
    row.update(lora.step_memory(task, cfg, data[0]))
    return state, row


def run_finetune(cfg, workdir: pathlib.Path) -> dict:
    """Teaches the pretrained GPT string tasks: few-shot prompting, full SFT, LoRA."""
    f, lc = cfg.finetune, cfg.lora
    model_cfg, base, tok, metrics = base_model(cfg, workdir)
    text = sources.load_text(cfg.data)[:cfg.lm.max_chars or None]
    sets = sft_sets(cfg, tok, model_cfg.context, text)
    val_ids = np.asarray(tok.encode(text[int(len(text) * (1 - cfg.lm.val_fraction)):]), np.int32)
    forget = random_batches(val_ids, f.forget_batches, EVAL_BATCH, model_cfg.context, 7)

    def evaluate(method, params, row=None):
        row = dict(row or {"method": method})
        hits = exact_match(model_cfg, params, sets["few_shot" if method == "prompting" else "heldout"])
        row["accuracy"] = float(hits.mean())
        for t in f.tasks:
            row[f"acc_{t}"] = float(hits[sets["tasks"] == t].mean())
        row["pretrain_val_loss"] = mean_loss(model_cfg, params, forget)  # forgetting
        return row

    unknown = set(f.methods) - {"prompting", "sft", "lora"}
    if unknown:
        raise UserError(f"unknown finetune.methods {sorted(unknown)}; use prompting, sft, lora")
    rows, full_task = [], lm_task(model_cfg)
    if "prompting" in f.methods:
        rows.append(evaluate("prompting", base, {"method": "prompting", "trainable_params": 0}))
    if "sft" in f.methods:
        sft_task = Task(init=lambda rng, batch: (base, {}), loss=full_task.loss)
        state, row = fine_tune("sft", sft_task, _derived(cfg, f.steps, f.lr), workdir, sets)
        rows.append(evaluate("sft", state.params, row))
    if "lora" in f.methods:
        lcfg = lora.LoRAConfig(rank=lc.rank, alpha=lc.alpha, targets=tuple(lc.targets),
                               lora_plus_ratio=lc.lora_plus_ratio)
        ltask = lora.lora_task(full_task, base, lcfg, model_cfg.d_model)
        lora_cfg = lora.with_optimizer_settings(_derived(cfg, f.steps, f.lora_lr), lcfg)
        state, row = fine_tune("lora", ltask, lora_cfg, workdir, sets)
        merged = jax.jit(lora.merge, static_argnums=2)(state.params["base"],
                                                       state.params["lora"], lcfg)
        rows.append(evaluate("lora", merged, row))
        for b in f.scale_batches:
            rows += scale_memory_rows(cfg, lcfg, b)
    write_finetune_results(workdir, rows, f.tasks)
    for r in rows:
        metrics.update({f"{r['method']}/{k}": v for k, v in r.items() if k != "method"})
    return metrics


def write_finetune_results(workdir: pathlib.Path, rows: list[dict], tasks):
    cols = ["method", "trainable_params", "accuracy", *[f"acc_{t}" for t in tasks],
            "pretrain_val_loss"]
    perf = ["method", "trainable_params", "optimizer_state_MB", "arguments_MB", "temp_MB",
            "peak_MB", "step_ms"]
    perf_rows = [r for r in rows if "peak_MB" in r]
    rows = [r for r in rows if "accuracy" in r]
    write_results(workdir, "Fine-tuning: prompting vs SFT vs LoRA", [
        ("Held-out exact match", markdown_table(rows, cols)),
        ("Cost per training step (XLA memory_analysis of the compiled step; GPT-2 rows "
         "compiled only)", markdown_table(perf_rows, perf))])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar(np.arange(len(tasks)) + i * width, [r[f"acc_{t}"] for t in tasks], width,
               label=r["method"])
    ax.set_xticks(np.arange(len(tasks)) + width * (len(rows) - 1) / 2, tasks)
    ax.set_ylabel("held-out exact match (fraction)")
    ax.set_xlabel("string task")
    ax.set_title("fine-tuning: prompting vs full SFT vs LoRA")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, workdir / "accuracy.png", dpi=90)


def run_tokenizers(cfg, workdir: pathlib.Path) -> dict:
    """Fertility (tokens per word), vocabulary and training time of every tokenizer."""
    text = sources.load_text(cfg.data)[:cfg.lm.max_chars or None]
    rows = toklib.compare(text, cfg.tokenizers.names, cfg.tokenizers.vocab_sizes)
    table = markdown_table(rows, ["tokenizer", "vocab_size", "fertility", "chars_per_token",
                                  "train_s", "encode_s"])
    write_results(workdir, f"Tokenizers on {cfg.data.path or 'the stdlib corpus'}",
                  [(f"{len(text)} characters, {len(text.split())} words", table)])
    return {f"{r['tokenizer']}_{r['vocab_size']}/fertility": r["fertility"] for r in rows}


# ---------------------------------------------------------------------------------------
# Compression: quantization (PTQ, W8A8, QAT, int8 KV), MLA vs MHA/GQA/MQA, distillation.

def _short_run(cfg, workdir, name, task, steps, lr):
    """One short training run through the shared loop (its own steps, lr, no EMA)."""
    c = config.derive(cfg, {"train.steps": steps, "train.eval_every": steps,
                            "train.steps_per_call": min(cfg.train.steps_per_call, steps),
                            "train.ema_decay": 0.0, "optimizer.lr": lr})
    data = pipeline.lm_batches(load_corpus(cfg).train, c.train.batch_size,
                               cfg.model.context, c.train.seed)
    state, _ = train(cpu_workarounds(task, cfg), c, workdir / name, data)
    return state.params


def run_compress(cfg, workdir: pathlib.Path) -> dict:
    """Quantizes the pretrained GPT every way, fine-tunes it with QAT, trains attention
    variants at equal parameters and a distilled student vs a hard-label one
    (compress.parts picks among quant, attention, distill)."""
    k = cfg.compress
    for s in (*k.schemes, k.qat_scheme):
        qweights.check_scheme(s)
    if k.qwix and "quant" in k.parts:
        _check_qwix_qat(cfg)
    unknown = set(k.parts) - {"quant", "attention", "distill"}
    if unknown:
        raise UserError(f"unknown compress.parts {sorted(unknown)}; use quant, attention, distill")
    model_cfg, params, tok, metrics = base_model(cfg, workdir)
    val = random_batches(load_corpus(cfg).val, cfg.lm.eval_batches, cfg.train.batch_size,
                         model_cfg.context, cfg.train.seed + 1)
    sections = []
    if "quant" in k.parts:
        rows = _quant_rows(cfg, workdir, model_cfg, params, val)
        sections.append((f"Quantization (decode: batch {k.decode.batch_size}, "
                         f"{k.decode.new_tokens} new tokens)", markdown_table(rows, [
                             "scheme", "val_loss", "model_bytes", "kv_bytes_per_token",
                             "decode_tokens_per_s"])))
    else:
        rows = []
    attn_rows = _attention_rows(cfg, workdir, model_cfg, val) if "attention" in k.parts else []
    if attn_rows:
        sections.append((f"Attention variants ({k.variant_steps} steps each)", markdown_table(
            attn_rows, ["mixer", "params", "val_loss", "kv_bytes_per_token"])))
    dist_rows = _distill_rows(cfg, workdir, model_cfg, params, val) if "distill" in k.parts else []
    if dist_rows:
        sections.append((f"Distillation ({k.student_steps} steps each)",
                         markdown_table(dist_rows, ["student", "params", "val_loss"])))
    write_results(workdir, "Compression: quantization, MLA, distillation", sections)
    for r in rows + attn_rows + dist_rows:
        name = r.get("scheme") or r.get("mixer") or r["student"]
        metrics.update({f"{name}/{c}": v for c, v in r.items() if isinstance(v, (int, float))})
    return metrics


def _quant_rows(cfg, workdir, model_cfg, params, val) -> list[dict]:
    k = cfg.compress
    f32 = dataclasses.replace(model_cfg, matmul="")  # float32 matmuls: the baseline row
    rows = [qeval.scheme_row(f32, params, s, False, val, k.decode) for s in k.schemes]
    rows += [qeval.scheme_row(f32, params, s, True, val, k.decode) for s in ("float32", "int8")]
    qat = qmodel.qat_task(lm_task(model_cfg), k.qat_scheme, init_params=params)
    qat_params = _short_run(cfg, workdir, "qat", qat, k.qat_steps, k.qat_lr)
    row = qeval.scheme_row(f32, qat_params, k.qat_scheme, False, val, k.decode)
    rows.append({**row, "scheme": f"{k.qat_scheme} after {k.qat_steps} QAT steps"})
    return rows + (_qwix_rows(cfg, workdir, model_cfg, params, val) if k.qwix else [])


def _check_qwix_qat(cfg) -> None:
    """Before anything trains: qwix's QAT row needs a scheme qwix can do on this GPT."""
    from jaxcourse.quant import qwix_ref  # noqa: PLC0415 (qwix is an optional dependency)
    model_cfg = gpt_config(cfg.model, vocab_size=1)
    if not qwix_ref.supports(model_cfg, cfg.compress.qat_scheme):
        raise UserError(f"compress.qat_scheme={cfg.compress.qat_scheme} with compress.qwix: "
                        f"qwix tiles int4 only within head_dim "
                        f"{model_cfg.d_model // model_cfg.n_head}; use a smaller group")


def _qwix_rows(cfg, workdir, model_cfg, params, val) -> list[dict]:
    """qwix's PTQ of every scheme it can do here, and its QAT (QtProvider) of qat_scheme
    with the same steps and lr as ours, deployed through its PTQ."""
    from jaxcourse.quant import qwix_ref  # noqa: PLC0415 (qwix is an optional dependency)
    k = cfg.compress
    f32 = dataclasses.replace(model_cfg, matmul="")
    rows = [qeval.qwix_row(f32, params, s, val, k.decode) for s in k.schemes
            if qwix_ref.supports(f32, s)]
    task = lm_task(model_cfg, module=qwix_ref.qat_module(model_cfg, k.qat_scheme))
    task = dataclasses.replace(task, init=lambda rng, batch: (params, {}))
    qat_params = _short_run(cfg, workdir, "qwix_qat", task, k.qat_steps, k.qat_lr)
    row = qeval.qwix_row(f32, qat_params, k.qat_scheme, val, k.decode)
    return rows + [{**row, "scheme": f"qwix {k.qat_scheme} after {k.qat_steps} QAT steps"}]


def _attention_rows(cfg, workdir, model_cfg, val) -> list[dict]:
    k, rows = cfg.compress, []
    for name, overrides in k.attention_variants.items():
        mc = gpt_config(cfg.model, vocab_size=model_cfg.vocab_size, **overrides.to_dict())
        p = _short_run(cfg, workdir, f"attn_{name}", lm_task(mc), k.variant_steps,
                       cfg.optimizer.lr)
        rows.append({"mixer": name, "params": count_params(p),
                     "val_loss": mean_loss(mc, p, val),
                     "kv_bytes_per_token": cache_bytes_per_token(mc)})
    return rows


def _distill_rows(cfg, workdir, model_cfg, params, val) -> list[dict]:
    k = cfg.compress
    student = gpt_config(cfg.model, vocab_size=model_cfg.vocab_size, **k.student.to_dict())
    rows = [{"student": "teacher (the pretrained GPT)", "params": count_params(params),
             "val_loss": mean_loss(model_cfg, params, val)}]
    tasks = {"hard labels": lm_task(student),
             f"distilled T={k.temperature} alpha={k.alpha}": distill_task(
                 student, model_cfg, params, temperature=k.temperature, alpha=k.alpha)}
    for i, (name, task) in enumerate(tasks.items()):
        p = _short_run(cfg, workdir, f"student_{i}", task, k.student_steps, cfg.optimizer.lr)
        rows.append({"student": name, "params": count_params(p),
                     "val_loss": mean_loss(student, p, val)})
    return rows


EXPERIMENTS = {"gpt": run_gpt, "finetune": run_finetune, "tokenizers": run_tokenizers,
               "compress": run_compress}


def main(argv=None):
    cli.run_chapter("ch4", EXPERIMENTS, default_config="ch4_gpt", argv=argv)


if __name__ == "__main__":
    main()
