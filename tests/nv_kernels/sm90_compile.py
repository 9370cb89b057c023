"""Compile nv's Triton kernels for sm_90 (H100/H200) on a machine without a GPU: Triton's front
end, its optimisation passes and the `ptxas` bundled with it. The interpreter runs kernels as
numpy and lets some errors through (a variable whose type differs between the two arms of an
`if`, a layout the compiler cannot build); compiling catches them. Run by
`test_sm90_compile.py` in a process without TRITON_INTERPRET (jit kernels, not interpreted ones).

    python tests/nv_kernels/sm90_compile.py
"""

from __future__ import annotations

import itertools
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nv_kernels.rms_norm import _rms_norm_kernel
from nv_kernels.rope_store import _qk_norm_rope_store_kernel
from nv_kernels.sample_kernel import _chunk_best_kernel, _pick_kernel
from nv_kernels.skinny_gemm import _skinny_gemm_kernel
from nv_kernels.store_kvcache import _store_kvcache_kernel
from nv_kernels.triton_attention import (
    _decode_kernel,
    _decode_reduce_kernel,
    _prefill_kernel,
    _shared_prefix_kernel,
)

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(
    kernel, constexprs: dict, types: dict | None = None, aligned: tuple = (), **options
):
    """Arguments named *_ptr are bf16 pointers, the rest int32, unless `types` says otherwise;
    parameters declared `tl.constexpr` take their value from `constexprs`, and so do integers
    named there (Triton's launcher specialises an integer equal to 1 so). `aligned`: arguments
    divisible by 16, as the launcher finds them. Returns the compiled kernel."""
    types = types or {}
    signature = {}
    for p in kernel.params:
        if p.is_constexpr or p.name in constexprs:
            signature[p.name] = "constexpr"
        else:
            signature[p.name] = types.get(p.name, "*bf16" if p.name.endswith("_ptr") else "i32")
    names = list(signature)
    missing = [n for n, t in signature.items() if t == "constexpr" and n not in constexprs]
    if missing:
        raise ValueError(f"{kernel.fn.__name__}: no value for {missing}")
    src = ASTSource(
        kernel,
        signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs={(names.index(k),): [["tt.divisibility", 16]] for k in aligned},
    )
    return triton.compile(src, target=TARGET, options={"num_warps": 4, **options})


def engine_decode_kernel(fp8: bool):
    """The decode kernel as the engine launches it at block size 256 on an H200, 16-byte aligned
    arguments: fp8 caches (V token-minor) in 128-token tiles with the page number read through
    the pipeline; bf16 caches in 64-token tiles with it read outside (`plain_page_load`); 3
    stages. Returns its PTX."""
    v_minor = "stride_cvt" if fp8 else "stride_cvd"  # V's contiguous axis (kv_cache.py)
    aligned = [p.name for p in _decode_kernel.params if p.name.endswith("_ptr")]
    aligned += ["stride_qt", "stride_qh", "stride_ckb", "stride_ckt", "stride_ckh", "stride_cvb"]
    aligned += ["stride_cvh", "stride_cvd" if fp8 else "stride_cvt", "stride_ot", "stride_oh"]
    caches = dict(k_cache_ptr="*fp8e4nv", v_cache_ptr="*fp8e4nv") if fp8 else {}
    kernel = compile_kernel(
        _decode_kernel,
        dict(G=2, G_PAD=16, BLOCK_SIZE=256, D=128, BLOCK_N=128 if fp8 else 64,
             V_TOKEN_MINOR=fp8, PLAIN_PAGE_LOAD=not fp8, NUM_SPLITS=1, CASCADE=False,
             PRECISION=None, DOT_DTYPE=tl.float16 if fp8 else tl.bfloat16, PDL=False,
             **{v_minor: 1}),
        dict(block_tables_ptr="*i32", context_lens_ptr="*i32", mid_o_ptr="*fp32",
             mid_lse_ptr="*fp32", prefix_o_ptr="*fp32", prefix_lse_ptr="*fp32",
             prefix_rows_ptr="*i32", prefix_len_ptr="*i32", scale="fp32",
             k_scale="fp32", v_scale="fp32", **caches),
        aligned=tuple(aligned),
        num_stages=3,
    )  # fmt: skip
    return kernel.asm["ptx"]


