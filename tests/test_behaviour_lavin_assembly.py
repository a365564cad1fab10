"""What a user of the LaVIN assembly (integrations/lavin.py) relies on in its arguments: every
bad argument raises before anything is patched, with a message that names the argument, what it
must be and what it got (asserted whole)."""
import re

import pytest
import torch

from mlan_kernels.config import AdapterConfig
from mlan_kernels.integrations import adapters, patch_clip_vision, patch_llama
from mlan_kernels.integrations.lavin import LavinModel, build_lavin
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama


@pytest.mark.parametrize("kwargs, message", [
    (dict(compat="lavin", text_prefix_ids=[1]),
     'compat="lavin" needs image_prefix_ids (the LLaMA tokenizer\'s ids of Image: , no BOS)'),
    (dict(compat="lavin", image_prefix_ids=[1]),
     'compat="lavin" needs text_prefix_ids (the LLaMA tokenizer\'s ids of Image: N/A, no BOS)'),
    (dict(compat="lavin", image_prefix_ids=[1.5], text_prefix_ids=[1]),
     "image_prefix_ids must be a 1-D sequence of ints, got torch.float32 shape [1]"),
    (dict(compat="lavin", image_prefix_ids=[1], text_prefix_ids=[[1, 2]]),
     "text_prefix_ids must be a 1-D sequence of ints, got torch.int64 shape [1, 2]"),
    (dict(compat="lavin", image_prefix_ids=[True], text_prefix_ids=[1]),
     "image_prefix_ids must be a 1-D sequence of ints, got torch.bool shape [1]"),
    (dict(compat="lavin", image_prefix_ids=[1], text_prefix_ids=[96, 97]),
     "text_prefix_ids must be token ids in [0, 97), got [96, 97]"),
    (dict(compat="lavin", image_prefix_ids=[-1, 0], text_prefix_ids=[1]),
     "image_prefix_ids must be token ids in [0, 97), got [-1, 0]"),
    (dict(image_prefix_ids=[1]), 'image_prefix_ids / text_prefix_ids are only used with compat="lavin"'),
    (dict(text_prefix_ids=[1]), 'image_prefix_ids / text_prefix_ids are only used with compat="lavin"'),
    (dict(compat="lavin", image_prefix_ids=[1], text_prefix_ids=[2], clip_config=AdapterConfig()),
     "clip_config.compat must equal config.compat ('lavin'), got None"),
])
def test_argument_errors_name_the_argument_and_patch_nothing(kwargs, message):
    llama, clip = tiny_llama(), tiny_clip()
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        build_lavin(llama, clip, **kwargs)
    assert not adapters(llama) and not adapters(clip)


def test_prefixes_may_be_empty_and_are_kept_as_int64_on_the_model():
    empty = torch.tensor([], dtype=torch.int32)
    model = build_lavin(tiny_llama(), tiny_clip(), compat="lavin", image_prefix_ids=empty,
                        text_prefix_ids=(0, 96))
    assert model.image_prefix_ids.dtype == model.text_prefix_ids.dtype == torch.int64
    assert model.image_prefix_ids.tolist() == [] and model.text_prefix_ids.tolist() == [0, 96]
    assert "image_prefix_ids" not in model.state_dict()          # not saved with the model


def test_the_two_sides_must_share_compat():
    llama, clip = tiny_llama(), tiny_clip()
    patch_llama(llama, compat="lavin")
    patch_clip_vision(clip)
    with pytest.raises(ValueError, match="^" + re.escape(
            "the llama and clip adapters must share compat, got {'llama': 'lavin', 'clip': None}") + "$"):
        LavinModel(llama, clip)


def test_clip_every_must_divide_the_clip_depth():
    with pytest.raises(ValueError, match="^" + re.escape("clip_every=3 must divide the CLIP depth 8") + "$"):
        build_lavin(tiny_llama(), tiny_clip(), clip_every=3)
