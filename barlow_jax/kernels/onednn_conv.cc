// oneDNN 2-D convolutions (forward, backward-data, backward-weights) as XLA FFI handlers.
//
// barlow_jax/kernels/onednn.py compiles this file on first use against jaxlib's
// FFI headers and the oneDNN wheels (onednn-cpu-gomp), registers the three
// handlers as CPU custom-call targets and calls them from a jax.custom_vjp.
//
// Layouts: activations NHWC and kernels HWIO, as flax.linen.Conv passes them;
// float32 only (the Python side casts other dtypes). Padding is explicit
// (low, high) per spatial dimension, strides are per spatial dimension, no
// dilation, no groups (the Python side keeps those on XLA).
//
// Why the kernel is reordered: with the kernel in its plain HWIO layout oneDNN
// runs both backward passes as im2col + gemm, ~1.5x slower than PyTorch; with
// `format_tag::any` it picks a blocked layout whose direct kernels reach
// PyTorch's speed. The kernel changes every step, so it is reordered on every
// call (a small copy next to the convolution); the reorder primitive is cached.
//
// Why a per-call scratchpad: XLA runs the programs of several CPU devices on
// several threads at once, and they call the same cached primitive
// concurrently. A primitive is safe to execute concurrently only when the
// caller owns its scratchpad (scratchpad_mode::user).
//
// Why omp_set_num_threads per call: oneDNN (OpenMP build) starts an OpenMP team
// in the calling thread; XLA's threads are not OpenMP threads, so each keeps
// its own setting. With several CPU devices several teams run at once; the
// Python side picks the team size (see docs/onednn.md). It must be the same
// when a primitive is created and run (oneDNN splits the work at creation), so
// it is part of the cache key.

#include <omp.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using Dims = ffi::Span<const int64_t>;  // A buffer's shape.
constexpr memory::data_type kF32 = memory::data_type::f32;

// Team size of every oneDNN call; 0 leaves OpenMP's default.
int g_threads = 0;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Everything that determines a primitive: the kind of pass, the shapes of the
// three tensors, strides, padding and the OpenMP team size.
struct Key {
  std::array<int64_t, 18> v;
  bool operator==(const Key& o) const { return v == o.v; }
};
struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = 1469598103934665603ull;
    for (int64_t x : k.v) h = (h ^ static_cast<size_t>(x)) * 1099511628211ull;
    return h;
  }
};

enum Pass : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// Shapes of one convolution, in oneDNN's logical order (NCHW, OIHW).
struct Geometry {
  int64_t n, ci, h, w, co, kh, kw, oh, ow;
  memory::dims strides, pad_l, pad_r;

  memory::dims src() const { return {n, ci, h, w}; }
  memory::dims weights() const { return {co, ci, kh, kw}; }
  memory::dims dst() const { return {n, co, oh, ow}; }

  Key key(Pass pass) const {
    return Key{{pass, n, ci, h, w, co, kh, kw, oh, ow, strides[0], strides[1], pad_l[0],
                pad_l[1], pad_r[0], pad_r[1], g_threads, 0}};
  }
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      memory::desc(g.src(), kF32, Tag::nhwc), memory::desc(g.weights(), kF32, Tag::any),
      memory::desc(g.dst(), kF32, Tag::nhwc), g.strides, g.pad_l, g.pad_r, UserScratchpad());
}

// A reorder between the user's HWIO kernel and the layout a primitive chose;
// empty when they are the same.
struct Reorder {
  std::unique_ptr<dnnl::reorder> prim;
  memory::desc from, to;
  size_t scratch = 0;

  Reorder(const memory::desc& from_md, const memory::desc& to_md) : from(from_md), to(to_md) {
    if (from_md == to_md) return;
    dnnl::reorder::primitive_desc pd(Engine(), from_md, Engine(), to_md, UserScratchpad());
    scratch = pd.scratchpad_desc().get_size();
    prim = std::make_unique<dnnl::reorder>(pd);
  }
};

// A cached primitive with the kernel reorder its pass needs.
struct Entry {
  dnnl::primitive prim;
  size_t scratch;
  std::unique_ptr<Reorder> reorder;
};

