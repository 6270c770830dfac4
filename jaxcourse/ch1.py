"""Chapter 1: gradient descent and backpropagation.

    python -m jaxcourse.ch1 [--config=configs/ch1_backprop.py:cpu] [--config.labs=engine,lse]

Labs (each returns flat metrics; all land in summary.json):
  engine      scalar and vectorized reverse-mode engines vs jax.grad on a digits MLP
  modes       jvp / vjp, jacfwd vs jacrev cost for wide and tall maps
  gradcheck   central differences vs jax.grad, hand-written backprop and a planted bad VJP
  lse         naive log-sum-exp overflows; the custom_vjp one does not
  mlp         hand-written backprop trained with SGD on digits
  optimizers  the same MLP through the shared loop with SGD, momentum, Adam, AdamW, Lion...
  charlm      makemore bigram + MLP character models, vs the count-based bigram optimum
  debugging   a planted NaN caught by jax.debug.print, debug_nans and checkify
"""

from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse import cli, report
from jaxcourse.autodiff import (charlm_lab, checks, debugging, gradcheck, lse, mlp_backprop, modes,
                                plots)
from jaxcourse.autodiff.runs import sub_config
from jaxcourse.data import pipeline, sources
from jaxcourse.errors import UserError
from jaxcourse.train import Task, train


def _digits() -> dict:
    d = sources.load_digits()
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731  [N,8,8,1] -> [N,64]
    return {"x_train": flat(d["x_train"]), "y_train": d["y_train"],
            "x_test": flat(d["x_test"]), "y_test": d["y_test"]}


def _init_mlp(cfg, digits, hidden: int) -> dict:
    """The chapter's MLP (digits pixels -> hidden tanh -> 10 classes), seeded by train.seed."""
    return mlp_backprop.init_params(jax.random.key(cfg.train.seed), digits["x_train"].shape[1], hidden, 10)


def lab_engine(cfg, digits, workdir) -> dict:
    """Both engines' gradients of the MLP loss vs jax.grad (float32)."""
    c = cfg.engine
    x, y = digits["x_train"], digits["y_train"]
    p_small = _init_mlp(cfg, digits, c.scalar_hidden)
    p_big = _init_mlp(cfg, digits, c.tensor_hidden)
    scalar = checks.scalar_engine_vs_jax(p_small, x[:c.scalar_examples], y[:c.scalar_examples])
    vector = checks.tensor_engine_vs_jax(p_big, x[:c.tensor_examples], y[:c.tensor_examples])
    return {
        "engine_max_abs_diff": max(scalar["max_abs_diff"], vector["max_abs_diff"]),
        "engine_scalar_max_abs_diff": scalar["max_abs_diff"],
        "engine_scalar_graph_nodes": scalar["graph_nodes"],
        "engine_tensor_max_abs_diff": vector["max_abs_diff"],
        "engine_tensor_graph_nodes": vector["graph_nodes"],
    }


def lab_modes(cfg, digits, workdir) -> dict:
    """jacfwd needs n JVPs, jacrev m VJPs: time and count FLOPs for both shapes."""
    c = cfg.modes
    out = {}
    for shape, (n, m) in {"wide": (c.n_large, c.n_small), "tall": (c.n_small, c.n_large)}.items():
        r = modes.compare_jacobians(n, m, repeats=c.repeats, seed=cfg.train.seed)
        out.update({f"modes_{shape}_{k}": v for k, v in r.items()})
    return out


def lab_gradcheck(cfg, digits, workdir) -> dict:
    """Finite differences (float64) vs jax.grad, vs hand-written backprop, vs a planted bug."""
    c = cfg.gradcheck
    x, y = digits["x_train"][:c.examples], digits["y_train"][:c.examples]
    params = _init_mlp(cfg, digits, c.hidden)
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x64 = np.asarray(x, np.float64)
    loss_w1 = lambda w1: mlp_backprop.loss({**p64, "w1": w1}, x64, y)  # noqa: E731
    manual_w1 = lambda w1: mlp_backprop.backward({**p64, "w1": w1}, x64, y)[1]["w1"]  # noqa: E731
    grid = np.linspace(-3, 3, 13)
    return {
        "gradcheck_rel_err_jax_grad": gradcheck.check_grad(loss_w1, p64["w1"]),
        "gradcheck_rel_err_handwritten": gradcheck.check_grad(loss_w1, p64["w1"], grad_fn=manual_w1),
        "gradcheck_rel_err_planted_bug": gradcheck.check_grad(
            lambda v: jnp.sum(gradcheck.softplus_buggy_grad(v)), grid),
    }


