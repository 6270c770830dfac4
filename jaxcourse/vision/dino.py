"""DINO: self-distillation with no labels (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers"), algorithm 1.

    student g_s and teacher g_t: the same encoder + projection head (`DINOHead`);
    teacher <- m teacher + (1 - m) student, m on a cosine schedule 0.996 -> 1 (section 3.1);
    P_t = softmax((g_t(x) - c) / tau_t)   centering c and sharpening tau_t (warmed up
                                          linearly 0.04 -> 0.07 over the first steps);
    P_s = softmax(g_s(x) / tau_s)         tau_s = 0.1;
    L = mean over (teacher global view v, student view v' != v) of H(P_t(v), P_s(v'));
    c <- m_c c + (1 - m_c) mean_batch g_t(x)            (eq. 4, m_c = 0.9).

Multi-crop: 2 global crops (teacher and student) and several small local crops (student only).
Evaluation by a weighted k-NN on cosine similarity (section 4.1, k = 20, T = 0.07), and a
collapse monitor: teacher entropy (-> 0: one dimension dominates; -> log K: uniform) and the
KL between teacher and student (-> 0 when both collapse to the same output).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxcourse.errors import UserError
from jaxcourse.models.vit import pooled_features
from jaxcourse.train import Task


@dataclasses.dataclass(frozen=True)
class DINOConfig:
    out_dim: int = 256             # K, the prototypes of the head's last layer
    hidden_dim: int = 256
    bottleneck_dim: int = 64
    head_layers: int = 3
    norm_last_layer: bool = True   # weight-normed last layer with its gain frozen at 1
    head_bn: bool = False          # batch-standardise the head's hidden layers (use_bn)
    n_global: int = 2
    n_local: int = 4
    global_size: int = 32
    local_size: int = 16
    global_scale: tuple = (0.4, 1.0)
    local_scale: tuple = (0.05, 0.4)
    student_temp: float = 0.1
    teacher_temp_start: float = 0.04
    teacher_temp_end: float = 0.07
    teacher_temp_warmup: int = 0   # steps of the linear warmup
    center_momentum: float = 0.9
    momentum_base: float = 0.996
    total_steps: int = 1000        # for the teacher momentum's cosine schedule

    def __post_init__(self):
        for name in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "global_size",
                     "local_size", "total_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"dino.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_global < 2 or self.n_local < 0:
            raise UserError(f"dino needs n_global >= 2 and n_local >= 0, got "
                            f"{self.n_global}, {self.n_local}")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise UserError(f"dino.{name}={getattr(self, name)} must satisfy "
                                "0 < low <= high <= 1")
        for name in ("student_temp", "teacher_temp_start", "teacher_temp_end"):
            if getattr(self, name) <= 0:
                raise UserError(f"dino.{name} must be positive, got {getattr(self, name)}")
        for name in ("center_momentum", "momentum_base"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"dino.{name} must be in [0, 1], got {getattr(self, name)}")


# ---------------------------------------------------------------- model
class DINOHead(nn.Module):
    """MLP -> bottleneck -> L2 normalise -> weight-normed linear layer to K prototypes.

    `head_bn` standardises each hidden layer over the batch (the official head's `use_bn`,
    which the paper uses for ResNets). It matters where the encoder's features start almost
    the same for every image (a small random ViT on 8x8 digits: the spread across images is
    a few percent of the mean): after the bottleneck's L2 normalisation the teacher's logits
    then barely differ between images, centering removes what is common, and the sharpened
    teacher is still uniform, so the loss carries no signal. Standardising over the batch
    turns that small spread into unit variance. The head only ever sees training batches
    (k-NN and probes read the encoder), so batch statistics suffice: no running averages.

    Weight norm (Salimans & Kingma 2016): w_k = g_k v_k / ||v_k||; `norm_last_layer` fixes
    g = 1 (the paper's default for ViT-S, it stabilises training); `weight_norm=False` gives a
    plain Dense last layer.
    """
    cfg: DINOConfig
    weight_norm: bool = True

    @nn.compact
    def __call__(self, x_BxE):
        c = self.cfg
        for i in range(c.head_layers - 1):
            x_BxE = nn.Dense(c.hidden_dim, name=f"mlp_{i}")(x_BxE)
            if c.head_bn:
                x_BxE = batch_standardize(x_BxE)
                x_BxE = x_BxE * self.param(f"bn_{i}_scale", nn.initializers.ones, (c.hidden_dim,))
                x_BxE = x_BxE + self.param(f"bn_{i}_bias", nn.initializers.zeros, (c.hidden_dim,))
            x_BxE = nn.gelu(x_BxE)
        x_BxE = nn.Dense(c.bottleneck_dim, name="bottleneck")(x_BxE)
        x_BxE = x_BxE / jnp.sqrt(jnp.sum(x_BxE ** 2, -1, keepdims=True) + 1e-12)
        if not self.weight_norm:
            return nn.Dense(c.out_dim, use_bias=False, name="last")(x_BxE)
        v = self.param("last_v", nn.initializers.lecun_normal(), (c.bottleneck_dim, c.out_dim))
        w = v / jnp.sqrt(jnp.sum(v ** 2, axis=0, keepdims=True) + 1e-12)
        if not c.norm_last_layer:
            w = w * self.param("last_g", nn.initializers.ones, (c.out_dim,))
        return x_BxE @ w


def batch_standardize(x_BxE, eps: float = 1e-5):
    """Each feature to zero mean and unit variance over the batch (batch norm's training
    statistics)."""
    mean = x_BxE.mean(0, keepdims=True)
    return (x_BxE - mean) * jax.lax.rsqrt(((x_BxE - mean) ** 2).mean(0, keepdims=True) + eps)


class DINO(nn.Module):
    """Encoder (images [B, H, W, C] -> features) + DINO head: images -> logits [B, K]."""
    encoder: nn.Module
    cfg: DINOConfig
    weight_norm: bool = True

    @nn.compact
    def __call__(self, images_BxHxWxC, *, train: bool = False, features_only: bool = False):
        feats = pooled_features(self.encoder(images_BxHxWxC, train=train))
        if features_only:
            return feats
        return DINOHead(self.cfg, self.weight_norm, name="head")(feats)


# ---------------------------------------------------------------- schedules and updates
def teacher_temperature(step, cfg: DINOConfig):
    """Linear warmup teacher_temp_start -> teacher_temp_end over teacher_temp_warmup steps,
    then constant (the paper: 0.04 -> 0.07 over 30 epochs)."""
    if cfg.teacher_temp_warmup == 0:
        return jnp.float32(cfg.teacher_temp_end)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / cfg.teacher_temp_warmup, 0.0, 1.0)
    return cfg.teacher_temp_start + frac * (cfg.teacher_temp_end - cfg.teacher_temp_start)


def teacher_momentum(step, cfg: DINOConfig, final: float = 1.0):
    """Cosine schedule from momentum_base at step 0 to `final` at total_steps."""
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / cfg.total_steps, 0.0, 1.0)
    return final - (final - cfg.momentum_base) * (jnp.cos(math.pi * frac) + 1) / 2


def momentum_update(teacher, student, momentum):
    """teacher <- m teacher + (1 - m) student, leaf by leaf (an EMA of the student)."""
    return jax.tree.map(lambda t, s: momentum * t + (1 - momentum) * s, teacher, student)


def update_center(center_K, teacher_out_NxK, momentum: float, axis_name: str | None = None):
    """c <- m c + (1 - m) mean over the batch of the teacher outputs (eq. 4); with
    `axis_name` the batch mean is taken over every device (inside shard_map / pmap)."""
    mean = teacher_out_NxK.mean(axis=0)
    if axis_name is not None:
        mean = jax.lax.pmean(mean, axis_name)
    return momentum * center_K + (1 - momentum) * jax.lax.stop_gradient(mean)


def teacher_probs(teacher_VxBxK, center_K, temp):
    return jax.nn.softmax((teacher_VxBxK - center_K) / temp, axis=-1)


def dino_loss(student_SxBxK, teacher_VxBxK, center_K, teacher_temp, student_temp: float = 0.1):
    """Mean cross-entropy over (teacher view v, student view s != v) pairs.

    Student views: the V global crops first, in the teacher's order, then the local ones."""
    v, s = teacher_VxBxK.shape[0], student_SxBxK.shape[0]
    if s < v or student_SxBxK.shape[1:] != teacher_VxBxK.shape[1:]:
        raise UserError(f"dino_loss: student views {tuple(student_SxBxK.shape)} must start "
                        f"with the teacher's {tuple(teacher_VxBxK.shape)} global views")
    q_VxBxK = jax.lax.stop_gradient(teacher_probs(teacher_VxBxK, center_K, teacher_temp))
    logp_SxBxK = jax.nn.log_softmax(student_SxBxK / student_temp, axis=-1)
    ce_VxS = -jnp.einsum("vbk,sbk->vs", q_VxBxK, logp_SxBxK) / teacher_VxBxK.shape[1]
    pairs_VxS = 1.0 - jnp.eye(v, s)  # skip the student's copy of the teacher's own view
    return (ce_VxS * pairs_VxS).sum() / pairs_VxS.sum()


def collapse_monitor(student_SxBxK, teacher_VxBxK, center_K, teacher_temp,
                     student_temp: float = 0.1) -> dict:
    """teacher_entropy: mean per-example entropy of P_t (0 = one-hot, log K = uniform);
    batch_entropy: entropy of the batch-mean P_t (low = every image maps to the same
    prototype); kl: mean KL(P_t || P_s) over the same-view global crops."""
    q = teacher_probs(teacher_VxBxK, center_K, teacher_temp)
    logq = jnp.log(q + 1e-12)
    logp = jax.nn.log_softmax(student_SxBxK[: teacher_VxBxK.shape[0]] / student_temp, -1)
    mean_q = q.mean(axis=(0, 1))
    return {"teacher_entropy": -(q * logq).sum(-1).mean(),
            "batch_entropy": -(mean_q * jnp.log(mean_q + 1e-12)).sum(),
            "kl": (q * (logq - logp)).sum(-1).mean()}


# ---------------------------------------------------------------- multi-crop
def _bilinear_weights(start_B, extent_B, size: int, n: int):
    """[B, size, n] bilinear interpolation weights: output pixel i samples the input at
    start + (i + 0.5) extent / size - 0.5 (pixel centres), a triangle kernel over rows."""
    src_BxS = start_B[:, None] + (jnp.arange(size) + 0.5) * (extent_B[:, None] / size) - 0.5
    src_BxS = jnp.clip(src_BxS, 0.0, n - 1.0)
    return jnp.maximum(0.0, 1.0 - jnp.abs(src_BxS[..., None] - jnp.arange(n)))


def _resized_crop(rng, images_BxHxWxC, size: int, scale: tuple, flip: bool = True):
    """Random-resized crops (area fraction in `scale`, aspect in [3/4, 4/3]) to size x size,
    bilinear (two small matmuls per image), with random horizontal flips, all on device."""
    b, h, w, c = images_BxHxWxC.shape
    u_Bx5 = jax.random.uniform(rng, (b, 5))  # one draw: area, aspect, y, x, flip
    area = (scale[0] + (scale[1] - scale[0]) * u_Bx5[:, 0]) * h * w
    log_ar = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u_Bx5[:, 1]
    ch = jnp.clip(jnp.sqrt(area / jnp.exp(log_ar)), 1.0, h)
    cw = jnp.clip(jnp.sqrt(area * jnp.exp(log_ar)), 1.0, w)
    y0 = u_Bx5[:, 2] * (h - ch)
    x0 = u_Bx5[:, 3] * (w - cw)
    rows_BxSxH = _bilinear_weights(y0, ch, size, h)
    cols_BxSxW = _bilinear_weights(x0, cw, size, w)
    out = jnp.einsum("bih,bhwc,bjw->bijc", rows_BxSxH, images_BxHxWxC.astype(jnp.float32),
                     cols_BxSxW)
    if flip:
        out = jnp.where(u_Bx5[:, 4, None, None, None] < 0.5, out[:, :, ::-1], out)
    return out


def multi_crop(rng, images_BxHxWxC, cfg: DINOConfig) -> dict:
    """{"global": [n_global, B, G, G, C], "local": [n_local, B, L, L, C]}, seeded by rng."""
    k_global, k_local = jax.random.split(rng)
    crops = lambda keys, size, scale: jax.vmap(  # noqa: E731
        lambda k: _resized_crop(k, images_BxHxWxC, size, scale))(keys)
    return {"global": crops(jax.random.split(k_global, cfg.n_global), cfg.global_size,
                            cfg.global_scale),
            "local": crops(jax.random.split(k_local, cfg.n_local), cfg.local_size,
                           cfg.local_scale)}


# ---------------------------------------------------------------- k-NN evaluation
def knn_predict(train_NxD, train_labels_N, query_QxD, num_classes: int, k: int = 20,
                temperature: float = 0.07):
    """Weighted k-NN (DINO section 4.1, after Wu et al. 2018): the k most cosine-similar
    training features vote for their label with weight exp(sim / T). Returns [Q] labels."""
    if not 0 < k <= train_NxD.shape[0]:
        raise UserError(f"k-NN with k={k} needs 1..{train_NxD.shape[0]} training features")
    return _knn_predict(train_NxD, train_labels_N, query_QxD, num_classes, k, temperature)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _knn_predict(train_NxD, train_labels_N, query_QxD, num_classes, k, temperature):
    norm = lambda x: x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)  # noqa: E731
    sim_QxN = norm(query_QxD) @ norm(train_NxD).T
    top_sim, top_idx = jax.lax.top_k(sim_QxN, k)
    votes_QxKxC = jax.nn.one_hot(jnp.asarray(train_labels_N)[top_idx], num_classes)
    scores_QxC = jnp.einsum("qk,qkc->qc", jnp.exp(top_sim / temperature), votes_QxKxC)
    return scores_QxC.argmax(-1)


