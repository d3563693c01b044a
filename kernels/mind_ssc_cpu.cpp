// MIND-SSC descriptor on the CPU, forward and backward; built by setup.py as
// mgr_engine._mind_ssc_cpu, wrapped (autograd) by mgr_engine.kernels.mind_ssc_cpu.
//
// Why: in PyTorch the descriptor is a dozen passes over 12-channel volumes (shifted differences,
// squares, the patch mean as banded matrix products, min, mean, clamp, exp) and autograd's
// backward as many again: 3.3 s for one MIND-SSC loss, forward and backward, at 175^3 on 2
// cores, and an IO step with MIND-SSC computes two. Here each pass is one OpenMP loop over planes
// or slabs, vectorized along x, and the backward recomputes the patch means from the image
// instead of keeping them.
//
// The descriptor of an image I (one channel, (D, H, W)), for the 12 pairs (a_k, b_k) of offsets:
//   S_k(x)   = (I[clamp(x + a_k)] - I[clamp(x + b_k)])^2          (replicate padding)
//   SSD_k(x) = mean of S_k over the (2r + 1)^3 patch around x       (replicate padding)
//   M_k = SSD_k - min_j SSD_j,  V = mean_k M_k
// forward() returns M (12 channels) and V; the caller clamps V into [lo, hi] (bounds from V's
// mean over the whole batch) and takes desc_k = exp(-M_k / clamp(V)). backward() takes the image,
// desc, the gradient of desc and the bounds, and returns the image's gradient.
// Replicate padding is done on a padded copy (the image, a gradient) so that the inner loops are
// plain shifted rows.

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <vector>

#include <pybind11/stl.h>  // squared_distance returns a std::vector

#include "cpu_kernel.h"  // Array, check, CPU_DISPATCH, INLINE_INTO_CLONES

namespace {

constexpr int64_t PAIRS = 12;

inline int64_t clamp_index(int64_t i, int64_t n) { return std::min(std::max<int64_t>(i, 0), n - 1); }

// The patch sum along contiguous lines, in place: line[i] = sum over t in [-r, r] of
// line[clamp(i + t)], through `buffer` (n + 2r); with `adjoint` its transpose (each line[i]
// added to the positions line[clamp(i + t)] of the result).
template <typename T>
INLINE_INTO_CLONES void box_line(T* line, int64_t n, int64_t r, T* buffer, bool adjoint) {
    const int64_t padded = n + 2 * r;
    if (!adjoint) {
        for (int64_t j = 0; j < padded; ++j) buffer[j] = line[clamp_index(j - r, n)];
        std::copy(buffer, buffer + n, line);
        for (int64_t t = 1; t <= 2 * r; ++t) {
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) line[i] += buffer[i + t];
        }
        return;
    }
    std::fill(buffer, buffer + padded, T(0));
    for (int64_t t = 0; t <= 2 * r; ++t) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) buffer[i + t] += line[i];
    }
    std::copy(buffer + r, buffer + r + n, line);
    for (int64_t q = 0; q < r; ++q) line[0] += buffer[q];                 // clamped below 0
    for (int64_t q = n + r; q < padded; ++q) line[n - 1] += buffer[q];    // clamped above n - 1
}

