// pybind11 bindings: convert a call spec (python/fusedattn/_spec.py's AttentionSpec, read attribute by
// attribute under the names of the AttnParams fields it fills) into AttnParams, check what the kernel relies
// on, release the GIL and call the core. The user-facing validation and messages live in Python; the checks
// here guard the C++ core against callers that bypass it. A missing attribute is an AttributeError: no
// option is ever switched off by a misspelt name.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "fusedattn/batch_offsets.h"
#include "fusedattn/dispatch.h"
#include "fusedattn/limits.h"
#include "fusedattn/params.h"

namespace py = pybind11;
using fusedattn::AttnParams;
using fusedattn::StridedTensor;

namespace {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// dtype equivalence, not identity: an array that went through pickle (multiprocessing, Dask workers)
// carries an equal but distinct dtype object.
bool same_dtype(const py::dtype& a, const py::dtype& b) {
  return py::detail::npy_api::get().PyArray_EquivTypes_(a.ptr(), b.ptr());
}

// float32, float64, bfloat16 (ml_dtypes) or float16; TypeError otherwise.
fusedattn::DType storage_dtype(const py::array& q) {
  if (same_dtype(py::dtype::of<float>(), q.dtype())) return fusedattn::DType::kFloat32;
  if (same_dtype(py::dtype::of<double>(), q.dtype())) return fusedattn::DType::kFloat64;
  if (q.dtype().kind() == 'f' && q.itemsize() == 2) return fusedattn::DType::kFloat16;
  if (q.itemsize() == 2 && py::str(q.dtype().attr("name")).cast<std::string>() == "bfloat16")
    return fusedattn::DType::kBFloat16;
  throw py::type_error("q: dtype must be float32, float64, bfloat16 or float16");
}

// The dtype the kernels compute in (and of lse, float masks, ALiBi slopes, score weights): float32 for
// 16-bit storage, else the storage dtype itself.
py::dtype compute_dtype(const py::array& q) {
  return q.itemsize() == 2 ? py::dtype::of<float>() : q.dtype();
}

// A tensor whose last `inner` axes are (head, row[, col]) and whose leading axes are flattened into the
// batch index; owns the per-batch offsets the StridedTensor points to.
struct Converted {
  StridedTensor tensor;
  std::vector<int64_t> batch_offsets;
};

Converted convert(const py::array& a, const char* name, int inner, const std::vector<py::ssize_t>& lead_shape) {
  const py::ssize_t item = a.itemsize();
  const py::ssize_t lead = a.ndim() - inner;
  if (lead != static_cast<py::ssize_t>(lead_shape.size()))
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(lead_shape.size() + inner) +
                                " dimensions, got shape " + shape_str(a));
  std::vector<int64_t> strides(a.ndim());
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (a.strides(d) % item != 0)
      throw std::invalid_argument(std::string(name) + ": strides must be multiples of the item size");
    strides[d] = a.strides(d) / item;
    if (d < lead && a.shape(d) != lead_shape[d])
      throw std::invalid_argument(std::string(name) + ": leading dimensions must match q's, got shape " + shape_str(a));
  }
  Converted c;
  c.batch_offsets = fusedattn::flatten_batch_offsets(lead_shape.data(), strides.data(), static_cast<int>(lead));
  c.tensor.data = const_cast<void*>(a.data());
  c.tensor.batch_offsets = c.batch_offsets.data();
  c.tensor.head_stride = strides[lead];
  c.tensor.row_stride = inner > 1 ? strides[lead + 1] : 0;
  c.tensor.col_stride = inner > 2 ? strides[lead + 2] : 0;
  return c;
}

void require_shape(const py::array& a, const char* name, std::vector<py::ssize_t> expected_tail) {
  const py::ssize_t offset = a.ndim() - static_cast<py::ssize_t>(expected_tail.size());
  bool ok = offset >= 0;
  for (size_t i = 0; ok && i < expected_tail.size(); ++i) ok = a.shape(offset + i) == expected_tail[i];
  if (!ok) throw std::invalid_argument(std::string(name) + ": unexpected shape " + shape_str(a));
}

