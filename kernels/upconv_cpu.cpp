// The U-Net decoder's transposed convolutions on the CPU: the forward and backward passes in
// Winograd form, and the weight gradient in direct form; built by setup.py as mgr_engine._upconv_cpu (Python side:
// kernels/upconv_cpu.py).
//
// ConvTranspose3d(kernel 4, stride 2, padding 1) maps input voxel i to output voxels
// o = 2 i - 1 + k (k = 0..3 per axis).
//
// Forward (upconv_forward). Per axis, the output voxels 2 j - 1 + s (s = 0, 1) both sum the
// input voxels j - 1 and j (j = 0..n, taps a = 0, 1) with kernel tap k = 2 (1 - a) + s: a
// 2 x 2 x 2 convolution into 8 x Co channels, one group per output parity s (the sub-pixel form
// of model.SubpixelConvTranspose3d). Winograd's F(2, 2) computes two neighbouring j of a 2-tap
// filter from 3 inputs with 3 products instead of 4: inputs d0..d2 -> (d0 - d1, d1, d2 - d1),
// taps g0, g1 -> (g0, g0 + g1, g1), outputs m0 + m1 and m1 + m2. In 3-D a tile of 2 x 2 x 2 j
// (4 x 4 x 4 output voxels) takes 27 products per input x output channel pair instead of 64,
// each of the 27 a matrix product (tiles x Ci) x (Ci x 8 Co) run in registers (R tiles x CV
// vectors of output channels). The transforms only add and subtract: at 88^3 the largest error
// against float64 is 1.3x that of oneDNN's direct sums (0.9-4x on the tests' small cases, all
// within 8 float32 epsilons of the sum of absolute products). Why: oneDNN's transposed
// convolution runs near the FMA peak, so only fewer products make it faster; 48 -> 16 channels
// at 88^3 (the finest level of a full-resolution U-Net) took 180 against 90 ms on 2 AMD Zen 5
// cores. The input's leaky ReLU is applied as the tiles are read.
//
// Backward pass (upconv_backward): per axis the input gradient gx[i] sums w[k] grad[2 i - 1 + k],
// which splits by the parity s of the gradient's voxels into 2-tap correlations, and so does the
// weight gradient (x' in the place of w), so F(2, 2) applies as in the forward: per tile of 2 x 2
// x 2 x voxels, 27 matrix products (tiles x 8 Co) x (8 Co x Ci) for gx, and 27 (Ci x tiles) x
// (tiles x 8 Co) summed over chunks of tiles for the weight's. Both read the gradient's one
// transform: along z and y row by row (9 rows read in step per parity), then along x per tile.
// The leaky ReLU (forward for the weight's x', backward for gx) is applied as x is read. Why:
// oneDNN runs the input gradient near the FMA peak as a strided convolution, and the weight
// gradient's direct sums below at about 440 GFLOP/s; 48 -> 16 channels at 88^3 took 298 against
// 160 ms for both (2 AMD Zen 5 cores), the errors against float64 below oneDNN's.
//
// Weight gradient in direct form (upconv_weight_grad), for the channels the Winograd form does not
// take:
//   grad_weight[ci, co, kz, ky, kx] = sum over b, i of x[b, i, ci] * grad[b, 2 i - 1 + k, co]
// over the i whose o lies in the output grid (2 n per axis). Why: oneDNN computes it at about
// 60% of the rate of the same layer's input gradient (48 -> 16 channels at 88^3, 2 cores: 259
// against 404 GFLOP/s on an AMD Zen 5, 153 against 340 on an Intel Xeon), the largest of IO's
// convolution costs at the finest level.
//
// Layouts: x (B, n0, n1, n2, Ci) and grad (B, 2 n0, 2 n1, 2 n2, Co), channels last, as the
// engine's network runs. Each thread takes a share of x's rows (b, iz, iy); per chunk of rows and
// per (kz, ky), a block of CB input channels x one vector of output channels x the four kx is
// summed in registers over the voxels of the chunk's rows whose output row exists (4 CB
// accumulators, each loaded grad vector feeding CB multiply-adds, each broadcast x value four),
// then added to the thread's float64 sums, which are added in thread order at the end: the same
// bits for a given thread count, and the float32 sums run over ROWS_PER_FLUSH rows at most.
// Compiled for AVX-512, AVX2+FMA and baseline x86-64 in vectors of that width, picked at run time
// (simd_bytes()).

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_kernel.h"  // Array, check, share, INLINE_INTO_CLONES, SIMD_DISPATCH, Vector, load_vector, keep_in_register

