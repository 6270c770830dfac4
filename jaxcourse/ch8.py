"""Chapter 8: diffusion models.

    python -m jaxcourse.ch8                                   # DDPM on digits, cpu preset
    python -m jaxcourse.ch8 --config=configs/ch8_latent.py    # latent diffusion vs pixel space

Lab: train a class-conditional U-Net with the denoising loss (through the shared loop, EMA
weights), then sample it with DDPM, DDIM and a probability-flow ODE solver at several step
counts, with classifier-free guidance, and judge the samples with chapter 2's classifier:
its accuracy on the requested classes and a Fréchet distance in its feature space.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse import cli
from jaxcourse.data import pipeline, sources
from jaxcourse.diffusion import evaluate, figures, latent
from jaxcourse.diffusion.judge import judge_config, train_judge
from jaxcourse.diffusion.model_io import load_model, save_model
from jaxcourse.diffusion.schedules import make_schedule, q_sample
from jaxcourse.diffusion.task import diffusion_task
from jaxcourse.errors import UserError
from jaxcourse.models.autoencoder import Autoencoder, AutoencoderConfig
from jaxcourse.models.unet import UNet, UNetConfig
from jaxcourse.train import train


def unet_config(model_cfg) -> UNetConfig:
    fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v
              for k, v in model_cfg.to_dict().items()}
    cfg = UNetConfig(**fields)
    cfg.validate()
    return cfg


def load_data(cfg, image_size: int, channels: int) -> dict[str, np.ndarray]:
    """Images in [0, 1], checked against the size and channels the models expect."""
    data = sources.load_images(cfg.data)
    got = data["x_train"].shape[1:]
    if got != (image_size, image_size, channels):
        section = "model" if cfg.experiment != "latent" else "autoencoder"
        raise UserError(f"data.name={cfg.data.name} has {got[0]}x{got[1]}x{got[2]} images but "
                        f"{section}.image_size={image_size}, {section}.channels={channels}")
    if cfg.model.num_classes and int(data["y_train"].max()) >= cfg.model.num_classes:
        raise UserError(f"data has labels up to {int(data['y_train'].max())} but "
                        f"model.num_classes={cfg.model.num_classes}")
    return data


def judge_for(cfg, workdir: pathlib.Path, data):
    j = cfg.judge
    jc = judge_config(j.config, cfg.data, j.steps, j.width, j.arch)
    print(f"--- judge: chapter 2 classifier ({cfg.judge.config})", flush=True)
    return train_judge(jc, workdir / "judge", data)


def fit_diffusion(cfg, workdir: pathlib.Path, images: dict, model: UNet, sched):
    """Trains the U-Net on {"image": [-1, 1] images or latents, "label"}; returns (params, metrics)."""
    d = cfg.diffusion
    task = diffusion_task(model, sched, d.prediction, model.config.num_classes, d.cond_dropout,
                          d.min_snr)
    train_data = pipeline.batches(images["train"], cfg.train.batch_size, cfg.train.seed)
    eval_data = None  # eval_every=0: no held-out loss (saves a compile in smoke runs).
    if cfg.train.eval_every > 0:
        eval_data = pipeline.eval_batches(images["test"], 512)
    state, metrics = train(task, cfg, workdir, train_data, eval_data)
    params = state.ema_params if state.ema_params is not None else state.params
    return params, metrics


def _sample_labels(cfg, data) -> np.ndarray:
    labels = data["y_test"]
    n = cfg.sample.num or len(labels)
    return np.resize(labels, n)  # repeats the held-out label mix when n > len(test).


def evaluate_samplers(cfg, workdir, sampler, params, judge, data, decode=None) -> dict:
    """Quality table, its plot and sample grids; returns the summary metrics."""
    s = cfg.sample
    labels = _sample_labels(cfg, data)
    decode = decode or evaluate.to_unit
    _, real_feats = judge(data["x_test"])
    _, floor_feats = judge(np.resize(data["x_train"], (len(labels),) + data["x_train"].shape[1:]))
    floor = evaluate.frechet_distance(floor_feats, real_feats)

    def draw(kind, steps):
        images = sampler(params, kind, steps, labels, s.table_guidance, s.seed, s.eta, s.batch)
        return decode(images), sampler.last_run_seconds

    rows = evaluate.quality_table(draw, judge, real_feats, labels, s.table_samplers,
                                  s.table_steps)
    if s.ode_steps:
        rows += evaluate.quality_table(draw, judge, real_feats, labels, ("ode",), s.ode_steps)
    # The guided samples behind `sample_accuracy`: the grid's sampler at s.guidance.
    main = next((r for r in rows if (r["sampler"], r["steps"]) == (s.sampler, s.steps)), None)
    if main is None or s.guidance != s.table_guidance:
        images = decode(sampler(params, s.sampler, s.steps, labels, s.guidance, s.seed, s.eta,
                                s.batch))
        main = evaluate.score(images, labels, judge, real_feats)
    table = evaluate.table_markdown(rows)
    note = (f"\n{len(labels)} samples per row with the held-out label mix, guidance scale "
            f"{s.table_guidance}, eta {s.eta} for ddim. Real training images vs held-out: "
            f"Fréchet {floor:.3f}. Guided ({s.sampler}, {s.steps} steps, scale {s.guidance}): "
            f"accuracy {main['accuracy']:.3f}, Fréchet {main['frechet']:.3f}.\n")
    (workdir / "quality.md").write_text(table + note)
    figures.plot_quality(rows, workdir / "quality.png", floor)
    print(table + note, flush=True)
    metrics = {"sample_accuracy": main["accuracy"], "frechet_guided": main["frechet"],
               "frechet_real_floor": floor}
    for r in rows:
        metrics[f"frechet_{r['sampler']}_{r['steps']}"] = r["frechet"]
        metrics[f"accuracy_{r['sampler']}_{r['steps']}"] = r["accuracy"]
        metrics[f"seconds_{r['sampler']}_{r['steps']}"] = r["seconds"]
    save_sample_grids(cfg, workdir, sampler, params, decode)
    return metrics


def save_sample_grids(cfg, workdir, sampler, params, decode) -> None:
    """10 samples per class, and one row per guidance scale for the same noise (one call)."""
    s, k = cfg.sample, max(cfg.model.num_classes, 1)
    scales = (0.0, 1.0, 2.0, 4.0)
    labels = np.concatenate([np.repeat(np.arange(k), 10), np.tile(np.arange(k), len(scales))])
    guidance = np.concatenate([np.full(10 * k, s.guidance), np.repeat(scales, k)])
    images = decode(sampler(params, s.sampler, s.steps, labels, guidance, s.seed, s.eta,
                            s.batch))
    figures.save_grid(images[:10 * k], k, workdir / f"samples_{s.sampler}{s.steps}.png",
                      f"{s.sampler}, {s.steps} steps, guidance {s.guidance}",
                      [str(i) for i in range(k)], ylabel="requested class")
    figures.save_grid(images[10 * k:], len(scales), workdir / "guidance.png",
                      "rows: guidance scale 0 (unconditional), 1, 2, 4",
                      [f"w={w:g}" for w in scales], xlabel="requested class 0, 1, ...",
                      ylabel="guidance scale")


def save_forward_strip(workdir, sched, x01) -> None:
    """One image noised to t = 0 .. T-1 in closed form, as the forward process sees it."""
    ts = np.linspace(0, sched.steps - 1, 10).astype(np.int32)
    x0 = jnp.asarray(np.repeat(x01[None] * 2 - 1, len(ts), 0))
    noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
    xt = q_sample(sched, x0, jnp.asarray(ts), noise)
    figures.save_grid(evaluate.to_unit(xt), 1, workdir / "forward_noising.png",
                      "q(x_t | x_0) at t = " + ", ".join(str(t) for t in ts),
                      xlabel="diffusion step t (left: clean, right: noise)", ylabel="x_t")


def run_ddpm(cfg, workdir: pathlib.Path) -> dict:
    """Trains the U-Net denoiser, then samples it with every sampler and judges the samples."""
    data = load_data(cfg, cfg.model.image_size, cfg.model.channels)
    judge, judge_acc = judge_for(cfg, workdir, data)
    ucfg = unet_config(cfg.model)
    model, sched = UNet(ucfg), make_schedule(cfg.diffusion.schedule, cfg.diffusion.steps)
    images = {split: {"image": data[f"x_{split}"] * 2 - 1, "label": data[f"y_{split}"]}
              for split in ("train", "test")}
    print("--- diffusion model", flush=True)
    params, train_metrics = fit_diffusion(cfg, workdir / "diffusion", images, model, sched)
    save_model(workdir / "model", params, ucfg, cfg.diffusion, cfg.data.name)
    save_forward_strip(workdir, sched, data["x_test"][0])
    sampler = evaluate.Sampler(model, sched, cfg.diffusion.prediction, cfg.sample.clip_x0)
    metrics = evaluate_samplers(cfg, workdir, sampler, params, judge, data)
    return {**metrics, "judge_test_accuracy": judge_acc,
            "train_mse": train_metrics.get("train/mse", float("nan")),  # nan: resumed at end.
            "eval_mse": train_metrics.get("eval/mse", float("nan")),
            "train_steps_per_second": train_metrics["steps_per_second"]}


def run_sample(cfg, workdir: pathlib.Path) -> dict:
    """Samples a saved model (cfg.sample.checkpoint) and judges it; no diffusion training."""
    if not cfg.sample.checkpoint:
        raise UserError("experiment=sample needs --config.sample.checkpoint=<model directory>")
    data = load_data(cfg, cfg.model.image_size, cfg.model.channels)
    ucfg = unet_config(cfg.model)
    params = load_model(pathlib.Path(cfg.sample.checkpoint), ucfg, cfg.diffusion)
    judge, judge_acc = judge_for(cfg, workdir, data)
    model, sched = UNet(ucfg), make_schedule(cfg.diffusion.schedule, cfg.diffusion.steps)
    sampler = evaluate.Sampler(model, sched, cfg.diffusion.prediction, cfg.sample.clip_x0)
    metrics = evaluate_samplers(cfg, workdir, sampler, params, judge, data)
    return {**metrics, "judge_test_accuracy": judge_acc}


def run_latent(cfg, workdir: pathlib.Path) -> dict:
    """Autoencoder, then diffusion on its latents; quality table and a pixel-vs-latent cost
    table measured on this machine."""
    a = cfg.autoencoder
    acfg = AutoencoderConfig(image_size=a.image_size, channels=a.channels, width=a.width,
                             downsamples=a.downsamples, latent_channels=a.latent_channels)
    acfg.validate()
    data = load_data(cfg, acfg.image_size, acfg.channels)
    ucfg = unet_config(cfg.model)
    if (ucfg.image_size, ucfg.channels) != (acfg.latent_size, acfg.latent_channels):
        raise UserError(f"latent U-Net model.image_size={ucfg.image_size}, model.channels="
                        f"{ucfg.channels} must match the autoencoder's latents "
                        f"({acfg.latent_size}x{acfg.latent_size}x{acfg.latent_channels})")
    judge, judge_acc = judge_for(cfg, workdir, data)

    print("--- autoencoder", flush=True)
    ae = Autoencoder(acfg)
    ae_cfg = cfg.copy_and_resolve_references()
    ae_cfg.train.steps, ae_cfg.optimizer.lr, ae_cfg.train.ema_decay = a.steps, a.lr, 0.0
    pixels = {s: data[f"x_{s}"] * 2 - 1 for s in ("train", "test")}
    ae_task = latent.autoencoder_task(ae, a.latent_penalty, a.latent_noise)
    ae_state, ae_metrics = train(ae_task, ae_cfg, workdir / "autoencoder",
                                 pipeline.batches({"image": pixels["train"]}, a.batch_size,
                                                  cfg.train.seed),
                                 pipeline.eval_batches({"image": pixels["test"]}, 512))
    z = {s: latent.encode(ae, ae_state.params, pixels[s]) for s in pixels}
    scale = float(1.0 / z["train"].std())  # unit-variance latents, as in the paper (sec. 4.3).
    decode = latent.make_decoder(ae, ae_state.params, scale)
    recon = decode(z["test"] * scale)
    recon_scores = evaluate.score(recon, data["y_test"], judge, judge(data["x_test"])[1])

    print("--- latent diffusion model", flush=True)
    model, sched = UNet(ucfg), make_schedule(cfg.diffusion.schedule, cfg.diffusion.steps)
    latents = {s: {"image": z[s] * scale, "label": data[f"y_{s}"]} for s in z}
    params, train_metrics = fit_diffusion(cfg, workdir / "diffusion", latents, model, sched)
    sampler = evaluate.Sampler(model, sched, cfg.diffusion.prediction, cfg.sample.clip_x0)
    metrics = evaluate_samplers(cfg, workdir, sampler, params, judge, data, decode)
    costs = compare_costs(cfg, workdir, ucfg, sched)
    return {**metrics, **costs, "judge_test_accuracy": judge_acc,
            "autoencoder_recon_mse": ae_metrics["eval/recon_mse"],
            "recon_accuracy": recon_scores["accuracy"], "recon_frechet": recon_scores["frechet"],
            "latent_scale": scale, "eval_mse": train_metrics.get("eval/mse", float("nan"))}


def compare_costs(cfg, workdir, latent_ucfg: UNetConfig, sched) -> dict:
    """Train-step and sampling-step time and memory, pixel U-Net vs latent U-Net."""
    n = cfg.sample.num or 512
    rows = {}
    for name, ucfg in (("pixel", unet_config(cfg.pixel_model)), ("latent", latent_ucfg)):
        rows[name] = latent.cost_profile(UNet(ucfg), sched, cfg, n)
        rows[name]["shape"] = f"{ucfg.image_size}x{ucfg.image_size}x{ucfg.channels}"
    lines = [f"| space | denoiser input | params | train step (batch {cfg.train.batch_size}) "
             f"| train step memory | denoising step (batch {n}) | denoising step memory "
             f"| GFLOP per denoising step |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['shape']} | {r['params']:,} | {r['train_ms']:.1f} ms "
                     f"| {r['train_mb']:.1f} MiB | {r['sample_step_ms']:.1f} ms "
                     f"| {r['sample_mb']:.1f} MiB | {r['sample_gflops']:.2f} |")
    table = "\n".join(lines) + "\n"
    (workdir / "latent_vs_pixel.md").write_text(table)
    print(table, flush=True)
    return {f"{name}_{k}": v for name, r in rows.items() for k, v in r.items() if k != "shape"}


EXPERIMENTS = {"ddpm": run_ddpm, "sample": run_sample, "latent": run_latent}


def main(argv=None):
    cli.run_chapter("ch8", EXPERIMENTS, default_config="ch8_ddpm", argv=argv)


if __name__ == "__main__":
    main()
