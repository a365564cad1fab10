"""One rank of the 2-process HF Trainer test (run by torchrun from tests/test_hf_trainer.py):
trains the example's tiny LaVIN and writes, per rank, its adapter weights and what it saw."""
import importlib.util
import json
import os
import sys

from safetensors.torch import save_file

from mlan_kernels.integrations.checkpoint import adapter_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example():
    spec = importlib.util.spec_from_file_location(
        "example_hf_trainer", os.path.join(ROOT, "python", "example_hf_trainer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv):
    example = load_example()
    args = example.build_parser().parse_args(argv)
    trainer = example.make_trainer(args)
    seen, step = [], trainer.training_step

    def recording(model, inputs, *rest, **options):     # every micro-batch: modality + content
        seen.append({"image": inputs["has_image"].tolist(), "ids_sum": int(inputs["input_ids"].sum())})
        return step(model, inputs, *rest, **options)
    trainer.training_step = recording
    trainer.train()
    rank = trainer.args.process_index
    weights = {k: v.detach().contiguous() for k, v in adapter_state_dict(trainer.model).items()}
    save_file(weights, os.path.join(args.out, f"rank{rank}.safetensors"))
    callback = next(c for c in trainer.callback_handler.callbacks
                    if isinstance(c, example.BalanceCallback))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump({"seen": seen, "world_size": trainer.args.world_size,
                   "kappa": [r["kappa_ema"] for r in callback.monitor.records],
                   "lr": callback.lr_history}, handle)
    del trainer, callback, recording, step          # the DDP model goes before the process group
    example.end_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
