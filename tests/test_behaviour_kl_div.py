"""kl_div_logits as a user relies on it (ops/kl_div.py and its chunked backend).

* Every bad argument raises an error naming it, what it must be and what it got (whole message).
* A mask may be given in any integer/float 0-1 form and any leading shape: it selects the same
  rows as the bool mask; "none" keeps the leading shape, with 0 on unselected rows.
* Empty inputs (no rows, or an empty vocabulary) give zeros of the compute dtype, and their
  gradients are zeros of the logits' shape.
* Unselected rows are never read: garbage in them (NaN) reaches neither the value nor the
  gradients. Logits with any strides, a single row [V], and a mask on another device work.
* The requested backend is the one that runs, forward and backward.
* batchmean over one (selected) row is that row's KL.
* Gradients of 16-bit logits come back 16-bit from every backend (through autograd and from
  kl_rows_backward itself).
* The oracle (reference/kl.py) defaults to the op's reduction and refuses others, and its closed-form gradients of
  16-bit logits are computed and returned in fp32.
"""
import re

import pytest
import torch

from mlan_kernels import dispatch
from mlan_kernels.ops.kl_div import KLDivFunction, kl_div_logits, kl_rows, kl_rows_backward, kl_rows_forward
from mlan_kernels.reference import kl_div_logits_reference, kl_rows_grad_reference

from helpers import HAS_KL_CPU, HAS_TRITON, spy_on_backends

BACKENDS = ["chunked", pytest.param("cpu", marks=pytest.mark.skipif(not HAS_KL_CPU, reason="mlan_kernels._C is not built"))]
# With the Triton backend under the interpreter (slower: only for the masked-row and dtype tests).
WITH_TRITON = BACKENDS + [pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]


