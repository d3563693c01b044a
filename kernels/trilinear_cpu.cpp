// Trilinear warp on the CPU, forward and backward, and the U-Net decoder's trilinear 2x
// upsampling fused with its epilogue; built by setup.py as mgr_engine._trilinear_cpu.
//
// Same semantics as torch.nn.functional.grid_sample(mode="bilinear", align_corners=True) on
// a map in [0, 1] (mgr_engine.ops.warp): out[b, c, p] = image[b, c] at coords[b, :, p] * (n - 1).
// Why: torch's 3-D grid sampler parallelizes only over the batch on the CPU, so a single
// registration (batch 1) runs it, and its backward, on one core. Here the output voxels are
// split over OpenMP threads and the eight corner weights are computed once for all channels.
// Templated on float (the engine) and double (gradcheck in the tests).

#ifdef _OPENMP
#include <omp.h>
#else  // built without OpenMP (Apple clang): one thread
inline int omp_get_thread_num() { return 0; }
inline int omp_get_num_threads() { return 1; }
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_kernel.h"  // Array, check

namespace {

// The geometry shared by all calls: image (B, C, D, H, W), coords (B or 1, 3, D', H', W').
// Arrays over the sample points (coords, out, grad_out, grad_coords) come in one of two
// layouts, given by `channels_last`: planar (N, K, D', H', W'), or channels-last passed as
// (N, D', H', W', K), the layout of the engine's maps (a channels-last network's identity
// grid), which no longer needs a planar copy per call. Element (n, k, p) of an array with K
// channels is at n * K * points + k * channel_stride() + p * point_stride(K).
struct Geometry {
    int64_t batch, channels, depth, height, width, coord_batch, points, plane, volume;
    bool channels_last;

    template <typename T>
    Geometry(const Array<T>& image, const Array<T>& coords, bool channels_last) : channels_last(channels_last) {
        check(image.ndim() == 5 && coords.ndim() == 5, "image and coords must be 5-D");
        batch = image.shape(0), channels = image.shape(1);
        depth = image.shape(2), height = image.shape(3), width = image.shape(4);
        coord_batch = coords.shape(0);
        check(coords.shape(channels_last ? 4 : 1) == 3, "coords must have 3 channels");
        check(coord_batch == batch || coord_batch == 1, "coords batch must be 1 or the image's");
        check(depth > 1 && height > 1 && width > 1, "image must have at least 2 voxels along each axis");
        const int first = channels_last ? 1 : 2;
        points = coords.shape(first) * coords.shape(first + 1) * coords.shape(first + 2);
        plane = height * width, volume = depth * plane;
    }

    int64_t channel_stride() const { return channels_last ? 1 : points; }
    int64_t point_stride(int64_t k) const { return channels_last ? k : 1; }