// The same along rows of `width` elements `stride` apart (n rows), in place, through `buffer`
// ((n + 2r) * width), each result multiplied by `scale`.
template <typename T>
INLINE_INTO_CLONES void box_rows(T* data, int64_t n, int64_t width, int64_t stride, int64_t r, T scale, T* buffer,
                                 bool adjoint) {
    if (!adjoint) {
        for (int64_t i = 0; i < n; ++i) std::copy(data + i * stride, data + i * stride + width, buffer + i * width);
        for (int64_t i = 0; i < n; ++i) {
            T* out = data + i * stride;
            std::fill(out, out + width, T(0));
            for (int64_t t = -r; t <= r; ++t) {
                const T* in = buffer + clamp_index(i + t, n) * width;
#pragma omp simd
                for (int64_t x = 0; x < width; ++x) out[x] += in[x];
            }
#pragma omp simd
            for (int64_t x = 0; x < width; ++x) out[x] *= scale;
        }
        return;
    }
    const int64_t padded = n + 2 * r;
    std::fill(buffer, buffer + padded * width, T(0));
    for (int64_t i = 0; i < n; ++i) {
        const T* in = data + i * stride;
        for (int64_t t = 0; t <= 2 * r; ++t) {
            T* acc = buffer + (i + t) * width;
#pragma omp simd
            for (int64_t x = 0; x < width; ++x) acc[x] += in[x];
        }
    }
    for (int64_t j = 0; j < n; ++j) {
        T* out = data + j * stride;
        std::copy(buffer + (j + r) * width, buffer + (j + r + 1) * width, out);
        if (j == 0)  // the rows clamped below 0
            for (int64_t q = 0; q < r; ++q) {
#pragma omp simd
                for (int64_t x = 0; x < width; ++x) out[x] += buffer[q * width + x];
            }
        if (j == n - 1)  // the rows clamped above n - 1
            for (int64_t q = n + r; q < padded; ++q) {
#pragma omp simd
                for (int64_t x = 0; x < width; ++x) out[x] += buffer[q * width + x];
            }
#pragma omp simd
        for (int64_t x = 0; x < width; ++x) out[x] *= scale;
    }
}

// One (height, width) plane's patch sums along x, then y.
template <typename T>
INLINE_INTO_CLONES void box_plane_body(T* plane, int64_t height, int64_t width, int64_t r, T* buffer, bool adjoint) {
    for (int64_t y = 0; y < height; ++y) box_line(plane + y * width, width, r, buffer, adjoint);
    box_rows(plane, height, width, width, r, T(1), buffer, adjoint);
}

// Squared differences of the 12 pairs for one z plane: out_k[y, x] = (P[a_k] - P[b_k])^2, P the
// image padded by `pad` on each side ((H + 2 pad) * (W + 2 pad) planes), offsets (12, 2, 3).
// With `grad` (the patch sums' gradient, in out), out_k becomes 2 (P[a_k] - P[b_k]) out_k
// instead: the gradient of the pair's difference.
template <typename T>
INLINE_INTO_CLONES void squares_plane_body(const T* padded, const int64_t* offsets, int64_t pad, int64_t z,
                                           int64_t height, int64_t width, int64_t depth, T* out, bool grad) {
    const int64_t pw = width + 2 * pad, pplane = (height + 2 * pad) * pw, volume = depth * height * width;
    for (int64_t k = 0; k < PAIRS; ++k) {
        const int64_t* a = offsets + 6 * k;
        const int64_t* b = a + 3;
        for (int64_t y = 0; y < height; ++y) {
            const T* pa = padded + (z + pad + a[0]) * pplane + (y + pad + a[1]) * pw + pad + a[2];
            const T* pb = padded + (z + pad + b[0]) * pplane + (y + pad + b[1]) * pw + pad + b[2];
            T* row = out + k * volume + (z * height + y) * width;
            if (grad) {
#pragma omp simd
                for (int64_t x = 0; x < width; ++x) row[x] *= T(2) * (pa[x] - pb[x]);
            } else {
#pragma omp simd
                for (int64_t x = 0; x < width; ++x) {
                    const T d = pa[x] - pb[x];
                    row[x] = d * d;
                }
            }
        }
    }
}

// Where the descriptor's gradient comes from: `grad_desc` (N, 12, D, H, W), or for the loss
// sum_n scale_n sum_k,x weight_n(x) (desc_k - target_k)^2 / 2 the target descriptor, the voxels'
// weights (none: 1) and each sample's scale (the loss's gradient, the mean's divisor).
template <typename T>
struct GradSource {
    const T* grad_desc;
    const T* target;
    const T* weight;  // (N, D, H, W), or nullptr
    T scale;
};