// Everything one call needs, kept alive (and in place: params point into the offset vectors) until the
// kernel returns.
struct Call {
  AttnParams p;
  std::vector<py::ssize_t> lead;
  Converted q, k, v, out, mask, lse, weights, dout, dq, dk, dv, k_scale, v_scale;
  std::vector<int64_t> seq_len_q, seq_len_k, seq_diagonal_offset;
  std::vector<py::array> kept;  // arrays the params point into (converted copies of the serving inputs)
};

// A field name as an interned Python str, made once per name (keyed by the literal's address; the GIL is
// held): looking ~30 fields up by C string would build ~30 temporary str objects on every call.
py::handle interned(const char* name) {
  static std::unordered_map<const char*, PyObject*> names;
  auto it = names.find(name);
  if (it == names.end()) it = names.emplace(name, PyUnicode_InternFromString(name)).first;
  return it->second;
}

template <class T>
T field(const py::handle& spec, const char* name) {
  return spec.attr(interned(name)).cast<T>();
}

std::optional<py::array> optional_array(const py::handle& spec, const char* name) {
  const py::object value = spec.attr(interned(name));
  if (value.is_none()) return std::nullopt;
  return value.cast<py::array>();
}

bool has(const py::handle& spec, const char* name) { return !spec.attr(interned(name)).is_none(); }

// Serving inputs (issue #15), from the spec's fields:
//   sinks:       (Hq,) contiguous, q's compute dtype: AttnParams::sinks.
//   k_scale, v_scale: float32 per-key scales of int8 k / v, shaped like k / v without their last axis
//                  ((*lead, Hkv, Lk), or (num_blocks, block_size, Hkv) when paged).
//   block_table: (B, max_blocks) int32: k / v are then caches (num_blocks, block_size, Hkv, D / Dv).
//   seq_lens:    (B,) int64 key lengths per sequence (required when paged; for contiguous k / v each
//                  <= Lk). Query i of sequence b sits at key position seq_lens[b] - Lq + i: the diagonal
//                  offset is seq_lens[b] - Lq (diagonal_offset is not read then).
bool is_paged(const py::handle& spec) { return has(spec, "block_table"); }

bool is_int8(const py::array& a) { return same_dtype(py::dtype::of<int8_t>(), a.dtype()); }

// A pool (num_blocks, block_size, Hkv[, width]) as a paged StridedTensor over `table`.
StridedTensor paged_tensor(const py::array& a, const char* name, const py::array_t<int32_t>& table, int64_t block_size,
                           int64_t heads, int64_t width) {
  const int inner = width ? 4 : 3;
  if (a.ndim() != inner || a.shape(1) != block_size || a.shape(2) != heads || (width && a.shape(3) != width))
    throw std::invalid_argument(std::string(name) + ": expected a (num_blocks, block_size, Hkv" + (width ? ", D)" : ")") +
                                " cache, got shape " + shape_str(a));
  StridedTensor t;
  for (py::ssize_t d = 0; d < a.ndim(); ++d)
    if (a.strides(d) % a.itemsize() != 0)
      throw std::invalid_argument(std::string(name) + ": strides must be multiples of the item size");
  t.data = const_cast<void*>(a.data());
  t.row_stride = a.strides(1) / a.itemsize();
  t.head_stride = a.strides(2) / a.itemsize();
  t.col_stride = width ? a.strides(3) / a.itemsize() : 0;
  t.pages.blocks = table.data();
  t.pages.blocks_per_seq = table.shape(1);
  t.pages.block_size = block_size;
  t.pages.block_stride = a.strides(0) / a.itemsize();
  t.pages.pool_blocks = a.shape(0);
  return t;
}

void convert_sinks(Call& call, const py::handle& spec, const py::array& q) {
  if (!has(spec, "sinks")) return;
  const py::array sinks = field<py::array>(spec, "sinks");
  if (!same_dtype(sinks.dtype(), compute_dtype(q)) || sinks.ndim() != 1 || sinks.shape(0) != call.p.heads_q ||
      !(sinks.flags() & py::array::c_style))
    throw std::invalid_argument("sinks: expected a contiguous (Hq,) array of q's compute dtype");
  call.kept.push_back(sinks);
  call.p.sinks = sinks.data();
}

