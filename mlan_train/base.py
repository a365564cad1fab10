"""Stage 1 of the demo: a pretrained tiny base for LaVIN's recipe, made once and cached.

LaVIN tunes MM-Adapters on a frozen *pretrained* LLaMA and CLIP. The demo's base models are
tiny and are made here, on the synthetic world of mlan_kernels.data.synthetic:

  llama/      LlamaForCausalLM (+ tokenizer.json) trained as a language model on `statements`:
              the facts and words the tasks ask about ("three plus four is seven ."; the text
              tasks never in their question/answer format, which stage 2's adapters have to
              learn) and the image tasks' questions about scenes described in words ("red left
              circle . user : what shape is this ? assistant : circle"), so that stage 2 has to
              learn to put the image where the words were.
  clip/       CLIPVisionModel trained to classify the colour, shape and side of freshly rendered
              scenes from its pooled CLS token, one linear head per attribute (the heads are
              dropped). A scene's caption is exactly these three attributes, so contrastive
              image-caption training would learn the same features; the heads are its direct,
              cheaper form.
  base.json   the settings, the held-out accuracies of both models and the seconds spent.

`pretrained_base(directory, tokenizer)` reuses a directory whose base.json holds the same
settings and vocabulary, and otherwise builds it in a temporary directory renamed into place,
so an interrupted run never leaves a half-written base behind.
"""
import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mlan_kernels.data.dataset import image_pixels
from mlan_kernels.data.synthetic import COLOURS, SHAPES, SIDES, random_scene, render, statements
from mlan_kernels.data.tokenizer import WordTokenizer
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama
from mlan_kernels.training.scheduler import CosineWithWarmup

ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "side": SIDES}


@dataclass(frozen=True)
class BaseSettings:
    """Shapes and budgets of the two base models (the tiny LaVIN of the demo)."""
    dim: int = 128                # LLaMA hidden size (intermediate 4·dim)
    layers: int = 2
    heads: int = 4
    max_positions: int = 128      # LLaMA positions: prompt + answer + modality/image tokens
    clip_dim: int = 128           # CLIP hidden size (intermediate 2·clip_dim)
    clip_layers: int = 4
    image_size: int = 28
    patch_size: int = 4
    text_steps: int = 600         # AdamW steps of the language model
    vision_steps: int = 600       # AdamW steps of the vision tower
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


def _train(model: nn.Module, lr: float, steps: int, loss_at, desc: str = "", progress: bool = False) -> float:
    """`steps` AdamW steps (warm-up 5 %, cosine, clip 1.0) on loss_at(step); the last loss.
    progress: a tqdm bar named `desc`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, CosineWithWarmup(steps // 20, steps))
    for step in tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True):
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return float(loss.detach())


def _encode(texts: list, tokenizer: WordTokenizer) -> tuple:
    """(input_ids [N, T], labels [N, T]): <s> text </s>, right-padded; labels -100 on padding."""
    rows = [[tokenizer.bos_id] + ids + [tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
    labels = input_ids.masked_fill(input_ids == tokenizer.pad_id, -100)
    return input_ids, labels


# The LLaMA's corpus: described scenes three times as often as each other kind. At equal weight
# the 600-step LLaMA answered colour questions about described scenes at chance (18 %; shape
# 78 %, side 100 %), at twice 81 %, at three times 100 % (sums and repeats 100 % throughout).
CORPUS_KINDS = ("add", "bigger", "repeat", "scene", "described", "described", "described")
# Statement kinds whose last word follows from the words before it (the sum, the repeated noun,
# the asked attribute of the described scene); in the others it is a free choice.
DETERMINED_KINDS = ("add", "repeat", "described")


def last_word_accuracy(llama, texts: list, tokenizer: WordTokenizer) -> float:
    """Share of `texts` whose last word (before an optional final " .") the model predicts
    (greedy) from the words before it."""
    input_ids, _ = _encode(texts, tokenizer)
    lengths = (input_ids != tokenizer.pad_id).sum(1)          # <s> ... word [.] </s>
    with torch.no_grad():
        logits = llama(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_id)).logits
    rows = torch.arange(len(texts))
    period = tokenizer.encode(".")[0]
    word = lengths - 2 - (input_ids[rows, lengths - 2] == period).long()
    predicted = logits[rows, word - 1].argmax(-1)
    return float((predicted == input_ids[rows, word]).float().mean())


def pretrain_llama(settings: BaseSettings, tokenizer: WordTokenizer, progress: bool = False):
    """(LlamaForCausalLM in eval mode, {"loss", "seconds", "held_out_last_word_accuracy":
    {kind: accuracy} over DETERMINED_KINDS})."""
    start = time.perf_counter()
    llama = tiny_llama(seed=settings.seed, hidden_size=settings.dim, layers=settings.layers,
                       heads=settings.heads, intermediate_size=4 * settings.dim,
                       vocab_size=tokenizer.vocab_size,
                       max_position_embeddings=settings.max_positions).train()
    corpus = statements(settings.text_steps * settings.batch_size, seed=settings.seed,
                        kinds=CORPUS_KINDS)

    def loss_at(step):
        batch = corpus[step * settings.batch_size:(step + 1) * settings.batch_size]
        input_ids, labels = _encode(batch, tokenizer)
        return llama(input_ids=input_ids, attention_mask=labels != -100, labels=labels).loss

    loss = _train(llama, settings.lr, settings.text_steps, loss_at, "stage 1 LLaMA", progress)
    llama.eval()
    held_out = {kind: statements(300, settings.seed + 1, kinds=(kind,)) for kind in DETERMINED_KINDS}
    accuracy = {kind: last_word_accuracy(llama, texts, tokenizer) for kind, texts in held_out.items()}
    return llama, {"loss": loss, "seconds": time.perf_counter() - start,
                   "held_out_last_word_accuracy": accuracy}


def scenes(count: int, settings: BaseSettings, seed: int) -> tuple:
    """(pixel_values float32 [count, 3, S, S], {attribute: long [count]}) of random scenes,
    rendered and normalized exactly as the synthetic task's images are."""
    rng = np.random.default_rng([seed, 11])
    pixels, labels = [], {name: [] for name in ATTRIBUTES}
    for _ in range(count):
        scene = random_scene(rng, settings.image_size)
        pixels.append(image_pixels(render(scene, settings.image_size, rng), settings.image_size))
        for name, values in ATTRIBUTES.items():
            labels[name].append(values.index(getattr(scene, name)))
    return torch.stack(pixels), {name: torch.tensor(v) for name, v in labels.items()}