std::mutex g_mutex;
std::unordered_map<Key, std::shared_ptr<const Entry>, KeyHash> g_cache;

std::shared_ptr<const Entry> MakeEntry(Pass pass, const Geometry& g) {
  const memory::desc hwio(g.weights(), kF32, Tag::hwio);
  auto entry = std::make_shared<Entry>();
  auto fwd = ForwardDesc(g);
  if (pass == kForward) {
    entry->prim = dnnl::convolution_forward(fwd);
    entry->scratch = fwd.scratchpad_desc().get_size();
    entry->reorder = std::make_unique<Reorder>(hwio, fwd.weights_desc());
  } else if (pass == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, memory::desc(g.src(), kF32, Tag::nhwc),
        memory::desc(g.weights(), kF32, Tag::any), memory::desc(g.dst(), kF32, Tag::nhwc),
        g.strides, g.pad_l, g.pad_r, fwd, UserScratchpad());
    entry->prim = dnnl::convolution_backward_data(pd);
    entry->scratch = pd.scratchpad_desc().get_size();
    entry->reorder = std::make_unique<Reorder>(hwio, pd.weights_desc());
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, memory::desc(g.src(), kF32, Tag::nhwc),
        memory::desc(g.weights(), kF32, Tag::any), memory::desc(g.dst(), kF32, Tag::nhwc),
        g.strides, g.pad_l, g.pad_r, fwd, UserScratchpad());
    entry->prim = dnnl::convolution_backward_weights(pd);
    entry->scratch = pd.scratchpad_desc().get_size();
    // Here the reorder goes the other way: from oneDNN's layout to HWIO.
    entry->reorder = std::make_unique<Reorder>(pd.diff_weights_desc(), hwio);
  }
  return entry;
}

std::shared_ptr<const Entry> Lookup(Pass pass, const Geometry& g) {
  const Key key = g.key(pass);
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_cache.find(key);
    if (it != g_cache.end()) return it->second;
  }
  // Created outside the lock (creation takes milliseconds); two threads may
  // both create one, the first inserted wins.
  auto entry = MakeEntry(pass, g);
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_cache.emplace(key, std::move(entry)).first->second;
}

// Per-thread scratch memory, grown as needed: the scratchpads and the
// reordered kernel of one call.
char* ThreadBuffer(int slot, size_t bytes) {
  thread_local std::array<std::vector<char>, 2> buffers;
  auto& b = buffers[slot];
  if (b.size() < bytes) b.resize(bytes);
  return b.data();
}

Geometry MakeGeometry(Dims x, Dims w, Dims y,
                      ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  // x: N H W Ci, w: KH KW Ci Co, y: N OH OW Co; padding: lo_h hi_h lo_w hi_w.
  return Geometry{x[0], x[3], x[1], x[2], w[3], w[0], w[1], y[1], y[2],
                  {strides[0], strides[1]}, {padding[0], padding[2]}, {padding[1], padding[3]}};
}

ffi::Error CheckRanks(Dims a, Dims b, Dims c,
                      ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  if (a.size() != 4 || b.size() != 4 || c.size() != 4 || strides.size() != 2 ||
      padding.size() != 4) {
    return ffi::Error::InvalidArgument("onednn_conv: expects 4-D operands, 2 strides, 4 pads");
  }
  return ffi::Error::Success();
}