void convert_serving(Call& call, const py::handle& spec, const py::array& q, const py::array& k, const py::array& v) {
  AttnParams& p = call.p;
  convert_sinks(call, spec, q);
  p.kv_int8 = is_int8(k);
  if (p.kv_int8 != is_int8(v) || p.kv_int8 != (has(spec, "k_scale") && has(spec, "v_scale")))
    throw py::type_error("int8 k and v come together, with k_scale and v_scale");
  const bool paged = is_paged(spec);
  if (has(spec, "seq_lens")) {
    const auto lens = spec.attr(interned("seq_lens")).cast<py::array_t<int64_t, py::array::c_style | py::array::forcecast>>();
    if (lens.ndim() != 1 || lens.shape(0) != p.batch)
      throw std::invalid_argument("seq_lens: expected (B,) for a batch of " + std::to_string(p.batch));
    call.seq_len_k.assign(lens.data(), lens.data() + p.batch);
    call.seq_diagonal_offset.resize(p.batch);
    int64_t longest = 0;
    for (int64_t b = 0; b < p.batch; ++b) {
      if (call.seq_len_k[b] < 0 || (!paged && call.seq_len_k[b] > p.len_k))
        throw std::invalid_argument("seq_lens: lengths must be in [0, Lk]");
      longest = std::max(longest, call.seq_len_k[b]);
      call.seq_diagonal_offset[b] = call.seq_len_k[b] - p.len_q;
    }
    p.len_k = longest;
    p.seq_len_k = call.seq_len_k.data();
    p.seq_diagonal_offset = call.seq_diagonal_offset.data();
  } else if (paged) {
    throw std::invalid_argument("block_table: a paged call needs seq_lens");
  }
  if (paged) {
    const auto table = spec.attr(interned("block_table")).cast<py::array_t<int32_t, py::array::c_style | py::array::forcecast>>();
    if (table.ndim() != 2 || table.shape(0) != p.batch)
      throw std::invalid_argument("block_table: expected (B, max_blocks) for a batch of " + std::to_string(p.batch));
    call.kept.push_back(table);
    const int64_t block_size = k.ndim() == 4 ? k.shape(1) : 0;
    if (call.lead.size() != 1 || p.mask_kind != fusedattn::MaskKind::kNone)
      throw std::invalid_argument("paged k / v: q must be (B, Hq, Lq, D), without a mask");
    p.k = paged_tensor(k, "k", table, block_size, p.heads_kv, p.head_dim);
    p.v = paged_tensor(v, "v", table, block_size, p.heads_kv, p.value_dim);
    if (p.kv_int8) {
      for (const char* name : {"k_scale", "v_scale"}) {
        const py::array scales = field<py::array>(spec, name);
        if (!same_dtype(scales.dtype(), py::dtype::of<float>())) throw py::type_error(std::string(name) + ": must be float32");
        call.kept.push_back(scales);
        (name[0] == 'k' ? p.k_scale : p.v_scale) = paged_tensor(scales, name, table, block_size, p.heads_kv, 0);
      }
    }
  } else if (p.kv_int8) {
    for (const char* name : {"k_scale", "v_scale"}) {
      const py::array scales = field<py::array>(spec, name);
      if (!same_dtype(scales.dtype(), py::dtype::of<float>())) throw py::type_error(std::string(name) + ": must be float32");
      require_shape(scales, name, {p.heads_kv, name[0] == 'k' ? k.shape(k.ndim() - 2) : v.shape(v.ndim() - 2)});
      Converted& c = name[0] == 'k' ? call.k_scale : call.v_scale;
      c = convert(scales, name, 2, call.lead);
      (name[0] == 'k' ? p.k_scale : p.v_scale) = c.tensor;
    }
  }
}

// Packed variable-length batches arrive as (1, H, total, D) views (lse (1, H, total)) plus
// cu_seqlens_q, cu_seqlens_k and diagonal offsets, int64 and validated in Python. Sequence b is
// "batch entry" b: its rows start at cu[b] along the L axis, its lengths are the cu differences.
void check_alibi_rows(const AttnParams& p) {
  if (p.alibi_slopes && p.alibi_rows != 1 && p.alibi_rows != p.batch)
    throw std::invalid_argument("alibi_slopes: expected (1 or batch, Hq) rows, got " + std::to_string(p.alibi_rows) +
                                " for a batch of " + std::to_string(p.batch));
}

