// Trilinear warp on the CPU, forward and backward, the U-Net decoder's trilinear 2x upsampling
// fused with its epilogue, and IO's eval-mode BatchNorm, crop and concatenation in one pass;
// built by setup.py as mgr_engine._trilinear_cpu.
//
// Same semantics as torch.nn.functional.grid_sample(mode="bilinear", align_corners=True) on
// a map in [0, 1] (mgr_engine.ops.warp): out[b, c, p] = image[b, c] at coords[b, :, p] * (n - 1).
// Why: torch's 3-D grid sampler parallelizes only over the batch on the CPU, so a single
// registration (batch 1) runs it, and its backward, on one core. Here the output voxels are
// split over OpenMP threads, the eight corner weights are computed once for all channels, and
// the loops over the points are vectorized (gathers), compiled for AVX-512, AVX2+FMA and
// baseline x86-64 with the best picked at load time; with AVX-512 the forward and the map's
// gradient load the two corners along x together (sample_pairs, map_gradient_pairs). Templated on
// float (the engine) and double (gradcheck in the tests).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_kernel.h"  // Array, check, share, CPU_DISPATCH, INLINE_INTO_CLONES
#ifdef SIMD_LEVELS
#include <immintrin.h>
#endif

namespace {

// Voxel coordinate of map coordinate c on an axis of scale + 1 voxels; with border padding
// clamped into [0, scale]. NaN stays NaN.
template <bool Border, typename T>
INLINE_INTO_CLONES T voxel_of(T c, T scale) {
    const T v = c * scale;
    if (!Border) return v;
    const T below = v >= scale ? scale : v;
    return below <= T(0) ? T(0) : below;
}

// Its derivative in c: with border padding 0 on and beyond the edges, as torch's
// clip_coordinates_set_grad.
template <bool Border, typename T>
INLINE_INTO_CLONES T voxel_slope(T c, T scale) {
    const T v = c * scale;
    return (!Border || ((v > T(0)) & (v < scale))) ? scale : T(0);
}

// The two grid neighbours (lower, upper) of voxel coordinate v along an axis of n voxels:
// whether each lies in the grid, its index (0 where it does not, so that every address the
// loops form is valid), its weight and the weight's derivative in v (both to be masked by
// `inside`). v outside [-1, n), NaN included, has neither neighbour in the grid. Branch-free
// (selects only), so that the point loops below vectorize, with gathers, on AVX2 and AVX-512.
template <typename T>
struct Axis {
    bool inside[2];
    int32_t index[2];
    T weight[2], slope[2];
};

template <typename T>
INLINE_INTO_CLONES Axis<T> neighbours(T v, int32_t n) {
    // Clamped into [-2, n], where no neighbour of a point beyond changes, and NaN to -2 (std::max
    // returns its first argument when unordered): the conversion to int is then always defined.
    v = std::max(T(-2), std::min(v, T(n)));
    const int32_t truncated = int32_t(v);
    const int32_t i = truncated - (T(truncated) > v);  // floor(v), in [-2, n]; std::floor would not vectorize
    const T fraction = v - T(i);
    Axis<T> a;
    a.inside[0] = (i >= 0) & (i <= n - 1), a.inside[1] = (i >= -1) & (i <= n - 2);
    a.index[0] = a.inside[0] ? i : 0, a.index[1] = a.inside[1] ? i + 1 : 0;
    a.weight[0] = T(1) - fraction, a.weight[1] = fraction;
    a.slope[0] = T(-1), a.slope[1] = T(1);
    return a;
}

// The eight corners of one sample point, corner k at the (z, y, x) neighbours k >> 2,
// (k >> 1) & 1, k & 1: flat offset, whether inside the grid, trilinear weight, and with
// Derivatives the weight's derivatives along z, y, x (in voxels).
template <typename T>
struct Corners {
    int32_t offset[8];
    bool inside[8];
    T weight[8], d_z[8], d_y[8], d_x[8];
};

template <bool Derivatives, typename T>
INLINE_INTO_CLONES Corners<T> corners_of(const Axis<T>& z, const Axis<T>& y, const Axis<T>& x, int32_t plane,
                                         int32_t width) {
    Corners<T> c;
    for (int k = 0; k < 8; ++k) {
        const int hz = k >> 2, hy = (k >> 1) & 1, hx = k & 1;
        c.offset[k] = z.index[hz] * plane + y.index[hy] * width + x.index[hx];
        c.inside[k] = z.inside[hz] & y.inside[hy] & x.inside[hx];
        c.weight[k] = z.weight[hz] * y.weight[hy] * x.weight[hx];
        if (Derivatives) {
            c.d_z[k] = z.slope[hz] * y.weight[hy] * x.weight[hx];
            c.d_y[k] = z.weight[hz] * y.slope[hy] * x.weight[hx];
            c.d_x[k] = z.weight[hz] * y.weight[hy] * x.slope[hx];
        }
    }
    return c;
}

// Images above this size (bytes, all channels) have their sample points' corners prefetched
// (over_points; the AVX-512 pair loops: over_pair_blocks). 32 MiB, the L3 of the 2-core AMD EPYC
// it was measured on: a 3-channel 175^3 field (64 MiB) sampled 1.55-1.7x faster with it; a 175^3
// image (21 MiB) 1.1x alone but slower within IO (20 -> 25 ms a call), an 88^3 field (8 MiB, in
// the caches already) 0.75x (RESULTS.md, fiftieth session). With over_pair_blocks's cheaper
// prefetch the 175^3 image gained alone (12-13 -> 9 ms) but not within IO (11.6 against 11.7 ms a
// call), the cache-resident fields still lost (44^3 field 12 -> 16 ms). Settable for tests (0:
// always).
inline int64_t& prefetch_above_bytes() {
    static int64_t bytes = int64_t(32) << 20;
    return bytes;
}

// The geometry shared by all calls: image (B, C, D, H, W), coords (B or 1, 3, D', H', W').
// Arrays over the sample points (coords, out, grad_out, grad_coords) come in one of two
// layouts, given by `channels_last`: planar (N, K, D', H', W'), or channels-last passed as
// (N, D', H', W', K), the layout of the engine's maps (a channels-last network's identity
// grid), which needs no planar copy per call. Element (n, k, p) of an array with K channels is
// at n * K * points + k * channel_stride(K) + p * point_stride(K).
struct Geometry {
    int64_t batch, channels, depth, height, width, coord_batch, points, plane, volume;
    bool border, channels_last, add_coords;
    bool prefetch;  // the sampled image is larger than prefetch_above_bytes(): see over_points
    bool pairs;     // float's AVX-512 loops load corners in pairs (corner_pairs): sample_pairs

    template <typename T>
    Geometry(const Array<T>& image, const Array<T>& coords, bool border, bool channels_last, bool add_coords)
        : border(border), channels_last(channels_last), add_coords(add_coords) {
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
        check(volume <= INT32_MAX, "image must have at most 2^31 - 1 voxels per channel (32-bit offsets)");
        check(!add_coords || (channels == 3 && border),
              "add_coords needs a displacement field: 3 channels, border padding");
        prefetch = channels * volume * int64_t(sizeof(T)) > prefetch_above_bytes();
        pairs = sizeof(T) == 4 && corner_pairs();
    }

    template <typename T>
    void check_output(const Array<T>& out, const Array<T>& coords) const {
        const int c = channels_last ? 4 : 1, first = channels_last ? 1 : 2;
        check(out.ndim() == 5 && out.shape(0) == batch && out.shape(c) == channels,
              "out and grad_out must be (B, C, *coords' grid) in coords' layout");
        for (int axis = first; axis < first + 3; ++axis)
            check(out.shape(axis) == coords.shape(axis), "out and grad_out must be (B, C, *coords' grid) in coords' layout");
    }
};

// The layouts the point loops are compiled for, fixed at compile time so that their strides
// are constants and their channel loops unroll: C channels (1: images, 3: fields; 0: any
// count, read from the geometry), channels-last or planar sample arrays, border or zero
// padding, and AddCoords: compose_maps, out = coords + sample (C 3, border). It holds the
// geometry's sizes by value, so that the loops keep them in registers.
template <typename T, int C, bool ChannelsLast, bool Border, bool AddCoords>
struct Layout {
    int64_t channel_count, points, volume;
    int32_t depth, height, width, plane;
    bool prefetch, pairs;

    explicit Layout(const Geometry& g)
        : channel_count(g.channels), points(g.points), volume(g.volume), depth(int32_t(g.depth)),
          height(int32_t(g.height)), width(int32_t(g.width)), plane(int32_t(g.plane)), prefetch(g.prefetch),
          pairs(g.pairs) {}
    INLINE_INTO_CLONES Layout without_prefetch() const {
        Layout plain = *this;
        plain.prefetch = false;
        return plain;
    }
    INLINE_INTO_CLONES int64_t channels() const { return C ? C : channel_count; }
    INLINE_INTO_CLONES int64_t channel_stride() const { return ChannelsLast ? 1 : points; }
    INLINE_INTO_CLONES int64_t point_stride(int64_t k) const { return ChannelsLast ? k : 1; }

