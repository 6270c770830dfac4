"""`train.profile_steps="a:b"`: a jax.profiler trace of the compiled calls that run steps a..b.

The trace (TensorBoard's profile plugin, or Perfetto) goes to `workdir/profile/`. A trace
starts before the first call that runs a step in [a, b) and stops, after the device has
finished, at the end of the call that reaches b; with K steps per call the traced steps round
out to whole calls. Start past the first call (a >= steps_per_call) to leave compilation out.
"""
from __future__ import annotations

import pathlib
import sys

import jax

from jaxcourse.errors import ConfigError


def parse_steps(spec: str) -> tuple[int, int] | None:
    """"a:b" -> (a, b) with 0 <= a < b; "" -> None; anything else is a ConfigError."""
    if not spec:
        return None
    first, sep, last = str(spec).partition(":")
    try:
        a, b = int(first), int(last)
    except ValueError:
        a = b = -1
    if not sep or a < 0 or b <= a:
        raise ConfigError(f"config key train.profile_steps={spec!r} must be 'a:b' with "
                          "0 <= a < b (steps), or '' for no profile")
    return a, b


class StepProfiler:
    """Starts and stops one trace around the calls of the configured step range."""

    def __init__(self, spec: str, workdir: pathlib.Path, enabled: bool = True):
        self.range = parse_steps(spec) if enabled else None
        self.directory = pathlib.Path(workdir) / "profile"
        self.active = False

    def before(self, start: int, end: int) -> None:
        """Called before the call that runs steps start..end."""
        if self.range and not self.active and start < self.range[1] and end > self.range[0]:
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, end: int, state) -> None:
        """Called after that call was dispatched; stops once step b is reached."""
        if self.active and end >= self.range[1]:
            self.stop(state)

    def stop(self, state=None) -> None:
        if not self.active:
            return
        if state is not None:
            jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.active = False
        print(f"profile of steps {self.range[0]}:{self.range[1]} in {self.directory}",
              file=sys.stderr)