void apply_packing(Call& call, const py::handle& cu_seqlens_q, const py::handle& cu_seqlens_k,
                   const py::handle& diagonal_offset) {
  using Offsets = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
  const auto cu_q = cu_seqlens_q.cast<Offsets>();
  const auto cu_k = cu_seqlens_k.cast<Offsets>();
  const auto diagonal = diagonal_offset.cast<Offsets>();
  AttnParams& p = call.p;
  const int64_t batch = static_cast<int64_t>(cu_q.size()) - 1;
  if (batch < 0 || static_cast<int64_t>(cu_k.size()) != batch + 1 || static_cast<int64_t>(diagonal.size()) != batch ||
      call.lead.size() != 1 || call.lead[0] != 1 || p.mask_kind != fusedattn::MaskKind::kNone)
    throw std::invalid_argument("packed batch: inconsistent cu_seqlens / layout");
  call.seq_len_q.resize(batch);
  call.seq_len_k.resize(batch);
  call.seq_diagonal_offset.assign(diagonal.data(), diagonal.data() + batch);
  int64_t max_q = 0, max_k = 0;
  for (int64_t b = 0; b < batch; ++b) {
    call.seq_len_q[b] = cu_q.at(b + 1) - cu_q.at(b);
    call.seq_len_k[b] = cu_k.at(b + 1) - cu_k.at(b);
    if (call.seq_len_q[b] < 0 || call.seq_len_k[b] < 0 || cu_q.at(b + 1) > p.len_q || cu_k.at(b + 1) > p.len_k)
      throw std::invalid_argument("packed batch: cu_seqlens out of range");
    max_q = std::max(max_q, call.seq_len_q[b]);
    max_k = std::max(max_k, call.seq_len_k[b]);
  }
  auto repack = [batch](Converted& c, const int64_t* starts, fusedattn::StridedTensor* target) {
    if (!c.tensor.data) return;
    c.batch_offsets.resize(static_cast<size_t>(batch));
    for (int64_t b = 0; b < batch; ++b) c.batch_offsets[b] = starts[b] * c.tensor.row_stride;
    c.tensor.batch_offsets = c.batch_offsets.data();
    *target = c.tensor;
  };
  repack(call.q, cu_q.data(), &p.q);
  repack(call.out, cu_q.data(), &p.out);
  repack(call.lse, cu_q.data(), &p.lse);
  repack(call.dout, cu_q.data(), &p.dout);
  repack(call.dq, cu_q.data(), &p.dq);
  repack(call.k, cu_k.data(), &p.k);
  repack(call.v, cu_k.data(), &p.v);
  repack(call.dk, cu_k.data(), &p.dk);
  repack(call.dv, cu_k.data(), &p.dv);
  p.batch = batch;
  p.len_q = max_q;
  p.len_k = max_k;
  p.seq_len_q = call.seq_len_q.data();
  p.seq_len_k = call.seq_len_k.data();
  p.seq_diagonal_offset = call.seq_diagonal_offset.data();
}

fusedattn::Precision precision_from_name(const std::string& precision) {
  if (precision == "highest") return fusedattn::Precision::kHighest;
  if (precision == "high") return fusedattn::Precision::kHigh;
  if (precision == "medium") return fusedattn::Precision::kMedium;
  throw std::invalid_argument("precision: expected 'highest', 'high' or 'medium', got '" + precision + "'");
}

