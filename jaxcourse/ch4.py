"""Chapter 4: large language models: tokenizers, GPT pretraining, SFT and LoRA.

    python -m jaxcourse.ch4 --config=configs/ch4_gpt.py:cpu --config.data.path=FILE   # pretrain
    python -m jaxcourse.ch4 --config=configs/ch4_gpt2.py:gpu --config.data.path=FILE  # GPT-2 124M
    python -m jaxcourse.ch4 --config=configs/ch4_finetune.py:cpu                      # SFT vs LoRA

Lab: train a tokenizer (characters or byte-level BPE) and a GPT on any text with the shared
loop, report validation loss the way nanoGPT does (mean over 200 random batches of the last
10% of the text) and tokens/s; then teach the pretrained model procedurally generated
instructions three ways: prompting with examples, full supervised fine-tuning with the loss
masked to the answer, and LoRA adapters (jaxcourse.models.lora) trained through the same loop.
"""
import dataclasses
import functools
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from jaxcourse import cli, config  # noqa: E402
from jaxcourse.data import pipeline, sft, sources  # noqa: E402
from jaxcourse.data import tokenizers as toklib  # noqa: E402
from jaxcourse.errors import UserError  # noqa: E402
from jaxcourse.models import decode, lora  # noqa: E402
from jaxcourse.models.grad_barriers import with_grad_barriers  # noqa: E402
from jaxcourse.models.transformer import (GPT, GPTConfig, gpt_config,  # noqa: E402
                                          lm_loss, lm_task, model_section)
from jaxcourse.parallel.mesh import mesh_config  # noqa: E402
from jaxcourse.report import markdown_table, write_results  # noqa: E402
from jaxcourse.train import Checkpointer, Task, train  # noqa: E402


# ---------------------------------------------------------------------------------------
# Config.

def pretrain_config(preset: str):
    """Pretraining presets. `cpu` is nanoGPT's shakespeare-char CPU run, hyper-parameter for
    hyper-parameter: no bias, learned positions, LayerNorm, tied embeddings, AdamW(0.9, 0.99),
    weight decay 0.1, 100 warmup steps then cosine to lr/10, clip 1.0, no dropout."""
    cfg = config.base_config()
    cfg.experiment = "gpt"
    cfg.data.name = "stdlib"
    cfg.model = model_section(vocab_size=0, context=64, n_layer=4, n_head=4, d_model=128,
                              pos="learned", norm="layernorm", bias=False, attention="xla",
                              matmul="bfloat16")  # bf16 matmuls, f32 elsewhere: 1.9x on CPU.
    # Data parallel over every device of the process: the GPUs of a machine, or CPU cores
    # split into devices with XLA_FLAGS=--xla_force_host_platform_device_count=2.
    cfg.mesh = mesh_config(data=-1)
    cfg.tokenizer = {"name": "char", "vocab_size": 512}  # vocab_size: BPE only.
    cfg.lm = {"max_chars": 0, "val_fraction": 0.1, "eval_batches": 200, "monitor_batches": 20,
              "prompt": "\n", "sample_tokens": 200, "temperature": 0.8, "top_k": 0,
              "grad_barriers": True}  # models/grad_barriers.py: a CPU fusion workaround.
    t, o = cfg.train, cfg.optimizer
    t.steps, t.batch_size, t.eval_every, t.log_every, t.steps_per_call = 2000, 12, 250, 50, 50
    o.name, o.lr, o.schedule, o.warmup_steps, o.min_lr_ratio = "adamw", 1e-3, "warmup_cosine", 100, 0.1
    o.weight_decay, o.b1, o.b2, o.clip_norm = 0.1, 0.9, 0.99, 1.0
    if preset == "smoke":
        cfg.model.update(context=16, n_layer=1, n_head=2, d_model=32)
        cfg.lm.update(max_chars=20_000, eval_batches=4, monitor_batches=0, sample_tokens=8)
        # Batch 8: divisible by the 8 simulated devices the tests run the mesh on.
        t.steps, t.batch_size, t.eval_every, t.log_every, t.steps_per_call = 20, 8, 10, 10, 10
        o.warmup_steps = 5
    elif preset == "gpu":  # nanoGPT's config/train_shakespeare_char.py.
        cfg.model.update(context=256, n_layer=6, n_head=6, d_model=384, dropout=0.2,
                         dtype="bfloat16", matmul="", attention="cudnn")
        cfg.lm.update(sample_tokens=250)
        cfg.lm.grad_barriers = False  # a CPU compiler workaround; GPUs fuse well without.
        t.steps, t.batch_size, t.eval_every, t.steps_per_call = 5000, 64, 250, 50
        t.precision = "bfloat16"
    return cfg