    // Map coordinate `axis` of point p of map (one batch item's coords).
    INLINE_INTO_CLONES T coordinate(const T* map, int64_t p, int axis) const {
        return map[p * point_stride(3) + axis * channel_stride()];
    }
    INLINE_INTO_CLONES Axis<T> axis_of(const T* map, int64_t p, int axis, int32_t n) const {
        return neighbours(voxel_of<Border>(coordinate(map, p, axis), T(n - 1)), n);
    }
    // The eight corners of point p.
    template <bool Derivatives>
    INLINE_INTO_CLONES Corners<T> corners(const T* map, int64_t p) const {
        return corners_of<Derivatives>(axis_of(map, p, 0, depth), axis_of(map, p, 1, height),
                                       axis_of(map, p, 2, width), plane, width);
    }
};

// FOR_EACH_LAYOUT(X) expands X(C, ChannelsLast, Border, AddCoords) for each Layout compiled.
#define FOR_EACH_LAYOUT(X)                                                                            \
    X(1, true, false, false) X(1, true, true, false) X(1, false, false, false) X(1, false, true, false) \
    X(3, true, false, false) X(3, true, true, false) X(3, false, false, false) X(3, false, true, false) \
    X(0, true, false, false) X(0, true, true, false) X(0, false, false, false) X(0, false, true, false) \
    X(3, true, true, true) X(3, false, true, true)

// Software prefetch of the corners of points [from, to): per channel, the cache lines of corners
// 0, 2, 4, 6 (each shares its row, and mostly its line, with the next corner along x).
template <typename T, int C, bool ChannelsLast, bool Border, bool AddCoords>
INLINE_INTO_CLONES void prefetch_corners(const Layout<T, C, ChannelsLast, Border, AddCoords>& l, const T* src,
                                         const T* map, int64_t from, int64_t to) {
#pragma GCC novector
    for (int64_t p = from; p < to; ++p) {
        const Corners<T> c = l.template corners<false>(map, p);
        for (int64_t ch = 0; ch < l.channels(); ++ch)
            for (int k = 0; k < 8; k += 2) __builtin_prefetch(src + ch * l.volume + c.offset[k]);
    }
}

// body(first, last), a vectorized loop over those points gathering from src, over [first, last):
// for an image larger than the caches (l.prefetch), chunk by chunk, each chunk's corners
// prefetched while the points PREFETCH_AHEAD before them are computed. Sampling a 175^3 field
// waited on its cache misses (4 GB/s from memory, about a tenth of what the machine moves) and
// no hardware prefetcher follows a map's jittered rows.
constexpr int64_t PREFETCH_CHUNK = 128, PREFETCH_AHEAD = 256;

template <typename T, int C, bool ChannelsLast, bool Border, bool AddCoords, typename Body>
INLINE_INTO_CLONES void over_points(const Layout<T, C, ChannelsLast, Border, AddCoords>& l, const T* src,
                                    const T* map, int64_t first, int64_t last, Body body) {
    if (!l.prefetch) return body(first, last);
    for (int64_t start = first; start < last; start += PREFETCH_CHUNK) {
        const int64_t end = std::min(start + PREFETCH_CHUNK, last);
        prefetch_corners(l, src, map, std::min(start + PREFETCH_AHEAD, last), std::min(end + PREFETCH_AHEAD, last));
        body(start, end);
    }
}

// Corners in pairs. The forward's gathers took most of its time: for a 3-channel field, 24
// gathers of 16 floats per 16 points. The two corners along x are adjacent voxels, so one 8-byte
// load reads both: half the loads. GCC vectorized no such load in the point loops (it did in a
// small test loop), so they are written in AVX-512: the corners of a block of points are computed
// first (a vectorized loop into PairCorners), then sample_pair_block (map_gradient_pair_block)
// sums them in the order and with the fused multiply-adds of the gathering loop (the same bits,
// tested).
constexpr int PAIR_BLOCK = 128;

// A block of points' corners for the pair loops: where each point's pairs lie, and per axis (z, y,
// x) its two neighbours' weights and whether each is in the grid. The loops form the corners'
// weights and derivatives from these (fewer stores than Corners' 8 weights and 24 derivatives; a
// map gradient 1.1-1.3x faster). With grad_out for the map's gradient, and the results.
struct PairCorners {
    alignas(64) int32_t row[4][PAIR_BLOCK];  // the first voxel of corners 2q and 2q + 1's pair
    alignas(64) bool swapped[PAIR_BLOCK];    // the lower corner is the pair's second voxel
    alignas(64) bool inside[3][2][PAIR_BLOCK];
    alignas(64) float weight[3][2][PAIR_BLOCK];
    alignas(64) float grad[3][PAIR_BLOCK];    // grad_out per channel (the map's gradient)
    alignas(64) float result[3][PAIR_BLOCK];  // per channel (forward) or along z, y, x (gradient)
};

// Point i of b from its neighbours along each axis. Where its corners along x lie as a pair: both
// neighbours in the grid, the pair at the lower; only one, the pair within the grid that holds it
// (the width is at least 2), swapped; neither, any (not summed).
INLINE_INTO_CLONES void store_point(PairCorners& b, int i, const Axis<float>& z, const Axis<float>& y,
                                    const Axis<float>& x, int32_t plane, int32_t width) {
    const int32_t pair = x.inside[1] ? (x.inside[0] ? x.index[0] : 0) : (x.inside[0] ? x.index[0] - 1 : 0);
    for (int q = 0; q < 4; ++q) b.row[q][i] = z.index[q >> 1] * plane + y.index[q & 1] * width + pair;
    b.swapped[i] = x.inside[0] != x.inside[1];
    const Axis<float>* axes[3] = {&z, &y, &x};
    for (int axis = 0; axis < 3; ++axis)
        for (int h = 0; h < 2; ++h)
            b.inside[axis][h][i] = axes[axis]->inside[h], b.weight[axis][h][i] = axes[axis]->weight[h];
}

// The rows of points n .. the next multiple of 16: the pair blocks load whole vectors' pairs.
INLINE_INTO_CLONES void pad_rows(PairCorners& b, int n) {
    for (int i = n; i < (n + 15) / 16 * 16; ++i)
        for (int q = 0; q < 4; ++q) b.row[q][i] = 0;
}

#ifdef SIMD_LEVELS
// The 16 flags at `at` (64-byte aligned) as a mask.
SIMD_AVX512 inline __attribute__((always_inline)) __mmask16 flags(const bool* at) {
    const __m128i bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(at));
    return _mm_test_epi8_mask(bytes, bytes);
}

// The 8 bytes at channel + rows[j], j = 0..7, as the 8 lanes of a vector: one load each, faster
// than a gather of 8-byte elements (0.32 against 0.47 ns a pair from the L2, one core).
SIMD_AVX512 inline __attribute__((always_inline)) __m512i load_pairs(const float* channel, const int32_t* rows) {
    __m128i pairs[4];
    for (int j = 0; j < 4; ++j) {
        const __m128i first = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(channel + rows[2 * j]));
        const double* second = reinterpret_cast<const double*>(channel + rows[2 * j + 1]);
        pairs[j] = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(first), second));
    }
    const __m512i low = _mm512_inserti64x2(_mm512_castsi128_si512(pairs[0]), pairs[1], 1);
    return _mm512_inserti64x2(_mm512_inserti64x2(low, pairs[2], 2), pairs[3], 3);
}

// Corners 2q and 2q + 1 (lower, upper along x) of points i .. i + 15 in a channel, 0 where their
// mask is not set (outside the grid).
SIMD_AVX512 inline __attribute__((always_inline)) void corner_pair(const PairCorners& b, int i, int q,
                                                                  const float* channel, __mmask16 lower_inside,
                                                                  __mmask16 upper_inside, __m512& lower,
                                                                  __m512& upper) {
    const __m512i firsts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i seconds = _mm512_add_epi32(firsts, _mm512_set1_epi32(1));
    const __mmask16 swapped = flags(b.swapped + i);
    // points i..i+7 and i+8..i+15, (first, second) in each 8 bytes
    const __m512i low = load_pairs(channel, b.row[q] + i), high = load_pairs(channel, b.row[q] + i + 8);
    const __m512 first = _mm512_castsi512_ps(_mm512_permutex2var_epi32(low, firsts, high));
    const __m512 second = _mm512_castsi512_ps(_mm512_permutex2var_epi32(low, seconds, high));
    lower = _mm512_maskz_mov_ps(lower_inside, _mm512_mask_blend_ps(swapped, first, second));
    upper = _mm512_maskz_mov_ps(upper_inside, _mm512_mask_blend_ps(swapped, second, first));
}

// Points i .. i + 15's neighbours: weights w[axis][h] and whether each corner k is in the grid
// (k = (z, y, x) neighbours (k >> 2, (k >> 1) & 1, k & 1), as Corners).
SIMD_AVX512 inline __attribute__((always_inline)) void load_neighbours(const PairCorners& b, int i, __m512 w[3][2],
                                                                      __mmask16 inside[8]) {
    __mmask16 in[3][2];
    for (int axis = 0; axis < 3; ++axis)
        for (int h = 0; h < 2; ++h)
            w[axis][h] = _mm512_load_ps(b.weight[axis][h] + i), in[axis][h] = flags(b.inside[axis][h] + i);
    for (int k = 0; k < 8; ++k) inside[k] = in[0][k >> 2] & in[1][(k >> 1) & 1] & in[2][k & 1];
}

// result[ch][i] = the sum over corners k of weight k * corner, for the first n points of b and
// each of `channels` (1 to 3) channels of src: sample_range's sums, in its order and with its
// fused multiply-adds, the weights as Corners forms them, (w_z * w_y) * w_x.
SIMD_AVX512 inline __attribute__((always_inline)) void sample_pair_block(PairCorners& b, int n, const float* src,
                                                                        int64_t volume, int channels) {
    for (int i = 0; i < n; i += 16) {
        __m512 w[3][2];
        __mmask16 inside[8];
        load_neighbours(b, i, w, inside);
        __m512 sum[3] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int q = 0; q < 4; ++q) {
            const __m512 zy = _mm512_mul_ps(w[0][q >> 1], w[1][q & 1]);
            const __m512 lower_weight = _mm512_mul_ps(zy, w[2][0]), upper_weight = _mm512_mul_ps(zy, w[2][1]);
            for (int ch = 0; ch < channels; ++ch) {
                __m512 lower, upper;
                corner_pair(b, i, q, src + ch * volume, inside[2 * q], inside[2 * q + 1], lower, upper);
                sum[ch] = _mm512_fmadd_ps(lower_weight, lower, sum[ch]);
                sum[ch] = _mm512_fmadd_ps(upper_weight, upper, sum[ch]);
            }
        }
        for (int ch = 0; ch < channels; ++ch) _mm512_store_ps(b.result[ch] + i, sum[ch]);
    }
}