// Per voxel of one z plane (`count` voxels, channel k at ssd + k * volume): M_k = SSD_k - min,
// V = mean_k M_k, in place of SSD and into variance. With `grad` (desc and the gradient's source
// given, at this plane), SSD_k becomes the gradient in SSD_k instead, V clamped into [lo, hi];
// `scratch` holds 12 planes of the descriptor's gradient and one more.
template <typename T>
INLINE_INTO_CLONES void normalize_plane_body(T* ssd, T* variance, int64_t count, int64_t volume, const T* desc,
                                             GradSource<T> source, T lo, T hi, T* minimum, int32_t* argmin,
                                             T* scratch, bool grad) {
    std::copy(ssd, ssd + count, minimum);
    std::fill(argmin, argmin + count, 0);
    for (int64_t k = 1; k < PAIRS; ++k) {
        const T* s = ssd + k * volume;
#pragma omp simd
        for (int64_t i = 0; i < count; ++i) {
            const bool lower = s[i] < minimum[i];  // the first of equal minima, as torch.min
            argmin[i] = lower ? int32_t(k) : argmin[i];
            minimum[i] = lower ? s[i] : minimum[i];
        }
    }
    std::fill(variance, variance + count, T(0));
    for (int64_t k = 0; k < PAIRS; ++k) {
        T* s = ssd + k * volume;
#pragma omp simd
        for (int64_t i = 0; i < count; ++i) {
            s[i] -= minimum[i];
            variance[i] += s[i];
        }
    }
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) variance[i] /= T(PAIRS);
    if (!grad) return;
    T* dv = scratch + PAIRS * count;
    std::fill(dv, dv + count, T(0));
    for (int64_t k = 0; k < PAIRS; ++k) {  // g_k, the descriptor's gradient
        T* g = scratch + k * count;
        const T* e = desc + k * volume;
        if (source.grad_desc) {
            std::copy(source.grad_desc + k * volume, source.grad_desc + k * volume + count, g);
        } else {
            const T* t = source.target + k * volume;
#pragma omp simd
            for (int64_t i = 0; i < count; ++i) g[i] = source.scale * (e[i] - t[i]);
            if (source.weight) {
#pragma omp simd
                for (int64_t i = 0; i < count; ++i) g[i] *= source.weight[i];
            }
        }
    }
    // desc_k = exp(-M_k / Vc), Vc = clamp(V, lo, hi): dM_k = -g_k desc_k / Vc, and through Vc (where
    // V is inside the bounds, as torch.clamp's gradient) dV = sum_k g_k desc_k M_k / Vc^2, shared
    // by the 12 M_k of the mean; then SSD_k's part of M_j = SSD_j - SSD_argmin.
    for (int64_t k = 0; k < PAIRS; ++k) {
        const T* m = ssd + k * volume;
        const T* e = desc + k * volume;
        const T* g = scratch + k * count;
#pragma omp simd
        for (int64_t i = 0; i < count; ++i) dv[i] += g[i] * e[i] * m[i];
    }
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) {
        const T v = variance[i];
        const T vc = std::min(std::max(v, lo), hi);
        dv[i] = (v >= lo && v <= hi) ? dv[i] / (vc * vc) / T(PAIRS) : T(0);
        variance[i] = vc;
    }
    std::fill(minimum, minimum + count, T(0));  // now the sum over k of dM_k
    for (int64_t k = 0; k < PAIRS; ++k) {
        T* s = ssd + k * volume;
        const T* e = desc + k * volume;
        const T* g = scratch + k * count;
#pragma omp simd
        for (int64_t i = 0; i < count; ++i) {
            s[i] = -g[i] * e[i] / variance[i] + dv[i];
            minimum[i] += s[i];
        }
    }
    for (int64_t k = 0; k < PAIRS; ++k) {
        T* s = ssd + k * volume;
#pragma omp simd
        for (int64_t i = 0; i < count; ++i) s[i] -= argmin[i] == k ? minimum[i] : T(0);
    }
}