def lab_lse(cfg, digits, workdir) -> dict:
    """Where the naive formula overflows, and the custom VJP's gradient = softmax."""

    @jax.jit  # one compile for the whole lab instead of one per eager op
    def measure(big, key):
        x = 30.0 * jax.random.normal(key, (64, 128))
        total = lambda f: lambda v: f(v).sum()  # noqa: E731
        g_big = jax.grad(total(lse.logsumexp_stable))(big)
        g_rand = jax.grad(total(lse.logsumexp_stable))(x)
        g_ref = jax.grad(total(lambda v: jax.nn.logsumexp(v, axis=-1)))(x)
        return {
            "lse_naive_at_1000_is_inf": jnp.isinf(lse.logsumexp_naive(big)[0]),
            "lse_naive_grad_at_1000_is_nan": jnp.any(jnp.isnan(jax.grad(total(lse.logsumexp_naive))(big))),
            "lse_stable_at_1000": lse.logsumexp_stable(big)[0],
            "lse_stable_grad_vs_softmax": jnp.max(jnp.abs(g_big - jax.nn.softmax(big))),
            "lse_stable_vs_jax_nn_max_abs_diff": jnp.max(jnp.abs(
                lse.logsumexp_stable(x) - jax.nn.logsumexp(x, axis=-1))),
            "lse_stable_grad_vs_jax_max_abs_diff": jnp.max(jnp.abs(g_rand - g_ref)),
        }

    big = jnp.array([[1000.0, 999.0, 998.0]])
    out = {k: float(v) for k, v in measure(big, jax.random.key(cfg.train.seed)).items()}
    return {"lse_f32_overflow_threshold": float(np.log(np.finfo(np.float32).max)), **out}


