"""The generated image-text scenes: determinism, held-out pairs, captions true of their scene."""
import chex
import numpy as np
import pytest

from jaxcourse.data import scenes
from jaxcourse.data.tokenizers import ScratchBPE
from jaxcourse.errors import UserError


@pytest.fixture(scope="module")
def splits():
    return scenes.make_splits(300, 60, 60, seed=3)


def test_same_seed_same_scenes_other_seed_other_scenes(splits):
    again = scenes.generate(300, seed=3, split="train")
    np.testing.assert_array_equal(again.images, splits["train"].images)
    assert again.captions == splits["train"].captions
    other = scenes.generate(300, seed=4, split="train")
    assert not np.array_equal(other.images, again.images)


def test_shapes_and_ranges(splits):
    s = splits["train"]
    chex.assert_shape(s.images, (300, 32, 32, 3))
    assert s.images.dtype == np.float32 and 0 <= s.images.min() and s.images.max() <= 1
    for name in ("colour", "shape", "size", "count", "other_colour", "other_shape", "side"):
        chex.assert_shape(getattr(s, name), (300,))
    assert set(s.count) == {1, 2, 3} and set(s.size) == {0, 1}
    assert set(s.side) == {-1, 0, 1} and np.array_equal(s.side < 0, s.other_colour < 0)
    arrays = s.arrays()
    chex.assert_shape(arrays["label"], (300,))
    names = scenes.class_names()
    assert len(names) == len(scenes.COLOURS) * len(scenes.SHAPES)
    i = 7
    assert names[arrays["label"][i]] == (f"{scenes.COLOURS[s.colour[i]]} "
                                         f"{scenes.SHAPES[s.shape[i]]}")


def test_heldout_pairs_never_in_train_and_only_in_heldout(splits):
    held = set(scenes.heldout_labels().tolist())
    assert len(held) == len(scenes.HELDOUT_PAIRS)
    for name in ("train", "test"):
        s = splits[name]
        assert not held & set(s.label.tolist()), name
        other = s.other_colour >= 0
        assert not held & set(scenes.pair_index(s.other_colour[other],
                                                s.other_shape[other]).tolist()), name
    assert set(splits["heldout"].label.tolist()) <= held
    assert len(set(splits["heldout"].label.tolist())) == len(held)  # each pair shows up
    train_text = " ".join(c for caps in splits["train"].captions for c in caps)
    for colour, shape in scenes.HELDOUT_PAIRS:
        assert f"{colour} {shape}" not in train_text  # nor in any caption
    seen = {scenes.COLOURS[c] for c in splits["train"].colour}
    assert seen == set(scenes.COLOURS)  # every colour (and shape) is still trained on
    assert {scenes.SHAPES[c] for c in splits["train"].shape} == set(scenes.SHAPES)


def test_captions_describe_their_scene(splits):
    s = splits["train"]
    for i in range(len(s)):
        colour, shape = scenes.COLOURS[s.colour[i]], scenes.SHAPES[s.shape[i]]
        count = int(s.count[i])
        group = f"{colour} {scenes.plural(shape, count)}"
        assert len(s.captions[i]) == 4
        for caption in s.captions[i]:
            assert group in caption, (group, caption)
        assert f"{scenes.COUNT_WORDS[count - 1]} {scenes.SIZES[s.size[i]]} {group}" in \
            s.captions[i][-1]
        if s.other_colour[i] >= 0:
            other = f"a {scenes.COLOURS[s.other_colour[i]]} {scenes.SHAPES[s.other_shape[i]]}"
            assert f"{scenes.SIDES[s.side[i]]} of {other}" in s.captions[i][0]
        else:
            assert not any(w in c for c in s.captions[i] for w in ("left", "right", " and "))


def test_group_pixels_have_the_group_colour():
    s = scenes.generate(40, seed=0, split="test")
    alone = np.flatnonzero(s.other_colour < 0)
    for i in alone[:10]:  # only the group is drawn: bright pixels are its colour
        bright = s.images[i][s.images[i].max(-1) > 0.5]
        mean = bright.mean(0)
        nearest = np.argmin(((scenes.RGB - mean) ** 2).sum(-1))
        assert nearest == s.colour[i]


def test_tokenize_pads_and_refuses_long_captions(splits):
    tok = scenes.caption_tokenizer()
    captions = [c for caps in splits["train"].captions[:20] for c in caps]
    ids, valid = scenes.tokenize_captions(tok, captions, 64)
    chex.assert_shape([ids, valid], (80, 64))
    assert ids.dtype == np.int32 and scenes.pad_id(tok) == 0
    np.testing.assert_array_equal(valid.sum(1), [len(c) for c in captions])
    assert tok.decode(ids[0][valid[0]].tolist()) == captions[0]
    assert (ids[~valid] == 0).all()
    with pytest.raises(UserError, match="longer than the text context 10"):
        scenes.tokenize_captions(tok, captions, 10)
    bpe = ScratchBPE.train(" ".join(captions), 300)  # any project tokenizer
    ids, valid = scenes.tokenize_captions(bpe, captions[:4], 64)
    assert bpe.decode(ids[1][valid[1]].tolist()) == captions[1]
    assert valid.sum() < sum(len(c) for c in captions[:4])  # merges: fewer tokens