def pretrain_clip(settings: BaseSettings, progress: bool = False):
    """(CLIPVisionModel in eval mode, {"loss", "held_out_accuracy": {attribute: acc}, "seconds"})."""
    start = time.perf_counter()
    clip = tiny_clip(seed=settings.seed + 1, hidden_size=settings.clip_dim,
                     layers=settings.clip_layers, heads=4, intermediate_size=2 * settings.clip_dim,
                     image_size=settings.image_size, patch_size=settings.patch_size).train()
    heads = nn.ModuleDict({name: nn.Linear(settings.clip_dim, len(values))
                           for name, values in ATTRIBUTES.items()})
    model = nn.ModuleDict({"clip": clip, "heads": heads})
    pool = min(settings.vision_steps * settings.batch_size, 16384)
    pixels, labels = scenes(pool, settings, seed=settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)

    def loss_at(step):
        rows = torch.randint(pool, (settings.batch_size,), generator=generator)
        pooled = clip(pixel_values=pixels[rows]).pooler_output
        return sum(nn.functional.cross_entropy(heads[name](pooled), labels[name][rows])
                   for name in ATTRIBUTES)

    loss = _train(model, settings.lr, settings.vision_steps, loss_at, "stage 1 CLIP", progress)
    model.eval()
    eval_pixels, eval_labels = scenes(1000, settings, seed=settings.seed + 1)
    with torch.no_grad():
        pooled = clip(pixel_values=eval_pixels).pooler_output
    accuracy = {name: float((heads[name](pooled).argmax(-1) == eval_labels[name]).float().mean())
                for name in ATTRIBUTES}
    return clip, {"loss": loss, "seconds": time.perf_counter() - start,
                  "held_out_accuracy": accuracy}


# Bump when the stage-1 data or training changes, so that older cached bases are refused.
RECIPE = 2      # 2: "described" scenes in the corpus; the last-word metric on determined kinds


def _fingerprint(settings: BaseSettings, tokenizer: WordTokenizer) -> dict:
    vocabulary = sorted(tokenizer.tokenizer.get_vocab().items(), key=lambda item: item[1])
    return {"recipe": RECIPE, "settings": dataclasses.asdict(settings),
            "vocabulary": [word for word, _ in vocabulary]}


BASE_FILES = ("llama/config.json", "llama/model.safetensors", "llama/tokenizer.json",
              "clip/config.json", "clip/model.safetensors")


def load_base_record(directory) -> dict:
    """base.json of a finished base directory, or {} when there is none; ValueError naming the
    file when it is not a JSON object."""
    path = Path(directory) / "base.json"
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"--base {directory}: base.json is not JSON ({error}); remove the "
                         f"directory to rebuild the base") from None
    if not isinstance(record, dict):
        raise ValueError(f"--base {directory}: base.json must hold a JSON object, got "
                         f"{type(record).__name__}; remove the directory to rebuild the base")
    return record


