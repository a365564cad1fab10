"""The compiled backends (mlan_kernels._C, csrc/): the low-level ops torch.ops.mlan_C.* and the
`cpu`/`cuda` backends behind mlan::mm_adapter, against the oracle and the reference backend.
The low-level ops take the dropout seed as a 1-element int64 tensor on x's device (the kernels
read it); the backends' forward/backward also take an int (the backend contract).

CPU tests need the extension (`make test` builds it; skipped when it is not built). GPU tests
are marked `gpu` and need an extension built with CUDA.
"""
import sys
import warnings

import importlib

import pytest
import torch

from helpers import (assert_close_to_reference, assert_within_pytorch_error, explicit_weights, grads_of,
                     make_adapter_inputs, oracle, random_grad)
from launch_counter import LaunchCounter
from mlan_kernels import dispatch, mm_adapter
from mlan_kernels.reference import (dropout_keep_mask, mm_adapter_backward_reference,
                                    mm_adapter_reference)

compiled = pytest.importorskip("mlan_kernels.backends.compiled",
                               reason="mlan_kernels._C is not built")
TOKEN_NAMES = ("x", "down_weight", "down_bias", "up_weight", "up_bias")


def backend_args(shape, dtype, device="cpu", p=0.3, seed=77, scale=0.7, param_dtype=None):
    """Positional args of the backends' forward: (x, 4 params, routing_weights [B, E] fp32, scale,
    dropout_p, seed, groups), fp32 params unless param_dtype says otherwise."""
    B, L, D, r, E, g = shape
    param_dtype = param_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    inputs = make_adapter_inputs(*shape, dtype, device, param_dtype=param_dtype)
    weights = explicit_weights(B, E, torch.float64 if dtype == torch.float64 else torch.float32,
                               device)
    return [inputs[name] for name in TOKEN_NAMES] + [weights, scale, p, seed, g]


def run_backend(module, args, single_modality=False, grad_y=None):
    """(y, h, six gradients) of a backend module for backend_args-style args."""
    x, down_weight, down_bias, up_weight, up_bias, weights, scale, p, seed, groups = args
    y, h = module.forward(*args, single_modality)
    grad_y = random_grad(x.shape, x.dtype, x.device) if grad_y is None else grad_y
    grads = module.backward(grad_y, x, h, weights, down_weight, down_bias, up_weight, up_bias,
                            scale, p, seed, groups)
    return (y, h) + tuple(grads)


class oracle_backend:
    """The oracle (mlan_kernels.reference) behind the backends' forward/backward contract."""

    @staticmethod
    def forward(x, down_weight, down_bias, up_weight, up_bias, weights, scale, p, seed, groups,
                single_modality):
        y, h, _ = mm_adapter_reference(x, down_weight, down_bias, up_weight, up_bias,
                                       weights=weights, scale=scale, dropout_p=p, seed=seed,
                                       groups=groups)
        return y, h

    @staticmethod
    def backward(grad_y, x, h, weights, down_weight, down_bias, up_weight, up_bias, scale, p,
                 seed, groups):
        return mm_adapter_backward_reference(grad_y, x, down_weight, down_bias, up_weight,
                                             up_bias, weights, scale, p, seed, groups)


