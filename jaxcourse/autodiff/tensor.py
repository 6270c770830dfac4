"""The scalar engine vectorized: reverse-mode autodiff over numpy arrays.

Same idea as `engine.Value`, but a node holds an array and, instead of one
local derivative per parent, a vector-Jacobian product (VJP) closure:
given g = d(loss)/d(out) it returns d(loss)/d(parent) for each parent,
without ever building the (huge) Jacobian. This is exactly what `jax.vjp`
does per primitive, and why reverse mode costs a small constant times the
forward pass.

Broadcasting needs one extra rule: if a parent was broadcast up to the
output's shape, its gradient is the output gradient summed back over the
broadcast axes (`_unbroadcast`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jaxcourse.autodiff.engine import topological_order


class Tensor:
    """A numpy array that records how it was computed."""

    __array_priority__ = 100  # so `ndarray * Tensor` calls Tensor.__rmul__

    def __init__(self, data, parents: tuple = (), vjp: Callable | None = None, op: str = ""):
        self.data = np.asarray(data)
        if not np.issubdtype(self.data.dtype, np.floating):
            self.data = self.data.astype(np.float32)
        self.grad: np.ndarray | None = None
        self.parents = parents
        self.vjp = vjp  # g -> tuple of parent gradients
        self.op = op

    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    T = property(lambda self: self.transpose())

    def __repr__(self) -> str:
        return f"Tensor(shape={self.shape}, dtype={self.data.dtype}, op={self.op!r})"

    # ---- elementwise binary ops (with broadcasting) ----
    def __add__(self, other) -> Tensor:
        other = _lift(other, self.data.dtype)
        return Tensor(self.data + other.data, (self, other),
                      lambda g: (_unbroadcast(g, self.shape), _unbroadcast(g, other.shape)), "+")

    def __mul__(self, other) -> Tensor:
        other = _lift(other, self.data.dtype)
        a, b = self.data, other.data
        return Tensor(a * b, (self, other),
                      lambda g: (_unbroadcast(g * b, self.shape), _unbroadcast(g * a, other.shape)), "*")

    def __truediv__(self, other) -> Tensor:
        other = _lift(other, self.data.dtype)
        a, b = self.data, other.data
        return Tensor(a / b, (self, other),
                      lambda g: (_unbroadcast(g / b, self.shape),
                                 _unbroadcast(-g * a / (b * b), other.shape)), "/")

    def __pow__(self, exponent: float) -> Tensor:
        a = self.data
        return Tensor(a**exponent, (self,), lambda g: (g * exponent * a ** (exponent - 1),), f"**{exponent}")

    def __neg__(self) -> Tensor:
        return Tensor(-self.data, (self,), lambda g: (-g,), "neg")

    def __sub__(self, other) -> Tensor:
        return self + (-_lift(other, self.data.dtype))

    __radd__ = __add__
    __rmul__ = __mul__

    def __rsub__(self, other) -> Tensor:
        return _lift(other, self.data.dtype) - self

    def __rtruediv__(self, other) -> Tensor:
        return _lift(other, self.data.dtype) / self

    # ---- linear algebra and shape ops ----
    def __matmul__(self, other) -> Tensor:
        """2-D matmul: (M,K)@(K,N). VJPs are the two transposed products."""
        other = _lift(other, self.data.dtype)
        a, b = self.data, other.data
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(f"matmul expects 2-D operands, got {a.shape} @ {b.shape}")
        return Tensor(a @ b, (self, other), lambda g: (g @ b.T, a.T @ g), "@")

    def transpose(self) -> Tensor:
        return Tensor(self.data.T, (self,), lambda g: (g.T,), "T")

    def reshape(self, *shape) -> Tensor:
        old = self.shape
        return Tensor(self.data.reshape(*shape), (self,), lambda g: (g.reshape(old),), "reshape")

    def sum(self, axis: int | None = None, keepdims: bool = False) -> Tensor:
        shape = self.shape

        def vjp(g):
            if axis is not None and not keepdims:
                g = np.expand_dims(g, axis)
            return (np.broadcast_to(g, shape).copy(),)

        return Tensor(self.data.sum(axis=axis, keepdims=keepdims), (self,), vjp, "sum")

    def mean(self, axis: int | None = None, keepdims: bool = False) -> Tensor:
        n = self.data.size if axis is None else self.shape[axis]
        return self.sum(axis, keepdims) / float(n)

    def max(self, axis: int, keepdims: bool = False) -> Tensor:
        """Gradient goes to the argmax (split evenly between ties, like jax)."""
        out = self.data.max(axis=axis, keepdims=True)
        mask = (self.data == out).astype(self.data.dtype)
        mask /= mask.sum(axis=axis, keepdims=True)
        value = out if keepdims else np.squeeze(out, axis)

        def vjp(g):
            return (mask * (g if keepdims else np.expand_dims(g, axis)),)

        return Tensor(value, (self,), vjp, "max")

    def take_along_last(self, index: np.ndarray) -> Tensor:
        """out[i] = self[i, index[i]] for a 2-D tensor; the gather behind cross-entropy."""
        rows = np.arange(self.shape[0])
        shape = self.shape

        def vjp(g):
            full = np.zeros(shape, self.data.dtype)
            np.add.at(full, (rows, index), g)  # scatter-add: the transpose of a gather
            return (full,)

        return Tensor(self.data[rows, index], (self,), vjp, "take")

    # ---- elementwise functions ----
    def exp(self) -> Tensor:
        out = np.exp(self.data)
        return Tensor(out, (self,), lambda g: (g * out,), "exp")

    def log(self) -> Tensor:
        a = self.data
        return Tensor(np.log(a), (self,), lambda g: (g / a,), "log")

    def tanh(self) -> Tensor:
        t = np.tanh(self.data)
        return Tensor(t, (self,), lambda g: (g * (1 - t * t),), "tanh")

    def relu(self) -> Tensor:
        mask = (self.data > 0).astype(self.data.dtype)
        return Tensor(self.data * mask, (self,), lambda g: (g * mask,), "relu")

    # ---- reverse mode ----
    def backward(self) -> None:
        """Fill `.grad` of every node reachable from this scalar output."""
        if self.data.size != 1:
            raise ValueError(f"backward() needs a scalar output, got shape {self.shape}")
        order = topological_order(self)
        for node in order:
            node.grad = np.zeros_like(node.data)
        self.grad = np.ones_like(self.data)
        for node in reversed(order):
            if node.vjp is None:
                continue
            for parent, g in zip(node.parents, node.vjp(node.grad)):
                parent.grad = parent.grad + g


def _lift(x, dtype) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(np.asarray(x, dtype=dtype))


def _unbroadcast(g: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum g down to `shape`, undoing numpy broadcasting."""
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g


# ---- composite functions, built only from the primitives above ----
def logsumexp(x: Tensor, axis: int = -1) -> Tensor:
    """Stable: subtract the (constant) row max before exponentiating."""
    axis = axis % x.ndim
    m = Tensor(x.data.max(axis=axis, keepdims=True))  # a constant: no gradient needed
    return ((x - m).exp().sum(axis=axis, keepdims=True).log() + m).reshape(
        *[s for i, s in enumerate(x.shape) if i != axis])


def cross_entropy(logits_BxC: Tensor, labels_B: np.ndarray) -> Tensor:
    """Mean over the batch of -log softmax(logits)[label]."""
    return (logsumexp(logits_BxC) - logits_BxC.take_along_last(labels_B)).mean()
