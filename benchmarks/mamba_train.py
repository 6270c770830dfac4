"""Mamba LM training on CPU side by side: jaxcourse (ch10, mixer "mamba") and mamba.py.

mamba.py (github.com/alxndrTL/mamba.py) is a pure-PyTorch Mamba whose selective scan is a
parallel scan (pscan). Both sides train the same LM: embedding, 4 residual blocks
x + Mamba(RMSNorm(x)) with no feed-forward, final RMSNorm, untied vocab projection, no position
encoding; Mamba with d_model 128, expand 2, d_state 16, d_conv 4, dt_rank 8; context 64, batch
12; AdamW lr 1e-3 (b2 0.99, weight decay 0.1 on matrices), 100 warmup steps then cosine to
1e-4, clip 1.0; character-level tiny Shakespeare (first 90% train, last 10% validation).

    python benchmarks/mamba_train.py --mambapy <checkout of github.com/alxndrTL/mamba.py>
        [--iters 500] [--repeats 2] [--devices 1,2] [--skip-torch]
        [--torch-python /work/torchvenv/bin/python]
        [extra --config.key=value for the JAX run, e.g. --config.model.matmul=auto]

PyTorch is not a project dependency and nothing of mamba.py is in this repo: the PyTorch side
runs in its own interpreter (`python3 -m venv /work/torchvenv && /work/torchvenv/bin/pip
install torch numpy`) and imports `mambapy` from the given checkout. The runs go one after
the other (never together: they would share the cores), interleaved `--repeats` times;
PyTorch runs with 2 threads, jaxcourse on one XLA device and on the CPU split into 2 devices
(`--devices`, data parallel: each core runs half of every batch's scans). The script prints
one markdown table: ms/step (training only, after compilation), tokens/s, the training loss
averaged over the last 50 steps, validation loss (the mean over 200 random validation
batches, jaxcourse's own estimate over `--eval-tokens` validation windows), wall seconds and
the speed-up of the fastest run of each over the fastest mamba.py run.
"""
import argparse
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gpt_train import (DEFAULT_DATA, REPO, devices_label, run_child,  # noqa: E402
                       split_cpu_env, torch_adamw, torch_batch, torch_data)

HP = dict(n_layer=4, d_model=128, d_state=16, context=64, batch_size=12, lr=1e-3,
          min_lr_ratio=0.1, warmup=100, b1=0.9, b2=0.99, weight_decay=0.1, clip=1.0,
          eval_batches=200, last=50)


def lr_at(it, iters):
    """optax.warmup_cosine_decay_schedule(0, lr, warmup, iters, lr * min_lr_ratio)."""
    if it < HP["warmup"]:
        return HP["lr"] * it / HP["warmup"]
    ratio = min((it - HP["warmup"]) / max(iters - HP["warmup"], 1), 1.0)
    end = HP["lr"] * HP["min_lr_ratio"]
    return end + 0.5 * (1 + math.cos(math.pi * ratio)) * (HP["lr"] - end)


def torch_worker(mambapy, data_path, iters, seed, threads):
    """Trains mamba.py's LM and prints one JSON line of measurements."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    from torch.nn import functional as F  # pylint: disable=import-outside-toplevel
    sys.path.insert(0, str(pathlib.Path(mambapy).resolve()))
    from mambapy.lm import LM  # pylint: disable=import-outside-toplevel
    from mambapy.mamba import MambaConfig  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    train_t, val_t, vocab = torch_data(data_path, seed)
    T, B = HP["context"], HP["batch_size"]

    def get_batch(data, gen):
        return torch_batch(data, gen, T, B)

    model = LM(MambaConfig(d_model=HP["d_model"], n_layers=HP["n_layer"],
                           d_state=HP["d_state"], pscan=True), vocab_size=vocab)
    opt = torch_adamw(model, HP)
    gen = torch.Generator().manual_seed(seed)

    def loss_of(x, y):
        logits = model(x)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))

    losses, t0 = [], None
    for it in range(iters):
        if it == 1:  # like the JAX side: the first step (warm-up) is not timed
            t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(it, iters)
        loss = loss_of(*get_batch(train_t, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HP["clip"])
        opt.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    model.eval()
    eval_gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        val = [loss_of(*get_batch(val_t, eval_gen)).item() for _ in range(HP["eval_batches"])]
    ms = 1000 * train_s / (iters - 1)
    print(json.dumps({
        "impl": f"mamba.py (PyTorch {torch.__version__} eager, pscan, "
                f"{torch.get_num_threads()} threads)",
        "ms_per_step": ms, "tokens_per_s": B * T * 1000 / ms,
        "val_loss": float(np.mean(val)),
        "train_loss_last": float(np.mean(losses[-HP["last"]:])),
        "wall_s_in_process": time.perf_counter() - t_start}))


def jax_run(data_path, iters, eval_tokens, extra, devices):
    """ch10's mixers experiment with the one model "mamba" in mamba.py's shape; with devices
    > 1 the CPU is split into that many XLA devices and a data-parallel mesh spreads each batch
    over them (the two cores then run the two halves of every scan at once)."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="mamba_bench_"))
    mesh = ["--config.mesh.devices=0", "--config.mesh.data=-1"] if devices > 1 else []
    cmd = [sys.executable, "-m", "jaxcourse.ch10", "--config=configs/ch10_mixers.py:cpu",
           f"--workdir={workdir}", f"--config.data.path={data_path}",
           "--config.lab.models=mamba", "--config.lab.match_params=False",
           f"--config.model.n_layer={HP['n_layer']}", f"--config.model.d_model={HP['d_model']}",
           f"--config.model.context={HP['context']}", "--config.model.ffn=none",
           "--config.model.pos=none", "--config.model.tie_embeddings=False",
           "--config.model.norm=rmsnorm", f"--config.model.mamba.d_state={HP['d_state']}",
           f"--config.train.batch_size={HP['batch_size']}", f"--config.train.steps={iters}",
           f"--config.train.eval_every={iters}", f"--config.train.log_every={HP['last']}",
           f"--config.optimizer.lr={HP['lr']}", f"--config.optimizer.b2={HP['b2']}",
           f"--config.optimizer.warmup_steps={HP['warmup']}",
           f"--config.optimizer.min_lr_ratio={HP['min_lr_ratio']}",
           f"--config.optimizer.weight_decay={HP['weight_decay']}",
           f"--config.optimizer.clip_norm={HP['clip']}", "--config.lm.val_fraction=0.1",
           f"--config.lm.eval_tokens={eval_tokens}", "--config.decode.contexts=(64,)",
           "--config.decode.new_tokens=2", "--config.decode.repeats=1", *mesh, *extra]
    _, wall, rss = run_child(cmd, split_cpu_env(devices))
    m = json.loads((workdir / "summary.json").read_text())["metrics"]
    rows = [json.loads(line) for line in (workdir / "mamba" / "metrics.jsonl").open()]
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    shutil.rmtree(workdir)
    tps = m["mamba/tokens_per_second"]
    return {"impl": f"jaxcourse (ch10 mixer mamba, {devices_label(devices)})"
                    + (f" {' '.join(extra)}" if extra else ""),
            "ms_per_step": HP["batch_size"] * HP["context"] * 1000 / tps, "tokens_per_s": tps,
            "val_loss": m["mamba/val_loss"], "train_loss_last": train[-1],
            "params": m["mamba/params"], "wall_s": wall, "peak_rss_mb": rss}


