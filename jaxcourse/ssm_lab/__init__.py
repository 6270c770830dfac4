"""Chapter 10's lab pieces: the mixers it compares at equal parameter count, decode cost
(state bytes and ms per token at a given context) and the figures.

configs.py   MODELS (name -> model settings), lab_models (parameter-matched GPTConfigs),
             mixers_config / recall_config (the presets of configs/ch10_*.py)
cost.py      state_bytes, decode_ms_per_token: a decode cache already at a context length
plots.py     decode cost vs context, validation-loss curves, recall accuracy
"""
