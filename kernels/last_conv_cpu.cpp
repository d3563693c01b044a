// The U-Net's last convolution on the CPU, forward and backward; built by setup.py as
// mgr_engine._last_conv_cpu (Python side: kernels/last_conv_cpu.py).
//
// Conv3d with a 3x3x3 kernel, stride 1, zero padding 1, Cin input channels and 3 output
// channels (the displacement): out[b, c, z, y, x] = bias[c] + sum over ci, dz, dy, dx of
// weight[c, ci, dz, dy, dx] * in[b, z + dz - 1, y + dy - 1, x + dx - 1, ci].
// Why: oneDNN blocks output channels by 16, so with 3 of them it does 5x the arithmetic; at
// 175^3 this one layer took 0.24 s forward and 0.52 s backward of a full-resolution U-Net
// (2 cores), about as much as the rest of its forward.
//
// Layouts: the input is channels-last (B, D, H, W, Cin), as the engine's network runs; the
// output and its gradient are planar (B, 3, D, H, W), the layout the warps read the field in.
// Every pass vectorizes along x: each input z-slice is transposed once, per thread, into rows
// of (Cin, W + padding), so that a block of L output voxels along x is L contiguous lanes.
// The three passes are compiled for AVX-512, AVX2+FMA and baseline x86-64 and the best the
// CPU has is picked at load time (target_clones), since the package is built without -march.

#ifdef _OPENMP
#include <omp.h>
#else
inline int omp_get_thread_num() { return 0; }
inline int omp_get_num_threads() { return 1; }
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernel.h"  // Array, check, CPU_DISPATCH, INLINE_INTO_CLONES

namespace {

constexpr int COUT = 3;
constexpr int GROUP = 4;  // blocks of lanes along x computed together, sharing each weight broadcast

// Lanes per block along x: one 64-byte vector.
template <typename T>
constexpr int64_t lanes() { return 64 / sizeof(T); }

struct Shape {
    int64_t batch, depth, height, width, cin;
    int64_t padded;  // row length of a transposed slice: x = -1 .. W - 1 + padding, whole blocks
    int64_t blocks;  // blocks of lanes along x
    template <typename T>
    Shape(const Array<T>& input, const Array<T>& weight) {
        check(input.ndim() == 5, "input must be (B, D, H, W, Cin), channels last");
        batch = input.shape(0), depth = input.shape(1), height = input.shape(2), width = input.shape(3);
        cin = input.shape(4);
        check(weight.ndim() == 5 && weight.shape(0) == COUT && weight.shape(1) == cin && weight.shape(2) == 3 &&
                  weight.shape(3) == 3 && weight.shape(4) == 3,
              "weight must be (3, Cin, 3, 3, 3)");
        blocks = (width + GROUP * lanes<T>() - 1) / (GROUP * lanes<T>()) * GROUP;  // whole groups
        padded = blocks * lanes<T>() + 2;
    }
    int64_t slices() const { return batch * depth; }
    int64_t voxels_per_slice() const { return height * width; }
};

// Three z-slices of a volume with `channels` channels, each in padded rows: row y of channel k
// starts at (y * channels + k) * padded, and x sits at index x + 1 (index 0 and those past W
// stay zero). Each thread keeps the three slices its current output slice needs. The source
// is channels-last, (B, D, H, W, channels) (the input: transposed), or planar,
// (B, channels, D, H, W) (the output gradient: rows copied).
template <typename T>
class SliceRing {
   public:
    SliceRing(const Shape& s, int64_t channels, bool channels_last)
        : s_(s), channels_(channels), channels_last_(channels_last),
          data_(3 * size_t(s.height * channels * s.padded), T(0)) {}

