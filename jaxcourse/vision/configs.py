"""Config builders of the vision experiments of chapter 5 (configs/ch5_*.py).

`vit_config(preset)`: a ViT classifier on the embedded 8x8 digits (patch 2: 16 tokens), and
chapter 2's ResNet beside it for the ViT-vs-CNN comparison; the gpu preset is CIFAR-10 from a
local folder (`--config.data.path=/data/cifar10`, the unpacked cifar-10-batches-py).
The image size, channels and classes come from the data, not from the config.
"""
from __future__ import annotations

import ml_collections

from jaxcourse import config
from jaxcourse.lm.configs import small_gpt


def vit_model(**overrides) -> dict:
    """The `model` section: ViTConfig fields other than image_size, channels, num_classes."""
    section = {
        "patch_size": 2,
        "patchify": "conv",
        "pool": "cls",
        "pos": "sincos",  # fixed 2-D sin-cos: 0.983 test accuracy on digits vs 0.972 learned
        "n_layer": 4,
        "n_head": 4,
        "d_model": 48,  # 76.7k parameters in all: chapter 2's ResNet (width 16) has 77.8k.
        "d_ff": 96,
        "dropout": 0.0,
        "norm": "layernorm",
        "bias": True,
        "attention": "xla",
        "dtype": "float32",  # compute dtype; bfloat16 with train.precision=bfloat16 on GPUs
    }
    section.update(overrides)
    return section


def _transformer_optimizer(cfg, lr: float):
    """AdamW, warmup + cosine, weight decay 0.05, clipping at 1: both transformer labs' recipe."""
    o = cfg.optimizer
    o.name = "adamw"
    o.lr = lr
    o.schedule = "warmup_cosine"
    o.warmup_steps = 100
    o.min_lr_ratio = 0.01
    o.weight_decay = 0.05
    o.clip_norm = 1.0
    return o


def vit_config(preset: str) -> ml_collections.ConfigDict:
    """ViT on digits (cpu, smoke) or CIFAR-10 (gpu); chapter 2's ResNet in `cnn`."""
    cfg = config.base_config()
    cfg.experiment = "vit"
    cfg.model = vit_model()
    cfg.reg = {"label_smoothing": 0.1, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
               "crop_pad": 1, "flip": False}
    cfg.eval_batch_size = 512
    cfg.val_fraction = 0.1
    cfg.figures = {"examples": 6}  # test images in the attention-map figure
    # The CNN of the comparison: chapter 2's digits ResNet with its own optimizer settings;
    # the data, steps and batch size are the ViT's.
    cfg.cnn = {
        "model": {"arch": "resnet", "width": 16, "stages": (1, 1, 1), "depth": 2,
                  "dropout": 0.1, "norm": "batchnorm"},
        "lr": 3e-3,
        "schedule": "onecycle",
        "weight_decay": 5e-4,
        "steps_per_call": 1,  # XLA's CPU convolutions run several times slower in a scan.
    }
    cfg.compare = {"fractions": (0.25, 0.5, 1.0)}  # training-set fractions for both models
    t = cfg.train
    t.steps = 2000
    t.batch_size = 128
    t.eval_every = 500
    t.log_every = 100
    t.steps_per_call = 10
    o = _transformer_optimizer(cfg, lr=2e-3)
    if preset == "smoke":
        cfg.model.update(n_layer=1, n_head=2, d_model=32, d_ff=64)
        cfg.cnn.model.update(width=4, stages=(1,))
        cfg.compare.fractions = (0.5, 1.0)
        cfg.figures.examples = 2
        t.steps = 30
        t.batch_size = 32
        t.eval_every = 30
        t.log_every = 10
        t.steps_per_call = 10
        o.lr = 1e-2
        o.warmup_steps = 2
    elif preset == "gpu":  # CIFAR-10 from scratch, aiming at >= 80% test accuracy.
        cfg.data.name = "cifar10"
        cfg.model.update(patch_size=4, n_layer=6, n_head=8, d_model=384, d_ff=768,
                         dropout=0.1, pool="gap", pos="sincos", dtype="bfloat16")
        cfg.reg.update(crop_pad=4, flip=True, mixup_alpha=0.2)
        cfg.cnn.model.update(width=64, stages=(2, 2, 2, 2), dropout=0.0)
        cfg.cnn.update(lr=0.2, steps_per_call=50)
        cfg.figures.examples = 8
        t.steps = 40000
        t.batch_size = 256
        t.eval_every = 2000
        t.log_every = 200
        t.steps_per_call = 50
        t.precision = "bfloat16"
        o.lr = 1e-3
        o.warmup_steps = 2000
    return cfg