    template <typename T>
    void check_output(const Array<T>& out, const Array<T>& coords) const {
        const int c = channels_last ? 4 : 1, first = channels_last ? 1 : 2;
        check(out.ndim() == 5 && out.shape(0) == batch && out.shape(c) == channels,
              "out and grad_out must be (B, C, *coords' grid) in coords' layout");
        for (int axis = first; axis < first + 3; ++axis)
            check(out.shape(axis) == coords.shape(axis), "out and grad_out must be (B, C, *coords' grid) in coords' layout");
    }
};

// The corners of one sample point that lie inside the grid: their flat offsets, trilinear
// weights and the weights' derivatives along z, y, x (in voxels).
template <typename T>
struct Corners {
    int64_t offset[8];
    int64_t z_first, z_last;  // the z indices of the first and last corner
    T weight[8], d_z[8], d_y[8], d_x[8];
    int count = 0;
};

// Voxel coordinate of a map coordinate; with border padding clamped into [0, n - 1], and its
// derivative then 0 on and beyond the edges, as torch's clip_coordinates_set_grad.
template <typename T>
inline T to_voxel(T coordinate, T scale, bool border, T* derivative) {
    T v = coordinate * scale;
    *derivative = scale;
    if (border) {
        if (!(v > T(0))) *derivative = T(0), v = std::isnan(v) ? v : T(0);
        else if (v >= scale) *derivative = T(0), v = scale;
    }
    return v;
}

// Fills the corners of point (z, y, x) in voxels (their weights' derivatives too when
// Derivatives); false when none is inside (or a coordinate is NaN): the sample is 0 and so is
// its gradient. Most points of a registration lie inside the grid with all 8 corners: they
// take a branch-free path; the others test each corner.
template <bool Derivatives, typename T>
inline bool corners_of(T z, T y, T x, const Geometry& g, Corners<T>& c) {
    if (z >= T(0) && z < T(g.depth - 1) && y >= T(0) && y < T(g.height - 1) && x >= T(0) && x < T(g.width - 1)) {
        const int64_t z0 = int64_t(z), y0 = int64_t(y), x0 = int64_t(x);  // truncation = floor here
        const T fz = z - T(z0), fy = y - T(y0), fx = x - T(x0);
        const T w[2][3] = {{T(1) - fz, T(1) - fy, T(1) - fx}, {fz, fy, fx}};
        const int64_t base = z0 * g.plane + y0 * g.width + x0;
        for (int k = 0; k < 8; ++k) {
            const int hz = k >> 2, hy = (k >> 1) & 1, hx = k & 1;
            c.offset[k] = base + hz * g.plane + hy * g.width + hx;
            c.weight[k] = w[hz][0] * w[hy][1] * w[hx][2];
            if (Derivatives) {
                const T sz = hz ? T(1) : T(-1), sy = hy ? T(1) : T(-1), sx = hx ? T(1) : T(-1);
                c.d_z[k] = sz * w[hy][1] * w[hx][2];
                c.d_y[k] = w[hz][0] * sy * w[hx][2];
                c.d_x[k] = w[hz][0] * w[hy][1] * sx;
            }
        }
        c.count = 8;
        c.z_first = z0, c.z_last = z0 + 1;
        return true;
    }
    if (!(z >= T(-1) && z < T(g.depth) && y >= T(-1) && y < T(g.height) && x >= T(-1) && x < T(g.width)))
        return false;
    const int64_t z0 = int64_t(std::floor(z)), y0 = int64_t(std::floor(y)), x0 = int64_t(std::floor(x));
    const T fz = z - T(z0), fy = y - T(y0), fx = x - T(x0);
    c.count = 0;
    for (int k = 0; k < 8; ++k) {
        const int hz = k >> 2, hy = (k >> 1) & 1, hx = k & 1;
        const int64_t zi = z0 + hz, yi = y0 + hy, xi = x0 + hx;
        if (zi < 0 || zi >= g.depth || yi < 0 || yi >= g.height || xi < 0 || xi >= g.width) continue;
        const T wz = hz ? fz : T(1) - fz, wy = hy ? fy : T(1) - fy, wx = hx ? fx : T(1) - fx;
        c.offset[c.count] = zi * g.plane + yi * g.width + xi;
        c.weight[c.count] = wz * wy * wx;
        if (Derivatives) {
            const T sz = hz ? T(1) : T(-1), sy = hy ? T(1) : T(-1), sx = hx ? T(1) : T(-1);
            c.d_z[c.count] = sz * wy * wx;
            c.d_y[c.count] = wz * sy * wx;
            c.d_x[c.count] = wz * wy * sx;
        }
        ++c.count;
    }
    if (c.count == 0) return false;
    c.z_first = c.offset[0] / g.plane, c.z_last = c.offset[c.count - 1] / g.plane;
    return true;
}

// out (B, C, *coords' grid) = image sampled at coords. border: padding_mode="border",
// otherwise "zeros". A NaN coordinate gives 0.
template <typename T>
void warp_forward(const Array<T>& image, const Array<T>& coords, Array<T>& out, bool border, bool channels_last,
                  int threads) {
    const Geometry g(image, coords, channels_last);
    g.check_output(out, coords);
    const T* src = image.data();
    const T* map = coords.data();
    T* dst = out.mutable_data();
    const T scale[3] = {T(g.depth - 1), T(g.height - 1), T(g.width - 1)};
    const int64_t map_channel = g.channel_stride(), map_point = g.point_stride(3);
    const int64_t out_channel = g.channel_stride(), out_point = g.point_stride(g.channels);

    py::gil_scoped_release release;
    for (int64_t b = 0; b < g.batch; ++b) {
        const T* map_b = map + (g.coord_batch == 1 ? 0 : b * 3 * g.points);
        const T* src_b = src + b * g.channels * g.volume;
        T* dst_b = dst + b * g.channels * g.points;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t p = 0; p < g.points; ++p) {
            T unused;
            const T* at = map_b + p * map_point;
            const T z = to_voxel(at[0], scale[0], border, &unused);
            const T y = to_voxel(at[map_channel], scale[1], border, &unused);
            const T x = to_voxel(at[2 * map_channel], scale[2], border, &unused);
            Corners<T> c;
            const bool inside = corners_of<false>(z, y, x, g, c);
            for (int64_t ch = 0; ch < g.channels; ++ch) {
                const T* channel = src_b + ch * g.volume;
                T value = T(0);
                if (inside)
                    for (int k = 0; k < c.count; ++k) value += c.weight[k] * channel[c.offset[k]];
                dst_b[ch * out_channel + p * out_point] = value;
            }
        }
    }
}

