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

#include "cpu_vec.h"

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

// exp of the scores minus their running max (<= 0), in place.
inline void exp_inplace(float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = flotilla_cpu::exp_poly(x[i]);
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

// The query, output and paged K/V tensors of one call as pointers and strides, shared by both paths.
template <typename T>
struct Paged {
  const T* q;
  const T* k;
  const T* v;
  const int32_t* tables;
  T* o;
  int64_t group, head_dim, block_size, tile_bytes;
  int64_t q_tok, q_head, o_tok, o_head, c_block, c_head, bt;

  Paged(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
        at::Tensor& out)
      : q(query.data_ptr<T>()), k(k_cache.data_ptr<T>()), v(v_cache.data_ptr<T>()),
        tables(block_tables.data_ptr<int32_t>()), o(out.data_ptr<T>()), group(query.size(1) / k_cache.size(1)),
        head_dim(query.size(2)), block_size(k_cache.size(2)),
        tile_bytes(k_cache.size(2) * query.size(2) * static_cast<int64_t>(sizeof(T))), q_tok(query.stride(0)),
        q_head(query.stride(1)), o_tok(out.stride(0)), o_head(out.stride(1)), c_block(k_cache.stride(0)),
        c_head(k_cache.stride(1)), bt(block_tables.stride(0)) {}

  const int32_t* table(const Unit& w) const { return tables + w.seq * bt; }
  // Element offset of block b's [block_size, head_dim] tile of the unit's KV head, in k and v alike.
  int64_t tile(const int32_t* table, const Unit& w, int64_t b) const {
    return static_cast<int64_t>(table[b]) * c_block + w.kv_head * c_head;
  }
  // A sequence's blocks are scattered over the pool, which defeats the hardware prefetcher: the kernels ask for
  // the K/V tiles a few blocks ahead while they compute this one.
  void prefetch(const int32_t* table, const Unit& w, int64_t b) const {
    const int64_t at = tile(table, w, b);
    const char* kb = reinterpret_cast<const char*>(k + at);
    const char* vb = reinterpret_cast<const char*>(v + at);
    for (int64_t line = 0; line < tile_bytes; line += 64) {
      __builtin_prefetch(kb + line);
      __builtin_prefetch(vb + line);
    }
  }
  const T* query_row(int64_t t, const Unit& w, int64_t g) const {
    return q + t * q_tok + (w.kv_head * group + g) * q_head;
  }

  // Calls f(row, query pointer, keys visible to the row) for each (token, head of the group) row of the unit, rows
  // numbered token-major; returns the keys visible to the unit's last row.
  template <typename F>
  int64_t for_rows(const Unit& w, const std::vector<int64_t>& seq_lens, const std::vector<int64_t>& q_starts,
                   const F& f) const {
    const int64_t first_pos = seq_lens[w.seq] - (q_starts[w.seq + 1] - q_starts[w.seq]);  // the first query's
    int64_t visible = 0;
    for (int64_t t = w.q_begin; t < w.q_end; ++t) {
      const int64_t pos = first_pos + (t - q_starts[w.seq]);
      for (int64_t g = 0; g < group; ++g) f((t - w.q_begin) * group + g, query_row(t, w, g), pos + 1);
      visible = std::max(visible, pos + 1);
    }
    return visible;
  }

  // out = acc / denominator, row by row, in T.
  template <typename Denominator>
  void write(const Unit& w, const float* acc, const Denominator& denominator) const {
    for (int64_t t = w.q_begin; t < w.q_end; ++t)
      for (int64_t g = 0; g < group; ++g) {
        const int64_t r = (t - w.q_begin) * group + g;
        const float inv = 1.f / denominator(r);
        const float* src = acc + r * head_dim;
        T* dst = o + t * o_tok + (w.kv_head * group + g) * o_head;
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<T>(src[d] * inv);
      }
  }
};

// Units differ in length (ragged contexts): each thread takes the next unit as it finishes one, longest first
// (the caller's order), rather than a fixed equal share. body(take) runs once per thread; take() returns the next
// unit's index (>= the count when none is left).
template <typename Body>
void run_units(const std::vector<Unit>& units, const Body& body) {
  const int64_t num_units = static_cast<int64_t>(units.size());
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_units));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { body([&] { return next.fetch_add(1); }); });
}