def assert_all_close(actual, expected, dtype, names=("y", "h", "grad_x", "grad_down_weight",
                                                      "grad_down_bias", "grad_up_weight",
                                                      "grad_up_bias", "grad_routing_weights")):
    """Each pair within the toolkit's tolerance for `dtype` (the activations' dtype)."""
    for name, a, b in zip(names, actual, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert_close_to_reference(a, b, dtype, name)


SHAPES = [(3, 7, 64, 8, 2, 2), (2, 5, 100, 4, 3, 1), (2, 70, 96, 8, 3, 4), (1, 3, 1024, 8, 2, 2)]
SHAPE_IDS = ["B{}L{}D{}r{}E{}g{}".format(*shape) for shape in SHAPES]


# ---------------------------------------------------------------- against the oracle
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cpu_backend_matches_the_oracle(shape, dtype):
    """Same inputs through the oracle's forward and its autograd backward, in the same dtypes."""
    args = backend_args(shape, dtype)
    grad_y = random_grad(args[0].shape, dtype, "cpu")
    expected = run_backend(oracle_backend, args, grad_y=grad_y)
    assert_all_close(run_backend(compiled, args, grad_y=grad_y), expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_op_on_cpu_backend_matches_fp64_oracle(dtype, p):
    """Through mlan::mm_adapter (router, autograd) with fp32 params, vs autograd of the oracle;
    in 16 bits also flash-attention's rule: our error ≤ 2 × that of the oracle run by PyTorch
    with every input in the same dtype (measured: ≤ 0.86 × in y, far less in the gradients)."""
    inputs = make_adapter_inputs(2, 37, 128, 8, 2, 2, dtype, "cpu", param_dtype=torch.float32)
    grad_y = random_grad(inputs["x"].shape, dtype, "cpu")
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = mm_adapter(**leaves, groups=2, dropout_p=p, seed=5, backend="cpu")
    y.backward(grad_y)
    y_expected, grads_expected = oracle(inputs, grad_y, groups=2, dropout_p=p, seed=5)
    got = [y] + [leaves[name].grad for name in grads_expected]
    want = [y_expected.to(dtype)] + [grads_expected[name].to(inputs[name].dtype) for name in grads_expected]
    assert_all_close(got, want, dtype, names=["y"] + list(grads_expected))
    if dtype != torch.float32:
        low = {name: value.to(dtype) for name, value in inputs.items()}
        y_torch, grads_torch = grads_of(lambda **kw: mm_adapter_reference(
            **kw, groups=2, dropout_p=p, seed=5)[0], low, grad_y)
        assert_within_pytorch_error(y, y_torch, y_expected, name="y")
        for name, expected in grads_expected.items():
            assert_within_pytorch_error(leaves[name].grad, grads_torch[name], expected, name=name)


def test_dispatcher_picks_cpu_backend_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("MLAN_BACKEND", raising=False)
    assert dispatch.select_backend(torch.device("cpu"), torch.float32) == "cpu"
    assert dispatch.select_backend(torch.device("cpu"), torch.bfloat16) == "cpu"
    assert dispatch.select_backend(torch.device("cpu"), torch.float64) == "reference"


class LowLevelAdapter(torch.autograd.Function):
    """The two mlan_C ops as one differentiable function of (x, params, routing weights)."""

    @staticmethod
    def forward(ctx, x, down_weight, down_bias, up_weight, up_bias, weights, hyper):
        y, h = torch.ops.mlan_C.mm_adapter_forward(x, down_weight, down_bias, up_weight, up_bias,
                                                   weights, *hyper, False)
        ctx.save_for_backward(x, h, weights, down_weight, down_bias, up_weight, up_bias)
        ctx.hyper = hyper
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, h, weights, down_weight, down_bias, up_weight, up_bias = ctx.saved_tensors
        grads = torch.ops.mlan_C.mm_adapter_backward(grad_y.contiguous(), x, h, weights, down_weight,
                                                     down_bias, up_weight, up_bias, *ctx.hyper)
        grad_x, g_dw, g_db, g_uw, g_ub, g_w = grads
        return grad_x, g_dw, g_db, g_uw, g_ub, g_w, None


@pytest.mark.parametrize("groups, experts", [(2, 3), (1, 2)])
def test_fp64_gradcheck_of_low_level_ops(groups, experts):
    """The C++ backward is the derivative of the C++ forward (fp64, dropout on, 3 token chunks)."""
    args = backend_args((1, 400, 8, 4, experts, groups), torch.float64, p=0.3, seed=5)
    tensors = [value.clone().requires_grad_() for value in args[:6]]
    hyper = (0.8, 0.3, torch.tensor(5), groups)           # scale, dropout_p, seed, groups
    assert torch.autograd.gradcheck(lambda *t: LowLevelAdapter.apply(*t, hyper), tensors,
                                    eps=1e-6, atol=1e-7, fast_mode=True)


# ---------------------------------------------------------------- determinism, dropout, indexing
def test_results_bitwise_independent_of_thread_count():
    """Fixed token chunks and a fixed reduction order: 1, 2 and 3 threads agree bit for bit."""
    args = backend_args((4, 300, 256, 8, 2, 2), torch.float32)   # 1200 tokens: 10 chunks
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(run_backend(compiled, args))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**40 + 3, 2**62 + 7])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_forward_dropout_mask_is_the_oracles(seed, p):
    """x = 0 and b_A = 1 make H = keep / (1 - p): the forward's mask, exactly."""
    B, L, D, r = 3, 50, 16, 8
    args = backend_args((B, L, D, r, 2, 2), torch.float32, p=p, seed=seed)
    args[0] = torch.zeros(B, L, D)
    args[2] = torch.ones(r)
    _, h = compiled.forward(*args, False)
    assert torch.equal(h.reshape(-1, r) != 0, dropout_keep_mask(seed, B * L, r, p))


