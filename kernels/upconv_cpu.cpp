// The U-Net decoder's transposed convolutions on the CPU: the forward pass in Winograd form and
// the weight gradient; built by setup.py as mgr_engine._upconv_cpu (Python side:
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
// Weight gradient (upconv_weight_grad):
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
    check(grad_weight.ndim() == 5 && grad_weight.shape(0) == g.cin && grad_weight.shape(1) == g.cout &&
              grad_weight.shape(2) == 4 && grad_weight.shape(3) == 4 && grad_weight.shape(4) == 4,
          "grad_weight must be (Ci, Co, 4, 4, 4)");
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

// The weight (Ci, Co, 4, 4, 4) transformed: u[abc][ci][s * Co + co] for the 27 Winograd products
// abc (a, b, c: 0..2 along z, y, x) and the 8 output parities s = 4 sz + 2 sy + sx. G =
// [[1, 0], [1, 1], [0, 1]] along each axis of the parity's 2 x 2 x 2 taps.
void transform_weights(const float* weight, int64_t cin, int64_t cout, float* u) {
    const int64_t n = 8 * cout;
#pragma omp for
    for (int64_t ci = 0; ci < cin; ++ci)
        for (int64_t co = 0; co < cout; ++co) {
            const float* k = weight + (ci * cout + co) * 64;  // (kz, ky, kx), 4 each
            for (int s = 0; s < 8; ++s) {
                const int sz = s >> 2, sy = (s >> 1) & 1, sx = s & 1;
                float g[2][2][2];  // window tap (a, b, c): kernel tap 2 (1 - a) + s per axis
                for (int a = 0; a < 2; ++a)
                    for (int b = 0; b < 2; ++b)
                        for (int c = 0; c < 2; ++c)
                            g[a][b][c] = k[((2 * (1 - a) + sz) * 4 + 2 * (1 - b) + sy) * 4 + 2 * (1 - c) + sx];
                float gx[2][2][3], gy[2][3][3];  // G along x, then y; z as they are stored
                for (int a = 0; a < 2; ++a)
                    for (int b = 0; b < 2; ++b)
                        gx[a][b][0] = g[a][b][0], gx[a][b][1] = g[a][b][0] + g[a][b][1], gx[a][b][2] = g[a][b][1];
                for (int a = 0; a < 2; ++a)
                    for (int c = 0; c < 3; ++c)
                        gy[a][0][c] = gx[a][0][c], gy[a][1][c] = gx[a][0][c] + gx[a][1][c], gy[a][2][c] = gx[a][1][c];
                for (int bc = 0; bc < 9; ++bc) {
                    const float lower = gy[0][bc / 3][bc % 3], upper = gy[1][bc / 3][bc % 3];
                    const float along_z[3] = {lower, lower + upper, upper};
                    for (int a = 0; a < 3; ++a) u[((a * 9 + bc) * cin + ci) * n + s * cout + co] = along_z[a];
                }
            }
        }
}

// Tiles per register block, and vectors of output channels: 6 x 4 accumulators of AVX-512's 32
// registers, 6 x 2 of AVX2's (or SSE2's) 16.
constexpr int TILE_BLOCK = 6;
constexpr int vector_block(int bytes) { return bytes == 64 ? 4 : 2; }

// Tiles taken together (consecutive in (b, tz, ty, tx) order, so that small grids fill them
// too): each block of transformed weights is read once for their products, and their transformed
// inputs (27 x TILES x Ci) and products (27 x TILES x one register block) stay in a core's L2.
constexpr int64_t TILES = 24;

struct ForwardGeometry {
    int64_t batch, n[3], cin, cout, tiles[3];
    bool activation;
    float slope;
};