// result[axis][i] = the sum over channels, then corners k, of the weight's derivative along axis
// times (corner * grad[ch][i]), for the first n points of b: map_gradient_range's sums, in its
// order and with its fused multiply-adds. The derivatives are Corners' d_z, d_y, d_x:
// (slope * w_y) * w_x and so on, the slope -1 or 1, so +-(w_y * w_x) exactly; a -1 becomes a
// negated multiply-add.
SIMD_AVX512 inline __attribute__((always_inline)) void map_gradient_pair_block(PairCorners& b, int n, const float* src,
                                                                              int64_t volume, int channels) {
    for (int i = 0; i < n; i += 16) {
        __m512 w[3][2];
        __mmask16 inside[8];
        load_neighbours(b, i, w, inside);
        __m512 yx[2][2], zx[2][2], zy[2][2];  // products of two axes' weights, by neighbour
        for (int a = 0; a < 2; ++a)
            for (int c = 0; c < 2; ++c)
                yx[a][c] = _mm512_mul_ps(w[1][a], w[2][c]), zx[a][c] = _mm512_mul_ps(w[0][a], w[2][c]),
                zy[a][c] = _mm512_mul_ps(w[0][a], w[1][c]);
        __m512 sum[3] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int ch = 0; ch < channels; ++ch) {
            const __m512 grad = _mm512_load_ps(b.grad[ch] + i);
            for (int q = 0; q < 4; ++q) {
                __m512 corner[2];
                corner_pair(b, i, q, src + ch * volume, inside[2 * q], inside[2 * q + 1], corner[0], corner[1]);
                const int hz = q >> 1, hy = q & 1;
                for (int hx = 0; hx < 2; ++hx) {
                    const __m512 v = _mm512_mul_ps(corner[hx], grad);
                    sum[0] = hz ? _mm512_fmadd_ps(yx[hy][hx], v, sum[0]) : _mm512_fnmadd_ps(yx[hy][hx], v, sum[0]);
                    sum[1] = hy ? _mm512_fmadd_ps(zx[hz][hx], v, sum[1]) : _mm512_fnmadd_ps(zx[hz][hx], v, sum[1]);
                    sum[2] = hx ? _mm512_fmadd_ps(zy[hz][hy], v, sum[2]) : _mm512_fnmadd_ps(zy[hz][hy], v, sum[2]);
                }
            }
        }
        for (int axis = 0; axis < 3; ++axis) _mm512_store_ps(b.result[axis] + i, sum[axis]);
    }
}

// The corners of points start .. start + n - 1 into b (a vectorized loop), with Gradient their
// grad_out values (the map's gradient), and the rows padded to whole vectors.
template <bool Gradient, int C, bool ChannelsLast, bool Border, bool AddCoords>
SIMD_AVX512 inline __attribute__((always_inline)) void fill_pair_block(
    const Layout<float, C, ChannelsLast, Border, AddCoords>& l, const float* map, const float* grad_out,
    int64_t start, int n, PairCorners& b) {
    const int64_t out_channel = l.channel_stride(), out_point = l.point_stride(C);
#pragma omp simd
    for (int i = 0; i < n; ++i) {
        const Axis<float> z = l.axis_of(map, start + i, 0, l.depth), y = l.axis_of(map, start + i, 1, l.height),
                          x = l.axis_of(map, start + i, 2, l.width);
        store_point(b, i, z, y, x, l.plane, l.width);
        if constexpr (Gradient)
            for (int ch = 0; ch < C; ++ch) b.grad[ch][i] = grad_out[ch * out_channel + (start + i) * out_point];
    }
    pad_rows(b, n);
}

// Prefetches the rows of the corner pairs of b's first n points, in each channel: four lines a
// point and channel (two corners each). Every point's: those of every second, fourth or eighth
// point (whose lines mostly hold those between) left more misses, 175^3 field at a smooth map
// forward 21 against 22, 22-24 and 27 ms.
SIMD_AVX512 inline __attribute__((always_inline)) void prefetch_pair_block(const PairCorners& b, int n,
                                                                          const float* src, int64_t volume,
                                                                          int channels) {
    for (int i = 0; i < n; ++i)
        for (int ch = 0; ch < channels; ++ch)
            for (int q = 0; q < 4; ++q) __builtin_prefetch(src + ch * volume + b.row[q][i]);
}

// Whether the pair loops over points [from, to) take over the prefetch (over_pair_blocks), where
// the image needs one: unless the map jumps by a voxel or more along z or y from nearly every
// point to the next. Of 256 pairs of neighbours spread over the range, at least an eighth must
// move by less: IO's maps (randomized weights) 0.36 to 0.99 of them, the regularizer's points
// 0.7 to 0.9, a map jittered by 3.5 voxels 0.03. At such a map the pair loops' prefetch gained
// nothing where over_points's gains a fifth (175^3 field, forward 40 against 33 ms), whatever
// its distance (1 to 3 blocks ahead), spread over the block's vectors or not; not understood.
// Such a map keeps over_points. Not inlined: inlined, GCC compiled the map gradient's
// over_points pass into slower code (jittered map 45 -> 58 ms).
template <int C, bool ChannelsLast, bool Border, bool AddCoords>
__attribute__((noinline)) bool pairs_prefetch_themselves(const Layout<float, C, ChannelsLast, Border, AddCoords>& l,
                                                         const float* map, int64_t from, int64_t to) {
    if (!l.prefetch) return true;
    const int64_t samples = std::min<int64_t>(256, to - from - 1);
    const int64_t step = samples > 0 ? (to - from - 1) / samples : 0;
    int64_t near = 0;
    for (int64_t k = 0; k < samples; ++k) {
        const int64_t p = from + 1 + k * step;
        const float dz = (l.coordinate(map, p, 0) - l.coordinate(map, p - 1, 0)) * float(l.depth - 1);
        const float dy = (l.coordinate(map, p, 1) - l.coordinate(map, p - 1, 1)) * float(l.height - 1);
        near += std::fabs(dz) < 1.0f && std::fabs(dy) < 1.0f;
    }
    return 8 * near >= samples;
}

// The pair loops' blocks of points [from, to): block(b, start, n) for each, after the block's
// corners are in b. For an image larger than the caches (l.prefetch), the next block's corners
// are computed and their rows prefetched before the current block is summed, in place of
// over_points's scalar pass over the corners: a 175^3 field at a smooth 175^3 map 26 -> 21 ms
// forward, 39 -> 31 ms the map's gradient (2 threads, AMD EPYC Zen 5). Where
// pairs_prefetch_themselves says so; else over_points prefetches and l.prefetch is off here.
template <bool Gradient, int C, bool ChannelsLast, bool Border, bool AddCoords, typename Block>
SIMD_AVX512 inline __attribute__((always_inline)) void over_pair_blocks(
    const Layout<float, C, ChannelsLast, Border, AddCoords>& l, const float* src, const float* map,
    const float* grad_out, int64_t from, int64_t to, Block block) {
    const auto size = [&](int64_t start) { return int(std::min<int64_t>(PAIR_BLOCK, to - start)); };
    if (!l.prefetch) {
        PairCorners b;
        for (int64_t start = from; start < to; start += PAIR_BLOCK) {
            fill_pair_block<Gradient>(l, map, grad_out, start, size(start), b);
            block(b, start, size(start));
        }
        return;
    }
    PairCorners blocks[2];
    if (from < to) fill_pair_block<Gradient>(l, map, grad_out, from, size(from), blocks[0]);
    int current = 0;
    for (int64_t start = from; start < to; start += PAIR_BLOCK, current ^= 1) {
        const int64_t next = start + PAIR_BLOCK;
        if (next < to) {
            fill_pair_block<Gradient>(l, map, grad_out, next, size(next), blocks[current ^ 1]);
            prefetch_pair_block(blocks[current ^ 1], size(next), src, l.volume, C);
        }
        block(blocks[current], start, size(start));
    }
}

// Forward over points [from, to) through PairCorners blocks (float, 1 or 3 channels, where
// corner_pairs()): sample_range's results. A function of its own, compiled for AVX-512:
// inlined into sample_points with all the layouts, its first loop did not vectorize.
template <int C, bool ChannelsLast, bool Border, bool AddCoords>
SIMD_AVX512 __attribute__((noinline)) void sample_pairs(const Layout<float, C, ChannelsLast, Border, AddCoords>& l,
                                                        const float* src, const float* map, float* out, int64_t from,
                                                        int64_t to) {
    static_assert(C == 1 || C == 3, "sample_pair_block sums 1 to 3 channels");
    const int64_t out_channel = l.channel_stride(), out_point = l.point_stride(C);
    over_pair_blocks<false>(l, src, map, nullptr, from, to, [&](PairCorners& b, int64_t start, int n)
                                                         SIMD_AVX512 __attribute__((always_inline)) {
        sample_pair_block(b, n, src, l.volume, C);
#pragma omp simd
        for (int i = 0; i < n; ++i)
            for (int ch = 0; ch < C; ++ch)
                out[ch * out_channel + (start + i) * out_point] =
                    AddCoords ? b.result[ch][i] + l.coordinate(map, start + i, ch) : b.result[ch][i];
    });
}

// The map's gradient over points [from, to) through PairCorners blocks (float, 1 or 3
// channels, in the AVX-512 backward): map_gradient_range's results, a function of its own as
// sample_pairs.
template <int C, bool ChannelsLast, bool Border, bool AddCoords>
SIMD_AVX512 __attribute__((noinline)) void map_gradient_pairs(
    const Layout<float, C, ChannelsLast, Border, AddCoords>& l, const float* src, const float* map,
    const float* grad_out, float* grad_map, int64_t from, int64_t to) {
    static_assert(C == 1 || C == 3, "map_gradient_pair_block sums 1 to 3 channels");
    const int64_t map_channel = l.channel_stride(), map_point = l.point_stride(3);
    over_pair_blocks<true>(l, src, map, grad_out, from, to, [&](PairCorners& b, int64_t start, int n)
                                                          SIMD_AVX512 __attribute__((always_inline)) {
        map_gradient_pair_block(b, n, src, l.volume, C);
#pragma omp simd
        for (int i = 0; i < n; ++i) {
            const int64_t p = start + i;
            float* at = grad_map + p * map_point;
            at[0] += b.result[0][i] * voxel_slope<Border>(l.coordinate(map, p, 0), float(l.depth - 1)) +
                     (AddCoords ? b.grad[0][i] : 0.0f);
            at[map_channel] += b.result[1][i] * voxel_slope<Border>(l.coordinate(map, p, 1), float(l.height - 1)) +
                               (AddCoords ? b.grad[1][i] : 0.0f);
            at[2 * map_channel] += b.result[2][i] * voxel_slope<Border>(l.coordinate(map, p, 2), float(l.width - 1)) +
                                   (AddCoords ? b.grad[2][i] : 0.0f);
        }
    });
}
#endif

