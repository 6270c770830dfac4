"""What a newcomer sees: --help and --help-config, `--name value`, progress labels, the results
table at the end of a run, and figures that carry a title and labelled axes."""
import importlib
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from jaxcourse import ch1, ch2, cli, config, figures, helptext, report  # noqa: E402
from jaxcourse.errors import ConfigError  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DIGITS = "configs/ch2_digits.py:smoke"


# ---------------- the command line ----------------

def test_space_separated_and_equals_flags_parse_the_same(tmp_path):
    eq = cli.parse("ch2", ch2.EXPERIMENTS, "ch2_digits",
                   [f"--config={DIGITS}", f"--workdir={tmp_path}", "--config.train.steps=7"])
    space = cli.parse("ch2", ch2.EXPERIMENTS, "ch2_digits",
                      ["--config", DIGITS, "--workdir", str(tmp_path), "--config.train.steps", "7"])
    assert eq[1:] == space[1:] == (tmp_path, "ch2_digits", "smoke")
    assert eq[0].to_dict() == space[0].to_dict() and space[0].train.steps == 7
    mixed = cli.parse("ch2", ch2.EXPERIMENTS, "ch2_digits",
                      ["--config.optimizer.lr", "0.5", f"--config={DIGITS}"])
    assert mixed[0].optimizer.lr == 0.5
    with pytest.raises(ConfigError, match="--workdir needs a value"):
        cli.parse("ch2", ch2.EXPERIMENTS, "ch2_digits", [f"--config={DIGITS}", "--workdir"])
    with pytest.raises(ConfigError, match="unknown flag --steps"):
        cli.parse("ch2", ch2.EXPERIMENTS, "ch2_digits", ["--steps", "3"])


