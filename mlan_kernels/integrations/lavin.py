"""The LaVIN assembly: a patched CLIP vision tower + visual neck + a patched LLaMA.

Sequence of sample b (D = LLaMA hidden size, K = CLIP blocks / 4 image tokens):
    [ modality token | K image tokens (image samples only) | text tokens | right padding ]
    modality token = modality_embedding[has_image_b]          [D]   (fp32 parameter)
    image tokens   = neck(CLS after CLIP blocks 4, 8, ...)     [K, D]
    neck           = Linear(C, 128) -> SiLU -> Linear(128, D)       (LaVIN code's AdapterMLP)
Attention: causal, padding masked, and no token other than itself attends to position 0, so
the modality token's hidden state (the routing token of every LLaMA adapter) depends only on
the modality. Labels: -100 on the modality token, image tokens and padding.
Text-only samples never go through CLIP (LaVIN fed them a zero image).

compat="lavin" reproduces LaVIN's own code (lavin/model.py, lavin/mm_adapter.py), so weights
trained by LaVIN give LaVIN's outputs on the same base:
    [ modality token | text[0] (BOS) | prefix | K image tokens (image samples) | text[1:] ]
    prefix = image_prefix_ids ("Image: ") or text_prefix_ids ("Image: N/A"), in the LLaMA
    tokenizer; in forward (training) each sequence is truncated to the input's padded length T
    (LaVIN cuts to its max_seq_len); generate does not truncate (LaVIN's generator does not).
    CLIP adapters route sequence-first: token position l of every image by image 0's token l
    (image 0 = sample 0's image, a zero image when sample 0 is text-only, as LaVIN's data
    loader feeds zeros; only that one zero image is run). Routing weights of every adapter are
    rounded to fp16 (LaVIN's `.half()`).
"""
import torch
from torch import nn

from ..config import AdapterConfig
from .clip import patch_clip_vision
from .families import family_of
from .hf_compat import cache_keyword, new_dynamic_cache
from .llama import patch_llama
from .merge import merge_adapters, unmerge_adapters
from .patching import freeze_all_but_adapters, patch_state, record_routing_weights
from .sampling import check_sampling_args, next_tokens

IGNORE_INDEX = -100
MODALITIES = {"text": 0, "image": 1}


class VisualNeck(nn.Module):
    """CLS features [N, K, C] -> LLM tokens [N, K, D]: down (C->hidden), SiLU, up (hidden->D).

    LaVIN's code uses SiLU between the two linears (the paper says SwiGLU); Xavier-uniform
    weights, zero biases, as in LaVIN's AdapterMLP (conv_A = down, conv_B = up).
    """

    def __init__(self, in_features, hidden_features, out_features, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(in_features, hidden_features, device=device, dtype=dtype)
        self.up = nn.Linear(hidden_features, out_features, device=device, dtype=dtype)
        for linear in (self.down, self.up):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, features):
        return self.up(nn.functional.silu(self.down(features.to(self.down.weight.dtype))))


def _prefix_ids(name, ids, vocab_size):
    """Token ids of a LaVIN prefix as a 1-D int64 tensor (checked against the vocabulary)."""
    if ids is None:
        raise ValueError(f'compat="lavin" needs {name} (the LLaMA tokenizer\'s ids of '
                         f'{"Image: " if name.startswith("image") else "Image: N/A"}, no BOS)')
    empty = isinstance(ids, (list, tuple)) and not ids       # torch.as_tensor([]) is float32
    ids = torch.empty(0, dtype=torch.long) if empty else torch.as_tensor(ids)
    if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D sequence of ints, got {ids.dtype} shape {list(ids.shape)}")
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab_size):
        raise ValueError(f"{name} must be token ids in [0, {vocab_size}), got {ids.tolist()}")
    return ids.long()


def _check_compat(llama, compat, image_prefix_ids, text_prefix_ids):
    """Validate the prefix ids for `compat` (an AdapterConfig's) -> {"image_prefix_ids": [P]
    int64, "text_prefix_ids": ...} ({} for compat=None)."""
    if compat is None:
        if image_prefix_ids is not None or text_prefix_ids is not None:
            raise ValueError('image_prefix_ids / text_prefix_ids are only used with compat="lavin"')
        return {}
    vocab = llama.get_input_embeddings().num_embeddings
    return {name: _prefix_ids(name, ids, vocab) for name, ids in
            (("image_prefix_ids", image_prefix_ids), ("text_prefix_ids", text_prefix_ids))}


