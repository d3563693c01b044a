// A transform at every voxel of the fixed image: the moving image resampled onto the fixed grid,
// or the dense displacement field. Built by setup.py as mgr_engine._resample_cpu;
// mgr_engine.kernels.resample_cpu wraps it.
//
// The transform is ITK's composite of an affine, a displacement field on a grid and an affine:
// the result's transform (a network map), or one read from a file of that form. Why: ITK
// evaluates it point by point through virtual calls (262-333 ms at 160x192x160 on a 2-core AMD
// EPYC), and the same arithmetic as whole-volume float64 tensor operations (mgr_engine.resample's
// PyTorch path) makes a dozen passes over 118 MB temporaries (1.1-1.5 s). Here a row of fixed
// voxels goes through one loop: its grid positions, the displacement there, the moving points
// (vectorized with AVX2 / AVX-512 gathers; with AVX-512 the displacement's corners are read in
// pairs, moved_row); then the image is sampled at them (a second loop, which GCC does not
// vectorize: with AVX-512 it is written in intrinsics, sample_image_vectors). In double, as ITK
// computes.
//
// ITK's rules: a continuous index is inside an image when it lies in [-0.5, n - 0.5) on every
// axis; linear interpolation clamps its corners into the image (and the image's interpolator
// takes ITK's order of operations, see interpolate_like_itk); nearest neighbour rounds halves
// up. Outside the field's grid the transform adds no displacement; outside the image the value is 0.

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_kernel.h"  // Array, check, CPU_DISPATCH, INLINE_INTO_CLONES, corner_pairs
#ifdef SIMD_LEVELS
#include <immintrin.h>
#endif

namespace {

// Points are three scalars, not arrays: GCC vectorizes the point loops over scalars only.
struct Point {
    double x, y, z;
};

// Affines are (3, 4) row-major [matrix | offset] in ITK's (x, y, z) order.
struct Affine {
    double m[3][4];
    explicit Affine(const Array<double>& a) {
        check(a.ndim() == 2 && a.shape(0) == 3 && a.shape(1) == 4, "an affine is a (3, 4) array");
        for (int r = 0; r < 3; ++r)
            for (int c = 0; c < 4; ++c) m[r][c] = a.at(r, c);
    }
    INLINE_INTO_CLONES Point operator()(Point p) const {
        return {m[0][0] * p.x + m[0][1] * p.y + m[0][2] * p.z + m[0][3], m[1][0] * p.x + m[1][1] * p.y + m[1][2] * p.z + m[1][3],
                m[2][0] * p.x + m[2][1] * p.y + m[2][2] * p.z + m[2][3]};
    }
    // The column of x: how a point moves along a row of voxels.
    Point x_step() const { return {m[0][0], m[1][0], m[2][0]}; }
};

INLINE_INTO_CLONES Point along_row(Point start, Point step, int64_t x) {
    return {start.x + step.x * double(x), start.y + step.y * double(x), start.z + step.z * double(x)};
}

// Sizes and offsets are 32-bit (volumes of fewer than 2^31 voxels, checked): AVX2 converts
// doubles to 32-bit integers only, and without that conversion the point loops do not vectorize.
struct Grid {
    int32_t nx, ny, nz;
    Grid(int64_t z, int64_t y, int64_t x) : nx(int32_t(x)), ny(int32_t(y)), nz(int32_t(z)) {
        check(z * y * x < (int64_t(1) << 31), "a volume of 2^31 voxels or more");
    }
    // ITK's rule: inside when within half a voxel of the outermost voxel centres.
    INLINE_INTO_CLONES bool contains(Point c) const {
        return (c.x >= -0.5) & (c.x < nx - 0.5) & (c.y >= -0.5) & (c.y < ny - 0.5) & (c.z >= -0.5) & (c.z < nz - 0.5);
    }
};

// A continuous index clamped into [0, n - 1]; NaN (a NaN displacement: outside the image, 0,
// as ITK has it) to 0, so that the value computed and then discarded reads voxel 0, not memory
// 2^31 voxels away (a segmentation fault before). Ternaries, not std::min / std::max: those are
// not always inlined into the target clones, and a call stops the point loops vectorizing.
INLINE_INTO_CLONES double clamp_index(double c, int32_t n) {
    const double high = double(n - 1);
    return c >= 0.0 ? (c > high ? high : c) : 0.0;
}

// Lower corner and weight of the upper one along an axis, the corners clamped into [0, n - 1];
// an axis of one voxel has one corner. For the displacement's weighted sum (Stencil): at the last voxel
// it takes the one before with weight 0, so the step is the grid's, the same for every point of
// the vectorized point loops. The image's interpolation takes itk_axis_corner instead.
INLINE_INTO_CLONES void axis_corner(double c, int32_t n, int32_t& lower, int32_t& step, double& fraction) {
    const double clamped = clamp_index(c, n);
    const int32_t last_lower = n > 1 ? n - 2 : 0, floor = int32_t(clamped);
    lower = floor < last_lower ? floor : last_lower;
    step = n > 1 ? 1 : 0;
    fraction = clamped - double(lower);
}

// ITK's LinearInterpolateImageFunction's corners along an axis: the lower one at the clamped
// index's floor, the upper one next to it unless the lower one is the last voxel (then the
// fraction is 0 too, and a + (b - a) * t gives that voxel exactly, as ITK does; axis_corner's
// t = 1 from the voxel before would not for every float value).
INLINE_INTO_CLONES void itk_axis_corner(double c, int32_t n, int32_t& lower, int32_t& step, double& fraction) {
    const double clamped = clamp_index(c, n);
    lower = int32_t(clamped);
    step = lower < n - 1 ? 1 : 0;
    fraction = clamped - double(lower);
}

// The trilinear cell of a continuous index in a grid of three interleaved components (the
// displacement field): the offset of its lower corner and the steps to the next corner along x,
// y and z, counted in components, and the weights of the upper corners along each axis.
struct Cell {
    int32_t offset, step_x, step_y, step_z;
    double fx, fy, fz;
    INLINE_INTO_CLONES Cell(Point c, const Grid& g) {
        int32_t x0, y0, z0, dx, dy, dz;
        axis_corner(c.x, g.nx, x0, dx, fx);
        axis_corner(c.y, g.ny, y0, dy, fy);
        axis_corner(c.z, g.nz, z0, dz, fz);
        offset = 3 * ((z0 * g.ny + y0) * g.nx + x0);
        step_x = 3 * dx, step_y = 3 * dy * g.nx, step_z = 3 * dz * g.ny * g.nx;
    }
};

// A cell's 8 corners' offsets and weights (corner k: bit 0 along x, 1 along y, 2 along z).
struct Stencil {
    int32_t offset[8];
    double weight[8];
    INLINE_INTO_CLONES Stencil(Point c, const Grid& g) {
        const Cell cell(c, g);
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) {
            const int bx = k & 1, by = (k >> 1) & 1, bz = (k >> 2) & 1;
            offset[k] = cell.offset + bz * cell.step_z + by * cell.step_y + bx * cell.step_x;
            weight[k] =
                (bx ? cell.fx : 1.0 - cell.fx) * (by ? cell.fy : 1.0 - cell.fy) * (bz ? cell.fz : 1.0 - cell.fz);
        }
    }
    INLINE_INTO_CLONES double sample(const double* component) const {
        double value = 0.0;
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) value += weight[k] * component[offset[k]];
        return value;
    }
};

