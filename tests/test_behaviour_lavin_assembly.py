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


@pytest.mark.parametrize("empty", [torch.tensor([], dtype=torch.int32), [], ()])
def test_prefixes_may_be_empty_and_are_kept_as_int64_on_the_model(empty):
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


def test_a_forward_keeps_no_kv_cache_unless_asked():
    from test_integration_lavin import PIXELS, tiny_lavin
    from test_integration_llama import token_ids
    model = tiny_lavin()
    ids = token_ids(batch=2, length=5)
    with torch.no_grad():
        assert model(ids, PIXELS[:2]).past_key_values is None          # training: no cache
        assert model(ids, PIXELS[:2], use_cache=True).past_key_values is not None


@pytest.mark.parametrize("compat", [None, "lavin"])
def test_labels_are_cut_like_the_inputs(compat):
    """assemble_labels alone gives build_inputs' labels: cut to T by default only in compat
    mode (as LaVIN's training), and as asked when truncate is given."""
    from test_integration_lavin import PIXELS
    from test_integration_llama import token_ids
    prefixes = dict(image_prefix_ids=[11, 12], text_prefix_ids=[11, 12, 13]) if compat else {}
    model = build_lavin(tiny_llama(), tiny_clip(), neck_hidden=16, compat=compat, **prefixes).eval()
    ids = token_ids(batch=2, length=6)
    attention = torch.ones_like(ids)
    has_image = torch.tensor([True, False])
    for truncate in (None, False, True):
        with torch.no_grad():
            inputs = model.build_inputs(ids, PIXELS[:2], has_image, attention, labels=ids, truncate=truncate)
        labels = model.assemble_labels(ids, attention, has_image, truncate)
        assert torch.equal(labels, inputs["labels"])
        cut = compat == "lavin" if truncate is None else truncate
        assert labels.shape[1] == (6 if cut else 1 + len(prefixes.get("image_prefix_ids", [])) + 2 + 6)
