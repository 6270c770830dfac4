"""CLIP / SigLIP dual encoders (Radford et al. 2021; Zhai et al. 2023), the contrastive task
for the shared loop, and few-shot heads on frozen features (linear probe, MLP, residual adapter).

    image tower: any encoder (images [B, H, W, C] -> features [B, E] or {"pooled": ...},
                 e.g. models/vit.ViT) + a linear projection to the joint width;
    text tower:  token embedding + learned positions + the shared `Stack` (causal as in
                 CLIP, or bidirectional), pooled at the last real token (CLIP's EOT) or
                 as the mean over real tokens, + a linear projection;
    both outputs L2-normalised; the learnable log-scale t (and SigLIP's bias b) live beside
    them (losses: jaxcourse/vision/contrastive.py).

    model = CLIP(encoder, CLIPConfig(loss="siglip"))
    out = model.apply({"params": params}, images, tokens, valid)  # {"image", "text", ...}
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxcourse.errors import UserError
from jaxcourse.models.block import Stack
from jaxcourse.models.layers import Embed
from jaxcourse.models.transformer import GPTConfig, Positions, check_length, final_norm
from jaxcourse.models.vit import pooled_features
from jaxcourse.train import Task
from jaxcourse.vision import contrastive

LOSSES = ("clip", "siglip")
POOLS = ("last", "mean")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 64           # joint embedding width
    loss: str = "clip"            # clip (InfoNCE) | siglip (sigmoid)
    vocab_size: int = 256
    text_context: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_width: int = 64
    text_pool: str = "last"       # last real token (CLIP's EOT) | mean over real tokens
    text_causal: bool = True      # CLIP's text transformer is causally masked
    dtype: str = "float32"        # the text tower's compute dtype (the image tower's model.dtype)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise UserError(f"clip.loss={self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.text_pool not in POOLS:
            raise UserError(f"clip.text_pool={self.text_pool!r} is not one of "
                            f"{', '.join(POOLS)}")
        for name in ("embed_dim", "vocab_size", "text_context", "text_layers", "text_heads",
                     "text_width"):
            if getattr(self, name) < 1:
                raise UserError(f"clip.{name} must be >= 1, got {getattr(self, name)}")
        self.text_blocks()  # the text tower's own checks (width vs heads, ...)

    def text_blocks(self) -> GPTConfig:
        return GPTConfig(vocab_size=self.vocab_size, context=self.text_context,
                         n_layer=self.text_layers, n_head=self.text_heads,
                         d_model=self.text_width, pos="learned", norm="layernorm",
                         dtype=self.dtype)

    @property
    def init_log_scale(self) -> float:
        return (contrastive.CLIP_INIT_LOG_SCALE if self.loss == "clip"
                else contrastive.SIGLIP_INIT_LOG_SCALE)


class TextTower(nn.Module):
    """tokens [B, T] (valid [B, T]: 1 = real token, real tokens first) -> features [B, W]."""
    cfg: CLIPConfig

    @nn.compact
    def __call__(self, tokens_BxT, valid_BxT=None, *, train: bool = False):
        c = self.cfg.text_blocks()
        b, t = tokens_BxT.shape
        check_length(c, t, "the caption")
        valid_BxT = jnp.ones((b, t), bool) if valid_BxT is None else valid_BxT.astype(bool)
        positions_T = jnp.arange(t)
        x_BxTxD = Positions(c, name="positions")(
            Embed(c.vocab_size, c.d_model, c.compute_dtype, name="embed")(tokens_BxT),
            positions_T)
        x_BxTxD, _ = Stack(c, causal=self.cfg.text_causal, deterministic=not train,
                           name="blocks")(x_BxTxD, positions_T, valid=valid_BxT)
        x_BxTxD = final_norm(c, x_BxTxD)
        if self.cfg.text_pool == "mean":
            w = valid_BxT[..., None].astype(x_BxTxD.dtype)
            return (x_BxTxD * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
        last_B = jnp.maximum(valid_BxT.sum(1) - 1, 0)
        return jnp.take_along_axis(x_BxTxD, last_B[:, None, None], axis=1)[:, 0]


class CLIP(nn.Module):
    """Image and text towers with projections and the learnable scalars.

    __call__(images, tokens, valid) -> {"image": [B, D], "text": [B, D] (unit norm),
    "log_scale": t, "bias": b (SigLIP; 0 and unused for CLIP)}."""
    encoder: nn.Module
    cfg: CLIPConfig

    def setup(self):
        c = self.cfg
        self.text_tower = TextTower(c)
        self.image_proj = nn.Dense(c.embed_dim, use_bias=False)
        self.text_proj = nn.Dense(c.embed_dim, use_bias=False)
        self.log_scale = self.param("log_scale", nn.initializers.constant(c.init_log_scale),
                                    ())
        bias = contrastive.SIGLIP_INIT_BIAS if c.loss == "siglip" else 0.0
        self.bias = self.param("bias", nn.initializers.constant(bias), ())

    def encode_image(self, images_BxHxWxC, *, train: bool = False):
        feats = pooled_features(self.encoder(images_BxHxWxC, train=train))
        return contrastive.l2_normalize(self.image_proj(feats))

    def encode_text(self, tokens_BxT, valid_BxT=None, *, train: bool = False):
        feats = self.text_tower(tokens_BxT, valid_BxT, train=train)
        return contrastive.l2_normalize(self.text_proj(feats))

    def __call__(self, images_BxHxWxC, tokens_BxT, valid_BxT=None, *, train: bool = False):
        return {"image": self.encode_image(images_BxHxWxC, train=train),
                "text": self.encode_text(tokens_BxT, valid_BxT, train=train),
                "log_scale": self.log_scale, "bias": self.bias}


def contrastive_loss(out: dict, cfg: CLIPConfig, mesh=None, axis: str = "data"):
    """The configured loss of a CLIP output; with `mesh`, sharded over its `axis`."""
    img, txt, t, b = out["image"], out["text"], out["log_scale"], out["bias"]
    if cfg.loss == "clip":
        if mesh is not None:
            return contrastive.sharded_clip_loss(img, txt, t, mesh, axis)
        return contrastive.clip_loss(img, txt, t)
    if mesh is not None:
        return contrastive.sharded_siglip_loss(img, txt, t, b, mesh, axis)
    return contrastive.siglip_loss(img, txt, t, b)


def contrastive_task(model: CLIP, mesh=None, axis: str = "data") -> Task:
    """CLIP / SigLIP training for the shared loop. Batches: {"image": [B, H, W, C],
    "tokens": [B, T] int, "valid": [B, T]} with pair i = (image i, caption i). Metrics: the
    in-batch top-1 matching accuracy both ways and the temperature's scale."""
    def init(rng, batch):
        variables = dict(model.init({"params": rng, "dropout": rng}, batch["image"],
                                    batch["tokens"], batch.get("valid")))
        return variables.pop("params"), variables

    def loss(params, model_state, batch, rng, train):
        out = model.apply({"params": params, **model_state}, batch["image"], batch["tokens"],
                          batch.get("valid"), train=train, rngs={"dropout": rng})
        value = contrastive_loss(out, model.cfg, mesh, axis)
        sim = out["image"] @ out["text"].T
        target = jnp.arange(sim.shape[0])
        metrics = {"i2t_accuracy": (sim.argmax(1) == target).mean(),
                   "t2i_accuracy": (sim.argmax(0) == target).mean(),
                   "scale": jnp.exp(out["log_scale"]), "bias": out["bias"]}
        return value, (metrics, model_state)

    return Task(init=init, loss=loss)


