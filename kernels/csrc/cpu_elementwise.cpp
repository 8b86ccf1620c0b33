// The decoder's elementwise ops for the CPU, each one pass over its rows (the torch references in
// flotilla/kernels/elementwise.py take 4-10 ops and as many temporaries each):
//   rms_norm / fused_add_rms_norm: transformers' LlamaRMSNorm (with the residual add before it);
//   rotary_embedding: neox-style RoPE of q and k, in place;
//   silu_and_mul: silu(gate) * up of gate_up_proj's packed output.
// Rounding follows the references step by step: every intermediate the reference stores in the model's dtype
// (bf16/fp16) is rounded to it here too, everything else is fp32, so fp32 results differ from the references
// only by summation order (the norm's mean) and exp's last bits (silu).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "cpu_vec.h"

// Products and sums stay separately rounded, as in the references (no fused multiply-add contraction).
#pragma GCC optimize("fp-contract=off")

namespace {

// Rounds to T and back (identity for float): what storing an intermediate in the model's dtype does.
template <typename T>
inline float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}
template <>
inline float round_to<float>(float x) {
  return x;
}
template <>
inline float round_to<c10::BFloat16>(float x) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  const uint32_t out = std::isnan(x) ? 0x7FC00000u : rounded;
  float f;
  std::memcpy(&f, &out, sizeof(f));
  return f;
}

using flotilla_cpu::exp_poly;

// float and bf16 have 16-lane AVX-512 loops where the library is built for AVX-512; fp16 (and any T elsewhere)
// the portable ones.
#if defined(__AVX512F__)
template <typename T>
constexpr bool kVec = std::is_same<T, float>::value || std::is_same<T, c10::BFloat16>::value;
using flotilla_cpu::load16;
using flotilla_cpu::round16;
using flotilla_cpu::store16;
#else
template <typename T>
constexpr bool kVec = false;
#endif

template <typename F>
void for_rows(int64_t rows, int64_t row_cost, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_cost));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

template <typename T>
void rms_norm_rows(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight, double eps,
                   at::Tensor& out, at::Tensor* summed) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* rp = residual ? residual->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* sp = summed ? summed->data_ptr<T>() : nullptr;
  const int64_t xs = x.stride(0), rs = residual ? residual->stride(0) : 0;
  for_rows(rows, n, [&](int64_t r) {
    const T* xr = xp + r * xs;
    T* orow = op + r * n;
#if defined(__AVX512F__)
    if constexpr (kVec<T>) {
      __m512 acc = _mm512_setzero_ps();
      if (rp) {  // x + residual, stored in T: the residual stream's next value
        const T* rr = rp + r * rs;
        T* srow = sp + r * n;
        for (int64_t i = 0; i < n; i += 16) {
          const __m512 h = round16(_mm512_add_ps(load16(rr + i, n - i), load16(xr + i, n - i)), T{});
          store16(srow + i, h, n - i);
          acc = _mm512_fmadd_ps(h, h, acc);
        }
        xr = srow;
      } else {
        for (int64_t i = 0; i < n; i += 16) {
          const __m512 h = load16(xr + i, n - i);
          acc = _mm512_fmadd_ps(h, h, acc);
        }
      }
      const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(n) +
                                                        static_cast<float>(eps)));
      for (int64_t i = 0; i < n; i += 16)
        store16(orow + i, _mm512_mul_ps(load16(wp + i, n - i), round16(_mm512_mul_ps(load16(xr + i, n - i), inv), T{})),
                n - i);
      return;
    }
#endif
    float sq = 0.f;
    if (rp) {
      const T* rr = rp + r * rs;
      T* srow = sp + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const float h = round_to<T>(static_cast<float>(rr[i]) + static_cast<float>(xr[i]));
        srow[i] = static_cast<T>(h);
        sq += h * h;
      }
      xr = srow;
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const float h = static_cast<float>(xr[i]);
        sq += h * h;
      }
    }
    const float inv = 1.f / std::sqrt(sq / static_cast<float>(n) + static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i)
      orow[i] = static_cast<T>(static_cast<float>(wp[i]) * round_to<T>(static_cast<float>(xr[i]) * inv));
  });
}

void check_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "expected rows [T, hidden] with contiguous rows");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(), "weight is [hidden]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and input must share a dtype");
}

