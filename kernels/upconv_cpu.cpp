// The weight gradient of the U-Net decoder's transposed convolutions on the CPU; built by
// setup.py as mgr_engine._upconv_cpu (Python side: kernels/upconv_cpu.py).
//
// ConvTranspose3d(kernel 4, stride 2, padding 1) maps input voxel i to output voxels
// o = 2 i - 1 + k (k = 0..3 per axis), so its weight gradient is
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
                V xb = V{} + xv[c];
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

}  // namespace

PYBIND11_MODULE(_upconv_cpu, module) {
    module.doc() = "The weight gradient of the U-Net's ConvTranspose3d(kernel 4, stride 2, padding 1) on the CPU "
                   "(mgr_engine.kernels.upconv_cpu)";
    // noconvert: a silent dtype/contiguity copy of the output array would drop the result.
    module.def("upconv_weight_grad", &upconv_weight_grad<float>, py::arg("x").noconvert(),
               py::arg("grad").noconvert(), py::arg("grad_weight").noconvert(), py::arg("threads"),
               "grad_weight (Ci, Co, 4, 4, 4) of conv_transpose3d(x, weight, stride=2, padding=1), from x passed as "
               "(B, D, H, W, Ci) and grad as (B, 2D, 2H, 2W, Co), channels last.");
    define_simd_bytes(module);
}