// Adds sign * g (one channel's (D, H, W) gradient of a shifted read P[x + offset]) into padded
// plane pz of the padded gradient.
template <typename T>
INLINE_INTO_CLONES void shift_adjoint_plane_body(T* padded_grad, const T* g, const int64_t* offset, T sign, int64_t pad,
                                                 int64_t pz, int64_t depth, int64_t height, int64_t width) {
    const int64_t z = pz - pad - offset[0];
    if (z < 0 || z >= depth) return;
    const int64_t pw = width + 2 * pad, pplane = (height + 2 * pad) * pw;
    for (int64_t y = 0; y < height; ++y) {
        T* dst = padded_grad + pz * pplane + (y + pad + offset[1]) * pw + pad + offset[2];
        const T* src = g + (z * height + y) * width;
#pragma omp simd
        for (int64_t x = 0; x < width; ++x) dst[x] += sign * src[x];
    }
}

// Output plane z of the image's gradient: the padded gradient folded back, each padded voxel
// onto the voxel its replicate padding read.
template <typename T>
INLINE_INTO_CLONES void fold_plane_body(const T* padded_grad, T* out, int64_t pad, int64_t z, int64_t depth,
                                        int64_t height, int64_t width) {
    const int64_t pw = width + 2 * pad, pplane = (height + 2 * pad) * pw;
    const int64_t z_first = z == 0 ? 0 : z + pad, z_last = z == depth - 1 ? depth + 2 * pad - 1 : z + pad;
    for (int64_t y = 0; y < height; ++y) {
        T* row = out + (z * height + y) * width;
        std::fill(row, row + width, T(0));
        const int64_t y_first = y == 0 ? 0 : y + pad, y_last = y == height - 1 ? height + 2 * pad - 1 : y + pad;
        for (int64_t pz = z_first; pz <= z_last; ++pz) {
            for (int64_t py = y_first; py <= y_last; ++py) {
                const T* src = padded_grad + pz * pplane + py * pw;
#pragma omp simd
                for (int64_t x = 0; x < width; ++x) row[x] += src[x + pad];
                for (int64_t px = 0; px < pad; ++px) row[0] += src[px];
                for (int64_t px = width + pad; px < pw; ++px) row[width - 1] += src[px];
            }
        }
    }
}

#define MIND_CLONES(T)                                                                                                \
    CPU_DISPATCH void box_plane(T* plane, int64_t height, int64_t width, int64_t r, T* buffer, bool adjoint) {        \
        box_plane_body(plane, height, width, r, buffer, adjoint);                                                     \
    }                                                                                                                 \
    CPU_DISPATCH void box_slab(T* data, int64_t n, int64_t width, int64_t stride, int64_t r, T scale, T* buffer,      \
                               bool adjoint) {                                                                        \
        box_rows(data, n, width, stride, r, scale, buffer, adjoint);                                                  \
    }                                                                                                                 \
    CPU_DISPATCH void squares_plane(const T* padded, const int64_t* offsets, int64_t pad, int64_t z, int64_t height,  \
                                    int64_t width, int64_t depth, T* out, bool grad) {                                \
        squares_plane_body(padded, offsets, pad, z, height, width, depth, out, grad);                                 \
    }                                                                                                                 \
    CPU_DISPATCH void normalize_plane(T* ssd, T* variance, int64_t count, int64_t volume, const T* desc,              \
                                      GradSource<T> source, T lo, T hi, T* minimum, int32_t* argmin, T* scratch,      \
                                      bool grad) {                                                                    \
        normalize_plane_body(ssd, variance, count, volume, desc, source, lo, hi, minimum, argmin, scratch, grad);      \
    }                                                                                                                 \
    CPU_DISPATCH void shift_adjoint_plane(T* padded_grad, const T* g, const int64_t* offset, T sign, int64_t pad,     \
                                          int64_t pz, int64_t depth, int64_t height, int64_t width) {                 \
        shift_adjoint_plane_body(padded_grad, g, offset, sign, pad, pz, depth, height, width);                        \
    }                                                                                                                 \
    CPU_DISPATCH void fold_plane(const T* padded_grad, T* out, int64_t pad, int64_t z, int64_t depth, int64_t height, \
                                 int64_t width) {                                                                     \
        fold_plane_body(padded_grad, out, pad, z, depth, height, width);                                              \
    }

