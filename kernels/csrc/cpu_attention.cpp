// Paged attention for the CPU: one pass over each sequence's K/V, online (streaming) softmax, GQA-aware.
//
// Layouts are the torch references' (flotilla/kernels/paged_attention.py):
//   query [num_tokens, num_heads, head_dim]; k_cache/v_cache [num_blocks, num_kv_heads, block_size, head_dim];
//   block_tables [num_seqs, max_blocks] int32; seq_lens [num_seqs]; query_start_loc [num_seqs + 1].
// Sequence i's queries are the last (query_start_loc[i+1] - query_start_loc[i]) positions of its seq_lens[i]
// tokens, and each sees the keys up to its own position (decode is the one-query case).
//
// One work unit = (sequence, KV head, tile of up to kTile query tokens). It reads each K/V row of its sequence's
// blocks once and uses it for every query head of the group and every query token of the tile, keeping the
// running max, denominator and output in fp32. bf16/fp16 rows are widened into a small fp32 tile first;
// fp32 rows are read in place. Units run in parallel over torch's intra-op thread pool.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kTile = 8;      // query tokens per unit in prefill spans
constexpr int64_t kPrefetch = 2;  // blocks ahead whose K/V are prefetched

template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void widen<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t w = static_cast<uint32_t>(bits[i]) << 16;
    float f;
    std::memcpy(&f, &w, sizeof(f));
    dst[i] = f;
  }
}

// exp for x <= 0 (scores minus their running max), vectorisable: 2^n * e^r with |r| <= ln2/2 and Cephes'
// degree-6 polynomial for e^r (about 1 ulp). Arguments below -87 give ~1e-38 rather than 0: a weight of
// nothing next to the row's maximum, which weighs 1.
inline void exp_inplace(float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::max(x[i], -87.f);
    const float k = std::floor(v * 1.44269504088896341f + 0.5f);
    const float r = v - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    x[i] = p * scale;
  }
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

