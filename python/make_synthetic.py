"""Write the synthetic MLAN mixture (train/eval JSONL, PNGs, tokenizer.json, meta.json).

    python python/make_synthetic.py OUT_DIR [--train N] [--eval N] [--seed S] [--image-size 28]
"""
import argparse
import json
import time

from mlan_kernels.data.synthetic import make_synthetic
from mlan_kernels.help_format import DefaultsHelpFormatter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("out_dir", help="directory to write (created)")
    parser.add_argument("--train", type=int, default=4000, help="train records")
    parser.add_argument("--eval", type=int, default=400, help="held-out records")
    parser.add_argument("--seed", type=int, default=0, help="seed of the records and images")
    parser.add_argument("--image-size", type=int, default=28, help="image side in pixels")
    parser.add_argument("--image-fraction", type=float, default=0.5,
                        help="share of records with an image")
    args = parser.parse_args()
    start = time.perf_counter()
    result = make_synthetic(args.out_dir, train_size=args.train, eval_size=args.eval,
                            seed=args.seed, image_size=args.image_size,
                            image_fraction=args.image_fraction)
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