// An image at a continuous index as ITK's LinearInterpolateImageFunction computes it: the
// corners clamped into the image (an axis at its last voxel, or before its first, takes one
// corner), then interpolated along x, then y, then z, each step as a + (b - a) * t. Between equal
// voxels the value comes out exact; the weighted sum of eight corners (Stencil) lands a rounding
// below it as often as not, and an integer image's truncation then takes 1 off (measured: 17% of
// the voxels of a CT-like image with flat regions, against ITK).
template <typename T>
INLINE_INTO_CLONES double interpolate_like_itk(Point c, const Grid& g, const T* v) {
    int32_t x0, y0, z0, dx, dy, dz;
    double fx, fy, fz;
    itk_axis_corner(c.x, g.nx, x0, dx, fx);
    itk_axis_corner(c.y, g.ny, y0, dy, fy);
    itk_axis_corner(c.z, g.nz, z0, dz, fz);
    const int32_t o = (z0 * g.ny + y0) * g.nx + x0, ox = dx, oy = dy * g.nx, oz = dz * g.ny * g.nx;
    const double v000 = double(v[o]), v100 = double(v[o + ox]), v010 = double(v[o + oy]), v110 = double(v[o + oy + ox]);
    const double v001 = double(v[o + oz]), v101 = double(v[o + oz + ox]), v011 = double(v[o + oz + oy]),
                 v111 = double(v[o + oz + oy + ox]);
    const double x00 = v000 + (v100 - v000) * fx, x10 = v010 + (v110 - v010) * fx;
    const double x01 = v001 + (v101 - v001) * fx, x11 = v011 + (v111 - v011) * fx;
    const double xx0 = x00 + (x10 - x00) * fy, xx1 = x01 + (x11 - x01) * fy;
    return xx0 + (xx1 - xx0) * fz;
}

// The grid index a point lands on: its own grid index q plus the displacement at q (grid
// voxels, trilinear with the corners clamped into the grid), none where q is outside the grid.
// The displacement is a (D, H, W, 3) array of (x, y, z) components, as ITK's displacement field
// image holds it: for the result's map, (phi - identity) * (n - 1) per axis.
struct GridDisplacement {
    const double* field;
    Grid grid;
    explicit GridDisplacement(const Array<double>& displacement)
        : field(displacement.data()),
          grid(displacement.ndim() == 4 ? displacement.shape(0) : 0, displacement.ndim() == 4 ? displacement.shape(1) : 0,
               displacement.ndim() == 4 ? displacement.shape(2) : 0) {
        check(displacement.ndim() == 4 && displacement.shape(3) == 3, "the displacement is a (D, H, W, 3) array");
        check(displacement.size() < (int64_t(1) << 31), "a displacement of 2^31 components or more");
    }
    INLINE_INTO_CLONES Point moved(Point q) const {
        const Stencil s(q, grid);
        const double keep = grid.contains(q) ? 1.0 : 0.0;
        return {q.x + keep * s.sample(field), q.y + keep * s.sample(field + 1), q.z + keep * s.sample(field + 2)};
    }
    // Whether moved_row's pair loads read this displacement (a grid one voxel wide has no pairs).
    bool pairs() const { return corner_pairs() && grid.nx > 1; }
};

