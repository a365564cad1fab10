"""Run a function as every rank of a process group inside this interpreter: one thread per
rank over torch's "threaded" backend (torch.testing._internal.distributed.multi_threaded_pg,
the one PyTorch's own distributed tests use). Collectives, barriers and DDP behave as across
processes, and a test sees every rank's return value. Mutation testing (python/mutation.py)
reaches this multi-rank code; it cannot reach the torchrun tests, whose fresh interpreters
import the unmutated package. Those stay: they check the launch, gloo and the CLI.

Limits: the threads share torch's global RNG (per-rank seeds race) and transformers' lazy
imports (the model classes are imported here first).
"""
import threading

import pytest
import torch
import torch.distributed as dist

try:
    from torch.testing._internal.distributed.multi_threaded_pg import (
        ProcessLocalGroup, _install_threaded_pg, _uninstall_threaded_pg)
except ImportError:                                      # a private module: may move
    ProcessLocalGroup = None


def run_ranks(world_size: int, fn, timeout: float = 120.0) -> list:
    """[fn(rank) for every rank], each rank in its own thread inside an initialized process
    group of `world_size`; the first rank's exception is raised here (the others are woken)."""
    if ProcessLocalGroup is None:
        pytest.skip("this torch has no threaded process group (torch.testing._internal)")
    from transformers import CLIPVisionModel, LlamaForCausalLM  # noqa: F401 (before the threads)
    store, results, errors = dist.HashStore(), [None] * world_size, []

    def rank_main(rank):
        dist.init_process_group("threaded", rank=rank, world_size=world_size, store=store)
        try:
            results[rank] = fn(rank)
        except BaseException as error:  # noqa: B036 (re-raised in the caller)
            errors.append(error)
            ProcessLocalGroup.exception_handle(error)            # wakes ranks in a collective
        finally:
            dist.destroy_process_group()

    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    _install_threaded_pg()
    try:
        threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout)
        ProcessLocalGroup.reset()
    finally:
        _uninstall_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
    if errors:
        raise errors[0]
    assert not any(thread.is_alive() for thread in threads), f"a rank ran over {timeout} s"
    return results