// Which keys each row sees and the biases on the way: the spec's diagonal_offset, windowed /
// window_left / window_right, alibi_slopes ((1 or batch, Hq), contiguous, compute dtype), softcap,
// dropout_p / dropout_seed and q_start / k_start (the dropout positions).
void convert_positions(AttnParams& p, const py::handle& spec, const py::array& q) {
  p.diagonal_offset = field<int64_t>(spec, "diagonal_offset");
  if (field<bool>(spec, "windowed")) {
    const int64_t left = field<int64_t>(spec, "window_left"), right = field<int64_t>(spec, "window_right");
    if (left < 0 || right < -fusedattn::kUnbounded)
      throw std::invalid_argument("window: bounds must be >= 0 (left) and > -2^60 (right)");
    p.windowed = true;
    p.window_left = std::min(left, fusedattn::kUnbounded);
    p.window_right = std::min(right, fusedattn::kUnbounded);
  }
  if (const auto slopes = optional_array(spec, "alibi_slopes")) {
    // A (batch, Hq) table is checked against the batch in check_alibi_rows, after any packing.
    if (!same_dtype(slopes->dtype(), compute_dtype(q)) || slopes->ndim() != 2 || slopes->shape(1) != p.heads_q ||
        !(slopes->flags() & py::array::c_style))
      throw std::invalid_argument("alibi_slopes: expected a contiguous (1 or batch, Hq) array of q's compute dtype");
    p.alibi_slopes = slopes->data();
    p.alibi_batch_stride = slopes->shape(0) == 1 ? 0 : p.heads_q;
    p.alibi_rows = slopes->shape(0);
  }
  p.softcap = field<double>(spec, "softcap");
  if (!(p.softcap >= 0) || !std::isfinite(p.softcap)) throw std::invalid_argument("softcap: must be finite and >= 0");
  p.dropout_p = field<double>(spec, "dropout_p");
  if (!(p.dropout_p >= 0 && p.dropout_p < 1)) throw std::invalid_argument("dropout_p: must be in [0, 1)");
  p.dropout_seed = field<uint64_t>(spec, "dropout_seed");
  p.precision = precision_from_name(field<std::string>(spec, "precision"));
  p.q_start = field<int64_t>(spec, "q_start");
  p.k_start = field<int64_t>(spec, "k_start");
}

// q, k, mask, positions, scale, score policy and threads: shared by every entry point.
void convert_common(Call& call, const py::handle& spec) {
  const py::array q = field<py::array>(spec, "q"), k = field<py::array>(spec, "k");
  const std::optional<py::array> mask = optional_array(spec, "mask");
  const std::optional<py::array> score_weight = optional_array(spec, "score_weight");
  AttnParams& p = call.p;
  p.dtype = storage_dtype(q);
  const bool paged = is_paged(spec);
  if (!same_dtype(k.dtype(), q.dtype()) && !(is_int8(k) && has(spec, "k_scale")))
    throw py::type_error("q and k must share one dtype (or k int8, with k_scale)");
  if (q.ndim() < 3 || (paged ? k.ndim() != 4 : k.ndim() != q.ndim()))
    throw std::invalid_argument("q, k: expected (..., H, L, D) arrays of one rank, got " + shape_str(q) + " and " +
                                shape_str(k));
  call.lead.assign(q.shape(), q.shape() + q.ndim() - 3);
  p.batch = 1;
  for (py::ssize_t s : call.lead) p.batch *= s;
  p.heads_q = q.shape(q.ndim() - 3);
  p.len_q = q.shape(q.ndim() - 2);
  p.head_dim = q.shape(q.ndim() - 1);
  p.value_dim = p.head_dim;
  call.q = convert(q, "q", 3, call.lead);
  p.q = call.q.tensor;
  if (paged) {  // a (num_blocks, block_size, Hkv, D) cache: convert_serving reads it and the lengths
    p.heads_kv = k.shape(2);
  } else {
    p.heads_kv = k.shape(k.ndim() - 3);
    p.len_k = k.shape(k.ndim() - 2);
    require_shape(k, "k", {p.heads_kv, p.len_k, p.head_dim});
    call.k = convert(k, "k", 3, call.lead);
    p.k = call.k.tensor;
  }
  if (mask) {
    require_shape(*mask, "mask", {p.heads_q, p.len_q, p.len_k});
    if (same_dtype(py::dtype::of<bool>(), mask->dtype()))
      p.mask_kind = fusedattn::MaskKind::kBool;
    else if (same_dtype(mask->dtype(), compute_dtype(q)))
      p.mask_kind = fusedattn::MaskKind::kAdditive;
    else
      throw py::type_error("mask: dtype must be bool or the compute dtype of q");
    call.mask = convert(*mask, "mask", 3, call.lead);
    p.mask = call.mask.tensor;
  }
  if (score_weight) {
    const py::array& w = *score_weight;
    if (!same_dtype(w.dtype(), compute_dtype(q)) || w.ndim() != 1 || w.shape(0) != p.head_dim ||
        (w.shape(0) > 1 && w.strides(0) != w.itemsize()))
      throw std::invalid_argument("score_weight: expected a contiguous (D,) array of q's compute dtype");
    p.score_kind = fusedattn::ScoreKind::kAdditive;
    p.score_weight = w.data();
  }
  convert_positions(p, spec, q);
  p.scale = field<double>(spec, "scale");
  p.num_threads = field<int>(spec, "num_threads");
}

