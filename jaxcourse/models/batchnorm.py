"""Batch normalization written out (Ioffe & Szegedy 2015, Algorithm 1 and section 3.1).

Train mode normalizes with the batch's own mean and (biased) variance and updates running
averages in the `batch_stats` collection; eval mode uses the running averages. Same
variables, names and update rule as `flax.linen.BatchNorm`, so the two are interchangeable.
"""
import flax.linen as nn
import jax.numpy as jnp


class BatchNorm(nn.Module):
    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        use_ra = nn.merge_param("use_running_average", self.use_running_average,
                                use_running_average)
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))  # every axis but channels.
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        if use_ra:
            mean, var = ra_mean.value, ra_var.value
        else:
            x32 = x.astype(jnp.float32)
            mean = x32.mean(axes)
            var = jnp.maximum((x32 * x32).mean(axes) - mean * mean, 0.0)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * var
        y = (x - mean) * jnp.reciprocal(jnp.sqrt(var + self.epsilon))
        return (y * scale + bias).astype(x.dtype)