    // Slice z of batch item b of `source`, or nullptr outside the volume.
    const T* get(const T* source, int64_t b, int64_t z) {
        if (z < 0 || z >= s_.depth) return nullptr;
        const int slot = int(z % 3);
        T* out = data_.data() + size_t(slot) * size_t(s_.height * channels_ * s_.padded);
        if (key_[slot] == b * s_.depth + z) return out;
        key_[slot] = b * s_.depth + z;
        const int64_t plane = s_.voxels_per_slice();
        for (int64_t y = 0; y < s_.height; ++y)
            for (int64_t k = 0; k < channels_; ++k) {
                T* dst = out + (y * channels_ + k) * s_.padded + 1;
                if (channels_last_) {  // contiguous writes; a row's reads stay in L1
                    const T* from = source + ((b * s_.depth + z) * plane + y * s_.width) * channels_ + k;
                    for (int64_t x = 0; x < s_.width; ++x) dst[x] = from[x * channels_];
                } else {
                    std::memcpy(dst, source + ((b * channels_ + k) * s_.depth + z) * plane + y * s_.width,
                                sizeof(T) * s_.width);
                }
            }
        return out;
    }

   private:
    const Shape& s_;
    const int64_t channels_;
    const bool channels_last_;
    std::vector<T> data_;
    int64_t key_[3] = {-1, -1, -1};
};

// The first and last (exclusive) output slice of this thread's share.
inline void share(int64_t n, int64_t* first, int64_t* last) {
    const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
    *first = n * tid / team, *last = n * (tid + 1) / team;
}

// ---------------------------------------------------------------- forward
// Output slice z of one batch item: rows[dz] are the transposed input slices z - 1, z, z + 1.
template <typename T>
INLINE_INTO_CLONES void forward_slice_body(const Shape& s, const T* const rows[3], const T* weight, const T* bias, T* out) {
    constexpr int64_t L = lanes<T>();
    constexpr int G = GROUP;  // blocks per pass: each weight broadcast feeds 3 x G accumulators
    const int64_t taps = s.cin * 27, channel = s.depth * s.voxels_per_slice();  // planar output
    for (int64_t y = 0; y < s.height; ++y) {
        for (int64_t x0 = 0; x0 < s.width; x0 += G * L) {
            T acc[3][G][L];
            for (int c = 0; c < 3; ++c)
                for (int j = 0; j < G; ++j)
                    for (int64_t l = 0; l < L; ++l) acc[c][j][l] = T(0);
            for (int dz = 0; dz < 3; ++dz) {
                if (!rows[dz]) continue;
                for (int dy = 0; dy < 3; ++dy) {
                    const int64_t yy = y + dy - 1;
                    if (yy < 0 || yy >= s.height) continue;
                    for (int64_t ci = 0; ci < s.cin; ++ci) {
                        const T* row = rows[dz] + (yy * s.cin + ci) * s.padded + x0;
                        const T* w = weight + ci * 27 + dz * 9 + dy * 3;
                        for (int dx = 0; dx < 3; ++dx) {
                            const T w0 = w[dx], w1 = w[taps + dx], w2 = w[2 * taps + dx];
                            for (int j = 0; j < G; ++j) {
                                const T* in = row + dx + j * L;  // x + dx - 1, shifted by the padding's 1
#pragma omp simd
                                for (int64_t l = 0; l < L; ++l) {
                                    acc[0][j][l] += w0 * in[l];
                                    acc[1][j][l] += w1 * in[l];
                                    acc[2][j][l] += w2 * in[l];
                                }
                            }
                        }
                    }
                }
            }
            // Constant indices into acc (a computed one would keep it out of registers).
            for (int c = 0; c < 3; ++c) {
                T* o = out + c * channel + y * s.width + x0;
                for (int j = 0; j < G; ++j)
                    for (int64_t l = 0; l < L; ++l)
                        if (x0 + j * L + l < s.width) o[j * L + l] = acc[c][j][l] + bias[c];
            }
        }
    }
}

CPU_DISPATCH void forward_slice(const Shape& s, const float* const rows[3], const float* weight, const float* bias,
                                float* out) {
    forward_slice_body(s, rows, weight, bias, out);
}
CPU_DISPATCH void forward_slice(const Shape& s, const double* const rows[3], const double* weight,
                                const double* bias, double* out) {
    forward_slice_body(s, rows, weight, bias, out);
}

template <typename T>
void last_conv_forward(const Array<T>& input, const Array<T>& weight, const Array<T>& bias, Array<T>& out,
                       int threads) {
    const Shape s(input, weight);
    check(bias.ndim() == 1 && bias.shape(0) == COUT, "bias must have 3 elements");
    check(out.ndim() == 5 && out.shape(0) == s.batch && out.shape(1) == COUT && out.shape(2) == s.depth &&
              out.shape(3) == s.height && out.shape(4) == s.width,
          "out must be (B, 3, D, H, W)");
    const T* in = input.data();
    const T* w = weight.data();
    const T* b = bias.data();
    T* o = out.mutable_data();
    py::gil_scoped_release release;
#pragma omp parallel num_threads(std::max(threads, 1))
    {
        SliceRing<T> ring(s, s.cin, true);
        int64_t first, last;
        share(s.slices(), &first, &last);
        for (int64_t i = first; i < last; ++i) {
            const int64_t item = i / s.depth, z = i % s.depth;
            const T* rows[3] = {ring.get(in, item, z - 1), ring.get(in, item, z), ring.get(in, item, z + 1)};
            forward_slice(s, rows, w, b, o + (item * COUT * s.depth + z) * s.voxels_per_slice());
        }
    }
}

// ---------------------------------------------------------------- backward
// grad_input[b, z, y, x, ci] = sum over c, dz, dy, dx of weight[c, ci, dz, dy, dx] *
// grad_out[b, c, z - dz + 1, y - dy + 1, x - dx + 1]: the same stencil, flipped, over the three
// planar gradient channels. grads[dz] are slices z - dz + 1 of grad_out in SliceRing's padded
// rows (channel c of row y at (y * 3 + c) * padded, x at x + 1); three input channels and G
// blocks along x at a time, so that the accumulators stay in registers.
template <typename T>
INLINE_INTO_CLONES void grad_input_slice_body(const Shape& s, const T* const grads[3], const T* weight, T* out) {
    constexpr int64_t L = lanes<T>();
    constexpr int G = GROUP, CB = 3;  // CB input channels x G blocks of accumulators per pass
    const int64_t taps = s.cin * 27;
    for (int64_t y = 0; y < s.height; ++y) {
        T* out_row = out + y * s.width * s.cin;
        for (int64_t x0 = 0; x0 < s.width; x0 += G * L) {
            for (int64_t ci0 = 0; ci0 < s.cin; ci0 += CB) {
                const int cb = int(std::min<int64_t>(CB, s.cin - ci0));
                T acc[CB][G][L];
                for (int k = 0; k < CB; ++k)
                    for (int j = 0; j < G; ++j)
                        for (int64_t l = 0; l < L; ++l) acc[k][j][l] = T(0);
                for (int dz = 0; dz < 3; ++dz) {
                    if (!grads[dz]) continue;
                    for (int dy = 0; dy < 3; ++dy) {
                        const int64_t yy = y - dy + 1;
                        if (yy < 0 || yy >= s.height) continue;
                        for (int c = 0; c < COUT; ++c) {
                            const T* row = grads[dz] + (yy * COUT + c) * s.padded + x0;
                            const T* w = weight + c * taps + ci0 * 27 + dz * 9 + dy * 3;
                            for (int dx = 0; dx < 3; ++dx) {
                                T wk[CB];
                                for (int k = 0; k < CB; ++k) wk[k] = k < cb ? w[k * 27 + dx] : T(0);
                                for (int j = 0; j < G; ++j) {
                                    const T* g = row + 2 - dx + j * L;  // x - dx + 1, shifted by the padding's 1
#pragma omp simd
                                    for (int64_t l = 0; l < L; ++l)
                                        for (int k = 0; k < CB; ++k) acc[k][j][l] += wk[k] * g[l];
                                }
                            }
                        }
                    }
                }
                for (int j = 0; j < G; ++j)  // constant indices into acc, as in the forward
                    for (int64_t l = 0; l < L; ++l)
                        if (x0 + j * L + l < s.width)
                            for (int k = 0; k < CB; ++k)
                                if (k < cb) out_row[(x0 + j * L + l) * s.cin + ci0 + k] = acc[k][j][l];
            }
        }
    }
}

CPU_DISPATCH void grad_input_slice(const Shape& s, const float* const grads[3], const float* weight, float* out) {
    grad_input_slice_body(s, grads, weight, out);
}
CPU_DISPATCH void grad_input_slice(const Shape& s, const double* const grads[3], const double* weight, double* out) {
    grad_input_slice_body(s, grads, weight, out);
}

// grad_weight[c, ci, dz, dy, dx] = sum over voxels of grad_out[c, z, y, x] *
// in[z + dz - 1, y + dy - 1, x + dx - 1, ci], for output slice z: partial sums per lane in
// sums[((c * cin + ci) * 27 + tap) * L + l], reduced over lanes (and threads) at the end.
// grad is the output gradient's slice z in SliceRing's padded rows.
template <typename T>
INLINE_INTO_CLONES void grad_weight_slice_body(const Shape& s, const T* const rows[3], const T* grad, T* sums) {
    constexpr int64_t L = lanes<T>();
    constexpr int CB = 2;  // input channels per pass: each loaded gradient lane feeds 3 x 3 x CB sums
    for (int64_t y = 0; y < s.height; ++y) {
        const T* g0 = grad + (y * COUT + 0) * s.padded + 1;
        const T* g1 = grad + (y * COUT + 1) * s.padded + 1;
        const T* g2 = grad + (y * COUT + 2) * s.padded + 1;
        for (int dz = 0; dz < 3; ++dz) {
            if (!rows[dz]) continue;
            for (int dy = 0; dy < 3; ++dy) {
                const int64_t yy = y + dy - 1;
                if (yy < 0 || yy >= s.height) continue;
                for (int64_t ci0 = 0; ci0 < s.cin; ci0 += CB) {
                    const int cb = int(std::min<int64_t>(CB, s.cin - ci0));
                    // A lone last channel reads its own row twice and keeps the first sums only.
                    const T* in[CB];
                    for (int k = 0; k < CB; ++k)
                        in[k] = rows[dz] + (yy * s.cin + ci0 + (k < cb ? k : 0)) * s.padded;  // in[x + dx]: x + dx - 1
                    T p[CB][3][3][L];  // [channel][c][dx][lane]
                    for (int k = 0; k < CB; ++k)
                        for (int c = 0; c < 3; ++c)
                            for (int dx = 0; dx < 3; ++dx)
                                for (int64_t l = 0; l < L; ++l) p[k][c][dx][l] = T(0);
                    for (int64_t x0 = 0; x0 < s.width; x0 += L) {
#pragma omp simd
                        for (int64_t l = 0; l < L; ++l) {
                            const T a = g0[x0 + l], b = g1[x0 + l], c = g2[x0 + l];
                            for (int k = 0; k < CB; ++k)
                                for (int dx = 0; dx < 3; ++dx) {
                                    const T v = in[k][x0 + dx + l];
                                    p[k][0][dx][l] += a * v;
                                    p[k][1][dx][l] += b * v;
                                    p[k][2][dx][l] += c * v;
                                }
                        }
                    }
                    for (int k = 0; k < cb; ++k)
                        for (int c = 0; c < 3; ++c)
                            for (int dx = 0; dx < 3; ++dx) {
                                T* q = sums + ((c * s.cin + ci0 + k) * 27 + dz * 9 + dy * 3 + dx) * L;
#pragma omp simd
                                for (int64_t l = 0; l < L; ++l) q[l] += p[k][c][dx][l];
                            }
                }
            }
        }
    }
}

CPU_DISPATCH void grad_weight_slice(const Shape& s, const float* const rows[3], const float* grad, float* sums) {
    grad_weight_slice_body(s, rows, grad, sums);
}
CPU_DISPATCH void grad_weight_slice(const Shape& s, const double* const rows[3], const double* grad, double* sums) {
    grad_weight_slice_body(s, rows, grad, sums);
}

template <typename T>
void last_conv_backward(const Array<T>& input, const Array<T>& weight, const Array<T>& grad_out,
                        Array<T>& grad_input, Array<T>& grad_weight, bool need_input, bool need_weight,
                        int threads) {
    const Shape s(input, weight);
    check(grad_out.ndim() == 5 && grad_out.shape(0) == s.batch && grad_out.shape(1) == COUT &&
              grad_out.shape(2) == s.depth && grad_out.shape(3) == s.height && grad_out.shape(4) == s.width,
          "grad_out must be (B, 3, D, H, W)");
    if (need_input) check(grad_input.ndim() == 5 && grad_input.size() == input.size(), "grad_input must match input");
    if (need_weight) check(grad_weight.size() == weight.size(), "grad_weight must match weight");
    threads = std::max(threads, 1);
    constexpr int64_t L = lanes<T>();
    const int64_t weights = int64_t(weight.size());
    const T* in = input.data();
    const T* w = weight.data();
    const T* g = grad_out.data();
    T* gi = need_input ? grad_input.mutable_data() : nullptr;
    T* gw = need_weight ? grad_weight.mutable_data() : nullptr;
    py::gil_scoped_release release;
    std::vector<std::vector<T>> sums(threads);
    int team_size = 1;
#pragma omp parallel num_threads(threads)
    {
        const int tid = omp_get_thread_num();
#pragma omp single
        team_size = omp_get_num_threads();
        SliceRing<T> grads(s, COUT, false), rows(s, s.cin, true);
        if (need_weight) sums[tid].assign(size_t(weights * L), T(0));
        int64_t first, last;
        share(s.slices(), &first, &last);
        for (int64_t i = first; i < last; ++i) {
            const int64_t item = i / s.depth, z = i % s.depth;
            if (need_input) {
                const T* flipped[3] = {grads.get(g, item, z + 1), grads.get(g, item, z), grads.get(g, item, z - 1)};
                grad_input_slice(s, flipped, w, gi + i * s.voxels_per_slice() * s.cin);
            }
            if (need_weight) {
                const T* slices[3] = {rows.get(in, item, z - 1), rows.get(in, item, z), rows.get(in, item, z + 1)};
                grad_weight_slice(s, slices, grads.get(g, item, z), sums[tid].data());
            }
        }
    }
    if (need_weight)
        for (int64_t k = 0; k < weights; ++k) {
            T total = T(0);
            for (int t = 0; t < team_size; ++t)
                for (int64_t l = 0; l < L; ++l) total += sums[t][size_t(k * L + l)];
            gw[k] = total;
        }
}

template <typename T>
void define(py::module_& module) {
    // noconvert: a silent dtype/contiguity copy of an output array would drop the result.
    module.def("last_conv", &last_conv_forward<T>, py::arg("input").noconvert(), py::arg("weight").noconvert(),
               py::arg("bias").noconvert(), py::arg("out").noconvert(), py::arg("threads"),
               "out (B, 3, D, H, W) = conv3d(input, weight, bias, padding=1) for a channels-last input passed as "
               "(B, D, H, W, Cin) and weight (3, Cin, 3, 3, 3).");
    module.def("last_conv_backward", &last_conv_backward<T>, py::arg("input").noconvert(),
               py::arg("weight").noconvert(), py::arg("grad_out").noconvert(), py::arg("grad_input").noconvert(),
               py::arg("grad_weight").noconvert(), py::arg("need_input"), py::arg("need_weight"), py::arg("threads"),
               "Gradients of last_conv with respect to input (written channels-last, (B, D, H, W, Cin)) and weight.");
}

}  // namespace

PYBIND11_MODULE(_last_conv_cpu, module) {
    module.doc() = "The U-Net's last convolution (3x3x3, 3 output channels) on the CPU with OpenMP, forward and "
                   "backward (mgr_engine.kernels.last_conv_cpu)";
    define<float>(module);
    define<double>(module);
}