namespace {

// Input channels per register block: 6 x 4 accumulators of AVX-512's 32 vector registers, 2 x 4
// of AVX2's (or SSE2's) 16.
constexpr int channel_block(int bytes) { return bytes == 64 ? 6 : 2; }

struct Geometry {
    int64_t batch, n[3], cin, cout;
};

// Whether `a` is a (Ci, Co, 4, 4, 4) kernel array (a weight or its gradient).
template <typename T>
bool is_kernel(const Array<T>& a, int64_t cin, int64_t cout) {
    return a.ndim() == 5 && a.shape(0) == cin && a.shape(1) == cout && a.shape(2) == 4 && a.shape(3) == 4 &&
           a.shape(4) == 4;
}

// Rows summed in registers before their sums go to float64: the flush (4 CB vectors converted
// and added) then costs a few percent of the multiply-adds.
constexpr int ROWS_PER_FLUSH = 8;

// The sums of up to ROWS_PER_FLUSH row pairs (x_rows[r], grad_rows[r]) of one (kz, ky): CB input
// channels from ci0, the vector of output channels from co0, the four kx, over each row's voxels
// ix, added to sums[kx][ci][co] of that (kz, ky).
template <typename T, int BYTES, int CB>
INLINE_INTO_CLONES void row_block(const Geometry& g, const T* const* x_rows, const T* const* grad_rows, int count,
                                  int64_t ci0, int64_t co0, double* sums_kzky) {
    using V = typename Vector<T, BYTES>::type;
    constexpr int L = BYTES / sizeof(T);
    V acc[4][CB];
    for (int kx = 0; kx < 4; ++kx)
        for (int c = 0; c < CB; ++c) acc[kx][c] = V{};
    const int64_t n2 = g.n[2], cin = g.cin, cout = g.cout;
    for (int r = 0; r < count; ++r) {
        const T* x_row = x_rows[r];
        const T* grad_row = grad_rows[r];
        const auto step = [&](int64_t ix, bool edge) __attribute__((always_inline)) {
            V gv[4];
            for (int kx = 0; kx < 4; ++kx) {
                const int64_t ox = 2 * ix - 1 + kx;
                if (edge && (ox < 0 || ox >= 2 * n2))
                    gv[kx] = V{};
                else
                    load_vector(gv[kx], grad_row + ox * cout + co0);
                keep_in_register(gv[kx]);  // one load for its CB multiply-adds
            }
            const T* xv = x_row + ix * cin + ci0;
            for (int c = 0; c < CB; ++c) {
                V xb = xv[c] - V{};  // a broadcast: x - 0 folds to x, 0 + x does not (signed zeros)
                keep_in_register(xb);  // one broadcast for its four multiply-adds
                for (int kx = 0; kx < 4; ++kx) acc[kx][c] += xb * gv[kx];
            }
        };
        step(0, true);
        for (int64_t ix = 1; ix < n2 - 1; ++ix) step(ix, false);
        if (n2 > 1) step(n2 - 1, true);
        // in registers across the rows: without this GCC kept them on the stack (6x slower)
        for (int kx = 0; kx < 4; ++kx)
            for (int c = 0; c < CB; ++c) keep_in_register(acc[kx][c]);
    }
    for (int kx = 0; kx < 4; ++kx)
        for (int c = 0; c < CB; ++c) {
            double* s = sums_kzky + (kx * cin + ci0 + c) * cout + co0;
            for (int l = 0; l < L; ++l) s[l] += double(acc[kx][c][l]);
        }
}

// All blocks of `count` row pairs of one (kz, ky).
template <typename T, int BYTES>
INLINE_INTO_CLONES void row_sums_body(const Geometry& g, const T* const* x_rows, const T* const* grad_rows, int count,
                                      double* sums_kzky) {
    constexpr int L = BYTES / sizeof(T), CB = channel_block(BYTES);
    for (int64_t co0 = 0; co0 < g.cout; co0 += L) {
        int64_t ci0 = 0;
        for (; ci0 + CB <= g.cin; ci0 += CB)
            row_block<T, BYTES, CB>(g, x_rows, grad_rows, count, ci0, co0, sums_kzky);
        for (; ci0 < g.cin; ++ci0) row_block<T, BYTES, 1>(g, x_rows, grad_rows, count, ci0, co0, sums_kzky);
    }
}

SIMD_DISPATCH(row_sums, row_sums_body,
              (const Geometry& g, const T* const* x_rows, const T* const* grad_rows, int count, double* sums_kzky),
              (g, x_rows, grad_rows, count, sums_kzky))

// grad_weight (Ci, Co, 4, 4, 4) of ConvTranspose3d(kernel 4, stride 2, padding 1) from its input
// x (B, n0, n1, n2, Ci) and its output's gradient grad (B, 2 n0, 2 n1, 2 n2, Co), both channels
// last; Co a multiple of 16 (every vector width's lanes).
template <typename T>
void upconv_weight_grad(const Array<T>& x, const Array<T>& grad, Array<T>& grad_weight, int threads) {
    check(x.ndim() == 5 && grad.ndim() == 5, "x and grad must be 5-D, channels last: (B, D, H, W, C)");
    Geometry g{x.shape(0), {x.shape(1), x.shape(2), x.shape(3)}, x.shape(4), grad.shape(4)};
    check(grad.shape(0) == g.batch, "x and grad differ in batch size");
    for (int a = 0; a < 3; ++a) check(grad.shape(a + 1) == 2 * g.n[a], "grad's grid must be twice x's");
    check(g.cout % 16 == 0, "grad's channels must be a multiple of 16");
    check(is_kernel(grad_weight, g.cin, g.cout), "grad_weight must be (Ci, Co, 4, 4, 4)");
    threads = std::max(threads, 1);
    const T* xs = x.data();
    const T* gs = grad.data();
    T* out = grad_weight.mutable_data();
    const int64_t rows = g.batch * g.n[0] * g.n[1], per_k = g.cin * g.cout;
    const int64_t x_row = g.n[2] * g.cin, grad_row = 2 * g.n[2] * g.cout;
    std::vector<std::vector<double>> sums(threads);
    int team_size = 1;

    py::gil_scoped_release release;
#pragma omp parallel num_threads(threads)
    {
        const int tid = omp_get_thread_num(), team = omp_get_num_threads();
        if (tid == 0) team_size = team;
        std::vector<double>& mine = sums[tid];
        mine.assign(size_t(64 * per_k), 0.0);
        int64_t first, last;
        share(rows, &first, &last);
        for (int64_t chunk = first; chunk < last; chunk += ROWS_PER_FLUSH) {
            const int64_t end = std::min(last, chunk + ROWS_PER_FLUSH);
            for (int kz = 0; kz < 4; ++kz)
                for (int ky = 0; ky < 4; ++ky) {
                    const T* x_rows[ROWS_PER_FLUSH];
                    const T* grad_rows[ROWS_PER_FLUSH];
                    int count = 0;
                    for (int64_t row = chunk; row < end; ++row) {  // the rows whose output row (oz, oy) exists
                        const int64_t b = row / (g.n[0] * g.n[1]), iz = (row / g.n[1]) % g.n[0], iy = row % g.n[1];
                        const int64_t oz = 2 * iz - 1 + kz, oy = 2 * iy - 1 + ky;
                        if (oz < 0 || oz >= 2 * g.n[0] || oy < 0 || oy >= 2 * g.n[1]) continue;
                        x_rows[count] = xs + row * x_row;
                        grad_rows[count++] = gs + ((b * 2 * g.n[0] + oz) * 2 * g.n[1] + oy) * grad_row;
                    }
                    if (count) row_sums<T>(g, x_rows, grad_rows, count, mine.data() + (kz * 4 + ky) * 4 * per_k);
                }
        }
    }
    // out[ci, co, k] = the threads' sums[k][ci][co], in thread order
    for (int64_t ci = 0; ci < g.cin; ++ci)
        for (int64_t co = 0; co < g.cout; ++co)
            for (int64_t k = 0; k < 64; ++k) {
                double total = 0.0;
                for (int t = 0; t < team_size; ++t) total += sums[t][size_t(k * per_k + ci * g.cout + co)];
                out[(ci * g.cout + co) * 64 + k] = T(total);
            }
}

// ---- Forward, in Winograd form --------------------------------------------------------------

// The 27 Winograd taps of a 2 x 2 x 2 filter g[a][b][c] (z, y, x): G = [[1, 0], [1, 1], [0, 1]]
// along x, then y, then z; taps[(a * 3 + b) * 3 + c], a, b, c = 0..2 along z, y, x.
inline void winograd_taps(const float g[2][2][2], float taps[27]) {
    float gx[2][2][3], gy[2][3][3];  // G along x, then y; z as they are stored
    for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b)
            gx[a][b][0] = g[a][b][0], gx[a][b][1] = g[a][b][0] + g[a][b][1], gx[a][b][2] = g[a][b][1];
    for (int a = 0; a < 2; ++a)
        for (int c = 0; c < 3; ++c)
            gy[a][0][c] = gx[a][0][c], gy[a][1][c] = gx[a][0][c] + gx[a][1][c], gy[a][2][c] = gx[a][1][c];
    for (int bc = 0; bc < 9; ++bc) {
        const float lower = gy[0][bc / 3][bc % 3], upper = gy[1][bc / 3][bc % 3];
        taps[bc] = lower, taps[9 + bc] = lower + upper, taps[18 + bc] = upper;
    }
}