MIND_CLONES(float)
MIND_CLONES(double)

// The image (D, H, W) replicate-padded by `pad` on each side.
template <typename T>
void pad_replicate(const T* image, T* padded, int64_t pad, int64_t depth, int64_t height, int64_t width, int threads) {
    const int64_t pd = depth + 2 * pad, ph = height + 2 * pad, pw = width + 2 * pad;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t pz = 0; pz < pd; ++pz) {
        for (int64_t py = 0; py < ph; ++py) {
            const T* row = image + (clamp_index(pz - pad, depth) * height + clamp_index(py - pad, height)) * width;
            T* out = padded + (pz * ph + py) * pw;
            std::fill(out, out + pad, row[0]);
            std::copy(row, row + width, out + pad);
            std::fill(out + pad + width, out + pw, row[width - 1]);
        }
    }
}

// The patch mean (or with `adjoint` its transpose) of the 12 channels of `data` (12, D, H, W), in place.
template <typename T>
void patch_mean(T* data, int64_t r, int64_t depth, int64_t height, int64_t width, bool adjoint, int threads) {
    const int64_t plane = height * width, side = 2 * r + 1;
    const T scale = T(1) / T(side * side * side);
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> buffer(std::max(height + 2 * r, depth + 2 * r) * width + 2 * r);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < PAIRS * depth; ++p) box_plane(data + p * plane, height, width, r, buffer.data(), adjoint);
#pragma omp for schedule(static)
        for (int64_t s = 0; s < PAIRS * height; ++s)
            box_slab(data + (s / height) * depth * plane + (s % height) * width, depth, width, plane, r, scale,
                     buffer.data(), adjoint);
    }
}

// `out` (12, D, H, W) = the patch means SSD_k of one image's squared pair differences.
template <typename T>
void patch_means(const T* padded, const int64_t* offsets, int64_t pad, int64_t r, int64_t depth, int64_t height,
                 int64_t width, T* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t z = 0; z < depth; ++z) squares_plane(padded, offsets, pad, z, height, width, depth, out, false);
    patch_mean(out, r, depth, height, width, false, threads);
}

struct Geometry {
    int64_t count, depth, height, width, pad, radius;
};

template <typename T>
Geometry geometry(const Array<T>& image, const Array<int64_t>& offsets, int64_t radius) {
    check(image.ndim() == 4, "image must be (N, D, H, W)");
    check(offsets.ndim() == 3 && offsets.shape(0) == PAIRS && offsets.shape(1) == 2 && offsets.shape(2) == 3,
          "offsets must be (12, 2, 3)");
    check(radius >= 0, "radius must be >= 0");
    int64_t pad = 0;
    for (int64_t i = 0; i < offsets.size(); ++i) pad = std::max(pad, std::abs(offsets.data()[i]));
    return {image.shape(0), image.shape(1), image.shape(2), image.shape(3), pad, radius};
}

template <typename T>
void check_shape(const Array<T>& array, const Geometry& g, int64_t channels, const char* message) {
    check(array.ndim() == 5 && array.shape(0) == g.count && array.shape(1) == channels && array.shape(2) == g.depth &&
              array.shape(3) == g.height && array.shape(4) == g.width,
          message);
}