def fp8_decode_reads_v_as_an_operand() -> list[str]:
    """What is wrong with the fp8 decode kernel's PTX: both tiles should be copied into shared
    memory asynchronously and read from there into the tensor cores' operands, V with no
    transpose (kv_cache.py)."""
    ptx = engine_decode_kernel(fp8=True)
    problems = []
    if "ld.shared.b8" in ptx or "ld.shared.u8" in ptx:
        problems.append("reads a tile from shared memory one byte at a time")
    if ".trans" in ptx:
        problems.append("transposes a tile in shared memory (ldmatrix.trans)")
    if ptx.count("cp.async.cg.shared.global") < 2:
        problems.append("does not copy both K and V tiles into shared memory asynchronously")
    return problems


def bf16_decode_keeps_tiles_in_flight() -> list[str]:
    """What is wrong with the bf16 decode kernel's pipeline: the loop should wait for the oldest
    tile's copies only (cp.async.wait_group 1 or more), so that the next tiles' copies stay in
    flight while it computes. Reading the page number through the pipeline makes every
    iteration wait for all of them (wait_group 0)."""
    ptx = engine_decode_kernel(fp8=False)
    waits = [int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", ptx)]
    if not any(n > 0 for n in waits):
        return [f"waits for every copy in flight in each iteration (wait_group {waits})"]
    return []


def main() -> int:
    jobs = []
    for gated, split, block_m, bias, pdl in itertools.product(
        (False, True), (1, 4), (16, 64), (False, True), (False, True)
    ):
        jobs.append((
            _skinny_gemm_kernel,
            dict(GATED=gated, HAS_BIAS=bias, BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=128,
                 SPLIT_K=split, EVEN_K=split == 1, IEEE=False, PDL=pdl),
            dict(part_ptr="*fp32", count_ptr="*i32"),
            dict(num_stages=4, launch_pdl=pdl),
        ))  # fmt: skip
    scales = dict(scale="fp32", k_scale="fp32", v_scale="fp32")
    fp8 = dict(k_cache_ptr="*fp8e4nv", v_cache_ptr="*fp8e4nv")
    e5m2 = dict(k_cache_ptr="*fp8e5", v_cache_ptr="*fp8e5")
    for (splits, block_size, cascade), pdl, (kv, token_minor) in itertools.product(
        ((1, 256, False), (7, 16, False), (1, 256, True)), (False, True),
        (({}, False), (fp8, False), (fp8, True), (e5m2, True)),
    ):  # fmt: skip
        jobs.append((
            _decode_kernel,
            dict(G=2, G_PAD=16, BLOCK_SIZE=block_size, D=128, BLOCK_N=128 if kv else 64,
                 V_TOKEN_MINOR=token_minor, PLAIN_PAGE_LOAD=not kv and block_size % 64 == 0,
                 NUM_SPLITS=splits, CASCADE=cascade, PRECISION=None,
                 DOT_DTYPE=tl.float16 if kv else tl.bfloat16, PDL=pdl,
                 **{"stride_cvt" if token_minor else "stride_cvd": 1}),
            dict(block_tables_ptr="*i32", context_lens_ptr="*i32", mid_o_ptr="*fp32",
                 mid_lse_ptr="*fp32", prefix_o_ptr="*fp32", prefix_lse_ptr="*fp32",
                 prefix_rows_ptr="*i32", prefix_len_ptr="*i32", **scales, **kv),
            dict(num_stages=4, launch_pdl=pdl),
        ))  # fmt: skip
    for kv, token_minor in (({}, False), (fp8, True), (e5m2, True)):
        jobs.append((
            _shared_prefix_kernel,
            dict(G=2, BLOCK_SIZE=256, D=128, BLOCK_M=64, BLOCK_N=64, V_TOKEN_MINOR=token_minor,
                 PRECISION=None, DOT_DTYPE=tl.float16 if kv else tl.bfloat16,
                 **{"stride_cvt" if token_minor else "stride_cvd": 1}),
            dict(table_ptr="*i32", o_ptr="*fp32", lse_ptr="*fp32", rows_ptr="*i32",
                 prefix_len_ptr="*i32", **scales, **kv),
            dict(num_stages=3),
        ))  # fmt: skip
    for pdl in (False, True):
        jobs.append((
            _decode_reduce_kernel, dict(NUM_SPLITS=7, S_PAD=8, D=128, PDL=pdl),
            dict(mid_o_ptr="*fp32", mid_lse_ptr="*fp32"), dict(launch_pdl=pdl),
        ))  # fmt: skip
        for res, parts, signal in ((False, 0, False), (True, 0, False), (True, 2, True)):
            jobs.append((
                _rms_norm_kernel,
                dict(BLOCK=1024, HAS_RES=res, PARTS=parts, SIGNAL=signal, PDL=pdl),
                dict(eps="fp32", parts_ptr="*i64", signal_ptr="*i64", abort_addr="i64"),
                dict(launch_pdl=pdl),
            ))  # fmt: skip
    for paged, kv, token_minor in (
        (False, {}, False), (True, {}, False), (True, fp8, False), (True, fp8, True),
        (True, e5m2, True),
    ):  # fmt: skip
        jobs.append((
            _prefill_kernel,
            dict(G=2, BLOCK_SIZE=256 if paged else 1, D=128, BLOCK_M=64, BLOCK_N=32, PAGED=paged,
                 V_TOKEN_MINOR=token_minor, PLAIN_PAGE_LOAD=paged and not kv, PRECISION=None,
                 DOT_DTYPE=tl.float16 if kv else tl.bfloat16),
            dict(cu_q_ptr="*i32", cu_k_ptr="*i32", block_tables_ptr="*i32", **scales, **kv),
            dict(num_stages=2),
        ))  # fmt: skip
    for kv, fp8_max in (({}, 0.0), (fp8, 448.0), (e5m2, 57344.0)):
        jobs.append((
            _store_kvcache_kernel,
            dict(HEAD_DIM=128, D=1024, BLOCK=1024, BLOCK_SIZE=256, FP8_MAX=fp8_max),
            dict(slot_mapping_ptr="*i64", k_scale="fp32", v_scale="fp32", **kv), {},
        ))  # fmt: skip
    for norm, pdl, (kv, fp8_max) in itertools.product(
        (False, True), (False, True), (({}, 0.0), (fp8, 448.0), (e5m2, 57344.0))
    ):
        jobs.append((
            _qk_norm_rope_store_kernel,
            dict(H=16, HKV=8, H_PAD=16, HKV_PAD=8, HALF=64, HAS_NORM=norm, BLOCK_SIZE=256,
                 FP8_MAX=fp8_max, PDL=pdl),
            dict(cos_sin_ptr="*fp32", slot_mapping_ptr="*i64", eps="fp32", k_scale="fp32",
                 v_scale="fp32", **kv),
            dict(launch_pdl=pdl),
        ))  # fmt: skip
    for temps in (False, True):
        jobs.append((
            _chunk_best_kernel, dict(HAS_TEMPS=temps, FAST_LOG=True, BLOCK=2048),
            dict(temps_ptr="*fp32", seeds_ptr="*i64", steps_ptr="*i64", cand_ptr="*i32"),
            dict(num_warps=8),
        ))  # fmt: skip
    jobs.append((
        _pick_kernel, dict(CANDS=256), dict(cand_ptr="*i32", out_ptr="*i64"), {},
    ))  # fmt: skip
    failed = 0
    for name, check in (
        ("fp8 decode kernel's PTX", fp8_decode_reads_v_as_an_operand),
        ("bf16 decode kernel's PTX", bf16_decode_keeps_tiles_in_flight),
    ):
        for problem in check():
            failed += 1
            print(f"FAILED {name}: {problem}", file=sys.stderr)
    for kernel, constexprs, types, options in jobs:
        try:
            compile_kernel(kernel, constexprs, types, **options)
        except Exception as e:  # report every failing variant, not just the first
            failed += 1
            print(f"FAILED {kernel.fn.__name__} {constexprs}:\n{e}", file=sys.stderr)
    print(f"compiled {len(jobs) - failed} of {len(jobs)} kernel variants for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