inline void scale_row(float a, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

struct Unit {
  int64_t seq, kv_head, q_begin, q_end;  // q_* index the flattened query tokens
};

// kDim > 0: head_dim known at compile time (64, 128), so the row loops unroll into registers; 0: any head_dim.
template <typename T, int64_t kDim>
void attend_units(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const std::vector<int64_t>& seq_lens,
                  const std::vector<int64_t>& q_starts, const std::vector<Unit>& units, float scale, at::Tensor& out) {
  const int64_t num_heads = query.size(1), head_dim = kDim > 0 ? kDim : query.size(2);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t q_tok_stride = query.stride(0), q_head_stride = query.stride(1);
  const int64_t o_tok_stride = out.stride(0), o_head_stride = out.stride(1);
  const int64_t c_block_stride = k_cache.stride(0), c_head_stride = k_cache.stride(1);
  const int64_t bt_stride = block_tables.stride(0);
  const T* q_ptr = query.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  const int32_t* bt_ptr = block_tables.data_ptr<int32_t>();
  T* o_ptr = out.data_ptr<T>();
  constexpr bool kInPlace = std::is_same<T, float>::value;
  const int64_t tile_bytes = block_size * head_dim * static_cast<int64_t>(sizeof(T));

  // Units differ in length (ragged contexts): threads take the next unit as they finish one, longest first
  // (the caller's order), rather than a fixed equal share of units each.
  const int64_t num_units = static_cast<int64_t>(units.size());
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_units));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const int64_t max_rows = kTile * group;
    std::vector<float> qf(max_rows * head_dim), acc(max_rows * head_dim), row_max(max_rows), denom(max_rows);
    std::vector<int64_t> limit(max_rows);  // keys visible to each row (its position + 1)
    std::vector<float> kt(kInPlace ? 0 : block_size * head_dim), vt(kInPlace ? 0 : block_size * head_dim);
    std::vector<float> scores(block_size);
    for (int64_t u = next.fetch_add(1); u < num_units; u = next.fetch_add(1)) {
      const Unit& w = units[u];
      const int64_t seq_len = seq_lens[w.seq];
      const int64_t q_len = q_starts[w.seq + 1] - q_starts[w.seq];
      const int64_t first_pos = seq_len - q_len;  // absolute position of the sequence's first query
      const int64_t rows = (w.q_end - w.q_begin) * group;
      int64_t visible = 0;
      for (int64_t t = w.q_begin; t < w.q_end; ++t) {
        const int64_t pos = first_pos + (t - q_starts[w.seq]);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t r = (t - w.q_begin) * group + g;
          const T* src = q_ptr + t * q_tok_stride + (w.kv_head * group + g) * q_head_stride;
          float* dst = qf.data() + r * head_dim;
          widen(src, dst, head_dim);
          scale_row(scale, dst, head_dim);
          limit[r] = pos + 1;
        }
        visible = std::max(visible, pos + 1);
      }
      std::fill(acc.begin(), acc.begin() + rows * head_dim, 0.f);
      std::fill(row_max.begin(), row_max.begin() + rows, -std::numeric_limits<float>::infinity());
      std::fill(denom.begin(), denom.begin() + rows, 0.f);

      const int32_t* table = bt_ptr + w.seq * bt_stride;
      const int64_t num_blocks = (visible + block_size - 1) / block_size;
      // A sequence's blocks are scattered over the pool, which defeats the hardware prefetcher: fetch the K/V
      // tiles kPrefetch blocks ahead while this block is computed.
      const auto prefetch = [&](int64_t b) {
        const int64_t at = static_cast<int64_t>(table[b]) * c_block_stride + w.kv_head * c_head_stride;
        const char* k = reinterpret_cast<const char*>(k_ptr + at);
        const char* v = reinterpret_cast<const char*>(v_ptr + at);
        for (int64_t line = 0; line < tile_bytes; line += 64) {
          __builtin_prefetch(k + line);
          __builtin_prefetch(v + line);
        }
      };
      for (int64_t b = 0; b < std::min(kPrefetch, num_blocks); ++b) prefetch(b);
      for (int64_t b = 0; b < num_blocks; ++b) {
        const int64_t start = b * block_size;
        const int64_t n = std::min(block_size, visible - start);
        const int64_t offset = static_cast<int64_t>(table[b]) * c_block_stride + w.kv_head * c_head_stride;
        if (b + kPrefetch < num_blocks) prefetch(b + kPrefetch);
        const float* keys;
        const float* values;
        if constexpr (kInPlace) {
          keys = reinterpret_cast<const float*>(k_ptr + offset);
          values = reinterpret_cast<const float*>(v_ptr + offset);
        } else {
          widen(k_ptr + offset, kt.data(), n * head_dim);
          widen(v_ptr + offset, vt.data(), n * head_dim);
          keys = kt.data();
          values = vt.data();
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t seen = std::min(n, limit[r] - start);
          if (seen <= 0) continue;
          const float* q = qf.data() + r * head_dim;
          float block_max = -std::numeric_limits<float>::infinity();
          for (int64_t j = 0; j < seen; ++j) {
            scores[j] = dot(q, keys + j * head_dim, head_dim);
            block_max = std::max(block_max, scores[j]);
          }
          const float new_max = std::max(row_max[r], block_max);
          const float correction = std::exp(row_max[r] - new_max);  // 0 on the first block (-inf)
          float* o = acc.data() + r * head_dim;
          if (correction != 1.f) scale_row(correction, o, head_dim);
          for (int64_t j = 0; j < seen; ++j) scores[j] -= new_max;
          exp_inplace(scores.data(), seen);
          float sum = 0.f;
          for (int64_t j = 0; j < seen; ++j) {
            sum += scores[j];
            axpy(scores[j], values + j * head_dim, o, head_dim);
          }
          denom[r] = denom[r] * correction + sum;
          row_max[r] = new_max;
        }
      }
      for (int64_t t = w.q_begin; t < w.q_end; ++t) {
        for (int64_t g = 0; g < group; ++g) {
          const int64_t r = (t - w.q_begin) * group + g;
          const float inv = 1.f / denom[r];
          const float* src = acc.data() + r * head_dim;
          T* dst = o_ptr + t * o_tok_stride + (w.kv_head * group + g) * o_head_stride;
          for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<T>(src[d] * inv);
        }
      }
    }
  });
}

void check_layouts(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "expected query [T, H, D] and caches [blocks, kv_heads, block_size, D]");
  TORCH_CHECK(query.size(2) == k_cache.size(3), "query and cache head_dim differ");
  TORCH_CHECK(query.size(1) % k_cache.size(1) == 0, "num_heads is not a multiple of num_kv_heads");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "query and caches must share a dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) &&
                  v_cache.strides() == k_cache.strides(),
              "each cache block of one head must be a contiguous [block_size, head_dim] tile");
  TORCH_CHECK(query.stride(2) == 1, "query rows must be contiguous");
}

