"""The training and held-out sets of the training program, from what the user has: a LLaVA
.json list or JSONL file (or a directory with train.json(l) and eval.json(l)), an image folder,
an optional held-out file or a held-out share of the training file. Prints one line per file
read (records, images, skipped and why) on rank 0."""
import os

from mlan_kernels.data.dataset import InstructionDataset
from mlan_kernels.data.records import find_data_files, load_records, split_records
from .config import MAX_TRUNCATED_SHARE, max_length


def image_size(config) -> int:
    """The side the built-in preprocessing resizes to: the --clip checkpoint's, else --image-size."""
    if config.clip:
        from transformers import CLIPVisionConfig
        return CLIPVisionConfig.from_pretrained(config.clip, local_files_only=True).image_size
    return config.image_size


def _records(config, path):
    records, report = load_records(path, image_root=config.image_folder,
                                   max_image_pixels=config.max_image_pixels or None,
                                   allow_absolute_images=config.allow_absolute_image_paths)
    return records, report


def data_paths(config) -> list:
    """The data files a run reads: the training file and the held-out file (or None)."""
    train_path, eval_path = find_data_files(config.data)
    return [train_path, config.eval_data or eval_path]


def load_datasets(config, tokenizer, image_processor=None, rank: int = 0):
    """(train InstructionDataset, held-out InstructionDataset (may be empty), {file name:
    {"loaded", "images", "skipped", "reasons", "truncated", "answers_truncated",
    "unknown_tokens"}}). ValueError when --max-length cuts too many answers."""
    train_path, eval_path = data_paths(config)
    options = {"image_size": image_size(config), "max_length": max_length(config),
               "template": config.template, "image_processor": image_processor,
               "strict_vocab": config.strict_vocab}
    records, report = _records(config, train_path)
    line = report.describe(os.path.basename(train_path))
    held_out, held_report = [], None
    if config.eval_fraction > 0:
        records, held_out = split_records(records, config.eval_fraction, seed=config.seed)
        line += f"; {len(held_out)} of them held out (--eval-fraction {config.eval_fraction:g})"
    elif eval_path is not None:
        held_out, held_report = _records(config, eval_path)
        line += "; " + held_report.describe(os.path.basename(eval_path))
    else:
        line += "; no held-out set (pass --eval-data or --eval-fraction)"
    if rank == 0:
        print("data: " + line)
    train = InstructionDataset(records, tokenizer, **options)
    held = InstructionDataset(held_out, tokenizer, **options)
    reports = {os.path.basename(train_path): (report, train)}
    if held_report is not None:
        reports[os.path.basename(eval_path)] = (held_report, held)
    files = {}
    for name, (file_report, dataset) in reports.items():
        if rank == 0 and dataset.truncated:
            print(f"{name}: {dataset.truncated} of {len(dataset)} samples truncated to "
                  f"--max-length {max_length(config)} tokens")
        check_truncation(config, name, dataset)
        files[name] = {"loaded": file_report.loaded, "images": file_report.images,
                       "skipped": file_report.skipped, "reasons": file_report.reasons,
                       "truncated": dataset.truncated, "answers_truncated": dataset.answers_truncated,
                       "unknown_tokens": dataset.unknown_tokens}
    return train, held, files


def check_truncation(config, name, dataset):
    """ValueError when --max-length cuts answer tokens of more than MAX_TRUNCATED_SHARE of
    the records (unless --allow-truncation)."""
    share = dataset.answers_truncated / max(len(dataset), 1)
    if share > MAX_TRUNCATED_SHARE and not config.allow_truncation:
        raise ValueError(
            f"--max-length {max_length(config)} cuts answer tokens of {share:.1%} of "
            f"{name}'s records ({dataset.answers_truncated} of {len(dataset)}; at most "
            f"{MAX_TRUNCATED_SHARE:.0%} accepted): raise --max-length or pass --allow-truncation")