def knn_accuracy(train_NxD, train_labels_N, query_QxD, query_labels_Q, num_classes: int,
                 k: int = 20, temperature: float = 0.07) -> float:
    pred = knn_predict(train_NxD, train_labels_N, query_QxD, num_classes, k, temperature)
    return float((pred == jnp.asarray(query_labels_Q)).mean())


# ---------------------------------------------------------------- task for the shared loop
def dino_task(model: DINO) -> Task:
    """DINO pretraining for the shared loop; batches {"image": [B, H, W, C]}.

    The teacher's parameters and the center live in the model state ({"teacher", "center"}),
    so they are checkpointed and resumed with the run. A custom `update` takes the student's
    gradient step, then moves the teacher (cosine momentum) and the center; the loop's own
    EMA (train.ema_decay) is not used: its decay is constant, DINO's follows a schedule.
    """
    cfg = model.cfg

    def init(rng, batch):
        b, c = batch["image"].shape[0], batch["image"].shape[-1]
        params = nn.meta.unbox(  # the teacher copy holds plain arrays (no partition boxes)
            model.init(rng, jnp.zeros((b, cfg.global_size, cfg.global_size, c)))["params"])
        return params, {"teacher": params, "center": jnp.zeros((cfg.out_dim,), jnp.float32)}

    def forward(params, model_state, images, rng, step, train=True):
        k_crop, k_drop = jax.random.split(rng)
        crops = multi_crop(k_crop, images, cfg)
        b = images.shape[0]
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
        teacher = model.apply({"params": model_state["teacher"]}, flat(crops["global"]))
        teacher = jax.lax.stop_gradient(teacher).reshape(cfg.n_global, b, -1)
        run = lambda x: model.apply({"params": params}, x, train=train,  # noqa: E731
                                    rngs={"dropout": k_drop})
        student = [run(flat(crops["global"]))]
        if cfg.n_local:
            student.append(run(flat(crops["local"])))
        student = jnp.concatenate(student).reshape(cfg.n_global + cfg.n_local, b, -1)
        temp = teacher_temperature(step, cfg)
        value = dino_loss(student, teacher, model_state["center"], temp, cfg.student_temp)
        monitor = collapse_monitor(student, teacher, model_state["center"], temp,
                                   cfg.student_temp)
        return value, (teacher, {**monitor, "teacher_temp": temp})

    def loss(params, model_state, batch, rng, train):
        value, (_, metrics) = forward(params, model_state, batch["image"], rng,
                                      cfg.teacher_temp_warmup, train)
        return value, ({"dino_loss": value, **metrics}, model_state)

    def update(state, batch, rng, tx):
        grad_fn = jax.value_and_grad(forward, has_aux=True)
        (value, (teacher_out, metrics)), grads = grad_fn(
            state.params, state.model_state, batch["image"], rng, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        m = teacher_momentum(state.step, cfg)
        model_state = {
            "teacher": momentum_update(state.model_state["teacher"], params, m),
            "center": update_center(state.model_state["center"],
                                    teacher_out.reshape(-1, cfg.out_dim), cfg.center_momentum)}
        metrics = {**metrics, "loss": value, "teacher_momentum": m,
                   "grad_norm": optax.tree.norm(grads)}
        return state.replace(params=params, opt_state=opt_state, model_state=model_state), metrics

    return Task(init=init, loss=loss, update=update)