@pytest.mark.parametrize("seed", [3, 2**33 + 1])
def test_backward_dropout_mask_is_the_oracles(seed):
    """W_A = I (D = r) makes ∂x - G = ∂H_pre, which is zero exactly where the mask drops."""
    B, L, r, p = 2, 40, 8, 0.4
    args = backend_args((B, L, r, r, 2, 2), torch.float32, p=p, seed=seed)
    args[1] = torch.eye(r)
    y, h = compiled.forward(*args, False)
    grad_y = random_grad(y.shape, torch.float32, "cpu")
    grad_x = compiled.backward(grad_y, args[0], h, args[5], *args[1:5], *args[6:])[0]
    assert torch.equal((grad_x - grad_y).reshape(-1, r) != 0, dropout_keep_mask(seed, B * L, r, p))


def test_seed_tensor_forms_give_the_int_seeds_results():
    """The seed as an int, a [] or [1] int64 tensor, or another integer dtype (converted by the
    backend): the same masks and results, bit for bit (an int seed is what the ops got before
    they took a tensor, so CPU masks are unchanged)."""
    args = backend_args((2, 40, 32, 8, 2, 2), torch.float32, p=0.3, seed=2**40 + 3)
    grad_y = random_grad(args[0].shape, torch.float32, "cpu")
    expected = run_backend(compiled, args, grad_y=grad_y)
    for seed in (torch.tensor(2**40 + 3), torch.tensor([2**40 + 3]),
                 torch.tensor(12345, dtype=torch.int32)):
        args[8] = seed
        got = run_backend(compiled, args, grad_y=grad_y)
        reference = expected if int(seed) == 2**40 + 3 else run_backend(
            compiled, args[:8] + [12345] + args[9:], grad_y=grad_y)
        for a, b in zip(got, reference):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_ops_get_the_seed_as_int64_on_xs_device(device):
    """What the compiled ops are handed (the kernels read the seed through its pointer, so on
    CUDA it must live in device memory): a 1-element int64 tensor on x's device, from an int
    or from a tensor of another dtype or device. "meta" stands in for a device other than the
    CPU, on which a CPU-only build can still run this conversion."""
    x = torch.empty(2, 3, 4, device=device)
    for seed in (7, torch.tensor(7), torch.tensor([7], dtype=torch.int32)):
        got = compiled._seed_tensor(seed, x)
        assert (got.dtype, got.device, got.numel()) == (torch.int64, x.device, 1)
        if device == "cpu":
            assert int(got) == 7
    assert compiled._seed_tensor(None, x) is None                # no dropout: no seed


def test_supports_names_the_missing_cuda_kernels_only_for_cuda():
    """`cpu` is always supported once _C loads; `cuda` only when _C was built with nvcc, and
    otherwise the reason says how to get it (asserted whole)."""
    assert compiled.supports("cpu", torch.device("cpu"), torch.float32) is None
    reason = compiled.supports("cuda", torch.device("cuda"), torch.float32)
    if compiled._C.cuda_compiled:
        assert reason is None
    else:
        assert reason == ("mlan_kernels._C was built without its CUDA kernels (no CUDA torch or "
                          "nvcc at build time, or MLAN_SKIP_CUDA=1); build it with `pip install "
                          "--no-build-isolation -e .` (torch installed first; MLAN_SKIP_EXT=1 "
                          "skips it on purpose) on a machine with nvcc")


_OP_MODULE = importlib.import_module("mlan_kernels.ops.mm_adapter")
_WRAPPERS = {"mlan.mm_adapter.default": _OP_MODULE._forward_impl,
             "mlan.mm_adapter_backward.default": _OP_MODULE._backward_impl}