std::vector<int64_t> as_longs(const at::Tensor& t) {
  at::Tensor l = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(l.data_ptr<int64_t>(), l.data_ptr<int64_t>() + l.numel());
}

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale) {
  check_layouts(query, k_cache, v_cache);
  const std::vector<int64_t> lens = as_longs(seq_lens), starts = as_longs(query_start_loc);
  TORCH_CHECK(starts.size() == lens.size() + 1, "query_start_loc needs num_seqs + 1 entries");
  TORCH_CHECK(starts.back() == query.size(0), "query_start_loc does not cover the query tokens");
  const at::Tensor tables = block_tables.to(at::kInt);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  std::vector<Unit> units;
  for (int64_t s = 0; s < static_cast<int64_t>(lens.size()); ++s) {
    const int64_t q_len = starts[s + 1] - starts[s];
    TORCH_CHECK(q_len <= lens[s], "a sequence has more queries than tokens");
    TORCH_CHECK((lens[s] + block_size - 1) / block_size <= tables.size(1) || q_len == 0,
                "a block table is shorter than its sequence");
    for (int64_t t = starts[s]; t < starts[s + 1]; t += kTile)
      for (int64_t h = 0; h < num_kv_heads; ++h) units.push_back({s, h, t, std::min(t + kTile, starts[s + 1])});
  }
  std::stable_sort(units.begin(), units.end(), [&](const Unit& a, const Unit& b) {
    return lens[a.seq] * (a.q_end - a.q_begin) > lens[b.seq] * (b.q_end - b.q_begin);
  });
  at::Tensor out = at::empty_like(query, at::MemoryFormat::Contiguous);
  const auto run = [&](auto element) {
    using T = decltype(element);
    const float s = static_cast<float>(scale);
    switch (query.size(2)) {
      case 64: return attend_units<T, 64>(query, k_cache, v_cache, tables, lens, starts, units, s, out);
      case 128: return attend_units<T, 128>(query, k_cache, v_cache, tables, lens, starts, units, s, out);
      default: return attend_units<T, 0>(query, k_cache, v_cache, tables, lens, starts, units, s, out);
    }
  };
  switch (query.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "paged_attention: unsupported dtype ", query.scalar_type());
  }
  return out;
}

void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), "expected key/value [T, kv_heads, D]");
  TORCH_CHECK(key.size(1) == k_cache.size(1) && key.size(2) == k_cache.size(3), "key and cache shapes differ");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) &&
                  v_cache.strides() == k_cache.strides() && v_cache.scalar_type() == k_cache.scalar_type(),
              "each cache block of one head must be a contiguous [block_size, head_dim] tile");
  const at::Tensor k = key.to(k_cache.scalar_type()).contiguous(), v = value.to(k_cache.scalar_type()).contiguous();
  const std::vector<int64_t> slots = as_longs(slot_mapping);
  TORCH_CHECK(static_cast<int64_t>(slots.size()) == key.size(0), "one slot per token expected");
  const int64_t num_kv_heads = k.size(1), head_dim = k.size(2), block_size = k_cache.size(2);
  const int64_t capacity = k_cache.size(0) * block_size;
  for (int64_t s : slots) TORCH_CHECK(s < capacity, "slot ", s, " is outside the cache");
  const int64_t row_bytes = head_dim * k.element_size();
  const char* k_src = static_cast<const char*>(k.data_ptr());
  const char* v_src = static_cast<const char*>(v.data_ptr());
  char* k_dst = static_cast<char*>(k_cache.data_ptr());
  char* v_dst = static_cast<char*>(v_cache.data_ptr());
  const int64_t esize = k_cache.element_size();
  for (int64_t t = 0; t < static_cast<int64_t>(slots.size()); ++t) {
    if (slots[t] < 0) continue;  // a padding token
    const int64_t block = slots[t] / block_size, off = slots[t] % block_size;
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const int64_t src = (t * num_kv_heads + h) * row_bytes;
      const int64_t dst = (block * k_cache.stride(0) + h * k_cache.stride(1) + off * head_dim) * esize;
      std::memcpy(k_dst + dst, k_src + src, row_bytes);
      std::memcpy(v_dst + dst, v_src + src, row_bytes);
    }
  }
}

}  // namespace

TORCH_LIBRARY(flotilla_cpu, m) {
  m.def(
      "paged_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "Tensor query_start_loc, float scale) -> Tensor");
  m.def("write_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(flotilla_cpu, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("write_kv", &write_kv);
}
