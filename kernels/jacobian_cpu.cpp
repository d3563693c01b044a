// The Jacobian determinant det(I + du/dx) of a displacement field on the CPU. Built by setup.py
// as mgr_engine._jacobian_cpu, with -ffp-contract=off (see below); mgr_engine.kernels.jacobian_cpu
// wraps it.
//
// Why: ITK's DisplacementFieldJacobianDeterminantFilter visits each voxel through a
// neighbourhood iterator, and the tensor form (mgr_engine.resample.jacobian_determinant) makes
// two dozen passes over volume-sized temporaries: 2.0-3.5 s on a 512x512x300 field and 2 cores,
// 29 s for the physical form where freed memory goes back to the system (benchmarks/RESULTS.md).
// Here a row of voxels is one vectorized loop over the field, which reads each value from cache
// after its first use: 0.1 s.
//
// ITK's arithmetic in ITK's order, in float: central differences along the index axes, weighted
// by half_weights (0.5 / spacing), the edge voxel repeated beyond the edge (ITK's zero-flux
// Neumann condition), 1 added on the diagonal, and vnl_det's expansion of the rows. Without
// contraction into fused multiply-adds (ITK's x86-64 wheels have none) the result is ITK's bit for
// bit. The physical form first turns the derivatives along the index axes into derivatives along
// the physical axes, d/dp_k = sum_j inverse_direction[j][k] d/di_j, as the tensor form does.

#include <cstdint>

#include "cpu_kernel.h"  // Array, check, CPU_DISPATCH, INLINE_INTO_CLONES

