"""Metrics as JSON lines plus PNG curves; optionally TensorBoard event files (tensorboardX, no
TensorFlow) and Weights & Biases. The JSON lines are the source of truth: the other two are
copies for viewing."""
import json
import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxcourse.errors import UserError  # noqa: E402
from jaxcourse.figures import save_figure  # noqa: E402

# y-axis labels (with units) of the metrics the loop logs; other names label themselves.
AXIS_LABELS = {"loss": "loss", "accuracy": "accuracy (fraction)",
               "grad_norm": "gradient L2 norm", "lr": "learning rate",
               "perplexity": "perplexity", "return": "episode return"}


class MetricsWriter:
    """Appends `{"step": s, name: value, ...}` rows to `workdir/metrics.jsonl`.

    With `resume_step`, rows after that step (written by a run that died before its
    next checkpoint) are dropped, so a resumed run's log reads like a straight run's.
    `tensorboard=True` also writes every row to event files in `workdir/tensorboard`
    (`tensorboard --logdir <workdir>`); `wandb_project` also logs to that W&B project
    (the `wandb` package must be installed; `config` becomes the run's config).
    """

    def __init__(self, workdir: pathlib.Path, resume_step: int | None = None,
                 tensorboard: bool = False, wandb_project: str = "", config: dict | None = None):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.workdir = pathlib.Path(workdir)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in self.rows() if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.tensorboard = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415

            self.tensorboard = SummaryWriter(str(self.workdir / "tensorboard"))
        self.wandb = _wandb_run(wandb_project, self.workdir, config) if wandb_project else None

    def write(self, step: int, metrics: dict) -> None:
        row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        values = {k: v for k, v in row.items() if k != "step" and math.isfinite(v)}
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, int(step))
        if self.wandb is not None:
            self.wandb.log(values, step=int(step))

    def close(self) -> None:
        """Flushes and closes the TensorBoard and W&B copies (the JSON lines need nothing)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def plot(self, filename: str = "curves.png", xlabel: str = "step") -> pathlib.Path:
        """One panel per metric name, train and eval of the same name sharing a panel."""
        series: dict[str, dict[str, list]] = {}
        for row in self.rows():
            for key, value in row.items():
                if key == "step" or not math.isfinite(value):
                    continue
                split, _, name = key.rpartition("/")
                series.setdefault(name, {}).setdefault(split or "train", []).append(
                    (row["step"], value))
        names = sorted(series)
        cols = min(3, max(len(names), 1))
        rows = max(1, math.ceil(len(names) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            for split, points in sorted(series[name].items()):
                steps, values = zip(*points)
                ax.plot(steps, values, label=split, marker="." if len(steps) < 30 else None)
            ax.set_title(name)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(AXIS_LABELS.get(name, name))
            if name in ("loss", "perplexity") and all(
                    v > 0 for pts in series[name].values() for _, v in pts):
                ax.set_yscale("log")
            ax.legend()
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        if not names:  # nothing logged (yet): an empty, still labelled panel
            axes[0, 0].set(title="no metrics logged", xlabel=xlabel, ylabel="value")
            axes[0, 0].axis("on")
        fig.suptitle(f"training curves: {self.workdir.name}")
        fig.tight_layout()
        return save_figure(fig, self.workdir / filename, dpi=90)


def _wandb_run(project: str, workdir: pathlib.Path, config: dict | None):
    """A W&B run in `project` whose files live under the workdir (`log.wandb`)."""
    try:
        import wandb  # noqa: PLC0415
    except ImportError:
        raise UserError(f"config key log.wandb={project!r} needs the wandb package "
                        "(pip install wandb), or set log.wandb=''") from None
    return wandb.init(project=project, dir=str(workdir), config=config or {})
