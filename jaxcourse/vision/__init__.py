"""Image classification: augmentation, regularizers and the classification task."""