def _patched_compat(llama, clip):
    """The compat mode of the adapters' AdapterConfig (None when unpatched); ValueError when
    the two sides disagree."""
    modes = {name: state["config"].compat for name, model in (("llama", llama), ("clip", clip))
             if (state := patch_state(model, name)) is not None}
    if len(set(modes.values())) > 1:
        raise ValueError(f"the llama and clip adapters must share compat, got {modes}")
    return next(iter(modes.values()), None)


class LavinModel(nn.Module):
    """LaVIN on HuggingFace modules. llama: a patched LlamaForCausalLM; clip: a patched
    CLIPVisionModel. Build it with `build_lavin` (patches and freezes).

    The compat mode is the adapters' (AdapterConfig.compat, equal on both sides): None (our
    layout, per-image CLIP routing, fp32 routing weights) or "lavin" (LaVIN's layout,
    truncation, sequence-first CLIP routing and fp16 routing weights; see the module
    docstring), which needs image_prefix_ids / text_prefix_ids ([P] ints each)."""

    def __init__(self, llama, clip, neck_hidden=128, clip_every=4, device=None,
                 image_prefix_ids=None, text_prefix_ids=None):
        super().__init__()
        self.llama, self.clip, self.clip_every = llama, clip, clip_every
        dim = llama.config.hidden_size
        if clip.config.num_hidden_layers % clip_every != 0:
            raise ValueError(f"clip_every={clip_every} must divide the CLIP depth "
                             f"{clip.config.num_hidden_layers}")
        compat = _patched_compat(llama, clip)
        prefixes = _check_compat(llama, compat, image_prefix_ids, text_prefix_ids)
        device = device or llama.get_input_embeddings().weight.device
        self.compat = compat
        self.neck = VisualNeck(clip.config.hidden_size, neck_hidden, dim, device=device,
                               dtype=torch.float32)
        self.modality_embedding = nn.Embedding(2, dim, device=device, dtype=torch.float32)
        # The per-block image summary the neck reads: CLIP's CLS token, or the mean patch token
        # for towers without one (SigLIP), as their adapters route (families.py).
        self.image_summary = family_of(clip, "clip").sites["attn"].routing
        for name, ids in prefixes.items():
            self.register_buffer(name, ids.to(device), persistent=False)

    @property
    def image_token_count(self):
        return self.clip.config.num_hidden_layers // self.clip_every

    def image_tokens(self, pixel_values):
        """pixel_values [N, 3, H, W] -> [N, K, D]: the summary token (CLS; mean patch for SigLIP)
        after every clip_every-th block, through the neck."""
        hidden = self.clip(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        blocks = [hidden[i] for i in range(self.clip_every, len(hidden), self.clip_every)]
        summary = [h.mean(1) if self.image_summary == "mean" else h[:, 0] for h in blocks]
        return self.neck(torch.stack(summary, 1))

    def _image_tokens_per_sample(self, has_image, pixel_values):
        """[num image samples, K, D], or None when the batch has no image (CLIP skipped)."""
        count = int(has_image.sum())
        if count == 0:
            return None
        if pixel_values is None:
            raise ValueError("has_image marks samples with images but pixel_values is None")
        if pixel_values.shape[0] == has_image.shape[0] and count != has_image.shape[0]:
            pixel_values = pixel_values[has_image]          # rows of text-only samples ignored
        if pixel_values.shape[0] != count:
            raise ValueError(f"pixel_values must have one row per sample or per image sample "
                             f"({has_image.shape[0]} or {count}), got {pixel_values.shape[0]}")
        if self.compat == "lavin" and not bool(has_image[0]):
            # LaVIN routes every image by image 0 = sample 0's zero image: run that one too
            zero = torch.zeros_like(pixel_values[:1])
            return self.image_tokens(torch.cat([zero, pixel_values]))[1:]
        return self.image_tokens(pixel_values)

    def _layout(self, has_image_b):
        """(text tokens before the inserted block, [P] prefix ids or None) of one sample:
        ours (0, None); compat="lavin" (1, "Image: " or "Image: N/A" ids)."""
        if self.compat != "lavin":
            return 0, None
        return 1, self.image_prefix_ids if has_image_b else self.text_prefix_ids

    def build_inputs(self, input_ids, pixel_values=None, has_image=None, attention_mask=None,
                     labels=None, image_tokens=None, truncate=None):
        """Assemble the LLaMA inputs.

        input_ids [B, T] (right padded, attention_mask [B, T] of 0/1); has_image [B] bool
        (default: all True when pixel_values is given); pixel_values [B or #images, 3, H, W];
        labels [B, T] or None; image_tokens: precomputed [#images, K, D] (skips CLIP).
        truncate: cut each sequence to T (default: only with compat="lavin", as LaVIN's
        training does). Returns dict(inputs_embeds [B, S, D], attention_mask [B, 1, S, S]
        additive, labels [B, S] or None, lengths [B]) with S = max_b length_b, length_b =
        1 + P_b + K·has_image_b + T_b (P_b: compat prefix length, else 0), cut to T if truncate.
        """
        batch = input_ids.shape[0]
        if has_image is None:
            has_image = torch.full((batch,), pixel_values is not None or image_tokens is not None)
        has_image = torch.as_tensor(has_image, dtype=torch.bool, device=input_ids.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if image_tokens is None:
            image_tokens = self._image_tokens_per_sample(has_image, pixel_values)
        truncate = self.compat == "lavin" if truncate is None else truncate
        embed = self.llama.get_input_embeddings()
        dtype = embed.weight.dtype
        text = embed(input_ids)
        modality = self.modality_embedding(has_image.long()).to(dtype)
        sequences, image_index = [], 0
        for b in range(batch):
            n = int(attention_mask[b].sum())
            split, prefix = self._layout(bool(has_image[b]))
            parts = [modality[b:b + 1], text[b, :split]]
            if prefix is not None:
                parts.append(embed(prefix))
            if has_image[b]:
                parts.append(image_tokens[image_index].to(dtype))
                image_index += 1
            sequence = torch.cat(parts + [text[b, split:n]])
            sequences.append(sequence[:input_ids.shape[1]] if truncate else sequence)
        lengths = torch.tensor([s.shape[0] for s in sequences], device=input_ids.device)
        inputs_embeds = nn.utils.rnn.pad_sequence(sequences, batch_first=True)
        out = {"inputs_embeds": inputs_embeds, "lengths": lengths,
               "attention_mask": lavin_attention_mask(lengths, inputs_embeds.shape[1], dtype),
               "labels": None}
        if labels is not None:
            out["labels"] = self.assemble_labels(labels, attention_mask, has_image, truncate)
        return out

    def assemble_labels(self, labels, attention_mask, has_image, truncate=None):
        """labels [B, T] (text positions) -> [B, S] in assembled positions (see build_inputs):
        -100 on the modality token, the inserted prefix and image tokens, and padding."""
        has_image = torch.as_tensor(has_image, dtype=torch.bool, device=labels.device)
        truncate = self.compat == "lavin" if truncate is None else truncate
        rows = []
        for b in range(labels.shape[0]):
            split, prefix = self._layout(bool(has_image[b]))
            inserted = (0 if prefix is None else prefix.numel()) + self.image_token_count * int(has_image[b])
            n = int(attention_mask[b].sum())
            row = torch.cat([labels.new_full((1,), IGNORE_INDEX), labels[b, :split],
                             labels.new_full((inserted,), IGNORE_INDEX), labels[b, split:n]])
            rows.append(row[:labels.shape[1]] if truncate else row)
        return nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=IGNORE_INDEX)

    def forward(self, input_ids, pixel_values=None, has_image=None, attention_mask=None,
                labels=None, **llama_kwargs):
        """LLaMA output (logits [B, S, vocab], loss when labels are given) on the assembled
        sequence; logits position p belongs to assembled position p (see build_inputs)."""
        inputs = self.build_inputs(input_ids, pixel_values, has_image, attention_mask, labels)
        llama_kwargs.setdefault("use_cache", False)
        return self.llama(inputs_embeds=inputs["inputs_embeds"], labels=inputs["labels"],
                          attention_mask=inputs["attention_mask"], **llama_kwargs)

    @torch.no_grad()
    def modality_routing_weights(self, modality):
        """{adapter key: [1, E]} of every LLaMA adapter for "text" or "image": the modality
        token alone gives the same hidden state as inside any sequence (mask rule)."""
        index = torch.tensor([[MODALITIES[modality]]], device=self.modality_embedding.weight.device)
        embeds = self.modality_embedding(index).to(self.llama.get_input_embeddings().weight.dtype)
        with record_routing_weights(self.llama) as recorder:
            self.llama(inputs_embeds=embeds, use_cache=False)
        return recorder.weights

    def merge_adapters(self, modality):
        """Fold the LLaMA adapters for one modality ("text" | "image") into q/k/v (and MLP for
        "block"); CLIP adapters stay (they route per image). Undo with unmerge_adapters()."""
        merge_adapters(self.llama, self.modality_routing_weights(modality))
        return self

    def unmerge_adapters(self):
        unmerge_adapters(self.llama)
        return self

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, has_image=None, max_new_tokens=16,
                 use_cache=True, eos_token_id=None, temperature=0.0, top_p=1.0, generator=None,
                 attention_mask=None):
        """Decoding -> new tokens [B, n] with n <= max_new_tokens: it stops when every row has
        produced eos_token_id (an int, or a list of ids), and a finished row is padded with
        its first EOS id.

        input_ids [B, T] right-padded with attention_mask [B, T] (as collate makes them; None =
        no padding): prompts of different lengths (and modalities) batch together. The
        assembled sequences are left-padded inside: the free positions in front of row b hold
        copies of its modality token that attend only to themselves, so (with position ids
        counted from the real modality token) every row computes exactly what it computes
        alone — the hidden state at position 0, where the LLaMA adapters route, is the modality
        token's. Rows of both modalities need per-sample routing (single_modality None or
        False on the LLaMA adapters); mlan-train's models set True: batch those by modality.
        temperature 0 (default): greedy. temperature > 0: nucleus sampling with top_p, drawn
        with `generator` (integrations/sampling.py: the rule of LaVIN's lavin/generator.py,
        whose defaults are temperature 0.8, top_p 0.95). With use_cache the LLaMA adapters use
        routing weights cached at prefill; without it every step recomputes the whole sequence
        (the same tokens).
        """
        check_sampling_args(temperature, top_p)
        if has_image is None:
            has_image = torch.full((input_ids.shape[0],), pixel_values is not None)
        has_image = torch.as_tensor(has_image, dtype=torch.bool, device=input_ids.device)
        stop = _stop_ids(eos_token_id, input_ids.device)
        image_tokens = self._image_tokens_per_sample(has_image, pixel_values)
        inputs = self.build_inputs(input_ids, has_image=has_image, attention_mask=attention_mask,
                                   image_tokens=image_tokens, truncate=False)
        embeds, offsets = _left_pad(inputs["inputs_embeds"], inputs["lengths"])
        cache = new_dynamic_cache(self.llama.config) if use_cache else None
        cache_argument = {cache_keyword(self.llama): cache} if use_cache else {}
        total = embeds.shape[1]
        logits = self.llama(inputs_embeds=embeds, **cache_argument, use_cache=use_cache,
                            attention_mask=left_padded_attention_mask(offsets, total, 0, embeds.dtype),
                            position_ids=_positions(offsets, total, 0)).logits
        tokens, finished = [], torch.zeros_like(has_image)
        for step in range(max_new_tokens):
            next_token = next_tokens(logits[:, -1], temperature, top_p, generator)
            if stop is not None:
                next_token = torch.where(finished, stop[0], next_token)
                finished |= torch.isin(next_token, stop)
            tokens.append(next_token)
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            total += 1
            first = total - 1 if use_cache else 0
            if use_cache:
                step_inputs = {"input_ids": next_token[:, None]}
            else:
                new_embeds = self.llama.get_input_embeddings()(torch.stack(tokens, 1))
                step_inputs = {"inputs_embeds": torch.cat([embeds, new_embeds.to(embeds.dtype)], 1)}
            logits = self.llama(**step_inputs, **cache_argument, use_cache=use_cache,
                                attention_mask=left_padded_attention_mask(offsets, total, first, embeds.dtype),
                                position_ids=_positions(offsets, total, first)).logits
        return torch.stack(tokens, 1)


