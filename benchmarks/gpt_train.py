"""GPT training on CPU side by side: jaxcourse (ch4 `cpu` preset), nanoGPT, a compact PyTorch GPT.

Both train the same model (4 layers, 4 heads, width 128, context 64, batch 12, no bias, tied
embeddings, GELU MLP 4x, AdamW lr 1e-3 b2=0.99 wd=0.1, 100 warmup steps then cosine to 1e-4,
clip 1.0) for 2000 iterations on character-level tiny Shakespeare, then report validation loss
as nanoGPT defines it: the mean over 200 random batches of the held-out last 10% of the text.

    python benchmarks/gpt_train.py [--iters 2000] [--torch-python /work/torchvenv/bin/python]
                                   [--nanogpt <checkout of github.com/karpathy/nanoGPT>]

The PyTorch side runs in its own interpreter (PyTorch is not a project dependency):
`python3 -m venv /work/torchvenv && /work/torchvenv/bin/pip install torch==2.13.0 numpy`.
With `--nanogpt`, nanoGPT's own train.py also runs, with the exact command of its README's CPU
section (eval every 250 iterations on 20 batches, a loss print every iteration): the reference
the issue names. Its ms/iter is the mean of the times it prints, leaving out iteration 0 and
the iterations that evaluate; its val loss is its own 20-batch estimate at the last step.
Nothing of nanoGPT is in this repo: its files are linked from a temporary directory that holds
the character-level data in nanoGPT's format (data/shakespeare_char/prepare.py's split).
The runs go one after the other (never together: they would share the two cores), interleaved
`--repeats` times: jaxcourse on one XLA device, jaxcourse with the CPU split into 2 devices
(the preset's data-parallel mesh), PyTorch with 2 threads. The script prints one markdown
table: ms/iteration (training only, after compilation), wall seconds (process start to exit,
including imports, compilation and evaluation), validation loss and peak RSS, then the
speed-up of the fastest run of each over the fastest PyTorch run. Each JAX device count gets
its own empty persistent compilation cache: its first round compiles everything, later rounds
load the executables ("first" / "cached"), and the wall-clock ratio against nanoGPT's run of
the same round is printed for each.
"""
import argparse
import json
import math
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
# nanoGPT's config/train_shakespeare_char.py shrunk to the CPU settings of its README.
HP = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, lr=1e-3, min_lr=1e-4,
          warmup=100, b1=0.9, b2=0.99, weight_decay=0.1, clip=1.0, eval_batches=200)


def torch_data(path, seed: int):
    """(train, val, vocab) of the character split as PyTorch tensors, torch seeded."""
    import torch  # pylint: disable=import-outside-toplevel
    torch.manual_seed(seed)
    train_ids, val_ids, vocab = char_split(path)
    return torch.from_numpy(train_ids), torch.from_numpy(val_ids), vocab


def torch_adamw(model, hp: dict):
    """nanoGPT's AdamW: weight decay on the matrices only."""
    import torch  # pylint: disable=import-outside-toplevel
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=hp["lr"], betas=(hp["b1"], hp["b2"]))


def torch_batch(data, gen, T: int, B: int):
    """nanoGPT's get_batch: B random windows of T tokens and their next tokens (PyTorch)."""
    import torch  # pylint: disable=import-outside-toplevel
    ix = torch.randint(len(data) - T, (B,), generator=gen)
    return (torch.stack([data[i:i + T] for i in ix]),
            torch.stack([data[i + 1:i + 1 + T] for i in ix]))


