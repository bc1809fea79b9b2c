// The vmeanba op library: C functions that an AOTInductor package calls for the project's ops.
//
// Why C functions and not the dispatcher: AOTInductor calls a custom op either through its proxy
// executor (a boxed dispatcher call, which for an op defined in Python ends in the Python
// interpreter) or, when `aot_inductor.custom_ops_to_c_shims` declares one, through a plain C
// function named aoti_torch_<device>_<op name>. This library provides those functions, so a package
// runs with libtorch and this library alone (docs/DEPLOY.md).
//
// One schema: the declarations this file implements are generated from the ops' schemas as Python
// defines them (vmeanba_compiler/ops.py) into vmeanba_shims.h at build time
// (deploy/op_library.py); a signature that disagrees with the schema does not compile. The same
// declarations are handed to AOTInductor. One kernel: the arithmetic is lowering/selective_scan_cpu.c
// and lowering/reduced_scan_cpu.c, the files the Python CPU path runs, compiled into this library
// once per precision with their entry points renamed (kernel_abi.h declares them).
//
// Only the C shim API of torch/csrc/inductor/aoti_torch/c/shim.h is used (no ATen headers), which
// keeps the build to a few seconds. Errors are reported as AOTI_TORCH_FAILURE after a message on
// stderr (the generated wrapper turns the code into an exception without a message of its own).
#include "kernel_abi.h"
#include "vmeanba_shims.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

void check(AOTITorchError error, const char* what) {
  if (error != AOTI_TORCH_SUCCESS) throw std::runtime_error(std::string("torch C shim call failed: ") + what);
}

void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument(message);
}

// A tensor handle this code created (deleted on scope exit) or borrowed from the caller.
class Handle {
 public:
  Handle() = default;
  static Handle borrow(AtenTensorHandle h) { return Handle(h, false); }
  static Handle own(AtenTensorHandle h) { return Handle(h, true); }
  Handle(Handle&& other) noexcept : h_(std::exchange(other.h_, nullptr)), owned_(other.owned_) {}
  Handle& operator=(Handle&& other) noexcept {
    std::swap(h_, other.h_);
    std::swap(owned_, other.owned_);
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() {
    if (h_ && owned_) aoti_torch_delete_tensor_object(h_);
  }
  AtenTensorHandle get() const { return h_; }
  // Hand an owned handle to the caller (an op output).
  AtenTensorHandle release() {
    owned_ = false;
    return std::exchange(h_, nullptr);
  }

 private:
  Handle(AtenTensorHandle h, bool owned) : h_(h), owned_(owned) {}
  AtenTensorHandle h_ = nullptr;
  bool owned_ = false;
};

std::vector<int64_t> sizes_of(AtenTensorHandle t) {
  int64_t ndim = 0;
  int64_t* sizes = nullptr;
  check(aoti_torch_get_dim(t, &ndim), "get_dim");
  check(aoti_torch_get_sizes(t, &sizes), "get_sizes");
  return {sizes, sizes + ndim};
}

std::vector<int64_t> strides_of(AtenTensorHandle t) {
  int64_t* strides = nullptr;
  check(aoti_torch_get_strides(t, &strides), "get_strides");
  return {strides, strides + sizes_of(t).size()};
}

int32_t dtype_of(AtenTensorHandle t) {
  int32_t dtype = 0;
  check(aoti_torch_get_dtype(t, &dtype), "get_dtype");
  return dtype;
}

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> strides(sizes.size(), 1);
  for (size_t i = sizes.size(); i-- > 1;) strides[i - 1] = strides[i] * std::max<int64_t>(sizes[i], 1);
  return strides;
}

Handle empty(const std::vector<int64_t>& sizes, int32_t dtype) {
  AtenTensorHandle out = nullptr;
  std::vector<int64_t> strides = contiguous_strides(sizes);
  check(aoti_torch_empty_strided(static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), dtype,
                                 aoti_torch_device_type_cpu(), 0, &out),
        "empty_strided");
  return Handle::own(out);
}

// `t` as a contiguous tensor of `dtype`: itself when it already is one, else a copy.
Handle dense(Handle t, int32_t dtype) {
  std::vector<int64_t> sizes = sizes_of(t.get());
  if (dtype_of(t.get()) == dtype && strides_of(t.get()) == contiguous_strides(sizes)) return t;
  Handle copy = empty(sizes, dtype);
  check(aoti_torch_copy_(copy.get(), t.get(), 0), "copy_");
  return copy;
}

