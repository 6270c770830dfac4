"""Data: offline sources, raw-format readers, grain pipelines, tokenizers."""
