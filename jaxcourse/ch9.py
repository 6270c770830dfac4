"""Chapter 9: AI infrastructure: one mesh for data, FSDP, tensor, pipeline and expert parallelism.

    python -m jaxcourse.ch9                                          # every layout, one table
    python -m jaxcourse.ch9 --config=configs/ch9_train.py:cpu --config.mesh.data=1 \\
        --config.mesh.fsdp=8                                         # one run, any mesh
    python -m jaxcourse.ch9 --config=configs/ch9_memory.py           # memory-budget lab
    python -m jaxcourse.ch9 --config=configs/ch9_throughput.py       # FLOPs per token and MFU
    python -m jaxcourse.ch9 --config=configs/ch9_pipeline.py         # GPipe vs 1F1B
    python tpu_gpu_launch/local.py --processes 2 --devices-per-process 2 -- \\
        python -m jaxcourse.ch9 --config=configs/ch9_train.py:smoke

Lab: train the small 4x128 GPT of chapters 3 and 4 with the one training loop under each
layout of the same five-axis mesh (data, FSDP, tensor, pipeline; expert lives in the MoE chapter) on 8
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

import json  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxcourse import cli, config  # noqa: E402
from jaxcourse.data import pipeline, sources  # noqa: E402
from jaxcourse.data import tokenizers as toklib  # noqa: E402
from jaxcourse.lm import abstract_params, count_params, lm_task  # noqa: E402
from jaxcourse.models.transformer import gpt_config  # noqa: E402
from jaxcourse.parallel import distributed, flops, memory  # noqa: E402
from jaxcourse.parallel.mesh import describe, layout_config, make_mesh  # noqa: E402
from jaxcourse.parallel.pipeline import bubble_fraction, schedule_stats  # noqa: E402
from jaxcourse.parallel.pipeline_1f1b import compare_schedules  # noqa: E402
from jaxcourse.train import train  # noqa: E402
from jaxcourse.train.loop import compile_train_step, lower_train_step  # noqa: E402


# ---------------------------------------------------------------------------------------
# Data and one training run (configs: jaxcourse.parallel.configs.mesh_gpt_config).

def load_tokens(cfg) -> tuple[np.ndarray, int]:
    """Character-level token ids of the corpus and the vocabulary size, padded up to a
    multiple of `parallel.vocab_multiple` so the vocab axis splits over tensor devices."""
    text = sources.load_text(cfg.data)[:cfg.parallel.max_chars or None]
    tok = toklib.make_tokenizer("char", text)
    multiple = cfg.parallel.vocab_multiple
    vocab = cfg.model.vocab_size or -(-tok.vocab_size // multiple) * multiple
    return np.asarray(tok.encode(text), np.int32), vocab


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
    state, final = train(lm_task(model_cfg, mesh, cfg.parallel.microbatches), cfg, workdir, data)
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
        "n_params": count_params(state.params),
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
        results[name] = _train_one(config.derive(cfg, {"mesh": section}), workdir / name,
                                   tokens, vocab)
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
            compiled = compile_train_step(lm_task(model_cfg), variant, first)
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
    return config.derive(cfg, {
        "mesh": None if layout == "single" else layout_config(layout),
        "model.d_model": k * cfg.lab.width_unit,
        "model.n_head": k,
        "model.remat": "" if remat == "none" else remat,
        "model.dtype": precision,
        "train.precision": precision,
    })


def _gpt_params(model_section_, d_model, n_head, vocab) -> int:
    model_cfg = gpt_config(model_section_, d_model=d_model, n_head=n_head, vocab_size=vocab)
    return count_params(abstract_params(model_cfg))


def run_throughput(cfg, workdir: pathlib.Path) -> dict:
    """FLOPs per token three ways (by hand, 6N + 12LTd, XLA's count) and MFU on one device."""
    tokens, vocab = load_tokens(cfg)
    single = config.derive(cfg, {"mesh": None})
    model_cfg = gpt_config(cfg.model, vocab_size=vocab)
    context, batch = model_cfg.context, cfg.train.batch_size
    by_hand = flops.gpt_train_flops_per_token(model_cfg, context)
    n_embed = vocab * model_cfg.d_model
    kaplan = flops.kaplan_flops_per_token(
        count_params(abstract_params(model_cfg)) - n_embed, model_cfg, context)
    one_step = config.derive(single, {"train.steps_per_call": 1})
    first = {"inputs": np.zeros((batch, context), np.int32),
             "targets": np.zeros((batch, context), np.int32)}
    xla = flops.compiled_flops(lower_train_step(lm_task(model_cfg), one_step, first))
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
