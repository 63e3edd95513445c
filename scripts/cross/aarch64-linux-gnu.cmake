# CMake toolchain for cross-building ggml (through llama-cpp-sys-2) for aarch64 Linux with
# Debian's cross compilers. Used by scripts/arm64-check.sh and docs/jetson.md through
# CMAKE_TOOLCHAIN_FILE_aarch64_unknown_linux_gnu, which the cmake crate reads.
#
# GGML_CPU_ARM_ARCH (from the environment) picks the CPU: armv8.2-a+dotprod+fp16 for the
# Jetson Orin's Cortex-A78AE (the default), armv9.2-a for the Jetson Thor's Neoverse V3AE
# (SVE2, i8mm and bf16 included), armv8-a for any 64-bit ARM. llama-cpp-sys-2 passes every GGML_* variable of the environment to CMake (and
# rebuilds ggml when one changes), but then pins GGML_CPU_ARM_ARCH to armv8-a on the
# command line for every non-native aarch64 Linux build (no dotprod, no fp16 arithmetic),
# so the environment's value is forced here, where CMake reads it last.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)

if(DEFINED ENV{GGML_CPU_ARM_ARCH})
    set(_arch "$ENV{GGML_CPU_ARM_ARCH}")
else()
    set(_arch "armv8.2-a+dotprod+fp16")
endif()
set(GGML_CPU_ARM_ARCH "${_arch}" CACHE STRING "ggml's -march for ARM CPUs" FORCE)
