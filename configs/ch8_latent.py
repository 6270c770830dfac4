"""Chapter 8: latent diffusion on digits: autoencoder 8x8x1 -> 4x4x2, U-Net on latents, costs vs pixels.

python -m jaxcourse.ch8 --config=configs/ch8_latent.py        # cpu preset
python -m jaxcourse.ch8 --config=configs/ch8_latent.py:smoke
Writes quality.md (judge accuracy / Fréchet distance of decoded samples) and latent_vs_pixel.md
(train-step and denoising-step time and memory of the latent U-Net and the pixel U-Net).
"""
from jaxcourse.diffusion.configs import diffusion_config


def get_config(preset: str = "cpu"):
    cfg = diffusion_config(preset)
    cfg.experiment = "latent"
    cfg.pixel_model = cfg.model.to_dict()  # the pixel-space U-Net, for the cost comparison.
    cfg.autoencoder = {"image_size": cfg.model.image_size, "channels": cfg.model.channels,
                       "width": 32, "downsamples": 1, "latent_channels": 2,
                       "latent_penalty": 1e-3, "latent_noise": 0.1,  # see autoencoder_task.
                       "steps": 1500, "batch_size": 128, "lr": 2e-3}
    # The denoiser sees 4x4x2 latents: one level, attention at 4x4. (A second level at 2x2
    # would be 7x slower on CPU: XLA runs a 3x3 convolution on a 2x2 input 6x slower than on
    # 4x4, chapters/ch08_diffusion.md.)
    cfg.model.update(image_size=4, channels=2, width_mults=(1,), attn_sizes=(4,))
    # Latents have no fixed range to clip x_0 estimates to. With eps-prediction the first
    # step's x_0 = (x_T - sqrt(1 - abar) eps) / sqrt(abar) divides by sqrt(abar_T) ~ 5e-5
    # (cosine schedule) and the error blows up; v-prediction's x_0 = sqrt(abar) x - sqrt(1 -
    # abar) v has no division (Salimans & Ho 2022).
    cfg.diffusion.prediction = "v"
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
