"""A scalar reverse-mode autodiff engine (micrograd-style).

Every `Value` remembers the values it was computed from (`parents`) and the
local partial derivatives d(self)/d(parent) (`local_grads`), evaluated during
the forward pass. `backward()` then walks the graph in reverse topological
order and applies the chain rule:

    parent.grad += local_grad * child.grad

That single line is all of backpropagation; everything else is bookkeeping.
Gradients accumulate (+=) because a value used twice receives a contribution
along each path (the multivariate chain rule sums over paths).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence


class Value:
    """A Python float plus the graph edges needed to differentiate it."""

    __slots__ = ("data", "grad", "parents", "local_grads", "op")

    def __init__(self, data: float, parents: tuple = (), local_grads: tuple = (), op: str = ""):
        self.data = float(data)
        self.grad = 0.0
        self.parents = parents
        self.local_grads = local_grads
        self.op = op  # only for printing / drawing the graph

    def __repr__(self) -> str:
        return f"Value(data={self.data:.6g}, grad={self.grad:.6g}, op={self.op!r})"

    # ---- arithmetic: each op returns a node with its local derivatives ----
    def __add__(self, other) -> Value:
        other = _lift(other)
        return Value(self.data + other.data, (self, other), (1.0, 1.0), "+")

    def __mul__(self, other) -> Value:
        other = _lift(other)
        return Value(self.data * other.data, (self, other), (other.data, self.data), "*")

    def __pow__(self, exponent: float) -> Value:
        if isinstance(exponent, Value):
            raise TypeError("Value ** Value is not supported; use exp(b * log(a))")
        out = self.data**exponent
        return Value(out, (self,), (exponent * self.data ** (exponent - 1),), f"**{exponent}")

    def __neg__(self) -> Value:
        return self * -1.0

    def __sub__(self, other) -> Value:
        return self + (-_lift(other))

    def __truediv__(self, other) -> Value:
        return self * _lift(other) ** -1.0

    __radd__ = __add__
    __rmul__ = __mul__

    def __rsub__(self, other) -> Value:
        return _lift(other) - self

    def __rtruediv__(self, other) -> Value:
        return _lift(other) / self

    # ---- elementary functions ----
    def exp(self) -> Value:
        out = math.exp(self.data)
        return Value(out, (self,), (out,), "exp")  # d/dx e^x = e^x: reuse the output

    def log(self) -> Value:
        if self.data <= 0:
            raise ValueError(f"log of non-positive value {self.data}")
        return Value(math.log(self.data), (self,), (1.0 / self.data,), "log")

    def tanh(self) -> Value:
        t = math.tanh(self.data)
        return Value(t, (self,), (1.0 - t * t,), "tanh")

    def relu(self) -> Value:
        # Subgradient 0 at the kink, the same convention as jax.nn.relu.
        return Value(max(self.data, 0.0), (self,), (float(self.data > 0),), "relu")

    def sigmoid(self) -> Value:
        s = 1.0 / (1.0 + math.exp(-self.data))
        return Value(s, (self,), (s * (1.0 - s),), "sigmoid")

    # ---- reverse mode ----
    def backward(self) -> None:
        """Set `.grad` of every node reachable from self to d(self)/d(node)."""
        order = topological_order(self)
        for node in order:
            node.grad = 0.0
        self.grad = 1.0
        for node in reversed(order):  # children before parents
            for parent, local in zip(node.parents, node.local_grads):
                parent.grad += local * node.grad


def _lift(x) -> Value:
    return x if isinstance(x, Value) else Value(x)


def topological_order(root: Value) -> list[Value]:
    """Nodes reachable from root, each after all of its parents.

    Iterative depth-first search, so deep graphs (long sums) do not hit
    Python's recursion limit.
    """
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        node, parents_done = stack.pop()
        if parents_done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((p, False) for p in node.parents if id(p) not in seen)
    return order


def grad(f: Callable[..., Value]) -> Callable[..., list[float]]:
    """`jax.grad` for the scalar engine: d f / d each positional float argument."""

    def grad_f(*args: float) -> list[float]:
        inputs = [Value(a) for a in args]
        f(*inputs).backward()
        return [v.grad for v in inputs]

    return grad_f


# ---- a tiny neural network built only from Values (micrograd's MLP) ----
def linear(x: Sequence[Value], w: Sequence[Sequence[Value]], b: Sequence[Value]) -> list[Value]:
    """y_j = sum_i x_i w[i][j] + b_j  (w is in_dim x out_dim, like a jnp weight)."""
    return [sum((xi * w[i][j] for i, xi in enumerate(x)), b[j]) for j in range(len(b))]


def mlp_forward(x: Sequence[Value], layers: Iterable[tuple]) -> list[Value]:
    """tanh after every layer except the last, which returns raw outputs."""
    layers = list(layers)
    h = list(x)
    for k, (w, b) in enumerate(layers):
        h = linear(h, w, b)
        if k < len(layers) - 1:
            h = [v.tanh() for v in h]
    return h


def to_values(array) -> list:
    """Nested lists of Values with the same shape as a (numpy) array."""
    if getattr(array, "ndim", 0) == 0:
        return Value(float(array))
    return [to_values(a) for a in array]


def grads_of(values) -> list:
    """The `.grad` fields of a nested list of Values, same nesting."""
    if isinstance(values, Value):
        return values.grad
    return [grads_of(v) for v in values]
