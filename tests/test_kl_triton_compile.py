"""The Triton kernels of the KL op and of grad scaling compile for an H100 (sm_90) down to a
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
               "grad_q_ptr": "*fp16"}, strides, {"HAS_MASK": True, "BLOCK_V": 4096}, 8)
tables = {name: "*i64" for name in ("address_ptr", "numel_ptr", "block_tensor_ptr", "block_start_ptr")}
compile_kernel(G.sum_squares_kernel, dict(tables, partial_ptr="*fp32"), (), {"DTYPE": tl.bfloat16, "BLOCK": 2048}, 4)
compile_kernel(G.scale_kernel, dict(tables, group_ptr="*i64", factor_ptr="*fp32"), (),
               {"DTYPE": tl.float32, "BLOCK": 2048}, 4)
print("compiled")
'''


@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_kernels_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                            timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if "No module named" in result.stderr and "backends" in result.stderr:
        pytest.skip("this triton build has no CUDA backend to compile with")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
