"""The Triton kernels of the KL op, of grad scaling and of the MM-Adapter compile for an H100 (sm_90) down to a
cubin, on a machine without a GPU. The interpreter tests check their numbers but not what only
the compiler checks (e.g. globals a @jit function may not read). Runs in a subprocess because
TRITON_INTERPRET=1 (set by conftest) replaces @jit kernels with interpreted ones."""
import os
import subprocess
import sys

import pytest

from helpers import HAS_TRITON

SCRIPT = r'''
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mlan_kernels.triton import grad_scale_kernels as G, kl_kernels as K

def compile_kernel(fn, pointers, scalars, constexprs, num_warps):
    signature = dict(pointers, **{name: "i32" for name in scalars}, **{name: "constexpr" for name in constexprs})
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert kernel.asm["cubin"], fn.__name__

strides = ("V", "stride_p", "stride_q")
for has_mask in (True, False):
    compile_kernel(K.kl_forward_kernel, {"p_ptr": "*bf16", "q_ptr": "*bf16", "mask_ptr": "*u8", "kl_ptr": "*fp32",
                   "lse_p_ptr": "*fp32", "lse_q_ptr": "*fp32"}, strides, {"HAS_MASK": has_mask, "BLOCK_V": 4096}, 8)
compile_kernel(K.kl_backward_kernel, {"grad_kl_ptr": "*fp32", "p_ptr": "*fp16", "q_ptr": "*fp16", "mask_ptr": "*u8",
               "lse_p_ptr": "*fp32", "lse_q_ptr": "*fp32", "kl_ptr": "*fp32", "grad_p_ptr": "*fp16",
               "grad_q_ptr": "*fp16"}, strides + ("stride_grad",), {"HAS_MASK": True, "BLOCK_V": 4096}, 8)
tables = {name: "*i64" for name in ("address_ptr", "numel_ptr", "block_tensor_ptr", "block_start_ptr")}
compile_kernel(G.sum_squares_kernel, dict(tables, partial_ptr="*fp32"), (), {"DTYPE": tl.bfloat16, "BLOCK": 2048}, 4)
compile_kernel(G.scale_kernel, dict(tables, group_ptr="*i64", factor_ptr="*fp32"), (),
               {"DTYPE": tl.float32, "BLOCK": 2048}, 4)
print("compiled")
'''

MM_ADAPTER_SCRIPT = SCRIPT.split("strides = ")[0].replace(
    "grad_scale_kernels as G, kl_kernels as K",
    "mm_adapter_kernels as M, mm_adapter_weight_kernels as W") + r'''
def ptrs(dtype, *names):
    return {name: dtype for name in names}

# activation dtype (16-bit ones split the weights into hi+lo: SPLIT), experts (3 pads to E_PAD=4).
for act, split, precision, experts, e_pad in (("bf16", True, "tf32", 3, 4), ("fp16", True, "tf32", 2, 2),
                                             ("fp32", False, "tf32x3", 3, 4)):
    dims = dict(R=8, E=experts, R_PAD=16, E_PAD=e_pad)
    for router, combine in ((True, True), (True, False), (False, True)):
        compile_kernel(W.mm_adapter_prep_kernel, dict(ptrs("*fp32", "down_w_ptr", "up_w_ptr", "up_b_ptr", "rw_ptr"),
                       **ptrs("*" + act, "route_ptr", "router_w_ptr", "router_b_ptr", "down_hi_ptr", "down_lo_ptr",
                              "up_hi_ptr", "up_lo_ptr", "combined_ptr"), temperature="fp32", scale="fp32"),
                       ("D", "route_stride"), dict(dims, GROUPS=2, BLOCK_D=128, ROUTER=router, COMBINE=combine,
                                                   SPLIT=split), 4)
    for single in (True, False):
        compile_kernel(M.mm_adapter_fwd_kernel, dict(ptrs("*" + act, "x_ptr", "y_ptr", "down_hi_ptr", "down_lo_ptr", "up_ptr"),
                       **ptrs("*fp32", "h_ptr", "down_b_ptr", "coef_ptr"), seed_ptr="*i64", drop_scale="fp32", scale="fp32"),
                       ("N", "D", "L", "drop_threshold"),
                       dict(dims, BLOCK_N=32, BLOCK_D=128, DROPOUT=True, SINGLE_MODALITY=single,
                            UP_SLOTS=16 if single else 16 * e_pad, SPLIT=split, PRECISION=precision), 4)
    compile_kernel(M.mm_adapter_bwd_rows_kernel, dict(ptrs("*" + act, "gy_ptr", "up_hi_ptr", "up_lo_ptr"),
                   **ptrs("*fp32", "h_ptr", "coef_ptr", "grad_hidden_ptr", "grad_coef_ptr"), seed_ptr="*i64",
                   drop_scale="fp32", scale="fp32"),
                   ("N", "D", "L", "drop_threshold"),
                   dict(dims, BLOCK_N=64, BLOCK_D=128, DROPOUT=True, SPLIT=split, PRECISION=precision), 4)
    compile_kernel(M.mm_adapter_bwd_cols_kernel, dict(ptrs("*" + act, "gy_ptr", "x_ptr", "gx_ptr", "down_hi_ptr"),
                   **ptrs("*fp32", "h_ptr", "grad_hidden_ptr", "coef_ptr", "partial_down_ptr", "partial_up_ptr",
                          "partial_bias_ptr"), scale="fp32"),
                   ("N", "D", "L", "rows_per_split"),
                   dict(dims, BLOCK_N=16, BLOCK_D=256, SPLIT=split, PRECISION=precision), 4)
    for router in (True, False):
        compile_kernel(W.mm_adapter_bwd_finalize_kernel, dict(ptrs("*fp32", "partial_down_ptr", "partial_up_ptr",
                       "partial_bias_ptr", "grad_coef_ptr", "grad_rw_ptr", "rw_ptr", "router_w_ptr"),
                       **ptrs("*" + act, "x_ptr", "gx_ptr", "grad_down_w_ptr", "grad_down_b_ptr", "grad_up_w_ptr",
                              "grad_up_b_ptr", "grad_route_w_ptr", "grad_route_b_ptr"),
                       scale="fp32", temperature="fp32"),
                       ("splits", "D", "B", "L", "routes", "rows_per_route", "grad_rw_rows"),
                       dict(dims, GROUPS=2, BLOCK_D=128, BLOCK_L=1024, ROUTER=router, HAS_GRAD_RW=router), 4)
print("compiled")
'''


def _compile(script, timeout=120):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=timeout, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if "No module named" in result.stderr and "backends" in result.stderr:
        pytest.skip("this triton build has no CUDA backend to compile with")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_kernels_compile_for_sm90():
    _compile(SCRIPT)


@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_mm_adapter_kernels_compile_for_sm90():
    """Every MM-Adapter kernel: bf16/fp32 activations with E=3 (padded to 4), fp16 with E=2."""
    _compile(MM_ADAPTER_SCRIPT, timeout=300)
