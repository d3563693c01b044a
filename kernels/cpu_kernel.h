// Shared by the C++ kernels (one pybind11 extension each, built by setup.py).
//
// Array<T>: the numpy arrays they take, C-contiguous (pybind11 checks; the outputs are passed
// with noconvert, since a silent copy of one would drop the result). check(): an argument
// check raising ValueError in Python.
//
// CPU_DISPATCH compiles a function for AVX-512, AVX2+FMA and baseline x86-64 and picks the
// best the CPU has at load time (target_clones): the package is built without -march, as it
// must run on any x86-64 CPU. Templates cannot be cloned, so each kernel clones plain float (and
// double) overloads and marks the template bodies they call INLINE_INTO_CLONES: a body not
// inlined would be compiled once, for the baseline (SSE2), and every clone would call that copy
// (measured: the last convolution ran at the SSE2 speed). CPU_DISPATCH_AVX2 stops at AVX2+FMA:
// the warp's backward takes it on CPUs that split 512-bit vectors (splits_512_bit_vectors()).
#pragma once

#ifdef _OPENMP
#include <omp.h>
#else  // built without OpenMP (Apple clang): one thread
inline int omp_get_thread_num() { return 0; }
inline int omp_get_num_threads() { return 1; }
#endif

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

namespace py = pybind11;

template <typename T>
using Array = py::array_t<T, py::array::c_style>;

inline void check(bool condition, const char* message) {
    if (!condition) throw std::invalid_argument(message);
}

#if defined(__x86_64__) && defined(__linux__) && (defined(__clang__) || __GNUC__ >= 11)
#define CPU_DISPATCH __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define CPU_DISPATCH_AVX2 __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CPU_DISPATCH
#define CPU_DISPATCH_AVX2
#endif
#define INLINE_INTO_CLONES inline __attribute__((always_inline))

// Explicit dispatch, for a body templated on its vector width: target_clones compiles one body
// for every target, but a body that pins its vectors in registers (keep_in_register) must be
// written in vectors as wide as its target's registers. SIMD_AVX512 / SIMD_AVX2 mark the
// functions compiled for x86-64-v4 / v3, and simd_bytes() says which the CPU runs: 64, 32, or
// 16 (the SSE2 baseline, or another architecture's generic vectors). forced_simd_bytes() caps
// it, for tests (so that every path runs on an AVX-512 CPU).
#if defined(__x86_64__) && defined(__linux__) && (defined(__clang__) || __GNUC__ >= 11)
#define SIMD_LEVELS 1
#define SIMD_AVX512 __attribute__((target("arch=x86-64-v4")))
#define SIMD_AVX2 __attribute__((target("arch=x86-64-v3")))
#endif

// SIMD_DISPATCH(name, body, params, args) defines `template <typename T> void name params`,
// which runs `body<T, BYTES> args` in the widest vectors simd_bytes() allows, each width in a
// function compiled for its target (params: the parameter list in parentheses, T in it; args:
// the call's arguments in parentheses).
#ifdef SIMD_LEVELS
#define SIMD_DISPATCH(name, body, params, args)                       \
    template <typename T>                                              \
    SIMD_AVX512 void name##_avx512 params {                           \
        body<T, 64> args;                                              \
    }                                                                  \
    template <typename T>                                              \
    SIMD_AVX2 void name##_avx2 params {                               \
        body<T, 32> args;                                              \
    }                                                                  \
    template <typename T>                                              \
    void name params {                                                 \
        if (simd_bytes() == 64) return name##_avx512 args;             \
        if (simd_bytes() == 32) return name##_avx2 args;               \
        body<T, 16> args;                                              \
    }
#else
#define SIMD_DISPATCH(name, body, params, args) \
    template <typename T>                        \
    void name params {                           \
        body<T, 16> args;                        \
    }
#endif

inline int& forced_simd_bytes() {
    static int bytes = 0;  // 0: no cap
    return bytes;
}

inline int simd_bytes() {
#ifdef SIMD_LEVELS
    // The features of x86-64-v4 and v3 that name the instructions these bodies compile to.
    static const int widest =
        __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512cd") &&
                __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")
            ? 64
        : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") ? 32
                                                                                                             : 16;
#else
    static const int widest = 16;
#endif
    return forced_simd_bytes() ? std::min(forced_simd_bytes(), widest) : widest;
}

// Whether the CPU runs each 512-bit instruction as two 256-bit halves: AMD's Zen 4 (family 19h;
// Zen 3, the same family, has no AVX-512), where code bound by gathers and shuffles can run slower
// in 512-bit vectors than in 256-bit ones. Zen 5 (family 1Ah) and Intel's AVX-512 cores run them
// whole.
inline bool splits_512_bit_vectors() {
#if defined(__x86_64__) && defined(__GNUC__)
    static const bool splits = [] {
        unsigned a, b, c, d;
        if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
        const bool amd = b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163;  // "AuthenticAMD"
        if (!amd || !__get_cpuid(1, &a, &b, &c, &d)) return false;
        const unsigned base = (a >> 8) & 0xf, family = base == 0xf ? base + ((a >> 20) & 0xff) : base;
        return family == 0x19;
    }();
    return splits;
#else
    return false;
#endif
}