# Zero-shot prompts: each class name ("red triangle") goes into every template and the
# class embedding is their normalised mean (prompt ensembling, CLIP sec. 3.1.4). They
# follow the caption templates of data/scenes.py, without repeating whole captions.
CLIP_TEMPLATES = ("a photo of a {}", "a {} on black", "a small {}", "a large {}",
                  "one {}", "a photo of two {}s", "three {}s")


def clip_config(preset: str) -> ml_collections.ConfigDict:
    """CLIP (or SigLIP: --config.clip.loss=siglip) on the generated scenes: a ViT image
    tower, the clip.py text tower over the caption characters; zero-shot on the held-out
    colour x shape pairs and retrieval on the test split."""
    cfg = config.base_config()
    cfg.experiment = "clip"
    cfg.model = vit_model(patch_size=4, pool="gap", n_layer=3, n_head=4, d_model=64, d_ff=128)
    cfg.clip = {
        "loss": "clip",          # clip (InfoNCE) | siglip (sigmoid)
        "embed_dim": 64,
        "text_context": 64,      # the longest caption is 55 characters
        "text_layers": 2,
        "text_heads": 4,
        "text_width": 64,
        "text_pool": "mean",
        "text_causal": False,
    }
    cfg.scenes = {"n_train": 4000, "n_test": 500, "n_heldout": 500, "seed": 0}
    cfg.zero_shot = {"templates": CLIP_TEMPLATES}
    cfg.retrieval = {"queries": 6, "top": 5}  # rows and columns of the retrieval grid
    # Few-shot heads on the frozen image embeddings of the train split (clip_lab.py): the
    # factored linear probe and CLIP-Adapter, each trained this way with the one loop.
    cfg.heads = {"steps": 300, "lr": 1e-2, "batch_size": 128, "adapter_ratio": 0.2,
                 "adapter_hidden": 32}
    cfg.eval_batch_size = 250
    t = cfg.train
    t.steps = 600  # measured: 440 s on 2 shared cores; more steps would help shape
    t.batch_size = 128
    t.eval_every = 600
    t.log_every = 100
    t.steps_per_call = 10
    o = _transformer_optimizer(cfg, lr=1e-3)
    if preset == "smoke":
        cfg.model.update(n_layer=1, n_head=2, d_model=32, d_ff=64)
        cfg.clip.update(embed_dim=16, text_layers=1, text_heads=2, text_width=32)
        cfg.scenes.update(n_train=128, n_test=40, n_heldout=40)
        cfg.retrieval.update(queries=2)
        cfg.heads.update(steps=20, batch_size=32)
        cfg.eval_batch_size = 40
        t.steps = 20
        t.batch_size = 32
        t.eval_every = 20
        t.log_every = 10
        o.lr = 3e-3
        o.warmup_steps = 2
    elif preset == "gpu":  # more scenes, a wider pair of towers
        cfg.model.update(n_layer=6, n_head=6, d_model=192, d_ff=768, dtype="bfloat16")
        cfg.clip.update(embed_dim=256, text_layers=4, text_heads=6, text_width=192)
        cfg.scenes.update(n_train=50000, n_test=2000, n_heldout=2000)
        t.steps = 20000
        t.batch_size = 512
        t.eval_every = 2000
        t.log_every = 200
        t.steps_per_call = 50
        t.precision = "bfloat16"
        o.warmup_steps = 1000
    return cfg