Handle dense(AtenTensorHandle t, int32_t dtype) { return dense(Handle::borrow(t), dtype); }

// A view of `t` with its last two axes swapped.
Handle swap_last_axes(AtenTensorHandle t) {
  std::vector<int64_t> sizes = sizes_of(t), strides = strides_of(t);
  std::swap(sizes[sizes.size() - 1], sizes[sizes.size() - 2]);
  std::swap(strides[strides.size() - 1], strides[strides.size() - 2]);
  int64_t offset = 0;
  AtenTensorHandle view = nullptr;
  check(aoti_torch_get_storage_offset(t, &offset), "get_storage_offset");
  check(aoti_torch__reinterpret_tensor(t, static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), offset,
                                       &view),
        "_reinterpret_tensor");
  return Handle::own(view);
}

template <typename real>
real* data(const Handle& t) {
  void* ptr = nullptr;
  check(aoti_torch_get_data_ptr(t.get(), &ptr), "get_data_ptr");
  return static_cast<real*>(ptr);
}

// B or C as a kernel reads it. Forms (docs/DESIGN.md section 1): fixed (dim, N), shared
// (batch, N, L), grouped (batch, G, N, L). Element (b, channel c, n, t) is at
// P[b*sb + (c / cpg)*sg + n*sn + t*st], as scan_schema.projection_strides describes it.
struct Projection {
  Handle tensor;
  int64_t groups = 1;  // G of a grouped projection, else 1
  int64_t sb = 0, sg = 0, sn = 1, st = 0, cpg = 1;
};

Projection projection(AtenTensorHandle p, int32_t math, int64_t batch, int64_t dim, int64_t N, int64_t L,
                      bool state_last, const char* name) {
  std::vector<int64_t> s = sizes_of(p);
  Projection out;
  if (s.size() == 2) {
    require(s[0] == dim && s[1] == N, std::string(name) + ": a fixed projection must be (dim, N)");
  } else if (s.size() == 3) {
    require(s[0] == batch && s[1] == N && s[2] == L, std::string(name) + ": a shared projection must be (batch, N, L)");
    out.cpg = dim;
  } else {
    require(s.size() == 4 && s[0] == batch && s[1] > 0 && dim % s[1] == 0 && s[2] == N && s[3] == L,
            std::string(name) + ": a grouped projection must be (batch, G, N, L) with G dividing dim");
    out.groups = s[1];
    out.cpg = dim / s[1];
  }
  if (state_last) {
    // The full scan's kernel reads (batch, [G,] L, N) contiguous: the state axis last.
    out.tensor = s.size() == 2 ? dense(p, math) : dense(swap_last_axes(p), math);
    out.sn = 1;
    if (s.size() == 2) out.sg = N;
    if (s.size() >= 3) out.st = N, out.sb = out.groups * L * N;
    if (s.size() == 4) out.sg = L * N;
  } else {
    // The reduced site's kernel reads any strides: a copy only to change the dtype.
    out.tensor = dtype_of(p) == math ? Handle::borrow(p) : dense(p, math);
    std::vector<int64_t> st = strides_of(out.tensor.get());
    if (s.size() == 2) out.sg = st[0], out.sn = st[1];
    if (s.size() == 3) out.sb = st[0], out.sn = st[1], out.st = st[2];
    if (s.size() == 4) out.sb = st[0], out.sg = st[1], out.sn = st[2], out.st = st[3];
  }
  return out;
}

// The op's inputs, checked and as the kernels read them: math dtype (float64 for float64 u, else
// float32), u, delta, A, D, z, delta_bias contiguous; B and C as `projection` gives them.
struct ScanInputs {
  int64_t batch = 0, dim = 0, N = 0, L = 0;
  int32_t u_dtype = 0, math = 0;
  Handle u, delta, A, D, z, bias;
  Projection B, C;
};