def lab_mlp(cfg, digits, workdir) -> dict:
    """The hand-written backward equals jax.grad, and trains the MLP with plain SGD."""
    c = cfg.mlp
    params = _init_mlp(cfg, digits, c.hidden)
    diff = mlp_backprop.max_abs_diff_vs_jax(params, digits["x_train"], digits["y_train"])
    params, losses = mlp_backprop.train_sgd(
        params, digits["x_train"], digits["y_train"], steps=c.steps, batch_size=c.batch_size,
        lr=c.lr, seed=cfg.train.seed)
    window = max(1, min(50, c.steps // 10))
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    plots.plot_panels([{"title": "hand-written backprop + SGD (digits MLP)",
                        "ylabel": "train cross-entropy (nats)",
                        "curves": {"per step": (np.arange(1, len(losses) + 1), losses),
                                   f"mean of {window}": (np.arange(window, len(losses) + 1), smooth)},
                        "logy": True}], workdir / "mlp_backprop_loss.png")
    return {
        "mlp_handwritten_vs_jax_max_abs_diff": float(diff),
        "mlp_first_loss": float(losses[0]),
        "mlp_final_loss": float(losses[-window:].mean()),
        "mlp_train_accuracy": float(mlp_backprop.accuracy(params, digits["x_train"], digits["y_train"])),
        "mlp_test_accuracy": float(mlp_backprop.accuracy(params, digits["x_test"], digits["y_test"])),
    }


def mlp_task(hidden: int) -> Task:
    """The digits MLP of mlp_backprop, differentiated by jax.grad inside the shared loop."""

    def init(rng, batch):
        return mlp_backprop.init_params(rng, batch["x"].shape[-1], hidden, 10), {}

    def loss(params, model_state, batch, rng, train):
        logits, _ = mlp_backprop.forward(params, batch["x"])
        value = mlp_backprop.loss(params, batch["x"], batch["y"])
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
        return value, ({"accuracy": acc}, model_state)

    return Task(init=init, loss=loss)


def lab_optimizers(cfg, digits, workdir) -> dict:
    """Same model, data order and init for every optimizer; only the update rule changes."""
    c = cfg.optimizers
    if len(c.names) != len(c.lrs):
        raise UserError(f"config optimizers.names has {len(c.names)} entries but "
                        f"optimizers.lrs has {len(c.lrs)}")
    if len(set(c.names)) != len(c.names):  # each run lives in (and resumes from) opt_<name>/
        raise UserError(f"config optimizers.names={tuple(c.names)} repeats a name; "
                        "compare learning rates in separate runs")
    train_data = pipeline.batches({"x": digits["x_train"], "y": digits["y_train"]},
                                  c.batch_size, cfg.train.seed)
    eval_data = pipeline.eval_batches({"x": digits["x_test"], "y": digits["y_test"]}, 512)
    log_every = max(1, c.steps // 50)
    out, loss_curves, acc_curves = {}, {}, {}
    for name, lr in zip(c.names, c.lrs):
        sub = sub_config(
            cfg, train={"steps": c.steps, "batch_size": c.batch_size, "log_every": log_every,
                        "steps_per_call": log_every, "eval_every": max(1, c.steps // 5)},
            optimizer={"name": name, "lr": float(lr), "schedule": "constant", "warmup_steps": 0,
                       "weight_decay": c.weight_decay if name in ("adamw", "lion") else 0.0})
        run_dir = workdir / f"opt_{name}"
        with report.stage(f"optimizer {name} lr={lr:g}, {c.steps} steps"):
            _, final = train(mlp_task(c.hidden), sub, run_dir, train_data, eval_data)
        print(f"optimizer {name}: test accuracy {final['eval/accuracy']:.4f}", flush=True)
        rows = plots.read_metrics(run_dir)
        loss_curves[f"{name} lr={lr:g}"] = plots.series(rows, "train/loss")
        acc_curves[f"{name} lr={lr:g}"] = plots.series(rows, "eval/accuracy")
        out[f"opt_{name}_train_loss"] = float(plots.series(rows, "train/loss")[1][-1])
        out[f"opt_{name}_eval_loss"] = final["eval/loss"]
        out[f"opt_{name}_eval_accuracy"] = final["eval/accuracy"]
    plots.plot_panels(
        [{"title": "train loss", "ylabel": "cross-entropy (nats)", "curves": loss_curves,
          "logy": True},
         {"title": "test accuracy", "ylabel": "accuracy (fraction correct)", "curves": acc_curves}],
        workdir / "optimizers.png", title=f"digits MLP ({c.hidden} hidden), batch {c.batch_size}")
    return out


def lab_debugging(cfg, digits, workdir) -> dict:
    """Catch and locate the planted NaN; the text report goes to debugging.txt."""
    r = debugging.run_debugging_lab()
    (workdir / "debugging.txt").write_text("".join(f"{k}: {v}\n" for k, v in r.items()))
    return {f"debug_{k}": v for k, v in r.items()}


LABS = {"engine": lab_engine, "modes": lab_modes, "gradcheck": lab_gradcheck, "lse": lab_lse,
        "mlp": lab_mlp, "optimizers": lab_optimizers, "charlm": charlm_lab.lab_charlm,
        "debugging": lab_debugging}


def run_backprop(cfg, workdir: pathlib.Path) -> dict:
    """Runs the labs named in cfg.labs, in order; returns all their metrics."""
    names = [n.strip() for n in cfg.labs.split(",") if n.strip()]
    unknown = [n for n in names if n not in LABS]
    if unknown or not names:
        raise UserError(f"config labs={cfg.labs!r}: unknown lab(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(LABS)}")
    digits = _digits() if set(names) - {"modes", "lse", "charlm", "debugging"} else None
    metrics = {}
    for name in names:
        start = time.perf_counter()
        with report.stage(f"lab {name}"):
            metrics.update(LABS[name](cfg, digits, pathlib.Path(workdir)))
        metrics[f"seconds_{name}"] = round(time.perf_counter() - start, 2)
    return metrics


EXPERIMENTS = {"backprop": run_backprop}


def main(argv=None):
    return cli.run_chapter("ch1", EXPERIMENTS, default_config="ch1_backprop", argv=argv)


if __name__ == "__main__":
    main()
