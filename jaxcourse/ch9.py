"""Chapter 9: AI infrastructure: one mesh for data, FSDP, tensor, pipeline and expert parallelism.

    python -m jaxcourse.ch9                                          # every layout, one table
    python -m jaxcourse.ch9 --config=configs/ch9_train.py:cpu --config.mesh.data=1 \\
        --config.mesh.fsdp=8                                         # one run, any mesh
    python -m jaxcourse.ch9 --config=configs/ch9_memory.py           # memory-budget lab
    python -m jaxcourse.ch9 --config=configs/ch9_throughput.py       # FLOPs per token and MFU
    python -m jaxcourse.ch9 --config=configs/ch9_pipeline.py         # GPipe vs 1F1B
    python tpu_gpu_launch/local.py --processes 2 --devices-per-process 2 -- \\
        python -m jaxcourse.ch9 --config=configs/ch9_train.py:smoke

Lab: train the chapter-4 GPT with the one training loop under each layout of the same
five-axis mesh (data, FSDP, tensor, pipeline; expert lives in the MoE chapter) on 8
simulated CPU devices, and check every layout against the single-device run step by step;
find the largest GPT that fits a per-device memory budget with and without remat and bf16
from XLA's compiled memory analysis; count FLOPs per token and compute MFU; run GPipe and
1F1B pipelines side by side.
"""
import os

# On CPU, 8 simulated devices stand in for 8 accelerators. XLA reads the flag when jax starts
# its first backend, so this runs before anything touches a device (a flag that is already
# set, e.g. by tpu_gpu_launch/local.py, wins).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import contextlib  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from jaxcourse import cli, config  # noqa: E402
from jaxcourse.data import pipeline, sources  # noqa: E402
from jaxcourse.data import tokenizers as toklib  # noqa: E402
from jaxcourse.models.transformer import (GPT, Stack, gpt_config, lm_loss,  # noqa: E402
                                          model_section)
from jaxcourse.parallel import distributed, flops, memory  # noqa: E402
from jaxcourse.parallel.mesh import describe, layout_config, make_mesh, mesh_config  # noqa: E402
from jaxcourse.parallel.pipeline import bubble_fraction, pipelined, schedule_stats  # noqa: E402
from jaxcourse.parallel.pipeline_1f1b import compare_schedules  # noqa: E402
from jaxcourse.train import Task, train  # noqa: E402
from jaxcourse.train.loop import compile_train_step, lower_train_step  # noqa: E402


# ---------------------------------------------------------------------------------------
# Config.

def chapter_config(preset: str, experiment: str):
    """Presets shared by the chapter's config files (configs/ch9_*.py)."""
    cfg = config.base_config()
    cfg.experiment = experiment
    cfg.data.name = "stdlib"
    # The chapter-4 GPT; the block stack is one nn.scan so its layers can form pipeline stages.
    cfg.model = model_section(vocab_size=0, context=64, n_layer=4, n_head=4, d_model=128,
                              attention="xla", scan_layers=True)
    cfg.parallel = {"layouts": "single,dp,fsdp,tp,fsdp_tp,pp", "microbatches": 4,
                    "max_chars": 300_000, "vocab_multiple": 64}
    cfg.mesh = mesh_config(data=-1)  # `train` runs on it; `layouts` sets one per layout.
    t, o = cfg.train, cfg.optimizer
    t.steps, t.batch_size, t.log_every, t.eval_every, t.steps_per_call = 40, 16, 1, 0, 10
    o.name, o.lr, o.schedule, o.warmup_steps, o.clip_norm = "adamw", 1e-3, "warmup_cosine", 5, 1.0
    if preset == "smoke":
        cfg.model.update(context=16, d_model=32)
        cfg.parallel.max_chars = 20_000
        t.steps, t.batch_size, t.steps_per_call = 4, 8, 1
    elif preset == "gpu":
        cfg.model.update(context=1024, n_layer=12, n_head=12, d_model=768)
        cfg.parallel.update(max_chars=0, microbatches=8)
        t.steps, t.batch_size, t.steps_per_call = 200, 64, 10
    if experiment == "memory":
        _memory_lab_config(cfg, preset)
    elif experiment == "pipeline":
        # Residual-MLP stages, [rows, width] activations and a [width, hidden] layer per stage.
        cfg.mesh = mesh_config(pipeline=4, data=-1)
        cfg.lab = {"microbatches": "4,8,16,32", "rows": 8, "width": 128, "hidden": 1024}
        if preset == "smoke":
            cfg.lab.update(microbatches="4,8", width=16, hidden=64)
    elif experiment == "throughput":
        _throughput_config(cfg, preset)
    return cfg