// kDim > 0: head_dim known at compile time (64, 128), so the row loops unroll into registers; 0: any head_dim.
template <typename T, int64_t kDim>
void attend_units(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const std::vector<int64_t>& seq_lens,
                  const std::vector<int64_t>& q_starts, const std::vector<Unit>& units, float scale, at::Tensor& out) {
  const Paged<T> P(query, k_cache, v_cache, block_tables, out);
  const int64_t head_dim = kDim > 0 ? kDim : P.head_dim, block_size = P.block_size, group = P.group;
  constexpr bool kInPlace = std::is_same<T, float>::value;
  run_units(units, [&](const auto& take) {
    const int64_t max_rows = kTile * group;
    std::vector<float> qf(max_rows * head_dim), acc(max_rows * head_dim), row_max(max_rows), denom(max_rows);
    std::vector<int64_t> limit(max_rows);  // keys visible to each row (its position + 1)
    std::vector<float> kt(kInPlace ? 0 : block_size * head_dim), vt(kInPlace ? 0 : block_size * head_dim);
    std::vector<float> scores(block_size);
    for (int64_t u = take(); u < static_cast<int64_t>(units.size()); u = take()) {
      const Unit& w = units[u];
      const int64_t rows = (w.q_end - w.q_begin) * group;
      const int64_t visible = P.for_rows(w, seq_lens, q_starts, [&](int64_t r, const T* src, int64_t seen) {
        float* dst = qf.data() + r * head_dim;
        widen(src, dst, head_dim);
        scale_row(scale, dst, head_dim);
        limit[r] = seen;
      });
      std::fill(acc.begin(), acc.begin() + rows * head_dim, 0.f);
      std::fill(row_max.begin(), row_max.begin() + rows, -std::numeric_limits<float>::infinity());
      std::fill(denom.begin(), denom.begin() + rows, 0.f);

      const int32_t* table = P.table(w);
      const int64_t num_blocks = (visible + block_size - 1) / block_size;
      for (int64_t b = 0; b < std::min(kPrefetch, num_blocks); ++b) P.prefetch(table, w, b);
      for (int64_t b = 0; b < num_blocks; ++b) {
        const int64_t start = b * block_size;
        const int64_t n = std::min(block_size, visible - start);
        const int64_t offset = P.tile(table, w, b);
        if (b + kPrefetch < num_blocks) P.prefetch(table, w, b + kPrefetch);
        const float* keys;
        const float* values;
        if constexpr (kInPlace) {
          keys = reinterpret_cast<const float*>(P.k + offset);
          values = reinterpret_cast<const float*>(P.v + offset);
        } else {
          widen(P.k + offset, kt.data(), n * head_dim);
          widen(P.v + offset, vt.data(), n * head_dim);
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
      P.write(w, acc.data(), [&](int64_t r) { return denom[r]; });
    }
  });
}

#if defined(__AVX512F__)
// ---- AVX-512 path: 16 keys at a time, scores as one vector, accumulators in registers --------------------------
//
// For each run of 16 keys of a block and each query row: the 16 dot products are reduced together into one vector
// of scores (a transpose-and-add tree, about 3 instructions a score instead of a full horizontal sum each), the
// online softmax runs on that vector, and the 16 value rows are added into the rows' outputs, held in registers
// (up to kAccRegs vectors: 4 rows of head_dim 64, 2 of 128, per pass over the run). bf16 keys are multiplied in
// place with vdpbf16ps where the CPU has AVX512-BF16 (exact bf16 products, fp32 sums); elsewhere they, and bf16
// values always, are widened in registers. Needs block_size % 16 == 0 (every run is inside its block's tile).

constexpr int64_t kKeys = 16;
constexpr int kAccRegs = 16;
constexpr int64_t kRuns = 4;  // runs of 16 keys per span

// Lane i of the result = the sum of the 16 lanes of v[i].
inline __m512 sum16(const __m512* v) {
  __m512 w[4];
  for (int g = 0; g < 4; ++g) {
    const __m512 a = v[4 * g], b = v[4 * g + 1], c = v[4 * g + 2], d = v[4 * g + 3];
    // per 128-bit lane L: ab = [a0+a2, b0+b2, a1+a3, b1+b3], then w = [sum a, sum b, sum c, sum d] over lane L
    const __m512d ab = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)));
    const __m512d cd = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d)));
    w[g] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)), _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)));
  }
  // add the four 128-bit lanes of each w[g]: lane g of the result holds w[g]'s four totals
  const __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
  const __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88), _mm512_shuffle_f32x4(w[2], w[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, 0x88), _mm512_shuffle_f32x4(z01, z23, 0xDD));
}

using flotilla_cpu::exp512;
using flotilla_cpu::load16;