// out (N, 12, D, H, W) = M_k, variance (N, 1, D, H, W) = V of image (N, D, H, W).
template <typename T>
void forward(const Array<T>& image, const Array<int64_t>& offsets, int64_t radius, Array<T>& out, Array<T>& variance,
             int threads) {
    const Geometry g = geometry(image, offsets, radius);
    check_shape(out, g, PAIRS, "out must be (N, 12, D, H, W)");
    check_shape(variance, g, 1, "variance must be (N, 1, D, H, W)");
    const int64_t plane = g.height * g.width, volume = g.depth * plane;
    const int64_t padded_volume = (g.depth + 2 * g.pad) * (g.height + 2 * g.pad) * (g.width + 2 * g.pad);
    const T* src = image.data();
    T* dst = out.mutable_data();
    T* var = variance.mutable_data();
    const int64_t* pairs = offsets.data();

    py::gil_scoped_release release;
    std::vector<T> padded(padded_volume);
    for (int64_t n = 0; n < g.count; ++n) {
        T* ssd = dst + n * PAIRS * volume;
        pad_replicate(src + n * volume, padded.data(), g.pad, g.depth, g.height, g.width, threads);
        patch_means(padded.data(), pairs, g.pad, g.radius, g.depth, g.height, g.width, ssd, threads);
#pragma omp parallel num_threads(threads)
        {
            std::vector<T> minimum(plane);
            std::vector<int32_t> argmin(plane);
#pragma omp for schedule(static)
            for (int64_t z = 0; z < g.depth; ++z)
                normalize_plane(ssd + z * plane, var + n * volume + z * plane, plane, volume, nullptr,
                                GradSource<T>{nullptr, nullptr, nullptr, T(0)}, T(0), T(0), minimum.data(),
                                argmin.data(), nullptr, false);
        }
    }
}

// An optional (N, D, H, W) array argument (None: nullptr).
template <typename T>
const T* optional_volume(const py::object& array, const Geometry& g, Array<T>& holder, const char* message) {
    if (array.is_none()) return nullptr;
    holder = array.cast<Array<T>>();
    check(holder.ndim() == 4 && holder.shape(0) == g.count && holder.shape(1) == g.depth &&
              holder.shape(2) == g.height && holder.shape(3) == g.width,
          message);
    return holder.data();
}

// grad_image (N, D, H, W) of image (N, D, H, W) given desc (N, 12, D, H, W), the gradient's
// source (grad_desc, or target with weights and scales: GradSource) and the bounds [lo, hi] the
// forward clamped V into; `work` (12, D, H, W) is scratch (from the caller's allocator, which
// reuses memory: a fresh 12-channel buffer here cost a tenth of the call in page faults).
template <typename T>
void backward_from(const Geometry& g, const T* src, const int64_t* pairs, const T* desc, const T* grad_desc,
                   const T* target, const T* weight, const T* scales, T lo, T hi, T* out, T* work, int threads) {
    const int64_t plane = g.height * g.width, volume = g.depth * plane;
    const int64_t padded_depth = g.depth + 2 * g.pad;
    const int64_t padded_plane = (g.height + 2 * g.pad) * (g.width + 2 * g.pad);
    std::vector<T> padded(padded_depth * padded_plane), padded_grad(padded_depth * padded_plane), variance(volume);
    for (int64_t n = 0; n < g.count; ++n) {
        const T* e = desc + n * PAIRS * volume;
        pad_replicate(src + n * volume, padded.data(), g.pad, g.depth, g.height, g.width, threads);
        patch_means(padded.data(), pairs, g.pad, g.radius, g.depth, g.height, g.width, work, threads);
#pragma omp parallel num_threads(threads)
        {
            std::vector<T> minimum(plane), scratch((PAIRS + 1) * plane);
            std::vector<int32_t> argmin(plane);
#pragma omp for schedule(static)
            for (int64_t z = 0; z < g.depth; ++z) {
                const int64_t at = z * plane;
                const GradSource<T> source{grad_desc ? grad_desc + n * PAIRS * volume + at : nullptr,
                                           target ? target + n * PAIRS * volume + at : nullptr,
                                           weight ? weight + n * volume + at : nullptr, scales ? scales[n] : T(0)};
                normalize_plane(work + at, variance.data() + at, plane, volume, e + at, source, lo, hi,
                                minimum.data(), argmin.data(), scratch.data(), true);
            }
        }
        patch_mean(work, g.radius, g.depth, g.height, g.width, true, threads);  // the patch means' adjoint
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t z = 0; z < g.depth; ++z)
            squares_plane(padded.data(), pairs, g.pad, z, g.height, g.width, g.depth, work, true);
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t pz = 0; pz < padded_depth; ++pz) {
            std::fill(padded_grad.data() + pz * padded_plane, padded_grad.data() + (pz + 1) * padded_plane, T(0));
            for (int64_t k = 0; k < PAIRS; ++k) {
                shift_adjoint_plane(padded_grad.data(), work + k * volume, pairs + 6 * k, T(1), g.pad, pz,
                                    g.depth, g.height, g.width);
                shift_adjoint_plane(padded_grad.data(), work + k * volume, pairs + 6 * k + 3, T(-1), g.pad, pz,
                                    g.depth, g.height, g.width);
            }
        }
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t z = 0; z < g.depth; ++z)
            fold_plane(padded_grad.data(), out + n * volume, g.pad, z, g.depth, g.height, g.width);
    }
}