// Packed variable-length sequences (spec.packing: cu_seqlens_q, cu_seqlens_k, diagonal_offset), once
// every tensor of the call is converted.
void apply_spec_packing(Call& call, const py::handle& spec) {
  const py::object packing = spec.attr(interned("packing"));
  if (!packing.is_none())
    apply_packing(call, packing.attr("cu_seqlens_q"), packing.attr("cu_seqlens_k"), packing.attr("diagonal_offset"));
}

void attention_forward(const py::object& spec, py::array out, std::optional<py::array> lse) {
  Call call;
  convert_common(call, spec);
  const py::array q = field<py::array>(spec, "q"), k = field<py::array>(spec, "k"), v = field<py::array>(spec, "v");
  AttnParams& p = call.p;
  if (!same_dtype(v.dtype(), k.dtype())) throw py::type_error("q, k and v must share one dtype (k and v may be int8)");
  const bool paged = is_paged(spec);
  p.out_float32 = !same_dtype(out.dtype(), q.dtype()) && same_dtype(out.dtype(), compute_dtype(q));
  if (!same_dtype(out.dtype(), q.dtype()) && !p.out_float32)
    throw py::type_error("out: dtype must be q's (or float32 for 16-bit inputs)");
  if (paged ? v.ndim() != 4 : v.ndim() != q.ndim()) throw std::invalid_argument("v: must have as many dimensions as q");
  if (!out.writeable()) throw std::invalid_argument("out: array is read-only");
  p.value_dim = v.shape(v.ndim() - 1);
  if (!paged) {
    require_shape(v, "v", {p.heads_kv, p.len_k, p.value_dim});
    call.v = convert(v, "v", 3, call.lead);
    p.v = call.v.tensor;
  }
  require_shape(out, "out", {p.heads_q, p.len_q, p.value_dim});
  call.out = convert(out, "out", 3, call.lead);
  p.out = call.out.tensor;
  if (lse) {
    if (!same_dtype(lse->dtype(), compute_dtype(q))) throw py::type_error("lse: dtype must be the compute dtype of q");
    if (!lse->writeable()) throw std::invalid_argument("lse: array is read-only");
    require_shape(*lse, "lse", {p.heads_q, p.len_q});
    call.lse = convert(*lse, "lse", 2, call.lead);
    p.lse = call.lse.tensor;
  }
  convert_serving(call, spec, q, k, v);
  if (has(spec, "packing") && (p.seq_len_k || p.kv_int8))
    throw std::invalid_argument("packed batch: seq_lens / block_table / int8 k, v do not combine with packing");
  apply_spec_packing(call, spec);
  check_alibi_rows(p);
  py::gil_scoped_release release;
  fusedattn::attention_forward(p);
}

void attention_weights(const py::object& spec, py::array weights) {
  Call call;
  convert_common(call, spec);
  const py::array q = field<py::array>(spec, "q");
  if (!same_dtype(weights.dtype(), q.dtype())) throw py::type_error("weights: dtype must be the dtype of q");
  if (!weights.writeable()) throw std::invalid_argument("weights: array is read-only");
  require_shape(weights, "weights", {call.p.heads_q, call.p.len_q, call.p.len_k});
  call.weights = convert(weights, "weights", 3, call.lead);
  call.p.weights = call.weights.tensor;
  convert_sinks(call, spec, q);
  check_alibi_rows(call.p);
  py::gil_scoped_release release;
  fusedattn::attention_weights(call.p);
}

