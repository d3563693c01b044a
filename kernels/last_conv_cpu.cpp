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
// The three passes are compiled for AVX-512, AVX2+FMA and baseline x86-64 in vectors of that
// width (64, 32, 16 bytes), and the widest the CPU runs is picked at run time (simd_bytes()),
// since the package is built without -march. Each loaded vector feeds its multiply-adds from a
// register (keep_in_register): GCC loaded it again for each, and the passes ran at a third of
// the FMA peak (RESULTS.md, forty-fourth session).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_kernel.h"  // Array, check, share, INLINE_INTO_CLONES, SIMD_DISPATCH, Vector, load_vector,
                         // keep_in_register

#ifdef SIMD_LEVELS
#include <immintrin.h>  // transpose_block
#endif

namespace {

constexpr int COUT = 3;

// Lanes per block along x: one 64-byte vector (the widest; narrower vectors divide it).
template <typename T>
constexpr int64_t lanes() { return 64 / sizeof(T); }

// Blocks of lanes along x computed together, sharing each weight broadcast: 3 x 6 accumulators
// of AVX-512's 32 vector registers, 3 x 3 of AVX2's (or SSE2's) 16.
constexpr int group(int bytes) { return bytes == 64 ? 6 : 3; }

struct Shape {
    int64_t batch, depth, height, width, cin;
    // A transposed slice's rows: x = 0 at index `origin`, 64-byte aligned (so that the loads at
    // x and x - 1 + dx of a pass over whole vectors split a cache line two times in three, not
    // three), and row length `padded`, whole 64-byte vectors with room for x = -1 and for a last
    // vector's x + 1.
    int64_t origin, padded;
    template <typename T>
    Shape(const Array<T>& input, const Array<T>& weight) {
        check(input.ndim() == 5, "input must be (B, D, H, W, Cin), channels last");
        batch = input.shape(0), depth = input.shape(1), height = input.shape(2), width = input.shape(3);
        cin = input.shape(4);
        check(weight.ndim() == 5 && weight.shape(0) == COUT && weight.shape(1) == cin && weight.shape(2) == 3 &&
                  weight.shape(3) == 3 && weight.shape(4) == 3,
              "weight must be (3, Cin, 3, 3, 3)");
        origin = lanes<T>();
        padded = ((width + lanes<T>() - 1) / lanes<T>() + 2) * lanes<T>();
    }
    int64_t slices() const { return batch * depth; }
    int64_t voxels_per_slice() const { return height * width; }
};

// An N x N block transposed in registers: the N vectors at `from`, `from_stride` apart, as N
// vectors at `to`, `to_stride` apart, vector k holding element k of each (N = 16 for AVX-512, 8
// for AVX2: the textbook unpack / shuffle / lane-permute transposes). Channels-last voxels into
// planar rows (from_stride: the channel count) or back (to_stride: the channel count).
#ifdef SIMD_LEVELS
SIMD_AVX512 inline void transpose_block(const float* from, int64_t from_stride, float* to, int64_t to_stride,
                                        std::integral_constant<int, 64>) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(from + i * from_stride);
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 2; ++i)
        for (int k = 0; k < 4; ++k) {
            t[8 * i + k] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + k + 4], 0x88);
            t[8 * i + k + 4] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + k + 4], 0xdd);
        }
    for (int k = 0; k < 8; ++k) {
        _mm512_storeu_ps(to + k * to_stride, _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88));
        _mm512_storeu_ps(to + (k + 8) * to_stride, _mm512_shuffle_f32x4(t[k], t[k + 8], 0xdd));
    }
}
SIMD_AVX2 inline void transpose_block(const float* from, int64_t from_stride, float* to, int64_t to_stride,
                                      std::integral_constant<int, 32>) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(from + i * from_stride);
    for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
        r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int k = 0; k < 4; ++k) {
        _mm256_storeu_ps(to + k * to_stride, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
        _mm256_storeu_ps(to + (k + 4) * to_stride, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
    }
}
#endif

// One row of `width` voxels between channels-last (voxel x's channel k at x * channels + k of
// `voxels`) and planar rows (channel k's row at k * padded of `rows`), either way: whole N x N
// blocks in registers, the rest (and double) one value at a time.
template <typename T, int BYTES, bool TO_ROWS>
INLINE_INTO_CLONES void transpose_row(std::conditional_t<TO_ROWS, const T*, T*> voxels, int64_t width,
                                      int64_t channels, std::conditional_t<TO_ROWS, T*, const T*> rows,
                                      int64_t padded) {
    constexpr int64_t N = std::is_same_v<T, float> && BYTES > 16 ? BYTES / 4 : 0;  // 0: none (double, SSE2)
    auto one = [&](int64_t k, int64_t x) __attribute__((always_inline)) {
        if constexpr (TO_ROWS) rows[k * padded + x] = voxels[x * channels + k];
        else voxels[x * channels + k] = rows[k * padded + x];
    };
    int64_t k0 = 0;
    if constexpr (N > 0) {
        for (; k0 + N <= channels; k0 += N) {
            int64_t x = 0;
            for (; x + N <= width; x += N) {
                if constexpr (TO_ROWS)
                    transpose_block(voxels + x * channels + k0, channels, rows + k0 * padded + x, padded,
                                    std::integral_constant<int, BYTES>{});
                else
                    transpose_block(rows + k0 * padded + x, padded, voxels + x * channels + k0, channels,
                                    std::integral_constant<int, BYTES>{});
            }
            for (int64_t k = k0; k < k0 + N; ++k)
                for (int64_t xx = x; xx < width; ++xx) one(k, xx);
        }
    }
    for (int64_t k = k0; k < channels; ++k)
        for (int64_t x = 0; x < width; ++x) one(k, x);
}

// A channels-last slice (height, width, channels) into rows: row y of channel k at
// (y * channels + k) * padded of `to`. One value at a time throughout, the transposition drew a
// third of the forward's samples at 175^3; in registers the forward went 59 -> 52 ms (AVX-512).
// AVX-512 gathers were slower than the scalar loop (RESULTS.md, fiftieth session).
template <typename T, int BYTES>
INLINE_INTO_CLONES void transpose_slice_body(const T* from, int64_t height, int64_t width, int64_t channels, T* to,
                                             int64_t padded) {
    for (int64_t y = 0; y < height; ++y)
        transpose_row<T, BYTES, true>(from + y * width * channels, width, channels, to + y * channels * padded, padded);
}

SIMD_DISPATCH(transpose_slice, transpose_slice_body,
              (const T* from, int64_t height, int64_t width, int64_t channels, T* to, int64_t padded),
              (from, height, width, channels, to, padded))

// The first 64-byte aligned element of a buffer allocated with lanes<T>() elements to spare.
template <typename T>
T* aligned_to_64_bytes(T* data) {
    return data + (64 - reinterpret_cast<uintptr_t>(data) % 64) % 64 / sizeof(T);
}

// Three z-slices of a volume with `channels` channels, each in padded rows: row y of channel k
// starts at (y * channels + k) * padded, and x sits at index x + origin (the indices before
// and those past W stay zero). Each thread keeps the three slices its current output slice
// needs. The source is channels-last, (B, D, H, W, channels) (the input: transposed), or
// planar, (B, channels, D, H, W) (the output gradient: rows copied).
template <typename T>
class SliceRing {
   public:
    SliceRing(const Shape& s, int64_t channels, bool channels_last)
        : s_(s), channels_(channels), channels_last_(channels_last),
          data_(3 * size_t(s.height * channels * s.padded) + size_t(lanes<T>()), T(0)),
          base_(aligned_to_64_bytes(data_.data())) {}

    // Slice z of batch item b of `source`, or nullptr outside the volume.
    const T* get(const T* source, int64_t b, int64_t z) {
        if (z < 0 || z >= s_.depth) return nullptr;
        const int slot = int(z % 3);
        T* out = base_ + size_t(slot) * size_t(s_.height * channels_ * s_.padded);
        if (key_[slot] == b * s_.depth + z) return out;
        key_[slot] = b * s_.depth + z;
        const int64_t plane = s_.voxels_per_slice();
        if (channels_last_) {
            transpose_slice(source + (b * s_.depth + z) * plane * channels_, s_.height, s_.width, channels_,
                            out + s_.origin, s_.padded);
            return out;
        }
        for (int64_t y = 0; y < s_.height; ++y)
            for (int64_t k = 0; k < channels_; ++k)
                std::memcpy(out + (y * channels_ + k) * s_.padded + s_.origin,
                            source + ((b * channels_ + k) * s_.depth + z) * plane + y * s_.width, sizeof(T) * s_.width);
        return out;
    }

   private:
    const Shape& s_;
    const int64_t channels_;
    const bool channels_last_;
    std::vector<T> data_;
    T* const base_;  // data_'s first 64-byte aligned element: each row's x = 0 is aligned
    int64_t key_[3] = {-1, -1, -1};
};

// The last `left` blocks of a row (fewer than a group), as one pass of that many.
template <int G, typename Pass>
INLINE_INTO_CLONES void pass_tail(int left, Pass& pass, int64_t y, int64_t x0) {
    if constexpr (G > 0) {
        if (left == G) return pass(std::integral_constant<int, G>{}, y, x0);
        pass_tail<G - 1>(left, pass, y, x0);
    }
}

// pass(std::integral_constant<int, G>{}, y, x0) over row y of a slice, G blocks of L lanes from
// x0 at a time: whole groups of group(BYTES), then the rest as one pass of fewer.
template <typename T, int BYTES, typename Pass>
INLINE_INTO_CLONES void over_groups_of_row(const Shape& s, int64_t y, Pass& pass) {
    constexpr int64_t L = BYTES / sizeof(T);
    constexpr int G = group(BYTES);
    const int64_t blocks = (s.width + L - 1) / L;
    int64_t j0 = 0;
    for (; j0 + G <= blocks; j0 += G) pass(std::integral_constant<int, G>{}, y, j0 * L);
    pass_tail<G - 1>(int(blocks - j0), pass, y, j0 * L);
}

// The same over each row of a slice.
template <typename T, int BYTES, typename Pass>
INLINE_INTO_CLONES void over_groups(const Shape& s, Pass pass) {
    for (int64_t y = 0; y < s.height; ++y) over_groups_of_row<T, BYTES>(s, y, pass);
}

// ---------------------------------------------------------------- forward
// G blocks of L = BYTES / sizeof(T) output voxels along x, from x0, of output row y of one
// slice: rows[dz] are the transposed input slices z - 1, z, z + 1.
template <typename T, int BYTES, int G>
INLINE_INTO_CLONES void forward_blocks(const Shape& s, const T* const rows[3], const T* weight, const T* bias, T* out,
                                       int64_t y, int64_t x0) {
    using V = typename Vector<T, BYTES>::type;
    constexpr int64_t L = BYTES / sizeof(T);
    const int64_t taps = s.cin * 27, channel = s.depth * s.voxels_per_slice();  // planar output
    V acc[3][G];
    for (int c = 0; c < 3; ++c)
        for (int j = 0; j < G; ++j) acc[c][j] = V{};
    for (int dz = 0; dz < 3; ++dz) {
        if (!rows[dz]) continue;
        for (int dy = 0; dy < 3; ++dy) {
            const int64_t yy = y + dy - 1;
            if (yy < 0 || yy >= s.height) continue;
            for (int64_t ci = 0; ci < s.cin; ++ci) {
                const T* row = rows[dz] + (yy * s.cin + ci) * s.padded + x0;
                const T* w = weight + ci * 27 + dz * 9 + dy * 3;
                for (int dx = 0; dx < 3; ++dx) {
                    const V w0 = V{} + w[dx], w1 = V{} + w[taps + dx], w2 = V{} + w[2 * taps + dx];
                    for (int j = 0; j < G; ++j) {
                        V in;
                        load_vector(in, row + s.origin - 1 + dx + j * L);  // x + dx - 1
                        keep_in_register(in);  // one load for the three channels
                        acc[0][j] += w0 * in;
                        acc[1][j] += w1 * in;
                        acc[2][j] += w2 * in;
                    }
                }
            }
        }
    }
    for (int c = 0; c < 3; ++c) {
        T* o = out + c * channel + y * s.width + x0;
        for (int j = 0; j < G; ++j)
            for (int64_t l = 0; l < L; ++l)
                if (x0 + j * L + l < s.width) o[j * L + l] = acc[c][j][l] + bias[c];
    }
}

// Output slice z of one batch item, in vectors of BYTES bytes.
template <typename T, int BYTES>
INLINE_INTO_CLONES void forward_slice_body(const Shape& s, const T* const rows[3], const T* weight, const T* bias,
                                           T* out) {
    over_groups<T, BYTES>(s, [&](auto blocks, int64_t y, int64_t x0) __attribute__((always_inline)) {
        forward_blocks<T, BYTES, decltype(blocks)::value>(s, rows, weight, bias, out, y, x0);
    });
}

SIMD_DISPATCH(forward_slice, forward_slice_body,
              (const Shape& s, const T* const rows[3], const T* weight, const T* bias, T* out),
              (s, rows, weight, bias, out))

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
// rows (channel c of row y at (y * 3 + c) * padded, x at x + origin). CB input channels x G
// blocks of L = BYTES / sizeof(T) voxels along x from x0, of row y, at a time, so that the
// accumulators stay in registers, written as planar rows (channel k at k * padded of `rows`).
template <typename T, int BYTES, int G>
INLINE_INTO_CLONES void grad_input_blocks(const Shape& s, const T* const grads[3], const T* weight, T* rows,
                                          int64_t y, int64_t x0) {
    using V = typename Vector<T, BYTES>::type;
    constexpr int64_t L = BYTES / sizeof(T);
    constexpr int CB = 3;
    const int64_t taps = s.cin * 27;
    for (int64_t ci0 = 0; ci0 < s.cin; ci0 += CB) {
        const int cb = int(std::min<int64_t>(CB, s.cin - ci0));
        V acc[CB][G];
        for (int k = 0; k < CB; ++k)
            for (int j = 0; j < G; ++j) acc[k][j] = V{};
        for (int dz = 0; dz < 3; ++dz) {
            if (!grads[dz]) continue;
            for (int dy = 0; dy < 3; ++dy) {
                const int64_t yy = y - dy + 1;
                if (yy < 0 || yy >= s.height) continue;
                for (int c = 0; c < COUT; ++c) {
                    const T* row = grads[dz] + (yy * COUT + c) * s.padded + x0;
                    const T* w = weight + c * taps + ci0 * 27 + dz * 9 + dy * 3;
                    for (int dx = 0; dx < 3; ++dx) {
                        V wk[CB];
                        for (int k = 0; k < CB; ++k) wk[k] = V{} + (k < cb ? w[k * 27 + dx] : T(0));
                        for (int j = 0; j < G; ++j) {
                            V g;
                            load_vector(g, row + s.origin + 1 - dx + j * L);  // x - dx + 1
                            keep_in_register(g);  // one load for the CB channels
                            for (int k = 0; k < CB; ++k) acc[k][j] += wk[k] * g;
                        }
                    }
                }
            }
        }
        for (int k = 0; k < cb; ++k)
            for (int j = 0; j < G; ++j)
                __builtin_memcpy(rows + (ci0 + k) * s.padded + x0 + j * L, &acc[k][j], sizeof(V));
    }
}

// Output slice z's input gradient, channels-last at `out`, row by row through `rows` (cin planar
// rows of `padded`, 64-byte aligned), transposed in registers as the input is the other way
// (stored one value at a time instead: 54-55 against 51 ms at 175^3 in AVX-512, 93-97 against
// 90-92 in AVX2).
template <typename T, int BYTES>
INLINE_INTO_CLONES void grad_input_slice_body(const Shape& s, const T* const grads[3], const T* weight, T* out,
                                              T* rows) {
    auto pass = [&](auto blocks, int64_t y, int64_t x0) __attribute__((always_inline)) {
        grad_input_blocks<T, BYTES, decltype(blocks)::value>(s, grads, weight, rows, y, x0);
    };
    for (int64_t y = 0; y < s.height; ++y) {
        over_groups_of_row<T, BYTES>(s, y, pass);
        transpose_row<T, BYTES, false>(out + y * s.width * s.cin, s.width, s.cin, rows, s.padded);
    }
}

SIMD_DISPATCH(grad_input_slice, grad_input_slice_body,
              (const Shape& s, const T* const grads[3], const T* weight, T* out, T* rows),
              (s, grads, weight, out, rows))

// grad_weight[c, ci, dz, dy, dx] = sum over voxels of grad_out[c, z, y, x] *
// in[z + dz - 1, y + dy - 1, x + dx - 1, ci], for output slice z: partial sums per lane in
// sums[((c * cin + ci) * 27 + tap) * SLOT + l] (l < L), reduced over lanes (and threads) at the
// end. grad is the output gradient's slice z in SliceRing's padded rows.
template <typename T, int BYTES>
INLINE_INTO_CLONES void grad_weight_slice_body(const Shape& s, const T* const rows[3], const T* grad, T* sums) {
    using V = typename Vector<T, BYTES>::type;
    constexpr int64_t L = BYTES / sizeof(T), SLOT = lanes<T>();  // a weight's partial sums: SLOT lanes, L used
    // Input channels per pass: each loaded gradient vector feeds 3 x 3 x CB sums, in 18 of
    // AVX-512's 32 registers (9 of the 16 of narrower ones).
    constexpr int CB = BYTES == 64 ? 2 : 1;
    constexpr int64_t ROWS = 8;  // rows summed before the sums are updated: their reads stay in L1
    const int64_t blocks = (s.width + L - 1) / L;
    for (int64_t y0 = 0; y0 < s.height; y0 += ROWS) {
        const int64_t y1 = std::min(y0 + ROWS, s.height);
        for (int dz = 0; dz < 3; ++dz) {
            if (!rows[dz]) continue;
            for (int dy = 0; dy < 3; ++dy) {
                for (int64_t ci0 = 0; ci0 < s.cin; ci0 += CB) {
                    const int cb = int(std::min<int64_t>(CB, s.cin - ci0));
                    V p[CB][3][3];  // [channel][c][dx]
                    for (int k = 0; k < CB; ++k)
                        for (int c = 0; c < 3; ++c)
                            for (int dx = 0; dx < 3; ++dx) p[k][c][dx] = V{};
                    for (int64_t y = std::max<int64_t>(y0, 1 - dy); y < std::min<int64_t>(y1, s.height + 1 - dy); ++y) {
                        const int64_t yy = y + dy - 1;
                        const T* g0 = grad + (y * COUT + 0) * s.padded + s.origin;
                        const T* g1 = grad + (y * COUT + 1) * s.padded + s.origin;
                        const T* g2 = grad + (y * COUT + 2) * s.padded + s.origin;
                        // A lone last channel reads its own row twice and keeps the first sums only.
                        const T* in[CB];
                        for (int k = 0; k < CB; ++k)
                            in[k] = rows[dz] + (yy * s.cin + ci0 + (k < cb ? k : 0)) * s.padded + s.origin - 1;  // in[x + dx]: x + dx - 1
                        for (int64_t x0 = 0; x0 < blocks * L; x0 += L) {
                            V a, b, c;
                            load_vector(a, g0 + x0);
                            load_vector(b, g1 + x0);
                            load_vector(c, g2 + x0);
                            keep_in_register(a);  // each loaded once for its 3 x CB sums
                            keep_in_register(b);
                            keep_in_register(c);
                            for (int k = 0; k < CB; ++k)
                                for (int dx = 0; dx < 3; ++dx) {
                                    V v;
                                    load_vector(v, in[k] + x0 + dx);
                                    keep_in_register(v);
                                    p[k][0][dx] += a * v;
                                    p[k][1][dx] += b * v;
                                    p[k][2][dx] += c * v;
                                }
                        }
                    }
                    for (int k = 0; k < cb; ++k)
                        for (int c = 0; c < 3; ++c)
                            for (int dx = 0; dx < 3; ++dx) {
                                T* q = sums + ((c * s.cin + ci0 + k) * 27 + dz * 9 + dy * 3 + dx) * SLOT;
                                V total;
                                load_vector(total, q);
                                total += p[k][c][dx];
                                __builtin_memcpy(q, &total, sizeof(V));
                            }
                }
            }
        }
    }
}

SIMD_DISPATCH(grad_weight_slice, grad_weight_slice_body,
              (const Shape& s, const T* const rows[3], const T* grad, T* sums), (s, rows, grad, sums))

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
        std::vector<T> gradient_rows(need_input ? size_t(s.cin * s.padded + lanes<T>()) : 0);
        T* const gradient_row = aligned_to_64_bytes(gradient_rows.data());
        if (need_weight) sums[tid].assign(size_t(weights * L), T(0));
        int64_t first, last;
        share(s.slices(), &first, &last);
        for (int64_t i = first; i < last; ++i) {
            const int64_t item = i / s.depth, z = i % s.depth;
            if (need_input) {
                const T* flipped[3] = {grads.get(g, item, z + 1), grads.get(g, item, z), grads.get(g, item, z - 1)};
                grad_input_slice(s, flipped, w, gi + i * s.voxels_per_slice() * s.cin, gradient_row);
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
    define_simd_bytes(module);
}
