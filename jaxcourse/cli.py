"""The command line every chapter shares.

    python -m jaxcourse.chN [--config=NAME[:preset]] [--config.key=value ...] [--workdir=DIR] [--no-cache]
    python -m jaxcourse.chN --help          experiments, an example command for each
    python -m jaxcourse.chN [--config=NAME] --help-config   every key: default and meaning
    jaxcourse chN ...       (the same, as the installed console command)

NAME is a config file's path or its short name (`ch4_gpt`, see jaxcourse/config.py). Before
jax starts, the run takes the machine's defaults (jaxcourse/machine.py): CPU cores as devices
for a data mesh, and a persistent compilation cache (`--no-cache` or JAXCOURSE_CACHE=off).
`--name value` works as well as `--name=value`. Bad arguments and out-of-range values exit 2 with one line naming the problem, before
anything is written; so does a workdir another run holds (its lock names the pid). A
`UserError` raised while running exits 1 with one line; SIGINT / SIGTERM save a checkpoint
and exit 130 / 143 (see train/loop.py).
"""
import contextlib
import errno
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
from jaxcourse import figures, helptext, machine, report
from jaxcourse import workdir as workdir_lib
from jaxcourse.parallel import distributed
from jaxcourse.errors import ConfigError, UserError

Experiment = Callable[..., dict]
# A full or failing disk while writing outputs is the user's to fix: one line, not a traceback.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES}


VALUE_FLAGS = ("--config", "--workdir")  # and every --config.KEY


def _pairs(argv: list[str]) -> list[tuple[str, str]]:
    """(flag, value) pairs: `--name=value` and `--name value` both work."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unrecognized argument {arg!r} "
                              "(expected --name=value or --name value)")
        name, eq, value = arg.partition("=")
        if not eq:
            if name not in VALUE_FLAGS and not name.startswith("--config."):
                raise ConfigError(f"unknown flag {name}")
            if i + 1 == len(argv):
                raise ConfigError(f"{name} needs a value ({name}=VALUE or {name} VALUE)")
            i += 1
            value = argv[i]
        out.append((name, value))
        i += 1
    return out


def parse(chapter: str, experiments: dict, default_config: str, argv: list[str]):
    """Returns (cfg, workdir, stem, preset); raises ConfigError on any bad argument."""
    spec = str(config_lib.CONFIG_DIR / f"{default_config}.py")
    workdir, overrides = None, []
    if any(a in ("-h", "--help", "--helpfull") for a in argv):
        print(helptext.usage(chapter, experiments, default_config))
        raise SystemExit(0)
    show_keys = "--help-config" in argv
    for name, value in _pairs([a for a in argv if a != "--help-config"]):
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
    if show_keys:
        print(helptext.config_keys(chapter, cfg, config_lib.resolve(spec.partition(":")[0]),
                                   f"{stem}:{preset}"))
        raise SystemExit(0)
    if cfg.experiment not in experiments:
        raise ConfigError(
            f"config key experiment={cfg.experiment!r} is not one of {', '.join(experiments)}")
    config_lib.check_ranges(cfg)
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
        # Process 0 holds the workdir's lock for the whole run; config.json waits until the
        # run's checkpoints (if any) are known to fit this config.
        if main_process:
            lock = workdir_lib.locked(workdir)
        else:
            lock = contextlib.nullcontext()
            workdir.mkdir(parents=True, exist_ok=True)

        def write_config():
            if main_process:
                write_json(workdir / "config.json", cfg.to_dict())

        with lock, workdir_lib.write_when_resumable(workdir, write_config):
            start = time.time()
            with figures.run(f"{chapter} {stem}:{preset}") as saved:  # stamped on every PNG
                metrics = experiments[cfg.experiment](cfg, workdir)
            summary = {
                "chapter": chapter, "experiment": stem, "preset": preset,
                "wall_seconds": round(time.time() - start, 2), "metrics": metrics,
                "devices": jax.device_count(), "config": cfg.to_dict(),
            }
            if main_process:
                write_json(workdir / "summary.json", summary)
                print(f"{prog}: wrote {workdir}/summary.json")
                print(report.results_summary(summary, workdir, saved), flush=True)
            else:
                print(f"{prog}: process {jax.process_index()} finished")
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code)
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        print(f"{prog}: error: cannot write in {workdir}: {e.strerror} "
              f"({errno.errorcode[e.errno]})", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:  # outside the loop, which saves and exits on its own.
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130)
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
              "       jaxcourse chN --help   lists a chapter's experiments, a command for each\n"
              "       jaxcourse chN [--config NAME] --help-config   lists a config's keys")
        raise SystemExit(0 if argv else 2)
    if argv[0] not in names:
        print(f"jaxcourse: error: unknown chapter {argv[0]!r}; choose one of {', '.join(names)}",
              file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(f"jaxcourse.{argv[0]}").main(argv[1:])
