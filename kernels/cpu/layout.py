"""Layout of the small tables the fused kernels read, CPU and CUDA (numba-free, so the Python side can import it
cheaply; the CUDA sources get these constants as ``-D`` options).

Per optimizer step the host passes:
- ``addresses`` int64 [tensors, slots]: the data address of each tensor's param, grad, lr_scale and state
  buffers; 0 marks an absent buffer (no lr_scale, no grad this step, a state the group does not use).
- ``chunk_tensor``, ``chunk_start``, ``chunk_length`` int64 [chunks]: the work split, at most CHUNK elements each.
- ``tensor_group`` int64 [tensors] and ``tensor_step`` int64 [tensors] (steps taken, advanced by the kernel).
- ``tensor_scalars`` float64 [tensors, TENSOR_SCALARS]: running per-tensor values a rule keeps across steps
  (schedule-free's weight sum and largest rate), advanced by the kernel as the step counts are.
- ``group_hyper`` float64 [groups, columns]: the columns below, then the rule's, plus the packed schedules (see
  schedule_codes).
- ``tensor_format`` int64 [tensors, FORMAT_COLUMNS]: how each tensor's param, grad and state buffers are stored
  (the storage formats below); the math runs in the bucket's math dtype (float32, or float64 for float64 params).
- ``grad_control`` float64 [GRAD_CONTROLS]: this step's gradient handling (loss-scale inverse, clip factor, skip).
- ``coefficients`` [tensors, COEFFICIENTS] in the math dtype: workspace the kernel fills with each tensor's
  step scalars, computed in float64 and rounded once to the math dtype, as torch passes Python floats.
"""

# Elements per unit of parallel work: 64K float32 = 256 KiB per stream, large enough to amortise the
# per-chunk set-up, small enough to balance two threads over a list of tensors of mixed sizes.
CHUNK = 1 << 16

# Buckets with fewer elements than this step on the calling thread: waking the thread pool costs more than the
# second core saves, and a parallel step of a small model waits for a free core whenever another process holds one.
SERIAL_BELOW = 4 * CHUNK

# Address-table slots shared by all optimizers. MASTER: the float32 master copy of a 16-bit param (0: none).
# SCALES0..SCALES2: the float32 block scales of state slot STATE0..STATE2 where it is stored in 8 bits (then the
# state slot addresses its uint8 codes; 0: the state is not 8-bit).
PARAM, GRAD, LR_SCALE, STATE0, STATE1, STATE2, MASTER, SCALES0, SCALES1, SCALES2 = range(10)
SLOTS = 10

# Storage formats (tensor_format entries). NATIVE: the math dtype itself, read and written in place. The others
# are converted on the way in (exactly) and on the way out (round to nearest even, or stochastically).
NATIVE, FLOAT32, BFLOAT16, FLOAT16, BFLOAT16_STOCHASTIC = range(5)
# STATE_FORMAT is the format of the states that are not 8-bit; STATE_CODES says which are (fastopt.quantization's
# format: uint8 codes and a float32 absmax per CODE_BLOCK elements): bit k (CODES_8BIT << k) for slot k, bit
# SIGNED_CODES << k where its code map is the signed one, and bit STOCHASTIC_CODES << k where its codes are rounded
# stochastically (random bits: fastopt.reference.code_noise, one hash of (seed, step, (k + 1) << 62 | tensor << 40 +
# the block's first element) per block of CODE_BLOCK, mixed per element).
PARAM_FORMAT, GRAD_FORMAT, STATE_FORMAT, STATE_CODES = range(4)
FORMAT_COLUMNS = 4
CODES_8BIT, SIGNED_CODES, STOCHASTIC_CODES = 1, 1 << 3, 1 << 6  # shifted left by the slot (three slots at most)
CODE_BLOCK = 256  # elements per block scale; chunk starts (and shard cuts) are multiples of it

# grad_control entries: the grads are multiplied by GRAD_UNSCALE (1 / loss scale) and then by GRAD_CLIP (the
# global-norm clip factor) before the update; SKIP != 0 skips the whole step (non-finite grads).
GRAD_UNSCALE, GRAD_CLIP, SKIP = range(3)
GRAD_CONTROLS = 3

# The group table's columns that every rule's row starts with, filled by the host from the rule
# (fastopt.backends.layout.group_table): whether a step advances the tensors' step counts, which state slots the group
# uses (bit k: slot STATE0 + k is read and written), and maximize (the generic loop negates the grad). The rule's own
# columns (``Rule.COLUMNS``) follow, from GROUP_COLUMNS on.
COUNTS_STEP, LIVE_STATES, MAXIMIZE = range(3)
GROUP_COLUMNS = 3
STATE_SLOTS = 3  # at most three state buffers per param

# Width of the per-tensor coefficient row: the rule's step scalars (RULE_COEFFICIENTS at most, written by its
# ``coefficients``), then the two grad factors (grad_control's GRAD_UNSCALE and GRAD_CLIP rounded to the math dtype),
# written by the generic loop for every rule.
RULE_COEFFICIENTS = 14
COEFFICIENTS = RULE_COEFFICIENTS + 2
COEFFICIENT_GRAD_UNSCALE, COEFFICIENT_GRAD_CLIP = RULE_COEFFICIENTS, RULE_COEFFICIENTS + 1

# Width of the per-tensor running values (``tensor_scalars``; a rule names its own in ``Rule.SCALARS``).
TENSOR_SCALARS = 2

# Per-chunk partial sums of a rule with per-tensor norms (LAMB): the sum of squares of the param, and of the update
# direction, in float64. The per-tensor totals add the chunks in order, so they do not depend on the thread count.
NORM_PARAM, NORM_UPDATE = range(2)
NORM_SUMS = 2