// Forward over points [first, last) of one batch item: out = src sampled at map, plus the map
// itself with AddCoords.
template <typename T, int C, bool ChannelsLast, bool Border, bool AddCoords>
INLINE_INTO_CLONES void sample_range(Layout<T, C, ChannelsLast, Border, AddCoords> l, const T* src, const T* map,
                                     T* out, int64_t first, int64_t last) {
    const int64_t channels = l.channels(), out_channel = l.channel_stride(), out_point = l.point_stride(channels);
    const int64_t volume = l.volume;
#ifdef SIMD_LEVELS
    if constexpr (std::is_same_v<T, float> && (C == 1 || C == 3))
        if (l.pairs && pairs_prefetch_themselves(l, map, first, last))
            return sample_pairs(l, src, map, out, first, last);
#endif
    // The pair loop at a jittered map, in over_points's chunks. Inside the gathering loop's own
    // over_points on purpose: the same dispatch as a helper shared with map_gradient_range
    // (over_pairs) made GCC compile the scalar prefetch pass slower (jittered map, forward 33 ->
    // 49 ms, map gradient 45 -> 58 ms).
    over_points(l, src, map, first, last, [&](int64_t from, int64_t to) __attribute__((always_inline)) {
#ifdef SIMD_LEVELS
        if constexpr (std::is_same_v<T, float> && (C == 1 || C == 3))
            if (l.pairs) return sample_pairs(l.without_prefetch(), src, map, out, from, to);
#endif
#pragma omp simd
        for (int64_t p = from; p < to; ++p) {
            const Corners<T> c = l.template corners<false>(map, p);
#pragma GCC unroll 4  // unrolled, not vectorized itself: the point loop is the one vectorized
            for (int64_t ch = 0; ch < channels; ++ch) {
                const T* channel = src + ch * volume;
                T value = T(0);
                for (int k = 0; k < 8; ++k) {
                    const T sample = channel[c.offset[k]];  // offsets are valid; outside corners read 0
                    value += c.weight[k] * (c.inside[k] ? sample : T(0));
                }
                if (AddCoords) value += l.coordinate(map, p, int(ch));
                out[ch * out_channel + p * out_point] = value;
            }
        }
    });
}

// Backward, the map's part, over points [first, last) of one batch item: grad_map +=
// d(sum(grad_out * out)) / d(map), grad_out itself included with AddCoords.
template <typename T, int C, bool ChannelsLast, bool Border, bool AddCoords>
INLINE_INTO_CLONES void map_gradient_range(Layout<T, C, ChannelsLast, Border, AddCoords> l, const T* src, const T* map,
                                           const T* grad_out, T* grad_map, int64_t first, int64_t last) {
    const int64_t channels = l.channels(), out_channel = l.channel_stride(), out_point = l.point_stride(channels);
    const int64_t map_channel = l.channel_stride(), map_point = l.point_stride(3);
    const int64_t volume = l.volume;
#ifdef SIMD_LEVELS
    if constexpr (std::is_same_v<T, float> && (C == 1 || C == 3))
        if (l.pairs && pairs_prefetch_themselves(l, map, first, last))
            return map_gradient_pairs(l, src, map, grad_out, grad_map, first, last);
#endif
    over_points(l, src, map, first, last, [&](int64_t from, int64_t to) __attribute__((always_inline)) {
#ifdef SIMD_LEVELS
        if constexpr (std::is_same_v<T, float> && (C == 1 || C == 3))
            if (l.pairs) return map_gradient_pairs(l.without_prefetch(), src, map, grad_out, grad_map, from, to);
#endif
#pragma omp simd
        for (int64_t p = from; p < to; ++p) {
            const Corners<T> c = l.template corners<true>(map, p);
            T sum_z = T(0), sum_y = T(0), sum_x = T(0), direct[3] = {T(0), T(0), T(0)};
#pragma GCC unroll 4  // unrolled, not vectorized itself: the point loop is the one vectorized
            for (int64_t ch = 0; ch < channels; ++ch) {
                const T* channel = src + ch * volume;
                const T grad = grad_out[ch * out_channel + p * out_point];
                if (AddCoords) direct[ch] = grad;
                for (int k = 0; k < 8; ++k) {
                    const T sample = channel[c.offset[k]];
                    const T v = (c.inside[k] ? sample : T(0)) * grad;
                    sum_z += c.d_z[k] * v, sum_y += c.d_y[k] * v, sum_x += c.d_x[k] * v;
                }
            }
            T* at = grad_map + p * map_point;
            at[0] += sum_z * voxel_slope<Border>(l.coordinate(map, p, 0), T(l.depth - 1)) + direct[0];
            at[map_channel] += sum_y * voxel_slope<Border>(l.coordinate(map, p, 1), T(l.height - 1)) + direct[1];
            at[2 * map_channel] += sum_x * voxel_slope<Border>(l.coordinate(map, p, 2), T(l.width - 1)) + direct[2];
        }
    });
}

// Backward, the image's part for one point: grad_image += weight * grad_out at each corner of
// p in the grid within z slices [lo, hi). Returns whether all of p's corners in the grid lie
// in those slices (true where none does).
template <typename T, int C, bool ChannelsLast, bool Border, bool AddCoords>
INLINE_INTO_CLONES bool scatter_point(Layout<T, C, ChannelsLast, Border, AddCoords> l, const T* map, const T* grad_out,
                                      T* grad_image, int64_t p, int64_t lo, int64_t hi) {
    const int64_t channels = l.channels(), out_channel = l.channel_stride(), out_point = l.point_stride(channels);
    const Axis<T> z = l.axis_of(map, p, 0, l.depth), y = l.axis_of(map, p, 1, l.height),
                  x = l.axis_of(map, p, 2, l.width);
    const Corners<T> c = corners_of<false>(z, y, x, l.plane, l.width);
    const bool none = !((z.inside[0] | z.inside[1]) & (y.inside[0] | y.inside[1]) & (x.inside[0] | x.inside[1]));
    const int64_t z_first = z.inside[0] ? z.index[0] : z.index[1], z_last = z.inside[1] ? z.index[1] : z.index[0];
    const bool all_mine = none || (z_first >= lo && z_last < hi);
    const int64_t begin = lo * l.plane, end = hi * l.plane;
    for (int64_t ch = 0; ch < channels; ++ch) {
        const T grad = grad_out[ch * out_channel + p * out_point];
        T* target = grad_image + ch * l.volume;
        for (int k = 0; k < 8; ++k)
            if (c.inside[k] && c.offset[k] >= begin && c.offset[k] < end) target[c.offset[k]] += c.weight[k] * grad;
    }
    return all_mine;
}

// Backward, the image's part over points [first, last) of one batch item (or the points
// listed[first..last)), for the thread that owns z slices [lo, hi): adds their corners in
// those slices, and lists in `elsewhere` (where given) the points with a corner outside them.
// Most points have all eight corners in the grid and in the thread's slices. Their stencils
// are computed for a block of points at a time in a vectorized loop, and consecutive points in
// the same grid cell (a coarse field sampled at finer points: 4 in a row at 175 points on 44
// voxels) are summed in registers, their cell's 8 x C voxels updated once per run. Above
// prefetch_above_bytes, each point's cells are prefetched for writing SCATTER_AHEAD points earlier.
constexpr int SCATTER_AHEAD = 16;

// A point's 8 corners' values in one vector (GCC's vector extension: one register in AVX2 or
// AVX-512, two in SSE2).
template <typename T>
struct EightOf;
template <>
struct EightOf<float> {
    typedef float type __attribute__((vector_size(32)));
};
template <>
struct EightOf<double> {
    typedef double type __attribute__((vector_size(64)));
};
template <typename T>
using Eight = typename EightOf<T>::type;

