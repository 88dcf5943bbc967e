// Layouts of the tables the fused kernels read: the constants of fastopt/kernels/cpu/tables.py.
//
// tables.py is the one source of truth (the host fills the group table by its column names).
// fastopt.backends.cuda.compile_defines() passes each address slot as -DFASTOPT_SLOT_NAME and each group-table
// column as -DFASTOPT_<OPTIMIZER>_<COLUMN> (its index in SGD_COLUMNS, RMSPROP_COLUMNS or ADAM_COLUMNS), plus
// each table's width; this header names them and refuses to compile without them.
//
// Per optimizer step and math dtype (float32: float32, bfloat16 and float16 params; double: float64 params) the
// kernel reads:
// - addresses   int64 [tensors][SLOTS]: data address of each tensor's param, grad, lr_scale, state and master
//               buffers; 0 marks an absent buffer (no lr_scale, no grad this step, a state the group does not use,
//               no master copy).
// - tensor_format int64 [tensors][FORMAT_COLUMNS]: how each tensor's param, grad and states are stored (below).
// - chunk_tensor, chunk_start, chunk_length  int64 [chunks]: the work split, at most CHUNK elements each;
//               one thread block per chunk.
// - tensor_group int64 [tensors], tensor_step int64 [tensors] (steps taken; advanced on the device).
// - group_hyper double [groups][columns] below, and the packed schedules with each group's base offset.
// - counters    int64 [COUNTERS]: the optimizer step count, the ticket of the last block, the skipped steps.
// - grad_control double [GRAD_CONTROLS]: this step's grad factors and skip flag, in device memory (written by the
//               finish_grad_control kernel, or a constant plain control).
#pragma once

#if !defined(FASTOPT_SLOT_PARAM) || !defined(FASTOPT_SLOTS) || !defined(FASTOPT_ADAM_COLUMNS) || \
    !defined(FASTOPT_SGD_COLUMNS) || !defined(FASTOPT_RMSPROP_COLUMNS) || !defined(FASTOPT_FORMAT_COLUMNS) || \
    !defined(FASTOPT_GRAD_CONTROLS) || !defined(FASTOPT_BLOCK) || !defined(FASTOPT_ILP)
#error "compile with the -D options of fastopt.backends.cuda.compile_options() (the table layouts)"
#endif

