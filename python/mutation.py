"""Mutation testing of one module with mutmut 3 (`make mutation MODULE=mlan_kernels/...py`).

mutmut copies the package into a scratch directory, rewrites every function of MODULE into a
trampoline over its mutants (one plausible one-token bug each: `<` -> `<=`, `+` -> `-`, a
constant changed, an argument dropped, ...), runs the module's tests once to learn which test
reaches which function, then runs only those tests against each mutant. A mutant is killed
when a test fails; a surviving one is a bug no test would notice (or an equivalent change).

The scratch directory is build/mutation/<module>/ (its own setup.cfg: mutmut's config lives
there, not in pyproject.toml); `cd` there and run `../../../.venv/bin/mutmut show <name>` to
read a survivor. Not part of `make test` or CI: one module takes minutes (docs/testing.md).
"""
import argparse
import fnmatch
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mlan_kernels.help_format import DefaultsHelpFormatter

ROOT = Path(__file__).resolve().parent.parent

# Tests that exercise each module. Subprocess-based tests (DDP, FSDP) are left out: they
# import the unmutated package in a fresh interpreter, so they cost time and kill nothing (the
# trainer's multi-rank code is reached in-process by tests/test_behaviour_trainer_ranks.py).
_OP_TESTS = ["tests/test_reference.py", "tests/test_mm_adapter_op.py", "tests/test_op_paths.py",
             "tests/test_module.py", "tests/test_behaviour_mm_adapter_op.py",
             "tests/test_behaviour_routing.py::test_a_loss_on_returned_routing_weights_reaches_the_router"]
_KL_TESTS = ["tests/test_kl_div.py", "tests/test_kl_fused_linear.py",
             "tests/test_behaviour_fused_linear_kl.py", "tests/test_behaviour_kl_div.py",
             "tests/test_launch_counts.py"]
_GRAD_SCALE_TESTS = ["tests/test_grad_scale.py", "tests/test_behaviour_grad_scale.py"]
_INTEGRATION_TESTS = ["tests/test_integration_llama.py", "tests/test_integration_lavin.py",
                      "tests/test_behaviour_merge.py", "tests/test_behaviour_lavin.py",
                      "tests/test_behaviour_routing.py", "tests/test_hf_compat.py"]
_TRAINER_TESTS = ["tests/test_behaviour_trainer.py", "tests/test_behaviour_trainer_run.py",
                  "tests/test_behaviour_trainer_ranks.py", "tests/test_train_mixed.py",
                  "tests/test_train_faults.py", "tests/test_train_auxiliary.py",
                  "-k", "not ddp and not fsdp2 and not console_scripts"]
