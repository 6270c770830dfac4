"""`--help` and `--help-config` of every chapter, generated from the config files and code.

Nothing here is written by hand per chapter: an experiment's description is its config
file's docstring, its example command is built from the file's name, an experiment
function's description is its docstring, and a config key's meaning is the `# comment` at
the end of the line that defines it (in the config file, in `jaxcourse/config.py`'s base
config, in a library config builder, or in a model's config dataclass such as `GPTConfig`).
A key whose definition carries no comment shows its default only.
"""
from __future__ import annotations

import ast
import io
import pathlib
import sys
import tokenize

import ml_collections

from jaxcourse import config as config_lib

_PACKAGE = pathlib.Path(__file__).resolve().parent
# Where config keys are defined (the experiment's own file is read first), and where the
# dataclasses are that config sections are built into (GPTConfig, PPOConfig, ...).
KEY_SOURCES = ("config.py", "*/configs.py")
CLASS_SOURCES = ("models/*.py", "rl/*.py", "vision/*.py", "diffusion/*.py", "parallel/*.py")

PRESET_NOTES = {"smoke": "seconds, what the tests run", "cpu": "the default, minutes on a laptop CPU",
                "gpu": "full scale, for accelerators"}


def _first_line(doc: str | None) -> str:
    """The first paragraph of a docstring on one line, without a "Chapter N: " prefix."""
    line = " ".join(s.strip() for s in (doc or "").strip().split("\n\n")[0].splitlines())
    return line.split(": ", 1)[1] if line.startswith("Chapter ") and ": " in line else line


def _experiment_of(path: pathlib.Path) -> str:
    try:
        return config_lib.load(f"{path}:cpu")[0].get("experiment", "?")
    except Exception as e:  # noqa: BLE001 (help must list the other files anyway)
        return f"? ({e})"