ScanInputs prepare(AtenTensorHandle u, AtenTensorHandle delta, AtenTensorHandle A, AtenTensorHandle B,
                   AtenTensorHandle C, AtenTensorHandle* D, AtenTensorHandle* z, AtenTensorHandle* delta_bias,
                   bool state_last) {
  for (AtenTensorHandle t : {u, delta, A, B, C}) {
    int32_t device = 0;
    check(aoti_torch_get_device_type(t, &device), "get_device_type");
    require(device == aoti_torch_device_type_cpu(), "got a tensor that is not on the CPU (CPU functions only)");
  }
  ScanInputs in;
  std::vector<int64_t> us = sizes_of(u), as = sizes_of(A);
  require(us.size() == 3, "u must be (batch, dim, L)");
  require(sizes_of(delta) == us, "delta must have u's shape (batch, dim, L)");
  in.batch = us[0], in.dim = us[1], in.L = us[2];
  require(as.size() == 2 && as[0] == in.dim, "A must be (dim, N)");
  in.N = as[1];
  in.u_dtype = dtype_of(u);
  in.math = in.u_dtype == aoti_torch_dtype_float64() ? aoti_torch_dtype_float64() : aoti_torch_dtype_float32();
  auto optional = [&](AtenTensorHandle* t, const std::vector<int64_t>& shape, const char* name) {
    if (!t || !*t) return Handle();
    require(sizes_of(*t) == shape, std::string(name) + " has the wrong shape");
    return dense(*t, in.math);
  };
  in.u = dense(u, in.math);
  in.delta = dense(delta, in.math);
  in.A = dense(A, in.math);
  in.D = optional(D, {in.dim}, "D");
  in.z = optional(z, us, "z");
  in.bias = optional(delta_bias, {in.dim}, "delta_bias");
  in.B = projection(B, in.math, in.batch, in.dim, in.N, in.L, state_last, "B");
  in.C = projection(C, in.math, in.batch, in.dim, in.N, in.L, state_last, "C");
  return in;
}

template <typename real>
const real* maybe(const Handle& t) {
  return t.get() ? data<real>(t) : nullptr;
}

// One contiguous block of [0, items) per OpenMP thread (the threads torch.set_num_threads /
// at::set_num_threads set), as lowering/scan_cpu.py splits work.
int64_t worker_count(int64_t items) { return std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), items)); }

// Run `block(worker, begin, end)` for every block, in parallel. Everything that can fail (handle
// queries, allocations) happens before: an exception must not leave an OpenMP region.
template <typename Block>
void parallel_blocks(int64_t items, int64_t workers, const Block& block) {
#pragma omp parallel for num_threads(workers) schedule(static, 1)
  for (int64_t w = 0; w < workers; ++w) block(w, items * w / workers, items * (w + 1) / workers);
}

template <typename real>
void scan(void (*kernel)(VMEANBA_SCAN_FORWARD_ARGS(real)), const ScanInputs& in, bool softplus, const Handle& y,
          const Handle& last_state) {
  const real *u = data<real>(in.u), *delta = data<real>(in.delta), *A = data<real>(in.A);
  const real *B = data<real>(in.B.tensor), *C = data<real>(in.C.tensor);
  const real *D = maybe<real>(in.D), *z = maybe<real>(in.z), *bias = maybe<real>(in.bias);
  real *y_k = data<real>(y), *state_k = data<real>(last_state);
  const int64_t workers = worker_count(in.dim), L = std::max<int64_t>(in.L, 1);
  std::vector<real> scratch(static_cast<size_t>(workers * L));  // L entries per worker
  parallel_blocks(in.dim, workers, [&](int64_t w, int64_t begin, int64_t end) {  // channels are independent
    kernel(u, delta, A, B, in.B.sb, in.B.sg, in.B.st, in.B.cpg, C, in.C.sb, in.C.sg, in.C.st, in.C.cpg, D, z, bias,
           softplus ? 1 : 0, y_k, state_k, scratch.data() + w * L, in.batch, in.dim, in.N, in.L, begin, end);
  });
}

template <typename real>
void reduced_scan(void (*kernel)(VMEANBA_REDUCED_FORWARD_ARGS(real)), const ScanInputs& in, bool softplus,
                  bool dt_raw, bool skip_mean, int64_t groups, const Handle& y, const Handle& last_state) {
  const real *u = data<real>(in.u), *delta = data<real>(in.delta), *A = data<real>(in.A);
  const real *B = data<real>(in.B.tensor), *C = data<real>(in.C.tensor);
  const real *D = maybe<real>(in.D), *z = maybe<real>(in.z), *bias = maybe<real>(in.bias);
  real *y_k = data<real>(y), *state_k = data<real>(last_state);
  const int64_t items = in.batch * groups;  // (batch row, group) pairs share nothing
  parallel_blocks(items, worker_count(items), [&](int64_t, int64_t begin, int64_t end) {
    kernel(u, delta, A, B, in.B.sb, in.B.sg, in.B.sn, in.B.st, in.B.cpg, C, in.C.sb, in.C.sg, in.C.sn, in.C.st,
           in.C.cpg, D, z, bias, softplus ? 1 : 0, dt_raw ? 1 : 0, skip_mean ? 1 : 0, y_k, state_k, in.batch, in.dim,
           in.N, in.L, groups, begin, end);
  });
}

