// y = x · Wᵀ for an unstructured sparse weight stored as a bitmask of kept positions (1 bit per weight) and the kept
// values packed densely, row after row. Values: float32, or integer codes q of a grid W = (q − z) · s with a scale s
// and zero point z per (row, group of inputs), in 8 or 4 bits. Activations and accumulation in float32. Built at
// first use by lmcompress.kernels.sparse_cpu; AVX-512 functions are compiled with a target attribute and chosen at
// run time where the CPU has AVX-512 (F, BW, DQ, VL), else the AVX2 + FMA ones run.
//
// Layout (lmcompress.kernels.sparse_cpu.pack_bitmask): K padded to Kp = 32·B with dropped inputs.
//   mask    int32 [N, B]: bit j of word b set when input 32b + j of the row is kept;
//   offsets int64 [N + 1]: the row's values start at vals + offsets[n] (float32: elements, codes: bytes);
//   vals    float32 or uint8, 1-D, followed by at least 16 elements of padding (loads read past the last value):
//           the kept values of a row in ascending input order; 8-bit codes one a byte; 4-bit codes two a byte
//           (the first in the low nibble), each half word (16 inputs) starting at a new byte;
//   scale, zero float32 [N, G]: word b is in group min(32b / group, G − 1) (group: a multiple of 32).
//
// Decode expands, per 16 inputs, the next popcount(mask) kept values into the positions of the mask's set bits
// (AVX-512: vexpandps / vpexpandd with the 16-bit mask; AVX2: a permutation of 8 lanes looked up by the mask's byte
// and a lane mask), then multiplies with the dense inputs: the product reads 1 bit per weight plus the kept values.
// Codes enter as (q − z) on kept lanes only (dropped lanes are 0, not −z); the scale is applied once per group.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>
#include <type_traits>

namespace {

enum Kind { FLOAT = 0, INT4 = 4, INT8 = 8 };
constexpr int64_t PAD = 16;  // elements of padding after the last value

template <int KIND>
using Val = std::conditional_t<KIND == FLOAT, float, uint8_t>;

// Values (floats) or bytes (codes) the kept values of 16 inputs with mask m16 take.
template <int KIND>
inline int64_t advance(uint32_t m16) {
  const int c = __builtin_popcount(m16);
  return KIND == INT4 ? (c + 1) / 2 : c;
}

// Walks the groups word by word without a division per word: next() is true when word b starts a new group.
struct GroupWalk {
  int64_t per, G, g = 0, boundary;
  GroupWalk(int64_t group, int64_t G_) : per(group / 32), G(G_), boundary(G_ > 1 ? group / 32 : INT64_MAX) {}
  inline bool next(int64_t b) {
    if (b != boundary) return false;
    ++g;
    boundary = g + 1 < G ? boundary + per : INT64_MAX;
    return true;
  }
};

// ---- AVX2 + FMA --------------------------------------------------------------------------------------------------

struct Lut {  // lane i of byte m: the rank of bit i among m's set bits (0 where bit i is clear; masked anyway)
  alignas(32) int32_t idx[256][8];
  Lut() {
    for (int m = 0; m < 256; ++m) {
      int c = 0;
      for (int i = 0; i < 8; ++i) idx[m][i] = (m >> i) & 1 ? c++ : 0;
    }
  }
};
const Lut lut;

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Weights of inputs 8e .. 8e + 7 of a half word whose kept values start at p (mask m16); codes as q − z.
template <int KIND>
inline __m256 weights8(const Val<KIND>* p, uint32_t m16, int e, __m256 z) {
  const uint32_t m8 = (m16 >> (8 * e)) & 0xFF;
  const int before = e ? __builtin_popcount(m16 & 0xFF) : 0;
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.idx[m8]));
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 lanes =
      _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m8)), bits), bits));
  __m256 w;
  if constexpr (KIND == FLOAT) {
    w = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p + before), idx);
  } else {
    __m256i c;
    if constexpr (KIND == INT8) {
      c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + before)));
    } else {
      uint64_t u;
      std::memcpy(&u, p, 8);
      const uint32_t lo = static_cast<uint32_t>(u >> (4 * before));
      c = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(lo)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
      c = _mm256_and_si256(c, _mm256_set1_epi32(0x0F));
    }
    w = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_permutevar8x32_epi32(c, idx)), z);
  }
  return _mm256_and_ps(w, lanes);
}