template <typename F>
void by_dtype(at::ScalarType t, const char* op, const F& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  at::Tensor out = at::empty(x.sizes(), x.options());
  by_dtype(x.scalar_type(), "rms_norm", [&](auto e) {
    rms_norm_rows<decltype(e)>(x, nullptr, weight, eps, out, nullptr);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.stride(1) == 1 && residual.scalar_type() == x.scalar_type(),
              "residual must match the input");
  at::Tensor out = at::empty(x.sizes(), x.options()), summed = at::empty(x.sizes(), x.options());
  by_dtype(x.scalar_type(), "fused_add_rms_norm", [&](auto e) {
    rms_norm_rows<decltype(e)>(x, &residual, weight, eps, out, &summed);
  });
  return {out, summed};
}

// q [T, H, D] and k [T, KVH, D] (any token/head strides, contiguous rows) rotated in place at positions [T]
// with cos/sin tables [max_position, D] (fp32). Reference: c = T(cos), s = T(sin), q*c + rotate_half(q)*s with
// each product and the sum stored in T.
template <typename T>
void rotate(at::Tensor& t, const int64_t* pos, const float* cos, const float* sin, int64_t table_stride) {
  const int64_t tokens = t.size(0), heads = t.size(1), d = t.size(2), half = d / 2;
  const int64_t ts = t.stride(0), hs = t.stride(1);
  T* p = t.data_ptr<T>();
  for_rows(tokens, heads * d, [&](int64_t i) {
    const float* c = cos + pos[i] * table_stride;
    const float* s = sin + pos[i] * table_stride;
    for (int64_t h = 0; h < heads; ++h) {
      T* row = p + i * ts + h * hs;
#if defined(__AVX512F__)
      if constexpr (kVec<T>) {
        for (int64_t j = 0; j < half; j += 16) {
          const int64_t n = half - j;
          const __m512 x1 = load16(row + j, n), x2 = load16(row + j + half, n);
          const __m512 c1 = round16(load16(c + j, n), T{}), s1 = round16(load16(s + j, n), T{});
          const __m512 c2 = round16(load16(c + j + half, n), T{}), s2 = round16(load16(s + j + half, n), T{});
          const __m512 a1 = round16(_mm512_mul_ps(x1, c1), T{});
          const __m512 b1 = round16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), s1), T{});
          const __m512 a2 = round16(_mm512_mul_ps(x2, c2), T{}), b2 = round16(_mm512_mul_ps(x1, s2), T{});
          store16(row + j, _mm512_add_ps(a1, b1), n);
          store16(row + j + half, _mm512_add_ps(a2, b2), n);
        }
        continue;
      }
#endif
      for (int64_t j = 0; j < half; ++j) {
        const float x1 = static_cast<float>(row[j]), x2 = static_cast<float>(row[j + half]);
        const float c1 = round_to<T>(c[j]), s1 = round_to<T>(s[j]);
        const float c2 = round_to<T>(c[j + half]), s2 = round_to<T>(s[j + half]);
        const float a1 = round_to<T>(x1 * c1), b1 = round_to<T>(-x2 * s1);
        const float a2 = round_to<T>(x2 * c2), b2 = round_to<T>(x1 * s2);
        row[j] = static_cast<T>(a1 + b1);
        row[j + half] = static_cast<T>(a2 + b2);
      }
    }
  });
}

void rotary_embedding(const at::Tensor& positions, at::Tensor& q, at::Tensor& k, const at::Tensor& cos,
                      const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(2) % 2 == 0,
              "expected q [T, H, D] and k [T, KVH, D] with an even D");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && q.scalar_type() == k.scalar_type(), "q/k rows must be contiguous");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.size(1) == q.size(2) &&
                  cos.stride(1) == 1 && sin.strides() == cos.strides() && sin.sizes() == cos.sizes(),
              "cos/sin must be fp32 tables [max_position, D]");
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  TORCH_CHECK(pos.numel() == q.size(0), "one position per token expected");
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < pos.numel(); ++i)
    TORCH_CHECK(pp[i] >= 0 && pp[i] < cos.size(0), "position ", pp[i], " is outside the rotary table");
  by_dtype(q.scalar_type(), "rotary_embedding", [&](auto e) {
    using T = decltype(e);
    rotate<T>(q, pp, cos.data_ptr<float>(), sin.data_ptr<float>(), cos.stride(0));
    rotate<T>(k, pp, cos.data_ptr<float>(), sin.data_ptr<float>(), cos.stride(0));
  });
}

// x [T, 2I] = [gate | up] -> [T, I]: T(silu(gate)) * up, stored in T.
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0 && x.stride(1) == 1, "expected [T, 2 * intermediate] rows");
  const int64_t rows = x.size(0), n = x.size(1) / 2, xs = x.stride(0);
  at::Tensor out = at::empty({rows, n}, x.options());
  by_dtype(x.scalar_type(), "silu_and_mul", [&](auto e) {
    using T = decltype(e);
    const T* xp = x.data_ptr<T>();
    T* op = out.data_ptr<T>();
    for_rows(rows, n, [&](int64_t r) {
      const T* gate = xp + r * xs;
      const T* up = gate + n;
      T* o = op + r * n;
#if defined(__AVX512F__)
      if constexpr (kVec<T>) {
        for (int64_t i = 0; i < n; i += 16) {
          const __m512 g = load16(gate + i, n - i);
          const __m512 e = flotilla_cpu::exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
          const __m512 silu = round16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), T{});
          store16(o + i, _mm512_mul_ps(silu, load16(up + i, n - i)), n - i);
        }
        return;
      }
#endif
      for (int64_t i = 0; i < n; ++i) {
        const float g = static_cast<float>(gate[i]);
        const float silu = round_to<T>(g / (1.f + exp_poly(-g)));
        o[i] = static_cast<T>(silu * static_cast<float>(up[i]));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flotilla_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_embedding(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(flotilla_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("silu_and_mul", &silu_and_mul);
}
