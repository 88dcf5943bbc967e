// Node kinds of a packed schedule program: the codes of fastopt/kernels/cpu/schedule_codes.py.
//
// That Python module is the one source of truth. fastopt.backends.cuda.compile_defines() turns each of its
// constants NAME into -DFASTOPT_SCHEDULE_NAME=value; this header only gives them C++ names and refuses to
// compile without them, so the CUDA and Numba kernels can never disagree on a code. The layout of each
// node is documented in schedule_codes.py.
#pragma once

#if !defined(FASTOPT_SCHEDULE_CONSTANT) || !defined(FASTOPT_SCHEDULE_WARMUP) || \
    !defined(FASTOPT_SCHEDULE_CYCLIC_EXP_RANGE) || !defined(FASTOPT_SCHEDULE_ANNEAL_COS)
#error "compile with the -D options of fastopt.backends.cuda.compile_options() (the schedule codes)"
#endif

namespace fastopt {
namespace schedule_codes {

constexpr int CONSTANT = FASTOPT_SCHEDULE_CONSTANT;
constexpr int STEP_DECAY = FASTOPT_SCHEDULE_STEP_DECAY;
constexpr int MULTISTEP = FASTOPT_SCHEDULE_MULTISTEP;
constexpr int EXPONENTIAL = FASTOPT_SCHEDULE_EXPONENTIAL;
constexpr int LINEAR = FASTOPT_SCHEDULE_LINEAR;
constexpr int POLYNOMIAL = FASTOPT_SCHEDULE_POLYNOMIAL;
constexpr int COSINE = FASTOPT_SCHEDULE_COSINE;
constexpr int COSINE_RESTARTS = FASTOPT_SCHEDULE_COSINE_RESTARTS;
constexpr int ONECYCLE = FASTOPT_SCHEDULE_ONECYCLE;
constexpr int CYCLIC = FASTOPT_SCHEDULE_CYCLIC;
constexpr int SEQUENTIAL = FASTOPT_SCHEDULE_SEQUENTIAL;
constexpr int WARMUP = FASTOPT_SCHEDULE_WARMUP;

constexpr int ANNEAL_COS = FASTOPT_SCHEDULE_ANNEAL_COS;
constexpr int ANNEAL_LINEAR = FASTOPT_SCHEDULE_ANNEAL_LINEAR;

constexpr int CYCLIC_TRIANGULAR = FASTOPT_SCHEDULE_CYCLIC_TRIANGULAR;
constexpr int CYCLIC_TRIANGULAR2 = FASTOPT_SCHEDULE_CYCLIC_TRIANGULAR2;
constexpr int CYCLIC_EXP_RANGE = FASTOPT_SCHEDULE_CYCLIC_EXP_RANGE;

}  // namespace schedule_codes
}  // namespace fastopt
