"""Language models on top of the transformer: the one LM task, corpus, sampling, save/load.

task.py      lm_loss, lm_task(model_cfg, mesh, microbatches): boxed params, pipeline layout
corpus.py    Corpus / load_corpus (train/val split), eval_windows, random_batches
evaluate.py  logits_fn, batch_loss, mean_loss (compiled once per model config and shape)
sampling.py  sample_text: temperature, top-k, top-p, past the context
model_io.py  save_model / load_model: parameters + GPTConfig + tokenizer
params.py    abstract_params (shapes only), with_axis_names, count_params
configs.py   the small 4x128 GPT section and the chapter-3 / chapter-4 presets
"""
from jaxcourse.lm.corpus import Corpus, eval_windows, load_corpus, random_batches
from jaxcourse.lm.evaluate import batch_loss, logits_fn, mean_loss
from jaxcourse.lm.model_io import load_model, save_model
from jaxcourse.lm.params import abstract_params, count_params, with_axis_names
from jaxcourse.lm.sampling import sample_text
from jaxcourse.lm.task import lm_loss, lm_task

__all__ = [
    "Corpus", "abstract_params", "batch_loss", "count_params", "eval_windows", "lm_loss",
    "lm_task", "load_corpus", "load_model", "logits_fn", "mean_loss", "random_batches",
    "sample_text", "save_model", "with_axis_names",
]