TESTS = {
    # The oracle's own tests (for time: _OP_TESTS makes a survivor cost minutes), and the
    # compiled backend's, the ones that call the backward oracle directly.
    "mlan_kernels/reference/mm_adapter.py": ["tests/test_reference.py",
                                             "tests/test_behaviour_reference.py",
                                             "tests/test_compiled_backend.py"],
    # Without the Triton-interpreted and compile cases (they compare the same oracle calls).
    "mlan_kernels/reference/kl.py": _KL_TESTS + ["-k", "not triton and not torch_compile"],
    "mlan_kernels/reference/grad_scale.py": _GRAD_SCALE_TESTS,
    # Without the compile cases (they cannot trace mutmut's trampoline, a ContextVar).
    "mlan_kernels/functional.py": ["tests/test_reference.py", "tests/test_behaviour_reference.py",
                                   "tests/test_kl_div.py", "tests/test_behaviour_kl_div.py",
                                   "-k", "not triton and not torch_compile"],
    # The registry's own tests only: every op test reaches select_backend, so each mutant would
    # run them all (minutes); test_dispatch.py states the policy (~3 s).
    "mlan_kernels/dispatch.py": ["tests/test_dispatch.py"],
    # Without the Triton-interpreted cases (~2 min a survivor; the cpu and reference backends
    # reach the same lines) and the compile cases (they cannot trace the trampoline).
    "mlan_kernels/ops/mm_adapter.py": _OP_TESTS + [
        "-k", "not triton and not torch_compile and not compiled_graph"],
    # test_mm_adapter_op.py is left out for time (~55 s a survivor; it makes only valid calls).
    "mlan_kernels/ops/validation.py": ["tests/test_validation.py",
                                       "tests/test_behaviour_validation.py"],
    # The Triton-interpreted cases are left out for time (~9 s each; the cpu and chunked
    # backends reach the same lines of these two modules). Their functions run inside
    # torch.compile in the compile tests, which cannot trace mutmut's trampoline (a ContextVar):
    # left out too, or the baseline fails ("failed to collect stats").
    "mlan_kernels/ops/kl_div.py": _KL_TESTS + ["-k", "not triton and not torch_compile"],
    "mlan_kernels/ops/fused_linear_kl.py": _KL_TESTS + ["-k", "not triton and not torch_compile"],
    "mlan_kernels/ops/grad_scale.py": _GRAD_SCALE_TESTS,
    # The "reference" backend's cases only (the whole _OP_TESTS take ~2 min a survivor).
    "mlan_kernels/backends/plain_torch.py": [
        "tests/test_mm_adapter_op.py", "tests/test_op_paths.py", "tests/test_behaviour_mm_adapter_op.py",
        "tests/test_behaviour_routing.py::test_a_loss_on_returned_routing_weights_reaches_the_router",
        "-k", "reference and not triton"],
    "mlan_kernels/backends/kl_chunked.py": _KL_TESTS + ["-k", "not triton"],
    "mlan_kernels/backends/kl_compiled.py": _KL_TESTS + ["-k", "not triton and not torch_compile"],
    "mlan_kernels/backends/kl_triton.py": _KL_TESTS + [
        "tests/test_behaviour_triton_launch_rules.py::test_the_kl_launches_legal_gpu_kernels_on_its_inputs_device",
        "-k", "triton and not torch_compile"],
    "mlan_kernels/backends/grad_scale_foreach.py": _GRAD_SCALE_TESTS,
    "mlan_kernels/backends/grad_scale_triton.py": _GRAD_SCALE_TESTS + [
        "tests/test_behaviour_triton_launch_rules.py::test_grad_scaling_launches_legal_gpu_kernels_on_its_grads_device"],
    # test_compiled_backend.py only (~13 s): with _OP_TESTS (~2 min) each survivor costs that.
    "mlan_kernels/backends/compiled.py": ["tests/test_compiled_backend.py"],
    # The Triton-interpreted cases only (the other backends never reach this module); the
    # compile cases cannot trace mutmut's trampoline.
    "mlan_kernels/backends/triton.py": _OP_TESTS + [
        "tests/test_launch_budget.py", "tests/test_behaviour_triton_launch.py",
        "tests/test_behaviour_triton_launch_rules.py::test_the_mm_adapter_launches_legal_gpu_kernels_on_its_inputs_device",
        "tests/test_dispatch.py", "-k", "triton and not torch_compile and not compiled_graph"],
    # The compile test is left out for time (~10 s a survivor; eager equality is tested apart).
    "mlan_kernels/integrations/patching.py": _INTEGRATION_TESTS + [
        "tests/test_behaviour_patching.py", "tests/test_lavin_compat.py",
        "tests/test_integration_checkpoint.py::test_peft_lora_and_mm_adapters_train_together_and_save_separately",
        "tests/test_integration_checkpoint.py::test_build_lavin_with_a_peft_wrapped_llama_freezes_the_clip_base",
        "-k", "not torch_compile"],
    # The merge tests only (_INTEGRATION_TESTS costs ~10 s a mutant).
    "mlan_kernels/integrations/merge.py": [
        "tests/test_behaviour_merge.py",
        "tests/test_integration_llama.py::test_merge_and_unmerge",
        "tests/test_integration_llama.py::test_merge_rejects_mixed_routing_and_explicit_vector_merges",
        "tests/test_integration_llama.py::test_unpatched_refuses_merged_adapters",
        "tests/test_integration_llama.py::test_clip_patch_identity_per_image_routing_and_merge",
        "tests/test_integration_lavin.py::test_merge_per_modality"],
    "mlan_kernels/integrations/lavin.py": _INTEGRATION_TESTS + [
        "tests/test_behaviour_lavin_assembly.py", "tests/test_lavin_compat.py",
        "tests/test_sampling.py", "tests/test_families.py::test_lavin_assembly_on_any_pair",
        "-k", "not torch_compile"],
    "mlan_kernels/integrations/checkpoint.py": ["tests/test_behaviour_checkpoint.py",
                                               "tests/test_integration_checkpoint.py",
                                               "tests/test_lavin_checkpoint.py",
                                               "tests/test_behaviour_lavin.py"],
    # The file checks alone: test_integration_checkpoint.py reaches them through load_adapters
    # on tiny models (seconds a mutant) and asserts fewer of the messages.
    "mlan_kernels/integrations/checkpoint_validation.py": ["tests/test_behaviour_checkpoint_validation.py"],
    "mlan_kernels/data/llava_grouping.py": ["tests/test_data_sampler_llava.py",
                                            "tests/test_behaviour_sampler.py"],
    "mlan_kernels/data/sampler.py": ["tests/test_data_sampler_batches.py",
                                     "tests/test_data_sampler_mixture.py",
                                     "tests/test_data_sampler_llava.py",
                                     "tests/test_behaviour_sampler.py"],
    # test_kappa_stability's resume test (an mlan-train run, ~4 s a mutant) is left out for time.
    "mlan_kernels/training/balance.py": ["tests/test_balance_auxiliary.py",
                                         "tests/test_balance_monitor.py", "tests/test_scheduler.py",
                                         "tests/test_kappa_stability.py",
                                         "tests/test_behaviour_balance.py",
                                         "-k", "not test_resume_keeps_the_stable_kappa_state"],
    "mlan_kernels/training/auxiliary.py": ["tests/test_balance_auxiliary.py",
                                           "tests/test_behaviour_auxiliary.py"],
    # The trainer tests are left out for time (~35 s a survivor; every one reaches get_lr):
    # the scores in docs/testing.md count only these two files.
    "mlan_kernels/training/scheduler.py": ["tests/test_scheduler.py",
                                           "tests/test_behaviour_scheduler.py"],
    "mlan_train/trainer.py": _TRAINER_TESTS,
}

