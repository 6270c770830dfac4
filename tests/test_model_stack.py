"""The open model stack: registries, layer patterns, mixer-owned caches, the auxiliary-loss
channel, embeddings in, and the README's worked example of a new mixer."""
import dataclasses
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO
from jaxcourse.errors import UserError
from jaxcourse.models import aux_losses, decode, registry
from jaxcourse.models.encoder_decoder import Encoder
from jaxcourse.lm import lm_loss
from jaxcourse.models.transformer import GPT, GPTConfig, gpt_config, model_section


def _readme_example() -> dict:
    """Runs the README's "Extending the model" code block as written; returns its names."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Extending the model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    names: dict = {}
    exec(compile(code, "README.md", "exec"), names)  # noqa: S102 - our own README
    return names


@pytest.fixture(autouse=True, scope="module")
def example_sublayers():
    """Registers the README's conv mixer and the toy ffn for this module only (other tests
    see the package's registries unchanged)."""
    names = _readme_example()
    registry.register("ffn", "toy_aux", ToyAux)
    yield names
    del registry.MIXERS["conv"], registry.FFNS["toy_aux"]


HYBRID = dict(vocab_size=11, context=16, n_layer=4, n_head=2, d_model=16,
              layer_pattern="attention,conv", attention="xla")


def _params(cfg, seed=0):
    return nn.meta.unbox(GPT(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
                         ["params"])


def _tokens(b=2, t=12, vocab=11, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (b, t), dtype=np.int32)


@pytest.mark.parametrize("scan", [False, True])
def test_hybrid_pattern_builds_each_mixer_and_decodes_from_its_own_state(scan):
    cfg = GPTConfig(**HYBRID, scan_layers=scan)
    params = _params(cfg)
    if scan:  # one scanned group of the pattern, stacked over its 2 repeats
        group = params["blocks"]["layers"]
        assert group["layer_0"]["attention"]["query"]["kernel"].shape[0] == 2
        assert group["layer_1"]["conv"]["kernel"].shape == (2, 4, 16)
    else:
        assert "attention" in params["blocks"]["layer_2"]
        assert "conv" in params["blocks"]["layer_3"]
    cache = GPT(cfg).init_cache(2, 16)
    # attention keeps K/V of all 16 positions; the conv mixer only its last 3 inputs
    assert cache["layers"][0]["k"].shape == (2, 2, 2, 16, 8)
    assert cache["layers"][1]["tail"].shape == (2, 2, 3, 16)
    tokens = _tokens()
    full = GPT(cfg).apply({"params": params}, tokens)
    cache, last = decode.prefill(GPT(cfg), params, tokens[:, :5], 16)
    steps = [last]
    for t in range(5, 11):
        cache, last = decode.cached_step(GPT(cfg), params, cache, tokens[:, t])
        steps.append(last)
    np.testing.assert_allclose(np.stack(steps, 1), full[:, 4:11], atol=1e-5)


def test_readme_mixer_trains_and_sampler_decodes_it():
    cfg = GPTConfig(**HYBRID)
    params = _params(cfg)
    data = np.tile(np.arange(11, dtype=np.int32), 4)[None, :17]  # a learnable cycle
    tx = optax.adam(1e-2)

    @jax.jit
    def step(p, opt):
        loss, g = jax.value_and_grad(
            lambda p: lm_loss(GPT(cfg).apply({"params": p}, data[:, :-1]), data[:, 1:])[0])(p)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    opt = tx.init(params)
    losses = []
    for _ in range(40):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0], losses
    prompt = data[:, :4]
    cached = decode.generate(GPT(cfg), params, prompt, None, max_new_tokens=8, temperature=0.0)
    recomputed = decode.generate(GPT(cfg), params, prompt, None, max_new_tokens=8,
                                 temperature=0.0, use_cache=False)
    np.testing.assert_array_equal(cached, recomputed)
    np.testing.assert_array_equal(cached[0], data[0, 4:12])  # it learned the cycle


def test_sublayer_options_come_from_config_and_survive_json():
    section = model_section(layer_pattern="attention,conv", n_layer=2)
    assert section.conv.width == 4  # the option's default, listed as a config key
    section.conv.width = 3
    cfg = gpt_config(section, vocab_size=11)
    assert cfg.options_for("mixer", "conv").width == 3
    back = GPTConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert back == cfg and hash(back) == hash(cfg)
    assert _params(cfg)["blocks"]["layer_1"]["conv"]["kernel"].shape == (3, 128)


@pytest.mark.parametrize("kw,match", [
    (dict(mixer="mamba9"), r"model.mixer='mamba9' is not one of attention"),
    (dict(ffn="moe9"), r"model.ffn='moe9' is not one of mlp, swiglu"),
    (dict(layer_pattern="attention,nope"), r"layer_pattern entry='nope' is not one of"),
    (dict(n_layer=3, layer_pattern="attention,conv"), r"n_layer=3 is not a multiple of the 2"),
    (dict(init="he"), r"model.init='he' is not one of xavier, normal"),
])
def test_bad_slot_values_name_the_key_and_the_choices(kw, match):
    with pytest.raises(UserError, match=match):
        GPTConfig(**kw)


