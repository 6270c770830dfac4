"""Chapter 4: compression of the pretrained GPT: int8 / int4 / W8A8 quantization, QAT, int8 KV
cache; MLA vs MHA / GQA / MQA at about equal parameters; a distilled student vs hard labels.

python -m jaxcourse.ch4 --config=configs/ch4_compress.py:cpu --config.data.path=tinyshakespeare.txt
Reuse a pretrained model: --config.finetune.base=runs/ch4/gpt-cpu (otherwise one is pretrained first).
"""
from jaxcourse.lm.configs import pretrain_config


def get_config(preset: str = "cpu"):
    cfg = pretrain_config(preset)
    cfg.experiment = "compress"
    # The quantization rows run in float32 (matmul=""): bf16 matmuls would blur the
    # float32-vs-int8 comparison; training keeps the preset's matmul="auto".
    cfg.finetune = {"base": ""}  # a pretraining workdir, or "" to pretrain one here first
    cfg.compress = {
        "parts": ("quant", "attention", "distill"),
        "qwix": False,  # True: add qwix's rows: its PTQ of each scheme it can do, its QAT
        "schemes": ("float32", "int8", "w8a8", "int4-g32", "int4-g64", "int4-g128"),
        "decode": {"batch_size": 1, "prompt_len": 8, "new_tokens": 48, "repeats": 3},
        "qat_scheme": "int4-g128",
        "qat_steps": 100,
        "qat_lr": 1e-4,
        # Equal parameters: MHA's 4 D^2 attention per layer; GQA (2 kv heads, 3 D^2) and MQA
        # (2.5 D^2) get the difference back in d_ff; MLA (kv_rank 64, rope 16) has 4.1 D^2.
        "attention_variants": {
            "mha": {},
            "gqa": {"n_kv_head": 2, "d_ff": 576},
            "mqa": {"n_kv_head": 1, "d_ff": 608},
            "mla": {"mixer": "mla", "mla": {"kv_rank": 64, "rope_dim": 16, "q_rank": 0}},
        },
        "variant_steps": 500,
        "student": {"n_layer": 2, "d_model": 64, "n_head": 2},
        "student_steps": 500,
        "temperature": 2.0,
        "alpha": 0.5,
    }
    if preset == "smoke":
        # d_model 32: int4 groups of 64 and 128 do not divide the attention kernels.
        cfg.compress.update(schemes=("float32", "int8", "w8a8", "int4-g32"),
                            qat_scheme="int4-g32", qat_steps=2, variant_steps=4,
                            student_steps=4)
        cfg.compress.decode.update(new_tokens=4, repeats=1)
        cfg.compress.attention_variants = {"mha": {}, "mla": {
            "mixer": "mla", "mla": {"kv_rank": 8, "rope_dim": 4, "q_rank": 0}}}
        cfg.compress.student = {"n_layer": 1, "d_model": 16, "n_head": 2}
    return cfg
