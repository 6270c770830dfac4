"""Chapter 1's library: two hand-written autodiff engines and the labs built around them.

engine.py (scalar Value), tensor.py (numpy Tensor), checks.py (both vs jax.grad),
modes.py (jvp / vjp, jacfwd vs jacrev), gradcheck.py, lse.py (custom_vjp log-sum-exp),
mlp_backprop.py (hand-written backprop), debugging.py (NaN hunting), charlm_lab.py,
plots.py, runs.py. `jaxcourse/ch1.py` runs them; `chapters/ch01_autodiff.md` explains them.
"""