// The weight (Ci, Co, 4, 4, 4) transformed, for the 27 Winograd products abc and the 8 parities s
// = 4 sz + 2 sy + sx (of the forward's output voxels, or of the output gradient's voxels that
// the input gradient reads), from each parity's 2 x 2 x 2 taps (a, b, c). Forward: kernel tap 2
// (1 - a) + s per axis, u[abc][ci][s * Co + co]. Input gradient: kernel tap 2 a + s,
// u[abc][s * Co + co][ci].
void transform_weights(const float* weight, int64_t cin, int64_t cout, bool for_input_grad, float* u) {
    const int64_t n = 8 * cout;
#pragma omp for
    for (int64_t ci = 0; ci < cin; ++ci)
        for (int64_t co = 0; co < cout; ++co) {
            const float* k = weight + (ci * cout + co) * 64;  // (kz, ky, kx), 4 each
            for (int s = 0; s < 8; ++s) {
                const int sz = s >> 2, sy = (s >> 1) & 1, sx = s & 1;
                float g[2][2][2], taps[27];
                for (int a = 0; a < 2; ++a)
                    for (int b = 0; b < 2; ++b)
                        for (int c = 0; c < 2; ++c) {
                            const int ta = for_input_grad ? a : 1 - a, tb = for_input_grad ? b : 1 - b,
                                      tc = for_input_grad ? c : 1 - c;
                            g[a][b][c] = k[((2 * ta + sz) * 4 + 2 * tb + sy) * 4 + 2 * tc + sx];
                        }
                winograd_taps(g, taps);
                for (int abc = 0; abc < 27; ++abc)
                    u[for_input_grad ? (abc * n + s * cout + co) * cin + ci : (abc * cin + ci) * n + s * cout + co] =
                        taps[abc];
            }
        }
}

// The forward's tiles per register block, and vectors of output channels: 6 x 4 accumulators of
// AVX-512's 32 registers, 6 x 2 of AVX2's (or SSE2's) 16.
constexpr int TILE_BLOCK = 6;
constexpr int vector_block(int bytes) { return bytes == 64 ? 4 : 2; }

// Tiles taken together (consecutive in (b, tz, ty, tx) order, so that small grids fill them
// too): each block of transformed weights is read once for their products, and their transformed
// inputs (27 x TILES x Ci) and products (27 x TILES x one register block) stay in a core's L2.
constexpr int64_t TILES = 24;

// A tile's grid: the forward's tiles are 2 x 2 x 2 input voxels, the input gradient's 2 x 2 x 2
// of its output voxels. activation: the leaky ReLU with `slope` (the forward's input, applied;
// the input gradient's, its derivative).
struct WinogradGeometry {
    int64_t batch, n[3], cin, cout, tiles[3];
    bool activation;
    float slope;
};

// A register block of products: acc[r][k] = sum over i < depth of a[r * a_row + i * a_step] times
// the k-th vector of b's row i (`width` floats apart), R rows of a broadcast x CV vectors.
template <int BYTES, int R, int CV, typename V>
INLINE_INTO_CLONES void register_products(const float* a, int64_t a_row, int64_t a_step, const float* b, int64_t width,
                                          int64_t depth, V (&acc)[R][CV]) {
    constexpr int L = BYTES / sizeof(float);
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < CV; ++k) acc[r][k] = V{};
    for (int64_t i = 0; i < depth; ++i) {
        V bv[CV];
        for (int k = 0; k < CV; ++k) {
            load_vector(bv[k], b + i * width + k * L);
            keep_in_register(bv[k]);  // one load for its R multiply-adds
        }
        for (int r = 0; r < R; ++r) {
            V ab = a[r * a_row + i * a_step] - V{};  // a broadcast: x - 0 folds to x, 0 + x does not (signed zeros)
            keep_in_register(ab);
            for (int k = 0; k < CV; ++k) acc[r][k] += ab * bv[k];
        }
    }
}

// The products of R tiles (their transformed inputs v, `depth` floats apart) with the CV vectors
// of transformed weights at u (`width` floats apart per row of the depth), stored at `products`
// (one row of CV vectors per tile, `stride` floats apart).
template <int BYTES, int R, int CV>
INLINE_INTO_CLONES void tile_products(const float* v, const float* u, int64_t depth, int64_t width, float* products,
                                      int64_t stride) {
    using V = typename Vector<float, BYTES>::type;
    constexpr int L = BYTES / sizeof(float);
    V acc[R][CV];
    register_products<BYTES, R, CV>(v, depth, 1, u, width, depth, acc);
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < CV; ++k) __builtin_memcpy(products + r * stride + k * L, &acc[r][k], sizeof(V));
}

// tile_products of `count` tiles: R at a time, the last fewer than R in one block of their count.
template <int BYTES, int R, int CV>
INLINE_INTO_CLONES void tiles_products(int64_t count, const float* v, const float* u, int64_t depth, int64_t width,
                                       float* products, int64_t stride) {
    int64_t t = 0;
    for (; t + R <= count; t += R)
        tile_products<BYTES, R, CV>(v + t * depth, u, depth, width, products + t * stride, stride);
    if constexpr (R > 1)
        if (t < count)
            tiles_products<BYTES, R - 1, CV>(count - t, v + t * depth, u, depth, width, products + t * stride, stride);
}

// The output transform of a tile's 27 products (product abc at m + abc * step): position j (jz,
// jy, jx) sums the products a in {jz, jz + 1}, b in {jy, jy + 1}, c in {jx, jx + 1}, summed along
// x and y per slab a, then two slabs at a time, so that few vectors are live (AVX2 has 16
// registers). store(jz, jy, jx, sum) takes each of the 8.
template <typename V, typename Store>
INLINE_INTO_CLONES void winograd_outputs(const float* m, int64_t step, Store&& store) {
    V previous[2][2] = {};  // the slab before's sums along x and y, [jy][jx]
    for (int a = 0; a < 3; ++a) {
        V along_x[3][2], sums[2][2];
        for (int bb = 0; bb < 3; ++bb) {
            V p[3];
            for (int c = 0; c < 3; ++c) load_vector(p[c], m + ((a * 3 + bb) * 3 + c) * step);
            along_x[bb][0] = p[0] + p[1], along_x[bb][1] = p[1] + p[2];
        }
        for (int jy = 0; jy < 2; ++jy)
            for (int jx = 0; jx < 2; ++jx) sums[jy][jx] = along_x[jy][jx] + along_x[jy + 1][jx];
        if (a > 0)  // output positions jz = a - 1: slabs a - 1 and a
            for (int jyx = 0; jyx < 4; ++jyx) {
                const int jy = jyx >> 1, jx = jyx & 1;
                store(a - 1, jy, jx, previous[jy][jx] + sums[jy][jx]);
            }
        for (int jy = 0; jy < 2; ++jy)
            for (int jx = 0; jx < 2; ++jx) previous[jy][jx] = sums[jy][jx];
    }
}

