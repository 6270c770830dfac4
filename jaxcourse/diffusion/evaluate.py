"""Drawing many samples with a trained network and scoring them with the judge."""
from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.diffusion import samplers
from jaxcourse.diffusion.guidance import guided_model_fn
from jaxcourse.diffusion.metrics import frechet_distance
from jaxcourse.diffusion.schedules import Schedule
from jaxcourse.errors import UserError
from jaxcourse.models.unet import UNet


class Sampler:
    """Draws labelled samples from a trained U-Net: `sampler(params, kind, steps, labels, ...)`.

    Step count, eta and guidance scale are inputs of the compiled program, so one program
    per (sampler kind, batch size, guidance mode) is compiled ahead of time and reused;
    the whole reverse process runs inside it. Guidance mode is "cond" (scale 1) or "uncond"
    (scale 0), one network call per step, or "paired" for any other scale (also a per-sample
    [N] array of scales), two. `last_run_seconds` times the latest call without compiling.
    """

    def __init__(self, model: UNet, sched: Schedule, prediction: str, clip_x0: float):
        self.model, self.sched = model, sched
        self.prediction, self.clip_x0 = prediction, clip_x0
        self._compiled = {}
        self.last_run_seconds = 0.0

    def _draw(self, params, labels, scale, plan, eta, rng, kind, mode):
        c = self.model.config
        null = c.num_classes
        apply = lambda x, t, y: self.model.apply({"params": params}, x, t, y if null else None)
        w = {"cond": 1.0, "uncond": 0.0}.get(mode, scale[:, None, None, None])
        fn = guided_model_fn(apply, labels, w, null)
        shape = (labels.shape[0], c.image_size, c.image_size, c.channels)
        k_init, k_steps = jax.random.split(rng)
        x_T = jax.random.normal(k_init, shape)
        return samplers.sample(kind, fn, plan, k_steps, x_T, eta, self.prediction, self.clip_x0)

    def _program(self, args, kind, mode):
        key = (kind, mode, args[1].shape[0])  # args[1]: the labels.
        if key not in self._compiled:
            fn = jax.jit(self._draw, static_argnames=("kind", "mode"))
            self._compiled[key] = fn.lower(*args, kind=kind, mode=mode).compile()
        return self._compiled[key]

    def __call__(self, params, kind: str, steps: int, labels, guidance, seed: int,
                 eta: float = 0.0, batch: int = 0, image_size: int | None = None):
        c = self.model.config
        if image_size is not None and image_size != c.image_size:
            raise UserError(f"asked for {image_size}x{image_size} samples but the model "
                            f"makes {c.image_size}x{c.image_size} images")
        if kind not in samplers.SAMPLERS:
            raise UserError(f"sampler {kind!r} is not one of {', '.join(samplers.SAMPLERS)}")
        labels = np.asarray(labels, np.int32)
        scales = np.broadcast_to(np.asarray(guidance, np.float32), labels.shape)
        mode = "paired"
        if c.num_classes == 0 or np.all(scales == 1.0):
            mode = "cond"  # an unconditional model ignores labels: one call per step.
        elif np.all(scales == 0.0):
            mode = "uncond"
        plan = samplers.plan(self.sched, steps)
        n = len(labels)
        batch = batch or n
        # Pad to whole batches so that every chunk, and every later call with the same
        # batch size, reuses one compiled program; the padding samples are dropped.
        pad = -n % batch
        labels = np.concatenate([labels, np.zeros(pad, np.int32)])
        scales = np.concatenate([scales, np.ones(pad, np.float32)])
        self.last_run_seconds = 0.0
        out = []
        for i in range(0, n, batch):
            rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
            args = (params, jnp.asarray(labels[i:i + batch]), jnp.asarray(scales[i:i + batch]),
                    plan, jnp.float32(eta), rng)
            program = self._program(args, kind, mode)
            t0 = time.perf_counter()
            out.append(np.asarray(program(*args)))
            self.last_run_seconds += time.perf_counter() - t0
        return np.concatenate(out)[:n]


def to_unit(images):
    """[-1, 1] model space -> [0, 1] pixels, clipped."""
    return np.clip((np.asarray(images) + 1.0) / 2.0, 0.0, 1.0)


def score(images01, labels, judge, real_feats) -> dict:
    """Judge accuracy against the requested labels, and Fréchet distance to real features."""
    logits, feats = judge(images01)
    return {"accuracy": float(np.mean(logits.argmax(-1) == np.asarray(labels))),
            "frechet": frechet_distance(feats, real_feats)}


def quality_table(draw: Callable, judge, real_feats, labels, kinds, steps_list) -> list[dict]:
    """Rows {sampler, steps, frechet, accuracy, seconds} for every sampler and step count.

    `draw(kind, steps)` returns (images in [0, 1], seconds of sampling without compiling).
    """
    rows = []
    for kind in kinds:
        for steps in steps_list:
            images, seconds = draw(kind, steps)
            rows.append({"sampler": kind, "steps": int(steps), "seconds": seconds,
                         **score(images, labels, judge, real_feats)})
            print(f"{kind:5s} {steps:5d} steps: frechet {rows[-1]['frechet']:.3f} "
                  f"accuracy {rows[-1]['accuracy']:.3f} ({seconds:.1f}s)", flush=True)
    return rows


def table_markdown(rows: list[dict]) -> str:
    lines = ["| sampler | steps | Fréchet distance | judge accuracy | seconds |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['frechet']:.3f} | "
                     f"{r['accuracy']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"