template <typename T, int C, bool ChannelsLast, bool Border, bool AddCoords>
INLINE_INTO_CLONES void scatter_range(Layout<T, C, ChannelsLast, Border, AddCoords> l, const T* map, const T* grad_out,
                                      T* grad_image, const int64_t* listed, int64_t first, int64_t last, int64_t lo,
                                      int64_t hi, std::vector<int64_t>* elsewhere) {
    if (listed || C == 0) {  // the few points left after the barrier; a channel count the runs do not size
        for (int64_t i = first; i < last; ++i) {
            const int64_t p = listed ? listed[i] : i;
            if (!scatter_point(l, map, grad_out, grad_image, p, lo, hi) && elsewhere) elsewhere->push_back(p);
        }
        return;
    }
    constexpr int channels = C ? C : 1, block = 256;
    const int64_t out_channel = l.channel_stride(), out_point = l.point_stride(channels);
    const int32_t corner[8] = {0, 1, l.width, l.width + 1, l.plane, l.plane + 1, l.plane + l.width,
                               l.plane + l.width + 1};  // corner k from corner 0, in corners_of's order
    alignas(64) int32_t cell[block];  // the offset of corner 0, where `simple`
    alignas(64) bool simple[block];   // all 8 corners in the grid and in slices [lo, hi)
    // z, y, x: the upper neighbour's weight on each axis. Not a point's 8 corner weights together,
    // weight[i][0..7]: GCC left the loop below scalar for that store (in the built AVX2 code; a
    // 44^3 field's scatter at 175^3 points 63 ms, 33 ms with this).
    alignas(64) T fraction[3][block];
    Eight<T> carried[channels];
    int32_t carried_run = -1;  // the cell of the run carried from one block to the next, if any
    const auto add_run = [&](int32_t run, const Eight<T>* sum) __attribute__((always_inline)) {
        for (int ch = 0; ch < channels; ++ch)
            for (int k = 0; k < 8; ++k) grad_image[ch * l.volume + run + corner[k]] += sum[ch][k];
    };
    for (int64_t start = first; start < last; start += block) {
        const int n = int(std::min<int64_t>(block, last - start));
#pragma omp simd
        for (int i = 0; i < n; ++i) {
            const Axis<T> z = l.axis_of(map, start + i, 0, l.depth), y = l.axis_of(map, start + i, 1, l.height),
                          x = l.axis_of(map, start + i, 2, l.width);
            // corners_of's offset 0, weights and inside flags spelled out: taking them from
            // corners_of here made the scatter 1.35x slower (44^3 field at 175^3 points).
            cell[i] = z.index[0] * l.plane + y.index[0] * l.width + x.index[0];
            simple[i] = z.inside[0] & z.inside[1] & y.inside[0] & y.inside[1] & x.inside[0] & x.inside[1] &
                        (z.index[0] >= lo) & (z.index[1] < hi);
            fraction[0][i] = z.weight[1], fraction[1][i] = y.weight[1], fraction[2][i] = x.weight[1];
        }
        // Runs of points in one cell, each summed in registers (a sum carried from point to point
        // of a run in an array the whole loop shared lived on the stack, every point's
        // multiply-adds waiting on its store and reload: 44^3 field at 175^3 points 24 ms, 20 ms
        // this way), except for the run that reaches the block's end, carried into the next
        // block (so that every voxel's terms are summed as one run at a time, whatever the blocks).
        if (carried_run >= 0 && !(simple[0] && cell[0] == carried_run)) add_run(carried_run, carried), carried_run = -1;
        for (int i = 0; i < n;) {
            if (!simple[i]) {
                const int64_t p = start + i++;
                if (!scatter_point(l, map, grad_out, grad_image, p, lo, hi) && elsewhere) elsewhere->push_back(p);
                continue;
            }
            const int32_t run = cell[i];
            Eight<T> sum[channels];
            for (int ch = 0; ch < channels; ++ch) sum[ch] = carried_run >= 0 ? carried[ch] : Eight<T>{};
            carried_run = -1;
            do {
                if (l.prefetch && i + SCATTER_AHEAD < n && simple[i + SCATTER_AHEAD])  // for writing
                    for (int ch = 0; ch < channels; ++ch)
                        for (int k = 0; k < 8; k += 2)
                            __builtin_prefetch(grad_image + ch * l.volume + cell[i + SCATTER_AHEAD] + corner[k], 1);
                // The 8 weights as Axis gives them (lower neighbour 1 - fraction), w_z * w_y * w_x
                const T fz = fraction[0][i], fy = fraction[1][i], fx = fraction[2][i];
                const T gz = T(1) - fz, gy = T(1) - fy, gx = T(1) - fx;
                const Eight<T> weight = Eight<T>{gz, gz, gz, gz, fz, fz, fz, fz} *
                                        Eight<T>{gy, gy, fy, fy, gy, gy, fy, fy} *
                                        Eight<T>{gx, fx, gx, fx, gx, fx, gx, fx};
                for (int ch = 0; ch < channels; ++ch)
                    sum[ch] += weight * grad_out[ch * out_channel + (start + i) * out_point];
                ++i;
            } while (i < n && simple[i] && cell[i] == run);
            if (i < n) {
                add_run(run, sum);
            } else {
                for (int ch = 0; ch < channels; ++ch) carried[ch] = sum[ch];
                carried_run = run;
            }
        }
    }
    if (carried_run >= 0) add_run(carried_run, carried);
}

// The per-thread bodies: each calls BODY(layout) with g's Layout. The channel count compiled
// for g: 1 or 3, else 0 (any).
inline int static_channels(const Geometry& g) { return g.channels == 1 || g.channels == 3 ? int(g.channels) : 0; }

#define LAYOUT_CASE(C, CL, B, A)                                                                   \
    if (static_channels(g) == C && g.channels_last == CL && g.border == B && g.add_coords == A) {  \
        using L = Layout<T, C, CL, B, A>;                                                           \
        return BODY(L(g));                                                                          \
    }

template <typename T>
INLINE_INTO_CLONES void sample_range_any(const Geometry& g, const T* src, const T* map, T* out, int64_t first,
                                         int64_t last) {
#define BODY(layout) sample_range(layout, src, map, out, first, last)
    FOR_EACH_LAYOUT(LAYOUT_CASE)
#undef BODY
}

template <typename T>
INLINE_INTO_CLONES void map_gradient_range_any(const Geometry& g, const T* src, const T* map, const T* grad_out,
                                               T* grad_map, int64_t first, int64_t last) {
#define BODY(layout) map_gradient_range(layout, src, map, grad_out, grad_map, first, last)
    FOR_EACH_LAYOUT(LAYOUT_CASE)
#undef BODY
}

template <typename T>
INLINE_INTO_CLONES void scatter_range_any(const Geometry& g, const T* map, const T* grad_out, T* grad_image,
                                          const int64_t* listed, int64_t first, int64_t last, int64_t lo,
                                          int64_t hi, std::vector<int64_t>* elsewhere) {
#define BODY(layout) scatter_range(layout, map, grad_out, grad_image, listed, first, last, lo, hi, elsewhere)
    FOR_EACH_LAYOUT(LAYOUT_CASE)
#undef BODY
}
#undef LAYOUT_CASE

#define FORWARD_DISPATCHED(T, ATTRIBUTES)                                                            \
    ATTRIBUTES void sample_points(const Geometry& g, const T* src, const T* map, T* out, int64_t first, \
                                  int64_t last) {                                                        \
        sample_range_any(g, src, map, out, first, last);                                                \
    }
#define BACKWARD_DISPATCHED(T, ATTRIBUTES, SUFFIX)                                                        \
    ATTRIBUTES void map_gradient_points##SUFFIX(const Geometry& g, const T* src, const T* map,           \
                                                const T* grad_out, T* grad_map, int64_t first,           \
                                                int64_t last) {                                           \
        map_gradient_range_any(g, src, map, grad_out, grad_map, first, last);                           \
    }                                                                                                   \
    ATTRIBUTES void scatter_points##SUFFIX(const Geometry& g, const T* map, const T* grad_out,          \
                                           T* grad_image, const int64_t* listed, int64_t first,         \
                                           int64_t last, int64_t lo, int64_t hi,                        \
                                           std::vector<int64_t>* elsewhere) {                           \
        scatter_range_any(g, map, grad_out, grad_image, listed, first, last, lo, hi, elsewhere);        \
    }
// float compiled for AVX-512, AVX2+FMA and baseline x86-64, the best picked at load time; double
// (the tests' gradcheck) for baseline only.
FORWARD_DISPATCHED(float, CPU_DISPATCH)
FORWARD_DISPATCHED(double, )
BACKWARD_DISPATCHED(double, , )

// float's backward: in 512-bit vectors except where the CPU splits them (AMD Zen 4), on which its
// 3-channel gradients took longer than in 256-bit ones (map gradient of a 44^3 field at 175^3
// points 36.6 against 25.7 ms, the field's scatter 44 against 40 ms; 2026-11-30, an older
// kernel). In 512-bit vectors, 2 cores, on IO's own calls: AMD Zen 5 map gradients 20-30% faster,
// scatters 5-15%; Intel Sapphire Rapids map gradient 34 -> 25 ms, scatter 31 -> 28 ms.
BACKWARD_DISPATCHED(float, CPU_DISPATCH_AVX2, _narrow)
#ifdef SIMD_LEVELS
BACKWARD_DISPATCHED(float, SIMD_AVX512, _avx512)
#endif
#undef FORWARD_DISPATCHED
#undef BACKWARD_DISPATCHED

int& forced_backward_bytes() {
    static int bytes = 0;  // 0: no cap
    return bytes;
}

// The vector width of float's backward, in bytes: 64 where simd_bytes() is and the CPU runs
// 512-bit vectors whole, else 32 or 16 (the clone the CPU picks), capped by forced_backward_bytes.
int backward_bytes() {
    const int widest = simd_bytes() == 64 && !splits_512_bit_vectors() ? 64 : std::min(simd_bytes(), 32);
    return forced_backward_bytes() ? std::min(forced_backward_bytes(), widest) : widest;
}

void map_gradient_points(const Geometry& g, const float* src, const float* map, const float* grad_out,
                         float* grad_map, int64_t first, int64_t last) {
#ifdef SIMD_LEVELS
    if (backward_bytes() == 64) return map_gradient_points_avx512(g, src, map, grad_out, grad_map, first, last);
#endif
    Geometry narrow = g;
    narrow.pairs = false;  // map_gradient_pairs is AVX-512
    map_gradient_points_narrow(narrow, src, map, grad_out, grad_map, first, last);
}

void scatter_points(const Geometry& g, const float* map, const float* grad_out, float* grad_image,
                    const int64_t* listed, int64_t first, int64_t last, int64_t lo, int64_t hi,
                    std::vector<int64_t>* elsewhere) {
#ifdef SIMD_LEVELS
    if (backward_bytes() == 64)
        return scatter_points_avx512(g, map, grad_out, grad_image, listed, first, last, lo, hi, elsewhere);
#endif
    scatter_points_narrow(g, map, grad_out, grad_image, listed, first, last, lo, hi, elsewhere);
}

// out (B, C, *coords' grid) = image sampled at coords. border: padding_mode="border",
// otherwise "zeros". A NaN coordinate gives 0. add_coords (a 3-channel image, a displacement
// field): out = coords + the sample, compose_maps in one pass. Each thread takes an equal share
// of the points.
template <typename T>
void warp_forward(const Array<T>& image, const Array<T>& coords, Array<T>& out, bool border, bool add_coords,
                  bool channels_last, int threads) {
    const Geometry g(image, coords, border, channels_last, add_coords);
    g.check_output(out, coords);
    const T* src = image.data();
    const T* map = coords.data();
    T* dst = out.mutable_data();

    py::gil_scoped_release release;
    for (int64_t b = 0; b < g.batch; ++b) {
        const T* map_b = map + (g.coord_batch == 1 ? 0 : b * 3 * g.points);
#pragma omp parallel num_threads(threads)
        {
            int64_t first, last;
            share(g.points, &first, &last);
            sample_points(g, src + b * g.channels * g.volume, map_b, dst + b * g.channels * g.points, first, last);
        }
    }
}