namespace {

// vnl_det's 3x3 expansion, term by term in its order; row k holds the derivatives along axis k.
INLINE_INTO_CLONES float determinant(const float r[3][3]) {
    return r[0][0] * r[1][1] * r[2][2] - r[0][0] * r[2][1] * r[1][2] - r[1][0] * r[0][1] * r[2][2] +
           r[1][0] * r[2][1] * r[0][2] + r[2][0] * r[0][1] * r[1][2] - r[2][0] * r[1][1] * r[0][2];
}

struct Weights {
    float half[3];        // 0.5 / spacing along x, y, z
    float inverse[3][3];  // the inverse direction, for the physical form
};

// One voxel: pointers to the (x, y, z) components of its neighbours behind and ahead along x, y
// and z (the voxel itself at an edge).
template <bool physical>
INLINE_INTO_CLONES float voxel_determinant(const float* x_behind, const float* x_ahead, const float* y_behind,
                                           const float* y_ahead, const float* z_behind, const float* z_ahead,
                                           const Weights& w) {
    float r[3][3];
    for (int i = 0; i < 3; ++i) {
        r[0][i] = w.half[0] * (x_ahead[i] - x_behind[i]);
        r[1][i] = w.half[1] * (y_ahead[i] - y_behind[i]);
        r[2][i] = w.half[2] * (z_ahead[i] - z_behind[i]);
    }
    if (physical) {
        float p[3][3];
        for (int k = 0; k < 3; ++k)
            for (int i = 0; i < 3; ++i)
                p[k][i] = r[0][i] * w.inverse[0][k] + r[1][i] * w.inverse[1][k] + r[2][i] * w.inverse[2][k];
        for (int k = 0; k < 3; ++k)
            for (int i = 0; i < 3; ++i) r[k][i] = p[k][i];
    }
    for (int k = 0; k < 3; ++k) r[k][k] += 1.0f;
    return determinant(r);
}

// One row of voxels: `row` and its neighbouring rows along y and z (the row itself at an edge),
// (nx, 3) each.
template <bool physical>
INLINE_INTO_CLONES void determinant_row(const float* row, const float* y_behind, const float* y_ahead,
                                        const float* z_behind, const float* z_ahead, int64_t nx, const Weights& w,
                                        float* out) {
    // Vectorized where every address is affine in x: the row's two end voxels, which repeat
    // themselves, apart. The weights are copied: read through the reference they may alias `out`
    // for all the compiler knows. Without both the loop stayed scalar (0.42-0.44 s for the
    // physical form at 512x512x300 on 2 cores, 0.11 s vectorized).
    const Weights local = w;
    const int64_t last = nx - 1;
    out[0] = voxel_determinant<physical>(row, row + 3 * (nx > 1 ? 1 : 0), y_behind, y_ahead, z_behind, z_ahead, local);
#pragma omp simd
    for (int64_t x = 1; x < last; ++x)
        out[x] = voxel_determinant<physical>(row + 3 * (x - 1), row + 3 * (x + 1), y_behind + 3 * x, y_ahead + 3 * x,
                                             z_behind + 3 * x, z_ahead + 3 * x, local);
    if (nx > 1)
        out[last] = voxel_determinant<physical>(row + 3 * (last - 1), row + 3 * last, y_behind + 3 * last,
                                                y_ahead + 3 * last, z_behind + 3 * last, z_ahead + 3 * last, local);
}

// The row functions are compiled for each instruction set (CPU_DISPATCH): an OpenMP region
// inside an inlined template would be outlined once, for the baseline.
CPU_DISPATCH void index_axes_row(const float* row, const float* y_behind, const float* y_ahead, const float* z_behind,
                                 const float* z_ahead, int64_t nx, const Weights& w, float* out) {
    determinant_row<false>(row, y_behind, y_ahead, z_behind, z_ahead, nx, w, out);
}

CPU_DISPATCH void physical_axes_row(const float* row, const float* y_behind, const float* y_ahead,
                                    const float* z_behind, const float* z_ahead, int64_t nx, const Weights& w,
                                    float* out) {
    determinant_row<true>(row, y_behind, y_ahead, z_behind, z_ahead, nx, w, out);
}

Weights weights_of(const Array<float>& half_weights, const Array<float>* inverse_direction) {
    check(half_weights.ndim() == 1 && half_weights.shape(0) == 3, "half_weights is a (3,) array (x, y, z)");
    Weights w{};
    for (int k = 0; k < 3; ++k) w.half[k] = half_weights.at(k);
    if (inverse_direction) {
        check(inverse_direction->ndim() == 2 && inverse_direction->shape(0) == 3 && inverse_direction->shape(1) == 3,
              "inverse_direction is a (3, 3) array");
        for (int j = 0; j < 3; ++j)
            for (int k = 0; k < 3; ++k) w.inverse[j][k] = inverse_direction->at(j, k);
    }
    return w;
}

void jacobian_determinant(const Array<float>& field, const Array<float>& half_weights,
                          const Array<float>* inverse_direction, Array<float>& out, int threads) {
    check(field.ndim() == 4 && field.shape(3) == 3, "the field is a (Z, Y, X, 3) float32 array");
    check(out.ndim() == 3 && out.shape(0) == field.shape(0) && out.shape(1) == field.shape(1) &&
              out.shape(2) == field.shape(2),
          "out is a (Z, Y, X) float32 array of the field's grid");
    const Weights w = weights_of(half_weights, inverse_direction);
    const auto determinant_of_row = inverse_direction ? physical_axes_row : index_axes_row;
    const int64_t nz = field.shape(0), ny = field.shape(1), nx = field.shape(2), row_values = 3 * nx;
    const float* values = field.data();
    float* result = out.mutable_data();
    auto at = [&](int64_t z, int64_t y) { return values + (z * ny + y) * row_values; };
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t z = 0; z < nz; ++z)
        for (int64_t y = 0; y < ny; ++y)
            determinant_of_row(at(z, y), at(z, y > 0 ? y - 1 : 0), at(z, y < ny - 1 ? y + 1 : ny - 1),
                               at(z > 0 ? z - 1 : 0, y), at(z < nz - 1 ? z + 1 : nz - 1, y), nx, w,
                               result + (z * ny + y) * nx);
}

}  // namespace

PYBIND11_MODULE(_jacobian_cpu, m) {
    m.doc() = "Jacobian determinant of a displacement field, ITK's filter's arithmetic (see kernels/jacobian_cpu.cpp)";
    m.def(
        "jacobian_determinant",
        [](const Array<float>& field, const Array<float>& half_weights, Array<float>& out, int threads) {
            jacobian_determinant(field, half_weights, nullptr, out, threads);
        },
        py::arg("field"), py::arg("half_weights"), py::arg("out").noconvert(), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
    m.def(
        "physical_jacobian_determinant",
        [](const Array<float>& field, const Array<float>& half_weights, const Array<float>& inverse_direction,
           Array<float>& out, int threads) { jacobian_determinant(field, half_weights, &inverse_direction, out, threads); },
        py::arg("field"), py::arg("half_weights"), py::arg("inverse_direction"), py::arg("out").noconvert(),
        py::arg("threads"), py::call_guard<py::gil_scoped_release>());
}