template <typename T>
void check_backward_arrays(const Geometry& g, const Array<T>& desc, const Array<T>& grad_image, const Array<T>& work) {
    check_shape(desc, g, PAIRS, "desc must be (N, 12, D, H, W)");
    check(grad_image.ndim() == 4 && grad_image.shape(0) == g.count && grad_image.shape(1) == g.depth &&
              grad_image.shape(2) == g.height && grad_image.shape(3) == g.width,
          "grad_image must have image's shape");
    check(work.ndim() == 4 && work.shape(0) == PAIRS && work.shape(1) == g.depth && work.shape(2) == g.height &&
              work.shape(3) == g.width,
          "work must be (12, D, H, W)");
}

// The descriptor's backward for any gradient of it, grad_desc (N, 12, D, H, W).
template <typename T>
void backward(const Array<T>& image, const Array<int64_t>& offsets, int64_t radius, const Array<T>& desc,
              const Array<T>& grad_desc, T lo, T hi, Array<T>& grad_image, Array<T>& work, int threads) {
    const Geometry g = geometry(image, offsets, radius);
    check_backward_arrays(g, desc, grad_image, work);
    check_shape(grad_desc, g, PAIRS, "grad_desc must be (N, 12, D, H, W)");
    py::gil_scoped_release release;
    backward_from<T>(g, image.data(), offsets.data(), desc.data(), grad_desc.data(), nullptr, nullptr, nullptr, lo,
                     hi, grad_image.mutable_data(), work.mutable_data(), threads);
}

// The backward of the loss sum_n scales_n / 2 sum_k,x weights_n(x) (desc_k - target_k)^2: the
// descriptor's gradient computed where it is used, never stored.
template <typename T>
void distance_backward(const Array<T>& image, const Array<int64_t>& offsets, int64_t radius, const Array<T>& desc,
                       const Array<T>& target, const py::object& weights, const Array<T>& scales, T lo, T hi,
                       Array<T>& grad_image, Array<T>& work, int threads) {
    const Geometry g = geometry(image, offsets, radius);
    check_backward_arrays(g, desc, grad_image, work);
    check_shape(target, g, PAIRS, "target must be (N, 12, D, H, W)");
    check(scales.ndim() == 1 && scales.shape(0) == g.count, "scales must be (N,)");
    Array<T> weights_holder;
    const T* weight = optional_volume(weights, g, weights_holder, "weights must be (N, D, H, W) or None");
    py::gil_scoped_release release;
    backward_from<T>(g, image.data(), offsets.data(), desc.data(), nullptr, target.data(), weight, scales.data(), lo,
                     hi, grad_image.mutable_data(), work.mutable_data(), threads);
}