// `count` (at most TILES) tiles from tile `first` (in (b, tz, ty, tx) order): input transform into
// v, the 27 products per block of output channels, and their output transform (plus bias) written
// to the output voxels in y. zeros: Ci zeros, read for the input voxels outside the grid.
template <typename T, int BYTES>
INLINE_INTO_CLONES void forward_tiles_body(const WinogradGeometry& g, const T* x, const T* u, const T* bias, T* y,
                                           int64_t first, int64_t count, T* v, T* products, const T* zeros) {
    static_assert(std::is_same<T, float>::value, "float32 only");
    constexpr int R = TILE_BLOCK, L = BYTES / sizeof(float), CV = vector_block(BYTES);
    const int64_t cin = g.cin, cout = g.cout, n8 = 8 * cout;
    int64_t tile[TILES][4];  // (b, tz, ty, tx) of each tile
    for (int64_t t = 0; t < count; ++t) {
        int64_t index = first + t;
        for (int axis = 3; axis > 0; --axis) tile[t][axis] = index % g.tiles[axis - 1], index /= g.tiles[axis - 1];
        tile[t][0] = index;
    }
    // Input transform, v[abc][t][ci]: along x, y, then z, (d0 - d1, d1, d2 - d1) of the tile's
    // 3 input voxels 2 t - 1 .. 2 t + 1 per axis.
    for (int64_t t = 0; t < count; ++t) {
        const float* d[27];
        const int64_t b = tile[t][0], tz = tile[t][1], ty = tile[t][2], tx = tile[t][3];
        for (int p = 0; p < 27; ++p) {
            const int64_t iz = 2 * tz - 1 + p / 9, iy = 2 * ty - 1 + (p / 3) % 3, ix = 2 * tx - 1 + p % 3;
            const bool inside = iz >= 0 && iz < g.n[0] && iy >= 0 && iy < g.n[1] && ix >= 0 && ix < g.n[2];
            d[p] = inside ? x + (((b * g.n[0] + iz) * g.n[1] + iy) * g.n[2] + ix) * cin : zeros;
        }
        float* out = v + t * cin;
        const int64_t stride = TILES * cin;
        const bool activation = g.activation;
        const float slope = g.slope;
#pragma omp simd
        for (int64_t ci = 0; ci < cin; ++ci) {
            float e[9][3];
            for (int zy = 0; zy < 9; ++zy) {
                float in[3];
                for (int i = 0; i < 3; ++i) {
                    const float value = d[zy * 3 + i][ci];
                    in[i] = activation && value < 0.0f ? value * slope : value;  // leaky ReLU
                }
                e[zy][0] = in[0] - in[1], e[zy][1] = in[1], e[zy][2] = in[2] - in[1];
            }
            float f[3][3][3];  // f[z][b][c]
            for (int z = 0; z < 3; ++z)
                for (int c = 0; c < 3; ++c) {
                    f[z][0][c] = e[z * 3][c] - e[z * 3 + 1][c], f[z][1][c] = e[z * 3 + 1][c];
                    f[z][2][c] = e[z * 3 + 2][c] - e[z * 3 + 1][c];
                }
            for (int bc = 0; bc < 9; ++bc) {
                const int bb = bc / 3, c = bc % 3;
                out[(0 * 9 + bc) * stride + ci] = f[0][bb][c] - f[1][bb][c];
                out[(1 * 9 + bc) * stride + ci] = f[1][bb][c];
                out[(2 * 9 + bc) * stride + ci] = f[2][bb][c] - f[1][bb][c];
            }
        }
    }
    // Per block of CV vectors of the 8 Co output channels: the 27 products of each tile, then
    // their output transform, written to the output voxels.
    using V = typename Vector<float, BYTES>::type;
    const int64_t stride = 27 * CV * L;
    for (int64_t c0 = 0; c0 < n8; c0 += CV * L) {
        for (int abc = 0; abc < 27; ++abc) {
            const float* va = v + abc * TILES * cin;
            const float* ua = u + abc * cin * n8 + c0;
            float* pa = products + abc * CV * L;  // products[t][abc]: a tile's 27 together for its transform
            tiles_products<BYTES, R, CV>(count, va, ua, cin, n8, pa, stride);
        }
        // Output transform: position j, parity s is output voxel 4 t + 2 j + s - 1 along each
        // axis; vector k holds output channels co0.. of parity s.
        for (int64_t t = 0; t < count; ++t)
            for (int k = 0; k < CV; ++k) {
                const int64_t column = c0 + k * L, s = column / cout, co0 = column % cout;
                V bias_vector;
                load_vector(bias_vector, bias + co0);
                const auto store = [&](int jz, int jy, int jx, const V& sum) __attribute__((always_inline)) {
                    const int64_t oz = 4 * tile[t][1] + 2 * jz + (s >> 2) - 1,
                                  oy = 4 * tile[t][2] + 2 * jy + ((s >> 1) & 1) - 1,
                                  ox = 4 * tile[t][3] + 2 * jx + (s & 1) - 1;
                    if (oz < 0 || oz >= 2 * g.n[0] || oy < 0 || oy >= 2 * g.n[1] || ox < 0 || ox >= 2 * g.n[2])
                        return;
                    const V value = sum + bias_vector;
                    const int64_t voxel = ((tile[t][0] * 2 * g.n[0] + oz) * 2 * g.n[1] + oy) * 2 * g.n[2] + ox;
                    __builtin_memcpy(y + voxel * cout + co0, &value, sizeof(V));
                };
                winograd_outputs<V>(products + t * stride + k * L, CV * L, store);
            }
    }
}

SIMD_DISPATCH(forward_tiles, forward_tiles_body,
              (const WinogradGeometry& g, const T* x, const T* u, const T* bias, T* y, int64_t first, int64_t count,
               T* v, T* products, const T* zeros),
              (g, x, u, bias, y, first, count, v, products, zeros))