def logits(*shape, dtype=torch.float32, seed=0):
    return (3 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


@pytest.mark.parametrize("change, error, message", [
    (dict(logits_p=[[1.0, 2.0]]), TypeError, "logits_p must be a floating-point tensor [..., V], got list"),
    (dict(logits_q=torch.zeros(4, 10, dtype=torch.long)), TypeError,
     "logits_q must be a floating-point tensor [..., V], got torch.int64"),
    (dict(logits_p=torch.tensor(1.0)), ValueError,
     "logits_p must have a last (vocabulary or hidden) dim, got a 0-d tensor"),
    (dict(logits_q=torch.tensor(1.0)), ValueError,
     "logits_q must have a last (vocabulary or hidden) dim, got a 0-d tensor"),
    (dict(logits_q=torch.zeros(4, 9)), ValueError, "logits_q must have logits_p's shape [4, 10], got [4, 9]"),
    (dict(logits_q=torch.zeros(4, 10, dtype=torch.float64)), TypeError,
     "logits_q must match logits_p's dtype/device (torch.float32, cpu), got (torch.float64, cpu)"),
    (dict(logits_q=torch.zeros(4, 10, device="meta")), TypeError,
     "logits_q must match logits_p's dtype/device (torch.float32, cpu), got (torch.float32, meta)"),
    (dict(mask=torch.ones(5, dtype=torch.bool)), ValueError,
     "mask must be a tensor of shape [4] (logits_p without its last dim), got [5]"),
    (dict(mask=[True] * 4), ValueError, "mask must be a tensor of shape [4] (logits_p without its last dim), got list"),
    (dict(logits_p=torch.zeros(2, 3, 10), logits_q=torch.zeros(2, 3, 10), mask=torch.ones(3, dtype=torch.bool)),
     ValueError, "mask must be a tensor of shape [2, 3] (logits_p without its last dim), got [3]"),
    (dict(logits_p=torch.zeros(0, 10), logits_q=torch.zeros(0, 10), backend="fused"), ValueError,   # no rows: still checked
     "backend must be one of ('auto', 'triton', 'cpu', 'chunked'), got 'fused' (argument `backend` or env MLAN_KL_BACKEND)"),
    (dict(reduction="mean"), ValueError,
     "reduction must be one of ('batchmean', 'sum', 'none'), got 'mean' ('mean' is not accepted: "
     "F.kl_div's 'mean' divides by T·V)"),
])
def test_errors_name_the_argument_what_it_must_be_and_what_it_got(change, error, message):
    call = dict(logits_p=torch.zeros(4, 10), logits_q=torch.zeros(4, 10))
    call.update(change)
    with pytest.raises(error, match="^" + re.escape(message) + "$"):
        kl_div_logits(**call)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", [torch.long, torch.float32, torch.uint8])
def test_a_mask_in_any_0_1_form_selects_the_same_rows(backend, form):
    p, q = logits(2, 3, 40), logits(2, 3, 40, seed=1)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    expected = kl_div_logits(p, q, mask, "none", backend)
    assert expected.shape == (2, 3) and (expected[~mask] == 0).all() and (expected[mask] > 0).all()
    rows = kl_div_logits(p.view(6, 40), q.view(6, 40), None, "none", backend).view(2, 3)
    torch.testing.assert_close(expected, torch.where(mask, rows, 0.0))
    for reduction in ("none", "sum", "batchmean"):
        torch.testing.assert_close(kl_div_logits(p, q, mask.to(form), reduction, backend),
                                   kl_div_logits(p, q, mask, reduction, backend))
    torch.testing.assert_close(kl_div_logits(p, q, mask, "batchmean", backend), rows[mask].mean())


@pytest.mark.parametrize("dtype, compute", [(torch.float16, torch.float32), (torch.float64, torch.float64)])
@pytest.mark.parametrize("shape", [(0, 7), (3, 0)])
def test_empty_inputs_give_zeros(shape, dtype, compute):
    p, q = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    kl, lse_p, lse_q = kl_rows_forward(p, q, None)
    for out in (kl, lse_p, lse_q):
        assert out.shape == (shape[0],) and out.dtype == compute and not out.any()
    grad_p, grad_q = kl_rows_backward(torch.ones(shape[0], dtype=compute), p, q, None, lse_p, lse_q, kl)
    for grad, logits_ in ((grad_p, p), (grad_q, q)):
        assert grad.shape == shape and grad.dtype == dtype and grad is not logits_ and not grad.any()
    inplace = kl_rows_backward(torch.ones(shape[0], dtype=compute), p, q, None, lse_p, lse_q, kl, inplace=True)
    assert inplace[0] is p and inplace[1] is q


def test_empty_vocabulary_rows_are_zero_and_writable_apart():
    p = torch.zeros(3, 0)
    kl, lse_p, lse_q = kl_rows_forward(p, p, None)
    kl += 1                                    # three separate results
    assert lse_p.tolist() == [0.0] * 3 and lse_q.tolist() == [0.0] * 3


def test_in_place_backward_needs_contiguous_logits_and_no_mask():
    p, q = logits(4, 10), logits(4, 10, seed=1)
    kl, lse_p, lse_q = kl_rows_forward(p, q, None)
    grad = torch.ones(4)
    message = "^inplace=True needs contiguous logits and mask=None$"
    with pytest.raises(ValueError, match=message):
        kl_rows_backward(grad, p, q, torch.ones(4, dtype=torch.bool), lse_p, lse_q, kl, inplace=True)
    for strided in ((p.t().contiguous().t(), q), (p, q.t().contiguous().t())):
        with pytest.raises(ValueError, match=message):
            kl_rows_backward(grad, *strided, None, lse_p, lse_q, kl, inplace=True)
    expected = kl_rows_backward(grad, p, q, None, lse_p, lse_q, kl)
    got = kl_rows_backward(grad, p, q, None, lse_p, lse_q, kl, inplace=True)
    assert got[0] is p and got[1] is q
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_many_rows_of_a_small_vocabulary(backend, masked):
    """150 rows (three blocks of 64 in the chunked backend) of 5 logits: every row's KL and
    gradients, also where there are more rows than vocabulary entries."""
    p, q = logits(150, 5), logits(150, 5, seed=1)
    mask = torch.rand(150, generator=torch.Generator().manual_seed(2)) < 0.7 if masked else None
    grad = torch.randn(150, generator=torch.Generator().manual_seed(3))
    kl, lse_p, lse_q = kl_rows_forward(p, q, mask, backend)
    grad_p, grad_q = kl_rows_backward(grad, p, q, mask, lse_p, lse_q, kl, backend)
    expected_kl = kl_div_logits_reference(p.double(), q.double(), mask, "none")
    expected_p, expected_q = kl_rows_grad_reference(p.double(), q.double(), grad.double())
    if mask is not None:
        expected_p, expected_q = expected_p * mask[:, None], expected_q * mask[:, None]
    torch.testing.assert_close(kl.double(), expected_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_p.double(), expected_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_q.double(), expected_q, rtol=1e-5, atol=1e-5)
    if mask is None:                         # in place: each block read before it is written
        in_place = kl_rows_backward(grad, p.clone(), q.clone(), None, lse_p, lse_q, kl, backend,
                                    inplace=True)
        torch.testing.assert_close(in_place, (grad_p, grad_q), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_backward_op_gives_unselected_rows_no_gradient(backend):
    """KL_t is 0 on unselected rows whatever the logits, so its gradient there is 0 whatever
    grad_kl holds (e.g. a sum over every row of kl_div_logits_op's output)."""
    p, q = logits(6, 33), logits(6, 33, seed=1)
    mask = torch.tensor([True, False, True, True, False, False])
    kl, lse_p, lse_q = torch.ops.mlan.kl_div_logits(p, q, mask, backend)
    assert (kl[~mask] == 0).all()
    grad_p, grad_q = torch.ops.mlan.kl_div_logits_backward(torch.ones(6), p, q, mask, lse_p, lse_q,
                                                           kl, backend)
    assert not grad_p[~mask].any() and not grad_q[~mask].any()
    assert grad_p[mask].abs().amin(-1).gt(0).all() and grad_q[mask].abs().amin(-1).gt(0).all()


@pytest.mark.parametrize("backend", WITH_TRITON)
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_garbage_in_unselected_rows_reaches_neither_the_value_nor_the_gradients(backend, reduction):
    """Padding rows may hold anything (here NaN): with them unselected, the value and both
    gradients equal those of the selected rows alone, and the padding rows get gradient 0."""
    p, q = logits(2, 4, 30), logits(2, 4, 30, seed=1)
    mask = torch.tensor([[True, True, False, True], [False, True, True, False]])
    p[~mask], q[~mask] = float("nan"), float("nan")
    p.requires_grad_(True), q.requires_grad_(True)
    out = kl_div_logits(p, q, mask, reduction, backend)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    grad_p, grad_q = torch.autograd.grad((out * weights).sum(), (p, q))
    clean_p, clean_q = (t.detach()[mask].double().requires_grad_(True) for t in (p, q))
    rows = kl_div_logits_reference(clean_p, clean_q, None, "none")
    expected = {"none": torch.zeros(2, 4, dtype=torch.float64).masked_scatter(mask, rows),
                "sum": rows.sum(), "batchmean": rows.mean()}[reduction]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    expected_p, expected_q = torch.autograd.grad((expected * weights.double()).sum(), (clean_p, clean_q))
    for got, want in ((grad_p, expected_p), (grad_q, expected_q)):
        assert not got[~mask].any() and bool(got.isfinite().all())
        torch.testing.assert_close(got[mask].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_with_any_strides_give_the_contiguous_result(backend):
    """Every other column of a wider buffer (last-dim stride 2), a transposed buffer (stride T)
    and a vocabulary slice of padded rows: the same KL and gradients as contiguous copies."""
    base_p, base_q = logits(5, 46), logits(5, 46, seed=1)
    views = [lambda t: t[:, ::2],                                  # [5, 23], stride (46, 2)
             lambda t: t[:, :23].t().contiguous().t(),             # [5, 23], stride (1, 5)
             lambda t: t[:, 3:26]]                                 # [5, 23], stride (46, 1)
    grad = torch.randn(5, generator=torch.Generator().manual_seed(2))
    for view in views:
        p, q = view(base_p), view(base_q)
        kl, lse_p, lse_q = kl_rows_forward(p, q, None, backend)
        expected = kl_rows_forward(p.contiguous(), q.contiguous(), None, backend)
        torch.testing.assert_close((kl, lse_p, lse_q), expected, rtol=1e-6, atol=1e-6)
        got = kl_rows_backward(grad, p, q, None, lse_p, lse_q, kl, backend)
        want = kl_rows_grad_reference(p.double(), q.double(), grad.double())
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_logits_are_one_row(backend):
    p, q = logits(17), logits(17, seed=1)
    for reduction in ("none", "sum", "batchmean"):
        got = kl_div_logits(p, q, None, reduction, backend)
        assert got.shape == ()
        torch.testing.assert_close(got, kl_div_logits_reference(p, q, None, reduction))


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_a_mask_on_another_device_is_moved_to_the_logits(reduction):
    """A CPU mask with device logits (meta tensors stand in for a GPU here)."""
    p = torch.zeros(2, 3, 10, device="meta")
    out = kl_div_logits(p, p, torch.ones(2, 3, dtype=torch.bool), reduction)
    assert out.device.type == "meta" and out.shape == ((2, 3) if reduction == "none" else ())


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_requested_backend_runs_forward_and_backward(backend, monkeypatch):
    calls = spy_on_backends(monkeypatch, "kl_div", dispatch.names("kl_div"))
    p = logits(4, 10).requires_grad_(True)
    kl_div_logits(p, logits(4, 10, seed=1), backend=backend).backward()
    assert calls == [(backend, "forward"), (backend, "backward")]


def test_the_log_sum_exps_carry_no_gradient():
    """KLDivFunction's lse outputs are marked non-differentiable: a loss on them raises instead
    of silently giving no gradient."""
    p, q = logits(3, 8).requires_grad_(True), logits(3, 8, seed=1).requires_grad_(True)
    kl, lse_p, lse_q = KLDivFunction.apply(p, q, None, "chunked")
    assert kl.requires_grad and not lse_p.requires_grad and not lse_q.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_padded_logits_reach_the_kernels_without_a_copy(backend, monkeypatch):
    """A vocabulary slice of padded rows (last-dim stride 1) is read in place: no [T, V] copy."""
    module, seen = dispatch.get_backend(backend, op="kl_div"), []
    original = module.forward
    monkeypatch.setattr(module, "forward", lambda p, q, mask: seen.append((p, q)) or original(p, q, mask))
    padded_p, padded_q = logits(5, 46), logits(5, 46, seed=1)
    p, q = padded_p[:, 3:26], padded_q[:, 3:26]
    kl_rows_forward(p, q, None, backend)
    assert [(a.data_ptr(), a.stride()) for a in seen[0]] == [(p.data_ptr(), (46, 1)), (q.data_ptr(), (46, 1))]


@pytest.mark.parametrize("backend", WITH_TRITON)
def test_differentiable_rows_are_zero_on_unselected_rows(backend):
    """kl_rows (the per-row KL behind every reduction): exactly 0 where the mask is False, even
    over NaN logits, and the KL of the row elsewhere."""
    p, q = logits(6, 20), logits(6, 20, seed=1)
    mask = torch.tensor([True, False, True, False, False, True])
    p[~mask] = float("nan")
    rows = kl_rows(p, q, mask, backend)
    assert rows[~mask].tolist() == [0.0] * 3
    torch.testing.assert_close(rows[mask], kl_div_logits_reference(p[mask], q[mask], None, "none"))


def test_the_oracles_default_reduction_is_the_ops():
    p, q = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(4)).unbind(0)
    want = kl_div_logits_reference(p, q, None, "batchmean")
    torch.testing.assert_close(kl_div_logits_reference(p, q), want)
    torch.testing.assert_close(kl_div_logits(p, q), want)
    with pytest.raises(ValueError, match=r"^reduction must be one of \('batchmean', 'sum', 'none'\), got 'mean'$"):
        kl_div_logits_reference(p, q, None, "mean")


def test_the_closed_form_gradients_of_16_bit_logits_are_computed_in_fp32():
    """bf16 logits and fp64 row gradients: the closed form (kl_rows_grad_reference) computes and
    returns in the logits' compute dtype (fp32), equal to autograd of the fp64 KL of the same
    values within fp32 rounding."""
    generator = torch.Generator().manual_seed(5)
    p, q = (torch.randn(4, 50, generator=generator).bfloat16() for _ in range(2))
    grad = torch.rand(4, generator=generator, dtype=torch.float64)
    got_p, got_q = kl_rows_grad_reference(p, q, grad)
    leaves = [t.double().requires_grad_() for t in (p, q)]
    kl = (torch.softmax(leaves[0], -1) * (torch.log_softmax(leaves[0], -1) - torch.log_softmax(leaves[1], -1))).sum(-1)
    want_p, want_q = torch.autograd.grad(kl, leaves, grad)
    assert got_p.dtype == got_q.dtype == torch.float32
    torch.testing.assert_close(got_p.double(), want_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_q.double(), want_q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", WITH_TRITON)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradients_of_16_bit_logits_are_16_bit_and_match_fp64(backend, dtype):
    """Each backend returns the logits' gradients in the logits' dtype (as autograd would),
    within that dtype's rounding of the fp64 closed form; the KL itself is fp32."""
    p, q = (logits(3, 40, seed=seed).to(dtype).requires_grad_(True) for seed in (5, 6))
    out = kl_div_logits(p, q, None, "none", backend)
    grad = torch.rand(3, generator=torch.Generator().manual_seed(7))
    grad_p, grad_q = torch.autograd.grad(out, (p, q), grad)
    want_p, want_q = kl_rows_grad_reference(p.detach().double(), q.detach().double(), grad.double())
    assert out.dtype == torch.float32 and grad_p.dtype == grad_q.dtype == dtype
    torch.testing.assert_close(grad_p.double(), want_p, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(grad_q.double(), want_q, rtol=1e-2, atol=1e-3)
    # the backward function itself (autograd would cast a wrong dtype back, hiding it)
    kl, lse_p, lse_q = kl_rows_forward(p.detach(), q.detach(), None, backend)
    direct = kl_rows_backward(grad, p.detach(), q.detach(), None, lse_p, lse_q, kl, backend)
    assert [g.dtype for g in direct] == [dtype, dtype]
    torch.testing.assert_close(direct, (grad_p, grad_q), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_batchmean_of_one_row_is_that_rows_kl(backend):
    """One row, or one selected row of several: batchmean divides by 1 (the count's floor of 1
    only applies to no rows at all)."""
    p, q = logits(3, 25, seed=8), logits(3, 25, seed=9)
    row = kl_div_logits_reference(p[1:2], q[1:2], None, "sum")
    torch.testing.assert_close(kl_div_logits(p[1:2], q[1:2], None, "batchmean", backend), row)
    torch.testing.assert_close(kl_div_logits(p, q, torch.tensor([False, True, False]), "batchmean", backend), row)
    torch.testing.assert_close(kl_div_logits_reference(p, q, torch.tensor([False, True, False])), row)
