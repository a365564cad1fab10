"""Padding ratio and mixed-modality batches of the two groupings of ModalityLengthBatchSampler
(ours: grouping="modality"; MLAN's: grouping="llava"), on the synthetic set and on a
long-tailed length distribution. Prints a markdown table (the README's).

    python benchmarks/sampler_grouping.py [--world 8 --batch 8 --accum 1 --share 0.875]

Padding ratio: padded positions / all positions when every per-rank batch of every rank is
right-padded to its longest sample (lengths = tokens). Mixed: global batches (one micro-step
of all ranks) holding both modalities. Samples: dropped (-) or repeated to fill (+).
"""
import argparse
import random
import tempfile

from mlan_kernels.data import (InstructionDataset, MixtureSampler, ModalityLengthBatchSampler,
                               WordTokenizer, load_records, make_synthetic)


def synthetic_set(size=4000):
    """(token lengths, has_image) of the synthetic training set (python/make_synthetic.py)."""
    with tempfile.TemporaryDirectory() as directory:
        make_synthetic(directory, train_size=size, eval_size=8)
        tokenizer = WordTokenizer.load(f"{directory}/tokenizer.json")
        dataset = InstructionDataset(load_records(f"{directory}/train.jsonl")[0], tokenizer)
        return dataset.lengths, dataset.has_image


def long_tailed_set(size=8000, image_share=0.5, seed=0):
    """Log-normal token lengths (median ~90, tail to 2048), image samples ~1.5x longer."""
    rng = random.Random(seed)
    has_image = [rng.random() < image_share for _ in range(size)]
    lengths = [min(2048, max(8, int(rng.lognormvariate(4.5, 0.9) * (1.5 if image else 1.0))))
               for image in has_image]
    return lengths, has_image


def measure(lengths, has_image, grouping, options):
    text = [i for i, image in enumerate(has_image) if not image]
    image = [i for i, image in enumerate(has_image) if image]
    mixture = MixtureSampler(text, image, options.share, seed=0, resample_each_epoch=False)
    extra = {"gradient_accumulation_steps": options.accum} if grouping == "llava" else {}
    sampler = ModalityLengthBatchSampler(mixture, lengths, has_image, options.batch, options.world,
                                         grouping=grouping, **extra)
    batches = sampler.global_batches(0)
    per_rank = [sampler.rank_batch(batch, rank) for batch in batches for rank in range(options.world)]
    total = sum(max(lengths[i] for i in b) * len(b) for b in per_rank if b)
    real = sum(lengths[i] for b in per_rank for i in b)
    served = sum(len(b) for b in batches)
    return {"padding": (total - real) / total, "mixed": sampler.mixed_batch_count(0),
            "batches": len(batches), "samples": served - mixture.num_samples,
            "n": mixture.num_samples}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--world", type=int, default=8, help="ranks")
    parser.add_argument("--batch", type=int, default=8, help="per-rank batch size")
    parser.add_argument("--accum", type=int, default=1, help="grad-accum steps (llava mega-batch)")
    parser.add_argument("--share", type=float, default=0.875, help="language share of the mixture")
    options = parser.parse_args(argv)
    print(f"world {options.world} x batch {options.batch}, grad-accum {options.accum}, "
          f"language share {options.share}\n")
    for line in table(options):
        print(line)


def table(options):
    """The markdown table's lines (header first)."""
    lines = ["| data | samples | grouping | padding ratio | mixed-modality global batches "
             "| dropped (-) / repeated (+) |", "|---|---|---|---|---|---|"]
    for name, data in (("synthetic", synthetic_set()), ("long-tailed", long_tailed_set())):
        for grouping, label in (("modality", "modality (ours)"), ("llava", "llava (MLAN)")):
            result = measure(*data, grouping, options)
            lines.append(f"| {name} | {result['n']:,} | {label} | {result['padding']:.3f} | "
                         f"{result['mixed']} of {result['batches']} | {result['samples']:+d} |")
    return lines


if __name__ == "__main__":
    main()