// y (B, 2 n0, 2 n1, 2 n2, Co) = conv_transpose3d(leaky_relu(x) if activation else x, weight, bias,
// stride 2, padding 1), x (B, n0, n1, n2, Ci) and y channels last, weight (Ci, Co, 4, 4, 4), bias
// (Co) or empty; Co a multiple of 16. Each thread takes a share of the tiles.
void upconv_forward(const Array<float>& x, const Array<float>& weight, const Array<float>& bias, Array<float>& y,
                    bool activation, float slope, int threads) {
    check(x.ndim() == 5 && y.ndim() == 5, "x and y must be 5-D, channels last: (B, D, H, W, C)");
    WinogradGeometry g{x.shape(0), {x.shape(1), x.shape(2), x.shape(3)}, x.shape(4), y.shape(4), {}, activation, slope};
    check(y.shape(0) == g.batch, "x and y differ in batch size");
    for (int a = 0; a < 3; ++a) {
        check(y.shape(a + 1) == 2 * g.n[a], "y's grid must be twice x's");
        g.tiles[a] = g.n[a] / 2 + 1;  // j = 0..n in pairs
    }
    check(g.cout % 16 == 0, "y's channels must be a multiple of 16");
    check(is_kernel(weight, g.cin, g.cout), "weight must be (Ci, Co, 4, 4, 4)");
    check(bias.size() == 0 || (bias.ndim() == 1 && bias.shape(0) == g.cout), "bias must be (Co,) or empty");
    threads = std::max(threads, 1);
    std::vector<float> u(size_t(27 * g.cin * 8 * g.cout)), zeros(size_t(g.cin), 0.0f), no_bias(size_t(g.cout), 0.0f);
    const float* xs = x.data();
    const float* ws = weight.data();
    const float* bs = bias.size() ? bias.data() : no_bias.data();
    float* ys = y.mutable_data();
    const int64_t tiles = g.batch * g.tiles[0] * g.tiles[1] * g.tiles[2];

    py::gil_scoped_release release;
#pragma omp parallel num_threads(threads)
    {
        transform_weights(ws, g.cin, g.cout, false, u.data());  // shared among the team (omp for, then its barrier)
        // products: 27 x TILES x the widest register block (4 x 16 floats)
        std::vector<float> v(size_t(27 * TILES * g.cin)), products(size_t(27 * TILES * 64));
        int64_t first, last;
        share(tiles, &first, &last);
        for (int64_t t = first; t < last; t += TILES)
            forward_tiles<float>(g, xs, u.data(), bs, ys, t, std::min(TILES, last - t), v.data(), products.data(),
                                 zeros.data());
    }
}


// ---- Backward pass, in Winograd form ---------------------------------------------------------

// The input gradient's register blocks: vectors of input channels (3 x 16 = 48, the finest
// level's, in AVX-512; 2 otherwise) and tiles (8 x 3 accumulators of AVX-512's 32 registers, 6 x
// 2 of AVX2's 16).
constexpr int input_grad_vectors(int bytes) { return bytes == 64 ? 3 : 2; }
constexpr int input_grad_tiles(int bytes) { return bytes == 64 ? 8 : 6; }

// The 27 products of `count` tiles (v, v_block floats from one product's tiles to the next's)
// with a block of `vectors` vectors of input channels of the transformed weights (u, depth x
// width per product), into products[t][abc] (27 x vectors x L floats per tile). A function of its
// own: inlined into backward_tiles, GCC's AVX2 build kept the accumulators on the stack (3x
// slower).
template <typename T, int BYTES>
INLINE_INTO_CLONES void input_grad_products_body(int64_t count, const T* v, int64_t v_block, const T* u, int64_t depth,
                                                 int64_t width, int vectors, T* products) {
    constexpr int L = BYTES / sizeof(float), CV = input_grad_vectors(BYTES), R = input_grad_tiles(BYTES);
    const int64_t stride = 27 * vectors * L;
    for (int abc = 0; abc < 27; ++abc) {
        const float* va = v + abc * v_block;
        const float* ua = u + abc * depth * width;
        float* pa = products + abc * vectors * L;
        if (vectors == CV)
            tiles_products<BYTES, R, CV>(count, va, ua, depth, width, pa, stride);
        else if (CV > 2 && vectors == 2)  // AVX-512's last block of 2 (CV 2 never gets here)
            tiles_products<BYTES, R, (CV > 2 ? 2 : 1)>(count, va, ua, depth, width, pa, stride);
        else
            tiles_products<BYTES, R, 1>(count, va, ua, depth, width, pa, stride);
    }
}

SIMD_DISPATCH(input_grad_products, input_grad_products_body,
              (int64_t count, const T* v, int64_t v_block, const T* u, int64_t depth, int64_t width, int vectors,
               T* products),
              (count, v, v_block, u, depth, width, vectors, products))

// The output gradient's rows a block of tiles reads, transformed along z and y: 36 rows (sz, a,
// sy, b) of 4 TILES + 2 voxels of Co channels.
constexpr int64_t BLOCK_ROW_VOXELS = 4 * TILES + 2;

// Tiles whose transforms the weight gradient sums in registers before it adds them to its float64
// sums: the sums (27 x Ci x 8 Co per thread, 1.3 MiB at 48 -> 16) are then read and written once
// per 192 tiles, and the float32 sums run over at most 192 tiles (1536 gx voxels).
constexpr int64_t CHUNK_TILES = 192;

// The floats from one product's transformed tiles to the next's in v (or xt): `tiles` x `width`,
// plus a vector so that the stores of one voxel's three products are not 4 KiB apart (12 KiB for
// 16 channels and 24 tiles), which the CPU takes for a dependency on the loads after them.
constexpr int64_t transformed_block(int64_t tiles, int64_t width) { return tiles * width + 16; }

