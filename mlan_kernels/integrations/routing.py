"""What each sample's router reads: its first real token, or its modality.

An MM-Adapter routes sample b by one token (`MMAdapter` reads x[b, 0]). Two facts about the
batches HuggingFace models see make position 0 the wrong token:

- **Padding.** Batched generation left-pads (`tokenizer.padding_side = "left"`), so position 0 of
  a short prompt is a pad token. `RoutingContext.token_index` holds, per sample, the position of
  its first real token, read from the 2-D `attention_mask` by a pre-hook on the module that owns
  the decoder layers (`LlamaModel` and its kin). A padded sample then routes as it does alone.
- **Modality.** In a vision-language model (LLaVA, Qwen2-VL, ...) position 0 of the language
  model's input is BOS for image and text samples alike: the router cannot see the image.
  LaVIN prepends a learned modality token (an `nn.Embedding(2, D)`: text 0, image 1) and, since
  that token attends only to itself, every layer's router reads a function of the modality alone.
  Ours keeps the processor's sequence as it is (no extra position, no change to the KV cache or
  the attention pattern) and gives each adapted layer the same signal directly: the router of
  layer l reads `norm_l(embedding[modality_b])`, the modality embedding through that layer's own
  norm, which is what LaVIN's router reads at its first layer. The modality of each sample comes
  from the model's own inputs: image placeholder tokens in `input_ids` (a pre-hook on the
  vision-language model), or `routing_modality(model, has_image)` to say it explicitly.

During KV-cached decoding nothing is re-derived: the routing weights cached at prefill are used
(patching.py), and beam search keeps each row's sample, so its modality.
"""
import contextlib
import inspect

import torch
from torch import nn

from .hf_compat import cached_length, find_cache

MODALITIES = {"text": 0, "image": 1}


class RoutingContext:
    """Per-sample routing facts of the forward in progress, shared by one component's adapters.

    token_index: [B] long, each sample's first real position (None: position 0 for all).
    modality: [B] long, 0 text / 1 image (set only when `embedding` exists).
    embedding: nn.Embedding(2, D) of the modality signal, or None (token routing).
    has_image: [B] bool set by routing_modality(), which wins over what the inputs say.
    image_bounds: [n + 1] start offsets of each image in a packed [S, D] vision sequence.
    """

    def __init__(self, embedding=None):
        self.embedding = embedding
        self.image_bounds = None        # [n + 1] cu_seqlens of a packed vision tower (Qwen2-VL)
        self.token_index = None
        self.modality = None
        self.has_image = None

    def routing_token(self, norm: nn.Module, normed: torch.Tensor):
        """The [B, 1, D] tokens the routers of a layer read (its norm `norm`, its normed input
        `normed` [B, L, D]), or None when that is position 0 of `normed` (the op's own rule)."""
        batch = normed.shape[0]
        if self.embedding is not None and self.modality is not None:
            modality = self.modality.to(self.embedding.weight.device)
            if modality.shape[0] != batch:
                raise RuntimeError(f"modality routing: {modality.shape[0]} modalities for a batch "
                                   f"of {batch}; run the model on the batch whose inputs set them")
            return norm(self.embedding(modality)[:, None].to(normed.dtype))
        if self.token_index is None or self.token_index.shape[0] != batch:
            return None
        index = self.token_index.to(normed.device).clamp(max=max(normed.shape[1] - 1, 0))
        return normed[torch.arange(batch, device=normed.device), index][:, None]


def first_real_positions(attention_mask, length: int):
    """[B] position of each row's first unmasked token in the current chunk of `length` tokens, or
    None when every row starts at 0 or there is no mask. attention_mask: 2-D [B, T] (1 = real;
    the chunk is its last `length` columns), or the 4-D [B, 1, Q, K] mask some releases build for
    static caches at prefill (bool, or additive with 0 = attend): a key among the first `length`
    is real when some query may attend to it (pads are masked for every query; the LaVIN
    assembly's modality token is seen by itself alone). A row with no real token gets 0."""
    if not isinstance(attention_mask, torch.Tensor) or length < 1:
        return None
    if attention_mask.dim() == 2:
        real = attention_mask[:, -length:] != 0
    elif attention_mask.dim() == 4 and attention_mask.shape[-1] >= length:
        keys = attention_mask[:, 0, :, :length]
        real = (keys if keys.dtype == torch.bool else keys == 0).any(dim=1)
    else:
        return None
    index = real.int().argmax(dim=1)
    return index if bool(index.any()) else None


def _bound_arguments(signature, args, kwargs):
    try:
        return signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return dict(kwargs)


def _sequence_length(arguments):
    for name in ("input_ids", "inputs_embeds"):
        value = arguments.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[1]
    return 0


def _is_decoding(args, kwargs):
    cache = find_cache(args, kwargs)
    return cache is not None and cached_length(cache, 0) > 0


def install_padding_hook(owner: nn.Module, context: RoutingContext):
    """Pre-hook on `owner` (the module whose forward takes input_ids/inputs_embeds and a 2-D
    attention_mask and runs the decoder layers) that sets context.token_index at every forward
    that is not a KV-cached decoding step. Returns the hook handle."""
    signature = inspect.signature(owner.forward)

    def hook(module, args, kwargs):
        if _is_decoding(args, kwargs):
            return
        arguments = _bound_arguments(signature, args, kwargs)
        context.token_index = first_real_positions(arguments.get("attention_mask"),
                                                   _sequence_length(arguments))

    return owner.register_forward_pre_hook(hook, with_kwargs=True)


