// pybind11 module fusedattn._cuda: raw device pointers, shapes and strides in, the CUDA kernel out.
// python/fusedattn/cuda.py turns NumPy, CuPy, torch and __cuda_array_interface__ / DLPack arrays into
// the (pointer, shape, strides) triples this module takes, and holds all user-facing validation; the
// checks here guard the C++ side against callers that bypass it.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "fusedattn/batch_offsets.h"
#include "fusedattn/params.h"
#include "fusedattn_cuda.h"

namespace py = pybind11;
using fusedattn::AttnParams;
using fusedattn::StridedTensor;

namespace {

using fusedattn::cuda::check;

// Makes `device` current for the scope, as every pointer of a call must live there.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device != previous_) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() { cudaSetDevice(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

// One tensor from Python: (pointer, shape, strides in elements), shape (*lead, inner axes...).
struct Tensor {
  StridedTensor view;
  std::vector<int64_t> shape;
  std::vector<int64_t> batch_offsets;
};

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

Tensor convert(const py::tuple& spec, const char* name, const std::vector<int64_t>& lead,
               const std::vector<int64_t>& tail) {
  if (spec.size() != 3) throw std::invalid_argument(std::string(name) + ": expected (pointer, shape, strides)");
  Tensor t;
  t.shape = spec[1].cast<std::vector<int64_t>>();
  const auto strides = spec[2].cast<std::vector<int64_t>>();
  std::vector<int64_t> expected = lead;
  expected.insert(expected.end(), tail.begin(), tail.end());
  if (t.shape != expected || strides.size() != t.shape.size())
    throw std::invalid_argument(std::string(name) + ": expected shape " + shape_str(expected) + ", got " +
                                shape_str(t.shape));
  const size_t n_lead = lead.size();
  t.batch_offsets = fusedattn::flatten_batch_offsets(lead.data(), strides.data(), static_cast<int>(n_lead));
  t.view.data = reinterpret_cast<void*>(spec[0].cast<uintptr_t>());
  t.view.batch_offsets = t.batch_offsets.data();
  t.view.head_stride = strides[n_lead];
  t.view.row_stride = tail.size() > 1 ? strides[n_lead + 1] : 0;
  t.view.col_stride = tail.size() > 2 ? strides[n_lead + 2] : 0;
  return t;
}

fusedattn::DType dtype_from_name(const std::string& name) {
  if (name == "float32") return fusedattn::DType::kFloat32;
  if (name == "float16") return fusedattn::DType::kFloat16;
  if (name == "bfloat16") return fusedattn::DType::kBFloat16;
  throw py::type_error("unsupported dtype '" + name + "' for the CUDA path: float32, float16 or bfloat16");
}

void attention_forward(const std::string& dtype, const py::tuple& q_spec, const py::tuple& k_spec,
                       const py::tuple& v_spec, const std::optional<py::tuple>& mask_spec, const std::string& mask_kind,
                       const py::tuple& out_spec, const std::optional<py::tuple>& lse_spec, bool out_float32,
                       double scale, int64_t diagonal_offset, bool causal, int device, uintptr_t stream) {
  AttnParams p;
  p.dtype = dtype_from_name(dtype);
  const auto q_shape = q_spec[1].cast<std::vector<int64_t>>();
  const auto k_shape = k_spec[1].cast<std::vector<int64_t>>();
  const auto v_shape = v_spec[1].cast<std::vector<int64_t>>();
  if (q_shape.size() < 3 || k_shape.size() != q_shape.size() || v_shape.size() != q_shape.size())
    throw std::invalid_argument("q, k, v: expected (..., H, L, D) shapes of one rank, got " + shape_str(q_shape) +
                                ", " + shape_str(k_shape) + ", " + shape_str(v_shape));
  const size_t r = q_shape.size();
  const std::vector<int64_t> lead(q_shape.begin(), q_shape.end() - 3);
  p.batch = 1;
  for (int64_t s : lead) p.batch *= s;
  p.heads_q = q_shape[r - 3];
  p.len_q = q_shape[r - 2];
  p.head_dim = q_shape[r - 1];
  p.heads_kv = k_shape[r - 3];
  p.len_k = k_shape[r - 2];
  p.value_dim = v_shape[r - 1];
  Tensor q = convert(q_spec, "q", lead, {p.heads_q, p.len_q, p.head_dim});
  Tensor k = convert(k_spec, "k", lead, {p.heads_kv, p.len_k, p.head_dim});
  Tensor v = convert(v_spec, "v", lead, {p.heads_kv, p.len_k, p.value_dim});
  Tensor out = convert(out_spec, "out", lead, {p.heads_q, p.len_q, p.value_dim});
  Tensor mask, lse;
  p.q = q.view;
  p.k = k.view;
  p.v = v.view;
  p.out = out.view;
  if (mask_spec) {
    if (mask_kind == "bool")
      p.mask_kind = fusedattn::MaskKind::kBool;
    else if (mask_kind == "float")
      p.mask_kind = fusedattn::MaskKind::kAdditive;
    else
      throw std::invalid_argument("mask_kind: expected 'bool' or 'float', got '" + mask_kind + "'");
    mask = convert(*mask_spec, "mask", lead, {p.heads_q, p.len_q, p.len_k});
    p.mask = mask.view;
  }
  if (lse_spec) {
    lse = convert(*lse_spec, "lse", lead, {p.heads_q, p.len_q});
    p.lse = lse.view;
  }
  p.out_float32 = out_float32;
  p.scale = scale;
  p.diagonal_offset = diagonal_offset;
  if (causal) {
    p.windowed = true;
    p.window_right = 0;
  }
  py::gil_scoped_release release;
  DeviceScope scope(device);
  fusedattn::cuda::attention_forward(p, reinterpret_cast<void*>(stream));
}

py::dict device_info(int index) {
  const fusedattn::cuda::DeviceInfo info = fusedattn::cuda::device_info(index);
  py::dict d;
  d["index"] = info.index;
  d["name"] = info.name;
  d["compute_capability"] = std::to_string(info.major) + "." + std::to_string(info.minor);
  d["total_memory"] = info.total_memory;
  d["multiprocessors"] = info.multiprocessors;
  d["max_shared_memory_per_block"] = info.max_shared_memory_per_block;
  return d;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fusedattn's CUDA path (private: use fusedattn.attention(..., device='cuda'))";
  m.def("attention_forward", &attention_forward, py::arg("dtype"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("mask"), py::arg("mask_kind"), py::arg("out"), py::arg("lse"), py::arg("out_float32"),
        py::arg("scale"), py::arg("diagonal_offset"), py::arg("causal"), py::arg("device"), py::arg("stream"),
        "Enqueue the fused forward on `stream` of `device`. Tensors are (pointer, shape, strides in elements) "
        "with shapes (*lead, H, L, D); returns without synchronising.");
  m.def("device_count", &fusedattn::cuda::device_count,
        "Number of CUDA devices; RuntimeError with CUDA's reason when there is no driver or device.");
  m.def("device_info", &device_info, py::arg("index"),
        "dict: index, name, compute_capability ('8.0'), total_memory, multiprocessors, max_shared_memory_per_block");
  m.def("pointer_device", [](uintptr_t pointer) { return fusedattn::cuda::pointer_device(reinterpret_cast<void*>(pointer)); },
        py::arg("pointer"), "The device that owns a pointer, -1 for host memory.");
  m.def("runtime_version", [] {
    int version = 0;
    check(cudaRuntimeGetVersion(&version), "cudaRuntimeGetVersion");
    return version;
  });
  // Small helpers for the NumPy path (copy in, compute, copy out) so that it needs no CuPy or torch.
  m.def("malloc", [](size_t bytes, int device) {
    DeviceScope scope(device);
    void* pointer = nullptr;
    check(cudaMalloc(&pointer, bytes ? bytes : 1), "cudaMalloc");
    return reinterpret_cast<uintptr_t>(pointer);
  }, py::arg("bytes"), py::arg("device"));
  m.def("free", [](uintptr_t pointer, int device) {
    DeviceScope scope(device);
    check(cudaFree(reinterpret_cast<void*>(pointer)), "cudaFree");
  }, py::arg("pointer"), py::arg("device"));
  m.def("memcpy_htod", [](uintptr_t dst, uintptr_t src, size_t bytes, int device) {
    DeviceScope scope(device);
    check(cudaMemcpy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes, cudaMemcpyHostToDevice),
          "cudaMemcpy (host to device)");
  }, py::arg("dst"), py::arg("src"), py::arg("bytes"), py::arg("device"), py::call_guard<py::gil_scoped_release>());
  m.def("memcpy_dtoh", [](uintptr_t dst, uintptr_t src, size_t bytes, int device) {
    DeviceScope scope(device);
    check(cudaMemcpy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes, cudaMemcpyDeviceToHost),
          "cudaMemcpy (device to host)");
  }, py::arg("dst"), py::arg("src"), py::arg("bytes"), py::arg("device"), py::call_guard<py::gil_scoped_release>());
  m.def("stream_synchronize", [](uintptr_t stream, int device) {
    DeviceScope scope(device);
    check(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
  }, py::arg("stream"), py::arg("device"), py::call_guard<py::gil_scoped_release>());
}
