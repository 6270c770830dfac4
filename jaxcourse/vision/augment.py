"""Augmentation and label mixing, run on device inside the jitted step.

mixup: Zhang et al. 2018, eq. (1); CutMix: Yun et al. 2019, section 3.1.
"""
import jax
import jax.numpy as jnp


def random_crop_flip(rng, x_BxHxWxC, pad: int, flip: bool):
    """Pads by `pad` (edge mode), crops back to HxW at a random offset, optionally flips."""
    b, h, w, _ = x_BxHxWxC.shape
    k_crop, k_flip = jax.random.split(rng)
    if pad > 0:
        padded = jnp.pad(x_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
        offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
        crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
        x_BxHxWxC = jax.vmap(crop)(padded, offsets)
    if flip:
        do = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
        x_BxHxWxC = jnp.where(do, x_BxHxWxC[:, :, ::-1], x_BxHxWxC)
    return x_BxHxWxC


def mixup(rng, x, y_BxK, alpha: float):
    """Convex combination of each example with a partner from the shuffled batch."""
    k_lam, k_perm = jax.random.split(rng)
    lam = jax.random.beta(k_lam, alpha, alpha)
    perm = jax.random.permutation(k_perm, x.shape[0])
    return lam * x + (1 - lam) * x[perm], lam * y_BxK + (1 - lam) * y_BxK[perm]


def cutmix(rng, x_BxHxWxC, y_BxK, alpha: float):
    """Pastes a random box from a partner image; labels mix by the pasted area."""
    b, h, w, _ = x_BxHxWxC.shape
    k_lam, k_perm, k_y, k_x = jax.random.split(rng, 4)
    lam = jax.random.beta(k_lam, alpha, alpha)
    cut = jnp.sqrt(1.0 - lam)
    ch, cw = jnp.floor(h * cut), jnp.floor(w * cut)
    cy = jax.random.uniform(k_y, (), minval=0, maxval=h)
    cx = jax.random.uniform(k_x, (), minval=0, maxval=w)
    y0, y1 = jnp.clip(cy - ch / 2, 0, h), jnp.clip(cy + ch / 2, 0, h)
    x0, x1 = jnp.clip(cx - cw / 2, 0, w), jnp.clip(cx + cw / 2, 0, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box_HxW = (rows >= jnp.floor(y0)) & (rows < jnp.floor(y1)) & (cols >= jnp.floor(x0)) & (
        cols < jnp.floor(x1))
    perm = jax.random.permutation(k_perm, b)
    mixed = jnp.where(box_HxW[None, :, :, None], x_BxHxWxC[perm], x_BxHxWxC)
    area = box_HxW.mean()  # the fraction actually pasted, after clipping.
    return mixed, (1 - area) * y_BxK + area * y_BxK[perm]