namespace fastopt {

// Address-table slots shared by all optimizers.
constexpr int PARAM = FASTOPT_SLOT_PARAM;
constexpr int GRAD = FASTOPT_SLOT_GRAD;
constexpr int LR_SCALE = FASTOPT_SLOT_LR_SCALE;
constexpr int STATE0 = FASTOPT_SLOT_STATE0;
constexpr int STATE1 = FASTOPT_SLOT_STATE1;
constexpr int STATE2 = FASTOPT_SLOT_STATE2;
constexpr int MASTER = FASTOPT_SLOT_MASTER;  // the float32 master copy of a 16-bit param (0: none)
constexpr int SLOTS = FASTOPT_SLOTS;

// Storage formats (tensor_format entries). NATIVE: the math dtype itself. The others are widened exactly on load
// and rounded on store (to nearest even; BFLOAT16_STOCHASTIC, params only, stochastically). Under double math the
// only other format is FLOAT32 (grads); under float math a param may be BFLOAT16, BFLOAT16_STOCHASTIC or FLOAT16,
// a grad BFLOAT16 or FLOAT16, the states BFLOAT16.
constexpr int NATIVE = FASTOPT_FORMAT_NATIVE;
constexpr int FLOAT32 = FASTOPT_FORMAT_FLOAT32;
constexpr int BFLOAT16 = FASTOPT_FORMAT_BFLOAT16;
constexpr int FLOAT16 = FASTOPT_FORMAT_FLOAT16;
constexpr int BFLOAT16_STOCHASTIC = FASTOPT_FORMAT_BFLOAT16_STOCHASTIC;
constexpr int PARAM_FORMAT = FASTOPT_PARAM_FORMAT;
constexpr int GRAD_FORMAT = FASTOPT_GRAD_FORMAT;
constexpr int STATE_FORMAT = FASTOPT_STATE_FORMAT;
constexpr int FORMAT_COLUMNS = FASTOPT_FORMAT_COLUMNS;

// grad_control entries: the grads are multiplied by GRAD_UNSCALE (1 / loss scale), then by GRAD_CLIP (the
// global-norm clip factor); SKIP != 0 skips the whole step (nothing written, no step count advanced).
constexpr int GRAD_UNSCALE = FASTOPT_GRAD_UNSCALE;
constexpr int GRAD_CLIP = FASTOPT_GRAD_CLIP;
constexpr int SKIP = FASTOPT_SKIP;
constexpr int GRAD_CONTROLS = FASTOPT_GRAD_CONTROLS;
// What finish_grad_control writes beside grad_control: the global L2 norm of the unscaled grads and the number of
// non-finite grad values (a double: exact below 2^53). torch's clip_grad_norm_ guard: max_norm / (norm + 1e-6).
constexpr int STATISTIC_NORM = FASTOPT_STATISTIC_NORM;
constexpr int STATISTIC_NONFINITE = FASTOPT_STATISTIC_NONFINITE;
constexpr int STATISTICS = FASTOPT_STATISTICS;
constexpr double CLIP_EPSILON = FASTOPT_CLIP_EPSILON;
// How finish_grad_control gets the loss scale: as the host's 1 / scale argument, or read from a one-element device
// array of float32 or double (GradScaler's scale, inverted on the device without a host sync).
constexpr int SCALE_ON_HOST = FASTOPT_SCALE_ON_HOST;
constexpr int SCALE_FLOAT32 = FASTOPT_SCALE_FLOAT32;
constexpr int SCALE_FLOAT64 = FASTOPT_SCALE_FLOAT64;

// Group-table columns (booleans are stored as 0.0 / 1.0).
constexpr int SGD_H_MOMENTUM = FASTOPT_SGD_MOMENTUM;
constexpr int SGD_H_DAMPENING = FASTOPT_SGD_DAMPENING;
constexpr int SGD_H_WEIGHT_DECAY = FASTOPT_SGD_WEIGHT_DECAY;
constexpr int SGD_H_NESTEROV = FASTOPT_SGD_NESTEROV;
constexpr int SGD_H_MAXIMIZE = FASTOPT_SGD_MAXIMIZE;
constexpr int SGD_COLUMNS = FASTOPT_SGD_COLUMNS;

constexpr int RMS_H_ALPHA = FASTOPT_RMSPROP_ALPHA;
constexpr int RMS_H_EPS = FASTOPT_RMSPROP_EPS;
constexpr int RMS_H_WEIGHT_DECAY = FASTOPT_RMSPROP_WEIGHT_DECAY;
constexpr int RMS_H_MOMENTUM = FASTOPT_RMSPROP_MOMENTUM;
constexpr int RMS_H_CENTERED = FASTOPT_RMSPROP_CENTERED;
constexpr int RMS_H_MAXIMIZE = FASTOPT_RMSPROP_MAXIMIZE;
constexpr int RMSPROP_COLUMNS = FASTOPT_RMSPROP_COLUMNS;

constexpr int ADAM_H_BETA1 = FASTOPT_ADAM_BETA1;
constexpr int ADAM_H_BETA2 = FASTOPT_ADAM_BETA2;
constexpr int ADAM_H_EPS = FASTOPT_ADAM_EPS;
constexpr int ADAM_H_WEIGHT_DECAY = FASTOPT_ADAM_WEIGHT_DECAY;
constexpr int ADAM_H_AMSGRAD = FASTOPT_ADAM_AMSGRAD;
constexpr int ADAM_H_MAXIMIZE = FASTOPT_ADAM_MAXIMIZE;
constexpr int ADAM_H_DECOUPLED = FASTOPT_ADAM_DECOUPLED_WEIGHT_DECAY;
constexpr int ADAM_COLUMNS = FASTOPT_ADAM_COLUMNS;

// The device counters of one dtype's kernel (CUDA only: the CPU kernel gets the step count as an argument).
constexpr int OPTIMIZER_STEP = FASTOPT_COUNTER_OPTIMIZER_STEP;  // steps taken by the optimizer
constexpr int TICKET = FASTOPT_COUNTER_TICKET;                  // blocks of this launch that have finished
constexpr int SKIPPED_STEPS = FASTOPT_COUNTER_SKIPPED_STEPS;    // launches that found SKIP set
constexpr int COUNTERS = FASTOPT_COUNTERS;

// Threads per block: every kernel is launched with exactly this many. The element loops stride by the constant
// and index with ints, so the ILP loads of a stream are one address plus immediate offsets (with blockDim.x and
// 64-bit indices each load needed its own 64-bit address: adam_step_double took 147 registers on sm_90, not 94).
constexpr int BLOCK = FASTOPT_BLOCK;
constexpr int ILP = FASTOPT_ILP;  // elements in flight per thread

}  // namespace fastopt