def test_missing_value_exits_2_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ch2.main(["--config", DIGITS, "--workdir", str(tmp_path / "run"), "--config.train.steps"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "jaxcourse.ch2: error: --config.train.steps needs a value " \
                  "(--config.train.steps=VALUE or --config.train.steps VALUE)"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("chapter", cli.chapters())
def test_help_shows_every_experiment_with_a_command_that_loads(chapter, capsys):
    module = importlib.import_module(f"jaxcourse.{chapter}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    names = [name for name, _ in config.experiments(chapter)]
    assert names, chapter
    for name, doc in config.experiments(chapter):
        assert doc, f"configs/{name}.py has no docstring to describe it"
        command = f"python -m jaxcourse.{chapter} --config {name}:smoke"
        assert command in out
        cfg, _, _ = config.load(f"{name}:smoke")  # the example runs: its config loads and
        assert cfg.experiment in module.EXPERIMENTS  # names a function of this chapter
        assert f"{name} [{cfg.experiment}" in out
    for name, fn in module.EXPERIMENTS.items():
        line = next(line for line in out.splitlines() if line.startswith(f"  {name} "))
        assert fn.__doc__ and helptext._first_line(fn.__doc__) in line, name
    assert "exit codes" in out and "--name value both work" in out


def test_help_config_lists_every_key_with_its_default_and_meaning(capsys):
    from jaxcourse import ch4
    with pytest.raises(SystemExit) as exit_info:
        ch4.main(["--config", "ch4_gpt:smoke", "--config.train.steps", "3", "--help-config"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    cfg, _, _ = config.load("ch4_gpt:smoke")
    by_key = {line.split(" = ")[0].strip(): line for line in lines if " = " in line}
    assert set(by_key) == set(dict(helptext._leaves(cfg)))  # every key, nothing else
    assert "train.steps = 3 " in by_key["train.steps"]  # the value this command would run
    expected = {  # from the comments beside each definition, in four different files
        "model.context": "Longest sequence",  # GPTConfig (models/transformer.py)
        "model.n_kv_head": "MQA",
        "model.layer_pattern": "(hybrids)",  # a comment continued on the next line
        "train.steps_per_call": "K optimizer steps per compiled call",  # config.base_config
        "optimizer.frozen": "Regex over",  # a comment line above the key
        "checkpoint.every": "only at the end",
        "tokenizer.vocab_size": "BPE only",  # lm/configs.py
        "lm.grad_barriers": "CPU fusion workaround",
    }
    for key, words in expected.items():
        assert words in by_key[key], key
    assert "BPE only" not in by_key["tokenizer.name"]  # a line's comment names its key
    for key, line in by_key.items():  # every shared key has a meaning
        if key.split(".")[0] in ("train", "optimizer", "data", "checkpoint"):
            assert line.split("  ")[-1].strip() and "#" not in line, key


def test_help_config_matches_sections_to_their_dataclass():
    cfg, _, _ = config.load("ch2_digits:smoke")  # `model` here is a classifier, not a GPT
    table = helptext.meanings(config.resolve("ch2_digits"), cfg)
    assert helptext.meaning_of("model.context", table) == ""
    gpt, _, _ = config.load("ch3_gpt:smoke")
    table = helptext.meanings(config.resolve("ch3_gpt"), gpt)
    assert "Sliding-window" in helptext.meaning_of("model.window", table)


# ---------------- progress and the results table ----------------

def test_ch1_progress_names_lab_and_optimizer_and_ends_with_results(tmp_path, capsys):
    ch1.main(["--config=configs/ch1_backprop.py:smoke", f"--workdir={tmp_path}",
              "--config.labs=optimizers,debugging"])
    captured = capsys.readouterr()
    assert "--- lab optimizers / optimizer adam lr=0.003, 20 steps" in captured.out
    assert "[lab optimizers / optimizer sgd lr=0.1, 20 steps] step 20/20 loss" in captured.err
    assert "Invalid nan value" not in captured.out + captured.err  # the planted NaN, silenced
    tail = captured.out[captured.out.index("=== results of ch1 ch1_backprop:smoke"):]
    assert "opt_adam_eval_accuracy" in tail
    figures_line = next(line for line in tail.splitlines() if line.startswith("figures in"))
    assert "optimizers.png" in figures_line and "opt_sgd/curves.png" in figures_line


def test_results_table_pivots_groups_and_counts_what_it_leaves_out():
    metrics = {"final_loss": 1.25, "losses": [3.0, 2.0], "seconds_engine": 0.5,
               "dp/step_ms": 10.0, "dp/max_loss_diff": 1e-7,
               "tp/step_ms": 12.5, "tp/max_loss_diff": 2e-7, "note": "x" * 80}
    lines, left_out = report.results_table(metrics)
    assert lines[0].split() == ["final_loss", "1.25"]
    assert lines[1].split() == ["step_ms", "max_loss_diff"]  # a row per layout
    assert lines[2].split() == ["dp", "10", "1e-07"] and lines[3].split()[0] == "tp"
    assert left_out == 3  # the list, the lab timing and the long string
    many = {f"m{i}": float(i) for i in range(30)}
    lines, left_out = report.results_table(many, max_rows=16)
    assert len(lines) == 16 and left_out == 14


# ---------------- figures ----------------

def test_figure_check_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCOURSE_STRICT_FIGURES", "1")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert figures.problems(fig) == ["axes 0: no title and no figure suptitle",
                                     "axes 0: no x label", "axes 0: no y label"]
    with pytest.raises(figures.FigureError, match="bare.png: axes 0: no title"):
        figures.save_figure(fig, tmp_path / "bare.png")
    assert not (tmp_path / "bare.png").exists()
    # A grid: a suptitle covers the panels, a label on one axes of a column / row covers it;
    # tiny tick labels do not pass.
    fig, axes = plt.subplots(2, 2)
    fig.suptitle("grid")
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes[0, 0].set_ylabel("loss")
    axes[0, 0].set_yticks([0, 1], ["a", "b"], fontsize=4)
    assert figures.problems(fig) == ["axes 0: tick labels of 4 pt (< 6)",
                                     "axes 2: no y label", "axes 3: no y label"]
    fig.supylabel("loss")
    axes[0, 0].set_yticks([0, 1], ["a", "b"], fontsize=8)
    assert figures.problems(fig) == []
    with figures.run("ch0 ch0_demo:smoke") as saved:
        figures.save_figure(fig, tmp_path / "grid.png")
    assert saved == [tmp_path / "grid.png"] and fig.get_suptitle() == "grid [ch0 ch0_demo:smoke]"
    monkeypatch.setenv("JAXCOURSE_STRICT_FIGURES", "0")
    fig, _ = plt.subplots()
    with pytest.warns(UserWarning, match="no title"):
        figures.save_figure(fig, tmp_path / "warned.png")
    assert (tmp_path / "warned.png").exists()


def test_every_figure_is_saved_through_the_checked_helper():
    """The chapter tests run with JAXCOURSE_STRICT_FIGURES=1 (conftest.py), so each figure a
    smoke run draws is checked; this makes sure no figure bypasses the check."""
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "jaxcourse").rglob("*.py")
                 if p.name != "figures.py" and ".savefig(" in p.read_text()]
    assert offenders == []
