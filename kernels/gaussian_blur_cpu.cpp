// Separable blur with zero padding ("same" size) on the CPU: LNCC's 21-tap Gaussian window.
// Built by setup.py as mgr_engine._gaussian_blur_cpu; mgr_engine.kernels.gaussian_blur_cpu wraps
// it (autograd: the window is symmetric, so the blur is its own adjoint).
//
// Why: PyTorch's fastest CPU form of this blur was three banded matrix products (each output
// voxel weighs all n voxels of its line, 175 multiply-adds where 21 carry weight), about 37 ms
// per 175^3 volume on 2 cores; LNCC blurs three volumes per call and again in its backward.
// Here each output voxel takes its taps only: x and y per z plane through a thread's plane
// buffer, then z per y row, in place, through a thread's (D, W) buffer; vectorized along x and
// compiled for AVX-512 / AVX2 / baseline x86-64 (cpu_kernel.h).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_kernel.h"  // Array, check, CPU_DISPATCH, INLINE_INTO_CLONES

namespace {

// dst[i] += sum over taps t of kernel[t] * src[i + t - radius], for i in [0, n), src read
// only inside [0, n) (zero padding). Contiguous lines (x).
template <typename T>
INLINE_INTO_CLONES void blur_line(const T* src, T* dst, int64_t n, const T* kernel, int64_t radius) {
    for (int64_t t = 0; t <= 2 * radius; ++t) {
        const int64_t shift = t - radius;
        const int64_t first = std::max<int64_t>(0, -shift), last = std::min(n, n - shift);
        const T w = kernel[t];
#pragma omp simd
        for (int64_t i = first; i < last; ++i) dst[i] += w * src[i + shift];
    }
}

// Rows of `width` elements `stride` apart: dst row r = sum over taps t of kernel[t] * src row
// r + t - radius (zero outside [0, rows)). The y and z passes.
template <typename T>
INLINE_INTO_CLONES void blur_rows(const T* src, T* dst, int64_t rows, int64_t width, int64_t src_stride, int64_t dst_stride,
                      const T* kernel, int64_t radius) {
    for (int64_t r = 0; r < rows; ++r) {
        T* out = dst + r * dst_stride;
        std::fill(out, out + width, T(0));
        const int64_t first = std::max<int64_t>(0, r - radius), last = std::min(rows - 1, r + radius);
        for (int64_t q = first; q <= last; ++q) {
            const T w = kernel[q - r + radius];
            const T* in = src + q * src_stride;
#pragma omp simd
            for (int64_t i = 0; i < width; ++i) out[i] += w * in[i];
        }
    }
}

// One z plane (height, width) blurred along x into the zeroed `buffer`, then along y into out.
template <typename T>
INLINE_INTO_CLONES void blur_plane_body(const T* in, T* buffer, T* out, int64_t height, int64_t width, const T* taps,
                                        int64_t radius) {
    std::fill(buffer, buffer + height * width, T(0));
    for (int64_t y = 0; y < height; ++y) blur_line(in + y * width, buffer + y * width, width, taps, radius);
    blur_rows(buffer, out, height, width, width, width, taps, radius);
}

// One slab of `depth` rows of `width`, `plane` apart (fixed y), blurred along z in place.
template <typename T>
INLINE_INTO_CLONES void blur_slab_body(T* slab, T* buffer, int64_t depth, int64_t width, int64_t plane, const T* taps,
                                       int64_t radius) {
    for (int64_t z = 0; z < depth; ++z) std::copy(slab + z * plane, slab + z * plane + width, buffer + z * width);
    blur_rows(buffer, slab, depth, width, width, plane, taps, radius);
}

CPU_DISPATCH void blur_plane(const float* in, float* buffer, float* out, int64_t height, int64_t width,
                             const float* taps, int64_t radius) {
    blur_plane_body(in, buffer, out, height, width, taps, radius);
}
CPU_DISPATCH void blur_plane(const double* in, double* buffer, double* out, int64_t height, int64_t width,
                             const double* taps, int64_t radius) {
    blur_plane_body(in, buffer, out, height, width, taps, radius);
}
CPU_DISPATCH void blur_slab(float* slab, float* buffer, int64_t depth, int64_t width, int64_t plane,
                            const float* taps, int64_t radius) {
    blur_slab_body(slab, buffer, depth, width, plane, taps, radius);
}
CPU_DISPATCH void blur_slab(double* slab, double* buffer, int64_t depth, int64_t width, int64_t plane,
                            const double* taps, int64_t radius) {
    blur_slab_body(slab, buffer, depth, width, plane, taps, radius);
}

// out (N, D, H, W) = volume (N, D, H, W) blurred along each of its three axes by `kernel`
// (an odd number of taps, centred). out may not alias volume.
template <typename T>
void blur(const Array<T>& volume, const Array<T>& kernel, Array<T>& out, int threads) {
    check(volume.ndim() == 4 && out.ndim() == 4 && kernel.ndim() == 1, "volume and out must be (N, D, H, W)");
    for (int a = 0; a < 4; ++a) check(out.shape(a) == volume.shape(a), "out must have volume's shape");
    check(kernel.shape(0) % 2 == 1, "the kernel needs an odd number of taps");
    const int64_t count = volume.shape(0), depth = volume.shape(1), height = volume.shape(2), width = volume.shape(3);
    const int64_t plane = height * width, radius = kernel.shape(0) / 2;
    const T* src = volume.data();
    const T* taps = kernel.data();
    T* dst = out.mutable_data();

    py::gil_scoped_release release;
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> buffer(std::max(plane, depth * width));
#pragma omp for schedule(static)
        for (int64_t p = 0; p < count * depth; ++p)
            blur_plane(src + p * plane, buffer.data(), dst + p * plane, height, width, taps, radius);
        // (the implicit barrier: every plane is written before the z pass reads across them)
#pragma omp for schedule(static)
        for (int64_t s = 0; s < count * height; ++s)
            blur_slab(dst + (s / height) * depth * plane + (s % height) * width, buffer.data(), depth, width, plane,
                      taps, radius);
    }
}

template <typename T>
void define(py::module_& module) {
    // noconvert: a silent dtype/contiguity copy of the output array would drop the result.
    module.def("blur", &blur<T>, py::arg("volume").noconvert(), py::arg("kernel").noconvert(),
               py::arg("out").noconvert(), py::arg("threads"),
               "Blur volume (N, D, H, W) along each axis by the 1-D kernel (odd, centred), zero padding, into out.");
}

}  // namespace

PYBIND11_MODULE(_gaussian_blur_cpu, module) {
    module.doc() = "Separable blur with zero padding on the CPU with OpenMP (mgr_engine.kernels.gaussian_blur_cpu)";
    define<float>(module);
    define<double>(module);
}
