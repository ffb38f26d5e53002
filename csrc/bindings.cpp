// Python bindings for the native kernels. Only binding code lives here; kernels are in their own
// files and take raw pointers, element counts and dtype codes (csrc/dtype.h), never torch objects.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "blend.h"
#include "dot.h"
#include "mapping_guard.h"
#include "mask.h"
#include "rbf.h"
#include "selection.h"
#include "threads.h"
#ifdef FASTMERGE_WITH_CUDA
#include "cuda/device.h"
#include "selection_cuda.h"
#endif

namespace py = pybind11;

PYBIND11_MODULE(FASTMERGE_MODULE_NAME, m) {
  m.doc() = "fastmerge native CPU kernels (C++17, OpenMP)";
  m.attr("has_openmp") = fastmerge::kHasOpenMP;
  m.def("max_threads", []() { return omp_get_max_threads(); },
        "Number of OpenMP threads a kernel will use (1 in a build without OpenMP, see threads.h).");
  m.def("set_num_threads", [](int n) { omp_set_num_threads(n); },
        "Set the OpenMP thread count for later kernel calls (results do not depend on it).");
  m.def("guard_mapping", &fastmerge::guard_mapping,
        "Guard a read-only file mapping against the file being cut short; its slot, or -1 (csrc/mapping_guard.h).",
        py::arg("begin"), py::arg("length"));
  m.def("unguard_mapping", &fastmerge::unguard_mapping, "Stop guarding the mapping in `slot`.", py::arg("slot"));
  m.def("mapping_cut_short", &fastmerge::mapping_cut_short,
        "Whether a page of the mapping in `slot` lay past the end of its file.", py::arg("slot"));
  m.def("cut_short_pages", &fastmerge::cut_short_pages,
        "How many pages past the end of a guarded file were touched in this process so far.");
  m.def("blend", &fastmerge::blend, py::call_guard<py::gil_scoped_release>(),
        "Weighted blend over raw pointers; see csrc/blend.h.", py::arg("inputs"), py::arg("input_dtypes"),
        py::arg("weights"), py::arg("base"), py::arg("base_dtype"), py::arg("lam"), py::arg("out"),
        py::arg("out_dtype"), py::arg("n"));
  m.def("gram", &fastmerge::gram, py::call_guard<py::gil_scoped_release>(),
        "fp64 Gram matrix of K (base-subtracted) fibred vectors; see csrc/dot.h.", py::arg("inputs"),
        py::arg("input_dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("outer"), py::arg("length"),
        py::arg("inner"), py::arg("out"));
  // Masks (csrc/mask.h).
  m.def("apply_mask", &fastmerge::apply_mask, py::call_guard<py::gil_scoped_release>(), py::arg("x"),
        py::arg("dtype"), py::arg("mask"), py::arg("packed"), py::arg("scale"), py::arg("out"), py::arg("n"));
  m.def("pack_mask", &fastmerge::pack_mask, py::call_guard<py::gil_scoped_release>(), py::arg("dense"),
        py::arg("n"), py::arg("packed"));
  m.def("unpack_mask", &fastmerge::unpack_mask, py::call_guard<py::gil_scoped_release>(), py::arg("packed"),
        py::arg("n"), py::arg("dense"));
  m.def("rbf_sq_distances", &fastmerge::rbf_sq_distances, py::call_guard<py::gil_scoped_release>(),
        "fp64 pairwise squared distances; see csrc/rbf.h.", py::arg("x"), py::arg("y"), py::arg("layers"),
        py::arg("n"), py::arg("m"), py::arg("d"), py::arg("out"));
  // Magnitude selection, TIES and DARE (csrc/selection.h documents each).
  m.def("magnitude_histogram", &fastmerge::magnitude_histogram, py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("x_dtype"), py::arg("base"), py::arg("base_dtype"), py::arg("n"), py::arg("hist"),
        py::arg("phase"), py::arg("bucket"));
  m.def("select_top_k", &fastmerge::select_top_k, py::call_guard<py::gil_scoped_release>(), py::arg("x"),
        py::arg("x_dtype"), py::arg("base"), py::arg("base_dtype"), py::arg("n"), py::arg("ks"),
        py::arg("sample"));
  m.def("tie_cutoff", &fastmerge::tie_cutoff, py::call_guard<py::gil_scoped_release>(), py::arg("x"),
        py::arg("x_dtype"), py::arg("base"), py::arg("base_dtype"), py::arg("n"), py::arg("t_bits"),
        py::arg("ties_to_keep"));
  m.def(
      "ties_merge",
      [](uintptr_t out, int out_dtype, uintptr_t base, int base_dtype, int64_t n, const std::vector<uintptr_t>& xs,
         const std::vector<int>& x_dtypes, const std::vector<float>& weights, const std::vector<float>& scales,
         const std::vector<int>& modes, const std::vector<uint32_t>& t_hi, const std::vector<int64_t>& cut_hi,
         const std::vector<uint32_t>& t_lo, const std::vector<int64_t>& cut_lo, const std::vector<uint64_t>& keys,
         const std::vector<float>& densities, const std::vector<uintptr_t>& masks, bool consensus, bool normalize,
         float lam) {
        auto selectors = fastmerge::make_selectors(modes, t_hi, cut_hi, t_lo, cut_lo, keys, densities, masks);
        py::gil_scoped_release release;
        fastmerge::ties_merge(out, out_dtype, base, base_dtype, n, xs, x_dtypes, weights, scales, selectors,
                              consensus, normalize, lam);
      },
      py::arg("out"), py::arg("out_dtype"), py::arg("base"), py::arg("base_dtype"), py::arg("n"), py::arg("inputs"),
      py::arg("input_dtypes"), py::arg("weights"), py::arg("scales"), py::arg("modes"), py::arg("t_hi"),
      py::arg("cut_hi"), py::arg("t_lo"), py::arg("cut_lo"), py::arg("keys"), py::arg("densities"), py::arg("masks"),
      py::arg("consensus"), py::arg("normalize"), py::arg("lam"));
  m.def(
      "kept_l1",
      [](uintptr_t x, int x_dtype, uintptr_t base, int base_dtype, int64_t n, int mode, uint32_t t_hi, int64_t cut_hi,
         uint32_t t_lo, int64_t cut_lo, uint64_t key, float density, uintptr_t mask, uintptr_t keep_out) {
        auto sel = fastmerge::make_selectors({mode}, {t_hi}, {cut_hi}, {t_lo}, {cut_lo}, {key}, {density}, {mask});
        py::gil_scoped_release release;
        return fastmerge::kept_l1(x, x_dtype, base, base_dtype, n, sel[0], keep_out);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("base"), py::arg("base_dtype"), py::arg("n"), py::arg("mode"),
      py::arg("t_hi"), py::arg("cut_hi"), py::arg("t_lo"), py::arg("cut_lo"), py::arg("key"), py::arg("density"),
      py::arg("mask"), py::arg("keep_out") = 0);
  m.def("della_mask", &fastmerge::della_mask, py::call_guard<py::gil_scoped_release>(), py::arg("x"),
        py::arg("x_dtype"), py::arg("base"), py::arg("base_dtype"), py::arg("outer"), py::arg("row_len"),
        py::arg("inner"), py::arg("density"), py::arg("epsilon"), py::arg("key"), py::arg("mask"),
        py::arg("bits"), py::arg("ranking") = int(fastmerge::RANK_AUTO), py::arg("l1") = false);
  m.def("philox_fill", &fastmerge::philox_fill, py::call_guard<py::gil_scoped_release>(), py::arg("out"),
        py::arg("key"), py::arg("offset"), py::arg("n"));
  m.def("philox_fill_at", &fastmerge::philox_fill_at, py::call_guard<py::gil_scoped_release>(), py::arg("out"),
        py::arg("key"), py::arg("offset"), py::arg("idx"), py::arg("n"));
  // CUDA kernels (csrc/cuda), present only in a FASTMERGE_CUDA=ON build.
#ifdef FASTMERGE_WITH_CUDA
  m.def("has_cuda", []() { return fastmerge::cuda_device_count() > 0; }, py::call_guard<py::gil_scoped_release>(),
        "True: built with the CUDA kernels and a CUDA device is usable.");
  m.def("cuda_magnitude_histogram", &fastmerge::cuda_magnitude_histogram, py::call_guard<py::gil_scoped_release>(),
        "magnitude_histogram on device pointers, queued on `stream` (csrc/selection_cuda.h).", py::arg("x"),
        py::arg("x_dtype"), py::arg("base"), py::arg("base_dtype"), py::arg("n"), py::arg("hist"),
        py::arg("nan_count"), py::arg("phase"), py::arg("bucket"), py::arg("device"), py::arg("stream"));
#else
  m.def("has_cuda", []() { return false; }, "False: this build has no CUDA kernels (FASTMERGE_CUDA=OFF).");
#endif
}