def vqa_config(preset: str) -> ml_collections.ConfigDict:
    """VQA on the generated scenes (vision/vqa.py): CLIP first (model, clip, train, optimizer:
    the CLIP lab's sections on smaller images' worth of patches and fewer steps), then the
    early-fusion VLM (vlm.*: its run; gpt.*: chapter 4's GPT, its vocabulary and context from
    the tokenizer and the image) and the late-fusion MLP on frozen CLIP features (late.*)."""
    cfg = clip_config(preset)
    cfg.experiment = "vqa"
    for unused in ("zero_shot", "retrieval", "heads"):
        del cfg[unused]
    # Patch 8: 16 image tokens in the GPT's context (patch 4 would be 64) on 2 CPU cores.
    cfg.model.update(patch_size=8)
    cfg.gpt = small_gpt(n_layer=2, n_head=4, d_model=64, pos="rope")
    for computed in ("vocab_size", "context"):
        del cfg.gpt[computed]
    cfg.vlm = {
        "projector": "mlp",      # linear | mlp
        "train_vit": False,      # False: the CLIP image tower stays frozen (as late fusion's)
        "vit_layers": 0,         # read the image tokens after this many ViT blocks; 0: all
        "text_context": 56,      # question + answer tokens; the longest row is 53
        "steps": 800,
        "lr": 2e-3,
        "batch_size": 64,
    }
    cfg.late = {"steps": 1000, "lr": 3e-3, "batch_size": 128, "hidden": 256}
    cfg.scenes.update(n_train=2000, n_test=200, n_heldout=200)
    cfg.figures = {"examples": 10}  # held-out questions in the example grid
    t = cfg.train
    t.steps = 400  # CLIP
    t.eval_every = 400
    if preset == "smoke":
        cfg.gpt.update(n_layer=1, n_head=2, d_model=32)
        cfg.vlm.update(steps=10, batch_size=16)
        cfg.late.update(steps=10, batch_size=32, hidden=16)
        cfg.scenes.update(n_train=64, n_test=20, n_heldout=20)
        cfg.figures.examples = 5
        t.steps = 10
        t.batch_size = 16
        t.eval_every = 10
    elif preset == "gpu":
        cfg.gpt.update(n_layer=4, n_head=4, d_model=128)
        cfg.vlm.update(steps=5000, batch_size=256)
        cfg.late.update(steps=5000, batch_size=512)
        cfg.scenes.update(n_train=20000, n_test=1000, n_heldout=1000)
        t.steps = 5000
        t.eval_every = 1000
    return cfg


def mae_config(preset: str) -> ml_collections.ConfigDict:
    """MAE on the digits: pretraining (mae.*) on every training image, then a linear probe
    (probe.*) and the survey, MAE-pretrain + fine-tune vs from scratch at each label fraction
    (survey.fractions), both for train.steps steps with the ViT lab's recipe."""
    cfg = vit_config(preset)
    cfg.experiment = "mae"
    cfg.mae = {"mask_ratio": 0.75, "norm_pix": True, "decoder_d_model": 48,
               "decoder_layers": 2, "decoder_heads": 4, "pretrain_steps": 2000,
               "pretrain_lr": 1.5e-3,
               "pretrain_batch_size": 0,    # 0: train.batch_size
               "pretrain_warmup_steps": 0}  # 0: optimizer.warmup_steps
    cfg.probe = {"steps": 500, "lr": 1e-2}
    cfg.survey = {"fractions": (0.01, 0.1, 1.0)}
    cfg.figures.examples = 8
    cfg.train.steps = 600
    cfg.train.eval_every = 600
    if preset == "smoke":
        cfg.mae.update(decoder_d_model=16, decoder_layers=1, decoder_heads=2,
                       pretrain_steps=20, pretrain_lr=3e-3, pretrain_batch_size=16,
                       pretrain_warmup_steps=4)
        cfg.probe.steps = 10
        cfg.survey.fractions = (0.1,)
        cfg.figures.examples = 3
        cfg.train.steps = 10
        cfg.train.eval_every = 10
    elif preset == "gpu":
        # ViT-Tiny with patch 2 (256 tokens of CIFAR-10) and the recipe of the public PyTorch
        # MAE (IcarusWizard/MAE: 89.8% fine-tuned, 74.1% from scratch): a 4-layer decoder of
        # the encoder's width, 2000 epochs of pretraining at batch 4096 with lr 1.5e-4 per 256
        # and 10% warmup, AdamW b2 0.95; supervised runs 100 epochs at batch 128, lr 5e-4.
        cfg.model.update(patch_size=2, n_layer=12, n_head=3, d_model=192, d_ff=768,
                         dropout=0.0, pool="cls")
        cfg.mae.update(decoder_d_model=192, decoder_layers=4, decoder_heads=3,
                       pretrain_steps=24400, pretrain_batch_size=4096, pretrain_lr=2.4e-3,
                       pretrain_warmup_steps=2440)
        cfg.optimizer.b2 = 0.95
        cfg.probe.steps = 5000
        cfg.train.update(steps=39000, batch_size=128, eval_every=3900)
        cfg.optimizer.update(lr=5e-4, warmup_steps=1950)
    return cfg