// The moved grid points of a row of fixed voxels, GridDisplacement::moved at along_row(start,
// step, x) for x < nx, written to moved_x, moved_y, moved_z. Its gathers took most of the row's
// time: 24 of 8 doubles per 8 points. The two corners along x of a stencil are adjacent voxels of
// the (x, y, z)-interleaved field, 6 doubles in a row, so one masked load reads both; 8 points'
// loads are transposed into the gathers' vectors, then summed in Stencil::sample's order and fused
// multiply-adds (the same bits, tested). Written in AVX-512: GCC vectorizes no such load.
constexpr int MOVED_BLOCK = 64;

#ifdef SIMD_LEVELS
// The 6 doubles at rows[j] (j = 0..7), as 6 vectors over j: value v of j in lane j of out[v].
SIMD_AVX512 inline __attribute__((always_inline)) void load_corner_pairs(const double* field, const int32_t* rows,
                                                                        __m512d out[6]) {
    __m512d r[8];
    for (int j = 0; j < 8; ++j) r[j] = _mm512_maskz_loadu_pd(0x3f, field + rows[j]);
    // an 8 x 8 transpose of which the first 6 columns are kept
    __m512d t[8], u[8];
    for (int j = 0; j < 8; j += 2)
        t[j] = _mm512_unpacklo_pd(r[j], r[j + 1]), t[j + 1] = _mm512_unpackhi_pd(r[j], r[j + 1]);
    for (int j = 0; j < 8; j += 4)
        for (int h = 0; h < 2; ++h) {
            u[j + h] = _mm512_shuffle_f64x2(t[j + h], t[j + h + 2], 0x88);      // 128-bit lanes 0, 2 | 0, 2
            u[j + h + 2] = _mm512_shuffle_f64x2(t[j + h], t[j + h + 2], 0xdd);  // lanes 1, 3 | 1, 3
        }
    // u[h] (h < 4) holds value h of rows 0-3 in its 128-bit lanes 0 and 2, value h + 4 in lanes 1
    // and 3; u[h + 4] the same of rows 4-7
    for (int h = 0; h < 4; ++h) {
        out[h] = _mm512_shuffle_f64x2(u[h], u[h + 4], 0x88);
        if (h + 4 < 6) out[h + 4] = _mm512_shuffle_f64x2(u[h], u[h + 4], 0xdd);
    }
}

SIMD_AVX512 __attribute__((noinline)) void moved_row(const GridDisplacement& displacement, Point start, Point step,
                                                     int64_t nx, double* moved_x, double* moved_y, double* moved_z) {
    alignas(64) int32_t row[4][MOVED_BLOCK];
    alignas(64) double fraction[3][MOVED_BLOCK], keep[MOVED_BLOCK], sum[3][MOVED_BLOCK];
    const Grid grid = displacement.grid;
    const double* field = displacement.field;
    const __m512d one = _mm512_set1_pd(1.0);
    for (int64_t first = 0; first < nx; first += MOVED_BLOCK) {
        const int n = int(nx - first < MOVED_BLOCK ? nx - first : MOVED_BLOCK);
        for (int i = 0; i < n; ++i) {  // not omp simd: it kept each lane's stencil in memory, unvectorized
            const Point q = along_row(start, step, first + i);
            const Cell cell(q, grid);
            for (int k = 0; k < 4; ++k) row[k][i] = cell.offset + (k >> 1) * cell.step_z + (k & 1) * cell.step_y;
            fraction[0][i] = cell.fx, fraction[1][i] = cell.fy, fraction[2][i] = cell.fz;
            keep[i] = grid.contains(q) ? 1.0 : 0.0;
        }
        for (int i = n; i < (n + 7) / 8 * 8; ++i)  // whole vectors of points are loaded
            for (int k = 0; k < 4; ++k) row[k][i] = 0;
        for (int i = 0; i < n; i += 8) {
            // the corners' weights formed here, as Stencil forms them, from the 3 per-axis
            // weights: 8 stored a point instead made the displacement field 1.07-1.14x slower
            const __m512d fx = _mm512_load_pd(fraction[0] + i), fy = _mm512_load_pd(fraction[1] + i),
                          fz = _mm512_load_pd(fraction[2] + i);
            const __m512d wx[2] = {_mm512_sub_pd(one, fx), fx}, wy[2] = {_mm512_sub_pd(one, fy), fy},
                          wz[2] = {_mm512_sub_pd(one, fz), fz};
            __m512d total[3] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
            for (int k = 0; k < 4; ++k) {
                __m512d corner[6];  // (x, y, z) of corner 2k, then of corner 2k + 1
                load_corner_pairs(field, row[k] + i, corner);
                for (int h = 0; h < 2; ++h) {
                    const __m512d w = _mm512_mul_pd(_mm512_mul_pd(wx[h], wy[k & 1]), wz[k >> 1]);
                    for (int c = 0; c < 3; ++c) total[c] = _mm512_fmadd_pd(w, corner[3 * h + c], total[c]);
                }
            }
            for (int c = 0; c < 3; ++c) _mm512_store_pd(sum[c] + i, total[c]);
        }
#pragma omp simd
        for (int i = 0; i < n; ++i) {  // GridDisplacement::moved's sums, here from sum
            const Point q = along_row(start, step, first + i);
            moved_x[first + i] = q.x + keep[i] * sum[0][i];
            moved_y[first + i] = q.y + keep[i] * sum[1][i];
            moved_z[first + i] = q.z + keep[i] * sum[2][i];
        }
    }
}
#endif

