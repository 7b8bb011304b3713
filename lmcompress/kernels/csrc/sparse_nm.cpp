// y = x · Wᵀ for an N:M sparse weight (2:4 or 4:8: 16 kept values in every block of 32 inputs) stored as its kept
// values and their in-group positions only. Values: float32, or integer codes q of a grid W = (q − z) · s with a
// scale s and zero point z per (row, group of inputs), in 4 or 8 bits. Activations and accumulation in float32.
// Built at first use by lmcompress.kernels.sparse_cpu; AVX-512 functions are compiled with a target attribute and
// chosen at run time where the CPU has AVX-512 (F, BW, DQ, VL), else the AVX2 + FMA ones run.
//
// Layout of a row (lmcompress.kernels.sparse_cpu.pack_nm): K padded with empty groups to Kp, a multiple of 32;
// block b covers inputs 32b .. 32b + 31 and keeps 16 values, kept j (0..15) lying in group j / n (n = m / 2) at
// input 32b + (j / n)·m + p_j, kept values of a group in ascending position.
//   pos  int32 [N, Kp/32]: bits 2j, 2j+1 of word b are the low two bits of p_j;
//   hi   int16 [N, Kp/32] (4:8 only): bit j is bit 2 of p_j;
//   vals float32 [N, Kp/2] or uint8 codes [N, Kp/2] (kept j of block b at 16b + j), or 4-bit codes
//        [N, 64·ceil(Kp/256)]: each chunk of 8 blocks (the last one possibly partial) is 16 little-endian 32-bit
//        words, nibble i of word l holding kept l of block 8c + i;
//   scale, zero float32 [N, G]: block b is in group min(32b / group, G − 1) (group: a multiple of 32).
//
// Decode gathers, per block, the 16 inputs the kept values meet with one permute of the block's 32 inputs (AVX-512:
// vpermt2ps with indices m·(j / n) + p_j built from the positions; AVX2: two vpermps and a blend per half of 8) and
// multiplies them by the kept values: half the multiply-adds of the dense product, 2 bits (4:8: 3) of position per
// kept value. Codes enter as (q − z), the scale is applied once per group: Σ (q − z)·s·x = s · Σ (q − z)·x.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>

namespace {

enum Kind { FLOAT = 0, INT4 = 4, INT8 = 8 };

inline int64_t group_of(int64_t b, int64_t group, int64_t G) { return std::min((b * 32) / group, G - 1); }

// Walks the groups block by block without a division per block: next() is true when block b starts a new group.
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

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 8 inputs that kept 8h .. 8h + 7 of a block meet (xb: the block's first input).
template <int M>
inline __m256 gather_half(const float* xb, uint32_t pos, uint32_t hi, int h) {
  const __m256i lane = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(pos >> (16 * h)), lane), _mm256_set1_epi32(3));
  if constexpr (M == 4) {  // kept j of the half in group j / 2 of its 16 inputs: xa holds groups 0, 1; xb groups 2, 3
    idx = _mm256_or_si256(idx, _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4));
  } else {  // 4:8: kept j in group j / 4, which is xa or xb whole; bit 2 from hi
    const __m256i bit = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i h2 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(hi >> (8 * h)), bit), _mm256_set1_epi32(1));
    idx = _mm256_or_si256(idx, _mm256_slli_epi32(h2, 2));
  }
  const __m256 xa = _mm256_loadu_ps(xb + 16 * h), xc = _mm256_loadu_ps(xb + 16 * h + 8);
  return _mm256_blend_ps(_mm256_permutevar8x32_ps(xa, idx), _mm256_permutevar8x32_ps(xc, idx), 0xF0);
}

// Weights of kept 8h .. 8h + 7 of block b: floats, or codes as floats (the caller subtracts z, scales per group).
template <int KIND>
inline __m256 values_half(const void* vals, int64_t b, int h) {
  if constexpr (KIND == FLOAT) {
    return _mm256_loadu_ps(static_cast<const float*>(vals) + 16 * b + 8 * h);
  } else if constexpr (KIND == INT8) {
    const uint8_t* p = static_cast<const uint8_t*>(vals) + 16 * b + 8 * h;
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  } else {
    const uint8_t* p = static_cast<const uint8_t*>(vals) + (b >> 3) * 64 + 32 * h;
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i s = _mm256_srl_epi32(w, _mm_cvtsi32_si128(4 * static_cast<int>(b & 7)));
    return _mm256_cvtepi32_ps(_mm256_and_si256(s, _mm256_set1_epi32(0x0F)));
  }
}