// Gradients of sum(grad_out * warp(image, coords)). grad_image (same shape as image) is
// written when need_image, grad_coords (same shape as coords; summed over the batch where
// coords has batch 1) when need_coords; the other may be an empty array.
// grad_image is a scatter, made race-free without a private copy of the image per thread
// (those cost one image of memory per extra thread, 7 x 61 MiB for a 175^3 field on 8 threads,
// and more time than the scatter itself where a full-resolution field is sampled at the
// regularizer's half-resolution points): thread t takes the t-th share of
// the sample points and owns the t-th share of the image's z slices. A registration map stays
// near the identity, so a thread's points mostly land in its own slices: it adds those corners
// at once and lists the points with a corner elsewhere; after a barrier each thread adds, from
// the other threads' lists, the corners that land in its slices. Every voxel is summed in an
// order fixed by the team size, so the result does not depend on scheduling; a map far from
// the identity only makes the lists longer.
template <typename T>
void warp_backward(const Array<T>& image, const Array<T>& coords, const Array<T>& grad_out, Array<T>& grad_image,
                   Array<T>& grad_coords, bool need_image, bool need_coords, bool border, bool channels_last,
                   int threads) {
    const Geometry g(image, coords, channels_last);
    g.check_output(grad_out, coords);
    if (need_image) check(grad_image.ndim() == 5 && grad_image.size() == image.size(), "grad_image must match image");
    if (need_coords) check(grad_coords.ndim() == 5 && grad_coords.size() == coords.size(), "grad_coords must match coords");
    threads = std::max(threads, 1);
    const T* src = image.data();
    const T* map = coords.data();
    const T* gout = grad_out.data();
    T* gimage = need_image ? grad_image.mutable_data() : nullptr;
    T* gmap = need_coords ? grad_coords.mutable_data() : nullptr;
    const T scale[3] = {T(g.depth - 1), T(g.height - 1), T(g.width - 1)};
    const int64_t item = g.channels * g.volume;
    const int64_t map_channel = g.channel_stride(), map_point = g.point_stride(3);
    const int64_t out_channel = g.channel_stride(), out_point = g.point_stride(g.channels);

    py::gil_scoped_release release;
    std::vector<std::vector<int64_t>> elsewhere(threads);  // per thread: its points with a corner in others' slices
    if (need_coords) std::fill(gmap, gmap + grad_coords.size(), T(0));
    for (int64_t b = 0; b < g.batch; ++b) {
        const T* map_b = map + (g.coord_batch == 1 ? 0 : b * 3 * g.points);
        T* gmap_b = need_coords ? gmap + (g.coord_batch == 1 ? 0 : b * 3 * g.points) : nullptr;
        const T* src_b = src + b * item;
        T* gimage_b = need_image ? gimage + b * item : nullptr;
        const T* gout_b = gout + b * g.channels * g.points;
        // Voxel coordinates of point p, with the derivatives of the border clamp.
        auto locate = [&](int64_t p, T* z, T* y, T* x, T* dz, T* dy, T* dx) {
            const T* at = map_b + p * map_point;
            *z = to_voxel(at[0], scale[0], border, dz);
            *y = to_voxel(at[map_channel], scale[1], border, dy);
            *x = to_voxel(at[2 * map_channel], scale[2], border, dx);
        };
#pragma omp parallel num_threads(threads)
        {
            // The team may be smaller than asked (no OpenMP, nested parallelism): the shares
            // are the actual team's.
            const int tid = omp_get_thread_num(), team = omp_get_num_threads();
            const int64_t first = g.points * tid / team, last = g.points * (tid + 1) / team;
            const int64_t lo = g.depth * tid / team, hi = g.depth * (tid + 1) / team;
            const auto owns = [&](int64_t offset) { return offset >= lo * g.plane && offset < hi * g.plane; };
            std::vector<int64_t>& mine = elsewhere[tid];
            mine.clear();
            if (need_image)
                for (int64_t ch = 0; ch < g.channels; ++ch)
                    std::fill(gimage_b + ch * g.volume + lo * g.plane, gimage_b + ch * g.volume + hi * g.plane, T(0));
            for (int64_t p = first; p < last; ++p) {
                T z, y, x, dz, dy, dx;
                locate(p, &z, &y, &x, &dz, &dy, &dx);
                Corners<T> c;
                if (!corners_of<true>(z, y, x, g, c)) continue;
                const bool all_mine = c.z_first >= lo && c.z_last < hi;
                if (need_image && !all_mine) mine.push_back(p);
                T sum_z = T(0), sum_y = T(0), sum_x = T(0);
                for (int64_t ch = 0; ch < g.channels; ++ch) {
                    const T grad = gout_b[ch * out_channel + p * out_point];
                    if (need_coords) {
                        const T* channel = src_b + ch * g.volume;
                        for (int k = 0; k < c.count; ++k) {
                            const T v = channel[c.offset[k]] * grad;
                            sum_z += c.d_z[k] * v, sum_y += c.d_y[k] * v, sum_x += c.d_x[k] * v;
                        }
                    }
                    if (need_image) {
                        T* target = gimage_b + ch * g.volume;
                        if (all_mine)
                            for (int k = 0; k < c.count; ++k) target[c.offset[k]] += c.weight[k] * grad;
                        else
                            for (int k = 0; k < c.count; ++k)
                                if (owns(c.offset[k])) target[c.offset[k]] += c.weight[k] * grad;
                    }
                }
                if (need_coords) {
                    T* gat = gmap_b + p * map_point;
                    gat[0] += sum_z * dz;
                    gat[map_channel] += sum_y * dy;
                    gat[2 * map_channel] += sum_x * dx;
                }
            }
            if (need_image && team > 1) {
#pragma omp barrier
                for (int other = 0; other < team; ++other) {
                    if (other == tid) continue;
                    for (const int64_t p : elsewhere[other]) {
                        T z, y, x, unused;
                        locate(p, &z, &y, &x, &unused, &unused, &unused);
                        Corners<T> c;
                        corners_of<false>(z, y, x, g, c);
                        for (int64_t ch = 0; ch < g.channels; ++ch) {
                            const T grad = gout_b[ch * out_channel + p * out_point];
                            T* target = gimage_b + ch * g.volume;
                            for (int k = 0; k < c.count; ++k)
                                if (owns(c.offset[k])) target[c.offset[k]] += c.weight[k] * grad;
                        }
                    }
                }
            }
        }  // implicit barrier: the lists are read before the next batch item clears them
    }
}

