"""The models chapter 10 compares and the presets of its two experiments.

Every model is the chapter-3 character GPT (`lm/configs.small_gpt`) with another token mixer
(models/registry.py); the lab sets each model's ffn width so that all of them have about the
parameter count of the attention GPT (`lab_models`), since the mixers differ in size.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from jaxcourse import config
from jaxcourse.errors import ConfigError, UserError
from jaxcourse.lm.configs import adamw_cosine, char_gpt_config, small_gpt
from jaxcourse.lm.params import abstract_params, count_params
from jaxcourse.models.transformer import GPTConfig, gpt_config
from jaxcourse.parallel.mesh import mesh_config

# name -> the model settings that make it (on top of the config's model section).
MODELS = {
    "attention": {"mixer": "attention"},
    "s4d": {"mixer": "s4d"},
    "mamba": {"mixer": "mamba"},
    "mamba2": {"mixer": "mamba2"},
    "rwkv": {"mixer": "rwkv", "ffn": "rwkv_cmix"},   # RWKV-6: time-mix + channel-mix
    "retnet": {"mixer": "retnet"},
    "hybrid": {},                                      # model.layer_pattern = lab.hybrid_pattern
}
ALL_MODELS = ",".join(MODELS)


def model_names(cfg) -> list[str]:
    names = [n.strip() for n in cfg.lab.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise ConfigError(f"lab.models: unknown {', '.join(unknown) or '(empty)'}; choose "
                          f"from {', '.join(MODELS)}")
    return names


def lab_models(cfg, vocab_size: int) -> dict[str, GPTConfig]:
    """{name: GPTConfig} of lab.models, the first one as built and every other with its
    ffn width chosen so its parameter count is closest to the first's (lab.match_params).
    Bad model settings (an unknown mixer, a layer pattern naming one, a state size <= 0)
    are a ConfigError: one line, exit 2."""
    names = model_names(cfg)
    out = {}
    try:
        for name in names:
            changes = dict(MODELS[name], vocab_size=vocab_size)
            if name == "hybrid":
                changes["layer_pattern"] = cfg.lab.hybrid_pattern
            out[name] = gpt_config(cfg.model, **changes)
    except UserError as e:
        raise ConfigError(str(e)) from None
    if cfg.lab.match_params:
        target = count_params(abstract_params(out[names[0]]))
        out = {n: out[n] if i == 0 else match_ffn_width(m, target)
               for i, (n, m) in enumerate(out.items())}
    return out


def match_ffn_width(model_cfg: GPTConfig, target: int, multiple: int = 16) -> GPTConfig:
    """The config with d_ff (a multiple of `multiple`) whose parameter count is closest to
    `target`; the ffn's count is linear in d_ff, so two counts give the slope."""
    def count(d_ff):
        return count_params(abstract_params(dataclasses.replace(model_cfg, d_ff=d_ff)))

    base = model_cfg.ff_dim
    slope = (count(base + multiple) - count(base)) / multiple
    d_ff = base + (target - count(base)) / slope
    d_ff = max(multiple, int(round(d_ff / multiple)) * multiple)
    return dataclasses.replace(model_cfg, d_ff=d_ff)


def _lab_section(preset: str, models: str = ALL_MODELS) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "preset": preset,               # names the figures; set by get_config
        "models": models,               # names from MODELS, the first is the size reference
        "hybrid_pattern": "attention,mamba",
        "match_params": True,
    })


def mixers_config(preset: str) -> ml_collections.ConfigDict:
    """Every mixer as a char LM on the same corpus and steps, then decode cost vs context."""
    cfg = char_gpt_config(preset)
    cfg.experiment = "mixers"
    cfg.lab = _lab_section(preset)
    # RWKV-6's low ranks (32 / 64 for 2k-wide models) scaled down to the 128-wide ones.
    cfg.model.rwkv.update(mix_rank=16, decay_rank=32)
    # Decode cost: a cache already holding `contexts` tokens, `new_tokens` greedy steps
    # timed (best of `repeats`), batch 1, random weights (speed does not depend on them).
    cfg.decode = {"batch_size": 1, "contexts": (256, 1024, 4096, 16384), "new_tokens": 8,
                  "repeats": 3}
    t = cfg.train
    if preset == "cpu":
        t.steps = 400
        t.eval_every = 100
        cfg.optimizer.warmup_steps = 40
        cfg.lm.eval_tokens = 8192
    elif preset == "smoke":  # seconds per model: compiling is most of it
        cfg.decode.update(contexts=(8, 32), new_tokens=2, repeats=1)
        cfg.model.mamba.scan = "sequential"  # compiles faster than the chunked scan
        cfg.model.rwkv.update(mix_rank=4, decay_rank=8)
        cfg.optimizer.lr = 5e-3
        t.steps = 10
        t.steps_per_call = 5
        t.eval_every = 10
        cfg.optimizer.warmup_steps = 2
    elif preset == "gpu":
        cfg.decode.update(batch_size=8, contexts=(256, 1024, 4096, 16384, 65536),
                          new_tokens=32, repeats=5)
        t.steps = 3000
    return cfg


def recall_config(preset: str) -> ml_collections.ConfigDict:
    """Multi-query associative recall (Zoology's MQAR): key-value pairs, then queries of
    some of the keys; each answer (the key's value) is the only scored token."""
    cfg = config.base_config()
    cfg.experiment = "recall"
    cfg.data.name = "recall"
    # Learned positions and GPT-2's N(0, 0.02) kernels: with Glorot-uniform kernels the
    # attention model stalled at answering by elimination, with RoPE it learned slowly
    # (chapters/ch10_emerging.md).
    cfg.model = small_gpt(n_layer=2, d_model=64, n_head=2, context=64, pos="learned",
                          init="normal")
    cfg.mesh = mesh_config(devices=1)
    cfg.lab = _lab_section(preset)
    cfg.recall = {
        "n_keys": 32,          # key tokens 1..n_keys, value tokens after them, 0 unused
        "n_values": 32,
        "pairs": 8,            # key-value pairs per sequence
        "queries": 8,          # queried keys per sequence (distinct), each with its answer
        "eval_examples": 512,
    }
    t = cfg.train
    t.steps = 2000
    t.batch_size = 128
    t.eval_every = 250
    t.log_every = 50
    t.steps_per_call = 20
    adamw_cosine(cfg.optimizer, lr=1e-3)
    cfg.optimizer.warmup_steps = 50
    if preset == "smoke":
        cfg.model.update(d_model=32, context=16)
        cfg.recall.update(n_keys=8, n_values=8, pairs=4, queries=2, eval_examples=64)
        t.steps = 20
        t.batch_size = 16
        t.eval_every = 10
        t.log_every = 10
        t.steps_per_call = 10
        cfg.optimizer.warmup_steps = 5
    elif preset == "gpu":
        cfg.model.update(d_model=128, context=256)
        cfg.recall.update(n_keys=256, n_values=256, pairs=64, queries=32, eval_examples=4096)
        t.steps = 5000
        t.batch_size = 128
        t.eval_every = 500
        t.steps_per_call = 50
    return cfg
