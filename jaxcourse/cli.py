"""The command line every chapter shares.

    python -m jaxcourse.chN [--config=NAME[:preset]] [--config.key=value ...] [--workdir=DIR] [--no-cache]
    jaxcourse chN ...       (the same, as the installed console command)

NAME is a config file's path or its short name (`ch4_gpt`, see jaxcourse/config.py). Before
jax starts, the run takes the machine's defaults (jaxcourse/machine.py): CPU cores as devices
for a data mesh, and a persistent compilation cache (`--no-cache` or JAXCOURSE_CACHE=off).
Bad arguments exit 2 with one line naming the problem, before anything is written. A
`UserError` raised while running exits 1 with one line.
"""
import importlib
import json
import pathlib
import pkgutil
import sys
import time
from typing import Callable

import jax
import numpy as np

import jaxcourse
from jaxcourse import config as config_lib
from jaxcourse import machine
from jaxcourse.parallel import distributed
from jaxcourse.errors import ConfigError, UserError

Experiment = Callable[..., dict]


def _usage(chapter: str, experiments: dict, default_config: str) -> str:
    lines = [
        f"usage: python -m jaxcourse.{chapter} [--config=NAME[:preset]]"
        " [--config.key=value ...] [--workdir=DIR] [--no-cache]",
        "",
        "NAME: a config file's path, or a short name below (files in configs/)",
        f"default: {default_config}:cpu; presets: {', '.join(config_lib.PRESETS)}",
        "experiments (config files):",
    ]
    for name, doc in config_lib.experiments(chapter):
        lines.append(f"  {name:32s} {doc}")
    lines.append(f"experiment functions: {', '.join(experiments)}")
    return "\n".join(lines)


def parse(chapter: str, experiments: dict, default_config: str, argv: list[str]):
    """Returns (cfg, workdir, stem, preset); raises ConfigError on any bad argument."""
    spec = str(config_lib.CONFIG_DIR / f"{default_config}.py")
    workdir, overrides = None, []
    for arg in argv:
        if arg in ("-h", "--help", "--helpfull"):
            print(_usage(chapter, experiments, default_config))
            raise SystemExit(0)
        name, eq, value = arg.partition("=")
        if not eq or not name.startswith("--"):
            raise ConfigError(f"unrecognized argument {arg!r} (expected --name=value)")
        if name == "--config":
            spec = value
        elif name == "--workdir":
            workdir = value
        elif name.startswith("--config."):
            overrides.append((name[len("--config."):], value))
        else:
            raise ConfigError(f"unknown flag {name}")
    cfg, stem, preset = config_lib.load(spec)
    for key, value in overrides:
        config_lib.override(cfg, key, value)
    if cfg.experiment not in experiments:
        raise ConfigError(
            f"config key experiment={cfg.experiment!r} is not one of {', '.join(experiments)}")
    if workdir is None:
        workdir = pathlib.Path("runs") / chapter / f"{stem.removeprefix(chapter + '_')}-{preset}"
    cfg.lock()
    return cfg, pathlib.Path(workdir), stem, preset


def _plain(x):
    """JSON-friendly copy of metrics (numpy and jax scalars become floats)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (str, bool, int)) or x is None:
        return x
    arr = np.asarray(x)
    if arr.ndim == 0:
        value = arr.item()
        return None if isinstance(value, float) and not np.isfinite(value) else value
    return [_plain(v) for v in arr.tolist()]


def write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(_plain(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def run_chapter(chapter: str, experiments: dict[str, Experiment], default_config: str,
                argv: list[str] | None = None) -> dict:
    """Parses arguments, runs the chosen experiment, writes config.json and summary.json."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = f"jaxcourse.{chapter}"
    cache = "--no-cache" not in argv
    argv = [a for a in argv if a != "--no-cache"]
    try:
        cfg, workdir, stem, preset = parse(chapter, experiments, default_config, argv)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    try:
        machine.use_cpu_cores(cfg)  # before anything starts a jax backend.
        cache_dir = machine.compilation_cache(cache)
        distributed.initialize()  # a no-op unless a launcher started several processes.
        main_process = jax.process_index() == 0  # one process writes config and summary.
        if main_process:
            print(f"{prog}: {jax.device_count()} {jax.default_backend()} devices, "
                  f"compilation cache {cache_dir or 'off'}")
        workdir.mkdir(parents=True, exist_ok=True)
        if main_process:
            write_json(workdir / "config.json", cfg.to_dict())
        start = time.time()
        metrics = experiments[cfg.experiment](cfg, workdir)
        summary = {
            "chapter": chapter, "experiment": stem, "preset": preset,
            "wall_seconds": round(time.time() - start, 2), "metrics": metrics,
            "devices": jax.device_count(), "config": cfg.to_dict(),
        }
        if main_process:
            write_json(workdir / "summary.json", summary)
            print(f"{prog}: wrote {workdir}/summary.json")
        else:
            print(f"{prog}: process {jax.process_index()} finished")
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, ConfigError) else 1)
    return summary


def chapters() -> list[str]:
    """The chapter modules (ch1, ch2, ...) in numeric order."""
    names = [m.name for m in pkgutil.iter_modules(jaxcourse.__path__)
             if m.name.startswith("ch") and m.name[2:].isdigit()]
    return sorted(names, key=lambda n: int(n[2:]))


def main(argv: list[str] | None = None) -> None:
    """The `jaxcourse` console command: `jaxcourse ch4 [chapter arguments]`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # jaxcourse serve ...: python -m jaxcourse.serve ...
        return importlib.import_module("jaxcourse.serve.__main__").main(argv[1:])
    names = chapters()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: jaxcourse {{{','.join(names)}}} [--config=NAME[:preset]] ...\n"
              "       jaxcourse chN --help   lists a chapter's experiments")
        raise SystemExit(0 if argv else 2)
    if argv[0] not in names:
        print(f"jaxcourse: error: unknown chapter {argv[0]!r}; choose one of {', '.join(names)}",
              file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(f"jaxcourse.{argv[0]}").main(argv[1:])
