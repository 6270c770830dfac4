"""Chapter 7: mixture of experts.

    python -m jaxcourse.ch7                                      # dense vs MoE GPT
    python -m jaxcourse.ch7 --config=configs/ch7_ablation.py     # k, capacity, balancing, ...

Lab: a character-level GPT on a mixture of two embedded corpora (Python source code and
English documentation prose), trained with the one loop as a dense model and as an MoE model
with the same active parameters per token (`model.ffn="moe"`: top-k routing, capacity,
balancing and z losses through the auxiliary-loss channel). It reports validation loss, speed,
total vs active parameters and compiled memory; checks expert parallelism on simulated devices
against one device; and draws how the gates spread over training, which domain each expert
serves and which characters it takes. The ablation varies k, capacity, the balancing loss,
the z-loss and DeepSeek-V3's aux-loss-free bias.
"""
import os

# Expert parallelism is checked on 8 simulated CPU devices; XLA reads the flag when jax
# starts, so this runs before anything touches a device (a flag already set wins).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

from jaxcourse import cli, config  # noqa: E402
from jaxcourse.data import pipeline, sources  # noqa: E402
from jaxcourse.data.tokenizers import CharTokenizer  # noqa: E402
from jaxcourse.errors import UserError  # noqa: E402
from jaxcourse.lm import count_params, eval_windows, lm_task, mean_loss  # noqa: E402
from jaxcourse.models import moe_plots, moe_stats  # noqa: E402
from jaxcourse.models.transformer import gpt_config  # noqa: E402
from jaxcourse.parallel import memory  # noqa: E402
from jaxcourse.report import markdown_table, write_results  # noqa: E402
from jaxcourse.train import make_optimizer, train  # noqa: E402
from jaxcourse.train.loop import compile_train_step  # noqa: E402


@dataclasses.dataclass
class Domains:
    tokenizer: CharTokenizer
    names: list[str]
    train: list[np.ndarray]      # per domain, its training part
    val: dict[str, np.ndarray]   # per domain, its held-out tail


def load_domains(cfg) -> Domains:
    """Each domain's first lm.max_chars characters, one character vocabulary for all, the
    last lm.val_fraction of each held out. A domain is an embedded corpus name or a file."""
    names = [n.strip() for n in cfg.lm.domains.split(",") if n.strip()]
    if len(names) < 2:
        raise UserError(f"lm.domains={cfg.lm.domains!r} needs two or more corpora")
    texts = [(sources.embedded_text(n) if n in sources.EMBEDDED_TEXT else sources.read_text(n))
             [:cfg.lm.max_chars or None] for n in names]
    tok = CharTokenizer.from_text("".join(texts))
    train_parts, val = [], {}
    for name, text in zip(names, texts):
        ids = np.asarray(tok.encode(text), np.int32)
        n_val = int(len(ids) * cfg.lm.val_fraction)
        train_parts.append(ids[:-n_val])
        val[pathlib.Path(name).stem] = ids[-n_val:]
    return Domains(tok, list(val), train_parts, val)


def model_configs(cfg, vocab: int):
    """(dense, MoE) GPTConfigs with the same active parameters per token: the dense MLP is
    as wide as the k experts a token visits (plus the shared ones)."""
    moe = gpt_config(cfg.model, vocab_size=vocab, ffn="moe")
    o = moe.options_for("ffn", "moe")
    d_expert = o.d_expert or moe.ff_dim
    dense = gpt_config(cfg.model, vocab_size=vocab, ffn="mlp",
                       d_ff=(o.top_k + o.n_shared) * d_expert)
    return dense, moe


def fit(cfg, workdir: pathlib.Path, model_cfg, domains: Domains, total_steps: int = 0):
    """One run of the shared loop; returns (state, final metrics, eval batches).

    total_steps: the learning-rate schedule's length when this call trains only part of a
    run (the MoE snapshots stop at marks and resume): the schedule must not decay to its
    end at every mark (0: cfg.train.steps)."""
    pure_steps = round(cfg.lm.get("curriculum", 0.0) * (total_steps or cfg.train.steps))
    data = pipeline.mixture_batches(domains.train, cfg.train.batch_size, model_cfg.context,
                                    cfg.train.seed, pure_steps)
    per_domain = cfg.lm.eval_tokens // len(domains.names)
    windows = np.concatenate([_windows(v, model_cfg.context, per_domain)
                              for v in domains.val.values()])
    evals = pipeline.eval_batches({"inputs": windows[:, :-1], "targets": windows[:, 1:]},
                                  cfg.lm.eval_batch_size)
    task = lm_task(model_cfg, aux_weights=cfg.lm.aux_weights.to_dict())
    tx = make_optimizer(cfg.optimizer, total_steps or cfg.train.steps)
    state, final = train(task, cfg, workdir, data, evals, tx=tx)
    return state, final, task, data