// Whether the AVX-512 point loops of the trilinear warp and of the resampling load the two corners
// along x of a point with one load (adjacent voxels) instead of two gathered elements: where
// simd_bytes() is 64 and the CPU runs 512-bit vectors whole (Zen 4, which splits them, is not
// measured), unless turned off. Each extension has its own switch (module.corner_pairs).
inline bool& corner_pairs_off() {
    static bool off = false;
    return off;
}

inline bool corner_pairs() { return simd_bytes() == 64 && !splits_512_bit_vectors() && !corner_pairs_off(); }

// Defines module.corner_pairs(enable) for Python; `loops` names the loops it switches.
inline void define_corner_pairs(py::module_& module, const std::string& loops) {
    module.def(
        "corner_pairs",
        [](int enable) {
            check(enable >= -1 && enable <= 1, "enable must be 1 (on), 0 (off) or -1 (ask)");
            if (enable >= 0) corner_pairs_off() = !enable;
            return corner_pairs();
        },
        py::arg("enable") = -1,
        ("Whether " + loops + " load the two corners along x of a point with one load (on CPUs that run "
         "512-bit vectors whole). enable: 0 turns it off from now on (so that tests compare both on one CPU), "
         "1 back on.").c_str());
}

// Defines module.prefetch_above_bytes(bytes) for Python, which reads and sets the extension's
// `setting`: the image size in bytes above which `what`.
inline void define_prefetch_above_bytes(py::module_& module, int64_t& (*setting)(), const std::string& what) {
    module.def(
        "prefetch_above_bytes",
        [setting](int64_t bytes) {
            check(bytes >= -1, "bytes must be -1 (ask) or at least 0");
            if (bytes >= 0) setting() = bytes;
            return setting();
        },
        py::arg("bytes") = -1,
        ("The image size in bytes above which " + what + "; bytes >= 0 sets it from now on (0: always, for tests).")
            .c_str());
}

// This OpenMP thread's share [first, last) of n items: the t-th of the actual team's equal shares
// (the team may be smaller than asked: no OpenMP, nested parallelism).
inline void share(int64_t n, int64_t* first, int64_t* last) {
    const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
    *first = n * tid / team, *last = n * (tid + 1) / team;
}

// Defines module.simd_bytes(cap) of an extension whose bodies SIMD_DISPATCH runs, for Python.
inline void define_simd_bytes(py::module_& module) {
    module.def(
        "simd_bytes",
        [](int cap) {
            check(cap == -1 || cap == 0 || cap == 16 || cap == 32 || cap == 64, "cap must be 16, 32, 64 or 0");
            if (cap >= 0) forced_simd_bytes() = cap;
            return simd_bytes();
        },
        py::arg("cap") = -1,
        "The vector width in bytes the kernels run in: 64 (AVX-512), 32 (AVX2+FMA) or 16. cap: 16, 32 or 64 caps "
        "it there from now on (so that tests run every width on one CPU), 0 lifts the cap.");
}

// A GCC vector of BYTES bytes of T: code written on it compiles to that width's instructions.
template <typename T, int BYTES>
struct Vector {
    typedef T type __attribute__((vector_size(BYTES)));
};

// v = the sizeof(V) bytes at `from`, unaligned. (Returned by reference: a vector returned by
// value draws GCC's -Wpsabi note for targets whose registers do not hold it.) It reads
// a vector type of the element's alignment, which may alias T (as GCC's own __m256_u):
// a copy through memory (__builtin_memcpy) became, in an AVX2 build, two 16-byte stores and a
// 32-byte load (GCC's generic tuning splits unaligned 256-bit moves), a store-forwarding stall
// per load that made the transposed convolutions' weight gradient about 10x slower.
template <typename V>
INLINE_INTO_CLONES void load_vector(V& v, const void* from) {
    using T = std::remove_reference_t<decltype(v[0])>;
    typedef T Unaligned __attribute__((vector_size(sizeof(V)), aligned(alignof(T)), may_alias));
    v = *static_cast<const Unaligned*>(from);
}

// Keeps v in a register for all its uses: GCC otherwise folds a vector's load into each
// multiply-add that reads it, one load per use (the last convolution's three output channels
// loaded each input vector three times and ran at a third of the FMA peak). Needs the function
// compiled for a target whose registers hold V (SIMD_AVX512 for 64 bytes, SIMD_AVX2 for 32).
template <typename V>
INLINE_INTO_CLONES void keep_in_register(V& v) {
#if defined(__x86_64__) && defined(__GNUC__)
    asm("" : "+v"(v));
#endif
}
