"""How the MM-Adapter's Triton backend sizes its launches (mlan_kernels/backends/triton.py), as
properties a GPU user relies on and a CPU can check:

* pass B's row splits: each split is a whole number of row blocks, together they cover every
  token and none is empty; on a GPU with S multiprocessors the splits aim at 4·S programs
  (splits × column blocks), rounded to whole row blocks, so no more than that; under the
  interpreter there is one split;
* the launch configuration a GPU gets (its tuned tiles per kernel, several row splits, 3xTF32
  for fp32) computes what the oracle does: run here through the interpreter by making the
  backend believe it is on a GPU with 2 multiprocessors (D not a multiple of any tile, tokens
  not a multiple of any row block), for fp32 and for fp16 activations with fp32 parameters
  (whose gradients must meet the fp32 tolerance: the hi+lo split of the weights), at rank 8
  and 16 (32 rank slots: the bias needs one past the rank);
* a backward handed slots its own forward did not save (another backend's forward) is refused
  with the shape it needs and the shape it got, before any launch;
* the multiprocessor count is read from x's own GPU (the current one for a bare "cuda"), and
  not at all under the interpreter.
"""
import itertools
import math
import re

import pytest
import torch

from helpers import (HAS_TRITON, assert_close_to_reference, make_adapter_inputs, oracle,
                     random_grad, run_op)
from triton_launches import pretend_gpu

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="no triton")


def test_row_splits_cover_every_token_in_whole_blocks_aiming_at_four_programs_per_sm():
    from mlan_kernels.backends.triton import _row_splits
    for case in itertools.product([1, 63, 64, 65, 320, 1000, 32768], [64, 100, 4096], [16, 64],
                                  [32, 128], [None, 1, 132]):
        tokens, dim, block_n, block_d, multiprocessors = case
        splits, rows = _row_splits(*case)
        assert rows > 0 and rows % block_n == 0, case
        assert splits * rows >= tokens > (splits - 1) * rows, case     # all covered, none empty
        aim = 1 if multiprocessors is None else max(
            1, math.ceil(4 * multiprocessors / math.ceil(dim / block_d)))
        # the fewest whole row blocks per split with which `aim` splits cover the tokens
        assert rows * aim >= tokens > (rows - block_n) * aim, case
        assert splits <= aim, case


def test_the_multiprocessor_count_is_read_from_the_tensors_own_gpu(monkeypatch):
    import mlan_kernels.backends.triton as backend
    monkeypatch.setattr(backend, "_sm_count", lambda index: {1: 132, 3: 78}[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert backend._multiprocessors(torch.device("cpu")) is None
    monkeypatch.setattr("mlan_kernels.utils.triton_interpreter", lambda: False)  # a GPU run
    assert backend._multiprocessors(torch.device("cuda", 3)) == 78
    assert backend._multiprocessors(torch.device("cuda")) == 132
    assert backend._multiprocessors(torch.device("cpu")) is None
    monkeypatch.setattr("mlan_kernels.utils.triton_interpreter", lambda: True)
    assert backend._multiprocessors(torch.device("cuda", 3)) is None


@pytest.mark.parametrize("dtype, rank, dropout_p", [
    (torch.float32, 8, 0.0), (torch.float16, 8, 0.25), (torch.float32, 16, 0.25),
    (torch.float16, 16, 0.0)])                     # rank 16: 32 slots (15 would fit in 16)
def test_the_gpu_launch_configuration_computes_what_the_oracle_does(monkeypatch, dtype, rank,
                                                                     dropout_p):
    pretend_gpu(monkeypatch, 2)
    inputs = make_adapter_inputs(3, 45, 300, rank, 3, 1, dtype, "cpu", param_dtype=torch.float32)
    grad_y = random_grad((3, 45, 300), dtype, "cpu")
    hyper = dict(dropout_p=dropout_p, seed=5, groups=1, scale=0.5)
    y, grads = run_op("triton", inputs, grad_y, **hyper)
    y_ref, grads_ref = oracle(inputs, grad_y, **hyper)
    assert_close_to_reference(y, y_ref, dtype, name="y")
    for name, grad in grads_ref.items():
        assert_close_to_reference(grads[name], grad, name=name)


def test_a_backward_refuses_slots_its_own_forward_did_not_save():
    import mlan_kernels.backends.triton as backend
    inputs = make_adapter_inputs(2, 5, 40, 4, 2, 1, torch.float32, "cpu")
    parameters = [inputs[name] for name in ("down_weight", "down_bias", "up_weight", "up_bias",
                                            "router_weight")]
    x = inputs["x"]
    y, h, routing_weights, saved = backend.forward_routed(
        x, *parameters, inputs["router_bias"], None, 1.0, 10.0, 0.0, None, 1, False, False)
    other = saved[:, :-1]
    message = (f"the triton MM-Adapter backward needs the slots its own forward saved (shape "
               f"{tuple(saved.shape)}), got {list(other.shape)}: did the forward run another backend?")
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        backend.backward_routed(torch.ones_like(y), None, x, h, routing_weights, other, *parameters,
                                None, 1.0, 10.0, 0.0, None, 1, False)