// Gradients of sum(grad_out * out), out as warp_forward's. grad_image (same shape as image) is
// written when need_image, grad_coords (same shape as coords; summed over the batch where
// coords has batch 1) when need_coords; the other may be an empty array.
// grad_coords is a gather, vectorized like the forward. grad_image is a scatter, made
// race-free without a private copy of the image per thread (those cost one image of memory
// per extra thread, 7 x 61 MiB for a 175^3 field on 8 threads, and more time than the scatter
// itself where a full-resolution field is sampled at the regularizer's half-resolution
// points): thread t takes the t-th share of the sample points and owns the t-th share of the
// image's z slices. A registration map stays near the identity, so a thread's points mostly
// land in its own slices: it adds those corners at once and lists the points with a corner
// elsewhere; after a barrier each thread adds, from the other threads' lists, the corners
// that land in its slices. Every voxel is summed in an order fixed by the team size, so the
// result does not depend on scheduling; a map far from the identity only makes the lists longer.
template <typename T>
void warp_backward(const Array<T>& image, const Array<T>& coords, const Array<T>& grad_out, Array<T>& grad_image,
                   Array<T>& grad_coords, bool need_image, bool need_coords, bool border, bool add_coords,
                   bool channels_last, int threads) {
    const Geometry g(image, coords, border, channels_last, add_coords);
    g.check_output(grad_out, coords);
    if (need_image) check(grad_image.ndim() == 5 && grad_image.size() == image.size(), "grad_image must match image");
    if (need_coords) check(grad_coords.ndim() == 5 && grad_coords.size() == coords.size(), "grad_coords must match coords");
    threads = std::max(threads, 1);
    const T* src = image.data();
    const T* map = coords.data();
    const T* gout = grad_out.data();
    T* gimage = need_image ? grad_image.mutable_data() : nullptr;
    T* gmap = need_coords ? grad_coords.mutable_data() : nullptr;
    const int64_t item = g.channels * g.volume;

    py::gil_scoped_release release;
    std::vector<std::vector<int64_t>> elsewhere(threads);  // per thread: its points with a corner in others' slices
    if (need_coords) std::fill(gmap, gmap + grad_coords.size(), T(0));
    for (int64_t b = 0; b < g.batch; ++b) {
        const T* map_b = map + (g.coord_batch == 1 ? 0 : b * 3 * g.points);
        const T* gout_b = gout + b * g.channels * g.points;
#pragma omp parallel num_threads(threads)
        {
            // The team may be smaller than asked (no OpenMP, nested parallelism): the shares
            // are the actual team's.
            const int tid = omp_get_thread_num(), team = omp_get_num_threads();
            int64_t first, last, lo, hi;  // the points, and the z slices the thread owns
            share(g.points, &first, &last);
            share(g.depth, &lo, &hi);
            if (need_coords)
                map_gradient_points(g, src + b * item, map_b, gout_b,
                                    gmap + (g.coord_batch == 1 ? 0 : b * 3 * g.points), first, last);
            if (need_image) {
                T* gimage_b = gimage + b * item;
                for (int64_t ch = 0; ch < g.channels; ++ch)
                    std::fill(gimage_b + ch * g.volume + lo * g.plane, gimage_b + ch * g.volume + hi * g.plane, T(0));
                std::vector<int64_t>& mine = elsewhere[tid];
                mine.clear();
                scatter_points(g, map_b, gout_b, gimage_b, nullptr, first, last, lo, hi, &mine);
                if (team > 1) {
#pragma omp barrier
                    for (int other = 0; other < team; ++other)
                        if (other != tid)
                            scatter_points(g, map_b, gout_b, gimage_b, elsewhere[other].data(), 0,
                                           int64_t(elsewhere[other].size()), lo, hi, nullptr);
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

// A voxel's few skip channels (2 at the finest level): element by element, since std::copy
// called memmove for each voxel (a tenth of upsample_add_concat's samples in perf at 175^3).
template <typename T>
INLINE_INTO_CLONES void copy_skip(const T* from, T* to, int64_t count) {
#pragma GCC novector
    for (int64_t c = 0; c < count; ++c) to[c] = from[c];
}

// Outputs above this size (bytes) are written a row at a time from a buffer with non-temporal
// stores, which skip reading each line before writing it (the read-for-ownership): 32 MiB, the L3
// of the 2-core AMD EPYC measured. Below it the next layer reads the output from the caches.
constexpr int64_t STREAM_ABOVE_BYTES = int64_t(32) << 20;

// bytes from src to dst, dst's whole 64-byte lines with non-temporal stores (SSE2's, in every
// x86-64 build), the partial lines at either end as usual; a caller sfences before others read.
inline void stream_bytes(void* dst, const void* src, size_t bytes) {
    char* to = static_cast<char*>(dst);
    const char* from = static_cast<const char*>(src);
#ifdef SIMD_LEVELS
    const size_t head = std::min(bytes, size_t(-reinterpret_cast<uintptr_t>(to) & 63));
    std::memcpy(to, from, head);
    to += head, from += head, bytes -= head;
    for (; bytes >= 64; to += 64, from += 64, bytes -= 64)
        for (int k = 0; k < 4; ++k)
            _mm_stream_si128(reinterpret_cast<__m128i*>(to + 16 * k),
                             _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + 16 * k)));
#endif
    std::memcpy(to, from, bytes);
}

// upsample_row prefetches each voxel of the transposed convolution's output this many voxels
// ahead: the hardware's prefetchers left it waiting on memory (48 -> 16 at 175^3, 2 threads,
// upsample_add_concat 31.6 -> 23.3 ms, 21.3 with the streamed rows too; 64 to 256 voxels ahead
// the same). norm_concat, which streams as much, ran at the machine's bandwidth without either.
constexpr int64_t PREFETCH_VOXELS = 128;

template <typename T>
INLINE_INTO_CLONES void prefetch_voxel(const T* voxel, int64_t channels) {
    for (int64_t c = 0; c < channels; c += 64 / int64_t(sizeof(T))) __builtin_prefetch(voxel + c);
}

// One output row (z, y) of a 2x linear upsampling, channels last: its four source rows (the z
// and y taps) blended with their weights into one row of the coarse grid, blended[k, c] =
// sum_i weight[i] * source[i][k * in_channels + c] for the `width` voxels k and c < channels
// (C: channels known at compile time, 0 for any).
template <typename T, int C>
INLINE_INTO_CLONES void blend_rows_body(const T* const* source, const T* weight, T* blended, int64_t width,
                                        int64_t in_channels, int64_t channel_count) {
    const int64_t channels = C ? C : channel_count;
    for (int64_t k = 0; k < width; ++k) {
        const T *s0 = source[0] + k * in_channels, *s1 = source[1] + k * in_channels;
        const T *s2 = source[2] + k * in_channels, *s3 = source[3] + k * in_channels;
        T* out = blended + k * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c)
            out[c] = weight[0] * s0[c] + weight[1] * s1[c] + weight[2] * s2[c] + weight[3] * s3[c];
    }
}

// That row's x taps, multiply-add and concatenation: for the `width` output voxels x,
// out[x, :C] = conv[x, :] + scale * (w_lo[x] * blended[lo[x], :] + w_hi[x] * blended[hi[x], :]),
// out[x, C:] = skip[x, :].
template <typename T, int C>
INLINE_INTO_CLONES void upsample_row_body(const T* blended, const int64_t* lo, const int64_t* hi, const T* w_lo,
                                          const T* w_hi, const T* conv, const T* scale, const T* skip, T* out,
                                          int64_t width, int64_t channel_count, int64_t skip_channels) {
    const int64_t channels = C ? C : channel_count;
    const int64_t out_channels = channels + skip_channels;
    for (int64_t x = 0; x < width; ++x) {
        prefetch_voxel(conv + (x + PREFETCH_VOXELS) * channels, channels);
        const T *a = blended + lo[x] * channels, *b = blended + hi[x] * channels, *in = conv + x * channels;
        const T wa = w_lo[x], wb = w_hi[x];
        T* o = out + x * out_channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) o[c] = in[c] + scale[c] * (wa * a[c] + wb * b[c]);
        copy_skip(skip + x * skip_channels, o + channels, skip_channels);
    }
}

// The two row passes, dispatched by CPU and by channel count: with the decoder's finest levels'
// 16 and 32 channels known at compile time, a voxel's channels are one or two vectors without a
// loop around them (the runtime loop's setup per voxel cost as much as its arithmetic).
#define BY_CHANNELS(T, channels, body, args)               \
    switch (channels) {                                    \
        case 16: return body<T, 16> args;                  \
        case 32: return body<T, 32> args;                  \
        default: return body<T, 0> args;                   \
    }
#define UPSAMPLE_DISPATCHED(T)                                                                                  \
    CPU_DISPATCH void blend_rows(const T* const* source, const T* weight, T* blended, int64_t width,            \
                                 int64_t in_channels, int64_t channels) {                                      \
        BY_CHANNELS(T, channels, blend_rows_body, (source, weight, blended, width, in_channels, channels))       \
    }                                                                                                           \
    CPU_DISPATCH void upsample_row(const T* blended, const int64_t* lo, const int64_t* hi, const T* w_lo,       \
                                   const T* w_hi, const T* conv, const T* scale, const T* skip, T* out,         \
                                   int64_t width, int64_t channels, int64_t skip_channels) {                    \
        BY_CHANNELS(T, channels, upsample_row_body,                                                                \
                    (blended, lo, hi, w_lo, w_hi, conv, scale, skip, out, width, channels, skip_channels))      \
    }
UPSAMPLE_DISPATCHED(float)
UPSAMPLE_DISPATCHED(double)
#undef UPSAMPLE_DISPATCHED
#undef BY_CHANNELS

// A U-Net decoder level's inference epilogue in one pass over channels-last arrays:
//   out[b, z, y, x, :C]  = y_conv[b, z, y, x, :] + scale * upsample2x(x_in)[b, z, y, x, :C]
//   out[b, z, y, x, C:]  = skip[b, z, y, x, :]
// over skip's grid (the upsampled sum cropped to it), i.e. torch.cat([(y + scale * F.interpolate(
// x_in[:, :C], scale_factor=2, mode="trilinear")) cropped, skip], 1). Arrays: x_in (B, d, h, w, Cx)
// with Cx >= C, y_conv (B, 2d, 2h, 2w, C), scale (C), skip (B, D, H, W, Cs), out (B, D, H, W, C + Cs),
// D <= 2d etc. Why: torch's CPU upsampling, the multiply-add and the concatenation were three
// passes over the largest tensors of the forward (about a quarter of it at 175^3). Each output
// row blends its four source rows once (blend_rows), then takes the x taps (upsample_row): 8
// multiply-adds per output value read lane by lane in the baseline build took 59 ms at 16 x 176^3
// from 48 x 88^3 (2 cores, AMD EPYC), about four times a pass over the output.
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
    std::vector<int64_t> x_lo(grid[2]), x_hi(grid[2]);  // every row's x taps
    std::vector<T> x_w_lo(grid[2]), x_w_hi(grid[2]);
    for (int64_t x = 0; x < grid[2]; ++x) {
        const Taps<T> tx(x, n[2]);
        x_lo[x] = tx.lo, x_hi[x] = tx.hi, x_w_lo[x] = tx.w_lo, x_w_hi[x] = tx.w_hi;
    }

    py::gil_scoped_release release;
    const bool streamed = int64_t(out.size() * sizeof(T)) > STREAM_ABOVE_BYTES;
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> blended(n[2] * channels), buffer(streamed ? grid[2] * out_channels : 0);
#pragma omp for schedule(static)
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
            blend_rows(source, weight, blended.data(), n[2], in_channels, channels);
            T* const place = dst + row * grid[2] * out_channels;
            upsample_row(blended.data(), x_lo.data(), x_hi.data(), x_w_lo.data(), x_w_hi.data(),
                         conv + ((b * 2 * n[0] + z) * 2 * n[1] + y) * 2 * n[2] * channels, factor,
                         extra + row * grid[2] * skip_channels, streamed ? buffer.data() : place, grid[2], channels,
                         skip_channels);
            if (streamed) stream_bytes(place, buffer.data(), buffer.size() * sizeof(T));
        }
