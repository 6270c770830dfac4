"""Knowledge distillation (Hinton et al. 2015): a student GPT trained on a teacher's logits.

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

The T^2 keeps the soft term's gradients on the scale of the hard one as T grows (sec. 2).
`distill_task` is a Task of the one training loop: the teacher's forward runs inside the
student's loss (no gradient), so nothing is precomputed and the data pipeline is the LM one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcourse.errors import UserError
from jaxcourse.lm.task import lm_loss
from jaxcourse.models.transformer import GPT, GPTConfig
from jaxcourse.train import Task


def soft_cross_entropy(student_BxTxV, teacher_BxTxV, temperature: float = 1.0):
    """Mean over positions of -sum_v p_teacher(v) log p_student(v), both at temperature T."""
    log_p_s = jax.nn.log_softmax(student_BxTxV.astype(jnp.float32) / temperature, -1)
    p_t = jax.nn.softmax(teacher_BxTxV.astype(jnp.float32) / temperature, -1)
    return -jnp.mean(jnp.sum(p_t * log_p_s, -1))


def kl_divergence(student_BxTxV, teacher_BxTxV, temperature: float = 1.0):
    """Mean over positions of KL(p_teacher || p_student) at temperature T."""
    log_p_s = jax.nn.log_softmax(student_BxTxV.astype(jnp.float32) / temperature, -1)
    log_p_t = jax.nn.log_softmax(teacher_BxTxV.astype(jnp.float32) / temperature, -1)
    return jnp.mean(jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), -1))


def distill_loss(student_BxTxV, teacher_BxTxV, targets_BxT, *, temperature: float = 2.0,
                 alpha: float = 1.0):
    """(loss, metrics): alpha * T^2 * KL + (1 - alpha) * hard-label CE."""
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise UserError(f"distillation needs temperature > 0 and alpha in [0, 1], got "
                        f"T={temperature}, alpha={alpha}")
    kl = kl_divergence(student_BxTxV, jax.lax.stop_gradient(teacher_BxTxV), temperature)
    hard, metrics = lm_loss(student_BxTxV, targets_BxT)
    loss = alpha * temperature ** 2 * kl + (1.0 - alpha) * hard
    return loss, {**metrics, "loss": loss, "kl": kl, "hard_loss": hard}


def distill_task(student_cfg: GPTConfig, teacher_cfg: GPTConfig, teacher_params, *,
                 temperature: float = 2.0, alpha: float = 1.0) -> Task:
    """The student's LM task with the distillation loss in training; eval reports the
    student's plain next-token loss, comparable with a hard-label run."""
    if student_cfg.vocab_size != teacher_cfg.vocab_size:
        raise UserError(f"student vocab {student_cfg.vocab_size} != teacher vocab "
                        f"{teacher_cfg.vocab_size}")
    student, teacher = GPT(student_cfg), GPT(teacher_cfg)

    def init(rng, batch):
        return student.init(rng, jnp.asarray(batch["inputs"][:1]))["params"], {}

    def loss(params, model_state, batch, rng, train):
        logits = student.apply({"params": params}, batch["inputs"], train=train,
                               rngs={"dropout": rng})
        if not train:
            value, metrics = lm_loss(logits, batch["targets"])
            return value, (metrics, model_state)
        teacher_logits = teacher.apply({"params": teacher_params}, batch["inputs"])
        value, metrics = distill_loss(logits, teacher_logits, batch["targets"],
                                      temperature=temperature, alpha=alpha)
        return value, (metrics, model_state)

    return Task(init=init, loss=loss)
