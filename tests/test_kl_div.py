"""Fused KL(p‖q) between logit rows: reference, chunked torch, the compiled cpu kernels and Triton
(interpreter on CPU) against torch.nn.functional.kl_div, gradients, gradcheck, custom-op
registration, backend selection, the cpu kernels' argument errors and thread independence."""
import pytest
import torch
import torch.nn.functional as F

from mlan_kernels.ops.kl_div import kl_div_logits, kl_div_logits_backward_op, kl_div_logits_op
from mlan_kernels.reference import kl_div_logits_reference, kl_rows_grad_reference

from helpers import HAS_KL_CPU, HAS_TRITON, assert_verbose_allclose

NEG_INF = float("-inf")
# The Triton interpreter evaluates both branches of tl.where in numpy (−inf arithmetic), and the
# forward's e^(y−c−m) overflows to inf on purpose where q is far above p (the kernel then takes
# its plain formula; see triton/kl_kernels.py).
pytestmark = pytest.mark.filterwarnings(
    "ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning")
BACKENDS = ["chunked", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton")),
            pytest.param("cpu", marks=pytest.mark.skipif(not HAS_KL_CPU, reason="mlan_kernels._C is not built"))]
# Per row, |ours − F.kl_div| <= 2e-5 · (1 + |F.kl_div|) whatever the logits' dtype: the KL is
# computed in fp32 (fp16 logits are upcast exactly), so only the fp32 order of summation differs
# from the fp32 torch result computed from the same values.
ROW_TOLERANCE = dict(atol=2e-5, rtol=2e-5)


