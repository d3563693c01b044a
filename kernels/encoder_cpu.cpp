// A U-Net's first encoder level on the CPU, forward and input gradient; built by setup.py as
// mgr_engine._encoder_cpu (Python side: kernels/encoder_cpu.py).
//
// Each encoder level computes
//   out = conv3d(leaky_relu(x), weight, bias, stride 2, padding 1) + pad_front(avg_pool3d(x, 2, ceil), Co)
// (the pooled input added to the last Ci of the Co output channels). At the first level x is
// the two images (Ci = 2) at full resolution, and oneDNN, which blocks channels by 16, runs
// that convolution's input gradient at about 20 GFLOP/s (28 ms at 175^3, 2 cores), and torch's
// average pooling copies the channels-last input to planar and back: the level took 22 ms
// forward and 50 ms backward of a full-resolution U-Net. Here, in one pass each:
//   forward: out[j] = bias + sum over the 27 taps of leaky_relu(x[2 j - 1 + k]) * weight[k],
//            plus the pool's mean of x over [2 j, 2 j + 1] (within the grid) on the last Ci channels;
//   input gradient: grad_x[i] = leaky_relu'(x[i]) * sum over the taps (k, j) with 2 j - 1 + k = i
//            of weight[k] . grad[j], plus grad[i / 2] on the last Ci channels / the pool window's size.
// The weight and bias gradients stay with oneDNN (a 2 -> 16 channel weight gradient runs well there).
//
// Layouts: x (B, D, H, W, Ci), out and grad (B, D', H', W', Co), channels last (the engine's
// network layout), D' = ceil(D / 2) and so on; the weight as (27, Ci, P) and the bias as (P), the
// output channels zero-padded to P = 16, 32 or 64, so that a power of two of whole vectors covers
// them at every width (the counts compiled). Each thread takes a share of the rows (b, z, y) it writes.
// float compiled for AVX-512, AVX2+FMA and baseline x86-64 in vectors of that width, picked at
// run time (simd_bytes()); double (the tests' gradcheck) for baseline only.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_kernel.h"  // Array, check, share, INLINE_INTO_CLONES, SIMD_DISPATCH, Vector, load_vector

