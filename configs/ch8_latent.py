"""Chapter 8: latent diffusion on digits: autoencoder 8x8x1 -> 4x4x2, U-Net on latents, costs vs pixels.

python -m jaxcourse.ch8 --config=configs/ch8_latent.py        # cpu preset
python -m jaxcourse.ch8 --config=configs/ch8_latent.py:smoke
Writes quality.md (judge accuracy / Fréchet distance of decoded samples) and latent_vs_pixel.md
(train-step and denoising-step time and memory of the latent U-Net and the pixel U-Net).
"""
from jaxcourse.ch8 import diffusion_config


def get_config(preset: str = "cpu"):
    cfg = diffusion_config(preset)
    cfg.experiment = "latent"
    cfg.pixel_model = cfg.model.to_dict()  # the pixel-space U-Net, for the cost comparison.
    cfg.autoencoder = {"image_size": cfg.model.image_size, "channels": cfg.model.channels,
                       "width": 32, "downsamples": 1, "latent_channels": 2,
                       "latent_penalty": 1e-3, "steps": 1500, "batch_size": 128, "lr": 2e-3}
    # The denoiser now sees 4x4x2 latents: one level less, attention at 2x2 and 4x4.
    cfg.model.update(image_size=4, channels=2, width_mults=(1, 2), attn_sizes=(2, 4))
    cfg.sample.update(clip_x0=0.0, table_samplers=("ddim",), table_steps=(10, 20, 50, 100),
                      ode_steps=())
    if preset == "smoke":
        cfg.autoencoder.update(width=8, steps=4, batch_size=16)
        cfg.sample.update(table_steps=(5,), steps=5)
    elif preset == "gpu":  # CIFAR-10: 32x32x3 -> 8x8x4 latents.
        cfg.autoencoder.update(width=128, downsamples=2, latent_channels=4, steps=50_000,
                               batch_size=128, lr=5e-4)
        cfg.model.update(image_size=8, channels=4, width_mults=(1, 2), attn_sizes=(4, 8))
    return cfg
