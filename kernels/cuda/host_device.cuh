// What lets one header hold code for the GPU kernels and for the host test shim.
//
// Under nvcc or NVRTC the shared math is compiled __host__ __device__; under a plain C++ compiler (the
// test shim in tests/test_cuda_host_math.py, built with g++ -O2, never -ffast-math) the qualifier is
// defined away and the C library supplies sqrt, cos and pow. NVRTC has no C library headers: its math
// functions are built in, so nothing is included there.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FASTOPT_HOST_DEVICE __host__ __device__ __forceinline__
#define FASTOPT_UNROLL _Pragma("unroll")
#else
#include <math.h>
#define FASTOPT_HOST_DEVICE inline
#define FASTOPT_UNROLL  // the shim's loops run once per thread index; g++ -Wall would warn of an unknown pragma
#endif

namespace fastopt {

// int64_t without <cstdint>, which NVRTC does not ship: long long is 64 bits on every CUDA target and
// on the x86-64 / aarch64 hosts of the shim.
typedef long long int64;
static_assert(sizeof(int64) == 8, "fastopt's tables hold 64-bit integers");

// The square root in the param's own precision, as Numba's np.sqrt on a float32 or float64 scalar:
// correctly rounded in both (the kernels are compiled with --prec-sqrt=true).
FASTOPT_HOST_DEVICE float square_root(float x) { return sqrtf(x); }
FASTOPT_HOST_DEVICE double square_root(double x) { return sqrt(x); }

// |x|, as Numba's abs on a float32 or float64 scalar (exact).
FASTOPT_HOST_DEVICE float absolute(float x) { return fabsf(x); }
FASTOPT_HOST_DEVICE double absolute(double x) { return fabs(x); }

// A quiet NaN, which the kernels return for a malformed schedule program, as the CPU kernels do.
FASTOPT_HOST_DEVICE double quiet_nan() { return nan(""); }

// The double nearest pi, as Python's math.pi.
constexpr double PI = 3.141592653589793;

}  // namespace fastopt
