"""Config builders of the language-model experiments (configs/ch3_*.py, configs/ch4_*.py).

`small_gpt()` is the one small GPT of chapters 3, 4 and 9: 4 layers, width 128, 4 heads,
context 64, the vocabulary from the tokenizer. Each chapter adds its own settings on top.
"""
from __future__ import annotations

import ml_collections

from jaxcourse import config
from jaxcourse.models.transformer import model_section
from jaxcourse.parallel.mesh import mesh_config

SMALL_GPT = {
    "vocab_size": 0,  # 0: the tokenizer's vocabulary size.
    "context": 64,
    "n_layer": 4,
    "n_head": 4,
    "d_model": 128,
    "attention": "xla",
}


def small_gpt(**overrides) -> ml_collections.ConfigDict:
    """The `model` section of the small GPT; `overrides` change or add GPTConfig fields."""
    return model_section(**{**SMALL_GPT, **overrides})


def adamw_cosine(o: ml_collections.ConfigDict, lr: float) -> ml_collections.ConfigDict:
    """The small GPTs' optimizer: AdamW (b2 0.99, weight decay 0.1), 100 warmup steps then
    cosine decay, gradient clipping at 1; sets the `optimizer` section `o` in place."""
    o.name = "adamw"
    o.lr = lr
    o.schedule = "warmup_cosine"
    o.warmup_steps = 100
    o.weight_decay = 0.1
    o.b2 = 0.99
    o.clip_norm = 1.0
    return o


def char_gpt_config(preset: str) -> ml_collections.ConfigDict:
    """Chapter 3: a character-level GPT on the stdlib corpus; smoke / cpu / gpu presets."""
    cfg = config.base_config()
    cfg.data.name = "stdlib"
    cfg.model = small_gpt()
    # One device, as the chapter's numbers were measured; shard with e.g.
    # --config.mesh.devices=0 --config.mesh.fsdp=-1 (or tensor=-1).
    cfg.mesh = mesh_config(devices=1)
    cfg.lm = {
        "max_chars": 0,
        "val_fraction": 0.1,
        "eval_tokens": 16384,
        "eval_batch_size": 64,
        "prompt": "",  # "": the first 8 validation characters.
        "sample_tokens": 200,
        "temperature": 0.8,
        "top_k": 0,
        "top_p": 0.95,
        "attention_len": 48,
        "position_windows": 1024,
    }
    cfg.decode = {"batch_size": 1, "prompt_len": 8, "new_tokens": (32,), "repeats": 3}
    t = cfg.train
    t.steps = 1500
    t.batch_size = 16
    t.eval_every = 250
    t.log_every = 50
    t.steps_per_call = 10
    o = adamw_cosine(cfg.optimizer, lr=2e-3)
    if preset == "smoke":
        cfg.model.update(context=16, n_layer=2, n_head=2, d_model=32)
        cfg.lm.update(max_chars=50_000, eval_tokens=512, sample_tokens=8, attention_len=12,
                      position_windows=16)
        cfg.decode.update(prompt_len=4, new_tokens=(8,), repeats=1)
        t.steps = 20
        t.batch_size = 8
        t.eval_every = 10
        t.log_every = 10
        o.warmup_steps = 5
    elif preset == "gpu":
        cfg.model.update(context=256, n_layer=6, n_head=6, d_model=384, dropout=0.1,
                         dtype="bfloat16")
        cfg.lm.update(eval_tokens=262_144, eval_batch_size=128, sample_tokens=500)
        cfg.decode.update(batch_size=8, new_tokens=(64, 128, 240), repeats=5)
        t.steps = 5000
        t.batch_size = 64
        t.eval_every = 500
        t.steps_per_call = 50
        t.precision = "bfloat16"
        o.lr = 1e-3
        o.warmup_steps = 200
    return cfg