// The products of R tiles (their transformed inputs v, Ci apart) with the CV vectors of
// transformed weights at u (8 Co apart per input channel), stored at `products` (one row of CV
// vectors per tile, `stride` floats apart).
template <int BYTES, int R>
INLINE_INTO_CLONES void tile_products(const float* v, const float* u, int64_t cin, int64_t n8, float* products,
                                      int64_t stride) {
    using V = typename Vector<float, BYTES>::type;
    constexpr int L = BYTES / sizeof(float), CV = vector_block(BYTES);
    V acc[R][CV];
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < CV; ++k) acc[r][k] = V{};
    for (int64_t ci = 0; ci < cin; ++ci) {
        V uv[CV];
        for (int k = 0; k < CV; ++k) {
            load_vector(uv[k], u + ci * n8 + k * L);
            keep_in_register(uv[k]);  // one load for its R multiply-adds
        }
        for (int r = 0; r < R; ++r) {
            V vb = v[r * cin + ci] - V{};  // a broadcast: x - 0 folds to x, 0 + x does not (signed zeros)
            keep_in_register(vb);
            for (int k = 0; k < CV; ++k) acc[r][k] += vb * uv[k];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < CV; ++k) __builtin_memcpy(products + r * stride + k * L, &acc[r][k], sizeof(V));
}

// `count` (at most TILES) tiles from tile `first` (in (b, tz, ty, tx) order): input transform into
// v, the 27 products per block of output channels, and their output transform (plus bias) written
// to the output voxels in y. zeros: Ci zeros, read for the input voxels outside the grid.
template <typename T, int BYTES>
INLINE_INTO_CLONES void forward_tiles_body(const ForwardGeometry& g, const T* x, const T* u, const T* bias, T* y,
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
    const int64_t full = count / R * R, stride = 27 * CV * L;
    for (int64_t c0 = 0; c0 < n8; c0 += CV * L) {
        for (int abc = 0; abc < 27; ++abc) {
            const float* va = v + abc * TILES * cin;
            const float* ua = u + abc * cin * n8 + c0;
            float* pa = products + abc * CV * L;  // products[t][abc]: a tile's 27 together for its transform
            for (int64_t t = 0; t < full; t += R)
                tile_products<BYTES, R>(va + t * cin, ua, cin, n8, pa + t * stride, stride);
            const float* vr = va + full * cin;
            float* pr = pa + full * stride;
            switch (count - full) {  // the last tiles, fewer than R
                case 5: tile_products<BYTES, 5>(vr, ua, cin, n8, pr, stride); break;
                case 4: tile_products<BYTES, 4>(vr, ua, cin, n8, pr, stride); break;
                case 3: tile_products<BYTES, 3>(vr, ua, cin, n8, pr, stride); break;
                case 2: tile_products<BYTES, 2>(vr, ua, cin, n8, pr, stride); break;
                case 1: tile_products<BYTES, 1>(vr, ua, cin, n8, pr, stride); break;
                default: break;
            }
        }
        // Output transform: position j (jz, jy, jx) of a tile sums the products a in {jz, jz + 1},
        // b in {jy, jy + 1}, c in {jx, jx + 1}: summed along x and y per slab a, then two slabs
        // at a time, so that few vectors are live (AVX2 has 16 registers). Position j, parity s
        // is output voxel 4 t + 2 j + s - 1 along each axis; vector k holds output channels
        // co0.. of parity s.
        for (int64_t t = 0; t < count; ++t)
            for (int k = 0; k < CV; ++k) {
                const int64_t column = c0 + k * L, s = column / cout, co0 = column % cout;
                const float* m = products + t * stride + k * L;  // product abc at m + abc * CV * L
                V bias_vector, previous[2][2] = {};  // the slab before's sums along x and y, [jy][jx]
                load_vector(bias_vector, bias + co0);
                for (int a = 0; a < 3; ++a) {
                    V along_x[3][2], sums[2][2];
                    for (int bb = 0; bb < 3; ++bb) {
                        V p[3];
                        for (int c = 0; c < 3; ++c) load_vector(p[c], m + ((a * 3 + bb) * 3 + c) * CV * L);
                        along_x[bb][0] = p[0] + p[1], along_x[bb][1] = p[1] + p[2];
                    }
                    for (int jy = 0; jy < 2; ++jy)
                        for (int jx = 0; jx < 2; ++jx) sums[jy][jx] = along_x[jy][jx] + along_x[jy + 1][jx];
                    if (a > 0)  // output positions jz = a - 1: slabs a - 1 and a
                        for (int jyx = 0; jyx < 4; ++jyx) {
                            const int jy = jyx >> 1, jx = jyx & 1;
                            const int64_t oz = 4 * tile[t][1] + 2 * (a - 1) + (s >> 2) - 1,
                                          oy = 4 * tile[t][2] + 2 * jy + ((s >> 1) & 1) - 1,
                                          ox = 4 * tile[t][3] + 2 * jx + (s & 1) - 1;
                            if (oz < 0 || oz >= 2 * g.n[0] || oy < 0 || oy >= 2 * g.n[1] || ox < 0 || ox >= 2 * g.n[2])
                                continue;
                            const V value = previous[jy][jx] + sums[jy][jx] + bias_vector;
                            __builtin_memcpy(
                                y + (((tile[t][0] * 2 * g.n[0] + oz) * 2 * g.n[1] + oy) * 2 * g.n[2] + ox) * cout + co0,
                                &value, sizeof(V));
                        }
                    for (int jy = 0; jy < 2; ++jy)
                        for (int jx = 0; jx < 2; ++jx) previous[jy][jx] = sums[jy][jx];
                }
            }
    }
}

