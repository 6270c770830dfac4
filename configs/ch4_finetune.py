"""Chapter 4: teach a pretrained GPT string tasks: few-shot prompting vs full SFT vs LoRA on held-out words.

python -m jaxcourse.ch4 --config=configs/ch4_finetune.py:cpu --config.data.path=tinyshakespeare.txt
Reuse a pretrained model: --config.finetune.base=runs/ch4/gpt-cpu (otherwise one is pretrained first).
"""
from jaxcourse.lm.configs import pretrain_config
from jaxcourse.models import lora


def get_config(preset: str = "cpu"):
    """Pretraining presets plus the SFT / LoRA sections (base: a pretraining workdir, or ""
    to pretrain one first inside this run's workdir)."""
    cfg = pretrain_config(preset)
    cfg.experiment = "finetune"
    cfg.finetune = {
        "base": "",
        "methods": ("prompting", "sft", "lora"),
        "tasks": ("upper", "reverse"),
        "train_examples": 4000,
        "eval_examples": 400,
        "heldout_fraction": 0.2,
        "shots": 3,
        "steps": 300,
        "batch_size": 32,
        "lr": 1e-3,
        "lora_lr": 2e-3,
        "warmup_steps": 20,
        "steps_per_call": 25,
        "forget_batches": 20,
        "scale_batches": (1, 8),  # GPT-2-small memory table; () = skip.
    }
    cfg.lora = {
        "rank": 8,
        "alpha": 16.0,
        "targets": lora.LoRAConfig.targets,
        "lora_plus_ratio": 4.0,
    }
    if preset == "smoke":
        cfg.model.context = 32
        cfg.finetune.update(train_examples=64, eval_examples=16, steps=4, batch_size=8,
                            warmup_steps=1, steps_per_call=4, forget_batches=2,
                            scale_batches=())
        cfg.train.steps = 10
    return cfg