// The two source samples and weights of output index o of a 2x linear upsampling of n samples
// with align_corners=False (torch's F.interpolate(scale_factor=2)): source coordinate
// (o + 0.5) / 2 - 0.5, clamped at 0 below; the upper neighbour clamped to n - 1.
template <typename T>
struct Taps {
    int64_t lo, hi;
    T w_lo, w_hi;
    Taps(int64_t o, int64_t n) {
        const T source = std::max(T(0), (T(o) + T(0.5)) * T(0.5) - T(0.5));
        lo = int64_t(source);
        hi = lo + (lo < n - 1 ? 1 : 0);
        w_hi = source - T(lo);
        w_lo = T(1) - w_hi;
    }
    // The weight with which this output reads source sample s (both taps where hi is clamped onto lo).
    T weight_of(int64_t s) const { return (lo == s ? w_lo : T(0)) + (hi == s ? w_hi : T(0)); }
    // The outputs that read source sample s of n: 2s - 1 to 2s + 2, within [0, 2n).
    static int64_t first_reader(int64_t s) { return std::max<int64_t>(0, 2 * s - 1); }
    static int64_t last_reader(int64_t s, int64_t n) { return std::min(2 * n - 1, 2 * s + 2); }
};

// A U-Net decoder level's inference epilogue in one pass over channels-last arrays:
//   out[b, z, y, x, :C]  = y_conv[b, z, y, x, :] + scale * upsample2x(x_in)[b, z, y, x, :C]
//   out[b, z, y, x, C:]  = skip[b, z, y, x, :]
// over skip's grid (the upsampled sum cropped to it), i.e. torch.cat([(y + scale * F.interpolate(
// x_in[:, :C], scale_factor=2, mode="trilinear")) cropped, skip], 1). Arrays: x_in (B, d, h, w, Cx)
// with Cx >= C, y_conv (B, 2d, 2h, 2w, C), scale (C), skip (B, D, H, W, Cs), out (B, D, H, W, C + Cs),
// D <= 2d etc. Why: torch's CPU upsampling, the multiply-add and the concatenation were three
// passes over the largest tensors of the forward (about a quarter of it at 175^3).
template <typename T>
void upsample_add_concat(const Array<T>& x_in, const Array<T>& y_conv, const Array<T>& scale, const Array<T>& skip,
                         Array<T>& out, int threads) {
    check(x_in.ndim() == 5 && y_conv.ndim() == 5 && skip.ndim() == 5 && out.ndim() == 5 && scale.ndim() == 1,
          "x_in, y_conv, skip and out must be 5-D (channels last), scale 1-D");
    const int64_t batch = y_conv.shape(0), channels = y_conv.shape(4), in_channels = x_in.shape(4);
    const int64_t skip_channels = skip.shape(4), out_channels = channels + skip_channels;
    const int64_t n[3] = {x_in.shape(1), x_in.shape(2), x_in.shape(3)};
    const int64_t grid[3] = {skip.shape(1), skip.shape(2), skip.shape(3)};
    check(x_in.shape(0) == batch && skip.shape(0) == batch && out.shape(0) == batch, "batch sizes differ");
    check(in_channels >= channels && scale.shape(0) == channels && out.shape(4) == out_channels,
          "channels: x_in needs at least y_conv's, scale y_conv's, out y_conv's plus skip's");
    for (int a = 0; a < 3; ++a) {
        check(y_conv.shape(a + 1) == 2 * n[a], "y_conv's grid must be twice x_in's");
        check(grid[a] <= 2 * n[a] && out.shape(a + 1) == grid[a], "skip's grid must fit y_conv's, out must be skip's");
    }
    const T* src = x_in.data();
    const T* conv = y_conv.data();
    const T* factor = scale.data();
    const T* extra = skip.data();
    T* dst = out.mutable_data();
    const int64_t rows = batch * grid[0] * grid[1];

    py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < rows; ++row) {
        const int64_t b = row / (grid[0] * grid[1]), z = (row / grid[1]) % grid[0], y = row % grid[1];
        const Taps<T> tz(z, n[0]), ty(y, n[1]);
        const T* source[4];  // the four source rows (z, y corners) of this output row, weighted
        T weight[4];
        for (int k = 0; k < 4; ++k) {
            const int64_t zi = k >> 1 ? tz.hi : tz.lo, yi = k & 1 ? ty.hi : ty.lo;
            source[k] = src + ((b * n[0] + zi) * n[1] + yi) * n[2] * in_channels;
            weight[k] = (k >> 1 ? tz.w_hi : tz.w_lo) * (k & 1 ? ty.w_hi : ty.w_lo);
        }
        const T* conv_row = conv + ((b * 2 * n[0] + z) * 2 * n[1] + y) * 2 * n[2] * channels;
        const T* skip_row = extra + ((b * grid[0] + z) * grid[1] + y) * grid[2] * skip_channels;
        T* out_row = dst + row * grid[2] * out_channels;
        for (int64_t x = 0; x < grid[2]; ++x) {
            const Taps<T> tx(x, n[2]);
            const T* lo[4];
            const T* hi[4];
            for (int k = 0; k < 4; ++k) lo[k] = source[k] + tx.lo * in_channels, hi[k] = source[k] + tx.hi * in_channels;
            const T* conv_voxel = conv_row + x * channels;
            T* out_voxel = out_row + x * out_channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) {
                T up = T(0);
                for (int k = 0; k < 4; ++k) up += weight[k] * (tx.w_lo * lo[k][c] + tx.w_hi * hi[k][c]);
                out_voxel[c] = conv_voxel[c] + factor[c] * up;
            }
            std::copy(skip_row + x * skip_channels, skip_row + (x + 1) * skip_channels, out_voxel + channels);
        }
    }
}