def char_split(path):
    """Sorted-character vocabulary, first 90% train, last 10% validation (nanoGPT prepare.py)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    text = pathlib.Path(path).read_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], dtype=np.int64)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], len(chars)


def lr_at(it, iters):
    if it < HP["warmup"]:
        return HP["lr"] * (it + 1) / (HP["warmup"] + 1)
    ratio = min((it - HP["warmup"]) / max(iters - HP["warmup"], 1), 1.0)
    return HP["min_lr"] + 0.5 * (1 + math.cos(math.pi * ratio)) * (HP["lr"] - HP["min_lr"])


def torch_worker(data_path, iters, seed):
    """Trains the PyTorch GPT and prints one JSON line of measurements."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    from torch import nn  # pylint: disable=import-outside-toplevel
    from torch.nn import functional as F  # pylint: disable=import-outside-toplevel

    class Block(nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.h = h
            self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
            self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
            self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
            q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
            return x + self.down(F.gelu(self.up(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self, vocab):
            super().__init__()
            d, L = HP["n_embd"], HP["n_layer"]
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(HP["block_size"], d)
            self.blocks = nn.ModuleList(Block(d, HP["n_head"]) for _ in range(L))
            self.ln_f = nn.LayerNorm(d, bias=False)
            self.head = nn.Linear(d, vocab, bias=False)
            self.head.weight = self.wte.weight  # tied embeddings
            for name, p in self.named_parameters():
                if p.dim() == 2:  # GPT-2 init; residual projections scaled by depth.
                    std = 0.02 / math.sqrt(2 * L) if name.endswith(("proj.weight", "down.weight")) else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for blk in self.blocks:
                x = blk(x)
            logits = self.head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    t_start = time.perf_counter()
    train_t, val_t, vocab = torch_data(data_path, seed)
    T, B = HP["block_size"], HP["batch_size"]

    def get_batch(data, gen):
        return torch_batch(data, gen, T, B)

    model = GPT(vocab)
    opt = torch_adamw(model, HP)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for it in range(iters):
        for g in opt.param_groups:
            g["lr"] = lr_at(it, iters)
        x, y = get_batch(train_t, gen)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HP["clip"])
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    eval_gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        losses = [model(*get_batch(val_t, eval_gen)).item() for _ in range(HP["eval_batches"])]
    print(json.dumps({
        "impl": f"PyTorch {torch.__version__} (eager, {torch.get_num_threads()} threads)",
        "ms_per_iter": 1000 * train_s / iters, "val_loss": float(np.mean(losses)),
        "final_train_loss": float(loss.item()),
        "wall_s_in_process": time.perf_counter() - t_start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def nanogpt_run(torch_python, checkout, data_path, iters):
    """nanoGPT's README CPU command, unmodified, on the same text; parses what it prints."""
    import pickle  # pylint: disable=import-outside-toplevel
    import re  # pylint: disable=import-outside-toplevel

    import numpy as np  # pylint: disable=import-outside-toplevel
    checkout = pathlib.Path(checkout).resolve()
    if not (checkout / "train.py").is_file():
        sys.exit(f"not a nanoGPT checkout (no train.py): {checkout}")
    run_dir = pathlib.Path(tempfile.mkdtemp(prefix="nanogpt_"))
    for name in ("train.py", "model.py", "configurator.py", "config"):
        (run_dir / name).symlink_to(checkout / name)
    data_dir = run_dir / "data" / "shakespeare_char"
    data_dir.mkdir(parents=True)
    train_ids, val_ids, vocab = char_split(data_path)
    train_ids.astype(np.uint16).tofile(data_dir / "train.bin")
    val_ids.astype(np.uint16).tofile(data_dir / "val.bin")
    chars = sorted(set(pathlib.Path(data_path).read_text()))
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab, "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    cmd = [torch_python, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
           "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
           "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
           f"--max_iters={iters}", f"--lr_decay_iters={iters}", "--dropout=0.0",
           f"--out_dir={run_dir / 'out'}"]
    out, wall, rss = run_child(cmd, cwd=run_dir)
    iter_lines = re.findall(r"iter (\d+): loss ([\d.]+), time ([\d.]+)ms", out)
    evals = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", out)
    eval_steps = {int(s) for s, _ in evals}
    times = [float(t) for i, _, t in iter_lines if int(i) > 0 and int(i) not in eval_steps]
    shutil.rmtree(run_dir)  # its checkpoint and the data copy
    return {"impl": "nanoGPT train.py (eager PyTorch, README CPU command)",
            "ms_per_iter": sum(times) / len(times),
            "val_loss": float(evals[-1][1]), "final_train_loss": float(iter_lines[-1][1]),
            "wall_s": wall, "peak_rss_mb": rss}


def run_child(cmd, env=None, cwd=REPO):
    """Runs `cmd`; returns (stdout, wall seconds, peak RSS MB of that child alone)."""
    # RUSAGE_CHILDREN's maxrss is a maximum over all waited-for children, so each child is run
    # through a tiny wrapper that reports its own rusage.
    wrapper = ("import resource,subprocess,sys,json,time;t=time.perf_counter();"
               "p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
               "sys.stderr.write(p.stderr);sys.stdout.write(p.stdout);"
               "print(json.dumps({'__rss_mb':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024,"
               "'__wall_s':time.perf_counter()-t,'__rc':p.returncode}))")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                         cwd=cwd, check=False, env=env)
    lines = out.stdout.strip().splitlines()
    meta = json.loads(lines[-1])
    if meta["__rc"] != 0:
        sys.exit(f"command failed ({meta['__rc']}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return "\n".join(lines[:-1]), meta["__wall_s"], meta["__rss_mb"]


def split_cpu_env(devices):
    """os.environ with the CPU split into `devices` XLA devices (when > 1)."""
    env = dict(os.environ)
    if devices > 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={devices}").strip()
    return env


def devices_label(devices):
    return f"{devices} CPU devices, data parallel" if devices > 1 else "1 device"


def jax_run(data_path, iters, extra, devices, cache_dir):
    """The ch4 `cpu` preset; with devices > 1 the CPU is split into that many XLA devices and
    the preset's data-parallel mesh spreads each batch over them. `cache_dir` is the
    persistent compilation cache: empty for the first run of a device count, filled after."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="gpt_bench_"))
    cache = "cached" if any(pathlib.Path(cache_dir).iterdir()) else "first"
    env = {**split_cpu_env(devices), "JAXCOURSE_CACHE": cache_dir}
    # No periodic eval inside the timed loop (the PyTorch side has none either); val_loss is
    # computed after training on the same 200-batch definition by both.
    cmd = [sys.executable, "-m", "jaxcourse.ch4", "--config=configs/ch4_gpt.py:cpu",
           f"--config.data.path={data_path}", f"--config.train.steps={iters}",
           "--config.lm.monitor_batches=0", f"--workdir={workdir}", *extra]
    _, wall, rss = run_child(cmd, env)
    m = json.loads((workdir / "summary.json").read_text())["metrics"]
    return {"impl": f"jaxcourse (JAX {m.get('jax_version', '')}, {devices_label(devices)})",
            "ms_per_iter": m["train_ms_per_step"], "val_loss": m["val_loss"],
            "final_train_loss": m["train/loss"], "wall_s": wall, "peak_rss_mb": rss,
            "cache": cache, "workdir": str(workdir)}


def torch_run(torch_python, data_path, iters, seed):
    out, wall, rss = run_child([torch_python, __file__, "--worker", "--data", str(data_path),
                                "--iters", str(iters), "--seed", str(seed)])
    res = json.loads(out.strip().splitlines()[-1])
    res.update(wall_s=wall, peak_rss_mb=rss)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--torch-python", default="/work/torchvenv/bin/python")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-jax", action="store_true")
    ap.add_argument("--nanogpt", default="", help="a nanoGPT checkout: also run its train.py")
    ap.add_argument("--devices", default="1,2", help="CPU device counts for the JAX runs")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of each")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("jax_overrides", nargs="*", help="extra --config.key=value for the JAX run")
    args = ap.parse_args()
    if args.worker:
        return torch_worker(args.data, args.iters, args.seed)
    if not pathlib.Path(args.data).is_file():
        sys.exit(f"data file not found: {args.data}")
    runs = [] if args.skip_jax else [("jax", int(d)) for d in args.devices.split(",")]
    runs += [] if args.skip_torch else [("torch", 0)]
    runs += [("nanogpt", 0)] if args.nanogpt else []
    rows, load_before = [], os.getloadavg()[0]
    caches = {d: tempfile.mkdtemp(prefix="gpt_bench_cache_") for kind, d in runs if kind == "jax"}
    for repeat in range(args.repeats):  # interleaved, so that drifting load hits every row.
        for kind, devices in runs:
            if kind == "jax":
                r = jax_run(args.data, args.iters, args.jax_overrides, devices, caches[devices])
            elif kind == "torch":
                r = torch_run(args.torch_python, args.data, args.iters, args.seed)
            else:
                r = nanogpt_run(args.torch_python, args.nanogpt, args.data, args.iters)
            rows.append({**r, "repeat": repeat})
            print(f"{r['impl']}: {r['ms_per_iter']:.1f} ms/iter, val loss {r['val_loss']:.3f}",
                  flush=True)
    print(f"\nload average (1 min) before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores")
    print("| implementation | run | compilation cache | ms/iter | wall s | val loss "
          "| final train loss | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['repeat'] + 1} | {r.get('cache', '-')} | "
              f"{r['ms_per_iter']:.1f} | {r['wall_s']:.1f} | {r['val_loss']:.3f} | "
              f"{r['final_train_loss']:.3f} | {r['peak_rss_mb']:.0f} |")
    best = {}
    for r in rows:  # the fastest run of each implementation: the least disturbed one.
        if r["impl"] not in best or r["ms_per_iter"] < best[r["impl"]]:
            best[r["impl"]] = r["ms_per_iter"]
    for ref, ref_ms in best.items():
        if ref.startswith(("PyTorch", "nanoGPT")):
            for impl, ms in best.items():
                if impl.startswith("jaxcourse"):
                    print(f"speed-up of {impl} over {ref} (fastest runs): {ref_ms / ms:.2f}x")
    for ref in (r for r in rows if r["impl"].startswith("nanoGPT")):
        for r in (r for r in rows if r["impl"].startswith("jaxcourse")):
            if r["repeat"] == ref["repeat"]:  # process start to exit, same round
                print(f"wall-clock, round {r['repeat'] + 1}: {r['impl']} ({r['cache']} "
                      f"compilation) {r['wall_s']:.1f} s vs nanoGPT {ref['wall_s']:.1f} s: "
                      f"{ref['wall_s'] / r['wall_s']:.2f}x")
    for cache in caches.values():
        shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