@pytest.mark.parametrize("single_modality", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_backend_reads_no_seed_on_the_host(single_modality, dtype):
    """fwd+bwd through mlan::mm_adapter on the `cpu` backend with dropout: no
    `_local_scalar_dense`/`item` (tests/launch_counter.py; the custom ops' Python bodies run
    inside the counter): the seed tensor reaches the compiled ops as a tensor, whose kernels
    read it (on CUDA from device memory; before, the wrapper did int(seed), a device sync for
    the `cuda` backend). Results equal the same computation with an int seed outside the mode.
    single_modality=None is left out: on CPU tensors it compares the routing inputs on the host
    by design (docs/architecture.md)."""
    inputs = make_adapter_inputs(3, 6, 32, 4, 2, 2, dtype, "cpu", param_dtype=torch.float32)
    grad_y = random_grad(inputs["x"].shape, dtype, "cpu")
    hyper = dict(groups=2, dropout_p=0.25, single_modality=single_modality, backend="cpu")

    def run(seed):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y = mm_adapter(**leaves, seed=seed, **hyper)
        return [y] + list(torch.autograd.grad(y, list(leaves.values()), grad_y))

    seed = torch.tensor(2**33 + 9)
    with LaunchCounter(_WRAPPERS) as counter:
        got = run(seed)
    assert counter.host_reads == [], counter.summary()
    assert any("mlan_C.mm_adapter_forward" in op for op in counter.aten), counter.summary()
    assert any("mlan_C.mm_adapter_backward" in op for op in counter.aten), counter.summary()
    for a, b in zip(got, run(2**33 + 9)):
        assert torch.equal(a, b)


def test_rows_beyond_2_to_the_31_elements():
    """64-bit offsets: x's sample 1 starts 2^31 + 64 elements after sample 0 (a 4 GiB bf16
    buffer of which only two rows are touched); results equal those of a compact copy."""
    D, offset = 64, 2**31 + 64
    try:
        buffer = torch.empty(offset + D, dtype=torch.bfloat16)
    except RuntimeError as error:  # no overcommit for a 4 GiB virtual allocation
        pytest.skip(f"cannot reserve a 4 GiB buffer: {error}")
    args = backend_args((2, 1, D, 8, 2, 2), torch.bfloat16)
    buffer[:D] = args[0][0, 0]
    buffer[offset:] = args[0][1, 0]
    strided = buffer.as_strided((2, 1, D), (offset, D, 1))
    assert strided.storage_offset() == 0 and strided.stride(0) > 2**31
    grad_y = random_grad(args[0].shape, torch.bfloat16, "cpu")
    expected = run_backend(compiled, args, grad_y=grad_y)
    got = run_backend(compiled, [strided] + args[1:], grad_y=grad_y)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_single_modality_flag_uses_the_first_samples_weights():
    args = backend_args((3, 7, 64, 8, 2, 2), torch.float32)
    fast, _ = compiled.forward(*args, True)
    same = list(args)
    same[5] = args[5][:1].expand(3, -1).contiguous()
    general, _ = compiled.forward(*same, False)
    torch.testing.assert_close(fast, general, atol=1e-6, rtol=1e-6)


def test_opcheck_and_compile_with_cpu_backend():
    """The compiled backend runs inside mlan::mm_adapter: schema/fake checks and
    torch.compile(fullgraph=True) still pass."""
    inputs = make_adapter_inputs(2, 5, 32, 4, 2, 2, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.mlan.mm_adapter.default,
                          (*inputs.values(), None, 1.0, 10.0, 0.2, torch.tensor(9), 2, None, "cpu"))
    tensors = [value.clone().requires_grad_() for value in inputs.values()]
    torch._dynamo.reset()

    def adapter(x):
        return mm_adapter(x, *tensors[1:], groups=2, dropout_p=0.2, seed=9, backend="cpu")

    compiled_adapter = torch.compile(adapter, fullgraph=True)
    torch.testing.assert_close(compiled_adapter(inputs["x"]), adapter(inputs["x"]))
    torch._dynamo.reset()


# ---------------------------------------------------------------- validation, fallback
def _forward_args(**changes):
    args = dict(zip(("x", "down_weight", "down_bias", "up_weight", "up_bias", "routing_weights",
                     "scale", "dropout_p", "seed", "groups"),
                    backend_args((2, 3, 16, 4, 2, 2), torch.float32)))
    args["seed"] = torch.tensor(args["seed"])
    args.update(changes, single_modality=False)
    return args


@pytest.mark.parametrize("name, changes", [
    ("x", dict(x=torch.randn(6, 16))),
    ("x", dict(x=torch.randn(2, 3, 16, dtype=torch.float64).to(torch.int32))),
    ("x", dict(x=torch.randn(2, 3, 32)[:, :, ::2])),
    ("down_weight", dict(down_weight=torch.randn(4, 15))),
    ("down_bias", dict(down_bias=torch.randn(5))),
    ("up_weight", dict(up_weight=torch.randn(2, 16, 4))),
    ("up_bias", dict(up_bias=torch.randn(2, 15))),
    ("routing_weights", dict(routing_weights=torch.rand(3, 2))),
    ("groups", dict(groups=3)),
    ("groups", dict(groups=0)),
    ("dropout_p", dict(dropout_p=1.0)),
    ("scale", dict(scale=float("nan"))),
    ("seed", dict(seed=None)),
    ("seed", dict(seed=torch.tensor(7, dtype=torch.int32))),
    ("seed", dict(seed=torch.tensor([7, 8]))),
], ids=lambda value: value if isinstance(value, str) else "")
def test_low_level_forward_errors_name_the_argument(name, changes):
    with pytest.raises(RuntimeError, match=f"mlan_C::mm_adapter_forward: {name}"):
        torch.ops.mlan_C.mm_adapter_forward(**_forward_args(**changes))


def test_low_level_ops_ignore_the_seed_without_dropout():
    """dropout_p = 0: the seed is never read, so None (what mm_adapter passes) is accepted."""
    y, h = torch.ops.mlan_C.mm_adapter_forward(**_forward_args(dropout_p=0.0, seed=None))
    y_seeded, h_seeded = torch.ops.mlan_C.mm_adapter_forward(**_forward_args(dropout_p=0.0))
    assert torch.equal(y, y_seeded) and torch.equal(h, h_seeded)


@pytest.mark.parametrize("name", ["grad_y", "hidden"])
def test_low_level_backward_errors_name_the_argument(name):
    args = backend_args((2, 3, 16, 4, 2, 2), torch.float32)
    x, down_weight, down_bias, up_weight, up_bias, weights = args[:6]
    grad_y, hidden = torch.randn(2, 3, 16), torch.zeros(2, 3, 4)
    if name == "grad_y":
        grad_y = torch.randn(2, 4, 16)
    else:
        hidden = torch.zeros(2, 3, 5)
    scale, p, seed, groups = args[6:]
    with pytest.raises(RuntimeError, match=f"mlan_C::mm_adapter_backward: {name}"):
        torch.ops.mlan_C.mm_adapter_backward(grad_y, x, hidden, weights, down_weight, down_bias,
                                             up_weight, up_bias, scale, p, torch.tensor(seed),
                                             groups)


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    """Without mlan_kernels._C the cpu backend cannot import; auto dispatch warns once, with the
    build command, and runs the reference backend."""
    monkeypatch.setitem(sys.modules, "mlan_kernels._C", None)        # import now fails
    monkeypatch.delitem(sys.modules, "mlan_kernels.backends.compiled")
    monkeypatch.delenv("MLAN_BACKEND", raising=False)
    dispatch._load.cache_clear()
    try:
        inputs = make_adapter_inputs(2, 3, 16, 4, 2, 2, torch.float32, "cpu")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert dispatch.select_backend(torch.device("cpu"), torch.float32) == "reference"
            y = mm_adapter(**inputs, groups=2)
            mm_adapter(**inputs, groups=2)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1, messages
        assert "pip install --no-build-isolation -e ." in messages[0]
        assert torch.equal(y, mm_adapter(**inputs, groups=2, backend="reference"))
    finally:
        monkeypatch.undo()
        dispatch._load.cache_clear()


# ---------------------------------------------------------------- CUDA (run on a GPU)
@pytest.mark.gpu
@pytest.mark.skipif(not getattr(compiled._C, "cuda_compiled", False),
                    reason="mlan_kernels._C built without CUDA")
class TestCudaKernels:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
    @pytest.mark.parametrize("shape", SHAPES + [(4, 300, 4096, 8, 2, 2), (2, 129, 5120, 16, 3, 2)],
                             ids=SHAPE_IDS + ["LaVIN-7B", "13B-r16"])
    def test_cuda_backend_matches_the_oracle(self, shape, dtype):
        args = backend_args(shape, dtype, device="cuda")
        grad_y = random_grad(args[0].shape, dtype, "cuda")
        expected = run_backend(oracle_backend, args, grad_y=grad_y)
        assert_all_close(run_backend(compiled, args, grad_y=grad_y), expected, dtype)

    def test_cuda_is_deterministic_and_strided_x_matches(self):
        args = backend_args((3, 100, 256, 8, 2, 2), torch.bfloat16, device="cuda")
        grad_y = random_grad(args[0].shape, torch.bfloat16, "cuda")
        first = run_backend(compiled, args, grad_y=grad_y)
        strided = torch.zeros(3, 100, 300, dtype=torch.bfloat16, device="cuda")[:, :, :256]
        strided.copy_(args[0])
        for a, b in zip(first, run_backend(compiled, [strided] + args[1:], grad_y=grad_y)):
            assert torch.equal(a, b)

    def test_cuda_forward_dropout_mask_is_the_oracles(self):
        B, L, D, r, p, seed = 4, 300, 64, 8, 0.3, 2**40 + 3
        args = backend_args((B, L, D, r, 2, 2), torch.float32, device="cuda", p=p, seed=seed)
        args[0] = torch.zeros(B, L, D, device="cuda")
        args[2] = torch.ones(r, device="cuda")
        _, h = compiled.forward(*args, False)
        assert torch.equal((h.reshape(-1, r) != 0).cpu(), dropout_keep_mask(seed, B * L, r, p))

    def test_cuda_reads_the_seed_on_device_in_a_cuda_graph(self):
        """The seed is read by the kernels from device memory, never on the host: the `cuda`
        backend's fwd+bwd with dropout captures in a CUDA graph (a host read would fail the
        capture), and replays after the seed tensor was refilled take the new value's mask,
        forward and backward (D = r, W_A = I: ∂x - G = ∂H_pre, zero where dropped)."""
        B, L, r, p = 2, 64, 8, 0.3
        args = backend_args((B, L, r, r, 2, 2), torch.float32, device="cuda", p=p)
        args[0] = torch.zeros(B, L, r, device="cuda")
        args[1] = torch.eye(r, device="cuda")
        args[2] = torch.ones(r, device="cuda")
        seed = torch.tensor(11, dtype=torch.int64, device="cuda")
        args[8] = seed
        grad_y = random_grad(args[0].shape, torch.float32, "cuda")
        side = torch.cuda.Stream()                 # warm up off the default stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run_backend(compiled, args, grad_y=grad_y)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _, h, grad_x, *_ = run_backend(compiled, args, grad_y=grad_y)
        for value in (11, 2**40 + 3, 5):
            seed.fill_(value)
            graph.replay()
            torch.cuda.synchronize()
            mask = dropout_keep_mask(value, B * L, r, p)
            assert torch.equal((h.reshape(-1, r) != 0).cpu(), mask), value
            assert torch.equal(((grad_x - grad_y).reshape(-1, r) != 0).cpu(), mask), value

    def test_cuda_rejects_a_cpu_seed_naming_it(self):
        """The kernels read the seed from device memory: the low-level op wants it on x's
        device (the backend moves one there)."""
        args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _forward_args().items()}
        args["seed"] = args["seed"].cpu()
        with pytest.raises(RuntimeError, match="mlan_C::mm_adapter_forward: seed must be on cuda"):
            torch.ops.mlan_C.mm_adapter_forward(**args)

    def test_cuda_rejects_float64_naming_x(self):
        args = _forward_args()
        args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        args["x"] = args["x"].double()
        with pytest.raises(RuntimeError, match="mlan_C::mm_adapter_forward: x must be"):
            torch.ops.mlan_C.mm_adapter_forward(**args)