// `count` (at most TILES) tiles of one row (b, tz, ty) of tiles from tx0: the input transform of
// the output gradient `grad` into v (v_block floats from one product's tiles to the next's); for
// the weight gradient (xt not null), the transform of x' = leaky_relu(x) (or x) into xt; for the
// input gradient (gx not null), the 27 products per block of input channels and their output
// transform (times the leaky ReLU's derivative at x) written to gx. rows: the block's rows
// transformed along z and y; zero_row: 2 n2 Co zeros, read for the rows outside the grid.
//
// Per axis, gx[i] = sum over s, a of w[2 a + s] p_s[i + a], with p_s[j] = grad[2 j - 1 + s]: a
// 2-tap correlation per parity s, so F(2, 2) gives gx[2 t] and gx[2 t + 1] from d_m = p_s[2 t +
// m] (grad voxels 4 t + 2 m + s - 1, m = 0..2) as (d0 - d1, d1, d2 - d1) times the taps' (h0, h0 +
// h1, h1), the outputs m0 + m1 and m1 + m2, as in the forward. The weight gradient's taps w[2 a
// + s] = sum over i of x'[i] p_s[i + a] are the same correlation with x' in the place of w: per
// tile, (x0, x0 + x1, x1) times (d0 - d1, d1, d2 - d1) gives the taps as m0 + m1 and m1 + m2.
template <typename T, int BYTES>
INLINE_INTO_CLONES void backward_tiles_body(const WinogradGeometry& g, const T* grad, const T* u, const T* x, T* gx,
                                            int64_t b, int64_t tz, int64_t ty, int64_t tx0, int64_t count, T* rows,
                                            T* v, int64_t v_block, T* products, const T* zero_row, T* xt,
                                            int64_t xt_block) {
    static_assert(std::is_same<T, float>::value, "float32 only");
    using V = typename Vector<float, BYTES>::type;
    constexpr int L = BYTES / sizeof(float), CV = input_grad_vectors(BYTES);
    const int64_t cin = g.cin, cout = g.cout, depth = 8 * cout;
    const int64_t grid[3] = {2 * g.n[0], 2 * g.n[1], 2 * g.n[2]};  // the output gradient's
    const int64_t row_stride = BLOCK_ROW_VOXELS * cout;
    // Along z and y: rows[(sz, a, sy, bb)][p] from the 6 x 6 rows of grad the tiles read (voxels
    // 4 t - 1 .. 4 t + 4 along z and y), voxel x = 4 tx0 - 1 + p along the row.
    const T* in[6][6];
    for (int qz = 0; qz < 6; ++qz)
        for (int qy = 0; qy < 6; ++qy) {
            const int64_t z = 4 * tz - 1 + qz, y = 4 * ty - 1 + qy;
            in[qz][qy] = z >= 0 && z < grid[0] && y >= 0 && y < grid[1]
                             ? grad + ((b * grid[0] + z) * grid[1] + y) * grid[2] * cout
                             : zero_row;
        }
    const int64_t voxels = 4 * count + 2, first_x = 4 * tx0 - 1;
    // the voxels along x inside the grid: [begin, end) of the block's
    const int64_t begin = std::max<int64_t>(0, -first_x), end = std::min(voxels, grid[2] - first_x);
    for (int szy = 0; szy < 4; ++szy) {  // one parity (sz, sy) at a time: 9 rows read in step
        const int sz = szy >> 1, sy = szy & 1;
        const T* d_rows[3][3];  // [mz][my]: grad's rows 2 m + s along z and y
        T* out_rows[3][3];      // [a][bb]: the transformed rows of this parity
        for (int m = 0; m < 9; ++m) {
            d_rows[m / 3][m % 3] = in[2 * (m / 3) + sz][2 * (m % 3) + sy];
            out_rows[m / 3][m % 3] = rows + (((sz * 3 + m / 3) * 2 + sy) * 3 + m % 3) * row_stride;
        }
        const auto transform = [&](int64_t p, bool inside) __attribute__((always_inline)) {
            for (int64_t co0 = 0; co0 < cout; co0 += L) {
                V d[3][3], e[3][3];  // d[mz][my]; e[a][my], along z
                for (int mz = 0; mz < 3; ++mz)
                    for (int my = 0; my < 3; ++my)
                        if (inside)
                            load_vector(d[mz][my], d_rows[mz][my] + (first_x + p) * cout + co0);
                        else
                            d[mz][my] = V{};
                for (int my = 0; my < 3; ++my)
                    e[0][my] = d[0][my] - d[1][my], e[1][my] = d[1][my], e[2][my] = d[2][my] - d[1][my];
                for (int a = 0; a < 3; ++a) {
                    const V along_y[3] = {e[a][0] - e[a][1], e[a][1], e[a][2] - e[a][1]};
                    for (int bb = 0; bb < 3; ++bb)
                        __builtin_memcpy(out_rows[a][bb] + p * cout + co0, &along_y[bb], sizeof(V));
                }
            }
        };
        for (int64_t p = 0; p < begin; ++p) transform(p, false);
        for (int64_t p = begin; p < end; ++p) transform(p, true);
        for (int64_t p = std::max(begin, end); p < voxels; ++p) transform(p, false);
    }
    // Along x: v[abc][t][s * Co + co], from voxels 4 t + 2 m + sx - 1 (p = 4 t + 2 m + sx).
    for (int64_t t = 0; t < count; ++t)
        for (int r = 0; r < 36; ++r) {
            const int sz = r / 18, a = (r / 6) % 3, sy = (r / 3) % 2, bb = r % 3;
            for (int sx = 0; sx < 2; ++sx) {
                const T* d = rows + r * row_stride + (4 * t + sx) * cout;
                T* out = v + (a * 3 + bb) * 3 * v_block + t * depth + ((sz * 2 + sy) * 2 + sx) * cout;
                for (int64_t co0 = 0; co0 < cout; co0 += L) {
                    V d0, d1, d2;
                    load_vector(d0, d + co0), load_vector(d1, d + 2 * cout + co0), load_vector(d2, d + 4 * cout + co0);
                    const V along_x[3] = {d0 - d1, d1, d2 - d1};
                    for (int c = 0; c < 3; ++c)
                        __builtin_memcpy(out + c * v_block + co0, &along_x[c], sizeof(V));
                }
            }
        }
    // x' along x, y and z: xt[abc][t][ci] from gx's voxels 2 t + j (zero beyond the grid).
    if (xt)
        for (int64_t t = 0; t < count; ++t)
            for (int64_t ci0 = 0; ci0 < cin; ci0 += L) {
                V along_x[2][2][3];  // [jz][jy][c]
                for (int jzy = 0; jzy < 4; ++jzy) {
                    const int jz = jzy >> 1, jy = jzy & 1;
                    const int64_t iz = 2 * tz + jz, iy = 2 * ty + jy;
                    V d[2];
                    for (int jx = 0; jx < 2; ++jx) {
                        const int64_t ix = 2 * (tx0 + t) + jx;
                        d[jx] = V{};
                        if (iz < g.n[0] && iy < g.n[1] && ix < g.n[2]) {
                            load_vector(d[jx], x + (((b * g.n[0] + iz) * g.n[1] + iy) * g.n[2] + ix) * cin + ci0);
                            if (g.activation) d[jx] = d[jx] > V{} ? d[jx] : d[jx] * g.slope;  // torch's leaky_relu
                        }
                    }
                    along_x[jz][jy][0] = d[0], along_x[jz][jy][1] = d[0] + d[1], along_x[jz][jy][2] = d[1];
                }
                for (int bc = 0; bc < 9; ++bc) {
                    const int bb = bc / 3, c = bc % 3;
                    V along_y[2];
                    for (int jz = 0; jz < 2; ++jz)
                        along_y[jz] = bb == 0   ? along_x[jz][0][c]
                                      : bb == 1 ? along_x[jz][0][c] + along_x[jz][1][c]
                                                : along_x[jz][1][c];
                    const V along_z[3] = {along_y[0], along_y[0] + along_y[1], along_y[1]};
                    for (int a = 0; a < 3; ++a)
                        __builtin_memcpy(xt + (a * 9 + bc) * xt_block + t * cin + ci0, &along_z[a], sizeof(V));
                }
            }
    if (!gx) return;
    // Per block of input channels: the 27 products of each tile, then their output transform.
    for (int64_t c0 = 0; c0 < cin;) {
        const int vectors = int(std::min<int64_t>(CV, (cin - c0) / L));  // cin is a multiple of L
        const int64_t stride = 27 * vectors * L;
        input_grad_products<float>(count, v, v_block, u + c0, depth, cin, vectors, products);
        for (int64_t t = 0; t < count; ++t)
            for (int k = 0; k < vectors; ++k) {
                const int64_t ci0 = c0 + k * L;
                const auto store = [&](int jz, int jy, int jx, const V& sum) __attribute__((always_inline)) {
                    const int64_t iz = 2 * tz + jz, iy = 2 * ty + jy, ix = 2 * (tx0 + t) + jx;
                    if (iz >= g.n[0] || iy >= g.n[1] || ix >= g.n[2]) return;
                    const int64_t at = (((b * g.n[0] + iz) * g.n[1] + iy) * g.n[2] + ix) * cin + ci0;
                    V value = sum;
                    if (g.activation) {  // leaky_relu_backward: x > 0 ? grad : grad * slope
                        V xv;
                        load_vector(xv, x + at);
                        value = xv > V{} ? sum : sum * g.slope;
                    }
                    __builtin_memcpy(gx + at, &value, sizeof(V));
                };
                winograd_outputs<V>(products + t * stride + k * L, vectors * L, store);
            }
        c0 += vectors * L;
    }
}

