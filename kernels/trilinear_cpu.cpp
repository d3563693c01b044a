// Trilinear warp on the CPU (forward only), built by setup.py as mgr_engine._trilinear_cpu.
//
// Same semantics as torch.nn.functional.grid_sample(mode="bilinear", align_corners=True) on
// a map in [0, 1] (mgr_engine.ops.warp): out[b, c, p] = image[b, c] at coords[b, :, p] * (n - 1).
// Why: torch's 3-D grid sampler parallelizes only over the batch on the CPU, so a single
// registration (batch 1) runs it on one core. Here the output voxels are split over OpenMP
// threads and the eight corner weights are computed once for all channels.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style>;

namespace {

void check(bool condition, const char* message) {
    if (!condition) throw std::invalid_argument(message);
}

// image (B, C, D, H, W); coords (B or 1, 3, D', H', W'); out (B, C, D', H', W'), written here.
// border: coordinates are clamped into the grid (padding_mode="border"); otherwise corners
// outside the grid count as 0 (padding_mode="zeros"). A non-finite coordinate gives 0.
void warp_trilinear(const FloatArray& image, const FloatArray& coords, FloatArray& out, bool border, int threads) {
    check(image.ndim() == 5 && coords.ndim() == 5 && out.ndim() == 5, "image, coords and out must be 5-D");
    const int64_t batch = image.shape(0), channels = image.shape(1);
    const int64_t depth = image.shape(2), height = image.shape(3), width = image.shape(4);
    const int64_t coord_batch = coords.shape(0);
    check(coords.shape(1) == 3, "coords must have 3 channels");
    check(coord_batch == batch || coord_batch == 1, "coords batch must be 1 or the image's");
    check(out.shape(0) == batch && out.shape(1) == channels, "out must be (B, C, *coords' grid)");
    for (int axis = 2; axis < 5; ++axis) check(out.shape(axis) == coords.shape(axis), "out must be (B, C, *coords' grid)");
    check(depth > 1 && height > 1 && width > 1, "image must have at least 2 voxels along each axis");

    const float* src = image.data();
    const float* map = coords.data();
    float* dst = out.mutable_data();
    const int64_t points = coords.shape(2) * coords.shape(3) * coords.shape(4);
    const int64_t plane = height * width, volume = depth * plane;
    const float scale_d = float(depth - 1), scale_h = float(height - 1), scale_w = float(width - 1);

    py::gil_scoped_release release;
    for (int64_t b = 0; b < batch; ++b) {
        const float* map_b = map + (coord_batch == 1 ? 0 : b * 3 * points);
        const float* src_b = src + b * channels * volume;
        float* dst_b = dst + b * channels * points;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t p = 0; p < points; ++p) {
            float z = map_b[p] * scale_d, y = map_b[points + p] * scale_h, x = map_b[2 * points + p] * scale_w;
            if (border) {
                z = std::min(std::max(z, 0.0f), scale_d);
                y = std::min(std::max(y, 0.0f), scale_h);
                x = std::min(std::max(x, 0.0f), scale_w);
            }
            // Outside [-1, n] no corner is inside (also catches NaN): the value is 0.
            if (!(z > -1.0f && z < float(depth) && y > -1.0f && y < float(height) && x > -1.0f && x < float(width))) {
                for (int64_t c = 0; c < channels; ++c) dst_b[c * points + p] = 0.0f;
                continue;
            }
            const int64_t z0 = int64_t(std::floor(z)), y0 = int64_t(std::floor(y)), x0 = int64_t(std::floor(x));
            const float fz = z - float(z0), fy = y - float(y0), fx = x - float(x0);
            int64_t offset[8];
            float weight[8];
            int corners = 0;
            for (int k = 0; k < 8; ++k) {
                const int64_t zi = z0 + (k >> 2), yi = y0 + ((k >> 1) & 1), xi = x0 + (k & 1);
                if (zi < 0 || zi >= depth || yi < 0 || yi >= height || xi < 0 || xi >= width) continue;
                const float w = ((k >> 2) ? fz : 1.0f - fz) * (((k >> 1) & 1) ? fy : 1.0f - fy) * ((k & 1) ? fx : 1.0f - fx);
                offset[corners] = zi * plane + yi * width + xi;
                weight[corners] = w;
                ++corners;
            }
            for (int64_t c = 0; c < channels; ++c) {
                const float* channel = src_b + c * volume;
                float value = 0.0f;
                for (int k = 0; k < corners; ++k) value += weight[k] * channel[offset[k]];
                dst_b[c * points + p] = value;
            }
        }
    }
}

}  // namespace

PYBIND11_MODULE(_trilinear_cpu, module) {
    module.doc() = "Trilinear warp on the CPU with OpenMP (mgr_engine.kernels.warp_cpu)";
    // noconvert: a silent float32/contiguous copy of out would drop the result.
    module.def("warp_trilinear", &warp_trilinear, py::arg("image").noconvert(), py::arg("coords").noconvert(),
               py::arg("out").noconvert(), py::arg("border"), py::arg("threads"),
               "Sample image (B, C, D, H, W) trilinearly at coords (B or 1, 3, ...) in [0, 1] into out.");
}
