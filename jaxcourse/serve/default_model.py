"""The model `python -m jaxcourse.serve` serves when given none.

Chapter 4's CPU pretraining (`python -m jaxcourse.ch4`) saves its model to runs/ch4/gpt-cpu;
that one is served when present. Otherwise a smoke-sized character GPT is trained in seconds
on the embedded stdlib corpus with chapter 4's own `run_gpt` and saved into the workdir (and
reused from there the next time), so the server works on a fresh machine.
"""
from __future__ import annotations

import pathlib

from jaxcourse.lm import load_model

CH4_MODEL = pathlib.Path("runs") / "ch4" / "gpt-cpu"
TINY_STEPS = 300
TINY_CONTEXT = 64


def find_or_train(model_dir: str | None, workdir: pathlib.Path):
    """(GPTConfig, params, tokenizer, where it came from)."""
    if model_dir:
        return (*load_model(model_dir), str(model_dir))
    if (CH4_MODEL / "model.json").is_file():
        return (*load_model(CH4_MODEL), str(CH4_MODEL))
    tiny = pathlib.Path(workdir) / "tiny-gpt"
    if not (tiny / "model.json").is_file():
        print(f"serve: no --model and no {CH4_MODEL}: training a tiny char GPT "
              f"({TINY_STEPS} steps, smoke-sized) into {tiny}", flush=True)
        train_tiny(tiny)
    return (*load_model(tiny), str(tiny))


def train_tiny(workdir: pathlib.Path, steps: int = TINY_STEPS) -> None:
    from jaxcourse import ch4  # noqa: PLC0415 - the chapter (matplotlib, the loop) only here
    from jaxcourse.lm.configs import pretrain_config  # noqa: PLC0415

    cfg = pretrain_config("smoke")
    cfg.model.update(context=TINY_CONTEXT, n_layer=2, n_head=2, d_model=64)
    cfg.train.steps = steps
    cfg.train.eval_every = steps
    cfg.train.log_every = steps
    cfg.lm.sample_tokens = 8
    workdir.mkdir(parents=True, exist_ok=True)
    ch4.run_gpt(cfg, workdir)