def _check_base_files(directory: Path):
    """ValueError unless a base about to be reused has its model files (a base.json alone, or
    a base with a model deleted or emptied, is not a base)."""
    for name in BASE_FILES:
        path = directory / name
        if not path.is_file() or path.stat().st_size == 0:
            raise ValueError(f"--base {directory}: {name} is missing or empty though base.json "
                             f"describes a finished base; remove the directory to rebuild it")


def pretrained_base(directory, tokenizer: WordTokenizer, settings: BaseSettings = BaseSettings(),
                    log=print, progress: bool = False) -> dict:
    """Make (or reuse) the stage-1 base under `directory`; returns its base.json record:
    {"settings", "vocabulary", "llama": stats, "clip": stats, "reused": bool}.
    The models are at directory/llama (with tokenizer.json) and directory/clip."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # two runs asking for the same base: the second waits for the first, then reuses its base
    # (the lock is on the parent directory itself, so no lock file is left behind)
    handle = os.open(directory.parent, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        return _make_or_reuse(directory, tokenizer, settings, log, progress)
    finally:
        os.close(handle)                   # releases the lock


def _make_or_reuse(directory: Path, tokenizer, settings, log, progress) -> dict:
    wanted = _fingerprint(settings, tokenizer)
    record = load_base_record(directory)
    if record and all(record.get(key) == value for key, value in wanted.items()):
        _check_base_files(directory)
        log(f"stage 1: reusing the pretrained base in {directory}")
        return record | {"reused": True}
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"base directory {directory} holds something other than a base made "
                         f"with these settings, vocabulary and recipe; remove it or pass another one")
    log(f"stage 1: pretraining the tiny LLaMA ({settings.text_steps} steps) and CLIP "
        f"({settings.vision_steps} steps) into {directory}")
    torch.manual_seed(settings.seed)
    llama, llama_stats = pretrain_llama(settings, tokenizer, progress)
    clip, clip_stats = pretrain_clip(settings, progress)
    scratch = Path(tempfile.mkdtemp(prefix=".base-", dir=directory.parent))
    try:
        llama.save_pretrained(scratch / "llama")
        tokenizer.save(scratch / "llama" / "tokenizer.json")
        clip.save_pretrained(scratch / "clip")
        record = wanted | {"llama": llama_stats, "clip": clip_stats}
        (scratch / "base.json").write_text(json.dumps(record, indent=2) + "\n")
        if directory.exists():
            directory.rmdir()
        scratch.rename(directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log("stage 1: LLaMA held-out last-word accuracy " + ", ".join(
            f"{kind} {value:.1%}" for kind, value in llama_stats["held_out_last_word_accuracy"].items())
        + f" ({llama_stats['seconds']:.0f} s); CLIP held-out accuracy " + ", ".join(
            f"{name} {value:.1%}" for name, value in clip_stats["held_out_accuracy"].items())
        + f" ({clip_stats['seconds']:.0f} s)")
    return record | {"reused": False}


def settings_of(config) -> BaseSettings:
    """The base a TrainConfig's tiny-model options and --base-steps describe (LLaMA positions
    for --max-length tokens after the modality token and the image tokens)."""
    from .config import max_length
    positions = max(BaseSettings.max_positions, max_length(config) + 1 + config.clip_layers // config.clip_every)
    return BaseSettings(dim=config.dim, layers=config.layers, heads=config.heads,
                        max_positions=positions, text_steps=config.base_steps,
                        vision_steps=config.base_steps,
                        clip_dim=config.clip_dim, clip_layers=config.clip_layers,
                        image_size=config.image_size, patch_size=config.patch_size,
                        seed=config.base_seed)


def with_pretrained_base(config, rank: int = 0, world_size: int = 1):
    """`config` with --llama/--clip set to the stage-1 base in config.base, which rank 0 makes
    first when it is not there (the others wait). The tokenizer is the data's (or --tokenizer)."""
    from .tokenizers import load_tokenizer
    if rank == 0:
        tokenizer = load_tokenizer(config)
        if not isinstance(tokenizer, WordTokenizer):
            raise ValueError(f"--base {config.base}: needs the synthetic task's word tokenizer, "
                             f"got {type(tokenizer).__name__}")
        pretrained_base(config.base, tokenizer, settings_of(config), progress=config.progress)
    if world_size > 1:
        torch.distributed.barrier()
    return dataclasses.replace(config, llama=str(Path(config.base) / "llama"),
                               clip=str(Path(config.base) / "clip"))