// A resampled value in the image's pixel type as ITK's ResampleImageFilter casts it: an integer
// type clamped to its range, then truncated toward 0; a floating-point one rounded.
template <typename T>
INLINE_INTO_CLONES T cast_like_itk(double value) {
    if constexpr (std::is_integral_v<T>) {
        constexpr double low = double(std::numeric_limits<T>::lowest()), high = double(std::numeric_limits<T>::max());
        return T(value < low ? low : (value > high ? high : value));
    } else {
        return T(value);
    }
}

// The image at 8 points a vector (AVX-512): GCC vectorizes neither of resample_row's image loops,
// and a 1- or 2-byte pixel has no gather. A pixel of T is gathered in the word that begins at it
// (4 bytes for a 1- or 2-byte T, 8 for a 4-byte one; an 8-byte T is gathered as it is), or where
// that word would reach past the image, in the image's last word; it is then shifted out. The
// word holds the corner after it along x too, so linear interpolation gathers 4 words a point
// where it read 8 pixels. It computes in interpolate_like_itk's order with its fused
// multiply-adds and casts as cast_like_itk: the same bits as the scalar loops (tested).
#ifdef SIMD_LEVELS
template <typename T>
constexpr int32_t pixels_per_word = sizeof(T) < 4 ? 4 / int32_t(sizeof(T)) : 2;

// The pixels at `offset` (8 lanes), each in the lane's 32 bits as T's bits, sign- or
// zero-extended to 32, and the pixels `step` (0 or 1) after them; last_word is the offset of the
// image's last word. Lanes outside `read` read nothing (their offset may be garbage) and give 0.
// For a T of 4 bytes or less.
template <typename T>
SIMD_AVX512 inline __attribute__((always_inline)) void gather_pixel_bits(const T* pixels, __m256i offset, __m256i step,
                                                                        __m256i last_word, __mmask8 read, __m256i& at,
                                                                        __m256i& after) {
    const __m256i start = _mm256_min_epi32(offset, last_word), position = _mm256_sub_epi32(offset, start);
    const __m256i position_after = _mm256_add_epi32(position, step);
    if constexpr (sizeof(T) < 4) {
        constexpr int bits = 8 * int(sizeof(T)), spare = 32 - bits;
        const __m256i words = _mm256_mmask_i32gather_epi32(_mm256_setzero_si256(), read, start, pixels, int(sizeof(T)));
        const __m256i shift = _mm256_slli_epi32(position, sizeof(T) == 1 ? 3 : 4);
        const __m256i shift_after = _mm256_slli_epi32(position_after, sizeof(T) == 1 ? 3 : 4);
        const __m256i low = _mm256_srlv_epi32(words, shift), high = _mm256_srlv_epi32(words, shift_after);
        if constexpr (std::is_signed_v<T>) {
            at = _mm256_srai_epi32(_mm256_slli_epi32(low, spare), spare);
            after = _mm256_srai_epi32(_mm256_slli_epi32(high, spare), spare);
        } else {
            const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
            at = _mm256_and_si256(low, mask), after = _mm256_and_si256(high, mask);
        }
    } else {
        const __m512i words = _mm512_mask_i32gather_epi64(_mm512_setzero_si512(), read, start, pixels, 4);
        at = _mm512_cvtepi64_epi32(_mm512_srlv_epi64(words, _mm512_slli_epi64(_mm512_cvtepu32_epi64(position), 5)));
        after = _mm512_cvtepi64_epi32(
            _mm512_srlv_epi64(words, _mm512_slli_epi64(_mm512_cvtepu32_epi64(position_after), 5)));
    }
}

// gather_pixel_bits's pixels as doubles (each type's conversion is exact)
template <typename T>
SIMD_AVX512 inline __attribute__((always_inline)) __m512d bits_to_double(__m256i bits) {
    if constexpr (std::is_same_v<T, float>) return _mm512_cvtps_pd(_mm256_castsi256_ps(bits));
    else if constexpr (std::is_same_v<T, uint32_t>) return _mm512_cvtepu32_pd(bits);
    else return _mm512_cvtepi32_pd(bits);
}

// The corners at `offset` and `step` after them along x, as doubles (0 outside `read`).
template <typename T>
SIMD_AVX512 inline __attribute__((always_inline)) void gather_corner_pair(const T* pixels, __m256i offset, __m256i step,
                                                                         __m256i last_word, __mmask8 read, __m512d& at,
                                                                         __m512d& after) {
    if constexpr (std::is_same_v<T, double>) {
        at = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), read, offset, pixels, 8);
        after = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), read, _mm256_add_epi32(offset, step), pixels, 8);
    } else {
        __m256i at_bits, after_bits;
        gather_pixel_bits(pixels, offset, step, last_word, read, at_bits, after_bits);
        at = bits_to_double<T>(at_bits), after = bits_to_double<T>(after_bits);
    }
}