# Files some tests read relative to tests/ (the README's tables, the benchmark scripts): mutmut
# copies them next to its copy of tests/, or those tests fail before any mutation.
_ALSO_COPY = ("README.md", "benchmarks")


def prepare(module: str, tests: list, work: Path) -> None:
    """A fresh scratch directory: links to the package, tests and pyproject, and setup.cfg."""
    if work.exists():
        subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    for name in ("mlan_kernels", "mlan_train", "tests", "pyproject.toml") + _ALSO_COPY:
        (work / name).symlink_to(ROOT / name)
    package = module.split("/")[0]               # mlan_kernels, or mlan_train for the trainer
    lines = ["[mutmut]", f"source_paths = {package}", f"only_mutate = {module}",
             "also_copy ="] + [f"    {name}" for name in _ALSO_COPY] + [
             "pytest_add_cli_args_test_selection ="] + [f"    {test}" for test in tests] + [
             "pytest_add_cli_args =", "    -p", "    no:cacheprovider", "    -q",
             "process_isolation = forkserver", "use_git_change_detection = false"]
    (work / "setup.cfg").write_text("\n".join(lines) + "\n")


def tally(work: Path, module: str, only=None) -> dict:
    """{status: [mutant names]} from mutmut's per-file results (mutants/<module>.meta), of the
    mutants matching one of the `only` patterns when given."""
    from mutmut.stats import status_by_exit_code
    meta = json.loads((work / "mutants" / (module + ".meta")).read_text())
    results = {}
    for name, code in meta["exit_code_by_key"].items():
        if only is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in only):
            results.setdefault(status_by_exit_code[code], []).append(name)
    return results


def run_module(module: str, tests: list, max_children: int, only=None) -> int:
    """mutmut on one module (or on its mutants matching `only`, mutmut name patterns); prints
    the score and every mutant not killed. Returns mutmut's code."""
    work = ROOT / "build" / "mutation" / module.replace("/", "_").removesuffix(".py")
    prepare(module, tests, work)
    mutmut = Path(sys.executable).parent / "mutmut"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.perf_counter()
    run = subprocess.run([str(mutmut), "run", "--max-children", str(max_children), *(only or [])],
                         cwd=work, env=env)
    seconds = time.perf_counter() - start
    results = tally(work, module, only)
    counts = {status: len(names) for status, names in sorted(results.items())}
    total = sum(counts.values())
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    print(f"\n{module}: {killed}/{total} killed ({100 * killed / max(total, 1):.1f} %), "
          f"{counts} in {seconds / 60:.1f} min (scratch: {work.relative_to(ROOT)})")
    for status, names in sorted(results.items()):
        for name in names if status not in ("killed", "timeout") else ():
            print(f"  {status}: {name}")
    return run.returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("modules", nargs="+", help="e.g. mlan_kernels/integrations/merge.py, or all")
    parser.add_argument("--tests", type=shlex.split, metavar="'ARGS'",
                        help="pytest arguments as one string, e.g. \"tests/test_a.py -k 'not triton'\" "
                             "(default: the module's table entry)")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1,
                        help="mutants tested in parallel (default: the CPU count)")
    parser.add_argument("--only", nargs="+", metavar="PATTERN",
                        help="only the mutants whose names match, e.g. "
                             "'mlan_train.trainer.xǁMixedTrainerǁ_probe_now__mutmut_*' (default: all)")
    args = parser.parse_args(argv)
    modules = list(TESTS) if args.modules == ["all"] else args.modules
    unknown = [module for module in modules if module not in TESTS and not args.tests]
    if unknown:
        parser.error(f"no test list for {unknown}; pass --tests (known: {', '.join(TESTS)})")
    codes = [run_module(module, args.tests or TESTS[module], args.max_children, args.only)
             for module in modules]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