template <int KIND, int MR>
void row_avx2(const float* const* x, const uint32_t* mask, const Val<KIND>* p, const float* scale, const float* zero,
              int64_t B, int64_t group, int64_t G, float* out) {
  __m256 acc[MR], part[MR];
  for (int r = 0; r < MR; ++r) acc[r] = part[r] = _mm256_setzero_ps();
  GroupWalk walk(group, G);
  int64_t g = 0;
  __m256 z = _mm256_set1_ps(KIND == FLOAT ? 0.f : zero[0]);
  for (int64_t b = 0; b < B; ++b) {
    if constexpr (KIND != FLOAT) {
      if (walk.next(b)) {
        for (int r = 0; r < MR; ++r) {
          acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale[g]), part[r], acc[r]);
          part[r] = _mm256_setzero_ps();
        }
        g = walk.g;
        z = _mm256_set1_ps(zero[g]);
      }
    }
    const uint32_t word = mask[b];
    if (word == 0) continue;
    for (int h = 0; h < 2; ++h) {
      const uint32_t m16 = (word >> (16 * h)) & 0xFFFF;
      for (int e = 0; e < 2; ++e) {
        const __m256 w = weights8<KIND>(p, m16, e, z);
        for (int r = 0; r < MR; ++r)
          part[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x[r] + 32 * b + 16 * h + 8 * e), part[r]);
      }
      p += advance<KIND>(m16);
    }
  }
  for (int r = 0; r < MR; ++r) {
    const __m256 total = KIND == FLOAT ? part[r] : _mm256_fmadd_ps(_mm256_set1_ps(scale[g]), part[r], acc[r]);
    out[r] = hsum256(total);
  }
}

// Row of W as float32 (K of its Kp inputs) into w.
template <int KIND>
void expand_avx2(const uint32_t* mask, const Val<KIND>* p, const float* scale, const float* zero, int64_t B,
                 int64_t group, int64_t G, int64_t K, float* w) {
  GroupWalk walk(group, G);
  int64_t g = 0;
  alignas(32) float tmp[32];
  for (int64_t b = 0; b < B; ++b) {
    if constexpr (KIND != FLOAT) {
      if (walk.next(b)) g = walk.g;
    }
    const __m256 z = _mm256_set1_ps(KIND == FLOAT ? 0.f : zero[g]);
    const __m256 s = _mm256_set1_ps(KIND == FLOAT ? 1.f : scale[g]);
    const uint32_t word = mask[b];
    for (int h = 0; h < 2; ++h) {
      const uint32_t m16 = (word >> (16 * h)) & 0xFFFF;
      for (int e = 0; e < 2; ++e) {
        __m256 v = weights8<KIND>(p, m16, e, z);
        if constexpr (KIND != FLOAT) v = _mm256_mul_ps(v, s);
        _mm256_store_ps(tmp + 16 * h + 8 * e, v);
      }
      p += advance<KIND>(m16);
    }
    std::memcpy(w + 32 * b, tmp, std::min<int64_t>(32, K - 32 * b) * sizeof(float));
  }
}

// ---- AVX-512 (F, BW, DQ, VL) ----------------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")