SIMD_DISPATCH(backward_tiles, backward_tiles_body,
              (const WinogradGeometry& g, const T* grad, const T* u, const T* x, T* gx, int64_t b, int64_t tz,
               int64_t ty, int64_t tx0, int64_t count, T* rows, T* v, int64_t v_block, T* products,
               const T* zero_row, T* xt, int64_t xt_block),
              (g, grad, u, x, gx, b, tz, ty, tx0, count, rows, v, v_block, products, zero_row, xt, xt_block))

// The weight gradient's register block: CB input channels (broadcast from xt) x CV vectors of
// the 8 Co columns (loaded from v), summed over `count` tiles, added to sums[ci][column] (float64,
// `depth` columns a row).
template <int BYTES, int CB, int CV>
INLINE_INTO_CLONES void weight_block(int64_t count, const float* xt, int64_t cin, const float* v, int64_t depth,
                                     double* sums) {
    using V = typename Vector<float, BYTES>::type;
    constexpr int L = BYTES / sizeof(float);
    V acc[CB][CV];
    register_products<BYTES, CB, CV>(xt, 1, cin, v, depth, count, acc);
    for (int c = 0; c < CB; ++c)
        for (int k = 0; k < CV; ++k)
            for (int l = 0; l < L; ++l) sums[c * depth + k * L + l] += double(acc[c][k][l]);
}

// weight_block over all input channels: CB at a time, the last fewer in one block of their count.
template <int BYTES, int CB, int CV>
INLINE_INTO_CLONES void weight_blocks(int64_t count, const float* xt, int64_t cin, int64_t ci0, const float* v,
                                      int64_t depth, double* sums) {
    for (; ci0 + CB <= cin; ci0 += CB) weight_block<BYTES, CB, CV>(count, xt + ci0, cin, v, depth, sums + ci0 * depth);
    if constexpr (CB > 1)
        if (ci0 < cin) weight_blocks<BYTES, CB - 1, CV>(count, xt, cin, ci0, v, depth, sums);
}

// The weight gradient's 27 products of a chunk of `count` tiles, sums[abc][ci][s * Co + co] +=
// sum over the tiles of xt[abc][t][ci] v[abc][t][s * Co + co]: per product and per CV vectors of
// columns, register blocks of 6 input channels (6 x 4 accumulators of AVX-512's 32 registers, 6 x
// 2 of AVX2's 16).
template <typename T, int BYTES>
INLINE_INTO_CLONES void weight_products_body(int64_t count, const T* xt, int64_t xt_block, const T* v, int64_t v_block,
                                             int64_t cin, int64_t depth, double* sums) {
    constexpr int L = BYTES / sizeof(float), CV = BYTES == 64 ? 4 : 2;
    for (int abc = 0; abc < 27; ++abc)
        for (int64_t c0 = 0; c0 < depth; c0 += CV * L)  // depth = 8 Co: a multiple of 128
            weight_blocks<BYTES, 6, CV>(count, xt + abc * xt_block, cin, 0, v + abc * v_block + c0, depth,
                                        sums + abc * cin * depth + c0);
}

SIMD_DISPATCH(weight_products, weight_products_body,
              (int64_t count, const T* xt, int64_t xt_block, const T* v, int64_t v_block, int64_t cin, int64_t depth,
               double* sums),
              (count, xt, xt_block, v, v_block, cin, depth, sums))