// 8 pixels of T (as gather_pixel_bits's bits) written to out, 0 where `keep` is clear.
template <typename T>
SIMD_AVX512 inline __attribute__((always_inline)) void store_pixel_bits(T* out, __m256i bits, __mmask8 keep) {
    if constexpr (sizeof(T) == 1)
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_maskz_mov_epi8(keep, _mm256_cvtepi32_epi8(bits)));
    else if constexpr (sizeof(T) == 2)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_maskz_mov_epi16(keep, _mm256_cvtepi32_epi16(bits)));
    else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_maskz_mov_epi32(keep, bits));
}

// 8 interpolated values written to out as cast_like_itk casts them, 0 where `keep` is clear.
template <typename T>
SIMD_AVX512 inline __attribute__((always_inline)) void store_cast_like_itk(T* out, __m512d value, __mmask8 keep) {
    if constexpr (std::is_same_v<T, double>) {
        _mm512_storeu_pd(out, _mm512_maskz_mov_pd(keep, value));
    } else if constexpr (std::is_same_v<T, float>) {
        _mm256_storeu_ps(out, _mm256_maskz_mov_ps(keep, _mm512_cvtpd_ps(value)));
    } else {
        // max(low, min(high, v)) is cast_like_itk's v < low ? low : (v > high ? high : v)
        const __m512d low = _mm512_set1_pd(double(std::numeric_limits<T>::lowest()));
        const __m512d high = _mm512_set1_pd(double(std::numeric_limits<T>::max()));
        const __m512d clamped = _mm512_max_pd(low, _mm512_min_pd(high, value));
        const __m256i bits = std::is_same_v<T, uint32_t> ? _mm512_cvttpd_epu32(clamped) : _mm512_cvttpd_epi32(clamped);
        store_pixel_bits(out, bits, keep);
    }
}

// clamp_index on 8 lanes, but for NaN: max(0, min(last, c)) keeps c itself where c is -0, as
// clamp_index does, and NaN, whose lane is outside the image and gathers nothing (its offset is
// garbage, 2^31 voxels away; sample_image_vectors masks its gathers with the inside lanes).
SIMD_AVX512 inline __attribute__((always_inline)) __m512d clamp_indices(__m512d c, __m512d last) {
    return _mm512_max_pd(_mm512_setzero_pd(), _mm512_min_pd(last, c));
}