def torch_run(torch_python, mambapy, data_path, iters, seed):
    out, wall, rss = run_child([torch_python, __file__, "--worker", "--mambapy", mambapy,
                                "--data", str(data_path), "--iters", str(iters),
                                "--seed", str(seed)])
    res = json.loads(out.strip().splitlines()[-1])
    res.update(wall_s=wall, peak_rss_mb=rss)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mambapy", required=True, help="a checkout of alxndrTL/mamba.py")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=200 * 12 * 64)
    ap.add_argument("--torch-python", default="/work/torchvenv/bin/python")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of each")
    ap.add_argument("--devices", default="1,2", help="CPU device counts for the JAX runs")
    ap.add_argument("--skip-torch", action="store_true", help="the JAX runs only")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, jax_overrides = ap.parse_known_args()  # the rest: --config.key=value for the JAX run
    if any(not o.startswith("--config.") for o in jax_overrides):
        ap.error(f"unrecognized arguments: {' '.join(jax_overrides)}")
    args.jax_overrides = jax_overrides
    if args.worker:
        return torch_worker(args.mambapy, args.data, args.iters, args.seed, args.threads)
    if not pathlib.Path(args.data).is_file():
        sys.exit(f"data file not found: {args.data}")
    if not (pathlib.Path(args.mambapy) / "mambapy" / "mamba.py").is_file():
        sys.exit(f"not a mamba.py checkout (no mambapy/mamba.py): {args.mambapy}")
    os.chdir(REPO)
    rows, load_before = [], os.getloadavg()
    runs = [("jax", int(d)) for d in args.devices.split(",")]
    runs += [] if args.skip_torch else [("torch", 0)]
    for repeat in range(args.repeats):  # interleaved, so that drifting load hits every row
        for kind, devices in runs:
            r = (jax_run(args.data, args.iters, args.eval_tokens, args.jax_overrides, devices)
                 if kind == "jax" else
                 torch_run(args.torch_python, args.mambapy, args.data, args.iters, args.seed))
            rows.append({**r, "repeat": repeat, "load": os.getloadavg()[0]})
            print(f"{r['impl']}: {r['ms_per_step']:.1f} ms/step, {r['tokens_per_s']:.0f} "
                  f"tokens/s, val loss {r['val_loss']:.3f}", flush=True)
    print(f"\n{args.iters} steps; load averages (1, 5, 15 min) before: {load_before}, after: "
          f"{os.getloadavg()} on {os.cpu_count()} cores")
    print("| implementation | run | ms/step | tokens/s | train loss (last 50) | val loss "
          "| wall s | load (1 min) after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['repeat'] + 1} | {r['ms_per_step']:.1f} | "
              f"{r['tokens_per_s']:.0f} | {r['train_loss_last']:.3f} | {r['val_loss']:.3f} | "
              f"{r['wall_s']:.1f} | {r['load']:.2f} |")
    best = {}
    for r in rows:  # the fastest run of each implementation: the least disturbed one
        best[r["impl"]] = max(best.get(r["impl"], 0.0), r["tokens_per_s"])
    ref = max((v for k, v in best.items() if k.startswith("mamba.py")), default=None)
    for impl, tps in best.items():
        if impl.startswith("jaxcourse") and ref:
            print(f"speed-up of {impl} over mamba.py (fastest runs, tokens/s): {tps / ref:.2f}x")
    print(json.dumps(rows))
    return None


if __name__ == "__main__":
    main()