// The backward pass of conv_transpose3d(x', weight, stride 2, padding 1), x' = leaky_relu(x)
// where activation (else x), for its output's gradient grad (B, 2 n0, 2 n1, 2 n2, Co): gx (B, n0,
// n1, n2, Ci), the gradient to x (the leaky ReLU's derivative included), and grad_weight (Ci, Co,
// 4, 4, 4); either may be empty (not computed). All channels last, Ci and Co multiples of 16.
// Each thread takes a share of the rows of tiles (b, tz, ty), in blocks of up to TILES tiles
// along x; the weight gradient's float64 sums are per thread, added in thread order at the end.
void upconv_backward(const Array<float>& grad, const Array<float>& weight, const Array<float>& x, Array<float>& gx,
                     Array<float>& grad_weight, bool activation, float slope, int threads) {
    const bool input = gx.size() > 0, weights = grad_weight.size() > 0;
    check(grad.ndim() == 5 && x.ndim() == 5, "grad and x must be 5-D, channels last: (B, D, H, W, C)");
    WinogradGeometry g{x.shape(0), {x.shape(1), x.shape(2), x.shape(3)}, x.shape(4), grad.shape(4), {},
                       activation, slope};
    check(grad.shape(0) == g.batch, "grad and x differ in batch size");
    for (int a = 0; a < 3; ++a) {
        check(grad.shape(a + 1) == 2 * g.n[a], "grad's grid must be twice x's");
        g.tiles[a] = (g.n[a] + 1) / 2;  // x's voxels in pairs
    }
    check(g.cout % 16 == 0 && g.cin % 16 == 0, "the channels must be multiples of 16");
    check(is_kernel(weight, g.cin, g.cout), "weight must be (Ci, Co, 4, 4, 4)");
    check(!input || (gx.ndim() == 5 && gx.shape(0) == g.batch && gx.shape(1) == g.n[0] && gx.shape(2) == g.n[1] &&
                     gx.shape(3) == g.n[2] && gx.shape(4) == g.cin),
          "gx must have x's shape");
    check(!weights || is_kernel(grad_weight, g.cin, g.cout), "grad_weight must be (Ci, Co, 4, 4, 4)");
    threads = std::max(threads, 1);
    const int64_t depth = 8 * g.cout, chunk = weights ? CHUNK_TILES : TILES;
    const int64_t v_block = transformed_block(chunk, depth), xt_block = transformed_block(chunk, g.cin);
    std::vector<float> u(input ? size_t(27 * g.cin * depth) : 0), zero_row(size_t(2 * g.n[2] * g.cout), 0.0f);
    std::vector<std::vector<double>> sums(threads);
    int team_size = 1;
    const float* grads = grad.data();
    const float* ws = weight.data();
    const float* xs = x.data();
    float* out = input ? gx.mutable_data() : nullptr;
    const int64_t tile_rows = g.batch * g.tiles[0] * g.tiles[1];

    py::gil_scoped_release release;
#pragma omp parallel num_threads(threads)
    {
        const int tid = omp_get_thread_num();
        if (tid == 0) team_size = omp_get_num_threads();
        if (input) transform_weights(ws, g.cin, g.cout, true, u.data());  // shared (omp for, then its barrier)
        std::vector<float> rows(size_t(36 * BLOCK_ROW_VOXELS * g.cout)), v(size_t(27 * v_block)),
            xt(weights ? size_t(27 * xt_block) : 0),
            products(input ? size_t(27 * TILES * 48) : 0);  // the widest register block: 3 x 16 floats
        std::vector<double>& mine = sums[tid];
        if (weights) mine.assign(size_t(27 * g.cin * depth), 0.0);
        int64_t first, last, in_chunk = 0;
        share(tile_rows, &first, &last);
        for (int64_t row = first; row < last; ++row) {
            const int64_t b = row / (g.tiles[0] * g.tiles[1]), tz = (row / g.tiles[1]) % g.tiles[0],
                          ty = row % g.tiles[1];
            for (int64_t tx0 = 0; tx0 < g.tiles[2]; tx0 += TILES) {
                const int64_t count = std::min(TILES, g.tiles[2] - tx0);
                if (weights && in_chunk + count > chunk) {  // the chunk's sums, then a new chunk
                    weight_products<float>(in_chunk, xt.data(), xt_block, v.data(), v_block, g.cin, depth, mine.data());
                    in_chunk = 0;
                }
                backward_tiles<float>(g, grads, u.data(), xs, out, b, tz, ty, tx0, count, rows.data(),
                                      v.data() + in_chunk * depth, v_block, products.data(), zero_row.data(),
                                      weights ? xt.data() + in_chunk * g.cin : nullptr, xt_block);
                if (weights) in_chunk += count;
            }
        }
        if (weights && in_chunk > 0)
            weight_products<float>(in_chunk, xt.data(), xt_block, v.data(), v_block, g.cin, depth, mine.data());
    }
    if (!weights) return;
    // The threads' sums in thread order, then the output transform: tap a per axis sums the
    // products a and a + 1 (kernel tap 2 a + s of parity s). By the team too: one thread took 5
    // of the 35 ms of 192 -> 64's weight gradient at 22^3.
    float* gw = grad_weight.mutable_data();
    const int64_t per_abc = g.cin * depth;
#pragma omp parallel for num_threads(threads)
    for (int64_t ci = 0; ci < g.cin; ++ci)
        for (int64_t column = 0; column < depth; ++column) {
            double total[27];
            for (int abc = 0; abc < 27; ++abc) {
                double value = 0.0;
                for (int t = 0; t < team_size; ++t) value += sums[t][size_t(abc * per_abc + ci * depth + column)];
                total[abc] = value;
            }
            const int64_t s = column / g.cout, co = column % g.cout;
            const int sz = int(s >> 2), sy = int((s >> 1) & 1), sx = int(s & 1);
            for (int tap = 0; tap < 8; ++tap) {
                const int a = tap >> 2, bb = (tap >> 1) & 1, c = tap & 1;
                double value = 0.0;
                for (int abc = 0; abc < 8; ++abc)
                    value += total[((a + (abc >> 2)) * 3 + bb + ((abc >> 1) & 1)) * 3 + c + (abc & 1)];
                gw[(ci * g.cout + co) * 64 + ((2 * a + sz) * 4 + 2 * bb + sy) * 4 + 2 * c + sx] = float(value);
            }
        }
}

}  // namespace

PYBIND11_MODULE(_upconv_cpu, module) {
    module.doc() = "The U-Net's ConvTranspose3d(kernel 4, stride 2, padding 1) on the CPU: its forward in Winograd "
                   "form and its weight gradient (mgr_engine.kernels.upconv_cpu)";
    module.def("upconv_forward", &upconv_forward, py::arg("x").noconvert(), py::arg("weight").noconvert(),
               py::arg("bias").noconvert(), py::arg("y").noconvert(), py::arg("activation"), py::arg("slope"),
               py::arg("threads"),
               "y = conv_transpose3d(leaky_relu(x, slope) if activation else x, weight, bias, stride=2, padding=1), "
               "x passed as (B, D, H, W, Ci) and y as (B, 2D, 2H, 2W, Co), channels last; weight (Ci, Co, 4, 4, 4); "
               "bias (Co,) or empty.");
    // noconvert: a silent dtype/contiguity copy of the output array would drop the result.
    module.def("upconv_weight_grad", &upconv_weight_grad<float>, py::arg("x").noconvert(),
               py::arg("grad").noconvert(), py::arg("grad_weight").noconvert(), py::arg("threads"),
               "grad_weight (Ci, Co, 4, 4, 4) of conv_transpose3d(x, weight, stride=2, padding=1), from x passed as "
               "(B, D, H, W, Ci) and grad as (B, 2D, 2H, 2W, Co), channels last.");
    module.def("upconv_backward", &upconv_backward, py::arg("grad").noconvert(), py::arg("weight").noconvert(),
               py::arg("x").noconvert(), py::arg("gx").noconvert(), py::arg("grad_weight").noconvert(),
               py::arg("activation"), py::arg("slope"), py::arg("threads"),
               "The backward pass of conv_transpose3d(leaky_relu(x, slope) if activation else x, weight, stride=2, "
               "padding=1) in Winograd form for its output's gradient grad (B, 2D, 2H, 2W, Co): gx (B, D, H, W, Ci), "
               "the gradient to x, and grad_weight (Ci, Co, 4, 4, 4), each computed unless empty; x (B, D, H, W, Ci), "
               "grad and gx channels last.");
    module.attr("CHUNK_TILES") = CHUNK_TILES;  // for the Python side's memory estimate
    define_simd_bytes(module);
}