def finetune_config(preset: str):
    """Pretraining presets plus the SFT / LoRA sections (base: a pretraining workdir, or ""
    to pretrain one first inside this run's workdir)."""
    cfg = pretrain_config(preset)
    cfg.experiment = "finetune"
    cfg.finetune = {"base": "", "methods": ("prompting", "sft", "lora"),
                    "tasks": ("upper", "reverse"), "train_examples": 4000,
                    "eval_examples": 400, "heldout_fraction": 0.2, "shots": 3, "steps": 300,
                    "batch_size": 32, "lr": 1e-3, "lora_lr": 2e-3, "warmup_steps": 20,
                    "steps_per_call": 25, "forget_batches": 20,
                    "scale_batches": (1, 8)}  # GPT-2-small memory table; () = skip.
    cfg.lora = {"rank": 8, "alpha": 16.0, "targets": lora.LoRAConfig.targets,
                "lora_plus_ratio": 4.0}
    if preset == "smoke":
        cfg.model.context = 32
        cfg.finetune.update(train_examples=64, eval_examples=16, steps=4, batch_size=8,
                            warmup_steps=1, steps_per_call=4, forget_batches=2,
                            scale_batches=())
        cfg.train.steps = 10
    return cfg


# ---------------------------------------------------------------------------------------
# Data.

@dataclasses.dataclass
class Corpus:
    tokenizer: toklib.Tokenizer
    train: np.ndarray  # int32 token ids, the first 1 - val_fraction of the text
    val: np.ndarray    # the held-out tail
    fertility: float   # tokens per word of the whole text


def load_corpus(cfg) -> Corpus:
    text = sources.load_text(cfg.data)[:cfg.lm.max_chars or None]
    tok = toklib.make_tokenizer(cfg.tokenizer.name, text, cfg.tokenizer.vocab_size)
    ids = np.asarray(tok.encode(text), np.int32)
    n_train = int(len(ids) * (1.0 - cfg.lm.val_fraction))
    if n_train <= cfg.model.context + 1 or len(ids) - n_train <= cfg.model.context + 1:
        raise UserError(f"corpus of {len(ids)} tokens is too short to split into train and "
                        f"validation windows of context {cfg.model.context}")
    return Corpus(tok, ids[:n_train], ids[n_train:], len(ids) / max(len(text.split()), 1))


def random_batches(tokens: np.ndarray, n: int, batch_size: int, context: int, seed: int):
    """n batches of random windows (nanoGPT's get_batch), the same ones on every call."""
    data = pipeline.lm_batches(tokens, batch_size, context, seed)
    return [data[i] for i in range(n)]


@functools.partial(jax.jit, static_argnums=0)
def logits_fn(model_cfg: GPTConfig, params, inputs_BxT):
    """Compiled once per (model config, input shape); params are an argument, not constants."""
    return GPT(model_cfg).apply({"params": params}, inputs_BxT)


@functools.partial(jax.jit, static_argnums=0)
def batch_loss(model_cfg: GPTConfig, params, batch):
    return lm_loss(logits_fn(model_cfg, params, batch["inputs"]), batch["targets"])[0]


def cpu_workarounds(task: Task, cfg) -> Task:
    """The task with gradient barriers when lm.grad_barriers (models/grad_barriers.py)."""
    return with_grad_barriers(task) if cfg.lm.grad_barriers else task


def mean_loss(model_cfg: GPTConfig, params, batches) -> float:
    """Mean over batches of the batch-mean next-token loss (nats)."""
    return float(np.mean([batch_loss(model_cfg, params, b) for b in batches]))


# ---------------------------------------------------------------------------------------
# Saving and loading a trained model (the finetune experiment starts from one).

def save_model(workdir: pathlib.Path, model_cfg: GPTConfig, params, tok) -> None:
    (workdir / "model.json").write_text(json.dumps(dataclasses.asdict(model_cfg), indent=1))
    tok.save(workdir / "tokenizer.json")
    ckpt = Checkpointer(workdir / "model", keep=1)
    ckpt.save(0, {"params": params}, {})
    ckpt.wait()