#ifdef SIMD_LEVELS
        if (streamed) _mm_sfence();  // the streamed rows before the team's barrier
#endif
    }
}

// The adjoint of upsample2x on channels-last arrays: grad_x[b, i, j, k, c] = sum over the fine
// voxels o of weight(o -> i, j, k) * grad[b, o, c] for c < C (grad's channels), 0 for the
// channels of grad_x beyond (Cx >= C: the upsampling reads x's first C only). Arrays: grad
// (B, 2d, 2h, 2w, C), grad_x (B, d, h, w, Cx). Per coarse row (b, i, j): its up to 4 x 4 fine
// rows summed with their z, y weights into one fine row, then its x taps. Why: torch's
// upsampling backward took 100 ms at 16 x 176^3 (2 cores), several times a pass over grad.
template <typename T>
INLINE_INTO_CLONES void upsample2x_backward_row_body(const T* src, T* summed, T* out_row, int64_t b, int64_t i,
                                                     int64_t j, const int64_t* n, int64_t channels,
                                                     int64_t x_channels) {
    const int64_t fine_row = 2 * n[2] * channels;
    std::fill(summed, summed + fine_row, T(0));
    for (int64_t oz = Taps<T>::first_reader(i); oz <= Taps<T>::last_reader(i, n[0]); ++oz) {
        const T wz = Taps<T>(oz, n[0]).weight_of(i);
        for (int64_t oy = Taps<T>::first_reader(j); oy <= Taps<T>::last_reader(j, n[1]); ++oy) {
            const T w = wz * Taps<T>(oy, n[1]).weight_of(j);
            if (w == T(0)) continue;
            const T* in = src + ((b * 2 * n[0] + oz) * 2 * n[1] + oy) * fine_row;
#pragma omp simd
            for (int64_t e = 0; e < fine_row; ++e) summed[e] += w * in[e];
        }
    }
    for (int64_t k = 0; k < n[2]; ++k) {
        T* out = out_row + k * x_channels;
        std::fill(out, out + x_channels, T(0));
        for (int64_t ox = Taps<T>::first_reader(k); ox <= Taps<T>::last_reader(k, n[2]); ++ox) {
            const T w = Taps<T>(ox, n[2]).weight_of(k);
            const T* in = summed + ox * channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) out[c] += w * in[c];
        }
    }
}

#define UPSAMPLE_BACKWARD_DISPATCHED(T)                                                                         \
    CPU_DISPATCH void upsample2x_backward_row(const T* src, T* summed, T* out_row, int64_t b, int64_t i,        \
                                              int64_t j, const int64_t* n, int64_t channels,                    \
                                              int64_t x_channels) {                                             \
        upsample2x_backward_row_body(src, summed, out_row, b, i, j, n, channels, x_channels);                  \
    }
UPSAMPLE_BACKWARD_DISPATCHED(float)
UPSAMPLE_BACKWARD_DISPATCHED(double)
#undef UPSAMPLE_BACKWARD_DISPATCHED

template <typename T>
void upsample2x_backward(const Array<T>& grad, Array<T>& grad_x, int threads) {
    check(grad.ndim() == 5 && grad_x.ndim() == 5, "grad and grad_x must be 5-D (channels last)");
    const int64_t batch = grad.shape(0), channels = grad.shape(4), x_channels = grad_x.shape(4);
    const int64_t n[3] = {grad_x.shape(1), grad_x.shape(2), grad_x.shape(3)};
    check(grad_x.shape(0) == batch && x_channels >= channels, "grad_x needs grad's batch and at least its channels");
    for (int a = 0; a < 3; ++a) check(grad.shape(a + 1) == 2 * n[a], "grad's grid must be twice grad_x's");
    const T* src = grad.data();
    T* dst = grad_x.mutable_data();
    const int64_t rows = batch * n[0] * n[1];

    py::gil_scoped_release release;
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> summed(2 * n[2] * channels);
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; ++row)
            upsample2x_backward_row(src, summed.data(), dst + row * n[2] * x_channels, row / (n[0] * n[1]),
                                    (row / n[1]) % n[0], row % n[1], n, channels, x_channels);
    }
}

// IO's decoder level output through an eval-mode BatchNorm, channels last, one row of skip's grid:
//   out[v, :C] = fma(x_in[v, :], alpha, beta), out[v, C:] = skip[v, :]
// for the row's `width` voxels v (x_in's row cropped to skip's). One fused multiply-add, as
// torch's eval-mode BatchNorm kernel and addcmul compute it: the same bits, which the IO tests
// against the reference need (Adam's first steps amplify any rounding difference).
template <typename T>
INLINE_INTO_CLONES void norm_concat_row_body(const T* x_row, const T* skip_row, const T* alpha, const T* beta,
                                             T* out_row, int64_t width, int64_t channels, int64_t skip_channels) {
    const int64_t out_channels = channels + skip_channels;
    for (int64_t v = 0; v < width; ++v) {
        const T* in = x_row + v * channels;
        T* out = out_row + v * out_channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) out[c] = std::fma(in[c], alpha[c], beta[c]);
        copy_skip(skip_row + v * skip_channels, out + channels, skip_channels);
    }
}

// Its backward over one row of x_in's grid (`x_width` voxels, of which skip's grid keeps the
// first `width`; width 0 for a row the crop cut): grad_x[v] = grad[v, :C] * scale, 0 where cut
// (grad_x null: not asked); grad_skip[v] = grad[v, C:] (null: not asked); sums[c] += grad[v, c]
// and sums[C + c] += grad[v, c] * (x_in[v, c] - mean[c]), in double (sums null: not asked).
template <typename T>
INLINE_INTO_CLONES void norm_concat_backward_row_body(const T* grad_row, const T* x_row, const T* scale,
                                                      const double* mean, T* grad_x_row, T* grad_skip_row,
                                                      double* sums, int64_t width, int64_t x_width,
                                                      int64_t channels, int64_t skip_channels) {
    const int64_t grad_channels = channels + skip_channels;
    for (int64_t v = 0; v < width; ++v) {
        const T* g = grad_row + v * grad_channels;
        if (grad_x_row) {
            T* out = grad_x_row + v * channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) out[c] = g[c] * scale[c];
        }
        if (grad_skip_row) std::copy(g + channels, g + grad_channels, grad_skip_row + v * skip_channels);
        if (sums) {
            const T* in = x_row + v * channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) {
                sums[c] += double(g[c]);
                sums[channels + c] += double(g[c]) * (double(in[c]) - mean[c]);
            }
        }
    }
    if (grad_x_row) std::fill(grad_x_row + width * channels, grad_x_row + x_width * channels, T(0));
}

#define NORM_CONCAT_DISPATCHED(T)                                                                               \
    CPU_DISPATCH void norm_concat_row(const T* x_row, const T* skip_row, const T* alpha, const T* beta,         \
                                      T* out_row, int64_t width, int64_t channels, int64_t skip_channels) {     \
        norm_concat_row_body(x_row, skip_row, alpha, beta, out_row, width, channels, skip_channels);          \
    }                                                                                                           \
    CPU_DISPATCH void norm_concat_backward_row(const T* grad_row, const T* x_row, const T* scale,               \
                                               const double* mean, T* grad_x_row, T* grad_skip_row,             \
                                               double* sums, int64_t width, int64_t x_width, int64_t channels,  \
                                               int64_t skip_channels) {                                         \
        norm_concat_backward_row_body(grad_row, x_row, scale, mean, grad_x_row, grad_skip_row, sums, width,   \
                                      x_width, channels, skip_channels);                                        \
    }
NORM_CONCAT_DISPATCHED(float)
NORM_CONCAT_DISPATCHED(double)
#undef NORM_CONCAT_DISPATCHED

// Checks the grids of norm_concat's arrays: x_in (B, d, h, w, C), skip (B, D, H, W, Cs) with
// D <= d, H <= h, W <= w, and `other` (out, or grad) (B, D, H, W, C + Cs).
template <typename T>
void check_norm_concat(const Array<T>& x_in, const Array<T>& skip, const Array<T>& other, const char* other_name) {
    check(x_in.ndim() == 5 && skip.ndim() == 5 && other.ndim() == 5, "x_in, skip, out and grad must be 5-D (channels last)");
    check(skip.shape(0) == x_in.shape(0) && other.shape(0) == x_in.shape(0), "batch sizes differ");
    check(other.shape(4) == x_in.shape(4) + skip.shape(4), other_name);
    for (int a = 1; a < 4; ++a)
        check(skip.shape(a) <= x_in.shape(a) && other.shape(a) == skip.shape(a),
              "skip's grid must fit x_in's, and out's or grad's be skip's");
}