def pretrain_config(preset: str) -> ml_collections.ConfigDict:
    """Chapter 4 pretraining. `cpu` is nanoGPT's shakespeare-char CPU run, hyper-parameter for
    hyper-parameter: no bias, learned positions, LayerNorm, tied embeddings, AdamW(0.9, 0.99),
    weight decay 0.1, 100 warmup steps then cosine to lr/10, clip 1.0, no dropout."""
    cfg = config.base_config()
    cfg.experiment = "gpt"
    cfg.data.name = "stdlib"
    cfg.model = small_gpt(pos="learned", norm="layernorm", bias=False,
                          # bf16 matmuls, f32 elsewhere, where the CPU has bf16 instructions
                          # (1.5-1.9x); f32 where XLA would emulate them (1.4x slower).
                          matmul="auto")
    # Data parallel over every device of the process: the GPUs of a machine, or CPU cores
    # split into devices with XLA_FLAGS=--xla_force_host_platform_device_count=2.
    cfg.mesh = mesh_config(data=-1)
    cfg.tokenizer = {"name": "char", "vocab_size": 512}  # vocab_size: BPE only.
    cfg.lm = {
        "max_chars": 0,  # read only the first N characters of the text; 0 = all of it.
        "val_fraction": 0.1,  # the last part of the text held out for val_loss.
        "eval_batches": 200,  # random held-out batches behind val_loss (as nanoGPT).
        "monitor_batches": 20,  # the first N of them for the periodic eval curve; 0 = none.
        "prompt": "\n",  # the sample written to sample.txt starts from this text.
        "sample_tokens": 200,  # tokens sampled after the prompt.
        "temperature": 0.8,  # sampling temperature.
        "top_k": 0,  # sample among the k likeliest tokens; 0 = all.
        "grad_barriers": True,  # models/grad_barriers.py: a CPU fusion workaround.
    }
    t = cfg.train
    t.steps = 2000
    t.batch_size = 12
    t.eval_every = 250
    t.log_every = 50
    t.steps_per_call = 50
    o = adamw_cosine(cfg.optimizer, lr=1e-3)
    o.min_lr_ratio = 0.1
    o.b1 = 0.9
    if preset == "smoke":
        cfg.model.update(context=16, n_layer=1, n_head=2, d_model=32)
        cfg.lm.update(max_chars=20_000, eval_batches=4, monitor_batches=0, sample_tokens=8)
        # Batch 8: divisible by the 8 simulated devices the tests run the mesh on.
        t.steps = 20
        t.batch_size = 8
        t.eval_every = 10
        t.log_every = 10
        t.steps_per_call = 10
        o.warmup_steps = 5
    elif preset == "gpu":  # nanoGPT's config/train_shakespeare_char.py.
        cfg.model.update(context=256, n_layer=6, n_head=6, d_model=384, dropout=0.2,
                         dtype="bfloat16", matmul="", attention="cudnn")
        cfg.lm.update(sample_tokens=250)
        cfg.lm.grad_barriers = False  # a CPU compiler workaround; GPUs fuse well without.
        t.steps = 5000
        t.batch_size = 64
        t.eval_every = 250
        t.steps_per_call = 50
        t.precision = "bfloat16"
    return cfg


def moe_config(preset: str) -> ml_collections.ConfigDict:
    """Chapter 7: the small GPT with MoE feed-forwards on a mixture of two embedded corpora
    (Python source and English prose). Its dense twin (same active parameters per token) is
    built from the same section by ch7."""
    cfg = config.base_config()
    cfg.experiment = "moe"
    cfg.data.name = "stdlib"
    cfg.model = small_gpt(ffn="moe")
    m = cfg.model.moe
    m.n_experts = 8
    m.top_k = 2
    m.d_expert = 256          # 2 experts of 256 = the dense twin's d_ff 512 (4 * d_model)
    # Dropless (every token reaches its k experts) on expert-sorted blocks: on CPU 5x faster
    # than the dense dispatch dropless (benchmarks/moe_train.py), which expert parallelism
    # needs (ch7 checks that with impl=dense). With capacity 1.25 the MoE dropped 3.8% of the
    # tokens and lost to the dense twin (val 1.210 vs 1.181); dropless it wins (1.141).
    m.capacity_factor = 0.0
    m.impl = "blocked"
    m.groups = 16             # one group per sequence of the batch (capacity is per group)
    cfg.lm = {
        "domains": "stdlib,pydoc",  # embedded corpora (or text files), one per domain
        "max_chars": 400_000,       # per domain
        "val_fraction": 0.1,
        "eval_tokens": 16384,
        "eval_batch_size": 64,
        "analysis_tokens": 8192,    # per domain, for the routing figures
        "snapshots": 4,             # looks inside the MoE run at 4 points of training
        "aux_weights": {"load_balance": 0.01, "z_loss": 0.001},
        "curriculum": 0.0,          # this share of the steps: single-domain batches first
    }
    cfg.ablation = {"variants": "base,top1,shared_top1,capacity_1.25,capacity_1.0,dense,ragged,"
                                "no_balance_loss,no_z_loss,aux_free_bias",
                    "per_domain": False}  # each variant's val loss per domain too
    t = cfg.train
    t.steps = 1200
    t.batch_size = 16
    t.eval_every = 300
    t.log_every = 50
    t.steps_per_call = 10
    o = adamw_cosine(cfg.optimizer, lr=2e-3)
    if preset == "smoke":
        cfg.model.update(context=16, n_layer=2, n_head=2, d_model=32)
        m.n_experts = 4
        m.d_expert = 64
        m.groups = 8
        cfg.lm.update(max_chars=30_000, eval_tokens=512, analysis_tokens=256, snapshots=2)
        cfg.ablation.variants = "base,capacity_1.25,aux_free_bias"
        t.steps = 12
        t.batch_size = 8
        t.eval_every = 6
        t.log_every = 6
        t.steps_per_call = 6
        o.warmup_steps = 2
    elif preset == "gpu":
        cfg.model.update(context=256, n_layer=6, n_head=6, d_model=384, dtype="bfloat16")
        m.n_experts = 16
        m.d_expert = 768
        m.groups = 64
        cfg.lm.update(max_chars=0, eval_tokens=262_144, eval_batch_size=128)
        t.steps = 5000
        t.batch_size = 64
        t.eval_every = 500
        t.steps_per_call = 50
        t.precision = "bfloat16"
        o.lr = 1e-3
        o.warmup_steps = 200
    return cfg
