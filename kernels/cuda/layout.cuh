// Layouts of the tables the fused kernels read: the constants of fastopt/kernels/cpu/layout.py.
//
// layout.py is the one source of truth. fastopt.backends.cuda.compile_defines() passes each of its constants as a -D
// option (address slots as FASTOPT_SLOT_<NAME>, the others as FASTOPT_<NAME>); this header names them and refuses to
// compile without them. A rule's own group-table columns are its business: rules/<kernel>.cuh reads them.
//
// Per optimizer step and math dtype (float32: float32, bfloat16 and float16 params; double: float64 params) the
// kernel reads:
// - addresses   int64 [tensors][SLOTS]: data address of each tensor's param, grad, lr_scale, state, master and
//               scales buffers; 0 marks an absent buffer (no lr_scale, no grad this step, a state the group does not
//               use, no master copy, a state not stored in 8 bits).
// - tensor_format int64 [tensors][FORMAT_COLUMNS]: how each tensor's param, grad and states are stored, and which
//               states are 8-bit (below).
// - chunk_tensor, chunk_start, chunk_length  int64 [chunks]: the work split, at most CHUNK elements each;
//               one thread block per chunk.
// - tensor_group int64 [tensors], tensor_step int64 [tensors] (steps taken; advanced on the device).
// - group_hyper double [groups][Rule::COLUMNS]: GROUP_COLUMNS generic columns (below), then the rule's own; and the
//               packed schedules with each group's base offset.
// - tensor_scalars double [tensors][TENSOR_SCALARS]: running values a rule keeps per tensor across steps
//               (schedule-free's weight sum and largest rate), advanced on the device with the step counts.
// - chunk_norms double [chunks][NORM_SUMS]: per-chunk sums of squares of a rule with per-tensor norms (LAMB), written
//               by its NORMS pass and read by its APPLY pass.
// - counters    int64 [COUNTERS]: the optimizer step count, the ticket of the last block, the skipped steps.
// - grad_control double [GRAD_CONTROLS]: this step's grad factors and skip flag, in device memory (written by the
//               finish_grad_control kernel, or a constant plain control).
#pragma once

#if !defined(FASTOPT_SLOT_PARAM) || !defined(FASTOPT_SLOTS) || !defined(FASTOPT_GROUP_COLUMNS) || \
    !defined(FASTOPT_COEFFICIENTS) || !defined(FASTOPT_FORMAT_COLUMNS) || !defined(FASTOPT_GRAD_CONTROLS) || \
    !defined(FASTOPT_BLOCK) || !defined(FASTOPT_ILP) || !defined(FASTOPT_CODE_BLOCK)
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
// The float32 block scales of state slot STATE0 + k where it is stored in 8 bits (its state slot then addresses its
// uint8 codes; 0: not 8-bit). scales[0] is the scale of the tensor's first block: a chunk starting at element
// ``start`` (a multiple of CODE_BLOCK) reads its scales from scales[start / CODE_BLOCK] on.
constexpr int SCALES0 = FASTOPT_SLOT_SCALES0;
constexpr int SCALES1 = FASTOPT_SLOT_SCALES1;
constexpr int SCALES2 = FASTOPT_SLOT_SCALES2;
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
constexpr int STATE_FORMAT = FASTOPT_STATE_FORMAT;  // the format of the states that are not 8-bit
// Which states are stored in 8 bits (fastopt.quantization's format: uint8 codes, a float32 absmax per CODE_BLOCK
// elements): bit CODES_8BIT << k where state slot k is, SIGNED_CODES << k where its code map is the signed one, and
// STOCHASTIC_CODES << k where its codes are rounded stochastically. 8-bit states exist under float math only.
constexpr int STATE_CODES = FASTOPT_STATE_CODES;
constexpr int FORMAT_COLUMNS = FASTOPT_FORMAT_COLUMNS;
constexpr int CODES_8BIT = FASTOPT_CODES_8BIT;
constexpr int SIGNED_CODES = FASTOPT_SIGNED_CODES;
constexpr int STOCHASTIC_CODES = FASTOPT_STOCHASTIC_CODES;
constexpr int CODE_BLOCK = FASTOPT_CODE_BLOCK;  // elements per block scale; chunk starts are multiples of it

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