def _windows(tokens, context: int, max_tokens: int) -> np.ndarray:
    n = min((len(tokens) - 1) // context, max(1, max_tokens // context))
    return tokens[np.arange(n)[:, None] * context + np.arange(context + 1)]


def _analysis_tokens(domains: Domains, context: int, per_domain: int):
    """Validation windows of every domain, [N, T], and the domain index of each token."""
    rows, labels = [], []
    for d, tokens in enumerate(domains.val.values()):
        w = _windows(tokens, context, per_domain)[:, :-1]
        rows.append(w)
        labels.append(np.full(w.size, d))
    return np.concatenate(rows), np.concatenate(labels)


def run_moe(cfg, workdir: pathlib.Path) -> dict:
    """Dense vs MoE at equal active parameters, expert parallelism, routing figures."""
    domains = load_domains(cfg)
    dense_cfg, moe_cfg = model_configs(cfg, domains.tokenizer.vocab_size)
    o = moe_cfg.options_for("ffn", "moe")
    tokens_NxT, domain_of = _analysis_tokens(domains, moe_cfg.context, cfg.lm.analysis_tokens)
    results, snapshots = {}, []
    for name, model_cfg in (("dense", dense_cfg), ("moe", moe_cfg)):
        marks = _snapshot_steps(cfg) if name == "moe" else [cfg.train.steps]
        for steps in marks:  # the MoE run stops at each mark (exact resume) to look inside
            print(f"{name}: training to step {steps}", flush=True)
            run_cfg = config.derive(cfg, {"train.steps": steps})
            with warnings.catch_warnings():  # continuing to the next mark is the plan
                warnings.filterwarnings("ignore", "resuming with a changed config: train.steps")
                state, final, task, data = fit(run_cfg, workdir / name, model_cfg, domains,
                                               total_steps=cfg.train.steps)
            if name == "moe":
                assign = moe_stats.expert_assignments(model_cfg, state.params, tokens_NxT,
                                                      state.model_state)
                snapshots.append((steps, moe_stats.load_fractions(assign, o.n_experts)))
        results[name] = _model_row(name, cfg, model_cfg, state, final, task, data, domains)
    mi = moe_stats.mutual_information(assign, domain_of, o.n_experts)
    ep = moe_stats.expert_parallel_check(moe_cfg, state.params, data[0])
    moe_plots.plot_gates(snapshots, workdir / "gates.png")
    moe_plots.plot_traffic(moe_stats.domain_traffic(assign, domain_of, len(domains.names),
                                                    o.n_experts),
                           domains.names, workdir / "traffic.png")
    tops = moe_stats.top_tokens(assign[-1], tokens_NxT.ravel(), o.n_experts)
    moe_plots.plot_top_tokens(tops, domains.tokenizer, workdir / "expert_tokens.png",
                              title="characters each expert of the last MoE layer takes")
    rows = list(results.values())
    table = markdown_table(rows, ["model", "val_loss", *[f"val_loss/{d}" for d in domains.names],
                                  "tokens_per_second", "total_params", "active_params",
                                  "compiled_total_mib"])
    ep_line = (f"expert parallel on {ep['expert_parallel_devices']} devices vs one: max abs "
               f"difference {ep['expert_parallel_max_diff']:.2e}, all_to_all "
               f"{ep['all_to_all_bytes_per_step'] / 2**20:.2f} MiB per device per step")
    write_results(workdir, "Chapter 7: dense vs MoE at equal active parameters",
                  [("models", table), ("expert parallelism", ep_line)])
    m = results["moe"]
    return {"dense_val_loss": results["dense"]["val_loss"], "moe_val_loss": m["val_loss"],
            "dense_tokens_per_second": results["dense"]["tokens_per_second"],
            "moe_tokens_per_second": m["tokens_per_second"],
            "dense_params": results["dense"]["total_params"], "moe_params": m["total_params"],
            "moe_active_params": m["active_params"],
            "dropped_fraction": m["dropped_fraction"], "load_cv": m["load_cv"],
            "domain_expert_mutual_information_bits": mi.tolist(), **ep}


def _snapshot_steps(cfg) -> list[int]:
    n = max(1, cfg.lm.snapshots)
    return sorted({max(1, round(cfg.train.steps * (i + 1) / n)) for i in range(n)})


def _model_row(name, cfg, model_cfg, state, final, task, data, domains) -> dict:
    row = {"model": name, "val_loss": final["eval/loss"],
           "tokens_per_second": final["steps_per_second"] * cfg.train.batch_size
           * model_cfg.context,
           "total_params": count_params(state.params),
           "active_params": moe_stats.active_params(model_cfg, state.params),
           "dropped_fraction": final.get("eval/aux/dropped_fraction", 0.0),
           "load_cv": final.get("eval/aux/load_cv", 0.0)}
    row.update(_domain_losses(cfg, model_cfg, state, domains))
    compiled = compile_train_step(task, cfg, data[0])
    row["compiled_total_mib"] = memory.mib(memory.compiled_memory(compiled)["total"])
    return row


def _domain_losses(cfg, model_cfg, state, domains) -> dict:
    out = {}
    for d, tokens in domains.val.items():
        batches = eval_windows(tokens, model_cfg.context, cfg.lm.eval_tokens // 2,
                               cfg.lm.eval_batch_size)
        out[f"val_loss/{d}"] = mean_loss(model_cfg, state.params, batches)
    return out


# ---------------------------------------------------------------------------------------
# The ablation.

VARIANTS = {
    "base": {},
    "top1": {"model.moe.top_k": 1},
    # One always-on shared expert + top-1 of 8 (DeepSeek-style): the same active width.
    "shared_top1": {"model.moe.n_shared": 1, "model.moe.top_k": 1},
    # Capacity needs the dense one-hot dispatch (GShard), the path of expert parallelism.
    "capacity_1.25": {"model.moe.impl": "dense", "model.moe.capacity_factor": 1.25},
    "capacity_1.0": {"model.moe.impl": "dense", "model.moe.capacity_factor": 1.0},
    # The same dropless math through the dense dispatch and on the grouped-matmul path
    # (lax.ragged_dot), against the base's expert-sorted blocks.
    "dense": {"model.moe.impl": "dense"},
    "ragged": {"model.moe.impl": "ragged"},
    "no_balance_loss": {"lm.aux_weights.load_balance": 0.0},
    "no_z_loss": {"lm.aux_weights.z_loss": 0.0},
    "aux_free_bias": {"lm.aux_weights.load_balance": 0.0, "model.moe.bias_rate": 1e-3},
    # The research sketch: a domain curriculum, single-domain batches (the domains in turn)
    # for the first quarter of training, then the mixture.
    "domain_curriculum": {"lm.curriculum": 0.25},
}


def run_ablation(cfg, workdir: pathlib.Path) -> dict:
    """The MoE GPT with one setting changed at a time, same data, steps and seed."""
    domains = load_domains(cfg)
    names = [n.strip() for n in cfg.ablation.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UserError(f"ablation.variants: unknown {', '.join(unknown)}; choose from "
                        f"{', '.join(VARIANTS)}")
    tokens_NxT, domain_of = _analysis_tokens(domains, cfg.model.context, cfg.lm.analysis_tokens)
    rows, metrics = [], {}
    for name in names:
        print(f"variant {name}", flush=True)
        run_cfg = config.derive(cfg, VARIANTS[name])
        _, moe_cfg = model_configs(run_cfg, domains.tokenizer.vocab_size)
        state, final, _, _ = fit(run_cfg, workdir / name, moe_cfg, domains)
        o = moe_cfg.options_for("ffn", "moe")
        assign = moe_stats.expert_assignments(moe_cfg, state.params, tokens_NxT,
                                                  state.model_state)
        load = moe_stats.load_fractions(assign, o.n_experts)
        row = {"variant": name, "val_loss": final["eval/loss"],
               "load_cv": float(np.mean(np.std(load, 1) / np.mean(load, 1))),
               "max_expert_share": float(load.max()),
               "dropped_fraction": final.get("eval/aux/dropped_fraction", 0.0),
               "domain_mi_bits": float(moe_stats.mutual_information(assign, domain_of,
                                                                    o.n_experts).mean()),
               "tokens_per_second": final["steps_per_second"] * cfg.train.batch_size
               * moe_cfg.context}
        if cfg.ablation.get("per_domain", False):
            row.update(_domain_losses(run_cfg, moe_cfg, state, domains))
        rows.append(row)
        metrics.update({f"{name}/{k}": v for k, v in row.items() if k != "variant"})
    write_results(workdir, "Chapter 7: MoE ablation", [("variants",
                                                          markdown_table(rows, list(rows[0])))])
    return metrics


EXPERIMENTS = {"moe": run_moe, "ablation": run_ablation}


def main(argv=None):
    cli.run_chapter("ch7", EXPERIMENTS, default_config="ch7_moe", argv=argv)


if __name__ == "__main__":
    main()