// Weights of the 16 inputs of a half word whose kept values start at p (mask m16); codes as q − z on kept lanes.
template <int KIND>
inline __m512 weights16(const Val<KIND>* p, __mmask16 m16, __m512 z) {
  if constexpr (KIND == FLOAT) {
    return _mm512_maskz_expand_ps(m16, _mm512_loadu_ps(p));
  } else {
    __m128i bytes;
    if constexpr (KIND == INT8) {
      bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {  // 8 bytes → 16 nibbles in order, one a byte: low nibbles interleaved with high ones
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      const __m128i lo = _mm_and_si128(v, _mm_set1_epi8(0x0F));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
      bytes = _mm_unpacklo_epi8(lo, hi);
    }
    const __m512i c = _mm512_maskz_expand_epi32(m16, _mm512_cvtepu8_epi32(bytes));
    return _mm512_maskz_sub_ps(m16, _mm512_cvtepi32_ps(c), z);
  }
}

template <int KIND, int MR>
void row_avx512(const float* const* x, const uint32_t* mask, const Val<KIND>* p, const float* scale,
                const float* zero, int64_t B, int64_t group, int64_t G, float* out) {
  // two accumulators per input row (low and high half words) so that consecutive multiply-adds do not wait on one
  // another; quantized values: sums of (q − z)·x per group in part, scaled into acc at the group's end
  __m512 acc[MR], part0[MR], part1[MR];
  for (int r = 0; r < MR; ++r) acc[r] = part0[r] = part1[r] = _mm512_setzero_ps();
  GroupWalk walk(group, G);
  int64_t g = 0;
  __m512 z = _mm512_set1_ps(KIND == FLOAT ? 0.f : zero[0]);
  for (int64_t b = 0; b < B; ++b) {
    if constexpr (KIND != FLOAT) {
      if (walk.next(b)) {
        for (int r = 0; r < MR; ++r) {
          acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(scale[g]), _mm512_add_ps(part0[r], part1[r]), acc[r]);
          part0[r] = part1[r] = _mm512_setzero_ps();
        }
        g = walk.g;
        z = _mm512_set1_ps(zero[g]);
      }
    }
    const uint32_t word = mask[b];
    if (word == 0) continue;
    const __mmask16 m0 = static_cast<__mmask16>(word), m1 = static_cast<__mmask16>(word >> 16);
    const __m512 w0 = weights16<KIND>(p, m0, z);
    p += advance<KIND>(m0);
    const __m512 w1 = weights16<KIND>(p, m1, z);
    p += advance<KIND>(m1);
    for (int r = 0; r < MR; ++r) {
      part0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x[r] + 32 * b), part0[r]);
      part1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x[r] + 32 * b + 16), part1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    const __m512 sum = _mm512_add_ps(part0[r], part1[r]);
    const __m512 total = KIND == FLOAT ? sum : _mm512_fmadd_ps(_mm512_set1_ps(scale[g]), sum, acc[r]);
    out[r] = _mm512_reduce_add_ps(total);
  }
}

template <int KIND>
void expand_avx512(const uint32_t* mask, const Val<KIND>* p, const float* scale, const float* zero, int64_t B,
                   int64_t group, int64_t G, int64_t K, float* w) {
  GroupWalk walk(group, G);
  int64_t g = 0;
  for (int64_t b = 0; b < B; ++b) {
    if constexpr (KIND != FLOAT) {
      if (walk.next(b)) g = walk.g;
    }
    const __m512 z = _mm512_set1_ps(KIND == FLOAT ? 0.f : zero[g]);
    const uint32_t word = mask[b];
    for (int h = 0; h < 2; ++h) {
      const __mmask16 m = static_cast<__mmask16>(word >> (16 * h));
      __m512 v = weights16<KIND>(p, m, z);
      if constexpr (KIND != FLOAT) v = _mm512_mul_ps(v, _mm512_set1_ps(scale[g]));
      p += advance<KIND>(m);
      const int64_t left = K - 32 * b - 16 * h;
      if (left <= 0) break;
      const __mmask16 keep = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      _mm512_mask_storeu_ps(w + 32 * b + 16 * h, keep, v);
    }
  }
}

bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

#pragma GCC pop_options

// ---- dispatch ------------------------------------------------------------------------------------------------------

using RowFn = void (*)(const float* const*, const uint32_t*, const void*, const float*, const float*, int64_t, int64_t,
                       int64_t, float*);
using ExpandFn = void (*)(const uint32_t*, const void*, const float*, const float*, int64_t, int64_t, int64_t,
                          int64_t, float*);

