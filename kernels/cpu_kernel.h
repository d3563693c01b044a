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
// (measured: the last convolution ran at the SSE2 speed). CPU_DISPATCH_AVX2 stops at AVX2+FMA,
// for code measured faster in 256-bit vectors than in 512-bit ones, on AVX-512 CPUs too.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>

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