def install_image_bounds_hook(block: nn.Module, context: RoutingContext):
    """Pre-hook on a vision block that packs all images into one sequence [S, D] (Qwen2-VL's,
    called with `cu_seqlens`): records where each image starts in context.image_bounds."""
    signature = inspect.signature(block.forward)

    def hook(module, args, kwargs):
        context.image_bounds = _bound_arguments(signature, args, kwargs).get("cu_seqlens")

    return block.register_forward_pre_hook(hook, with_kwargs=True)


def packed_image_routing(adapter, normed, bounds):
    """Routing of a packed vision sequence normed [S, D] whose image i spans
    bounds[i]:bounds[i+1]: image i routes by the mean of its patches -> ([S, 1, D] view of
    normed, [S, E] weights: each patch carries its image's), so the op routes per image."""
    if not isinstance(bounds, torch.Tensor) or bounds.dim() != 1 or int(bounds[-1]) != normed.shape[0]:
        raise RuntimeError(f"packed vision routing needs the cu_seqlens of the {normed.shape[0]} patches "
                           f"(the vision block's own argument), got {bounds!r}")
    lengths = bounds.diff().to(normed.device)
    image_of = torch.repeat_interleave(torch.arange(lengths.shape[0], device=normed.device), lengths)
    sums = torch.zeros(lengths.shape[0], normed.shape[1], device=normed.device, dtype=torch.float32)
    means = sums.index_add(0, image_of, normed.float()) / lengths.clamp(min=1)[:, None]
    weights = adapter.routing_weights(means[:, None].to(normed.dtype))
    return normed[:, None], weights[image_of]


def image_token_ids(config) -> tuple:
    """The placeholder token ids of images (and videos) a vision-language `config` declares."""
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    ids = {getattr(config, name) for name in names if isinstance(getattr(config, name, None), int)}
    return tuple(sorted(ids))


def modality_from_inputs(arguments, token_ids):
    """[B] long (1 = the sample holds an image placeholder token) from a vision-language model's
    call arguments, or None when it cannot be told (inputs_embeds with pixel_values)."""
    input_ids = arguments.get("input_ids")
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        has_image = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        for token in token_ids:
            has_image |= input_ids == token
        return has_image.any(dim=1).long()
    embeds = arguments.get("inputs_embeds")
    if arguments.get("pixel_values") is None and isinstance(embeds, torch.Tensor):
        return torch.zeros(embeds.shape[0], dtype=torch.long, device=embeds.device)
    return None


def _batch_size(arguments):
    for name in ("input_ids", "inputs_embeds"):
        value = arguments.get(name)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return None


def _expanded(has_image, batch):
    """has_image [B] for a batch of `batch` rows: generate's beams and num_return_sequences
    repeat each sample's row (repeat_interleave), so each row keeps its sample's modality."""
    if batch is None or batch == has_image.shape[0]:
        return has_image
    if batch % has_image.shape[0]:
        raise ValueError(f"routing_modality: has_image has {has_image.shape[0]} entries for a "
                         f"batch of {batch} rows")
    return has_image.repeat_interleave(batch // has_image.shape[0])


def install_modality_hook(model: nn.Module, context: RoutingContext, token_ids: tuple):
    """Pre-hook on a vision-language model that sets context.modality from its inputs at every
    forward that is not a KV-cached decoding step. Returns the hook handle."""
    signature = inspect.signature(model.forward)

    def hook(module, args, kwargs):
        if _is_decoding(args, kwargs):
            return
        arguments = _bound_arguments(signature, args, kwargs)
        if context.has_image is not None:
            context.modality = _expanded(context.has_image, _batch_size(arguments)).long()
            return
        modality = modality_from_inputs(arguments, token_ids)
        if modality is None:
            raise ValueError(f"{type(module).__name__}: cannot tell which samples hold an image "
                             f"from inputs_embeds; call the model inside "
                             f"mlan_kernels.routing_modality(model, has_image=[...])")
        context.modality = modality

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def routing_contexts(model: nn.Module):
    """Every RoutingContext of `model`'s adapters with a modality embedding."""
    found = []
    for module in model.modules():
        context = module.__dict__.get("routing_context")
        if context is not None and context.embedding is not None and all(c is not context for c in found):
            found.append(context)
    return found


@contextlib.contextmanager
def routing_modality(model: nn.Module, has_image):
    """Say which samples hold an image, for the forwards (and `generate`) run inside:

        with mk.routing_modality(model, has_image=[True, False]):
            model.generate(**inputs)

    has_image: [B] bools (a list or tensor). Only models patched with modality routing (whole
    vision-language models) read it; ValueError for any other model."""
    contexts = routing_contexts(model)
    if not contexts:
        raise ValueError("routing_modality: the model has no modality routing (patch a whole "
                         "vision-language model with mk.patch)")
    has_image = torch.as_tensor(has_image, dtype=torch.bool)
    if has_image.dim() != 1:
        raise ValueError(f"has_image must be [B] bools, got shape {list(has_image.shape)}")
    previous = [context.has_image for context in contexts]
    for context in contexts:
        context.has_image = has_image
    try:
        yield model
    finally:
        for context, value in zip(contexts, previous):
            context.has_image = value