// The adjoint of upsample2x on channels-last arrays: grad_x[b, i, j, k, c] = sum over the fine
// voxels o of weight(o -> i, j, k) * grad[b, o, c] for c < C (grad's channels), 0 for the
// channels of grad_x beyond (Cx >= C: the upsampling reads x's first C only). Arrays: grad
// (B, 2d, 2h, 2w, C), grad_x (B, d, h, w, Cx). Per coarse row (b, i, j): its up to 4 x 4 fine
// rows summed with their z, y weights into one fine row, then its x taps. Why: torch's
// upsampling backward took 100 ms at 16 x 176^3 (2 cores), several times a pass over grad.
template <typename T>
void upsample2x_backward(const Array<T>& grad, Array<T>& grad_x, int threads) {
    check(grad.ndim() == 5 && grad_x.ndim() == 5, "grad and grad_x must be 5-D (channels last)");
    const int64_t batch = grad.shape(0), channels = grad.shape(4), x_channels = grad_x.shape(4);
    const int64_t n[3] = {grad_x.shape(1), grad_x.shape(2), grad_x.shape(3)};
    check(grad_x.shape(0) == batch && x_channels >= channels, "grad_x needs grad's batch and at least its channels");
    for (int a = 0; a < 3; ++a) check(grad.shape(a + 1) == 2 * n[a], "grad's grid must be twice grad_x's");
    const T* src = grad.data();
    T* dst = grad_x.mutable_data();
    const int64_t fine_row = 2 * n[2] * channels, rows = batch * n[0] * n[1];

    py::gil_scoped_release release;
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> summed(fine_row);
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; ++row) {
            const int64_t b = row / (n[0] * n[1]), i = (row / n[1]) % n[0], j = row % n[1];
            std::fill(summed.begin(), summed.end(), T(0));
            for (int64_t oz = Taps<T>::first_reader(i); oz <= Taps<T>::last_reader(i, n[0]); ++oz) {
                const T wz = Taps<T>(oz, n[0]).weight_of(i);
                for (int64_t oy = Taps<T>::first_reader(j); oy <= Taps<T>::last_reader(j, n[1]); ++oy) {
                    const T w = wz * Taps<T>(oy, n[1]).weight_of(j);
                    if (w == T(0)) continue;
                    const T* in = src + ((b * 2 * n[0] + oz) * 2 * n[1] + oy) * fine_row;
                    T* acc = summed.data();
#pragma omp simd
                    for (int64_t e = 0; e < fine_row; ++e) acc[e] += w * in[e];
                }
            }
            T* out_row = dst + row * n[2] * x_channels;
            for (int64_t k = 0; k < n[2]; ++k) {
                T* out = out_row + k * x_channels;
                std::fill(out, out + x_channels, T(0));
                for (int64_t ox = Taps<T>::first_reader(k); ox <= Taps<T>::last_reader(k, n[2]); ++ox) {
                    const T w = Taps<T>(ox, n[2]).weight_of(k);
                    const T* in = summed.data() + ox * channels;
#pragma omp simd
                    for (int64_t c = 0; c < channels; ++c) out[c] += w * in[c];
                }
            }
        }
    }
}