# ---------------------------------------------------------------- heads on frozen features
class FeatureHead(nn.Module):
    """A few-shot head on frozen embeddings [B, D] -> logits [B, K].

    kind="linear": a linear probe (CLIP section 3.2). kind="mlp": one hidden ReLU layer of
    `hidden` units (a late-fusion classifier on frozen features). kind="adapter": CLIP-Adapter (Gao et al.
    2021, eq. 2-3): f' = ratio * MLP(f) + (1 - ratio) * f, scored by cosine against the
    zero-shot class embeddings `classifier_KxD` times `scale`; the MLP's output layer starts
    at zero, so before training the adapter is exactly the zero-shot classifier.
    """
    num_classes: int
    kind: str = "linear"
    classifier_KxD: Any = None
    ratio: float = 0.2
    hidden: int = 32
    scale: float = 100.0

    @nn.compact
    def __call__(self, feats_BxD):
        if self.kind == "linear":
            return nn.Dense(self.num_classes, name="probe")(feats_BxD)
        if self.kind == "mlp":
            h = nn.relu(nn.Dense(self.hidden, name="hidden")(feats_BxD))
            return nn.Dense(self.num_classes, name="out")(h)
        if self.kind != "adapter":
            raise UserError(f"feature head kind={self.kind!r} is not linear, mlp or adapter")
        if self.classifier_KxD is None or self.classifier_KxD.shape[0] != self.num_classes:
            raise UserError("the adapter needs the zero-shot classifier [num_classes, D]")
        h = nn.relu(nn.Dense(self.hidden, name="down")(feats_BxD))
        mlp = nn.Dense(feats_BxD.shape[-1], name="up", kernel_init=nn.initializers.zeros)(h)
        f = self.ratio * mlp + (1 - self.ratio) * feats_BxD
        # (the cosine ignores f's norm: with the MLP at zero it scores feats itself)
        return self.scale * contrastive.l2_normalize(f) @ jnp.asarray(self.classifier_KxD).T


def feature_task(head: FeatureHead) -> Task:
    """Train a FeatureHead on batches {"features": [B, D], "label": [B]}."""
    def init(rng, batch):
        return head.init(rng, batch["features"])["params"], {}

    def loss(params, model_state, batch, rng, train):
        logits = head.apply({"params": params}, batch["features"]).astype(jnp.float32)
        value = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        accuracy = (logits.argmax(-1) == batch["label"]).mean()
        return value, ({"accuracy": accuracy}, model_state)

    return Task(init=init, loss=loss)


def encode_texts(model: CLIP, params, tokenize, texts: list[str], context: int):
    """Helper for zero-shot: strings -> normalised text embeddings [N, D]. `tokenize` maps
    a string to a list of ids; captions longer than `context` are refused (UserError)."""
    ids = [tokenize(t) for t in texts]
    longest = max(len(i) for i in ids)
    if longest > context:
        raise UserError(f"a prompt has {longest} tokens, longer than the text context "
                        f"{context}")
    tokens = jnp.array([i + [0] * (context - len(i)) for i in ids], jnp.int32)
    valid = jnp.array([[1] * len(i) + [0] * (context - len(i)) for i in ids], bool)
    return jax.jit(lambda p, t, v: model.apply({"params": p}, t, v,
                                               method=CLIP.encode_text))(params, tokens, valid)
