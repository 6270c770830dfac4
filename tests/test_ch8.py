"""Chapter 8 end to end (smoke preset): training, sampling table, figures, reloading a saved
model, and the one-line errors for a mismatched checkpoint or image size."""
import json

import pytest

from jaxcourse import ch8

SMOKE = "--config=configs/ch8_ddpm.py:smoke"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ch8")
    ch8.main([SMOKE, f"--workdir={workdir}"])
    return workdir


def test_smoke_run_writes_table_figures_and_metrics(smoke_run):
    metrics = json.loads((smoke_run / "summary.json").read_text())["metrics"]
    # Predicting zero noise scores an MSE of 1 (the noise variance); the smoke run learns a
    # little (0.90). It is far too short to beat uniform noise on Frechet (0.21 vs 0.32-0.59),
    # so the table is checked against the floor: held-out vs real training images (0.02).
    assert metrics["train_mse"] < 0.95
    frechets = [metrics[f"frechet_{kind}_{steps}"]
                for kind in ("ddpm", "ddim") for steps in (5, 50)]
    assert 0.0 < metrics["frechet_real_floor"] < 0.1
    assert min(frechets) > metrics["frechet_real_floor"]  # no sampler beats real images
    assert metrics["sample_accuracy"] == metrics["accuracy_ddim_5"]  # the grid's sampler.
    table = (smoke_run / "quality.md").read_text()
    assert table.count("| ddpm |") == 2 and table.count("| ddim |") == 2
    for name in ("quality.png", "samples_ddim5.png", "guidance.png", "forward_noising.png",
                 "model/model.json", "diffusion/metrics.jsonl"):
        assert (smoke_run / name).exists(), name


def test_sampling_a_saved_model_reproduces_its_table_row(smoke_run):
    """experiment=sample reloads the saved EMA weights: same seed, same samples, same score."""
    before = json.loads((smoke_run / "summary.json").read_text())["metrics"]
    ch8.main([SMOKE, f"--workdir={smoke_run}", "--config.experiment=sample",
              f"--config.sample.checkpoint={smoke_run / 'model'}",
              "--config.sample.table_samplers=('ddim',)", "--config.sample.table_steps=(5,)",
              "--config.sample.ode_steps=()"])
    after = json.loads((smoke_run / "summary.json").read_text())["metrics"]
    assert after["frechet_ddim_5"] == pytest.approx(before["frechet_ddim_5"], rel=1e-4)
    assert after["accuracy_ddim_5"] == before["accuracy_ddim_5"]


@pytest.mark.parametrize("override, message", [
    ("--config.model.width=16", "trained with model.width=8 but this config has model.width=16"),
    ("--config.diffusion.prediction=v", "diffusion.prediction=eps but this config has"),
    ("--config.model.image_size=16", "8x8x1 images but model.image_size=16"),
])
def test_mismatched_checkpoint_or_image_size_is_one_line_error(smoke_run, capsys, override,
                                                              message):
    with pytest.raises(SystemExit) as e:
        ch8.main([SMOKE, f"--workdir={smoke_run / 'bad'}", "--config.experiment=sample",
                  f"--config.sample.checkpoint={smoke_run / 'model'}", override])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