def dino_config(preset: str) -> ml_collections.ConfigDict:
    """DINO on the digits: 2 global 8x8 views and local 4x4 crops, k-NN (knn.*) and a linear
    probe (probe.*) of the teacher's encoder against a random-init one."""
    cfg = vit_config(preset)
    cfg.experiment = "dino"
    # head_bn and a teacher held at 0.04: without them this small ViT's features barely differ
    # between digits at first, and the run collapsed to uniform outputs (loss ln K); see
    # DINOHead and chapters/ch05_multimodal.md.
    cfg.dino = {"out_dim": 256, "hidden_dim": 128, "bottleneck_dim": 32, "head_layers": 3,
                "norm_last_layer": True, "head_bn": True, "n_global": 2, "n_local": 4,
                "local_size": 4, "global_scale": (0.5, 1.0), "local_scale": (0.1, 0.5),
                "student_temp": 0.1, "teacher_temp_start": 0.04, "teacher_temp_end": 0.04,
                "teacher_temp_warmup": 0, "center_momentum": 0.9, "momentum_base": 0.99}
    cfg.knn = {"k": 20, "temperature": 0.07}
    cfg.probe = {"steps": 300, "lr": 1e-2}
    t = cfg.train
    t.steps = 500  # at load 7 on the 2 shared cores the first 100 steps took about a minute
    t.eval_every = 0
    cfg.optimizer.lr = 1e-3
    if preset == "smoke":
        cfg.dino.update(out_dim=32, hidden_dim=32, bottleneck_dim=16, n_local=2)
        cfg.knn.k = 5
        cfg.probe.steps = 10
        t.steps = 20
        t.eval_every = 0
    elif preset == "gpu":
        # the paper's ViT recipe (no head BN, teacher 0.04 -> 0.07); not run yet
        cfg.dino.update(out_dim=4096, hidden_dim=1024, bottleneck_dim=256, n_local=6,
                        local_size=16, head_bn=False, teacher_temp_end=0.07,
                        teacher_temp_warmup=3000, momentum_base=0.996)
        cfg.probe.steps = 5000
        t.steps = 40000
    return cfg


def chapter_config(preset: str) -> ml_collections.ConfigDict:
    """Every chapter 5 lab in one run (`python -m jaxcourse.ch5`): each section in `parts`
    is that experiment's whole config at the same preset (override one as
    --config.mae.train.steps=...); their summaries merge into one summary.json. The ViT vs
    CNN part runs the full training split only (its own config runs every fraction)."""
    cfg = config.base_config()
    cfg.experiment = "all"
    parts = {"vit_vs_cnn": vit_config(preset), "clip": clip_config(preset),
             "mae": mae_config(preset), "dino": dino_config(preset), "vqa": vqa_config(preset)}
    parts["vit_vs_cnn"].experiment = "vit_vs_cnn"
    parts["vit_vs_cnn"].compare.fractions = (1.0,)
    cfg.parts = ",".join(parts)
    for name, part in parts.items():
        cfg[name] = part
    return cfg
