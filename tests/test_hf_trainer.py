"""transformers.Trainer integration (mlan_kernels/training/hf_trainer.py): Trainer.train() on the
tiny LaVIN with synthetic data — learning, κ rows, per-side LRs, adapter-only checkpoints,
resume, gradient checkpointing, torch_compile, PEFT, 2 processes on gloo, the example."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("accelerate")
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from mlan_kernels.integrations.checkpoint import WEIGHTS_NAME, adapter_state_dict, load_adapters  # noqa: E402
from mlan_kernels.data import InstructionDataset, WordTokenizer, load_records, make_synthetic  # noqa: E402
from mlan_kernels.integrations.lavin import build_lavin  # noqa: E402
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama  # noqa: E402
from mlan_kernels.training.hf_trainer import (BalanceCallback, MlanCollator, MlanTrainer,  # noqa: E402
                                              side_param_groups)
from mlan_kernels.training.scheduler import GROUP_KEY, balance_multipliers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "python", "example_hf_trainer.py")
LR = 1e-2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthetic")
    make_synthetic(directory, train_size=96, eval_size=0, seed=3)
    tokenizer = WordTokenizer.load(directory / "tokenizer.json")
    records, _ = load_records(directory / "train.jsonl")
    return InstructionDataset(records, tokenizer, image_size=28, max_length=32), str(directory)


def tiny_model(vocab_size, lora=False):
    llama = tiny_llama(seed=0, hidden_size=32, layers=1, heads=2, intermediate_size=64,
                       vocab_size=vocab_size, max_position_embeddings=40)
    if lora:
        import peft
        llama = peft.get_peft_model(llama, peft.LoraConfig(r=2, target_modules=["gate_proj", "up_proj"]))
    clip = tiny_clip(seed=1, hidden_size=32, layers=4, heads=4, intermediate_size=64)
    torch.manual_seed(2)
    return build_lavin(llama, clip, rank=4, dropout_p=0.0).train()   # LaVIN's trainable set (+ LoRA)


def make_trainer(dataset, out, steps=8, callbacks=None, model=None, **options):
    values = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                  learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                  logging_steps=1, save_steps=4, report_to=[], seed=0, use_cpu=True,
                  disable_tqdm=True, remove_unused_columns=False)
    values.update(options)
    return MlanTrainer(model=model or tiny_model(dataset.tokenizer.vocab_size),
                       args=TrainingArguments(**values), train_dataset=dataset,
                       data_collator=MlanCollator(dataset.tokenizer.pad_id), language_share=0.5,
                       callbacks=callbacks or [BalanceCallback(probe_every=2, alpha=1.0)])


def weights(model):
    return {name: tensor.detach().clone() for name, tensor in adapter_state_dict(model).items()}


def assert_same_weights(left, right, atol=0.0):
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], atol=atol, rtol=0, msg=name)


def test_trains_logs_kappa_scales_lrs_and_saves_adapters(data, tmp_path):
    dataset, _ = data
    trainer = make_trainer(dataset, tmp_path, steps=16, gradient_accumulation_steps=2)
    before = weights(trainer.model)
    trainer.train()
    groups = trainer.optimizer.param_groups
    assert [group[GROUP_KEY] for group in groups] == ["feature", "language"]
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 16 and sum(losses[-4:]) < 0.97 * sum(losses[:4])
    rows = [json.loads(line) for line in open(tmp_path / "balance.jsonl")]
    assert [row["step"] for row in rows] == list(range(0, 16, 2))
    assert all(row["kappa"] > 0 and {"kl_feat", "kl_lang", "m_feat", "loss"} <= set(row) for row in rows)
    # the LR each side stepped with = lr x balance_multipliers(κ̂ of the last earlier probe)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, BalanceCallback))
    assert len(callback.lr_history) == 16
    for used in callback.lr_history:
        earlier = [row["kappa_ema"] for row in rows if row["step"] < used["step"]]
        expected = balance_multipliers(earlier[-1] if earlier else None, 1.0, (0.1, 10.0))
        assert used["lr_feature"] == pytest.approx(LR * expected["feature"], rel=1e-9)
        assert used["lr_language"] == pytest.approx(LR * expected["language"], rel=1e-9)
    assert any(abs(used["m_feat"] - 1) > 1e-3 for used in callback.lr_history)
    assert os.path.getsize(tmp_path / "balance.png") > 0
    # every save is adapter-only and loads (bit-exact) into a fresh model
    saved = tmp_path / "checkpoint-16"
    assert (saved / WEIGHTS_NAME).is_file() and not (saved / "model.safetensors").exists()
    fresh = tiny_model(dataset.tokenizer.vocab_size)
    load_adapters(fresh, saved)
    trained = weights(trainer.model)
    assert_same_weights(weights(fresh), trained)
    assert any(not torch.equal(before[name], trained[name]) for name in before)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_continues_exactly(data, tmp_path):
    dataset, _ = data
    straight = make_trainer(dataset, tmp_path / "straight", steps=8)
    straight.train()
    first = make_trainer(dataset, tmp_path / "split", steps=8,
                         callbacks=[BalanceCallback(probe_every=2, alpha=1.0), StopAt(4)])
    first.train()
    assert first.state.global_step == 4
    resumed = make_trainer(dataset, tmp_path / "split", steps=8)
    resumed.train(resume_from_checkpoint=True)                 # finds checkpoint-4
    assert resumed.state.global_step == 8
    callback = next(c for c in resumed.callback_handler.callbacks if isinstance(c, BalanceCallback))
    assert [row["step"] for row in callback.monitor.records] == [4, 6]
    assert_same_weights(weights(resumed.model), weights(straight.model), atol=1e-6)


@pytest.mark.parametrize("start_step, probed", [(None, [6, 8]), (0, [0, 2, 4, 6, 8]), (3, [4, 6, 8])])
def test_probes_start_after_warm_up_unless_told(data, tmp_path, start_step, probed):
    """Default start_step = TrainingArguments.get_warmup_steps (here warmup_steps=5)."""
    dataset, _ = data
    trainer = make_trainer(dataset, tmp_path, steps=10, warmup_steps=5, save_steps=100,
                           lr_scheduler_type="constant_with_warmup",
                           callbacks=[BalanceCallback(probe_every=2, alpha=1.0, plot=False,
                                                      start_step=start_step)])
    trainer.train()
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, BalanceCallback))
    assert [row["step"] for row in callback.monitor.records] == probed


@pytest.fixture(scope="module")
def plain_run(data, tmp_path_factory):
    """Adapter weights after 2 steps of the default setup (the reference for the variants)."""
    trainer = make_trainer(data[0], tmp_path_factory.mktemp("plain"), steps=2, save_steps=100)
    trainer.train()
    return weights(trainer.model)


# transformers 5.x renamed gradient_checkpointing (a deprecated alias there) to activation_checkpointing
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in
                 TrainingArguments.__dataclass_fields__ else "gradient_checkpointing")


def test_gradient_checkpointing_trains_the_same(data, plain_run, tmp_path):
    dataset, _ = data
    trainer = make_trainer(dataset, tmp_path, steps=2, save_steps=100, **{CHECKPOINTING: True})
    llama = trainer.model.llama
    assert getattr(llama, "is_activation_checkpointing", None) or llama.is_gradient_checkpointing
    trainer.train()
    assert_same_weights(weights(trainer.model), plain_run, atol=1e-6)


def test_torch_compile_trains_the_same_and_saves_clean_names(data, plain_run, tmp_path):
    dataset, _ = data
    trainer = make_trainer(dataset, tmp_path, steps=2, save_steps=2, torch_compile=True,
                           torch_compile_backend="aot_eager")
    trainer.train()
    assert trainer.model_wrapped is not trainer.model              # it did run compiled
    assert_same_weights(weights(trainer.model), plain_run, atol=1e-5)
    load_adapters(tiny_model(dataset.tokenizer.vocab_size), tmp_path / "checkpoint-2")


def test_bf16_autocast_on_cpu_trains_close_to_fp32(data, plain_run, tmp_path):
    """bf16=True (CPU autocast): the adapter weights stay fp32 masters, and the update points
    the way the fp32 run's does (Adam's first steps are ~lr per element whatever the gradient's
    size, so bf16 rounding flips only near-zero components: compare directions)."""
    dataset, _ = data
    initial = weights(tiny_model(dataset.tokenizer.vocab_size))
    trainer = make_trainer(dataset, tmp_path, steps=2, save_steps=100, bf16=True)
    trainer.train()
    trained = weights(trainer.model)
    assert all(tensor.dtype == torch.float32 for tensor in trained.values())
    assert any(not torch.equal(trained[name], plain_run[name]) for name in trained)  # autocast ran
    delta = torch.cat([(trained[name] - initial[name]).flatten() for name in initial])
    reference = torch.cat([(plain_run[name] - initial[name]).flatten() for name in initial])
    assert delta.norm() > 0.5 * reference.norm()
    assert torch.nn.functional.cosine_similarity(delta, reference, dim=0) > 0.9


def test_peft_wrapped_llama_trains_saves_and_resumes(data, tmp_path):
    pytest.importorskip("peft")
    dataset, _ = data
    trainer = make_trainer(dataset, tmp_path, steps=3, save_steps=3,
                           model=tiny_model(dataset.tokenizer.vocab_size, lora=True))
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    start = {n: p.detach().clone() for n, p in lora.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)    # nothing trainable outside the checkpoints
        trainer.train()
    language = [g for g in trainer.optimizer.param_groups if g[GROUP_KEY] == "language"][0]
    assert all(any(p is q for q in language["params"]) for p in lora.values())
    assert any(not torch.equal(start[n], p) for n, p in lora.items())
    saved = tmp_path / "checkpoint-3"
    assert (saved / "peft" / "llama" / WEIGHTS_NAME).is_file() and (saved / WEIGHTS_NAME).is_file()
    fresh = make_trainer(dataset, tmp_path / "again", steps=3,
                         model=tiny_model(dataset.tokenizer.vocab_size, lora=True))
    fresh._load_from_checkpoint(str(saved))
    assert_same_weights(weights(fresh.model), weights(trainer.model))
    reloaded = dict(fresh.model.named_parameters())
    assert all(torch.equal(reloaded[n], p) for n, p in lora.items())


def test_two_processes_see_the_same_modality_and_end_identical(data, tmp_path):
    _, directory = data
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "tests", "hf_trainer_worker.py"), "--data", directory,
               "--out", str(tmp_path), "--steps", "6", "--batch-size", "2", "--grad-accum", "2",
               "--layers", "1", "--probe-every", "2", "--save-steps", "6"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert all(rank["world_size"] == 2 for rank in ranks)
    seen = [rank["seen"] for rank in ranks]
    assert len(seen[0]) == len(seen[1]) == 12                  # 6 steps x 2 micro-batches
    for mine, theirs in zip(*seen):                            # one modality per global batch
        assert len(set(mine["image"] + theirs["image"])) == 1
    assert any(m["ids_sum"] != t["ids_sum"] for m, t in zip(*seen))   # disjoint shards
    assert ranks[0]["kappa"] == ranks[1]["kappa"] and ranks[0]["lr"] == ranks[1]["lr"]
    assert_same_weights(load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors"))
    load_adapters(_example_model(directory), tmp_path / "checkpoint-6")


def _example_model(directory):
    """The example's model for this data (what the worker trained)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from hf_trainer_worker import load_example
    example = load_example()
    args = example.build_parser().parse_args(["--layers", "1"])
    return example.build_model(args, WordTokenizer.load(os.path.join(directory, "tokenizer.json")).vocab_size)