// Runs one pass. `x`, `w`, `y` are the user's NHWC / HWIO / NHWC buffers; which
// of them are read and which written depends on the pass.
ffi::Error Run(Pass pass, void* x, void* w, void* y, const Geometry& g) {
  if (g_threads > 0) omp_set_num_threads(g_threads);
  try {
    auto entry = Lookup(pass, g);
    dnnl::engine& engine = Engine();
    dnnl::stream stream(engine);
    const Reorder& reorder = *entry->reorder;
    memory src(memory::desc(g.src(), kF32, Tag::nhwc), engine, x);
    memory dst(memory::desc(g.dst(), kF32, Tag::nhwc), engine, y);
    memory user_w(memory::desc(g.weights(), kF32, Tag::hwio), engine, w);
    // The kernel in the primitive's layout: the user's buffer itself when no
    // reorder is needed, else a per-thread buffer.
    memory prim_w = user_w;
    if (reorder.prim) {
      const memory::desc& md = pass == kBackwardWeights ? reorder.from : reorder.to;
      prim_w = memory(md, engine, ThreadBuffer(0, md.get_size()));
    }
    auto scratch = [&](size_t bytes) {
      return memory(memory::desc({static_cast<int64_t>(bytes)}, memory::data_type::u8, Tag::a),
                    engine, ThreadBuffer(1, bytes));
    };
    if (reorder.prim && pass != kBackwardWeights) {
      reorder.prim->execute(stream, {{DNNL_ARG_FROM, user_w}, {DNNL_ARG_TO, prim_w},
                                     {DNNL_ARG_SCRATCHPAD, scratch(reorder.scratch)}});
    }
    if (pass == kForward) {
      entry->prim.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, prim_w},
                                   {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch(entry->scratch)}});
    } else if (pass == kBackwardData) {
      entry->prim.execute(stream, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, prim_w},
                                   {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch(entry->scratch)}});
    } else {
      entry->prim.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, prim_w},
                                   {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch(entry->scratch)}});
      if (reorder.prim) {
        reorder.prim->execute(stream, {{DNNL_ARG_FROM, prim_w}, {DNNL_ARG_TO, user_w},
                                       {DNNL_ARG_SCRATCHPAD, scratch(reorder.scratch)}});
      }
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> padding) {
  if (auto e = CheckRanks(x.dimensions(), w.dimensions(), y->dimensions(), strides, padding);
      e.failure()) return e;
  return Run(kForward, x.untyped_data(), w.untyped_data(), y->untyped_data(),
             MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), strides, padding));
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::Span<const int64_t> strides,
                        ffi::Span<const int64_t> padding) {
  if (auto e = CheckRanks(dx->dimensions(), w.dimensions(), dy.dimensions(), strides, padding);
      e.failure()) return e;
  return Run(kBackwardData, dx->untyped_data(), w.untyped_data(), dy.untyped_data(),
             MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), strides, padding));
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dw, ffi::Span<const int64_t> strides,
                           ffi::Span<const int64_t> padding) {
  if (auto e = CheckRanks(x.dimensions(), dw->dimensions(), dy.dimensions(), strides, padding);
      e.failure()) return e;
  return Run(kBackwardWeights, x.untyped_data(), dw->untyped_data(), dy.untyped_data(),
             MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), strides, padding));
}

}  // namespace

// The three handlers take the same operands: two float32 buffers, one result,
// and the convolution's strides and (low, high) padding.
static auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<ffi::Span<const int64_t>>("strides")
      .Attr<ffi::Span<const int64_t>>("padding");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(BarlowOnednnConvForward, Forward,
                              ConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BarlowOnednnConvBackwardData, BackwardData,
                              ConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BarlowOnednnConvBackwardWeights, BackwardWeights,
                              ConvBinding());

extern "C" {

// Sets the OpenMP team size of every later call (0: OpenMP's default).
void barlow_onednn_set_threads(int threads) { g_threads = threads; }

// Creates the CPU engine and runs one tiny convolution: 0 when oneDNN works,
// else 1 with the reason in `message` (e.g. a GPU-only build without a CPU
// engine). Called once when the library is loaded.
int barlow_onednn_self_test(char* message, int size) {
  try {
    Geometry g{1, 1, 3, 3, 1, 3, 3, 1, 1, {1, 1}, {0, 0}, {0, 0}};
    std::vector<float> x(9, 1.0f), w(9, 2.0f), y(1, 0.0f);
    ffi::Error e = Run(kForward, x.data(), w.data(), y.data(), g);
    if (e.failure()) {
      std::snprintf(message, size, "%s", e.message().c_str());
      return 1;
    }
    if (y[0] != 18.0f) {
      std::snprintf(message, size, "a 3x3 convolution of ones by twos gave %g, not 18", y[0]);
      return 1;
    }
  } catch (const dnnl::error& e) {
    std::snprintf(message, size, "oneDNN: %s", e.what());
    return 1;
  }
  return 0;
}

// oneDNN's version as major*10000 + minor*100 + patch (the library loaded, not the headers).
int barlow_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

}  // extern "C"