def usage(chapter: str, experiments: dict, default_config: str) -> str:
    """The chapter's --help: what to run and how, one runnable command per experiment."""
    module = sys.modules.get(f"jaxcourse.{chapter}")
    main = sys.modules.get("__main__")  # `python -m jaxcourse.chN` runs the module as __main__
    if module is None and getattr(main.__spec__, "name", "") == f"jaxcourse.{chapter}":
        module = main
    prog = f"python -m jaxcourse.{chapter}"
    lines = [
        f"usage: {prog} [--config NAME[:PRESET]] [--config.KEY VALUE ...] [--workdir DIR]"
        " [--no-cache] [--help-config]",
        "",
        ((module.__doc__ or "").strip().splitlines() or [""])[0] if module else "",
        "",
        "An experiment is a config file (configs/<name>.py). Its `experiment` key names the",
        "experiment function of this chapter that runs it; choose what runs by choosing the",
        f"file. `{prog}` alone runs {default_config}:cpu.",
        "",
        "experiments (config name, the function it runs, what it does, a command that runs it):",
    ]
    used = set()
    for name, doc in config_lib.experiments(chapter):
        fn = _experiment_of(config_lib.CONFIG_DIR / f"{name}.py")
        used.add(fn)
        default = ", the default" if name == default_config else ""
        lines += [f"  {name} [{fn}{default}]: {_first_line(doc)}",
                  f"      e.g. {prog} --config {name}:smoke   (seconds; :cpu for the real run)"]
    lines += ["", "experiment functions (config key `experiment`):"]
    for name, fn in experiments.items():
        note = "" if name in used else f" (no config of its own: --config.experiment={name})"
        lines.append(f"  {name:12s} {_first_line(fn.__doc__)}{note}")
    lines += [
        "",
        "presets (NAME:PRESET): " + "; ".join(f"{p} ({PRESET_NOTES.get(p, '')})"
                                           for p in config_lib.PRESETS),
        "",
        "options (--name=value and --name value both work):",
        "  --config NAME[:PRESET]  a config file's path or a short name above (default "
        f"{default_config}:cpu)",
        "  --config.KEY VALUE      override one key, type-checked (--config.train.steps 50)",
        "  --help-config           list every key of the chosen config: default and meaning",
        f"  --workdir DIR           where outputs go (default runs/{chapter}/<name>-<preset>)",
        "  --no-cache              no persistent compilation cache (or JAXCOURSE_CACHE=off)",
        "",
        "exit codes: 0 done; 2 bad argument or config value (nothing written);",
        "            1 a problem found while running (missing or bad data file, ...)",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Meanings of config keys, from the comments beside their definitions.

def _comments(text: str) -> tuple[dict[int, str], dict[int, str]]:
    """(trailing comments by line, standalone comment lines by line); a standalone line
    right below a trailing comment, at its column, is folded into it (a continuation)."""
    trailing, alone, column, code_lines = {}, {}, {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            (trailing if row in code_lines else alone)[row] = tok.string.lstrip("#").strip()
            column[row] = col
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER, tokenize.COMMENT):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    for row in sorted(trailing):
        below = row + 1
        while below in alone and column[below] == column[row]:
            trailing[row] += " " + alone.pop(below)
            below += 1
    return trailing, alone


def _attribute_path(node) -> tuple[str, ...] | None:
    """cfg.a.b -> ("a", "b"); None for anything but an attribute chain on a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return tuple(reversed(parts)) if isinstance(node, ast.Name) and parts else None


def _key_lines(tree) -> tuple[list, list]:
    """(dotted path as far as the source shows it, line) of every config key it defines:
    string keys of dict literals (nested dicts extend the path), then `cfg.a.b = ...`."""
    out, attrs = [], []

    def walk_dict(d: ast.Dict, prefix: tuple[str, ...]):
        for k, v in zip(d.keys, d.values):
            if isinstance(k, ast.Constant) and isinstance(k.value, str):
                if isinstance(v, ast.Dict):
                    walk_dict(v, prefix + (k.value,))
                else:
                    out.append((prefix + (k.value,), k.lineno))

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            path = _attribute_path(node.targets[0])
            if isinstance(node.value, ast.Dict):
                walk_dict(node.value, path or ())
            elif path:
                attrs.append((path, node.lineno))
        elif isinstance(node, ast.Call):  # ml_collections.ConfigDict({...}) of the base config
            for a in node.args:
                if isinstance(a, ast.Dict):
                    walk_dict(a, ())
    return out, attrs


def _field_lines(tree) -> dict[str, list[tuple[str, int]]]:
    """{class name: [(field, line), ...]} of the annotated fields of every class."""
    return {node.name: [(i.target.id, i.lineno) for i in node.body
                        if isinstance(i, ast.AnnAssign) and isinstance(i.target, ast.Name)]
            for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


def _attach(keys: list[tuple[tuple[str, ...], int]], trailing, alone, lead: bool = True):
    """(path, meaning) for every key, "" where it has no comment: the trailing comment of
    its line (when a line defines several keys, the key it starts with, `every=0: ...`, else
    the last key), after any standalone comment lines right above it (with `lead`)."""
    by_line: dict[int, list[tuple[str, ...]]] = {}
    for path, line in keys:
        by_line.setdefault(line, []).append(path)
    out = []
    for line, paths in sorted(by_line.items()):
        parts, above = [], line - 1
        while lead and above in alone:
            parts.insert(0, alone[above])
            above -= 1
        described = paths
        if line in trailing:
            parts.append(trailing[line])
            if len(paths) > 1:
                named = [p for p in paths if trailing[line].startswith((f"{p[-1]}:", f"{p[-1]}="))]
                described = named or paths[-1:]
        text = " ".join(parts)
        out += [(p, text if p in described else "") for p in paths]
    return out


def source_meanings(text: str) -> tuple[list, list, dict[str, list]]:
    """From the comments beside the definitions of one source: [(path, meaning)] of its dict
    literal keys, of its `cfg.a.b = ...` assignments, and {class: [(field, meaning)]}."""
    tree = ast.parse(text)
    trailing, alone = _comments(text)
    dict_keys, attr_keys = _key_lines(tree)
    classes = {name: [(p[0], m) for p, m in _attach([((f,), line) for f, line in fields],
                                                   trailing, alone)]
               for name, fields in _field_lines(tree).items()}
    # An assignment's comment lines above it often speak of a whole block: trailing only.
    return (_attach(dict_keys, trailing, alone), _attach(attr_keys, trailing, alone, False),
            classes)


def _sections(cfg, prefix: tuple[str, ...] = ()):
    """(path, leaf key names) of every section of a config."""
    leaves = [k for k, v in cfg.items() if not isinstance(v, ml_collections.ConfigDict)]
    yield prefix, leaves
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from _sections(v, prefix + (k,))


def _agreed(definitions: list[tuple[tuple[str, ...], str]]) -> list[tuple[tuple[str, ...], str]]:
    """The library's meaning of a path only where all its definitions agree: `lm.max_chars`
    of one builder says "per domain", of another nothing, so neither speaks for both."""
    by_path: dict[tuple[str, ...], set[str]] = {}
    for path, text in definitions:
        by_path.setdefault(path, set()).add(text)
    return [(p, texts.pop()) for p, texts in by_path.items() if len(texts) == 1 and "" not in texts]


def _builder_meanings(text: str, called: set[str]) -> list[tuple[tuple[str, ...], str]]:
    """The commented keys of the builder functions a config file calls (pretrain_config):
    they speak for that config even where another builder's same key says something else."""
    tree = ast.parse(text)
    trailing, alone = _comments(text)
    out = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in called:
            d, a = _key_lines(node)
            out += [(p, m) for p, m in _attach(d, trailing, alone)
                    + _attach(a, trailing, alone, False) if m]
    return out


def meanings(config_file: pathlib.Path, cfg) -> list[tuple[tuple[str, ...], str]]:
    """Every (key path, meaning) pair for `cfg`: its own file's first, then the library's
    config builders' (dict keys; assignments only for paths no dict defines), then the fields
    of the dataclass a section is built into (a class whose fields hold at least 80% of the
    section's keys: GPTConfig for a GPT's `model`, MoEOptions for `model.moe`, ...)."""
    own_text = pathlib.Path(config_file).read_text()
    own_dicts, own_attrs, classes = source_meanings(own_text)
    out = [(p, m) for p, m in own_dicts + own_attrs if m]
    called = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
              for n in ast.walk(ast.parse(own_text)) if isinstance(n, ast.Call)}
    dicts, attrs = [], []
    for pattern in KEY_SOURCES + CLASS_SOURCES:
        for f in sorted(_PACKAGE.glob(pattern)):
            try:
                text = f.read_text()
                d, a, c = source_meanings(text)
            except (OSError, SyntaxError, UnicodeDecodeError):
                continue
            classes.update(c)
            if pattern in KEY_SOURCES:
                dicts, attrs = dicts + d, attrs + a
                out += _builder_meanings(text, called)
    in_dicts = {p for p, _ in dicts}
    out += _agreed(dicts + [(p, m) for p, m in attrs if p not in in_dicts])
    for path, leaves in _sections(cfg):
        if len(leaves) < 2:
            continue
        for fields in classes.values():
            names = {f for f, _ in fields}
            if len(names & set(leaves)) >= 0.8 * len(leaves):
                out += [(path + (f,), m) for f, m in fields if m]
                break
    return out


def meaning_of(key: str, table: list[tuple[tuple[str, ...], str]]) -> str:
    """The entry whose path is the longest suffix of `key` (the first one wins a tie)."""
    parts = tuple(key.split("."))
    best, best_len = "", 0
    for path, text in table:
        n = len(path)
        if n > best_len and parts[-n:] == path:
            best, best_len = text, n
    return best


def _leaves(cfg, prefix: str = ""):
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, name + ".")
        else:
            yield name, value


def config_keys(chapter: str, cfg, config_file: pathlib.Path, name: str) -> str:
    """--help-config: every key of the resolved config, its value and its meaning."""
    table = meanings(config_file, cfg)
    rows = [(key, repr(value), meaning_of(key, table)) for key, value in _leaves(cfg)]
    width = max(len(k) + len(v) for k, v, _ in rows) + 3
    lines = [f"config keys of {name} ({config_file}); set one with --config.KEY VALUE", ""]
    for key, value, meaning in rows:
        lines.append(f"  {f'{key} = {value}':{width}s} {meaning}".rstrip())
    return "\n".join(lines)