def test_example_runs_and_shows_defaults(data, tmp_path):
    _, directory = data
    shown = subprocess.run([sys.executable, EXAMPLE, "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "(default: 60)" in shown.stdout
    result = subprocess.run([sys.executable, EXAMPLE, "--data", directory, "--out", str(tmp_path),
                             "--steps", "4", "--batch-size", "4", "--layers", "1",
                             "--probe-every", "2", "--save-steps", "4"],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps 4" in result.stdout
    for name in ("final/" + WEIGHTS_NAME, "checkpoint-4/" + WEIGHTS_NAME, "balance.jsonl"):
        assert os.path.getsize(tmp_path / name) > 0
    load_adapters(_example_model(directory), tmp_path / "final")


def test_errors_name_the_argument(data, tmp_path):
    dataset, _ = data
    with pytest.raises(ValueError, match="probe_every"):
        BalanceCallback(probe_every=0)
    with pytest.raises(ValueError, match="probe_on"):
        BalanceCallback(probe_on="text")
    with pytest.raises(ValueError, match="start_step must be None or an int >= 0, got -1"):
        BalanceCallback(start_step=-1)
    with pytest.raises(ValueError, match="side_of"):
        side_param_groups(tiny_model(dataset.tokenizer.vocab_size), side_of=lambda name: "vision")
    trainer = make_trainer(dataset, tmp_path, steps=1)
    trainer.train_dataset = list(range(8))
    with pytest.raises(ValueError, match="train_dataset"):
        trainer.get_train_dataloader()
    groups = side_param_groups(tiny_model(dataset.tokenizer.vocab_size), weight_decay=0.1)
    assert [(g[GROUP_KEY], g["weight_decay"]) for g in groups] == [
        ("feature", 0.1), ("feature", 0.0), ("language", 0.1), ("language", 0.0)]


@pytest.mark.gpu
def test_deepspeed_zero2_trains_and_saves_adapters(data, tmp_path):
    pytest.importorskip("deepspeed")
    _, directory = data
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               EXAMPLE, "--data", directory, "--out", str(tmp_path), "--steps", "4",
               "--layers", "1", "--save-steps", "4",
               "--deepspeed", os.path.join(ROOT, "python", "deepspeed_zero2.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    load_adapters(_example_model(directory), tmp_path / "checkpoint-4")


def test_mlan_trainer_takes_a_hf_tokenizer_and_a_llava_json_without_glue(tmp_path):
    import inspect
    from transformers import Trainer
    from user_data import llava_dataset, tiny_hf_tokenizer
    data, images = llava_dataset(tmp_path, count=16)
    tokenizer = tiny_hf_tokenizer()
    tokenizer.pad_token = "</s>"                                  # pad id 2, not the default 0
    records, _ = load_records(data, image_root=images)
    dataset = InstructionDataset(records, tokenizer, image_size=28, max_length=32)
    parameters = inspect.signature(Trainer.__init__).parameters
    keyword = "processing_class" if "processing_class" in parameters else "tokenizer"
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, save_steps=2, report_to=[],
                             per_device_train_batch_size=4, use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False)
    trainer = MlanTrainer(model=tiny_model(len(tokenizer)), args=args, train_dataset=dataset,
                          language_share=0.5, **{keyword: tokenizer})
    assert isinstance(trainer.data_collator, MlanCollator) and trainer.data_collator.pad_id == 2
    assert MlanCollator(dataset.tokenizer).pad_id == 2 and MlanCollator(5).pad_id == 5
    trainer.train()
    assert os.path.isfile(tmp_path / "out" / "checkpoint-2" / WEIGHTS_NAME)
    assert os.path.isfile(tmp_path / "out" / "checkpoint-2" / "tokenizer_config.json")