void attention_backward(const py::object& spec, const py::array& dout, const py::array& out, const py::array& lse,
                        py::array dq, py::array dk, py::array dv, std::optional<py::array> dscore_weight) {
  Call call;
  convert_common(call, spec);
  const py::array q = field<py::array>(spec, "q"), v = field<py::array>(spec, "v");
  if (call.p.score_kind == fusedattn::ScoreKind::kAdditive && !dscore_weight)
    throw std::invalid_argument("dscore_weight: additive scores need it");
  if (call.p.score_kind == fusedattn::ScoreKind::kDot && dscore_weight)
    throw std::invalid_argument("score_weight and dscore_weight come together");
  if (dscore_weight) {
    py::array& dw = *dscore_weight;
    if (!same_dtype(dw.dtype(), compute_dtype(q)) || dw.ndim() != 1 || dw.shape(0) != call.p.head_dim || !dw.writeable() ||
        (dw.shape(0) > 1 && dw.strides(0) != dw.itemsize()))
      throw std::invalid_argument("dscore_weight: expected a writeable contiguous (D,) array of q's compute dtype");
    call.p.dscore_weight = dw.mutable_data();
  }
  AttnParams& p = call.p;
  for (const py::array* a : std::initializer_list<const py::array*>{&v, &out, &dout, &dq, &dk, &dv})
    if (!same_dtype(a->dtype(), q.dtype())) throw py::type_error("q, k, v, out, dout and the gradients must share one dtype");
  if (!same_dtype(lse.dtype(), compute_dtype(q))) throw py::type_error("lse: dtype must be the compute dtype of q");
  for (const py::array* a : std::initializer_list<const py::array*>{&dq, &dk, &dv})
    if (!a->writeable()) throw std::invalid_argument("gradient arrays must be writeable");
  p.value_dim = v.shape(v.ndim() - 1);
  require_shape(v, "v", {p.heads_kv, p.len_k, p.value_dim});
  require_shape(out, "out", {p.heads_q, p.len_q, p.value_dim});
  require_shape(dout, "dout", {p.heads_q, p.len_q, p.value_dim});
  require_shape(lse, "lse", {p.heads_q, p.len_q});
  require_shape(dq, "dq", {p.heads_q, p.len_q, p.head_dim});
  require_shape(dk, "dk", {p.heads_kv, p.len_k, p.head_dim});
  require_shape(dv, "dv", {p.heads_kv, p.len_k, p.value_dim});
  call.v = convert(v, "v", 3, call.lead);
  call.out = convert(out, "out", 3, call.lead);
  call.lse = convert(lse, "lse", 2, call.lead);
  call.dout = convert(dout, "dout", 3, call.lead);
  call.dq = convert(dq, "dq", 3, call.lead);
  call.dk = convert(dk, "dk", 3, call.lead);
  call.dv = convert(dv, "dv", 3, call.lead);
  p.v = call.v.tensor;
  p.out = call.out.tensor;
  p.lse = call.lse.tensor;
  p.dout = call.dout.tensor;
  p.dq = call.dq.tensor;
  p.dk = call.dk.tensor;
  p.dv = call.dv.tensor;
  apply_spec_packing(call, spec);
  check_alibi_rows(p);
  py::gil_scoped_release release;
  fusedattn::attention_backward(p);
}

// Whether a paged call's lengths and used block ids are in range: every seq_lens[b] in [0, max_blocks x
// block_size] and every entry a sequence reads (the first ceil(seq_lens[b] / block_size) of its row) a block
// of the pool. One pass over int32 arrays in place: a decode step then pays one call where NumPy took four
// reductions (~4 us). False sends the caller to its NumPy checks, which name the entry at fault.
bool paged_indices_valid(const py::array_t<int32_t, py::array::c_style>& block_table,
                         const py::array_t<int32_t, py::array::c_style>& seq_lens, int64_t block_size, int64_t num_blocks) {
  if (block_table.ndim() != 2 || seq_lens.ndim() != 1 || block_table.shape(0) != seq_lens.shape(0) || block_size < 1)
    throw std::invalid_argument("paged_indices_valid: expected block_table (B, max_blocks), seq_lens (B,), block_size >= 1");
  const int64_t batch = seq_lens.shape(0), max_blocks = block_table.shape(1);
  const int32_t* table = block_table.data();
  const int32_t* lengths = seq_lens.data();
  // A negative id reads as a huge unsigned one. No early exit and an integer flag, so that the loop vectorises
  // (SSE2: 0.9 us for 8192 entries; a bool flag or a min / max pair 2.6-3.6 us).
  const uint32_t pool = static_cast<uint32_t>(std::min<int64_t>(num_blocks, INT32_MAX));
  uint32_t outside = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = lengths[b];
    if (length < 0 || length > max_blocks * block_size) return false;
    const int32_t* row = table + b * max_blocks;
    const int64_t used = (length + block_size - 1) / block_size;
    for (int64_t i = 0; i < used; ++i) outside |= static_cast<uint32_t>(row[i]) >= pool ? 1u : 0u;
  }
  return outside == 0;
}