SIMD_DISPATCH(forward_tiles, forward_tiles_body,
              (const ForwardGeometry& g, const T* x, const T* u, const T* bias, T* y, int64_t first, int64_t count,
               T* v, T* products, const T* zeros),
              (g, x, u, bias, y, first, count, v, products, zeros))

// y (B, 2 n0, 2 n1, 2 n2, Co) = conv_transpose3d(leaky_relu(x) if activation else x, weight, bias,
// stride 2, padding 1), x (B, n0, n1, n2, Ci) and y channels last, weight (Ci, Co, 4, 4, 4), bias
// (Co) or empty; Co a multiple of 16. Each thread takes a share of the tiles.
void upconv_forward(const Array<float>& x, const Array<float>& weight, const Array<float>& bias, Array<float>& y,
                    bool activation, float slope, int threads) {
    check(x.ndim() == 5 && y.ndim() == 5, "x and y must be 5-D, channels last: (B, D, H, W, C)");
    ForwardGeometry g{x.shape(0), {x.shape(1), x.shape(2), x.shape(3)}, x.shape(4), y.shape(4), {}, activation, slope};
    check(y.shape(0) == g.batch, "x and y differ in batch size");
    for (int a = 0; a < 3; ++a) {
        check(y.shape(a + 1) == 2 * g.n[a], "y's grid must be twice x's");
        g.tiles[a] = g.n[a] / 2 + 1;  // j = 0..n in pairs
    }
    check(g.cout % 16 == 0, "y's channels must be a multiple of 16");
    check(weight.ndim() == 5 && weight.shape(0) == g.cin && weight.shape(1) == g.cout && weight.shape(2) == 4 &&
              weight.shape(3) == 4 && weight.shape(4) == 4,
          "weight must be (Ci, Co, 4, 4, 4)");
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
        transform_weights(ws, g.cin, g.cout, u.data());  // shared among the team (omp for, then its barrier)
        // products: 27 x TILES x the widest register block (4 x 16 floats)
        std::vector<float> v(size_t(27 * TILES * g.cin)), products(size_t(27 * TILES * 64));
        int64_t first, last;
        share(tiles, &first, &last);
        for (int64_t t = first; t < last; t += TILES)
            forward_tiles<float>(g, xs, u.data(), bs, ys, t, std::min(TILES, last - t), v.data(), products.data(),
                                 zeros.data());
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
    define_simd_bytes(module);
}