// out (B, D, H, W, C + Cs) = cat(fma(x_in, alpha, beta) cropped to skip's grid, skip), channels
// last: torch.cat([F.batch_norm(x, running_mean, running_var, weight, bias, False, 0, eps)[crop],
// skip], 1) with alpha = weight * rsqrt(running_var + eps) and beta what a zero input gives. Why:
// addcmul into the concatenation and the skip's copy wrote the output in two strided passes.
template <typename T>
void norm_concat(const Array<T>& x_in, const Array<T>& alpha, const Array<T>& beta, const Array<T>& skip,
                 Array<T>& out, int threads) {
    check_norm_concat(x_in, skip, out, "out needs x_in's channels plus skip's");
    const int64_t channels = x_in.shape(4), skip_channels = skip.shape(4);
    check(alpha.ndim() == 1 && beta.ndim() == 1 && alpha.shape(0) == channels && beta.shape(0) == channels,
          "alpha and beta need one value per channel of x_in");
    const int64_t n[3] = {x_in.shape(1), x_in.shape(2), x_in.shape(3)};
    const int64_t grid[3] = {skip.shape(1), skip.shape(2), skip.shape(3)};
    const int64_t rows = skip.shape(0) * grid[0] * grid[1];
    const T* src = x_in.data();
    const T* extra = skip.data();
    const T* a = alpha.data();
    const T* b = beta.data();
    T* dst = out.mutable_data();

    py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < rows; ++row) {
        const int64_t batch = row / (grid[0] * grid[1]), z = (row / grid[1]) % grid[0], y = row % grid[1];
        norm_concat_row(src + ((batch * n[0] + z) * n[1] + y) * n[2] * channels, extra + row * grid[2] * skip_channels,
                        a, b, dst + row * grid[2] * (channels + skip_channels), grid[2], channels, skip_channels);
    }
}

// norm_concat's backward from grad (B, D, H, W, C + Cs), channels last: grad_x (x_in's shape) =
// grad[..., :C] * scale on skip's grid, 0 beyond it; grad_skip (skip's shape) = grad[..., C:];
// sums (2, C), float64: the sums over samples and voxels of grad[..., :C] and of grad[..., :C] *
// (x_in - mean), for BatchNorm's bias and weight gradients. Each is written where need_*, the
// others may be empty arrays. The sums are taken per thread in double over its share of rows,
// then added in thread order: the same for a given thread count. Why: the crop's gradient,
// torch's BatchNorm backward and the input gradient in place were four passes (119 ms at 16 + 2
// channels, 175^3, 2 cores).
template <typename T>
void norm_concat_backward(const Array<T>& grad, const Array<T>& x_in, const Array<T>& scale,
                          const Array<double>& mean, Array<T>& grad_x, Array<T>& grad_skip, Array<double>& sums,
                          bool need_x, bool need_skip, bool need_sums, int threads) {
    check(grad.ndim() == 5 && x_in.ndim() == 5 && grad.shape(0) == x_in.shape(0) && grad.shape(4) >= x_in.shape(4),
          "grad and x_in must be 5-D (channels last), grad with x_in's batch and at least its channels");
    const int64_t channels = x_in.shape(4), skip_channels = grad.shape(4) - channels;
    const int64_t n[3] = {x_in.shape(1), x_in.shape(2), x_in.shape(3)};
    const int64_t grid[3] = {grad.shape(1), grad.shape(2), grad.shape(3)};
    for (int a = 0; a < 3; ++a) check(grid[a] <= n[a], "grad's grid must fit x_in's");
    check(scale.ndim() == 1 && mean.ndim() == 1 && scale.shape(0) == channels && mean.shape(0) == channels,
          "scale and mean need one value per channel of x_in");
    if (need_x) check(grad_x.ndim() == 5 && grad_x.size() == x_in.size(), "grad_x must match x_in");
    if (need_skip)
        check(grad_skip.ndim() == 5 && grad_skip.size() == grad.shape(0) * grid[0] * grid[1] * grid[2] * skip_channels,
              "grad_skip must hold skip's grid and grad's channels beyond x_in's");
    if (need_sums) check(sums.ndim() == 2 && sums.shape(0) == 2 && sums.shape(1) == channels, "sums must be (2, C)");
    threads = std::max(threads, 1);
    const int64_t rows = x_in.shape(0) * n[0] * n[1];
    const T* g = grad.data();
    const T* x = x_in.data();
    const T* factor = scale.data();
    const double* centre = mean.data();
    T* gx = need_x ? grad_x.mutable_data() : nullptr;
    T* gs = need_skip ? grad_skip.mutable_data() : nullptr;
    std::vector<std::vector<double>> partial(threads, std::vector<double>(need_sums ? 2 * channels : 0, 0.0));

    {
        py::gil_scoped_release release;
#pragma omp parallel num_threads(threads)
        {
            double* mine = need_sums ? partial[omp_get_thread_num()].data() : nullptr;
#pragma omp for schedule(static)
            for (int64_t row = 0; row < rows; ++row) {
                const int64_t batch = row / (n[0] * n[1]), z = (row / n[1]) % n[0], y = row % n[1];
                const bool kept = z < grid[0] && y < grid[1];
                const int64_t grad_row = kept ? (batch * grid[0] + z) * grid[1] + y : 0;
                norm_concat_backward_row(g + grad_row * grid[2] * (channels + skip_channels),
                                         x + row * n[2] * channels, factor, centre,
                                         gx ? gx + row * n[2] * channels : nullptr,
                                         gs && kept ? gs + grad_row * grid[2] * skip_channels : nullptr, mine,
                                         kept ? grid[2] : 0, n[2], channels, skip_channels);
            }
        }
    }
    if (need_sums) {
        double* total = sums.mutable_data();
        std::fill(total, total + 2 * channels, 0.0);
        for (const std::vector<double>& p : partial)
            for (int64_t k = 0; k < 2 * channels; ++k) total[k] += p[k];
    }
}

template <typename T>
void define(py::module_& module) {
    // noconvert: a silent dtype/contiguity copy of an output array would drop the result.
    module.def("warp_trilinear", &warp_forward<T>, py::arg("image").noconvert(), py::arg("coords").noconvert(),
               py::arg("out").noconvert(), py::arg("border"), py::arg("add_coords"), py::arg("channels_last"),
               py::arg("threads"),
               "Sample image (B, C, D, H, W) trilinearly at coords (B or 1, 3, ...) in [0, 1] into out (plus coords "
               "with add_coords); with channels_last, coords and out are passed as (N, ..., 3) and (B, ..., C).");
    module.def("warp_trilinear_backward", &warp_backward<T>, py::arg("image").noconvert(),
               py::arg("coords").noconvert(), py::arg("grad_out").noconvert(), py::arg("grad_image").noconvert(),
               py::arg("grad_coords").noconvert(), py::arg("need_image"), py::arg("need_coords"),
               py::arg("border"), py::arg("add_coords"), py::arg("channels_last"), py::arg("threads"),
               "Gradients of the warp with respect to image and coords, written into grad_image and grad_coords.");
    module.def("upsample_add_concat", &upsample_add_concat<T>, py::arg("x_in").noconvert(),
               py::arg("y_conv").noconvert(), py::arg("scale").noconvert(), py::arg("skip").noconvert(),
               py::arg("out").noconvert(), py::arg("threads"),
               "A U-Net decoder level's inference epilogue, channels last: cat((y_conv + scale * "
               "upsample2x(x_in[..., :C])) cropped to skip's grid, skip).");
    module.def("norm_concat", &norm_concat<T>, py::arg("x_in").noconvert(), py::arg("alpha").noconvert(),
               py::arg("beta").noconvert(), py::arg("skip").noconvert(), py::arg("out").noconvert(),
               py::arg("threads"),
               "IO's decoder level output through an eval-mode BatchNorm, channels last: cat(fma(x_in, alpha, beta) "
               "cropped to skip's grid, skip) into out.");
    module.def("norm_concat_backward", &norm_concat_backward<T>, py::arg("grad").noconvert(),
               py::arg("x_in").noconvert(), py::arg("scale").noconvert(), py::arg("mean").noconvert(),
               py::arg("grad_x").noconvert(), py::arg("grad_skip").noconvert(), py::arg("sums").noconvert(),
               py::arg("need_x"), py::arg("need_skip"), py::arg("need_sums"), py::arg("threads"),
               "norm_concat's backward: grad_x = grad[..., :C] * scale (0 beyond the crop), grad_skip = "
               "grad[..., C:], sums (2, C) of grad[..., :C] and of grad[..., :C] * (x_in - mean), in float64.");
    module.def("upsample2x_backward", &upsample2x_backward<T>, py::arg("grad").noconvert(),
               py::arg("grad_x").noconvert(), py::arg("threads"),
               "The adjoint of trilinear 2x upsampling (align_corners=False), channels last: grad (B, 2d, 2h, 2w, C) "
               "into grad_x (B, d, h, w, Cx >= C), its channels beyond C set to 0.");
}

}  // namespace

PYBIND11_MODULE(_trilinear_cpu, module) {
    module.doc() = "Trilinear warp on the CPU with OpenMP, forward and backward (mgr_engine.kernels.warp_cpu), "
                   "and the U-Net decoder's upsample-add-concatenate and BatchNorm-concatenate "
                   "(mgr_engine.kernels.decoder_cpu)";
    define<float>(module);
    define<double>(module);
    define_prefetch_above_bytes(module, prefetch_above_bytes, "the warp prefetches its sample points' corners");
    define_corner_pairs(module, "the float forward, and the map's gradient in the AVX-512 backward,");
    module.def(
        "backward_simd_bytes",
        [](int cap) {
            check(cap == -1 || cap == 0 || cap == 32 || cap == 64, "cap must be 32, 64 or 0");
            if (cap >= 0) forced_backward_bytes() = cap;
            return backward_bytes();
        },
        py::arg("cap") = -1,
        "The vector width in bytes the float backward runs in: 64 (AVX-512, where the CPU runs 512-bit "
        "vectors whole), 32 (AVX2+FMA) or 16. cap: 32 or 64 caps it there from now on (so that tests run "
        "both widths on one CPU), 0 lifts the cap.");
}