template <int KIND, int M, int MR>
void row_avx2(const float* const* x, const int32_t* pos, const int16_t* hi, const void* vals, const float* scale,
              const float* zero, int64_t B, int64_t group, int64_t G, float* out) {
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
    const uint32_t p = static_cast<uint32_t>(pos[b]);
    const uint32_t q = M == 8 ? static_cast<uint16_t>(hi[b]) : 0u;
    for (int h = 0; h < 2; ++h) {
      __m256 w = values_half<KIND>(vals, b, h);
      if constexpr (KIND != FLOAT) w = _mm256_sub_ps(w, z);
      for (int r = 0; r < MR; ++r) part[r] = _mm256_fmadd_ps(w, gather_half<M>(x[r] + 32 * b, p, q, h), part[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    const __m256 total = KIND == FLOAT ? _mm256_add_ps(acc[r], part[r])
                                       : _mm256_fmadd_ps(_mm256_set1_ps(scale[g]), part[r], acc[r]);
    out[r] = hsum256(total);
  }
}

// ---- AVX-512 (F, BW, DQ, VL) ----------------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")

// Indices into the block's 32 inputs (two registers) of the 16 inputs the kept values meet.
template <int M>
inline __m512i indices512(uint32_t pos, uint32_t hi) {
  const __m512i shift = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = M == 4 ? _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28)
                              : _mm512_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 24);
  const __m512i v = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(pos)), shift);
  __m512i idx = _mm512_ternarylogic_epi32(v, _mm512_set1_epi32(3), base, 0xEA);  // (v & 3) | base
  if constexpr (M == 8) idx = _mm512_mask_or_epi32(idx, static_cast<__mmask16>(hi), idx, _mm512_set1_epi32(4));
  return idx;
}

template <int KIND, int M, int MR>
void row_avx512(const float* const* x, const int32_t* pos, const int16_t* hi, const void* vals, const float* scale,
                const float* zero, int64_t B, int64_t group, int64_t G, float* out) {
  // two accumulators per input row (even and odd blocks) so that consecutive blocks do not wait on one another;
  // quantized values: sums of (q − z)·x per group in part, scaled into acc at the group's end
  __m512 acc[MR], part0[MR], part1[MR];
  for (int r = 0; r < MR; ++r) acc[r] = part0[r] = part1[r] = _mm512_setzero_ps();
  GroupWalk walk(group, G);
  int64_t g = 0;
  __m512 z = _mm512_setzero_ps(), z4 = z;  // z4 = 2^23 + z (4-bit codes)
  if constexpr (KIND != FLOAT) z = _mm512_set1_ps(zero[0]);
  if constexpr (KIND == INT4) z4 = _mm512_set1_ps(8388608.f + zero[0]);
  __m512i words = _mm512_setzero_si512();
  auto step = [&](int64_t b, __m512* part) __attribute__((always_inline)) {
    if constexpr (KIND != FLOAT) {
      if (walk.next(b)) {
        for (int r = 0; r < MR; ++r) {
          acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(scale[g]), _mm512_add_ps(part0[r], part1[r]), acc[r]);
          part0[r] = part1[r] = _mm512_setzero_ps();
        }
        g = walk.g;
        z = _mm512_set1_ps(zero[g]);
        if constexpr (KIND == INT4) z4 = _mm512_set1_ps(8388608.f + zero[g]);
      }
    }
    __m512 w;
    if constexpr (KIND == FLOAT) {
      w = _mm512_loadu_ps(static_cast<const float*>(vals) + 16 * b);
    } else if constexpr (KIND == INT8) {
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(vals) + 16 * b));
      w = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c)), z);
    } else {
      if ((b & 7) == 0) words = _mm512_loadu_si512(static_cast<const uint8_t*>(vals) + (b >> 3) * 64);
      else words = _mm512_srli_epi32(words, 4);
      // (code | bits of 2^23) is the float 2^23 + q: minus 2^23 + z gives q − z exactly, no conversion
      const __m512i f = _mm512_ternarylogic_epi32(words, _mm512_set1_epi32(0x0F), _mm512_set1_epi32(0x4B000000), 0xEA);
      w = _mm512_sub_ps(_mm512_castsi512_ps(f), z4);
    }
    const __m512i idx = indices512<M>(static_cast<uint32_t>(pos[b]), M == 8 ? static_cast<uint16_t>(hi[b]) : 0u);
    for (int r = 0; r < MR; ++r) {
      const float* xb = x[r] + 32 * b;
      const __m512 xs = _mm512_permutex2var_ps(_mm512_loadu_ps(xb), idx, _mm512_loadu_ps(xb + 16));
      part[r] = _mm512_fmadd_ps(w, xs, part[r]);
    }
  };
  int64_t b = 0;
  for (; b + 2 <= B; b += 2) {
    step(b, part0);
    step(b + 1, part1);
  }
  if (b < B) step(b, part0);
  for (int r = 0; r < MR; ++r) {
    const __m512 sum = _mm512_add_ps(part0[r], part1[r]);
    const __m512 total = KIND == FLOAT ? sum : _mm512_fmadd_ps(_mm512_set1_ps(scale[g]), sum, acc[r]);
    out[r] = _mm512_reduce_add_ps(total);
  }
}

bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

#pragma GCC pop_options

// ---- dispatch ------------------------------------------------------------------------------------------------------

using RowFn = void (*)(const float* const*, const int32_t*, const int16_t*, const void*, const float*, const float*,
                       int64_t, int64_t, int64_t, float*);

template <int KIND, int M>
RowFn pick_rows(bool wide, int64_t MR) {
  switch (MR) {
    case 1: return wide ? row_avx512<KIND, M, 1> : row_avx2<KIND, M, 1>;
    case 2: return wide ? row_avx512<KIND, M, 2> : row_avx2<KIND, M, 2>;
    case 3: return wide ? row_avx512<KIND, M, 3> : row_avx2<KIND, M, 3>;
    default: return wide ? row_avx512<KIND, M, 4> : row_avx2<KIND, M, 4>;
  }
}

template <int KIND>
RowFn pick_m(int64_t m, bool wide, int64_t MR) {
  return m == 4 ? pick_rows<KIND, 4>(wide, MR) : pick_rows<KIND, 8>(wide, MR);
}

RowFn pick(int64_t kind, int64_t m, bool wide, int64_t MR) {
  if (kind == INT4) return pick_m<INT4>(m, wide, MR);
  if (kind == INT8) return pick_m<INT8>(m, wide, MR);
  return pick_m<FLOAT>(m, wide, MR);
}

int64_t value_bytes(int64_t kind, int64_t Kp) {
  return kind == INT4 ? (Kp + 255) / 256 * 64 : kind == INT8 ? Kp / 2 : Kp * 2;
}

void check(const torch::Tensor& vals, const torch::Tensor& pos, const torch::Tensor& hi, const torch::Tensor& scale,
           const torch::Tensor& zero, int64_t kind, int64_t m, int64_t group) {
  TORCH_CHECK(kind == FLOAT || kind == INT4 || kind == INT8, "kind: 0 (float32), 4 or 8 (bits of the codes)");
  TORCH_CHECK(m == 4 || m == 8, "the kernel runs 2:4 and 4:8");
  TORCH_CHECK(pos.dtype() == torch::kInt32 && pos.dim() == 2 && pos.is_contiguous(), "pos: int32 [N, Kp / 32]");
  const int64_t N = pos.size(0), B = pos.size(1), Kp = 32 * B;
  TORCH_CHECK(m == 4 || (hi.dtype() == torch::kInt16 && hi.is_contiguous() && hi.sizes() == pos.sizes()),
              "hi: int16 [N, Kp / 32] for 4:8");
  TORCH_CHECK(vals.dim() == 2 && vals.is_contiguous() && vals.size(0) == N, "values: [N, ...] contiguous");
  TORCH_CHECK(vals.dtype() == (kind == FLOAT ? torch::kFloat32 : torch::kUInt8), "values: float32 or uint8 codes");
  TORCH_CHECK(vals.size(1) * vals.element_size() == value_bytes(kind, Kp), "values hold the wrong number of bytes");
  if (kind != FLOAT) {
    TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous() && scale.dim() == 2 && scale.size(0) == N,
                "scale: float32 [N, G]");
    TORCH_CHECK(zero.dtype() == torch::kFloat32 && zero.is_contiguous() && zero.sizes() == scale.sizes(),
                "zero: float32 [N, G]");
    TORCH_CHECK(group > 0 && group % 32 == 0, "group must be a positive multiple of 32");
  }
}

}  // namespace

bool has_avx512() { return cpu_has_avx512(); }