// The group table's generic columns, which every rule's row starts with (filled by the host from the rule): whether
// a step advances the tensors' step counts, which state slots the group uses (bit k: slot STATE0 + k is read and
// written), and maximize (the generic loop negates the grad). The rule's columns follow from GROUP_COLUMNS on.
constexpr int COUNTS_STEP = FASTOPT_COUNTS_STEP;
constexpr int LIVE_STATES = FASTOPT_LIVE_STATES;
constexpr int MAXIMIZE = FASTOPT_MAXIMIZE;
constexpr int GROUP_COLUMNS = FASTOPT_GROUP_COLUMNS;
constexpr int STATE_SLOTS = FASTOPT_STATE_SLOTS;
static_assert(STATE1 == STATE0 + 1 && STATE2 == STATE0 + 2 && STATE_SLOTS == 3, "state slot k is STATE0 + k");
static_assert(SCALES1 == SCALES0 + 1 && SCALES2 == SCALES0 + 2, "the scales of state slot k are SCALES0 + k");
static_assert((CODES_8BIT << (STATE_SLOTS - 1)) < SIGNED_CODES && (SIGNED_CODES << (STATE_SLOTS - 1)) < STOCHASTIC_CODES,
              "STATE_CODES' three bit fields do not overlap");

// A tensor's coefficients (the CPU kernel's coefficient row): the rule's step scalars (RULE_COEFFICIENTS at most,
// written by Rule::coefficients), then the two grad factors of grad_control rounded to the math dtype.
constexpr int RULE_COEFFICIENTS = FASTOPT_RULE_COEFFICIENTS;
constexpr int COEFFICIENTS = FASTOPT_COEFFICIENTS;
constexpr int COEFFICIENT_GRAD_UNSCALE = FASTOPT_COEFFICIENT_GRAD_UNSCALE;
constexpr int COEFFICIENT_GRAD_CLIP = FASTOPT_COEFFICIENT_GRAD_CLIP;

// Width of a tensor's running values (tensor_scalars; a rule names its own in its module, at most this many).
constexpr int TENSOR_SCALARS = FASTOPT_TENSOR_SCALARS;

// A chunk's partial sums of a rule with per-tensor norms (chunk_norms): the sum of squares of the param and of the
// update direction, in double. A tensor's totals add its chunks' in chunk order, as the Numba kernel does.
constexpr int NORM_PARAM = FASTOPT_NORM_PARAM;
constexpr int NORM_UPDATE = FASTOPT_NORM_UPDATE;
constexpr int NORM_SUMS = FASTOPT_NORM_SUMS;

// The device counters of one dtype's kernel (CUDA only: the CPU kernel gets the step count as an argument).
constexpr int OPTIMIZER_STEP = FASTOPT_COUNTER_OPTIMIZER_STEP;  // steps taken by the optimizer
constexpr int TICKET = FASTOPT_COUNTER_TICKET;                  // blocks of this launch that have finished
constexpr int SKIPPED_STEPS = FASTOPT_COUNTER_SKIPPED_STEPS;    // launches that found SKIP set
constexpr int COUNTERS = FASTOPT_COUNTERS;

// Threads per block: every kernel is launched with exactly this many. The element loops stride by the constant
// and index with ints, so the ILP loads of a stream are one address plus immediate offsets (with blockDim.x and
// 64-bit indices each load needed its own 64-bit address: Adam's double kernel took 147 registers on sm_90, not 94).
constexpr int BLOCK = FASTOPT_BLOCK;
constexpr int ILP = FASTOPT_ILP;  // elements in flight per thread

}  // namespace fastopt
