"""Running several trainings inside one chapter experiment.

A lab that compares runs (optimizers, models) trains each through the shared loop
in its own sub-directory, with a copy of the chapter config where a few keys differ.
"""

from __future__ import annotations

import copy


def sub_config(cfg, **sections):
    """A copy of cfg with some keys of some sections replaced.

    sub_config(cfg, optimizer={"name": "sgd", "lr": 0.1}). Keys must already
    exist (the copy stays locked) and values keep ml_collections' type checks.
    """
    sub = copy.deepcopy(cfg)
    for section, values in sections.items():
        for key, value in values.items():
            sub[section][key] = value
    return sub