namespace {

constexpr int MOST_INPUT_CHANNELS = 4;
constexpr int MOST_PADDED_CHANNELS = 64;

struct Geometry {
    int64_t batch, n[3], m[3], cin, cout, padded;
};

// The convolution's taps that read input index i along an axis with m outputs: (k, j) with
// 2 j - 1 + k = i, k in 0..2, j in [0, m). An even i is read by j = i / 2 alone (k 1), an odd one
// by j = (i + 1) / 2 (k 0, where it exists) and j = (i - 1) / 2 (k 2).
struct Taps {
    int count, k[2];
    int64_t j[2];
};

INLINE_INTO_CLONES Taps taps_of(int64_t i, int64_t m) {
    Taps t{0, {0, 0}, {0, 0}};
    if (i % 2 == 0) {
        t.k[t.count] = 1, t.j[t.count++] = i / 2;
    } else {
        if ((i + 1) / 2 < m) t.k[t.count] = 0, t.j[t.count++] = (i + 1) / 2;
        t.k[t.count] = 2, t.j[t.count++] = (i - 1) / 2;
    }
    return t;
}

// Voxels of the pool's window [2 j, 2 j + 1] within an axis of n.
INLINE_INTO_CLONES int64_t window(int64_t j, int64_t n) { return std::min(2 * j + 2, n) - 2 * j; }

// Output voxels computed together along a row: each weight vector loaded feeds that many
// independent multiply-add chains (one chain alone waits on each multiply-add's latency).
constexpr int voxel_block(int vectors) { return vectors == 1 ? 8 : vectors == 2 ? 4 : vectors == 4 ? 2 : 1; }

// leaky_relu of input row (b, iz, iy) into `row`, with a zero voxel on each side (index ix + 1):
// the taps at ix = -1 and ix = W read those.
template <typename T>
INLINE_INTO_CLONES void activated_row(const Geometry& g, const T* x, int64_t b, int64_t iz, int64_t iy, T slope,
                                      T* row) {
    const int64_t cin = g.cin, width = g.n[2] * cin;
    const T* from = x + ((b * g.n[0] + iz) * g.n[1] + iy) * width;
    for (int64_t c = 0; c < cin; ++c) row[c] = row[width + cin + c] = T(0);
    for (int64_t e = 0; e < width; ++e) row[cin + e] = from[e] > T(0) ? from[e] : from[e] * slope;
}

// avg_pool3d(x, 2, ceil_mode) of one output row into `pooled` (m2 x Ci): each window's voxels
// summed in avg_pool3d's order (z, y, x), times 1 / its size (a power of two: the division's bits).
template <typename T>
INLINE_INTO_CLONES void pooled_row(const Geometry& g, const T* x, int64_t b, int64_t jz, int64_t jy, T* pooled) {
    const int64_t cin = g.cin, width = g.n[2] * cin;
    const T* rows[4];
    int count = 0;
    for (int64_t iz = 2 * jz; iz < std::min(2 * jz + 2, g.n[0]); ++iz)
        for (int64_t iy = 2 * jy; iy < std::min(2 * jy + 2, g.n[1]); ++iy)
            rows[count++] = x + ((b * g.n[0] + iz) * g.n[1] + iy) * width;
    const T rows_scale = T(1) / T(count);
    for (int64_t jx = 0; jx < g.m[2]; ++jx) {
        const bool pair = 2 * jx + 1 < g.n[2];
        const T scale = pair ? rows_scale / T(2) : rows_scale;
        for (int64_t ci = 0; ci < cin; ++ci) {
            T sum = T(0);
            for (int r = 0; r < count; ++r) {
                sum += rows[r][2 * jx * cin + ci];
                if (pair) sum += rows[r][(2 * jx + 1) * cin + ci];
            }
            pooled[jx * cin + ci] = sum * scale;
        }
    }
}

// Output voxels [jx0, jx0 + JB) of one output row: the convolution of the activated rows
// (rows[kz * 3 + ky], null outside the grid) plus the bias, with VECTORS vectors of output
// channels, plus the pooled row on the last Ci channels.
template <typename T, int BYTES, int VECTORS, int JB>
INLINE_INTO_CLONES void forward_voxels(const Geometry& g, const T* const* rows, const T* pooled, const T* weight,
                                       const T* bias, T* out_row, int64_t jx0) {
    using V = typename Vector<T, BYTES>::type;
    constexpr int L = BYTES / sizeof(T);
    const int64_t cin = g.cin, cout = g.cout;
    V acc[JB][VECTORS];
    for (int v = 0; v < VECTORS; ++v) {
        V bv;
        load_vector(bv, bias + v * L);
        for (int jb = 0; jb < JB; ++jb) acc[jb][v] = bv;
    }
    for (int kzy = 0; kzy < 9; ++kzy) {
        if (!rows[kzy]) continue;
        for (int kx = 0; kx < 3; ++kx) {
            const T* at = rows[kzy] + (2 * jx0 + kx) * cin;  // ix + 1 for ix = 2 jx - 1 + kx
            const T* wk = weight + (kzy * 3 + kx) * cin * g.padded;
            for (int64_t ci = 0; ci < cin; ++ci) {
                V w[VECTORS];
                for (int v = 0; v < VECTORS; ++v) {
                    load_vector(w[v], wk + ci * g.padded + v * L);
                    keep_in_register(w[v]);  // one load for its JB multiply-adds
                }
                for (int jb = 0; jb < JB; ++jb) {
                    const V a = at[2 * jb * cin + ci] - V{};  // a broadcast (x - 0 folds to x, 0 + x does not)
                    for (int v = 0; v < VECTORS; ++v) acc[jb][v] += a * w[v];
                }
            }
        }
    }
    for (int jb = 0; jb < JB; ++jb) {
        T* o = out_row + (jx0 + jb) * cout;
        if (cout == VECTORS * L) {
            for (int v = 0; v < VECTORS; ++v) std::memcpy(o + v * L, &acc[jb][v], sizeof(V));
        } else {  // a row's voxels are cout apart: whole vectors would write into the next one
            alignas(64) T padded[VECTORS * L];
            for (int v = 0; v < VECTORS; ++v) std::memcpy(padded + v * L, &acc[jb][v], sizeof(V));
            std::memcpy(o, padded, cout * sizeof(T));
        }
        for (int64_t ci = 0; ci < cin; ++ci) o[cout - cin + ci] += pooled[(jx0 + jb) * cin + ci];
    }
}

// Output rows [first, last) of (b, jz, jy); `buffer` holds 9 activated input rows and a pooled row.
template <typename T, int BYTES, int VECTORS>
INLINE_INTO_CLONES void forward_rows_of(const Geometry& g, const T* x, const T* weight, const T* bias, T* out,
                                        T slope, int64_t first, int64_t last, T* buffer) {
    constexpr int JB = voxel_block(VECTORS);
    const int64_t row_size = (g.n[2] + 2) * g.cin;
    T* pooled = buffer + 9 * row_size;
    for (int64_t row = first; row < last; ++row) {
        const int64_t b = row / (g.m[0] * g.m[1]), jz = (row / g.m[1]) % g.m[0], jy = row % g.m[1];
        const T* rows[9];
        for (int kz = 0; kz < 3; ++kz)
            for (int ky = 0; ky < 3; ++ky) {
                const int64_t iz = 2 * jz - 1 + kz, iy = 2 * jy - 1 + ky;
                T* to = buffer + (kz * 3 + ky) * row_size;
                const bool inside = iz >= 0 && iz < g.n[0] && iy >= 0 && iy < g.n[1];
                if (inside) activated_row(g, x, b, iz, iy, slope, to);
                rows[kz * 3 + ky] = inside ? to : nullptr;
            }
        pooled_row(g, x, b, jz, jy, pooled);
        T* out_row = out + row * g.m[2] * g.cout;
        // the last output's taps reach ix = 2 m - 1: W - 1 where W is even, the right pad where W is odd
        int64_t jx = 0;
        for (; jx + JB <= g.m[2]; jx += JB)
            forward_voxels<T, BYTES, VECTORS, JB>(g, rows, pooled, weight, bias, out_row, jx);
        for (; jx < g.m[2]; ++jx) forward_voxels<T, BYTES, VECTORS, 1>(g, rows, pooled, weight, bias, out_row, jx);
    }
}

template <typename T, int BYTES>
INLINE_INTO_CLONES void forward_body(const Geometry& g, const T* x, const T* weight, const T* bias, T* out, T slope,
                                     int64_t first, int64_t last) {
    constexpr int L = BYTES / sizeof(T);
    std::vector<T> buffer(size_t((9 * (g.n[2] + 2) + g.m[2]) * g.cin));
    switch (g.padded / L) {
        case 1: return forward_rows_of<T, BYTES, 1>(g, x, weight, bias, out, slope, first, last, buffer.data());
        case 2: return forward_rows_of<T, BYTES, 2>(g, x, weight, bias, out, slope, first, last, buffer.data());
        case 4: return forward_rows_of<T, BYTES, 4>(g, x, weight, bias, out, slope, first, last, buffer.data());
        case 8: return forward_rows_of<T, BYTES, 8>(g, x, weight, bias, out, slope, first, last, buffer.data());
        case 16: return forward_rows_of<T, BYTES, 16>(g, x, weight, bias, out, slope, first, last, buffer.data());
        default:  // double in 16-byte vectors, 64 channels
            return forward_rows_of<T, BYTES, 32>(g, x, weight, bias, out, slope, first, last, buffer.data());
    }
}

SIMD_DISPATCH(forward_rows, forward_body,
              (const Geometry& g, const T* x, const T* weight, const T* bias, T* out, T slope, int64_t first,
               int64_t last),
              (g, x, weight, bias, out, slope, first, last))

template <typename T, int N, typename V>
INLINE_INTO_CLONES T lane_sum(const V& v);

// The sum of v's N lanes, halves added pairwise in registers (a lane-by-lane sum is a chain of
// dependent scalar adds, which GCC keeps in order without -ffast-math: the input gradient ran
// 1.6x slower).
template <typename T, int N, typename V, size_t... I>
INLINE_INTO_CLONES T lane_sum_halves(const V& v, std::index_sequence<I...>) {
    const auto lo = __builtin_shufflevector(v, v, I...);
    const auto hi = __builtin_shufflevector(v, v, (I + N / 2)...);
    return lane_sum<T, N / 2>(lo + hi);
}

template <typename T, int N, typename V>
INLINE_INTO_CLONES T lane_sum(const V& v) {
    if constexpr (N == 1)
        return v[0];
    else
        return lane_sum_halves<T, N>(v, std::make_index_sequence<N / 2>{});
}

// What input rows share: their (z, y) taps' grad rows and weights (those of kx 0), and the rest
// of an input row's geometry.
template <typename T>
struct InputRow {
    const T* grad_rows[4];
    const T* weights[4];
    const T* pool_grad;  // the pool's grad row, at its last Ci channels
    const T* x;
    T* grad_x;
    T rows_scale;        // 1 / the pool window's voxels in (z, y)
};

// Input voxel ix of a row with TAPS (z, y) taps, from the XTAPS x taps (kx[e], jx[e]).
template <typename T, int BYTES, int VECTORS, int CIN, int TAPS, int XTAPS>
INLINE_INTO_CLONES void input_grad_voxel(const Geometry& g, const InputRow<T>& r, int64_t ix, const int* kx,
                                         const int64_t* jx, T slope, T* padded) {
    using V = typename Vector<T, BYTES>::type;
    constexpr int L = BYTES / sizeof(T);
    constexpr int CHANNELS = CIN ? CIN : MOST_INPUT_CHANNELS;
    const int64_t cin = CIN ? CIN : g.cin, cout = g.cout, voxel_weights = cin * g.padded;
    // constant bounds (guarded by cin where CIN is 0): indexed by constants once unrolled, the
    // sums stay in registers (indexed by a run-time channel they lived on the stack: 1.3x slower)
    V acc[CHANNELS][VECTORS];
    for (int ci = 0; ci < CHANNELS; ++ci)
        for (int v = 0; v < VECTORS; ++v) acc[ci][v] = V{};
    for (int t = 0; t < TAPS; ++t)
        for (int e = 0; e < XTAPS; ++e) {
            const T* gp = r.grad_rows[t] + jx[e] * cout;
            if (cout != VECTORS * L) gp = static_cast<const T*>(std::memcpy(padded, gp, cout * sizeof(T)));
            const T* wk = r.weights[t] + kx[e] * voxel_weights;
            for (int v = 0; v < VECTORS; ++v) {
                V gv;
                load_vector(gv, gp + v * L);
                for (int ci = 0; ci < CHANNELS; ++ci)
                    if (CIN || ci < cin) {
                        V w;
                        load_vector(w, wk + ci * g.padded + v * L);
                        acc[ci][v] += w * gv;
                    }
            }
        }
    const T* pool_grad = r.pool_grad + ix / 2 * cout;
    const T scale = 2 * (ix / 2) + 1 < g.n[2] ? r.rows_scale / T(2) : r.rows_scale;  // powers of two: exact
    for (int ci = 0; ci < CHANNELS && ci < cin; ++ci) {
        V total = acc[ci][0];
        for (int v = 1; v < VECTORS; ++v) total += acc[ci][v];
        const T sum = lane_sum<T, L>(total), a = r.x[ix * cin + ci];
        r.grad_x[ix * cin + ci] = (a > T(0) ? sum : sum * slope) + pool_grad[ci] * scale;
    }
}

// One input row with TAPS (z, y) taps: its voxels in pairs, an even ix (x tap k 1 of j = ix / 2)
// and the odd one after it (k 0 of j + 1, where it exists, and k 2 of j), so that every voxel's
// loops have constant bounds.
template <typename T, int BYTES, int VECTORS, int CIN, int TAPS>
INLINE_INTO_CLONES void input_grad_row(const Geometry& g, const InputRow<T>& r, T slope, T* padded) {
    const int middle[1] = {1}, odd[2] = {0, 2}, last[1] = {2};
    for (int64_t j = 0; j < g.m[2]; ++j) {
        const int64_t at_j[1] = {j}, around_j[2] = {j + 1, j};
        input_grad_voxel<T, BYTES, VECTORS, CIN, TAPS, 1>(g, r, 2 * j, middle, at_j, slope, padded);
        if (2 * j + 1 >= g.n[2]) break;
        if (j + 1 < g.m[2])
            input_grad_voxel<T, BYTES, VECTORS, CIN, TAPS, 2>(g, r, 2 * j + 1, odd, around_j, slope, padded);
        else
            input_grad_voxel<T, BYTES, VECTORS, CIN, TAPS, 1>(g, r, 2 * j + 1, last, at_j, slope, padded);
    }
}

// Input rows [first, last) of (b, iz, iy), VECTORS vectors of output channels.
template <typename T, int BYTES, int VECTORS, int CIN>
INLINE_INTO_CLONES void input_grad_rows_of(const Geometry& g, const T* x, const T* weight, const T* grad, T* grad_x,
                                           T slope, int64_t first, int64_t last) {
    constexpr int L = BYTES / sizeof(T);
    const int64_t cin = g.cin, cout = g.cout;
    alignas(64) T padded[VECTORS * L] = {};  // a voxel's grad, zero-padded, where cout < padded
    for (int64_t row = first; row < last; ++row) {
        const int64_t b = row / (g.n[0] * g.n[1]), iz = (row / g.n[1]) % g.n[0], iy = row % g.n[1];
        const Taps tz = taps_of(iz, g.m[0]), ty = taps_of(iy, g.m[1]);
        InputRow<T> r;
        int taps = 0;
        for (int a = 0; a < tz.count; ++a)
            for (int c = 0; c < ty.count; ++c, ++taps) {
                r.grad_rows[taps] = grad + ((b * g.m[0] + tz.j[a]) * g.m[1] + ty.j[c]) * g.m[2] * cout;
                r.weights[taps] = weight + (tz.k[a] * 3 + ty.k[c]) * 3 * cin * g.padded;
            }
        r.pool_grad = grad + ((b * g.m[0] + iz / 2) * g.m[1] + iy / 2) * g.m[2] * cout + cout - cin;
        r.x = x + row * g.n[2] * cin;
        r.grad_x = grad_x + row * g.n[2] * cin;
        r.rows_scale = T(1) / T(window(iz / 2, g.n[0]) * window(iy / 2, g.n[1]));
        if (taps == 1)
            input_grad_row<T, BYTES, VECTORS, CIN, 1>(g, r, slope, padded);
        else if (taps == 2)
            input_grad_row<T, BYTES, VECTORS, CIN, 2>(g, r, slope, padded);
        else
            input_grad_row<T, BYTES, VECTORS, CIN, 4>(g, r, slope, padded);
    }
}

template <typename T, int BYTES, int CIN>
INLINE_INTO_CLONES void input_grad_channels(const Geometry& g, const T* x, const T* weight, const T* grad, T* grad_x,
                                            T slope, int64_t first, int64_t last) {
    constexpr int L = BYTES / sizeof(T);
    switch (g.padded / L) {
        case 1: return input_grad_rows_of<T, BYTES, 1, CIN>(g, x, weight, grad, grad_x, slope, first, last);
        case 2: return input_grad_rows_of<T, BYTES, 2, CIN>(g, x, weight, grad, grad_x, slope, first, last);
        case 4: return input_grad_rows_of<T, BYTES, 4, CIN>(g, x, weight, grad, grad_x, slope, first, last);
        case 8: return input_grad_rows_of<T, BYTES, 8, CIN>(g, x, weight, grad, grad_x, slope, first, last);
        case 16: return input_grad_rows_of<T, BYTES, 16, CIN>(g, x, weight, grad, grad_x, slope, first, last);
        default:  // double in 16-byte vectors, 64 channels
            return input_grad_rows_of<T, BYTES, 32, CIN>(g, x, weight, grad, grad_x, slope, first, last);
    }
}

// The two images' channels compiled as such (their loops unrolled, no guards), any other count read at run time.
template <typename T, int BYTES>
INLINE_INTO_CLONES void input_grad_body(const Geometry& g, const T* x, const T* weight, const T* grad, T* grad_x,
                                        T slope, int64_t first, int64_t last) {
    if (g.cin == 2) return input_grad_channels<T, BYTES, 2>(g, x, weight, grad, grad_x, slope, first, last);
    input_grad_channels<T, BYTES, 0>(g, x, weight, grad, grad_x, slope, first, last);
}

SIMD_DISPATCH(input_grad_rows, input_grad_body,
              (const Geometry& g, const T* x, const T* weight, const T* grad, T* grad_x, T slope, int64_t first,
               int64_t last),
              (g, x, weight, grad, grad_x, slope, first, last))

template <typename T>
Geometry geometry(const Array<T>& x, const Array<T>& weight, const Array<T>& y) {
    check(x.ndim() == 5 && y.ndim() == 5, "x and the output (or its gradient) must be 5-D, channels last: (B, D, H, W, C)");
    Geometry g{x.shape(0), {x.shape(1), x.shape(2), x.shape(3)}, {y.shape(1), y.shape(2), y.shape(3)},
               x.shape(4), y.shape(4), weight.ndim() == 3 ? weight.shape(2) : 0};
    check(y.shape(0) == g.batch, "x and the output differ in batch size");
    for (int a = 0; a < 3; ++a) check(g.m[a] == (g.n[a] + 1) / 2, "the output's grid must be ceil(x's / 2)");
    check(g.cin >= 1 && g.cin <= MOST_INPUT_CHANNELS && g.cin <= g.cout, "x must have 1 to 4 channels, at most the output's");
    check(weight.ndim() == 3 && weight.shape(0) == 27 && weight.shape(1) == g.cin &&
              (g.padded == 16 || g.padded == 32 || g.padded == MOST_PADDED_CHANNELS) && g.padded >= g.cout,
          "weight must be (27, Ci, P), P the output channels padded to 16, 32 or 64");
    return g;
}

// out = conv3d(leaky_relu(x), weight, bias, stride 2, padding 1) + the pooled x on its last Ci channels.
template <typename T>
void encoder_level(const Array<T>& x, const Array<T>& weight, const Array<T>& bias, Array<T>& out, double slope,
                   int threads) {
    const Geometry g = geometry(x, weight, out);
    check(bias.ndim() == 1 && bias.shape(0) == g.padded, "bias must be (P), padded as the weight");
    const T* xs = x.data();
    const T* ws = weight.data();
    const T* bs = bias.data();
    T* os = out.mutable_data();
    const int64_t rows = g.batch * g.m[0] * g.m[1];
    py::gil_scoped_release release;
#pragma omp parallel num_threads(std::max(threads, 1))
    {
        int64_t first, last;
        share(rows, &first, &last);
        if constexpr (std::is_same_v<T, double>)  // the tests' gradcheck: baseline vectors only
            forward_body<T, 16>(g, xs, ws, bs, os, T(slope), first, last);
        else
            forward_rows<T>(g, xs, ws, bs, os, T(slope), first, last);
    }
}

// grad_x of encoder_level's output for its gradient grad.
template <typename T>
void encoder_level_input_grad(const Array<T>& x, const Array<T>& weight, const Array<T>& grad, Array<T>& grad_x,
                              double slope, int threads) {
    const Geometry g = geometry(x, weight, grad);
    check(grad_x.ndim() == 5 && grad_x.size() == x.size(), "grad_x must be shaped as x");
    const T* xs = x.data();
    const T* ws = weight.data();
    const T* gs = grad.data();
    T* out = grad_x.mutable_data();
    const int64_t rows = g.batch * g.n[0] * g.n[1];
    py::gil_scoped_release release;
#pragma omp parallel num_threads(std::max(threads, 1))
    {
        int64_t first, last;
        share(rows, &first, &last);
        if constexpr (std::is_same_v<T, double>)
            input_grad_body<T, 16>(g, xs, ws, gs, out, T(slope), first, last);
        else
            input_grad_rows<T>(g, xs, ws, gs, out, T(slope), first, last);
    }
}

template <typename T>
void define(py::module_& module) {
    // noconvert: a silent dtype/contiguity copy of the output array would drop the result.
    module.def("encoder_level", &encoder_level<T>, py::arg("x").noconvert(), py::arg("weight").noconvert(),
               py::arg("bias").noconvert(), py::arg("out").noconvert(), py::arg("slope"), py::arg("threads"),
               "out (B, D', H', W', Co) = conv3d(leaky_relu(x), weight, bias, stride 2, padding 1) plus avg_pool3d(x, 2, "
               "ceil_mode) on its last Ci channels; x (B, D, H, W, Ci), weight (27, Ci, P), bias (P), P the output "
               "channels zero-padded to 16, 32 or 64.");
    module.def("encoder_level_input_grad", &encoder_level_input_grad<T>, py::arg("x").noconvert(),
               py::arg("weight").noconvert(), py::arg("grad").noconvert(), py::arg("grad_x").noconvert(),
               py::arg("slope"), py::arg("threads"),
               "grad_x (B, D, H, W, Ci) of encoder_level's output for its gradient grad (B, D', H', W', Co).");
}

}  // namespace

PYBIND11_MODULE(_encoder_cpu, module) {
    module.doc() = "A U-Net's first encoder level on the CPU (mgr_engine.kernels.encoder_cpu)";
    define<float>(module);
    define<double>(module);  // the tests' gradcheck
    define_simd_bytes(module);
}