// The nearest voxel's index along an axis, as resample_row's nearest loop rounds it.
SIMD_AVX512 inline __attribute__((always_inline)) __m256i nearest_indices(__m512d c, __m512d last) {
    const __m512d up = _mm512_add_pd(c, _mm512_set1_pd(0.5));
    const __m512d floor = _mm512_roundscale_pd(up, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    return _mm512_cvttpd_epi32(clamp_indices(floor, last));
}

// itk_axis_corner on 8 lanes.
SIMD_AVX512 inline __attribute__((always_inline)) void itk_axis_corners(__m512d c, __m512d last, __m256i last_index,
                                                                       __m256i& lower, __m256i& step,
                                                                       __m512d& fraction) {
    const __m512d clamped = clamp_indices(c, last);
    lower = _mm512_cvttpd_epi32(clamped);
    step = _mm256_srli_epi32(_mm256_cmpgt_epi32(last_index, lower), 31);  // 1 where lower < n - 1
    fraction = _mm512_sub_pd(clamped, _mm512_cvtepi32_pd(lower));
}

// a + (b - a) * t, contracted to one fused multiply-add as GCC compiles interpolate_like_itk's
SIMD_AVX512 inline __attribute__((always_inline)) __m512d lerp(__m512d a, __m512d b, __m512d t) {
    return _mm512_fmadd_pd(_mm512_sub_pd(b, a), t, a);
}

// Images above this size (bytes) have the corner rows of the point PREFETCH_AHEAD points further
// along prefetched, every vector: the gathers waited on memory where the image was larger than
// the caches (the fifty-second session in RESULTS.md: a 512x512x300 int16 image sampled 1.2-1.3x
// faster with it, a 23 MiB one 1.03-1.05x, a 5 MiB one 0.96-0.98x). Settable for tests.
constexpr int64_t PREFETCH_AHEAD = 64;

inline int64_t& prefetch_above_bytes() {
    static int64_t bytes = int64_t(16) << 20;
    return bytes;
}

// The cache lines of the corner rows of the point at continuous index (x, y, z): its lower
// corner's, and the rows after it along y and z (those may lie past the image: a prefetch does
// not fault).
template <typename T>
SIMD_AVX512 inline __attribute__((always_inline)) void prefetch_corner_rows(const Grid& grid, const T* pixels, double x,
                                                                           double y, double z) {
    const int32_t i = int32_t(clamp_index(x, grid.nx)), j = int32_t(clamp_index(y, grid.ny)),
                  k = int32_t(clamp_index(z, grid.nz));
    const int64_t row = grid.nx, slice = int64_t(grid.ny) * grid.nx, offset = (k * grid.ny + j) * row + i;
    __builtin_prefetch(pixels + offset);
    __builtin_prefetch(pixels + offset + row);
    __builtin_prefetch(pixels + offset + slice);
    __builtin_prefetch(pixels + offset + slice + row);
}

// resample_row's image loops over the first nx / 8 * 8 points of a row (returns that count): the
// image at the continuous indices (index_x, index_y, index_z), written to row. The image holds at
// least pixels_per_word<T> pixels.
template <typename T>
SIMD_AVX512 __attribute__((noinline)) int64_t sample_image_vectors(const Grid& grid, const T* pixels,
                                                                  const double* index_x, const double* index_y,
                                                                  const double* index_z, int64_t nx, bool nearest,
                                                                  bool prefetch, T* row) {
    const int64_t vectors = nx / 8 * 8;
    const __m512d below = _mm512_set1_pd(-0.5);
    const __m512d end_x = _mm512_set1_pd(grid.nx - 0.5), end_y = _mm512_set1_pd(grid.ny - 0.5),
                  end_z = _mm512_set1_pd(grid.nz - 0.5);
    const __m512d last_x = _mm512_set1_pd(double(grid.nx - 1)), last_y = _mm512_set1_pd(double(grid.ny - 1)),
                  last_z = _mm512_set1_pd(double(grid.nz - 1));
    const __m256i row_pixels = _mm256_set1_epi32(grid.nx), slice_pixels = _mm256_set1_epi32(grid.ny * grid.nx);
    const __m256i last_word = _mm256_set1_epi32(grid.nz * grid.ny * grid.nx - pixels_per_word<T>);
    for (int64_t x = 0; x < vectors; x += 8) {
        if (prefetch && x + PREFETCH_AHEAD < nx) {
            const int64_t ahead = x + PREFETCH_AHEAD;
            prefetch_corner_rows(grid, pixels, index_x[ahead], index_y[ahead], index_z[ahead]);
        }
        const __m512d cx = _mm512_loadu_pd(index_x + x), cy = _mm512_loadu_pd(index_y + x),
                      cz = _mm512_loadu_pd(index_z + x);
        const __mmask8 inside = _mm512_cmp_pd_mask(cx, below, _CMP_GE_OQ) & _mm512_cmp_pd_mask(cx, end_x, _CMP_LT_OQ) &
                                _mm512_cmp_pd_mask(cy, below, _CMP_GE_OQ) & _mm512_cmp_pd_mask(cy, end_y, _CMP_LT_OQ) &
                                _mm512_cmp_pd_mask(cz, below, _CMP_GE_OQ) & _mm512_cmp_pd_mask(cz, end_z, _CMP_LT_OQ);
        if (nearest) {
            const __m256i i = nearest_indices(cx, last_x), j = nearest_indices(cy, last_y),
                          k = nearest_indices(cz, last_z);
            const __m256i offset = _mm256_add_epi32(
                _mm256_add_epi32(_mm256_mullo_epi32(k, slice_pixels), _mm256_mullo_epi32(j, row_pixels)), i);
            if constexpr (std::is_same_v<T, double>) {
                _mm512_storeu_pd(row + x, _mm512_mask_i32gather_pd(_mm512_setzero_pd(), inside, offset, pixels, 8));
            } else {
                __m256i bits, unused;
                gather_pixel_bits(pixels, offset, _mm256_setzero_si256(), last_word, inside, bits, unused);
                store_pixel_bits(row + x, bits, inside);
            }
            continue;
        }
        __m256i x0, y0, z0, dx, dy, dz;
        __m512d fx, fy, fz;
        itk_axis_corners(cx, last_x, _mm256_set1_epi32(grid.nx - 1), x0, dx, fx);
        itk_axis_corners(cy, last_y, _mm256_set1_epi32(grid.ny - 1), y0, dy, fy);
        itk_axis_corners(cz, last_z, _mm256_set1_epi32(grid.nz - 1), z0, dz, fz);
        // interpolate_like_itk's o, o + oy, o + oz and o + oz + oy, in its int32 arithmetic
        const __m256i zy = _mm256_add_epi32(_mm256_mullo_epi32(z0, _mm256_set1_epi32(grid.ny)), y0);
        const __m256i o = _mm256_add_epi32(_mm256_mullo_epi32(zy, row_pixels), x0);
        const __m256i oy = _mm256_mullo_epi32(dy, row_pixels), oz = _mm256_mullo_epi32(dz, slice_pixels);
        __m512d v000, v100, v010, v110, v001, v101, v011, v111;
        gather_corner_pair(pixels, o, dx, last_word, inside, v000, v100);
        gather_corner_pair(pixels, _mm256_add_epi32(o, oy), dx, last_word, inside, v010, v110);
        gather_corner_pair(pixels, _mm256_add_epi32(o, oz), dx, last_word, inside, v001, v101);
        gather_corner_pair(pixels, _mm256_add_epi32(_mm256_add_epi32(o, oz), oy), dx, last_word, inside, v011, v111);
        const __m512d x00 = lerp(v000, v100, fx), x10 = lerp(v010, v110, fx);
        const __m512d x01 = lerp(v001, v101, fx), x11 = lerp(v011, v111, fx);
        const __m512d xx0 = lerp(x00, x10, fy), xx1 = lerp(x01, x11, fy);
        store_cast_like_itk(row + x, lerp(xx0, xx1, fz), inside);
    }
    return vectors;
}
#endif

// What resample() needs of its arguments, checked. The output has the image's pixel type.
template <typename T>
struct Resampling {
    GridDisplacement displacement;
    Affine fixed_to_grid, grid_to_index;
    Grid image_grid;
    const T* image;
    bool nearest;
    bool image_vectors;  // whether sample_image_vectors runs (AVX-512, as corner_pairs() says)
    bool prefetch;       // whether it prefetches (an image above prefetch_above_bytes())
    T* result;
    int64_t nz, ny, nx;
    Resampling(const Array<double>& displacement_array, const Array<double>& fixed_to_grid_array, const Array<T>& volume,
               const Array<double>& grid_to_index_array, bool nearest_neighbour, Array<T>& out)
        : displacement(displacement_array), fixed_to_grid(fixed_to_grid_array), grid_to_index(grid_to_index_array),
          image_grid(volume.ndim() == 3 ? volume.shape(0) : 0, volume.ndim() == 3 ? volume.shape(1) : 0,
                     volume.ndim() == 3 ? volume.shape(2) : 0),
          image(volume.data()), nearest(nearest_neighbour), result(out.mutable_data()) {
        check(volume.ndim() == 3 && out.ndim() == 3, "the image and the output are (Z, Y, X) arrays");
        nz = out.shape(0), ny = out.shape(1), nx = out.shape(2);
        image_vectors = corner_pairs() && volume.size() >= 4;  // a word of pixels (pixels_per_word)
        prefetch = volume.size() * int64_t(sizeof(T)) > prefetch_above_bytes();
    }
};

// One row (z, y) of the resampled image, in two loops, each vectorized on its own (GCC
// vectorizes neither when they are fused): the moving points into a buffer of 3 * nx, then
// the image at them. Called from the OpenMP loop of a CPU_DISPATCH function: a parallel region
// in a template body would be outlined once, for the baseline target, and never vectorized.
template <typename T>
INLINE_INTO_CLONES void resample_row(const Resampling<T>& r, int64_t z, int64_t y, double* buffer) {
    const int64_t nx = r.nx;
    double *index_x = buffer, *index_y = buffer + nx, *index_z = buffer + 2 * nx;
    // Row constants as locals: the vectorizer takes no loads through the shared copies.
    const Point start = r.fixed_to_grid({0.0, double(y), double(z)}), step = r.fixed_to_grid.x_step();
    const GridDisplacement displacement = r.displacement;
    const Affine to_index = r.grid_to_index;
#ifdef SIMD_LEVELS
    if (displacement.pairs()) {
        moved_row(displacement, start, step, nx, index_x, index_y, index_z);
#pragma omp simd
        for (int64_t x = 0; x < nx; ++x) {
            const Point c = to_index({index_x[x], index_y[x], index_z[x]});
            index_x[x] = c.x, index_y[x] = c.y, index_z[x] = c.z;
        }
    } else
#endif
#pragma omp simd
    for (int64_t x = 0; x < nx; ++x) {
        const Point c = to_index(displacement.moved(along_row(start, step, x)));
        index_x[x] = c.x, index_y[x] = c.y, index_z[x] = c.z;
    }
    const Grid grid = r.image_grid;
    const T* pixels = r.image;
    T* row = r.result + (z * r.ny + y) * nx;
    int64_t first = 0;  // the scalar loops' first point: after sample_image_vectors's
#ifdef SIMD_LEVELS
    if (r.image_vectors)
        first = sample_image_vectors(grid, pixels, index_x, index_y, index_z, nx, r.nearest, r.prefetch, row);
#endif
    if (r.nearest) {
#pragma omp simd
        for (int64_t x = first; x < nx; ++x) {
            const Point c{index_x[x], index_y[x], index_z[x]};
            // halves round up, as ITK; clamped only to keep the read inside
            const int32_t i = int32_t(clamp_index(std::floor(c.x + 0.5), grid.nx));
            const int32_t j = int32_t(clamp_index(std::floor(c.y + 0.5), grid.ny));
            const int32_t k = int32_t(clamp_index(std::floor(c.z + 0.5), grid.nz));
            const T value = pixels[(k * grid.ny + j) * grid.nx + i];
            row[x] = grid.contains(c) ? value : T(0);
        }
    } else {
#pragma omp simd
        for (int64_t x = first; x < nx; ++x) {
            const Point c{index_x[x], index_y[x], index_z[x]};
            const T value = cast_like_itk<T>(interpolate_like_itk(c, grid, pixels));
            row[x] = grid.contains(c) ? value : T(0);
        }
    }
}

#define RESAMPLE_ROWS(r, threads)                                         \
    _Pragma("omp parallel num_threads(threads)") {                        \
        std::vector<double> buffer(3 * r.nx);                             \
        _Pragma("omp for collapse(2) schedule(static)")                   \
        for (int64_t z = 0; z < r.nz; ++z)                                \
            for (int64_t y = 0; y < r.ny; ++y) resample_row(r, z, y, buffer.data()); \
    }

// One clone set per pixel type ITK's Python reads images as: the image is sampled as it is, and
// the output written in its type (a float64 copy of a 512x512x300 int16 CT, and a float64
// output, were 1.2 GB more and seconds of page faults).
#define RESAMPLE(T)                                                                                                  \
    CPU_DISPATCH void resample(const Array<double>& displacement, const Array<double>& fixed_to_grid,               \
                               const Array<T>& volume, const Array<double>& grid_to_index, bool nearest,            \
                               Array<T>& out, int threads) {                                                        \
        const Resampling<T> r(displacement, fixed_to_grid, volume, grid_to_index, nearest, out);                    \
        RESAMPLE_ROWS(r, threads)                                                                                    \
    }
RESAMPLE(uint8_t)
RESAMPLE(int16_t)
RESAMPLE(uint16_t)
RESAMPLE(int32_t)
RESAMPLE(uint32_t)
RESAMPLE(float)
RESAMPLE(double)

template <typename T>
void define_resample(py::module_& m) {
    m.def("resample", py::overload_cast<const Array<double>&, const Array<double>&, const Array<T>&,
                                        const Array<double>&, bool, Array<T>&, int>(&resample),
          py::arg("displacement"), py::arg("fixed_to_grid"), py::arg("volume").noconvert(), py::arg("grid_to_index"),
          py::arg("nearest"), py::arg("out").noconvert(), py::arg("threads"), py::call_guard<py::gil_scoped_release>());
}

// The field at fixed slices first_z .. first_z + out.shape(0) - 1: a slab of the whole field, the
// same values bit for bit (the Jacobian determinant goes through slabs, not a 900 MB field).
CPU_DISPATCH void displacement_field(const Array<double>& displacement_array, const Array<double>& fixed_to_grid_array,
                                     const Array<double>& grid_to_physical_array,
                                     const Array<double>& fixed_to_physical_array, Array<float>& out, int64_t first_z,
                                     int threads) {
    check(out.ndim() == 4 && out.shape(3) == 3, "the displacement field is a (Z, Y, X, 3) array");
    const GridDisplacement displacement(displacement_array);
    const Affine fixed_to_grid(fixed_to_grid_array), grid_to_physical(grid_to_physical_array),
        fixed_to_physical(fixed_to_physical_array);
    const int64_t nz = out.shape(0), ny = out.shape(1), nx = out.shape(2);
    float* result = out.mutable_data();
    const bool pairs = displacement.pairs();  // moved_row
#pragma omp parallel num_threads(threads)
    {
        std::vector<double> buffer(pairs ? 3 * nx : 0);  // moved_row's points
#pragma omp for collapse(2) schedule(static)
        for (int64_t z = 0; z < nz; ++z)
            for (int64_t y = 0; y < ny; ++y) {
                // Row constants as locals: the vectorizer takes no loads through the shared copies.
                const double fixed_z = double(first_z + z);
                const Point start = fixed_to_grid({0.0, double(y), fixed_z}), step = fixed_to_grid.x_step();
                const Point own_start = fixed_to_physical({0.0, double(y), fixed_z});
                const Point own_step = fixed_to_physical.x_step();
                const GridDisplacement grid_displacement = displacement;
                const Affine to_physical = grid_to_physical;
                float* row = result + (z * ny + y) * nx * 3;
#ifdef SIMD_LEVELS
                if (pairs) {
                    double *moved_x = buffer.data(), *moved_y = moved_x + nx, *moved_z = moved_y + nx;
                    moved_row(grid_displacement, start, step, nx, moved_x, moved_y, moved_z);
#pragma omp simd
                    for (int64_t x = 0; x < nx; ++x) {
                        const Point moved = to_physical({moved_x[x], moved_y[x], moved_z[x]});
                        const Point own = along_row(own_start, own_step, x);
                        row[3 * x] = float(moved.x - own.x);
                        row[3 * x + 1] = float(moved.y - own.y);
                        row[3 * x + 2] = float(moved.z - own.z);
                    }
                    continue;
                }
#endif
#pragma omp simd
                for (int64_t x = 0; x < nx; ++x) {
                    const Point moved = to_physical(grid_displacement.moved(along_row(start, step, x)));
                    const Point own = along_row(own_start, own_step, x);
                    row[3 * x] = float(moved.x - own.x);
                    row[3 * x + 1] = float(moved.y - own.y);
                    row[3 * x + 2] = float(moved.z - own.z);
                }
            }
    }
}

}  // namespace

PYBIND11_MODULE(_resample_cpu, m) {
    m.doc() = "A transform at every fixed voxel: the resampled image or the displacement field";
    define_resample<uint8_t>(m);
    define_resample<int16_t>(m);
    define_resample<uint16_t>(m);
    define_resample<int32_t>(m);
    define_resample<uint32_t>(m);
    define_resample<float>(m);
    define_resample<double>(m);
    m.def("displacement_field", &displacement_field, py::arg("displacement"), py::arg("fixed_to_grid"),
          py::arg("grid_to_physical"), py::arg("fixed_to_physical"), py::arg("out").noconvert(), py::arg("first_z"),
          py::arg("threads"),
          py::call_guard<py::gil_scoped_release>());
    define_corner_pairs(m, "the displacement's stencils and the image's interpolation");
    define_prefetch_above_bytes(m, prefetch_above_bytes, "the image loops prefetch their points' corner rows");
}
