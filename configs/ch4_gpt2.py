"""Chapter 4: GPT-2 small (124M: 12 layers, 12 heads, width 768, context 1024) pretraining with a byte-level BPE.

python -m jaxcourse.ch4 --config=configs/ch4_gpt2.py:gpu --config.data.path=YOUR_CORPUS.txt
The tokenizer is trained on the corpus (GPT-2's own vocabulary cannot be downloaded here); the model's
vocabulary is padded to 50304 (a multiple of 64) as in nanoGPT. `cpu` runs a few steps to show it works.
"""
from jaxcourse.lm.configs import pretrain_config


def get_config(preset: str = "cpu"):
    cfg = pretrain_config(preset)
    cfg.tokenizer.update(name="bpe", vocab_size=50257)
    cfg.model.update(vocab_size=50304, context=1024, n_layer=12, n_head=12, d_model=768,
                     dropout=0.0)
    cfg.lm.update(eval_batches=200, monitor_batches=20, sample_tokens=100)
    t = cfg.train
    o = cfg.optimizer
    o.lr = 6e-4
    o.min_lr_ratio = 0.1
    o.warmup_steps = 700
    o.b2 = 0.95
    if preset == "smoke":
        cfg.tokenizer.vocab_size = 300
        cfg.model.update(vocab_size=320, context=32, n_layer=2, n_head=2, d_model=64)
        cfg.lm.update(eval_batches=2, monitor_batches=0, sample_tokens=4)
        t.steps = 4
        t.batch_size = 8
        t.steps_per_call = 2
        o.warmup_steps = 1
    elif preset == "cpu":  # a few real GPT-2-small steps on a shorter context.
        cfg.tokenizer.vocab_size = 8192
        cfg.model.update(context=256)
        cfg.lm.update(eval_batches=4, monitor_batches=0, sample_tokens=20)
        t.steps = 6
        t.batch_size = 4
        t.steps_per_call = 2
        t.eval_every = 0
        t.log_every = 2
        o.warmup_steps = 2
    else:  # 8 x 64 x 1024 = 0.5M tokens per optimizer step, nanoGPT's GPT-2 recipe.
        cfg.model.update(attention="cudnn", dtype="bfloat16")
        t.steps = 5000
        t.batch_size = 64
        t.grad_accum = 8
        t.steps_per_call = 1
        t.eval_every = 500
        t.log_every = 10
        t.precision = "bfloat16"
    return cfg
