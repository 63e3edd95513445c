//! What ggml's CPU backend was built with and uses on this CPU. The kernels a matrix
//! product takes depend on it: AVX2, AVX-512 and VNNI on x86-64; NEON, dotprod, fp16
//! arithmetic, i8mm (`matmul_int8`) and SVE on ARM, where ggml also repacks q4_0 into
//! the interleaved layout the best of them reads. `paligemma devices` prints the list so
//! that a build for a robot's CPU (e.g. the Jetson's, built without `-march=native`) can be
//! checked for the features its flags were meant to enable.

use crate::sys;

/// The names of the CPU features ggml's kernels use in this process (compiled in and,
/// where ggml checks at run time, present), in ggml's own spelling.
pub fn cpu_features() -> Vec<&'static str> {
    type Probe = unsafe extern "C" fn() -> std::os::raw::c_int;
    const PROBES: [(&str, Probe); 21] = [
        ("SSE3", sys::ggml_cpu_has_sse3),
        ("SSSE3", sys::ggml_cpu_has_ssse3),
        ("AVX", sys::ggml_cpu_has_avx),
        ("AVX_VNNI", sys::ggml_cpu_has_avx_vnni),
        ("AVX2", sys::ggml_cpu_has_avx2),
        ("BMI2", sys::ggml_cpu_has_bmi2),
        ("F16C", sys::ggml_cpu_has_f16c),
        ("FMA", sys::ggml_cpu_has_fma),
        ("AVX512", sys::ggml_cpu_has_avx512),
        ("AVX512_VBMI", sys::ggml_cpu_has_avx512_vbmi),
        ("AVX512_VNNI", sys::ggml_cpu_has_avx512_vnni),
        ("AVX512_BF16", sys::ggml_cpu_has_avx512_bf16),
        ("AMX_INT8", sys::ggml_cpu_has_amx_int8),
        ("NEON", sys::ggml_cpu_has_neon),
        ("ARM_FMA", sys::ggml_cpu_has_arm_fma),
        ("FP16_VA", sys::ggml_cpu_has_fp16_va),
        ("DOTPROD", sys::ggml_cpu_has_dotprod),
        ("MATMUL_INT8", sys::ggml_cpu_has_matmul_int8),
        ("SVE", sys::ggml_cpu_has_sve),
        ("SME", sys::ggml_cpu_has_sme),
        ("LLAMAFILE", sys::ggml_cpu_has_llamafile),
    ];
    // SAFETY: the probes take nothing and only read what ggml-cpu detected at start-up.
    PROBES
        .iter()
        .filter(|(_, probe)| unsafe { probe() } != 0)
        .map(|(name, _)| *name)
        .collect()
}