def make_logits(rows=6, vocab=300, dtype=torch.float32, seed=0):
    """logits_p, logits_q [rows, vocab]: random, very peaked, uniform, −inf entries, and q = p."""
    generator = torch.Generator().manual_seed(seed)
    p = 3 * torch.randn(rows, vocab, generator=generator)
    q = 3 * torch.randn(rows, vocab, generator=generator)
    p[1] *= 20                                   # very peaked p
    q[2] = 0.0                                   # uniform q
    p[2] = 0.0                                   # uniform p: KL(uniform‖uniform) = 0
    p[3, : vocab // 2] = NEG_INF                 # half of p's vocabulary masked out
    q[3, vocab - 7:] = NEG_INF                   # q = 0 only where p = 0 too: KL finite
    p[3, vocab - 7:] = NEG_INF
    q[4] = p[4]                                  # identical rows: KL = 0
    return p.to(dtype), q.to(dtype)


def torch_kl_rows(logits_p, logits_q):
    """Σ_v of F.kl_div(log q, log p, log_target=True) in fp32 (its 0·(−inf) nans set to 0)."""
    log_p = torch.log_softmax(logits_p.float(), -1)
    log_q = torch.log_softmax(logits_q.float(), -1)
    terms = F.kl_div(log_q, log_p, log_target=True, reduction="none")
    return torch.where(log_p == NEG_INF, 0.0, terms).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_rows_match_torch_kl_div(backend, dtype):
    p, q = make_logits(dtype=dtype)
    expected = torch_kl_rows(p, q)
    if backend == "reference":
        got = kl_div_logits_reference(p, q, reduction="none")
    else:
        got = kl_div_logits(p, q, reduction="none", backend=backend)
    assert got.dtype == torch.float32
    assert_verbose_allclose(got, expected, **ROW_TOLERANCE, name=f"KL rows ({backend}, {dtype})")
    assert got[2].abs() < 1e-6 and got[4] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_mask(backend):
    p, q = make_logits()
    mask = torch.tensor([True, False, True, True, False, True])
    p[1] = NEG_INF                                # a fully −inf row, masked out: no nan anywhere
    rows = torch_kl_rows(p, q)
    rows = torch.where(mask, rows, 0.0)
    none = kl_div_logits(p, q, mask, "none", backend)
    torch.testing.assert_close(none, rows, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(kl_div_logits(p, q, mask, "sum", backend), rows.sum(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(kl_div_logits(p, q, mask, "batchmean", backend), rows.sum() / 4,
                               rtol=2e-5, atol=2e-5)
    unmasked = kl_div_logits(p[[0, 2]], q[[0, 2]], backend=backend)
    expected = F.kl_div(torch.log_softmax(q[[0, 2]], -1), torch.log_softmax(p[[0, 2]], -1),
                        log_target=True, reduction="batchmean")
    torch.testing.assert_close(unmasked, expected, rtol=2e-5, atol=2e-5)


def test_infinite_when_q_excludes_support_of_p():
    p, q = make_logits()
    q[0, 5] = NEG_INF
    assert torch.isinf(kl_div_logits(p, q, reduction="none", backend="chunked")[0])
    assert torch.isinf(kl_div_logits_reference(p, q, reduction="none")[0])


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)],
                         ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference(backend, dtype, atol):
    p, q = make_logits(dtype=dtype)
    mask = torch.tensor([True, True, True, True, False, True])
    weights = torch.randn(6)
    p_leaf, q_leaf = p.clone().requires_grad_(), q.clone().requires_grad_()
    (kl_div_logits(p_leaf, q_leaf, mask, "none", backend) * weights).sum().backward()
    assert p_leaf.grad.dtype == dtype and q_leaf.grad.dtype == dtype
    expected_p, expected_q = kl_rows_grad_reference(p.double(), q.double(), weights.double() * mask)
    assert_verbose_allclose(p_leaf.grad, expected_p, atol=atol, rtol=1e-3, name="grad p")
    assert_verbose_allclose(q_leaf.grad, expected_q, atol=atol, rtol=1e-3, name="grad q")
    assert not torch.isnan(p_leaf.grad).any()


def test_closed_form_gradient_equals_autograd_of_reference():
    p, q = make_logits(dtype=torch.float64)
    p_leaf, q_leaf = p.clone().requires_grad_(), q.clone().requires_grad_()
    weights = torch.randn(6, dtype=torch.float64)
    (kl_div_logits_reference(p_leaf, q_leaf, reduction="none") * weights).sum().backward()
    grad_p, grad_q = kl_rows_grad_reference(p, q, weights)
    torch.testing.assert_close(p_leaf.grad, grad_p, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(q_leaf.grad, grad_q, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("fn", ["reference", "chunked"])
def test_gradcheck_fp64(fn):
    generator = torch.Generator().manual_seed(3)
    p = torch.randn(3, 11, dtype=torch.float64, generator=generator).requires_grad_()
    q = torch.randn(3, 11, dtype=torch.float64, generator=generator).requires_grad_()
    mask = torch.tensor([True, False, True])
    if fn == "reference":
        def kl(a, b):
            return kl_div_logits_reference(a, b, mask, "none")
    else:
        def kl(a, b):
            return kl_div_logits(a, b, mask, "none", backend="chunked")
    assert torch.autograd.gradcheck(kl, (p, q))


def test_batched_shape_and_empty():
    p, q = make_logits(rows=6, vocab=40)
    out = kl_div_logits(p.view(2, 3, 40), q.view(2, 3, 40), reduction="none")
    assert out.shape == (2, 3)
    torch.testing.assert_close(out.flatten(), kl_div_logits(p, q, reduction="none"))
    empty = kl_div_logits(p[:0], q[:0], reduction="batchmean")
    assert empty.item() == 0.0


@pytest.mark.parametrize("args, message", [
    (dict(logits_q=torch.zeros(4, 9)), "logits_q must have logits_p's shape"),
    (dict(logits_q=torch.zeros(4, 10, dtype=torch.float64)), "logits_q must match"),
    (dict(mask=torch.ones(5, dtype=torch.bool)), "mask must be"),
    (dict(reduction="mean"), "reduction must be one of"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(logits_p=torch.zeros(4, 10, dtype=torch.long)), "logits_p must be a floating"),
])
def test_errors_name_the_argument(args, message):
    call = dict(logits_p=torch.zeros(4, 10), logits_q=torch.zeros(4, 10))
    call.update(args)
    with pytest.raises((TypeError, ValueError), match=message):
        kl_div_logits(**call)


def test_opcheck_and_eager_equals_custom_op():
    p, q = make_logits(rows=6, vocab=33)
    mask = torch.tensor([True, False, True, True, True, False])
    for mask_arg in (None, mask):
        torch.library.opcheck(kl_div_logits_op, (p, q, mask_arg, "chunked"))   # (no autograd: KLDivFunction's)
    kl, lse_p, lse_q = kl_div_logits_op(p, q, mask, "chunked")
    torch.library.opcheck(kl_div_logits_backward_op, (torch.randn(6), p, q, mask, lse_p, lse_q, kl, "chunked"))
    eager = kl_div_logits(p, q, mask, "none", "chunked")
    torch.testing.assert_close(kl, eager, rtol=0, atol=0)


def test_torch_compile_uses_the_custom_op():
    p, q = make_logits(rows=6, vocab=33)
    p_leaf, q_leaf = p.clone().requires_grad_(), q.clone().requires_grad_()
    compiled = torch.compile(lambda a, b: kl_div_logits(a, b, backend="chunked"), backend="aot_eager",
                             fullgraph=True)
    compiled(p_leaf, q_leaf).backward()
    p_ref, q_ref = p.clone().requires_grad_(), q.clone().requires_grad_()
    kl_div_logits(p_ref, q_ref, backend="chunked").backward()
    torch.testing.assert_close(p_leaf.grad, p_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(q_leaf.grad, q_ref.grad, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-2),
                                         (torch.float32, 2e-5)], ids=["bf16", "fp16", "fp32"])
def test_triton_gpu_large_vocab(dtype, atol):
    p, q = make_logits(rows=64, vocab=32000, dtype=dtype)
    p, q = p.cuda().requires_grad_(), q.cuda().requires_grad_()
    out = kl_div_logits(p, q, reduction="none", backend="triton")
    expected = torch_kl_rows(p.detach(), q.detach())
    assert (((out - expected).abs()) / (1 + expected.abs())).max() < 1e-4
    out.sum().backward()
    grad_p, grad_q = kl_rows_grad_reference(p.detach().double(), q.detach().double(),
                                            torch.ones(64, device="cuda", dtype=torch.float64))
    # atol relative to the gradient's scale: Triton's fast exp/log leave ~1e-5 (relative to the
    # largest gradient) on elements where log p − log q − KL cancels (H100, 2026-11-23: one of
    # 2,048,000 fp32 elements off by 1.1e-5 absolute under a fixed atol of 1e-5).
    atol = atol * max(1.0, grad_p.abs().max().item())
    assert_verbose_allclose(p.grad, grad_p, atol=atol, rtol=2e-2, name="grad p")
    assert_verbose_allclose(q.grad, grad_q, atol=atol, rtol=2e-2, name="grad q")


def test_auto_backend_and_fallback_warning(monkeypatch, recwarn):
    from mlan_kernels import dispatch
    from mlan_kernels.utils import reset_warnings

    def select_kl_backend(device, dtype, requested="auto"):
        return dispatch.select_backend(device, dtype, requested, op="kl_div")
    monkeypatch.delenv("MLAN_KL_BACKEND", raising=False)
    assert select_kl_backend(torch.device("cpu"), torch.float32) == ("cpu" if HAS_KL_CPU else "chunked")
    reset_warnings()
    assert select_kl_backend(torch.device("cpu"), torch.float64) == "chunked"
    assert not [w for w in recwarn if "KL backend" in str(w.message)]     # fp64: chunked by design
    with pytest.warns(RuntimeWarning, match="KL backend 'cpu' unavailable: cpu KL supports"):
        assert select_kl_backend(torch.device("cpu"), torch.float64, "cpu") == "chunked"
    reset_warnings()
    with pytest.warns(RuntimeWarning, match="KL backend 'triton' unavailable"):
        assert select_kl_backend(torch.device("cpu"), torch.float64, "triton") == "chunked"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reset_warnings()
    with pytest.warns(RuntimeWarning, match="needs CUDA tensors"):
        assert select_kl_backend(torch.device("cpu"), torch.float32, "triton") == "chunked"


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows(backend):
    wide_p, wide_q = make_logits(vocab=310)
    p, q = wide_p[:, :300], wide_q[:, :300]                  # row stride 310, not contiguous
    expected = kl_div_logits_reference(p, q, reduction="none")
    grads_expected = kl_rows_grad_reference(p.double(), q.double(), torch.ones(6, dtype=torch.float64))
    wide_p.requires_grad_()
    p_view = wide_p[:, :300]
    got = kl_div_logits(p_view, q, reduction="none", backend=backend)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)
    (grad_p,) = torch.autograd.grad(got.sum(), (wide_p,))
    # atol 1e-4: row 1 has logits of std 60, where fp32 log-probabilities carry ~1e-5 errors.
    torch.testing.assert_close(grad_p[:, :300].double(), grads_expected[0], rtol=1e-3, atol=1e-4)
    assert (grad_p[:, 300:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise, shift", [(1e-2, 0.0), (1e-3, 5.0), (1e-4, -7.0)])
def test_nearly_equal_rows_keep_relative_accuracy(backend, noise, shift):
    """q = p + shift + small noise (two adjacent training steps): KL ~ noise²·Var/2 is far below
    fp32's ~1e-6 error of log Σe^y − log Σe^x, and must still come out to ~1 % (what κ needs)."""
    generator = torch.Generator().manual_seed(3)
    p = 3 * torch.randn(8, 4096, generator=generator)
    q = p + shift + noise * torch.randn(8, 4096, generator=generator)
    expected = kl_div_logits_reference(p.double(), q.double(), reduction="none")
    got = kl_div_logits(p, q, reduction="none", backend=backend).double()
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-11)


def hard_rows(case):
    """Rows that broke earlier versions of the accurate forward (found by a fuzz review)."""
    generator = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(2, 256, generator=generator)
    if case == "temperature":                    # p sharper than q: KL ~0.1–0.2
        return 2.5 * z, z
    if case == "confident_near":                 # one dominant token, q = p + 1e-3 noise: KL ~1e-10
        p = 2 * torch.randn(2, 600, generator=generator)
        p[:, 300] += 20
        return p, p + 1e-3 * torch.randn(2, 600, generator=generator)
    p, q = torch.zeros(1, 300), torch.zeros(1, 300)
    if case == "q_zero_where_p_tiny":            # q = 0 where p ≈ e^-82 > 0: KL = +inf
        p[0, 131], q[0, 131] = -82.0, NEG_INF
    else:                                        # q = 0 where p underflows in fp32 (e^-120): finite
        p[0, 1], q[0, 0] = 120.0, NEG_INF
    return p, q


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["temperature", "confident_near", "q_zero_where_p_tiny", "q_zero_where_p_underflows"])
def test_hard_rows(backend, case):
    p, q = hard_rows(case)
    got = kl_div_logits(p, q, reduction="none", backend=backend).double()
    expected = kl_div_logits_reference(p.double(), q.double(), reduction="none")
    if case == "q_zero_where_p_underflows":      # fp32 loses p_v = e^-120: the fp32 reference
        expected = kl_div_logits_reference(p, q, reduction="none").double()
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-2 if case == "confident_near" else 1e-4, atol=1e-11)


@pytest.mark.skipif(not HAS_KL_CPU, reason="mlan_kernels._C is not built")
@pytest.mark.parametrize("vocab", [5, 300, 4099])
def test_cpu_kernels_do_not_depend_on_the_thread_count(vocab):
    """64 rows: more than one task for every vocab here (grain = 32768 // V rows)."""
    p, q = make_logits(rows=64, vocab=vocab)
    grad = torch.randn(64, generator=torch.Generator().manual_seed(2))
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            kl, lse_p, lse_q = torch.ops.mlan_C.kl_div_forward(p, q, None)
            results.append((kl, lse_p, lse_q,
                            *torch.ops.mlan_C.kl_div_backward(grad, p, q, None, lse_p, lse_q, kl)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)
    torch.testing.assert_close(results[0][0], torch_kl_rows(p, q), rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(not HAS_KL_CPU, reason="mlan_kernels._C is not built")
@pytest.mark.parametrize("change, message", [
    (dict(logits_q=torch.zeros(4, 9)), "logits_q must have logits_p's shape"),
    (dict(logits_p=torch.zeros(4, 10, dtype=torch.float64), logits_q=torch.zeros(4, 10, dtype=torch.float64)),
     "logits_p must be float32, bfloat16 or float16"),
    (dict(logits_p=torch.zeros(4, 10).t(), logits_q=torch.zeros(4, 10).t()), "logits_p must have element stride 1"),
    (dict(logits_p=torch.zeros(40), logits_q=torch.zeros(40)), r"logits_p must be 2-D \[T, V\]"),
    (dict(mask=torch.ones(3, dtype=torch.bool)), r"mask must be \[T\] = \[4\]"),
])
def test_cpu_kernels_name_the_bad_argument(change, message):
    call = dict(logits_p=torch.zeros(4, 10), logits_q=torch.zeros(4, 10), mask=None)
    call.update(change)
    with pytest.raises(RuntimeError, match="mlan_C::kl_div_forward: " + message):
        torch.ops.mlan_C.kl_div_forward(call["logits_p"], call["logits_q"], call["mask"])
    rows = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"mlan_C::kl_div_backward: lse_p must be \[T\]"):
        torch.ops.mlan_C.kl_div_backward(rows, torch.zeros(4, 10), torch.zeros(4, 10), None,
                                         torch.zeros(3), rows, rows)
