"""Train-step throughput of a trained LavinModel per adapter backend (fused vs reference).

Same batches, same weights: forward + backward of the whole model (no optimizer step), timed
with `mlan_kernels.testing.measure` (median of `repeats` passes), tokens/s = (text + image
tokens) / median pass time.
"""
import torch

from mlan_kernels.data.dataset import split_by_modality
from mlan_kernels.dispatch import select_backend
from mlan_kernels.integrations import set_backend
from mlan_kernels.testing import measure
from .batches import batch_to, iterate_batches


def _step(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()


def _pass(trainer, module, prepared):
    for inputs, _ in prepared:
        with trainer.autocast():
            _step(module, inputs)


def backend_throughput(trainer, backends=("auto", "reference"), batches: int = 6, repeats: int = 3) -> list:
    """[{"backend", "resolved", "tokens_per_s", "median_step_s"}] for each backend, on
    `batches` held-out batches of each modality (restores the configured backend)."""
    module, device = trainer.module, trainer.device
    text, image = split_by_modality(trainer.eval_set)
    size = trainer.config.batch_size
    prepared = []
    for indices in (text[:batches * size], image[:batches * size]):
        for batch in iterate_batches(trainer.eval_set, indices, size, trainer.tokenizer.pad_id):
            tokens = int(batch["attention_mask"].sum()) + trainer.image_tokens * int(batch["has_image"].sum())
            prepared.append((batch_to(batch, device), tokens))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    was_training = module.training
    module.train()
    try:
        for backend in backends:
            set_backend(module, backend)
            _step(module, prepared[0][0])                          # warm-up
            seconds = measure(lambda: _pass(trainer, module, prepared), device, warmup=0,
                              iters=repeats)["median_ms"] / 1e3
            rows.append({"backend": backend, "resolved": select_backend(device, dtype, backend),
                         "tokens_per_s": sum(t for _, t in prepared) / seconds,
                         "median_pass_s": seconds, "batches": len(prepared)})
    finally:
        set_backend(module, trainer.config.backend)
        module.zero_grad(set_to_none=True)
        module.train(was_training)
    return rows