// The raw scores q . k_j of 16 consecutive keys (rows of kDim elements), fp32 multiply-adds.
template <typename T, int64_t kDim>
inline __m512 scores16(const float* q, const T* keys) {
  __m512 qv[kDim / 16], acc[kKeys];
  for (int c = 0; c < kDim / 16; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  for (int j = 0; j < kKeys; ++j) {
    acc[j] = _mm512_mul_ps(qv[0], load16(keys + j * kDim));
    for (int c = 1; c < kDim / 16; ++c) acc[j] = _mm512_fmadd_ps(qv[c], load16(keys + j * kDim + 16 * c), acc[j]);
  }
  return sum16(acc);
}

// The same for bf16 query and keys with AVX512-BF16's pairwise dot product (a separate target: called only where
// the CPU has it).
template <int64_t kDim>
__attribute__((target("avx512bf16"), noinline)) __m512 scores16_dpbf16(const c10::BFloat16* q,
                                                                       const c10::BFloat16* keys) {
  __m512i qv[kDim / 32];
  __m512 acc[kKeys];
  for (int c = 0; c < kDim / 32; ++c) qv[c] = _mm512_loadu_si512(q + 32 * c);
  for (int j = 0; j < kKeys; ++j) {
    acc[j] = _mm512_setzero_ps();
    for (int c = 0; c < kDim / 32; ++c)
      acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)qv[c], (__m512bh)_mm512_loadu_si512(keys + j * kDim + 32 * c));
  }
  return sum16(acc);
}

bool cpu_has_avx512bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