def load_model(workdir: pathlib.Path):
    """(GPTConfig, params, tokenizer) saved by `save_model` in a pretraining workdir."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "model.json").is_file():
        raise UserError(f"no pretrained model in {workdir} (model.json missing); run "
                        "python -m jaxcourse.ch4 --config=configs/ch4_gpt.py first")
    model_cfg = GPTConfig(**json.loads((workdir / "model.json").read_text()))
    tok = toklib.load_tokenizer(workdir / "tokenizer.json")
    abstract = jax.eval_shape(lambda: nn.meta.unbox(GPT(model_cfg).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    restored = Checkpointer(workdir / "model", keep=1).restore_latest({"params": abstract})
    if restored is None:
        raise UserError(f"no saved parameters under {workdir / 'model'}")
    # Uncommitted copies: the same jit cache entries as freshly trained parameters.
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored[0]["params"])
    return model_cfg, params, tok


def sample_text(model_cfg, params, tok, cfg, seed: int = 0) -> str:
    """Samples lm.sample_tokens tokens after lm.prompt; past the context, each further chunk
    of context/2 tokens is conditioned on the previous context/2 (two compiled shapes)."""
    s, context = cfg.lm, model_cfg.context
    ids = tok.encode(s.prompt) or [0]
    decode.check_lengths(model_cfg, len(ids), 1)  # room for at least one new token
    start, key = len(ids), jax.random.key(seed)
    while len(ids) - start < s.sample_tokens:
        window = ids if len(ids) == start else ids[-(context // 2):]
        n = min(context - len(window), s.sample_tokens - (len(ids) - start))
        key, sub = jax.random.split(key)
        out = decode.generate(GPT(model_cfg), params, jnp.asarray([window], jnp.int32), sub,
                              max_new_tokens=n, temperature=s.temperature, top_k=s.top_k)
        ids += np.asarray(out[0]).tolist()
    return tok.decode(ids)


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
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return {"val_loss": val_loss, "train/loss": m.get("train/loss", float("nan")),
            "steps": m["steps"],
            "tokens_per_second": m["steps_per_second"] * t.batch_size * context,
            "train_ms_per_step": 1000.0 / m["steps_per_second"], "params": n_params,
            "vocab_size": model_cfg.vocab_size, "fertility": corpus.fertility,
            "jax_version": jax.__version__}


# ---------------------------------------------------------------------------------------
# Fine-tuning: prompting vs full SFT vs LoRA.

EVAL_BATCH = 64  # one compiled forward shape for accuracy and forgetting evals.

def _derived(cfg, steps: int, lr: float):
    """A copy of cfg for a fine-tuning run: its own steps, batch, lr and a short warmup."""
    f = cfg.finetune
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.train.update(steps=steps, batch_size=f.batch_size, eval_every=steps, log_every=10,
                   steps_per_call=min(f.steps_per_call, steps), ema_decay=0.0)
    c.optimizer.update(lr=lr, warmup_steps=f.warmup_steps, weight_decay=0.0)
    return c


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
    c = _derived(cfg, cfg.finetune.steps, cfg.finetune.lr)
    c.train.batch_size = batch_size
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
    ax.set_ylabel("held-out exact match")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "accuracy.png", dpi=90)
    plt.close(fig)


def run_tokenizers(cfg, workdir: pathlib.Path) -> dict:
    """Fertility (tokens per word), vocabulary and training time of every tokenizer."""
    text = sources.load_text(cfg.data)[:cfg.lm.max_chars or None]
    rows = toklib.compare(text, cfg.tokenizers.names, cfg.tokenizers.vocab_sizes)
    table = markdown_table(rows, ["tokenizer", "vocab_size", "fertility", "chars_per_token",
                                  "train_s", "encode_s"])
    write_results(workdir, f"Tokenizers on {cfg.data.path or 'the stdlib corpus'}",
                  [(f"{len(text)} characters, {len(text.split())} words", table)])
    return {f"{r['tokenizer']}_{r['vocab_size']}/fertility": r["fertility"] for r in rows}


EXPERIMENTS = {"gpt": run_gpt, "finetune": run_finetune, "tokenizers": run_tokenizers}


def main(argv=None):
    cli.run_chapter("ch4", EXPERIMENTS, default_config="ch4_gpt", argv=argv)


if __name__ == "__main__":
    main()