def test_init_normal_draws_attention_and_mlp_kernels_from_n_0_002_and_leaves_the_rest():
    cfg = GPTConfig(vocab_size=11, context=8, n_layer=2, n_head=2, d_model=64, init="normal")
    normal, xavier = _params(cfg), _params(dataclasses.replace(cfg, init="xavier"))
    fans = {("attention", "query"): (64, 64), ("attention", "key"): (64, 64),
            ("attention", "value"): (64, 64), ("attention", "out"): (64, 64),
            ("mlp", "up"): (64, 256), ("mlp", "down"): (256, 64)}
    for i in range(cfg.n_layer):
        for (slot, dense), (fan_in, fan_out) in fans.items():
            def std(params):
                return np.asarray(params["blocks"][f"layer_{i}"][slot][dense]["kernel"]).std()
            assert abs(std(normal) - 0.02) < 0.002, dense
            assert abs(std(xavier) - (2 / (fan_in + fan_out)) ** 0.5) < 0.01, dense
    # The embedding does not depend on model.init.
    np.testing.assert_array_equal(normal["embed"]["embedding"], xavier["embed"]["embedding"])


def test_unknown_option_key_is_one_line():
    section = model_section(layer_pattern="conv")
    section.conv.unlock()
    section.conv.widht = 3
    with pytest.raises(UserError, match="unknown model.conv keys: widht; known: width"):
        gpt_config(section)


class ToyAux(nn.Module):
    """A feed-forward whose auxiliary loss sum(w**2) has the known gradient 2w."""
    d: int
    slot_name = "toy"

    @classmethod
    def from_config(cls, cfg, options, *, name, deterministic=True):
        return cls(cfg.d_model, name=name)

    @nn.compact
    def __call__(self, x_BxTxD):
        w_D = self.param("w", nn.initializers.normal(1.0), (self.d,))
        aux_losses.sow_loss(self, "toy", jnp.sum(w_D ** 2))
        aux_losses.sow_metric(self, "toy_mean", jnp.mean(w_D))
        return x_BxTxD * w_D



@pytest.mark.parametrize("kw", [dict(), dict(scan_layers=True), dict(remat="full"),
                                dict(scan_layers=True, remat="full")])
def test_aux_losses_travel_through_scan_and_remat_with_their_gradient(kw):
    cfg = GPTConfig(vocab_size=11, context=8, n_layer=3, n_head=2, d_model=8, ffn="toy_aux",
                    **kw)
    params = _params(cfg)
    tokens = _tokens(t=8)

    def aux_total(p):
        _, state = GPT(cfg).apply({"params": p}, tokens, mutable=aux_losses.COLLECTIONS)
        losses, metrics = aux_losses.collect(state)
        return 0.5 * losses["toy"], (losses, metrics)

    grads, (losses, metrics) = jax.grad(aux_total, has_aux=True)(params)
    blocks = params["blocks"]
    ws = ([blocks["layers"]["toy"]["w"]] if cfg.scan_layers
          else [blocks[f"layer_{i}"]["toy"]["w"] for i in range(3)])
    w_all = jnp.concatenate([jnp.ravel(w) for w in ws])
    np.testing.assert_allclose(losses["toy"], jnp.sum(w_all ** 2), rtol=1e-6)  # summed
    np.testing.assert_allclose(metrics["toy_mean"], jnp.mean(w_all), rtol=1e-5)  # averaged
    g = grads["blocks"]
    g_ws = ([g["layers"]["toy"]["w"]] if cfg.scan_layers
            else [g[f"layer_{i}"]["toy"]["w"] for i in range(3)])
    for w, gw in zip(ws, g_ws):  # d(0.5 * sum w^2)/dw = w, exactly
        np.testing.assert_allclose(gw, w, rtol=1e-6)


def test_encoder_takes_embeddings_and_gpt_takes_a_prefix():
    cfg = GPTConfig(vocab_size=11, context=16, n_layer=2, n_head=2, d_model=16)
    tokens = _tokens()
    enc = Encoder(cfg)
    params = nn.meta.unbox(enc.init(jax.random.key(0), tokens)["params"])
    emb = params["embed"]["embedding"][tokens]
    np.testing.assert_allclose(enc.apply({"params": params}, embeddings_BxSxD=emb),
                               enc.apply({"params": params}, tokens), atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        enc.apply({"params": params}, tokens, embeddings_BxSxD=emb)
    gpt_params = _params(cfg)
    prefix = gpt_params["embed"]["embedding"][tokens[:, :5]]
    with_prefix = GPT(cfg).apply({"params": gpt_params}, tokens[:, 5:], prefix_BxPxD=prefix)
    np.testing.assert_allclose(with_prefix, GPT(cfg).apply({"params": gpt_params}, tokens),
                               atol=1e-5)