template <typename T, int64_t kDim>
void attend_units_avx512(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& block_tables, const std::vector<int64_t>& seq_lens,
                         const std::vector<int64_t>& q_starts, const std::vector<Unit>& units, float scale,
                         at::Tensor& out) {
  constexpr int64_t kRowsPerPass = kAccRegs / (kDim / 16);
  constexpr int64_t kSpan = kRuns * kKeys;
  constexpr bool kBf16 = std::is_same<T, c10::BFloat16>::value;
  const bool dp = kBf16 && cpu_has_avx512bf16();
  const Paged<T> P(query, k_cache, v_cache, block_tables, out);
  const int64_t block_size = P.block_size, group = P.group;
  run_units(units, [&](const auto& take) {
    const int64_t max_rows = kTile * group;
    std::vector<float> qf(max_rows * kDim), acc(max_rows * kDim), row_max(max_rows), denom(max_rows * kKeys);
    std::vector<T> qraw(max_rows * kDim);
    std::vector<int64_t> limit(max_rows);
    alignas(64) float probs[kRowsPerPass][kSpan];
    for (int64_t u = take(); u < static_cast<int64_t>(units.size()); u = take()) {
      const Unit& w = units[u];
      const int64_t rows = (w.q_end - w.q_begin) * group;
      const int64_t visible = P.for_rows(w, seq_lens, q_starts, [&](int64_t r, const T* src, int64_t seen) {
        if (dp) std::memcpy(qraw.data() + r * kDim, src, kDim * sizeof(T));
        else widen(src, qf.data() + r * kDim, kDim);
        limit[r] = seen;
      });
      std::fill(acc.begin(), acc.begin() + rows * kDim, 0.f);
      std::fill(row_max.begin(), row_max.begin() + rows, -std::numeric_limits<float>::infinity());
      std::fill(denom.begin(), denom.begin() + rows * kKeys, 0.f);  // per-lane partial sums, added up at the end

      const int32_t* table = P.table(w);
      const int64_t num_blocks = (visible + block_size - 1) / block_size;
      int64_t prefetched = std::min(kPrefetch, num_blocks);  // blocks [0, prefetched) have been asked for
      for (int64_t b = 0; b < prefetched; ++b) P.prefetch(table, w, b);
      // Spans of up to kRuns runs of 16 keys: each run lies in one block (block_size % 16 == 0); the softmax's
      // reductions (max, rescale) are paid once per span rather than once per run.
      for (int64_t start = 0; start < visible; start += kSpan) {
        const int64_t span = std::min(kSpan, visible - start);
        const int64_t runs = (span + kKeys - 1) / kKeys;
        const T* keys[kRuns];
        const T* values[kRuns];
        for (int64_t k = 0; k < runs; ++k) {
          const int64_t p = start + k * kKeys, b = p / block_size;
          const int64_t at = P.tile(table, w, b) + (p - b * block_size) * kDim;
          keys[k] = P.k + at;
          values[k] = P.v + at;
        }
        for (const int64_t ahead = std::min(num_blocks, (start + span - 1) / block_size + 1 + kPrefetch);
             prefetched < ahead; ++prefetched)
          P.prefetch(table, w, prefetched);
        for (int64_t r0 = 0; r0 < rows; r0 += kRowsPerPass) {
          const int64_t nr = std::min(kRowsPerPass, rows - r0);
          int64_t used = 0;  // keys of the span some row of the pass sees
          float correction[kRowsPerPass];
          for (int64_t i = 0; i < nr; ++i) {
            const int64_t r = r0 + i;
            const int64_t seen = std::max<int64_t>(0, std::min<int64_t>(span, limit[r] - start));
            correction[i] = 1.f;
            if (seen == 0) {  // a prefill row whose position comes before the span: it adds nothing to the pass
              std::fill(probs[i], probs[i] + kSpan, 0.f);
              continue;
            }
            used = std::max(used, seen);
            const int64_t nruns = (seen + kKeys - 1) / kKeys;
            __m512 s[kRuns];
            __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
            for (int64_t k = 0; k < nruns; ++k) {
              __m512 raw;
              if constexpr (kBf16) {
                raw = dp ? scores16_dpbf16<kDim>(qraw.data() + r * kDim, keys[k])
                         : scores16<T, kDim>(qf.data() + r * kDim, keys[k]);
              } else {
                raw = scores16<T, kDim>(qf.data() + r * kDim, keys[k]);
              }
              const int64_t n = std::min<int64_t>(kKeys, seen - k * kKeys);
              const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
              // keys past the row's limit (or the context) may hold anything, NaN included: masked to -inf
              s[k] = _mm512_mask_mul_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), mask, raw,
                                        _mm512_set1_ps(scale));
              top = _mm512_max_ps(top, s[k]);
            }
            const float new_max = std::max(row_max[r], _mm512_reduce_max_ps(top));
            const float c = std::exp(row_max[r] - new_max);  // 0 on the first span (-inf)
            const __m512 m = _mm512_set1_ps(new_max);
            __m512 total = _mm512_mul_ps(_mm512_loadu_ps(denom.data() + r * kKeys), _mm512_set1_ps(c));
            for (int64_t k = 0; k < nruns; ++k) {
              const int64_t n = std::min<int64_t>(kKeys, seen - k * kKeys);
              const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
              const __m512 p = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(s[k], m)));
              total = _mm512_add_ps(total, p);
              _mm512_store_ps(probs[i] + k * kKeys, p);
            }
            for (int64_t k = nruns; k < kRuns; ++k) _mm512_store_ps(probs[i] + k * kKeys, _mm512_setzero_ps());
            _mm512_storeu_ps(denom.data() + r * kKeys, total);
            row_max[r] = new_max;
            correction[i] = c;
          }
          if (used == 0) continue;
          for (int64_t i = nr; i < kRowsPerPass; ++i) correction[i] = 1.f;
          __m512 o[kRowsPerPass][kDim / 16];
          for (int64_t i = 0; i < kRowsPerPass; ++i)
            if (i < nr) {
              const __m512 c = _mm512_set1_ps(correction[i]);
              for (int k = 0; k < kDim / 16; ++k)
                o[i][k] = _mm512_mul_ps(_mm512_loadu_ps(acc.data() + (r0 + i) * kDim + 16 * k), c);
            }
          for (int64_t j = 0; j < used; ++j) {
            const T* row = values[j / kKeys] + (j % kKeys) * kDim;
            __m512 v[kDim / 16];
            for (int k = 0; k < kDim / 16; ++k) v[k] = load16(row + 16 * k);
            for (int64_t i = 0; i < kRowsPerPass; ++i)
              if (i < nr) {
                const __m512 p = _mm512_set1_ps(probs[i][j]);
                for (int k = 0; k < kDim / 16; ++k) o[i][k] = _mm512_fmadd_ps(p, v[k], o[i][k]);
              }
          }
          for (int64_t i = 0; i < kRowsPerPass; ++i)
            if (i < nr)
              for (int k = 0; k < kDim / 16; ++k) _mm512_storeu_ps(acc.data() + (r0 + i) * kDim + 16 * k, o[i][k]);
        }
      }
      P.write(w, acc.data(),
              [&](int64_t r) { return _mm512_reduce_add_ps(_mm512_loadu_ps(denom.data() + r * kKeys)); });
    }
  });
}
#endif  // __AVX512F__

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
#if defined(__AVX512F__)
    if constexpr (!std::is_same<T, c10::Half>::value) {
      if (block_size % kKeys == 0) {
        if (query.size(2) == 64)
          return attend_units_avx512<T, 64>(query, k_cache, v_cache, tables, lens, starts, units, s, out);
        if (query.size(2) == 128)
          return attend_units_avx512<T, 128>(query, k_cache, v_cache, tables, lens, starts, units, s, out);
      }
    }
#endif
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