def _stop_ids(eos_token_id, device):
    """eos_token_id (None, an int or a sequence of ints) as a 1-D long tensor, or None."""
    if eos_token_id is None:
        return None
    ids = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                          dtype=torch.long, device=device)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"eos_token_id must be an int or a non-empty list of ints, got {eos_token_id!r}")
    return ids


def _left_pad(inputs_embeds, lengths):
    """Right-padded assembled sequences [B, S, D] (row b real for its first lengths[b]
    positions) -> (left-padded [B, S, D] whose free front positions copy row b's modality
    token, offsets [B] = S - lengths)."""
    total = inputs_embeds.shape[1]
    offsets = total - lengths
    rows = []
    for b in range(inputs_embeds.shape[0]):
        n = int(lengths[b])
        rows.append(torch.cat([inputs_embeds[b, :1].expand(total - n, -1), inputs_embeds[b, :n]]))
    return torch.stack(rows), offsets


def _positions(offsets, total, first):
    """Position ids [B, total - first] of positions first..total-1: counted from each row's
    modality token (position offsets[b]), 0 on the copies in front of it."""
    positions = torch.arange(first, total, device=offsets.device)[None] - offsets[:, None]
    return positions.clamp(min=0)


def left_padded_attention_mask(offsets, total, first, dtype):
    """Additive mask [B, 1, total - first, total] for queries first..total-1 of left-padded
    sequences (row b's modality token at offsets[b]): query i sees key j iff j == i, or
    offsets[b] < j <= i. So nothing but itself attends to the modality token or the copies in
    front of it; with offsets 0 and no padding this is lavin_attention_mask."""
    keys = torch.arange(total, device=offsets.device)
    queries = torch.arange(first, total, device=offsets.device)[:, None]
    allowed = (keys[None] == queries)[None] | ((keys[None] <= queries)[None]
                                               & (keys[None, None] > offsets[:, None, None]))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=offsets.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def lavin_attention_mask(lengths, total, dtype):
    """Additive mask [B, 1, total, total]: key j visible to query i iff j ≤ i, j < lengths[b],
    and (j > 0 or i == 0) — nothing but itself attends to the modality token; padded queries
    see themselves (no empty softmax rows)."""
    positions = torch.arange(total, device=lengths.device)
    query, key = positions[:, None], positions[None, :]
    allowed = (key <= query) & ((key > 0) | (query == 0))
    allowed = allowed[None] & (key[None] < lengths[:, None, None])
    allowed = allowed | (query == key)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=lengths.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def build_lavin(llama, clip, config: AdapterConfig = None, *, clip_config: AdapterConfig = None,
                neck_hidden=128, clip_every=4, freeze_base=True, image_prefix_ids=None,
                text_prefix_ids=None, **settings):
    """Patch `llama` (a causal LM of any decoder family in families.py: LLaMA, Mistral, Qwen,
    Gemma, Phi-3) and `clip` (a CLIP or SigLIP vision model) with MM-Adapters and assemble a
    LavinModel; the neck maps the tower's hidden size to the decoder's.

    config: the adapters' AdapterConfig, or its fields as keywords (rank=8, temperature=10.0,
    dropout_p=0.1, placement="attn", compat=None, ...). clip_config: the vision tower's when
    it differs (e.g. another temperature; default: config; its compat must be config's).
    compat="lavin" reproduces LaVIN's code (module docstring); image_prefix_ids /
    text_prefix_ids: the tokenizer's ids of "Image: " and "Image: N/A" without BOS (LaVIN's
    engine.py encodes them with bos=False). freeze_base: only adapters, neck and modality
    embedding train. A bad call raises before anything is patched.
    """
    config = AdapterConfig.resolve(config, **settings)
    clip_config = config if clip_config is None else AdapterConfig.resolve(clip_config)
    if clip_config.compat != config.compat:
        raise ValueError(f"clip_config.compat must equal config.compat ({config.compat!r}), "
                         f"got {clip_config.compat!r}")
    _check_compat(llama, config.compat, image_prefix_ids, text_prefix_ids)
    patch_llama(llama, config, freeze_base=False)
    patch_clip_vision(clip, clip_config, freeze_base=False)
    model = LavinModel(llama, clip, neck_hidden=neck_hidden, clip_every=clip_every,
                       image_prefix_ids=image_prefix_ids, text_prefix_ids=text_prefix_ids)
    if freeze_base:
        freeze_all_but_adapters(model, extra=(model.neck, model.modality_embedding))
    return model