std::vector<std::string> names(const std::vector<fusedattn::Isa>& isas) {
  std::vector<std::string> result;
  for (fusedattn::Isa isa : isas) result.emplace_back(fusedattn::isa_name(isa));
  return result;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fusedattn's compiled core (private: use the fusedattn package)";
  m.def("attention_forward", &attention_forward, py::arg("spec"), py::kw_only(), py::arg("out"), py::arg("lse"),
        "Fused attention forward of a call spec (fusedattn._spec.AttentionSpec) into out (*lead, Hq, Lq, Dv) and, "
        "when given, lse (*lead, Hq, Lq).");
  m.def("attention_weights", &attention_weights, py::arg("spec"), py::kw_only(), py::arg("weights"),
        "Softmax probabilities of a call spec into weights (*lead, Hq, Lq, Lk), zero-filled by the caller.");
  m.def("attention_backward", &attention_backward, py::arg("spec"), py::kw_only(), py::arg("dout"), py::arg("out"),
        py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("dscore_weight"),
        "Gradients of a call spec's forward into dq, dk, dv (and dscore_weight for additive scores); "
        "deterministic at any thread count.");
  m.def("paged_indices_valid", &paged_indices_valid, py::arg("block_table"), py::arg("seq_lens"), py::arg("block_size"),
        py::arg("num_blocks"),
        "Whether every length of a paged call is in [0, max_blocks x block_size] and every block id a sequence reads "
        "is in [0, num_blocks): C-contiguous int32 block_table (B, max_blocks) and seq_lens (B,).");
  m.def("compiled_isas", [] { return names(fusedattn::compiled_isas()); });
  m.def("supported_isas", [] { return names(fusedattn::supported_isas()); });
  m.def("current_isa", [] { return std::string(fusedattn::isa_name(fusedattn::current_isa())); });
  m.def("set_isa", [](const std::string& name) {
    fusedattn::Isa isa;
    if (!fusedattn::isa_from_name(name, &isa)) throw std::invalid_argument("unknown ISA '" + name + "'");
    fusedattn::set_isa(isa);
  });
  m.def("measure_fma_peak_gflops", &fusedattn::measure_fma_peak_gflops, py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>(),
        "fp32 FMA throughput of the selected ISA on num_threads threads, GFLOP/s");
  m.def("measure_read_bandwidth_gbs", &fusedattn::measure_read_bandwidth_gbs, py::arg("num_threads"),
        py::arg("bytes") = int64_t(512) << 20, py::call_guard<py::gil_scoped_release>(),
        "streaming read bandwidth over a buffer of `bytes`, GB/s");
  m.def("amx_status", [] {
    const fusedattn::AmxStatus s = fusedattn::amx_status();
    py::dict d;
    d["compiled"] = s.compiled;
    d["cpu"] = s.cpu;
    d["cpu_fp16"] = s.cpu_fp16;
    d["native_fp16"] = s.native_fp16;
    d["os"] = s.os;
    d["emulated"] = s.emulated;
    d["reason"] = s.reason;
    return d;
  }, "What the amx level needs and has: compiled, cpu (AMX-TILE + AMX-BF16), cpu_fp16, native_fp16, os (tile "
     "state granted), emulated (0, or the software model's mode) and reason ('' when available).");
  m.def("set_amx_emulation", &fusedattn::set_amx_emulation, py::arg("mode"),
        "Test switch: 1 runs the amx level on the software model of the tile instructions (any AVX-512 CPU), "
        "2 models AMX-FP16 too, 0 is the hardware.");
  m.def("decode_read_ahead", &fusedattn::decode_read_ahead,
        "Whether decode prefetches contiguous one-row K / V streams in software (default: on Intel CPUs).");
  m.def("set_decode_read_ahead", &fusedattn::set_decode_read_ahead, py::arg("mode"),
        "1 on, 0 off, -1 the CPU's default: decode's software prefetch of contiguous one-row K / V streams.");
  m.attr("MAX_HEAD_DIM") = fusedattn::kMaxHeadDim;  // the largest D and Dv: Python's checks read it here
  m.def("max_threads", &fusedattn::max_threads);
  m.def("openmp", &fusedattn::openmp_enabled);
#ifdef FUSEDATTN_VERSION
  m.attr("__version__") = FUSEDATTN_VERSION;
#endif
}