// Per sample n: sum over k and x of weights_n(x) (desc_k - target_k)^2 (weights None: 1), in double.
template <typename T>
std::vector<double> squared_distance(const Array<T>& desc, const Array<T>& target, const py::object& weights,
                                     int threads) {
    check(desc.ndim() == 5 && desc.shape(1) == PAIRS, "desc must be (N, 12, D, H, W)");
    const Geometry g{desc.shape(0), desc.shape(2), desc.shape(3), desc.shape(4), 0, 0};
    check_shape(target, g, PAIRS, "target must be (N, 12, D, H, W)");
    Array<T> weights_holder;
    const T* weight = optional_volume(weights, g, weights_holder, "weights must be (N, D, H, W) or None");
    const int64_t plane = g.height * g.width, volume = g.depth * plane;
    std::vector<double> sums(g.count, 0.0);
    const T* e = desc.data();
    const T* t = target.data();

    py::gil_scoped_release release;
    for (int64_t n = 0; n < g.count; ++n) {
        double total = 0.0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : total)
        for (int64_t z = 0; z < g.depth; ++z) {
            std::vector<T> row(plane, T(0));
            for (int64_t k = 0; k < PAIRS; ++k) {
                const T* a = e + (n * PAIRS + k) * volume + z * plane;
                const T* b = t + (n * PAIRS + k) * volume + z * plane;
#pragma omp simd
                for (int64_t i = 0; i < plane; ++i) row[i] += (a[i] - b[i]) * (a[i] - b[i]);
            }
            const T* w = weight ? weight + n * volume + z * plane : nullptr;
            double sum = 0.0;
            for (int64_t i = 0; i < plane; ++i) sum += w ? double(w[i]) * row[i] : double(row[i]);
            total += sum;
        }
        sums[n] = total;
    }
    return sums;
}

template <typename T>
void define(py::module_& module) {
    // noconvert: a silent dtype/contiguity copy of an output array would drop the result.
    module.def("forward", &forward<T>, py::arg("image").noconvert(), py::arg("offsets").noconvert(),
               py::arg("radius"), py::arg("out").noconvert(), py::arg("variance").noconvert(), py::arg("threads"),
               "out (N, 12, D, H, W) = SSD_k - min_j SSD_j, variance (N, 1, D, H, W) = their mean, of image (N, D, H, W).");
    module.def("backward", &backward<T>, py::arg("image").noconvert(), py::arg("offsets").noconvert(),
               py::arg("radius"), py::arg("desc").noconvert(), py::arg("grad_desc").noconvert(), py::arg("lo"),
               py::arg("hi"), py::arg("grad_image").noconvert(), py::arg("work").noconvert(), py::arg("threads"),
               "grad_image (N, D, H, W) of the descriptor exp(-M / clamp(V, lo, hi)) given desc and grad_desc.");
    module.def("distance_backward", &distance_backward<T>, py::arg("image").noconvert(),
               py::arg("offsets").noconvert(), py::arg("radius"), py::arg("desc").noconvert(),
               py::arg("target").noconvert(), py::arg("weights"), py::arg("scales").noconvert(), py::arg("lo"),
               py::arg("hi"), py::arg("grad_image").noconvert(), py::arg("work").noconvert(), py::arg("threads"),
               "grad_image (N, D, H, W) of sum_n scales_n / 2 sum weights (desc - target)^2.");
    module.def("squared_distance", &squared_distance<T>, py::arg("desc").noconvert(), py::arg("target").noconvert(),
               py::arg("weights"), py::arg("threads"),
               "Per sample, sum of weights * (desc - target)^2 over channels and voxels (weights None: 1).");
}

}  // namespace

PYBIND11_MODULE(_mind_ssc_cpu, module) {
    module.doc() = "MIND-SSC descriptor, forward and backward, on the CPU with OpenMP (mgr_engine.kernels.mind_ssc_cpu)";
    define<float>(module);
    define<double>(module);
}