template <int KIND, int MR>
void row_any(const float* const* x, const uint32_t* mask, const void* p, const float* s, const float* z, int64_t B,
             int64_t group, int64_t G, float* out) {
  row_avx2<KIND, MR>(x, mask, static_cast<const Val<KIND>*>(p), s, z, B, group, G, out);
}

template <int KIND, int MR>
void row_any512(const float* const* x, const uint32_t* mask, const void* p, const float* s, const float* z, int64_t B,
                int64_t group, int64_t G, float* out) {
  row_avx512<KIND, MR>(x, mask, static_cast<const Val<KIND>*>(p), s, z, B, group, G, out);
}

template <int KIND>
void expand_any(const uint32_t* mask, const void* p, const float* s, const float* z, int64_t B, int64_t group,
                int64_t G, int64_t K, float* w) {
  expand_avx2<KIND>(mask, static_cast<const Val<KIND>*>(p), s, z, B, group, G, K, w);
}

template <int KIND>
void expand_any512(const uint32_t* mask, const void* p, const float* s, const float* z, int64_t B, int64_t group,
                   int64_t G, int64_t K, float* w) {
  expand_avx512<KIND>(mask, static_cast<const Val<KIND>*>(p), s, z, B, group, G, K, w);
}

template <int KIND>
RowFn pick_rows(bool wide, int64_t MR) {
  switch (MR) {
    case 1: return wide ? row_any512<KIND, 1> : row_any<KIND, 1>;
    case 2: return wide ? row_any512<KIND, 2> : row_any<KIND, 2>;
    case 3: return wide ? row_any512<KIND, 3> : row_any<KIND, 3>;
    default: return wide ? row_any512<KIND, 4> : row_any<KIND, 4>;
  }
}

RowFn pick(int64_t kind, bool wide, int64_t MR) {
  if (kind == INT4) return pick_rows<INT4>(wide, MR);
  if (kind == INT8) return pick_rows<INT8>(wide, MR);
  return pick_rows<FLOAT>(wide, MR);
}

ExpandFn pick_expand(int64_t kind, bool wide) {
  if (kind == INT4) return wide ? expand_any512<INT4> : expand_any<INT4>;
  if (kind == INT8) return wide ? expand_any512<INT8> : expand_any<INT8>;
  return wide ? expand_any512<FLOAT> : expand_any<FLOAT>;
}

struct Args {
  const uint32_t* mask;
  const uint8_t* vals;
  const int64_t* off;
  const float* scale;
  const float* zero;
  int64_t N, B, G, unit;
};

Args check(const torch::Tensor& mask, const torch::Tensor& vals, const torch::Tensor& offsets,
           const torch::Tensor& scale, const torch::Tensor& zero, int64_t kind, int64_t group) {
  TORCH_CHECK(kind == FLOAT || kind == INT4 || kind == INT8, "kind: 0 (float32), 4 or 8 (bits of the codes)");
  TORCH_CHECK(mask.dtype() == torch::kInt32 && mask.dim() == 2 && mask.is_contiguous(), "mask: int32 [N, Kp / 32]");
  const int64_t N = mask.size(0), B = mask.size(1);
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.dim() == 1 && offsets.is_contiguous() &&
                  offsets.size(0) == N + 1,
              "offsets: int64 [N + 1]");
  TORCH_CHECK(vals.dim() == 1 && vals.is_contiguous(), "values: 1-D contiguous");
  TORCH_CHECK(vals.dtype() == (kind == FLOAT ? torch::kFloat32 : torch::kUInt8), "values: float32 or uint8 codes");
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] >= 0 && off[N] + PAD <= vals.numel(), "values must hold offsets[N] + 16 elements");
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(off[n] <= off[n + 1], "offsets must not decrease");
  int64_t G = 1;
  if (kind != FLOAT) {
    TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous() && scale.dim() == 2 && scale.size(0) == N &&
                    scale.size(1) >= 1,
                "scale: float32 [N, G]");
    TORCH_CHECK(zero.dtype() == torch::kFloat32 && zero.is_contiguous() && zero.sizes() == scale.sizes(),
                "zero: float32 [N, G]");
    TORCH_CHECK(group > 0 && group % 32 == 0, "group must be a positive multiple of 32");
    G = scale.size(1);
  }
  return {reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>()),
          static_cast<const uint8_t*>(vals.data_ptr()),
          off,
          kind == FLOAT ? nullptr : scale.data_ptr<float>(),
          kind == FLOAT ? nullptr : zero.data_ptr<float>(),
          N,
          B,
          G,
          kind == FLOAT ? 4 : 1};
}

}  // namespace