// Both ops return y (batch, dim, L) in u's dtype and the last state (batch, dim, N) in the math dtype.
template <typename Run>
void outputs(const ScanInputs& in, Run run, AtenTensorHandle* y_out, AtenTensorHandle* state_out) {
  Handle y = empty({in.batch, in.dim, in.L}, in.math), last_state = empty({in.batch, in.dim, in.N}, in.math);
  run(y, last_state);
  if (in.u_dtype != in.math) {
    Handle cast = empty({in.batch, in.dim, in.L}, in.u_dtype);
    check(aoti_torch_copy_(cast.get(), y.get(), 0), "copy_");
    y = std::move(cast);
  }
  *y_out = y.release();
  *state_out = last_state.release();
}

// vmeanba::selective_scan (docs/DESIGN.md section 1).
void selective_scan(const ScanInputs& in, bool softplus, AtenTensorHandle* y_out, AtenTensorHandle* state_out) {
  outputs(in, [&](const Handle& y, const Handle& state) {
    if (in.math == aoti_torch_dtype_float64()) scan<double>(vmeanba_scan_forward_double, in, softplus, y, state);
    else scan<float>(vmeanba_scan_forward_float, in, softplus, y, state);
  }, y_out, state_out);
}

// vmeanba::reduced_selective_scan (docs/DESIGN.md section 2), with the checks of
// lowering/reduced_scan.py's check_reduction.
void reduced_selective_scan(const ScanInputs& in, bool softplus, int64_t groups, const std::string& dt_mode,
                            const std::string& skip_mode, AtenTensorHandle* y_out, AtenTensorHandle* state_out) {
  require(dt_mode == "effective" || dt_mode == "raw", "dt_mode must be 'effective' or 'raw', got '" + dt_mode + "'");
  require(skip_mode == "exact" || skip_mode == "mean", "skip_mode must be 'exact' or 'mean', got '" + skip_mode + "'");
  require(groups >= 1 && in.dim % groups == 0, "groups must be a positive divisor of the channel count");
  for (const Projection* p : {&in.B, &in.C}) {
    require(groups % p->groups == 0, "groups must be a multiple of B's and C's group counts");
  }
  const bool raw = dt_mode == "raw", mean = skip_mode == "mean";
  outputs(in, [&](const Handle& y, const Handle& state) {
    if (in.math == aoti_torch_dtype_float64())
      reduced_scan<double>(vmeanba_reduced_scan_forward_double, in, softplus, raw, mean, groups, y, state);
    else
      reduced_scan<float>(vmeanba_reduced_scan_forward_float, in, softplus, raw, mean, groups, y, state);
  }, y_out, state_out);
}

template <typename Body>
AOTITorchError guarded(const char* op, Body body) {
  try {
    body();
    return AOTI_TORCH_SUCCESS;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "vmeanba op library, %s: %s\n", op, error.what());
    return AOTI_TORCH_FAILURE;
  }
}

}  // namespace

extern "C" AOTITorchError aoti_torch_cpu_selective_scan(AtenTensorHandle u, AtenTensorHandle delta,
                                                        AtenTensorHandle A, AtenTensorHandle B, AtenTensorHandle C,
                                                        AtenTensorHandle* D, AtenTensorHandle* z,
                                                        AtenTensorHandle* delta_bias, int32_t delta_softplus,
                                                        AtenTensorHandle* ret0, AtenTensorHandle* ret1) {
  return guarded("vmeanba::selective_scan", [&] {
    selective_scan(prepare(u, delta, A, B, C, D, z, delta_bias, true), delta_softplus != 0, ret0, ret1);
  });
}

extern "C" AOTITorchError aoti_torch_cpu_reduced_selective_scan(
    AtenTensorHandle u, AtenTensorHandle delta, AtenTensorHandle A, AtenTensorHandle B, AtenTensorHandle C,
    AtenTensorHandle* D, AtenTensorHandle* z, AtenTensorHandle* delta_bias, int32_t delta_softplus, int64_t groups,
    const char* dt_mode, const char* skip_mode, AtenTensorHandle* ret0, AtenTensorHandle* ret1) {
  return guarded("vmeanba::reduced_selective_scan", [&] {
    reduced_selective_scan(prepare(u, delta, A, B, C, D, z, delta_bias, false), delta_softplus != 0, groups, dt_mode,
                           skip_mode, ret0, ret1);
  });
}
