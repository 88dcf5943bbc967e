// Loading and storing the fused kernels' streams in their storage formats: the CUDA side of the Numba kernels'
// stream / param_streams / write_param (fastopt/kernels/cpu/fused.py) and conversions.load / store, done in
// registers, element by element.
//
// A stream is loaded as the raw bits of its stored value (load_bits: a 16-, 32- or 64-bit load) and widened to the
// math dtype T exactly (widen); an updated value is stored rounded to its format (store_value: to nearest even, or
// stochastically for BFLOAT16_STOCHASTIC, keyed by (seed, optimizer step, (tensor << 40) + element within the
// tensor) as write_param keys it). The formats are template arguments (Formats): a chunk loop compiled for fixed
// formats has no per-element branch on a format (and, under float math, moves two adjacent elements per access);
// RUNTIME reads them from the format row, for any tensor; PlainFormats is the all-NATIVE loop.
//
// Under double math the only other format is FLOAT32 (float32 grads of float64 params, fastopt.dtypes.kernel_format);
// the double build leaves out the 16-bit paths it never takes.
#pragma once

#include "conversions.cuh"
#include "host_device.cuh"
#include "layout.cuh"

namespace fastopt {

// The raw bits of a value loaded for math dtype T, wide enough for T itself.
template <typename T>
struct StoredBits;
template <>
struct StoredBits<float> {
    typedef uint32 type;
};
template <>
struct StoredBits<double> {
    typedef uint64 type;
};

FASTOPT_HOST_DEVICE uint64 float64_bits(double value) {
#if defined(__CUDA_ARCH__)
    return uint64(__double_as_longlong(value));
#else
    uint64 bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
#endif
}

FASTOPT_HOST_DEVICE double float64_from_bits(uint64 bits) {
#if defined(__CUDA_ARCH__)
    return __longlong_as_double((long long)bits);
#else
    double value;
    memcpy(&value, &bits, sizeof value);
    return value;
#endif
}

FASTOPT_HOST_DEVICE uint32 value_bits(float value) { return float32_bits(value); }
FASTOPT_HOST_DEVICE uint64 value_bits(double value) { return float64_bits(value); }

template <typename T>
FASTOPT_HOST_DEVICE T value_from_bits(typename StoredBits<T>::type bits);
template <>
FASTOPT_HOST_DEVICE float value_from_bits<float>(uint32 bits) {
    return float32_from_bits(bits);
}
template <>
FASTOPT_HOST_DEVICE double value_from_bits<double>(uint64 bits) {
    return float64_from_bits(bits);
}

// Bytes per stored element of ``format`` under math dtype T.
template <typename T>
FASTOPT_HOST_DEVICE int64 storage_bytes(int format) {
    return format == NATIVE ? int64(sizeof(T)) : format == FLOAT32 ? 4 : 2;
}

// Element ``start`` of the buffer at ``address`` stored as ``format``; nullptr for an absent buffer (address 0),
// which the flags guarantee is never read.
template <typename T>
FASTOPT_HOST_DEVICE void* stored_pointer(int64 address, int format, int64 start) {
    return address == 0 ? nullptr : reinterpret_cast<void*>(address + start * storage_bytes<T>(format));
}

// A stream's storage format as a template argument: a format code when the chunk loop is compiled for it (the
// common combinations, dispatched once per block by step_math.cuh's run_chunk: no per-element branch on a format),
// or RUNTIME, the generic loop that reads each stream's format from the tensor's format row and switches on it
// element by element. NO_STREAM: a stream the loop never has (the rounded param of a tensor without a MASTER).
constexpr int RUNTIME = -1;
constexpr int NO_STREAM = -2;

// The storage formats of one chunk loop: ``param`` is the stream the math reads and writes (NATIVE for a MASTER
// copy), ``rounded`` the 16-bit param written as the master's rounding (NO_STREAM: no master), then the grad's and
// the states' formats.
template <int PARAM_FORMAT_, int ROUNDED_FORMAT_, int GRAD_FORMAT_, int STATE_FORMAT_>
struct Formats {
    static constexpr int param = PARAM_FORMAT_;
    static constexpr int rounded = ROUNDED_FORMAT_;
    static constexpr int grad = GRAD_FORMAT_;
    static constexpr int state = STATE_FORMAT_;
};
typedef Formats<NATIVE, NO_STREAM, NATIVE, NATIVE> PlainFormats;        // every stream in the math dtype
typedef Formats<RUNTIME, RUNTIME, RUNTIME, RUNTIME> RuntimeFormats;     // any tensor: formats read at run time

// What a stream's element is loaded into before widening: the value itself in the math dtype, a float32, or the
// bits of a 16-bit value; under RUNTIME the raw bits of the stored value, wide enough for any format.
template <typename T, int FORMAT>
struct Loaded {
    typedef uint16 type;  // BFLOAT16, BFLOAT16_STOCHASTIC, FLOAT16
};
template <typename T>
struct Loaded<T, NATIVE> {
    typedef T type;
};
template <typename T>
struct Loaded<T, FLOAT32> {
    typedef float type;
};
template <typename T>
struct Loaded<T, RUNTIME> {
    typedef typename StoredBits<T>::type type;
};

// The value of loaded bits: the bits of a RUNTIME load, or the value itself.
template <typename T>
FASTOPT_HOST_DEVICE T loaded_value(T value) {
    return value;
}
template <typename T>
FASTOPT_HOST_DEVICE T loaded_value(typename StoredBits<T>::type bits) {
    return value_from_bits<T>(bits);
}

// Element ``i`` of a stream stored as FORMAT, as loaded (``format``, the stream's format code, is read under
// RUNTIME only).
template <typename T, int FORMAT>
FASTOPT_HOST_DEVICE typename Loaded<T, FORMAT>::type load_bits(const void* stream, int format, int i) {
    typedef typename Loaded<T, FORMAT>::type Result;
    if constexpr (FORMAT == NATIVE) {
        return static_cast<const T*>(stream)[i];
    } else if constexpr (FORMAT == FLOAT32) {
        return static_cast<const float*>(stream)[i];
    } else if constexpr (FORMAT == RUNTIME) {
        if (format == NATIVE) {
            return Result(value_bits(static_cast<const T*>(stream)[i]));
        }
        if (sizeof(T) == 8 || format == FLOAT32) {
            return Result(float32_bits(static_cast<const float*>(stream)[i]));
        }
        return Result(static_cast<const uint16*>(stream)[i]);
    } else {
        return static_cast<const uint16*>(stream)[i];
    }
}

// A loaded element as the math dtype: exact for every format (a 16-bit or float32 value is a float32 or a double).
// BFLOAT16_STOCHASTIC reads as BFLOAT16.
template <typename T, int FORMAT>
FASTOPT_HOST_DEVICE T widen(typename Loaded<T, FORMAT>::type bits, int format) {
    if constexpr (FORMAT == NATIVE || FORMAT == FLOAT32) {
        return T(bits);
    } else if constexpr (FORMAT == FLOAT16) {
        return T(float16_bits_to_float32(bits));
    } else if constexpr (FORMAT == BFLOAT16 || FORMAT == BFLOAT16_STOCHASTIC) {
        return T(bfloat16_bits_to_float32(bits));
    } else {
        static_assert(FORMAT == RUNTIME, "a storage format");
        if (format == NATIVE) {
            return loaded_value<T>(bits);
        }
        if (sizeof(T) == 8 || format == FLOAT32) {
            return T(float32_from_bits(uint32(bits)));
        }
        if (format == FLOAT16) {
            return T(float16_bits_to_float32(uint16(bits)));
        }
        return T(bfloat16_bits_to_float32(uint16(bits)));
    }
}

// The key of a chunk's stochastic rounding: (seed, optimizer step) mixed once, and the counter of its first element,
// (tensor << 40) + the chunk's start within the tensor (the tensor's position in its math-dtype bucket).
struct Rounding {
    uint64 key;
    int64 first_element;
};

FASTOPT_HOST_DEVICE Rounding chunk_rounding(int64 seed, int64 optimizer_step, int64 tensor, int64 start) {
    Rounding rounding;
    rounding.key = counter_key(seed, optimizer_step);
    rounding.first_element = (tensor << 40) + start;
    return rounding;
}

// ``value`` rounded to the 16-bit FORMAT (to nearest even, or stochastically for BFLOAT16_STOCHASTIC with the key
// of element ``i`` of the chunk); under RUNTIME ``format`` says which. T is float.
template <typename T, int FORMAT>
FASTOPT_HOST_DEVICE uint16 narrow_bits(T value, int format, int i, const Rounding& rounding) {
    const float single = float(value);  // T is float here: no rounding
    const int f = FORMAT == RUNTIME ? format : FORMAT;
    if (f == FLOAT16) {
        return float32_to_float16_bits(single);
    }
    if (f == BFLOAT16_STOCHASTIC) {
        return float32_to_bfloat16_stochastic_keyed(single, rounding.key, rounding.first_element + i);
    }
    return float32_to_bfloat16_bits(single);
}

// Element ``i`` of a stream set to ``value``, rounded to its format. FLOAT32 is never stored (grads only).
template <typename T, int FORMAT>
FASTOPT_HOST_DEVICE void store_value(void* stream, int format, int i, T value, const Rounding& rounding) {
    if (sizeof(T) == 8 || FORMAT == NATIVE || (FORMAT == RUNTIME && format == NATIVE)) {
        static_cast<T*>(stream)[i] = value;
        return;
    }
    static_cast<uint16*>(stream)[i] = narrow_bits<T, FORMAT>(value, format, i, rounding);
}

// ``value`` as a state stream stored as FORMAT holds it once stored: rounded to its format (to nearest: states are
// never rounded stochastically) and widened back (Numba: norm_loop's store and load of a state).
template <typename T, int FORMAT>
FASTOPT_HOST_DEVICE T as_stored(T value, int format) {
    if constexpr (sizeof(T) == 8 || FORMAT == NATIVE) {
        return value;
    } else {
        if (FORMAT == RUNTIME && format == NATIVE) {
            return value;
        }
        const uint16 bits = narrow_bits<T, FORMAT>(value, format, 0, Rounding{});
        return widen<T, FORMAT>(typename Loaded<T, FORMAT>::type(bits), format);
    }
}

// ---------------------------------------------------------------- two adjacent elements per load and store
// The loops compiled for fixed formats (float math only) load and store two adjacent elements at once: one 32-bit
// access for two 16-bit values, one 64-bit access for two float32 values, so that a thread has twice the elements
// (and as many bytes as the float32 loop) in flight. What one such load gives, in one or two registers:
template <int FORMAT>
struct Pair {
    typedef uint32 type;  // two 16-bit values, element 0 in the low half
};
template <>
struct Pair<NATIVE> {
    typedef uint64 type;  // two float32 values, element 0 in the low half
};

// Whether every stream of a chunk can be read and written in pairs: each address a multiple of two elements
// (chunk starts are even: MIN_CHUNK is). The chunk's length must be even too (checked by run_chunk).
FASTOPT_HOST_DEVICE bool pair_aligned(const void* stream, int bytes) {
    return (reinterpret_cast<unsigned long long>(stream) & (2 * bytes - 1)) == 0;
}

// Pair ``j`` (elements 2j and 2j + 1) of a float-math stream stored as FORMAT (not RUNTIME).
template <int FORMAT>
FASTOPT_HOST_DEVICE typename Pair<FORMAT>::type load_pair(const void* stream, int j) {
    return static_cast<const typename Pair<FORMAT>::type*>(stream)[j];
}

// Element ``h`` (0 or 1) of a loaded pair, widened to float.
template <int FORMAT>
FASTOPT_HOST_DEVICE float pair_element(typename Pair<FORMAT>::type pair, int h) {
    if constexpr (FORMAT == NATIVE) {
        return float32_from_bits(uint32(pair >> (32 * h)));
    } else {
        return widen<float, FORMAT>(uint16(pair >> (16 * h)), FORMAT);
    }
}

// Pair ``j`` of a stream set to ``values`` (elements 2j, 2j + 1), each rounded to FORMAT.
template <int FORMAT>
FASTOPT_HOST_DEVICE void store_pair(void* stream, int j, const float* values, const Rounding& rounding) {
    typedef typename Pair<FORMAT>::type Result;
    if constexpr (FORMAT == NATIVE) {
        static_cast<Result*>(stream)[j] = Result(float32_bits(values[0])) | Result(float32_bits(values[1])) << 32;
    } else {
        const uint32 low = narrow_bits<float, FORMAT>(values[0], FORMAT, 2 * j, rounding);
        const uint32 high = narrow_bits<float, FORMAT>(values[1], FORMAT, 2 * j + 1, rounding);
        static_cast<Result*>(stream)[j] = low | high << 16;
    }
}

// Whether a tensor's chunks need the MIXED loop: any stream stored in another format than the math dtype (a MASTER
// copy comes only with a 16-bit param).
FASTOPT_HOST_DEVICE bool is_mixed(const int64* format_row) {
    return format_row[PARAM_FORMAT] != NATIVE || format_row[GRAD_FORMAT] != NATIVE ||
           format_row[STATE_FORMAT] != NATIVE;
}

// The buffers of one chunk at its first element, with their formats: what one block of a step kernel (or the host
// shim of the tests) reads and writes.
template <typename T>
struct ChunkStreams {
    void* param;          // what the update reads and writes: the param itself, or its MASTER copy (NATIVE)
    void* rounded_param;  // with a MASTER copy: the 16-bit param, written as the master's rounding; else nullptr
    const void* grad;
    const T* lr_scale;  // nullptr: none
    void* state0;
    void* state1;
    void* state2;  // nullptr: a state the group does not use
    int param_format;
    int rounded_format;
    int grad_format;
    int state_format;
    Rounding rounding;
};

// The streams of the chunk starting at element ``start`` of the tensor whose address and format rows are given
// (the Numba kernel's param_streams, which picks the MASTER copy for the math where there is one). Without MIXED the
// tensor is known to be stored in T throughout: the formats are not read.
template <typename T, bool MIXED>
FASTOPT_HOST_DEVICE ChunkStreams<T> chunk_streams(const int64* address_row, const int64* format_row, int64 start,
                                                  const Rounding& rounding) {
    ChunkStreams<T> s;
    const int param_format = MIXED ? int(format_row[PARAM_FORMAT]) : NATIVE;
    if (MIXED && sizeof(T) == 4 && address_row[MASTER] != 0) {  // master copies come with 16-bit params only
        s.param = stored_pointer<float>(address_row[MASTER], NATIVE, start);
        s.param_format = NATIVE;
        s.rounded_param = stored_pointer<T>(address_row[PARAM], param_format, start);
        s.rounded_format = param_format;
    } else {
        s.param = stored_pointer<T>(address_row[PARAM], param_format, start);
        s.param_format = param_format;
        s.rounded_param = nullptr;
        s.rounded_format = NATIVE;
    }
    s.grad_format = MIXED ? int(format_row[GRAD_FORMAT]) : NATIVE;
    s.grad = stored_pointer<T>(address_row[GRAD], s.grad_format, start);
    s.lr_scale = static_cast<const T*>(stored_pointer<T>(address_row[LR_SCALE], NATIVE, start));
    s.state_format = MIXED ? int(format_row[STATE_FORMAT]) : NATIVE;
    s.state0 = stored_pointer<T>(address_row[STATE0], s.state_format, start);
    s.state1 = stored_pointer<T>(address_row[STATE1], s.state_format, start);
    s.state2 = stored_pointer<T>(address_row[STATE2], s.state_format, start);
    s.rounding = rounding;
    return s;
}

// Element ``i`` of the updated param: into the stream the math reads, and with a MASTER copy its rounding into the
// stored 16-bit param (to nearest even, or stochastically, per the param's format).
template <typename T, typename F>
FASTOPT_HOST_DEVICE void store_param(const ChunkStreams<T>& s, int i, T value) {
    store_value<T, F::param>(s.param, s.param_format, i, value, s.rounding);
    if constexpr (F::rounded == RUNTIME) {
        if (s.rounded_param != nullptr) {
            store_value<T, RUNTIME>(s.rounded_param, s.rounded_format, i, value, s.rounding);
        }
    } else if constexpr (F::rounded != NO_STREAM) {
        store_value<T, F::rounded>(s.rounded_param, s.rounded_format, i, value, s.rounding);
    }
}

// Pair ``j`` of the updated param (float math), as store_param.
template <typename F>
FASTOPT_HOST_DEVICE void store_param_pair(const ChunkStreams<float>& s, int j, const float* values) {
    store_pair<F::param>(s.param, j, values, s.rounding);
    if constexpr (F::rounded != NO_STREAM) {
        store_pair<F::rounded>(s.rounded_param, j, values, s.rounding);
    }
}

// Whether the chunk's streams are stored as F (fixed formats): the dispatch of run_chunk.
template <typename F, typename T>
FASTOPT_HOST_DEVICE bool has_formats(const ChunkStreams<T>& s) {
    const bool master = s.rounded_param != nullptr;
    return s.param_format == F::param && (F::rounded == NO_STREAM ? !master : master && s.rounded_format == F::rounded) &&
           s.grad_format == F::grad && s.state_format == F::state;
}

// Whether every stream of the chunk (those present) can be accessed in pairs, for formats F.
template <typename F>
FASTOPT_HOST_DEVICE bool streams_pair_aligned(const ChunkStreams<float>& s) {
    const int param_bytes = F::param == NATIVE ? 4 : 2;
    const int state_bytes = F::state == NATIVE ? 4 : 2;
    return pair_aligned(s.param, param_bytes) && pair_aligned(s.rounded_param, 2) &&
           pair_aligned(s.grad, F::grad == NATIVE ? 4 : 2) && pair_aligned(s.lr_scale, 4) &&
           pair_aligned(s.state0, state_bytes) && pair_aligned(s.state1, state_bytes) &&
           pair_aligned(s.state2, state_bytes);
}

// ---------------------------------------------------------------- one access of a chunk loop
// What one load of a chunk loop gives: one element (WIDTH 1: the plain and RUNTIME loops, any math dtype) or a pair of
// adjacent elements (WIDTH 2: the loops compiled for fixed formats, float math).
template <typename T, int FORMAT, int WIDTH>
struct Access {
    typedef typename Loaded<T, FORMAT>::type type;
};
template <typename T, int FORMAT>
struct Access<T, FORMAT, 2> {
    typedef typename Pair<FORMAT>::type type;
};

// Accesses each thread has in flight per iteration of a chunk loop: ILP elements, or ILP / 2 pairs (the same elements
// in flight, in half the load and store instructions). ILP pairs of 16-bit streams would double the elements in
// flight, but the kernel's registers are its widest loop's: 72 on sm_90, three blocks per multiprocessor, not four.
template <typename F, int WIDTH>
FASTOPT_HOST_DEVICE constexpr int loop_ilp() {
    return WIDTH == 2 ? (ILP + 1) / 2 : ILP;
}

// Access ``j`` of a stream: element j, or pair j (elements 2j and 2j + 1).
template <typename T, int FORMAT, int WIDTH>
FASTOPT_HOST_DEVICE typename Access<T, FORMAT, WIDTH>::type load_access(const void* stream, int format, int j) {
    if constexpr (WIDTH == 1) {
        return load_bits<T, FORMAT>(stream, format, j);
    } else {
        return load_pair<FORMAT>(stream, j);
    }
}

// Element ``h`` of a loaded access, as the math dtype.
template <typename T, int FORMAT, int WIDTH>
FASTOPT_HOST_DEVICE T access_element(typename Access<T, FORMAT, WIDTH>::type loaded, int format, int h) {
    if constexpr (WIDTH == 1) {
        return widen<T, FORMAT>(loaded, format);
    } else {
        return pair_element<FORMAT>(loaded, h);
    }
}

// Access ``j`` of a stream set to ``values`` (WIDTH of them), rounded to its format.
template <typename T, int FORMAT, int WIDTH>
FASTOPT_HOST_DEVICE void store_access(void* stream, int format, int j, const T* values, const Rounding& rounding) {
    if constexpr (WIDTH == 1) {
        store_value<T, FORMAT>(stream, format, j, values[0], rounding);
    } else {
        store_pair<FORMAT>(stream, j, values, rounding);
    }
}

// Access ``j`` of the updated param (store_param, store_param_pair).
template <typename T, typename F, int WIDTH>
FASTOPT_HOST_DEVICE void store_param_access(const ChunkStreams<T>& s, int j, const T* values) {
    if constexpr (WIDTH == 1) {
        store_param<T, F>(s, j, values[0]);
    } else {
        store_param_pair<F>(s, j, values);
    }
}

// ---------------------------------------------------------------- 8-bit states
// A state slot stored in 8 bits (fastopt.quantization's format, codes.cuh) has its uint8 codes at its state slot's
// address and the float32 scales of its blocks at its SCALES slot's; tensor_format's STATE_CODES says which slots are
// 8-bit (and which of them use the signed map). Only float math has them.

// Whether a tensor has a state stored in 8 bits (its chunks run step_math.cuh's 8-bit loop).
FASTOPT_HOST_DEVICE bool has_codes(const int64* format_row) { return format_row[STATE_CODES] != 0; }

// The scales of a chunk's 8-bit states, from the chunk's first block on (nullptr: the slot is not 8-bit), and whether
// each slot's codes round stochastically.
struct CodeStreams {
    float* scales[STATE_SLOTS];
    bool stochastic[STATE_SLOTS];
};

// The 8-bit streams of the chunk starting at element ``start`` (a multiple of CODE_BLOCK: the host's chunks are) of
// the tensor whose address and format rows are given; ``s``, the chunk's ChunkStreams, gets the codes of each 8-bit
// state as that state's stream (one byte per element).
FASTOPT_HOST_DEVICE CodeStreams code_streams(ChunkStreams<float>& s, const int64* address_row,
                                             const int64* format_row, int64 start) {
    CodeStreams codes;
    const int64 bits = format_row[STATE_CODES];
    FASTOPT_UNROLL
    for (int k = 0; k < STATE_SLOTS; ++k) {
        const bool coded = ((bits >> k) & CODES_8BIT) != 0;
        codes.scales[k] = coded ? reinterpret_cast<float*>(address_row[SCALES0 + k]) + start / CODE_BLOCK : nullptr;
        codes.stochastic[k] = coded && ((bits >> k) & STOCHASTIC_CODES) != 0;
    }
    s.state0 = codes.scales[0] != nullptr ? reinterpret_cast<void*>(address_row[STATE0] + start) : s.state0;
    s.state1 = codes.scales[1] != nullptr ? reinterpret_cast<void*>(address_row[STATE1] + start) : s.state1;
    s.state2 = codes.scales[2] != nullptr ? reinterpret_cast<void*>(address_row[STATE2] + start) : s.state2;
    return codes;
}

// State slot ``k``'s stream of a chunk (k a constant once the loops are unrolled).
template <typename T>
FASTOPT_HOST_DEVICE void* state_stream(const ChunkStreams<T>& s, int k) {
    return k == 0 ? s.state0 : k == 1 ? s.state1 : s.state2;
}

// ---------------------------------------------------------------- a thread's four elements of a code block
// The 8-bit loop (float math) gives each thread a quad of each stream: QUAD elements ``stride`` apart from element j.
// Adjacent (stride 1, formats fixed at compile time) they are read and written in one access where the quad lies
// wholly in the chunk and every stream is aligned to a quad ("whole"): 16 bytes of float32 values, 8 of 16-bit ones,
// 4 of codes, held packed in registers (codes four to a register) until each element is used. Otherwise (a tensor's
// last, short quad; a misaligned stream; the RUNTIME formats, whose quads are strided so that each access of a warp
// reads adjacent elements) element by element, those past the chunk's ``length`` left zero.
constexpr int QUAD = 4;

// Four float32 values, or the raw bits of four RUNTIME values; four 16-bit values, two to a word, the lower element in
// the low half.
struct alignas(16) Words4 {
    uint32 word[4];
};
struct alignas(8) Words2 {
    uint32 word[2];
};
template <int FORMAT>
struct Quad {
    typedef Words2 type;  // BFLOAT16, BFLOAT16_STOCHASTIC, FLOAT16
};
template <>
struct Quad<NATIVE> {
    typedef Words4 type;
};
template <>
struct Quad<RUNTIME> {
    typedef Words4 type;
};

// A float-math load of a stream stored as FORMAT as 32 bits (a float's bits, or a 16-bit value's), and back.
template <int FORMAT>
FASTOPT_HOST_DEVICE uint32 loaded_bits(typename Loaded<float, FORMAT>::type loaded) {
    if constexpr (FORMAT == NATIVE || FORMAT == FLOAT32) {
        return float32_bits(loaded);
    } else {
        return uint32(loaded);
    }
}
template <int FORMAT>
FASTOPT_HOST_DEVICE typename Loaded<float, FORMAT>::type loaded_from_bits(uint32 bits) {
    if constexpr (FORMAT == NATIVE || FORMAT == FLOAT32) {
        return float32_from_bits(bits);
    } else {
        return typename Loaded<float, FORMAT>::type(bits);
    }
}

// The stored bits of element ``i`` of a quad, and setting them (in a quad that starts zeroed).
template <int FORMAT>
FASTOPT_HOST_DEVICE uint32 quad_bits(const typename Quad<FORMAT>::type& quad, int i) {
    if constexpr (FORMAT == NATIVE || FORMAT == RUNTIME) {
        return quad.word[i];
    } else {
        return (quad.word[i / 2] >> (16 * (i % 2))) & 0xFFFF;
    }
}
template <int FORMAT>
FASTOPT_HOST_DEVICE void set_quad_bits(typename Quad<FORMAT>::type& quad, int i, uint32 bits) {
    if constexpr (FORMAT == NATIVE || FORMAT == RUNTIME) {
        quad.word[i] = bits;
    } else {
        quad.word[i / 2] |= bits << (16 * (i % 2));
    }
}

// The quad of a stream stored as FORMAT at element ``j``: one access where ``whole`` (j a multiple of QUAD, stride 1).
template <int FORMAT>
FASTOPT_HOST_DEVICE typename Quad<FORMAT>::type load_quad(const void* stream, int format, int j, int stride,
                                                         int length, bool whole) {
    typedef typename Quad<FORMAT>::type Result;
    if constexpr (FORMAT != RUNTIME) {
        if (whole) {
            return static_cast<const Result*>(stream)[j / QUAD];
        }
    }
    Result quad = {};
    FASTOPT_UNROLL
    for (int i = 0; i < QUAD; ++i) {
        if (j + i * stride < length) {
            set_quad_bits<FORMAT>(quad, i,
                                  loaded_bits<FORMAT>(load_bits<float, FORMAT>(stream, format, j + i * stride)));
        }
    }
    return quad;
}

// Element ``i`` of a loaded quad, as float.
template <int FORMAT>
FASTOPT_HOST_DEVICE float quad_element(const typename Quad<FORMAT>::type& quad, int i, int format) {
    return widen<float, FORMAT>(loaded_from_bits<FORMAT>(quad_bits<FORMAT>(quad, i)), format);
}

// The quad of a stream at element ``j`` set to ``values``, rounded to its format as store_value rounds.
template <int FORMAT>
FASTOPT_HOST_DEVICE void store_quad(void* stream, int format, int j, int stride, int length, bool whole,
                                    const float* values, const Rounding& rounding) {
    typedef typename Quad<FORMAT>::type Result;
    if constexpr (FORMAT != RUNTIME) {
        if (whole) {
            Result quad = {};
            FASTOPT_UNROLL
            for (int i = 0; i < QUAD; ++i) {
                if constexpr (FORMAT == NATIVE) {
                    set_quad_bits<FORMAT>(quad, i, float32_bits(values[i]));
                } else {
                    set_quad_bits<FORMAT>(quad, i, narrow_bits<float, FORMAT>(values[i], FORMAT, j + i, rounding));
                }
            }
            static_cast<Result*>(stream)[j / QUAD] = quad;
            return;
        }
    }
    FASTOPT_UNROLL
    for (int i = 0; i < QUAD; ++i) {
        if (j + i * stride < length) {
            store_value<float, FORMAT>(stream, format, j + i * stride, values[i], rounding);
        }
    }
}

// The quad of the updated param (store_param).
template <typename F>
FASTOPT_HOST_DEVICE void store_param_quad(const ChunkStreams<float>& s, int j, int stride, int length, bool whole,
                                          const float* values) {
    store_quad<F::param>(s.param, s.param_format, j, stride, length, whole, values, s.rounding);
    if constexpr (F::rounded == RUNTIME) {
        if (s.rounded_param != nullptr) {
            store_quad<RUNTIME>(s.rounded_param, s.rounded_format, j, stride, length, whole, values, s.rounding);
        }
    } else if constexpr (F::rounded != NO_STREAM) {
        store_quad<F::rounded>(s.rounded_param, s.rounded_format, j, stride, length, whole, values, s.rounding);
    }
}

// The codes of a quad, element i in byte i, and storing them (as load_quad, store_quad).
FASTOPT_HOST_DEVICE uint32 load_codes(const void* codes, int j, int stride, int length, bool whole) {
    if (whole) {
        return static_cast<const uint32*>(codes)[j / QUAD];
    }
    uint32 word = 0;
    FASTOPT_UNROLL
    for (int i = 0; i < QUAD; ++i) {
        if (j + i * stride < length) {
            word |= uint32(static_cast<const unsigned char*>(codes)[j + i * stride]) << (8 * i);
        }
    }
    return word;
}
FASTOPT_HOST_DEVICE void store_codes(void* codes, int j, int stride, int length, bool whole, uint32 word) {
    if (whole) {
        static_cast<uint32*>(codes)[j / QUAD] = word;
        return;
    }
    FASTOPT_UNROLL
    for (int i = 0; i < QUAD; ++i) {
        if (j + i * stride < length) {
            static_cast<unsigned char*>(codes)[j + i * stride] = (unsigned char)(word >> (8 * i));
        }
    }
}

// Whether a stream (at its chunk's first element) can be accessed a quad at a time, ``bytes`` per element.
FASTOPT_HOST_DEVICE bool quad_aligned(const void* stream, int bytes) {
    return (reinterpret_cast<unsigned long long>(stream) & (QUAD * bytes - 1)) == 0;
}

// Whether every stream of a chunk with 8-bit states (those present; ``codes``: STATE_CODES, where slot k holds codes)
// can be accessed a quad at a time, for formats F (never under RUNTIME).
template <typename F>
FASTOPT_HOST_DEVICE bool streams_quad_aligned(const ChunkStreams<float>& s, int codes) {
    if constexpr (F::param == RUNTIME) {
        return false;
    } else {
        const int state_bytes = F::state == NATIVE ? 4 : 2;
        const int bytes0 = (codes & CODES_8BIT) != 0 ? 1 : state_bytes;
        const int bytes1 = ((codes >> 1) & CODES_8BIT) != 0 ? 1 : state_bytes;
        const int bytes2 = ((codes >> 2) & CODES_8BIT) != 0 ? 1 : state_bytes;
        return quad_aligned(s.param, F::param == NATIVE ? 4 : 2) && quad_aligned(s.rounded_param, 2) &&
               quad_aligned(s.grad, F::grad == NATIVE ? 4 : 2) && quad_aligned(s.lr_scale, 4) &&
               quad_aligned(s.state0, bytes0) && quad_aligned(s.state1, bytes1) && quad_aligned(s.state2, bytes2);
    }
}

}  // namespace fastopt