bool has_avx512() { return cpu_has_avx512(); }

// y [M, N] = x [M, K] · Wᵀ for M ≤ 4 (decode), x padded with zeros to Kp; `wide`: use AVX-512 (where present).
torch::Tensor bm_gemv(torch::Tensor x, torch::Tensor mask, torch::Tensor vals, torch::Tensor offsets,
                      torch::Tensor scale, torch::Tensor zero, int64_t kind, int64_t group, bool wide) {
  const Args a = check(mask, vals, offsets, scale, zero, kind, group);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 4,
              "x: float32 [1 ≤ M ≤ 4, K]");
  const int64_t M = x.size(0), K = x.size(1), Kp = 32 * a.B;
  TORCH_CHECK(K <= Kp && Kp - K < 32, "x has ", K, " columns; the weight is laid out for ", Kp);
  auto xp = torch::zeros({M, Kp}, x.options());
  xp.narrow(1, 0, K).copy_(x);
  auto y = torch::empty({a.N, M}, x.options());  // row n of W gives y[n, 0 .. M − 1]
  const float* rows[4];
  for (int64_t r = 0; r < M; ++r) rows[r] = xp.data_ptr<float>() + r * Kp;
  const RowFn fn = pick(kind, wide && cpu_has_avx512(), M);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, a.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      fn(rows, a.mask + n * a.B, a.vals + a.off[n] * a.unit, a.scale ? a.scale + n * a.G : nullptr,
         a.zero ? a.zero + n * a.G : nullptr, a.B, group, a.G, yp + n * M);
  });
  return y.t();
}

// Rows n0 .. n1 of W as float32 into out (at least (n1 − n0) · K floats, row-major [n1 − n0, K]): prefill expands a
// slice of rows into one reused buffer, then one float32 GEMM.
torch::Tensor bm_expand(torch::Tensor mask, torch::Tensor vals, torch::Tensor offsets, torch::Tensor scale,
                        torch::Tensor zero, int64_t kind, int64_t group, int64_t K, int64_t n0, int64_t n1,
                        torch::Tensor out, bool wide) {
  const Args a = check(mask, vals, offsets, scale, zero, kind, group);
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= a.N, "rows out of range");
  TORCH_CHECK(K <= 32 * a.B && 32 * a.B - K < 32, "K does not fit the layout");
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.numel() >= (n1 - n0) * K,
              "out: a contiguous float32 buffer of at least (n1 - n0) * K elements");
  const ExpandFn fn = pick_expand(kind, wide && cpu_has_avx512());
  float* wp = out.data_ptr<float>();
  at::parallel_for(n0, n1, 16, [&](int64_t s, int64_t e) {
    for (int64_t n = s; n < e; ++n)
      fn(a.mask + n * a.B, a.vals + a.off[n] * a.unit, a.scale ? a.scale + n * a.G : nullptr,
         a.zero ? a.zero + n * a.G : nullptr, a.B, group, a.G, K, wp + (n - n0) * K);
  });
  return out.view({-1}).narrow(0, 0, (n1 - n0) * K).view({n1 - n0, K});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("has_avx512", &has_avx512, "whether this CPU runs the AVX-512 variant");
  mod.def("bm_gemv", &bm_gemv, "y = x · Wᵀ for bitmask-sparse W from its mask and kept values (M ≤ 4 rows)");
  mod.def("bm_expand", &bm_expand, "rows n0..n1 of a bitmask-sparse W as float32, written into out");
}