def _memory_lab_config(cfg, preset):
    # Width d_model = k * width_unit with one head per unit; k is searched in 1..max_width.
    cfg.lab = {"budget_mib": 256.0, "width_unit": 64, "max_width": 32, "vocab_size": 128,
               "layouts": "single,fsdp", "remat": "none,full", "precision": "float32,bfloat16"}
    cfg.model.update(context=256, n_layer=4)
    cfg.train.batch_size, cfg.train.steps_per_call = 16, 1
    if preset == "smoke":
        cfg.lab.update(budget_mib=4.0, width_unit=16, max_width=2, layouts="single",
                       precision="float32")
        cfg.model.update(context=32)
        cfg.train.batch_size = 8
    elif preset == "gpu":
        cfg.lab.update(budget_mib=16384.0, width_unit=128, max_width=40, layouts="single")
        cfg.model.update(context=1024, n_layer=12, attention="cudnn")
        cfg.train.batch_size = 16


def _throughput_config(cfg, preset):
    cfg.lab = {"peak_matmul_size": 1024}
    # Unrolled layers: XLA's cost analysis counts a loop body once, not once per layer.
    cfg.model.update(scan_layers=False)
    cfg.train.steps, cfg.train.batch_size, cfg.train.steps_per_call = 60, 12, 10
    if preset == "smoke":
        cfg.lab.peak_matmul_size = 256
        cfg.model.n_layer = 2
        cfg.train.steps, cfg.train.batch_size, cfg.train.steps_per_call = 4, 8, 2
    elif preset == "gpu":  # GPT-2 small in bf16.
        cfg.model.update(dtype="bfloat16", attention="cudnn")
        cfg.train.precision, cfg.train.batch_size = "bfloat16", 16
        cfg.parallel.vocab_multiple = 128


# ---------------------------------------------------------------------------------------
# The model, its task and its data.

def gpt_task(model_cfg, mesh=None, microbatches: int = 1) -> Task:
    """Next-token prediction. `init` hands the loop *boxed* parameters: their logical axis
    names are what the loop's sharding rules read. With a pipeline axis, the loss runs the
    block stack as a GPipe pipeline; the rest of the model stays GSPMD-sharded."""
    model = GPT(model_cfg)
    piped = mesh is not None and mesh.shape["pipeline"] > 1

    def init(rng, batch):
        return model.init(rng, jnp.asarray(batch["inputs"][:1]))["params"], {}

    def loss(params, model_state, batch, rng, train):
        with pipelined(Stack, mesh, microbatches) if piped else contextlib.nullcontext():
            logits = model.apply({"params": params}, batch["inputs"], train=train,
                                 rngs={"dropout": rng})
        value, metrics = lm_loss(logits, batch["targets"])
        return value, (metrics, model_state)

    return Task(init=init, loss=loss)