template <typename T>
void define(py::module_& module) {
    // noconvert: a silent dtype/contiguity copy of an output array would drop the result.
    module.def("warp_trilinear", &warp_forward<T>, py::arg("image").noconvert(), py::arg("coords").noconvert(),
               py::arg("out").noconvert(), py::arg("border"), py::arg("channels_last"), py::arg("threads"),
               "Sample image (B, C, D, H, W) trilinearly at coords (B or 1, 3, ...) in [0, 1] into out; with "
               "channels_last, coords and out are passed as (N, ..., 3) and (B, ..., C).");
    module.def("warp_trilinear_backward", &warp_backward<T>, py::arg("image").noconvert(),
               py::arg("coords").noconvert(), py::arg("grad_out").noconvert(), py::arg("grad_image").noconvert(),
               py::arg("grad_coords").noconvert(), py::arg("need_image"), py::arg("need_coords"),
               py::arg("border"), py::arg("channels_last"), py::arg("threads"),
               "Gradients of the warp with respect to image and coords, written into grad_image and grad_coords.");
    module.def("upsample_add_concat", &upsample_add_concat<T>, py::arg("x_in").noconvert(),
               py::arg("y_conv").noconvert(), py::arg("scale").noconvert(), py::arg("skip").noconvert(),
               py::arg("out").noconvert(), py::arg("threads"),
               "A U-Net decoder level's inference epilogue, channels last: cat((y_conv + scale * "
               "upsample2x(x_in[..., :C])) cropped to skip's grid, skip).");
    module.def("upsample2x_backward", &upsample2x_backward<T>, py::arg("grad").noconvert(),
               py::arg("grad_x").noconvert(), py::arg("threads"),
               "The adjoint of trilinear 2x upsampling (align_corners=False), channels last: grad (B, 2d, 2h, 2w, C) "
               "into grad_x (B, d, h, w, Cx >= C), its channels beyond C set to 0.");
}

}  // namespace

PYBIND11_MODULE(_trilinear_cpu, module) {
    module.doc() = "Trilinear warp on the CPU with OpenMP, forward and backward (mgr_engine.kernels.warp_cpu), "
                   "and the U-Net decoder's upsample-add-concatenate (mgr_engine.kernels.decoder_cpu)";
    define<float>(module);
    define<double>(module);
}
