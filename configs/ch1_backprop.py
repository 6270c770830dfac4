"""Chapter 1: backprop by hand and with JAX: engines, jvp/vjp, gradcheck, lse, MLP, optimizers, char LMs, NaNs.

python -m jaxcourse.ch1 --config=configs/ch1_backprop.py:cpu
One lab only:   python -m jaxcourse.ch1 --config.labs=charlm
Another corpus: python -m jaxcourse.ch1 --config.data.path=tinyshakespeare.txt

`train` / `optimizer` drive the character models (bigram and MLP) through the shared loop;
`optimizers` is the comparison run on the digits MLP; `mlp` is the hand-written-backprop lab.
"""
from jaxcourse.config import base_config

LABS = "engine,modes,gradcheck,lse,mlp,optimizers,charlm,debugging"


def get_config(preset: str = "cpu"):
    cfg = base_config()
    cfg.experiment = "backprop"
    cfg.labs = LABS  # comma-separated subset to run
    cfg.data.name = "stdlib"  # char-model corpus; data.path=<file> reads a local text file
    # Scalar engine: a batch of digits through a 64-H-10 MLP (one graph node per multiply).
    cfg.engine = {"scalar_examples": 16, "scalar_hidden": 32, "tensor_examples": 512,
                  "tensor_hidden": 64}
    # Jacobians of R^n -> R^m: "wide" is (n_large -> m_small), "tall" the reverse.
    cfg.modes = {"n_large": 1000, "n_small": 4, "repeats": 20}
    cfg.gradcheck = {"examples": 32, "hidden": 8}
    cfg.mlp = {"hidden": 64, "steps": 3000, "batch_size": 64, "lr": 0.1}
    # Learning rates are each method's usual range, picked by hand, not tuned per method.
    cfg.optimizers = {"names": ("sgd", "momentum", "nesterov", "adam", "adamw", "lion",
                                "adafactor", "muon"),
                      "lrs": (0.1, 0.05, 0.05, 3e-3, 3e-3, 1e-3, 1e-2, 0.02),
                      "steps": 1000, "batch_size": 64, "hidden": 64, "weight_decay": 1e-2}
    cfg.charlm = {"corpus_chars": 300_000, "seq_len": 64, "context": 8, "embed_dim": 16,
                  "hidden_dim": 256, "bigram_lr": 0.1, "eval_windows": 256, "sample_chars": 400}
    t, o = cfg.train, cfg.optimizer
    t.steps, t.batch_size, t.eval_every, t.log_every, t.steps_per_call = 1500, 32, 250, 50, 50
    o.name, o.lr, o.schedule, o.warmup_steps = "adamw", 3e-3, "warmup_cosine", 100
    if preset == "smoke":
        cfg.engine.update(scalar_examples=2, scalar_hidden=4, tensor_examples=64, tensor_hidden=8)
        cfg.modes.update(n_large=64, n_small=2, repeats=2)
        cfg.gradcheck.update(examples=8, hidden=4)
        cfg.mlp.update(hidden=16, steps=50)
        cfg.optimizers.update(names=("sgd", "adam"), lrs=(0.1, 3e-3), steps=20, hidden=16)
        cfg.charlm.update(corpus_chars=20_000, seq_len=16, context=3, hidden_dim=32,
                          eval_windows=16, sample_chars=40)
        t.steps, t.batch_size, t.eval_every, t.log_every, t.steps_per_call = 20, 8, 10, 10, 10
        o.warmup_steps = 5
    elif preset == "gpu":
        cfg.optimizers.update(steps=5000, batch_size=256, hidden=256)
        cfg.charlm.update(corpus_chars=1_000_000, seq_len=256, context=16, embed_dim=64,
                          hidden_dim=1024, eval_windows=2048)
        t.steps, t.batch_size, t.eval_every, t.log_every, t.steps_per_call = 10000, 128, 1000, 100, 100
        o.lr, o.warmup_steps = 1e-3, 500
    return cfg