// y [M, N] = x [M, K] · Wᵀ for M ≤ 4 (decode), x padded with zeros to Kp; `wide`: use AVX-512 (where present).
torch::Tensor nm_gemv(torch::Tensor x, torch::Tensor vals, torch::Tensor pos, torch::Tensor hi, torch::Tensor scale,
                      torch::Tensor zero, int64_t kind, int64_t m, int64_t group, bool wide) {
  check(vals, pos, hi, scale, zero, kind, m, group);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(0) <= 4, "x: float32 [M ≤ 4, K]");
  const int64_t M = x.size(0), K = x.size(1), N = pos.size(0), B = pos.size(1), Kp = 32 * B;
  TORCH_CHECK(K <= Kp && Kp - K < 32, "x has ", K, " columns; the weight is laid out for ", Kp);
  const int64_t G = kind == FLOAT ? 1 : scale.size(1);
  auto xp = torch::zeros({M, Kp}, x.options());
  xp.narrow(1, 0, K).copy_(x);
  auto y = torch::empty({N, M}, x.options());  // row n of W gives y[n, 0 .. M − 1]
  const float* rows[4];
  for (int64_t r = 0; r < M; ++r) rows[r] = xp.data_ptr<float>() + r * Kp;
  const RowFn fn = pick(kind, m, wide && cpu_has_avx512(), M);
  const int32_t* pp = pos.data_ptr<int32_t>();
  const int16_t* hp = m == 8 ? hi.data_ptr<int16_t>() : nullptr;
  const uint8_t* vp = static_cast<const uint8_t*>(vals.data_ptr());
  const int64_t row_bytes = value_bytes(kind, Kp);
  const float* sp = kind == FLOAT ? nullptr : scale.data_ptr<float>();
  const float* zp = kind == FLOAT ? nullptr : zero.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      fn(rows, pp + n * B, hp ? hp + n * B : nullptr, vp + n * row_bytes, sp ? sp + n * G : nullptr,
         zp ? zp + n * G : nullptr, B, group, G, yp + n * M);
  });
  return y.t();
}

// Rows n0 .. n1 of W as float32 into out (at least (n1 − n0) · K floats, row-major [n1 − n0, K]): prefill expands a
// slice of rows into one reused buffer, then one float32 GEMM.
torch::Tensor nm_expand(torch::Tensor vals, torch::Tensor pos, torch::Tensor hi, torch::Tensor scale,
                        torch::Tensor zero, int64_t kind, int64_t m, int64_t group, int64_t K, int64_t n0, int64_t n1,
                        torch::Tensor out) {
  check(vals, pos, hi, scale, zero, kind, m, group);
  const int64_t N = pos.size(0), B = pos.size(1), Kp = 32 * B;
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= N, "rows out of range");
  TORCH_CHECK(K <= Kp && Kp - K < 32, "K does not fit the layout");
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.numel() >= (n1 - n0) * K,
              "out: a contiguous float32 buffer of at least (n1 - n0) * K elements");
  const int64_t G = kind == FLOAT ? 1 : scale.size(1), n = m / 2, row_bytes = value_bytes(kind, Kp);
  const int32_t* pp = pos.data_ptr<int32_t>();
  const int16_t* hp = m == 8 ? hi.data_ptr<int16_t>() : nullptr;
  const uint8_t* vp = static_cast<const uint8_t*>(vals.data_ptr());
  const float* sp = kind == FLOAT ? nullptr : scale.data_ptr<float>();
  const float* zp = kind == FLOAT ? nullptr : zero.data_ptr<float>();
  float* wp = out.data_ptr<float>();
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t e) {
    for (int64_t r = a; r < e; ++r) {
      float* w = wp + (r - n0) * K;
      std::memset(w, 0, K * sizeof(float));
      const uint8_t* v = vp + r * row_bytes;
      for (int64_t b = 0; b < B && 32 * b < K; ++b) {
        const uint32_t p = static_cast<uint32_t>(pp[r * B + b]);
        const uint32_t h = hp ? static_cast<uint16_t>(hp[r * B + b]) : 0u;
        const int64_t g = kind == FLOAT ? 0 : group_of(b, group, G);
        const float s = sp ? sp[r * G + g] : 1.f, z = zp ? zp[r * G + g] : 0.f;
        for (int j = 0; j < 16; ++j) {
          const int64_t col = 32 * b + (j / n) * m + (((p >> (2 * j)) & 3) | (((h >> j) & 1) << 2));
          if (col >= K) continue;
          float value;
          if (kind == FLOAT) {
            value = reinterpret_cast<const float*>(v)[16 * b + j];
          } else if (kind == INT8) {
            value = (static_cast<float>(v[16 * b + j]) - z) * s;
          } else {
            const int i = static_cast<int>(b & 7);
            const uint8_t byte = v[(b >> 3) * 64 + 4 * j + i / 2];
            value = (static_cast<float>((byte >> (4 * (i & 1))) & 0x0F) - z) * s;
          }
          w[col] = value;
        }
      }
    }
  });
  return out.view({-1}).narrow(0, 0, (n1 - n0) * K).view({n1 - n0, K});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("has_avx512", &has_avx512, "whether this CPU runs the AVX-512 variant");
  mod.def("nm_gemv", &nm_gemv, "y = x · Wᵀ for N:M sparse W from kept values and positions (M ≤ 4 rows)");
  mod.def("nm_expand", &nm_expand, "rows n0..n1 of an N:M sparse W as float32, written into out");
}