def load_tokens(cfg) -> tuple[np.ndarray, int]:
    """Character-level token ids of the corpus and the vocabulary size, padded up to a
    multiple of `parallel.vocab_multiple` so the vocab axis splits over tensor devices."""
    text = sources.load_text(cfg.data)[:cfg.parallel.max_chars or None]
    tok = toklib.make_tokenizer("char", text)
    multiple = cfg.parallel.vocab_multiple
    vocab = cfg.model.vocab_size or -(-tok.vocab_size // multiple) * multiple
    return np.asarray(tok.encode(text), np.int32), vocab


def with_mesh(cfg, mesh_section):
    """A copy of cfg whose `mesh` section is `mesh_section` (None: no mesh, unsharded)."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    with out.unlocked():
        if "mesh" in out:
            del out["mesh"]
        if mesh_section is not None:
            out.mesh = mesh_section
    return out


def _train_one(cfg, workdir: pathlib.Path, tokens, vocab: int) -> dict:
    """Trains under cfg.mesh (or unsharded); returns per-step losses and costs."""
    mesh = None
    if cfg.get("mesh") is not None:
        mesh = make_mesh(cfg.mesh)
    # Pipeline stages are slices of the scanned layer stack.
    piped = mesh is not None and mesh.shape["pipeline"] > 1
    model_cfg = gpt_config(cfg.model, vocab_size=vocab,
                           scan_layers=cfg.model.scan_layers or piped)
    data = pipeline.lm_batches(tokens, cfg.train.batch_size, model_cfg.context, cfg.train.seed)
    state, final = train(gpt_task(model_cfg, mesh, cfg.parallel.microbatches), cfg, workdir, data)
    # Process 0 writes metrics.jsonl (the others would race it, and they hold the same numbers).
    rows = _read_rows(workdir) if distributed.is_main_process() else []
    tokens_per_step = cfg.train.batch_size * model_cfg.context
    return {
        "losses": [r["train/loss"] for r in rows if "train/loss" in r],
        "final_loss": final["train/loss"],
        "params_bytes": memory.bytes_per_device(state.params),
        "optimizer_bytes": memory.bytes_per_device(state.opt_state),
        "step_ms": 1000.0 / final["steps_per_second"],
        "tokens_per_second": final["steps_per_second"] * tokens_per_step,
        "n_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "mesh": describe(mesh) if mesh is not None else "1 device",
        "stages": mesh.shape["pipeline"] if mesh is not None else 1,
    }


def _read_rows(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# ---------------------------------------------------------------------------------------
# Experiments.

def run_train(cfg, workdir: pathlib.Path) -> dict:
    """One training run on the mesh of `cfg.mesh` (the multi-host test runs this)."""
    tokens, vocab = load_tokens(cfg)
    result = _train_one(cfg, workdir, tokens, vocab)
    return {"losses": result["losses"], "final_loss": result["final_loss"],
            "step_ms": result["step_ms"], "tokens_per_second": result["tokens_per_second"],
            "processes": jax.process_count(), "devices": jax.device_count()}


def run_layouts(cfg, workdir: pathlib.Path) -> dict:
    """The same GPT, data and seed under every layout; a table of what each one costs."""
    tokens, vocab = load_tokens(cfg)
    names = [n.strip() for n in cfg.parallel.layouts.split(",") if n.strip()]
    if "single" not in names:
        names.insert(0, "single")
    results = {}
    for name in names:
        section = None if name == "single" else layout_config(name)
        print(f"layout {name}", flush=True)
        results[name] = _train_one(with_mesh(cfg, section), workdir / name, tokens, vocab)
    ref = np.asarray(results["single"]["losses"])
    metrics, lines = {}, [LAYOUT_HEADER]
    for name, r in results.items():
        diff = float(np.max(np.abs(np.asarray(r["losses"]) - ref)))
        state_bytes = r["params_bytes"] + r["optimizer_bytes"]
        metrics.update({f"{name}/max_loss_diff": diff,
                        f"{name}/param_opt_bytes_per_device": state_bytes,
                        f"{name}/step_ms": r["step_ms"],
                        f"{name}/tokens_per_second": r["tokens_per_second"]})
        lines.append(_layout_row(name, cfg, r, diff))
    table = "\n".join(lines)
    (workdir / "layouts.md").write_text(table + "\n")
    print(table)
    metrics["final_loss"] = float(ref[-1])
    metrics["n_params"] = results["single"]["n_params"]
    return metrics


LAYOUT_HEADER = ("| layout | mesh | max abs loss diff vs single | params + optimizer per device "
                 "(KiB) | step (ms) | tokens/s | notes |\n|---|---|---|---|---|---|---|")


def _layout_row(name, cfg, r, diff) -> str:
    note = ""
    if r["stages"] > 1:
        m = cfg.parallel.microbatches
        note = (f"GPipe {r['stages']} stages x {m} microbatches, bubble "
                f"{bubble_fraction(r['stages'], m):.0%}")
    kib = (r["params_bytes"] + r["optimizer_bytes"]) / 1024
    return (f"| {name} | {r['mesh']} | {diff:.2e} | {kib:.1f} | {r['step_ms']:.1f} | "
            f"{r['tokens_per_second']:.0f} | {note} |")


def run_memory(cfg, workdir: pathlib.Path) -> dict:
    """Largest GPT (width d_model = k * lab.width_unit, one head per unit) whose compiled
    training step fits lab.budget_mib per device, for each layout x remat x precision.

    Nothing is run or even allocated: each probe compiles the loop's step from shapes and
    reads XLA's memory analysis (arguments + outputs + temporaries - donated).
    """
    lab, budget = cfg.lab, cfg.lab.budget_mib * 2 ** 20
    context, batch = cfg.model.context, cfg.train.batch_size
    first = {"inputs": np.zeros((batch, context), np.int32),
             "targets": np.zeros((batch, context), np.int32)}
    metrics, lines, probes = {}, [MEMORY_HEADER], {}
    for layout, remat, precision in _memory_variants(lab):
        label = f"{layout}/{remat}/{precision}"
        seen = probes.setdefault(label, {})

        def fits(k):
            variant = _memory_config(cfg, layout, remat, precision, k)
            model_cfg = gpt_config(variant.model, vocab_size=lab.vocab_size)
            compiled = compile_train_step(gpt_task(model_cfg), variant, first)
            seen[k] = memory.compiled_memory(compiled)
            return seen[k]["total"] <= budget

        best = memory.largest_fitting(fits, 1, lab.max_width)
        d_model = best * lab.width_unit
        n_params = _gpt_params(cfg.model, d_model, best, lab.vocab_size) if best else 0
        mem = seen.get(best, {"total": 0, "temporaries": 0, "arguments": 0})
        capped = best == lab.max_width  # The search stopped at its limit: at least this.
        metrics.update({f"{label}/largest_d_model": d_model, f"{label}/params": n_params,
                        f"{label}/total_mib": memory.mib(mem["total"]),
                        f"{label}/at_search_limit": capped})
        shown = f">= {d_model}" if capped else str(d_model)
        lines.append(f"| {layout} | {remat} | {precision} | {shown} | {n_params / 1e6:.2f} | "
                     f"{memory.mib(mem['arguments']):.1f} | {memory.mib(mem['temporaries']):.1f} "
                     f"| {memory.mib(mem['total']):.1f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    (workdir / "memory.md").write_text(f"Budget {lab.budget_mib} MiB per device, "
                                       f"{jax.devices()[0].platform}.\n\n{table}\n")
    memory.plot_probes(probes, lab.width_unit, lab.budget_mib, workdir / "memory.png")
    return metrics


MEMORY_HEADER = ("| layout | remat | precision | largest d_model | params (M) | arguments (MiB) "
                 "| temporaries (MiB) | total (MiB) |\n|---|---|---|---|---|---|---|---|")


def _memory_variants(lab):
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    return [(lay, rem, pre) for lay in split(lab.layouts) for rem in split(lab.remat)
            for pre in split(lab.precision)]


def _memory_config(cfg, layout, remat, precision, k):
    """The config of one probe: width k units, the remat policy, bf16 or f32 compute."""
    variant = with_mesh(cfg, None if layout == "single" else layout_config(layout))
    with variant.unlocked():
        variant.model.update(d_model=k * cfg.lab.width_unit, n_head=k,
                             remat="" if remat == "none" else remat, dtype=precision)
        variant.train.precision = precision
    return variant


def _gpt_params(model_section_, d_model, n_head, vocab) -> int:
    model_cfg = gpt_config(model_section_, d_model=d_model, n_head=n_head, vocab_size=vocab)
    shapes = jax.eval_shape(GPT(model_cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return int(sum(x.size for x in jax.tree.leaves(shapes)))


def run_throughput(cfg, workdir: pathlib.Path) -> dict:
    """FLOPs per token three ways (by hand, 6N + 12LTd, XLA's count) and MFU on one device."""
    tokens, vocab = load_tokens(cfg)
    single = with_mesh(cfg, None)
    model_cfg = gpt_config(cfg.model, vocab_size=vocab)
    context, batch = model_cfg.context, cfg.train.batch_size
    by_hand = flops.gpt_train_flops_per_token(model_cfg, context)
    shapes = jax.eval_shape(GPT(model_cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    n_embed = vocab * model_cfg.d_model
    kaplan = flops.kaplan_flops_per_token(
        sum(x.size for x in jax.tree.leaves(shapes)) - n_embed, model_cfg, context)
    one_step = ml_collections.ConfigDict(single.to_dict())
    one_step.train.steps_per_call = 1
    first = {"inputs": np.zeros((batch, context), np.int32),
             "targets": np.zeros((batch, context), np.int32)}
    xla = flops.compiled_flops(lower_train_step(gpt_task(model_cfg), one_step, first))
    xla_per_token = xla / (batch * context)
    run = _train_one(single, workdir, tokens, vocab)
    peak, peak_source = _peak_flops(cfg)
    achieved = run["tokens_per_second"] * by_hand
    out = {"flops_per_token_by_hand": by_hand, "flops_per_token_6N_12LTd": kaplan,
           "flops_per_token_xla": xla_per_token, "tokens_per_second": run["tokens_per_second"],
           "step_ms": run["step_ms"], "achieved_flops_per_second": achieved,
           "peak_flops_per_second": peak, "mfu": achieved / peak, "peak_source": peak_source,
           **{f"forward_{k}": v for k, v in
              flops.gpt_forward_flops_per_token(model_cfg, context).items()}}
    print(json.dumps(out, indent=1))
    return out


def _peak_flops(cfg) -> tuple[float, str]:
    kind = jax.devices()[0].device_kind
    for name, peak in flops.PEAK_FLOPS.items():
        if name.split()[0] in kind:
            return peak, f"data sheet, {name} bf16 dense"
    n = cfg.lab.peak_matmul_size
    return flops.measure_peak_flops(n), f"measured: best {n}x{n} f32 matmul on {kind}"


def run_pipeline(cfg, workdir: pathlib.Path) -> dict:
    """GPipe vs 1F1B on the pipeline axis: bubble, activations in flight, and the compiled
    step's temporaries as the number of microbatches grows (both schedules executed)."""
    lab = cfg.lab
    mesh = make_mesh(cfg.mesh)
    stages = mesh.shape["pipeline"]
    lines, metrics = [PIPELINE_HEADER], {}
    for m in (int(v) for v in lab.microbatches.split(",")):
        sim = {k: schedule_stats(stages, m, k) for k in ("gpipe", "1f1b")}
        run = compare_schedules(mesh, m, lab.rows, lab.width, lab.hidden, cfg.train.seed)
        metrics.update({f"M{m}/{k}": v for k, v in run.items()})
        metrics[f"M{m}/bubble"] = sim["gpipe"]["bubble"]
        lines.append(f"| {stages} | {m} | {sim['gpipe']['bubble']:.0%} | "
                     f"{sim['gpipe']['peak_activations']} | {sim['1f1b']['peak_activations']} | "
                     f"{memory.mib(run['gpipe_temp_bytes']):.2f} | "
                     f"{memory.mib(run['1f1b_temp_bytes']):.2f} | {run['grad_max_diff']:.1e} |")
        print(lines[-1], flush=True)
    (workdir / "pipeline.md").write_text("\n".join(lines) + "\n")
    return metrics


PIPELINE_HEADER = ("| stages | microbatches | bubble | in flight: GPipe | in flight: 1F1B | "
                   "GPipe temporaries (MiB) | 1F1B temporaries (MiB) | max grad diff |\n"
                   "|---|---|---|---|---|---|---|---|")


EXPERIMENTS = {"layouts": run_layouts, "train": run_train, "memory": run_memory,
               "throughput": run_throughput, "pipeline": run_pipeline}


def main(argv=None):
    return cli.run_chapter("ch9", EXPERIMENTS, default_config="ch9_layouts", argv=argv)


if __name__ == "__main__":
    main()
