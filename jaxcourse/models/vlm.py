"""A tiny vision-language model by early fusion (LLaVA-style, Liu et al. 2023): the ViT's
patch tokens, projected to the GPT's width, go into chapter 4's GPT as prefix embeddings
before the text tokens, so every text token attends to every image patch in every layer.

    images [B,H,W,C] -> ViT tokens [B,P,Dv] -> projector -> prefix [B,P,D]
    GPT(tokens [B,T], prefix_BxPxD=prefix) -> logits [B,P+T,V] -> text logits [B,T,V]

`vqa_task` trains it with the shared loop on question + answer rows with the answer-only
loss (data/scenes.tokenize_qa's mask: question tokens and image positions count for nothing).
`greedy_answers` generates the answers (the one sampler, decode.generate); exact match of
the generated answer is the VQA metric.
The parameters sit under "vit", "projector" and "gpt", so a CLIP image tower drops in as
{"vit": ...} and `optimizer.frozen="^vit/"` keeps it frozen.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax

from jaxcourse.errors import ConfigError
from jaxcourse.lm.task import lm_loss
from jaxcourse.models import decode
from jaxcourse.models.transformer import GPT, GPTConfig
from jaxcourse.models.vit import ViT, ViTConfig, token_features
from jaxcourse.train import Task

PROJECTORS = ("linear", "mlp")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    vit: ViTConfig
    gpt: GPTConfig
    projector: str = "mlp"        # linear (LLaVA) | mlp (Dense-GELU-Dense, LLaVA-1.5)

    def __post_init__(self):
        if self.projector not in PROJECTORS:
            raise ConfigError(f"vlm.projector={self.projector!r} is not one of "
                              f"{', '.join(PROJECTORS)}")

    @property
    def image_tokens(self) -> int:
        """Prefix positions one image takes in the GPT's context."""
        return self.vit.n_tokens

    @property
    def text_context(self) -> int:
        """Text tokens that fit in the GPT's context after the image."""
        return self.gpt.context - self.image_tokens


class VLM(nn.Module):
    """images [B,H,W,C], tokens [B,T] -> text logits [B,T,V] (position t predicts token
    t + 1, as a GPT's logits do)."""
    cfg: VLMConfig

    def setup(self):
        c = self.cfg
        if c.text_context < 1:
            raise ConfigError(f"the GPT context {c.gpt.context} leaves no room for text after "
                              f"the image's {c.image_tokens} tokens")
        self.vit = ViT(c.vit)
        layers = [nn.Dense(c.gpt.d_model)]
        if c.projector == "mlp":
            layers += [nn.gelu, nn.Dense(c.gpt.d_model)]
        self.projector = nn.Sequential(layers)
        self.gpt = GPT(c.gpt)

    def embed_image(self, images_BxHxWxC, *, train: bool = False):
        """The image as prefix embeddings [B, P, D] in the GPT's width."""
        return self.projector(token_features(self.vit(images_BxHxWxC, train=train)))

    def text_logits(self, prefix_BxPxD, tokens_BxT, *, train: bool = False):
        logits = self.gpt(tokens_BxT, train=train, prefix_BxPxD=prefix_BxPxD)
        return logits[:, prefix_BxPxD.shape[1]:]

    def __call__(self, images_BxHxWxC, tokens_BxT, *, train: bool = False):
        return self.text_logits(self.embed_image(images_BxHxWxC, train=train), tokens_BxT,
                                train=train)


def vqa_task(model: VLM) -> Task:
    """Answer-only next-token loss for the shared loop. Batches: {"image" [B,H,W,C],
    "inputs", "targets", "mask" [B,T]} (data/scenes.tokenize_qa); metrics: the loss and the
    token accuracy over answer positions, and `exact_match`: the share of rows whose every
    answer token (and its end) is the argmax. That equals exact match of greedy decoding:
    greedy decoding reproduces the answer token by token exactly when each is the argmax
    given the true ones before it."""
    def init(rng, batch):
        return model.init({"params": rng, "dropout": rng}, batch["image"],
                          batch["inputs"])["params"], {}

    def loss(params, model_state, batch, rng, train):
        logits = model.apply({"params": params}, batch["image"], batch["inputs"], train=train,
                             rngs={"dropout": rng})
        value, metrics = lm_loss(logits, batch["targets"], batch["mask"])
        wrong_BxT = (logits.argmax(-1) != batch["targets"]) & batch["mask"].astype(bool)
        metrics["exact_match"] = 1.0 - wrong_BxT.any(-1).mean()
        return value, (metrics, model_state)

    return Task(init=init, loss=loss)


def greedy_answers(model: VLM, params, images_BxHxWxC, inputs_BxT, start_B, max_new: int):
    """Greedy answers [B, max_new]: row b's prompt is inputs_BxT[b, :start_B[b]] (its question,
    up to the first answer token), after the image's prefix embeddings; decoded by the one
    sampler (decode.generate, KV cache, a fill level per row). What the rows hold from
    `start` on is ignored. `start_B`: host ints."""
    prefix = _embed_image(model, params, images_BxHxWxC)
    return decode.generate(GPT(model.cfg.gpt), params["gpt"], inputs_BxT, None,
                           max_new_tokens=max_new, temperature=0.0, prefix_BxPxD=prefix,
                           prompt_lengths_B=start_B)


@functools.partial(jax.jit, static_argnums=0)
def _embed_image(model: VLM, params, images_BxHxWxC):
    return model.apply({"params": params}, images_BxHxWxC, method=VLM.embed_image)
