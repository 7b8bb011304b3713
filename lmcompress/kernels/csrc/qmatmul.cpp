// y = x · Wᵀ for a weight stored as unsigned integer codes with a scale and an offset per (row, group):
//     W[n, k] = q[n, k] · s[n, g(k)] + t[n, g(k)],   g(k) = k / group   (t = −z·s for a zero point z),
// activations and accumulation in float32 (AVX2 + FMA). Built at first use by lmcompress.kernels.cpu_ext.
//
// Layout (lmcompress.kernels.cpu_ext.pack): each row is cut in units of 32 columns, K padded with zero codes to a
// whole number of units (4-bit: of unit pairs). 8-bit codes: a unit is 8 little-endian 32-bit words, byte i of
// word l holding column 8i + l. 4-bit codes: a pair of units (64 columns) is 8 words, nibble i of word l holding
// column 8i + l. So shifting all 8 words right by 8i (4i) bits and masking gives columns 8i..8i+7 in order, with
// no lane-crossing shuffle. `group` is a multiple of 32; the padded columns fall in the last group and meet zero
// inputs.
//
// Per row and group:  Σ_k W[n,k]·x[k] = s · Σ_k q[n,k]·x[k] + t · Σ_k x[k], so the codes are widened to float32
// and multiplied by x directly; the group sums of x are computed once per call.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int SHIFT>
inline __m256 field(__m256i words, __m256i mask) {  // (word >> SHIFT) & mask, as 8 floats
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(words, SHIFT), mask));
}

inline int64_t padded_cols(int64_t K, int64_t bits) { return bits == 4 ? (K + 63) / 64 * 64 : (K + 31) / 32 * 32; }

// The 32 codes of unit u of a row (p: the row's first byte) as four vectors of 8 floats: columns 0-7, ..., 24-31.
template <int BITS, int HALF>
inline void decode(const uint8_t* p, int64_t u, __m256& w0, __m256& w1, __m256& w2, __m256& w3) {
  if constexpr (BITS == 4) {
    const __m256i mask = _mm256_set1_epi32(0x0F);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (u >> 1) * 32));
    w0 = field<HALF * 16>(v, mask);
    w1 = field<HALF * 16 + 4>(v, mask);
    w2 = field<HALF * 16 + 8>(v, mask);
    w3 = field<HALF * 16 + 12>(v, mask);
  } else {
    const __m256i mask = _mm256_set1_epi32(0xFF);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + u * 32));
    w0 = field<0>(v, mask);
    w1 = field<8>(v, mask);
    w2 = field<16>(v, mask);
    w3 = field<24>(v, mask);
  }
}

template <int BITS>
inline void decode_unit(const uint8_t* p, int64_t u, __m256& w0, __m256& w1, __m256& w2, __m256& w3) {
  if (BITS == 4 && (u & 1))
    decode<BITS, 1>(p, u, w0, w1, w2, w3);
  else
    decode<BITS, 0>(p, u, w0, w1, w2, w3);
}

// y[n] for rows n0..n1 of one input row x (padded to Kp columns; xsum: its sums over each group). Two rows at a
// time share the loads of x and keep two independent accumulation chains in flight.
template <int BITS, int ROWS>
inline void gemv_block(const float* x, const float* xsum, const uint8_t* codes, const float* scale, const float* shift,
                       float* y, int64_t n, int64_t Kp, int64_t group, int64_t G) {
  const int64_t row_bytes = Kp * BITS / 8, units = Kp / 32, units_per_group = group / 32;
  const uint8_t* p[ROWS];
  __m256 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    p[r] = codes + (n + r) * row_bytes;
    acc[r] = _mm256_setzero_ps();
  }
  for (int64_t g = 0, u = 0; g < G; ++g) {
    const int64_t u_end = g == G - 1 ? units : u + units_per_group;  // the last group takes the padding
    __m256 a[ROWS], b[ROWS];
    for (int r = 0; r < ROWS; ++r) a[r] = b[r] = _mm256_setzero_ps();
    for (; u < u_end; ++u) {
      const float* xu = x + u * 32;
      const __m256 x0 = _mm256_loadu_ps(xu), x1 = _mm256_loadu_ps(xu + 8);
      const __m256 x2 = _mm256_loadu_ps(xu + 16), x3 = _mm256_loadu_ps(xu + 24);
      for (int r = 0; r < ROWS; ++r) {
        __m256 w0, w1, w2, w3;
        decode_unit<BITS>(p[r], u, w0, w1, w2, w3);
        a[r] = _mm256_fmadd_ps(w0, x0, a[r]);
        b[r] = _mm256_fmadd_ps(w1, x1, b[r]);
        a[r] = _mm256_fmadd_ps(w2, x2, a[r]);
        b[r] = _mm256_fmadd_ps(w3, x3, b[r]);
      }
    }
    for (int r = 0; r < ROWS; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale[(n + r) * G + g]), _mm256_add_ps(a[r], b[r]), acc[r]);
  }
  for (int r = 0; r < ROWS; ++r) {
    const float* t = shift + (n + r) * G;
    float off = 0.f;
    for (int64_t g = 0; g < G; ++g) off += t[g] * xsum[g];
    y[n + r] = hsum(acc[r]) + off;
  }
}

template <int BITS>
void gemv_rows(const float* x, const float* xsum, const uint8_t* codes, const float* scale, const float* shift,
               float* y, int64_t n0, int64_t n1, int64_t Kp, int64_t group, int64_t G) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) gemv_block<BITS, 2>(x, xsum, codes, scale, shift, y, n, Kp, group, G);
  if (n < n1) gemv_block<BITS, 1>(x, xsum, codes, scale, shift, y, n, Kp, group, G);
}

// Rows n0..n1 of W as float32 into w ([n1 − n0, K], row-major).
template <int BITS>
void dequant_rows(const uint8_t* codes, const float* scale, const float* shift, float* w, int64_t n0, int64_t n1,
                  int64_t Kp, int64_t K, int64_t group, int64_t G) {
  const int64_t row_bytes = Kp * BITS / 8;
  alignas(32) float tail[32];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = codes + n * row_bytes;
    float* out = w + (n - n0) * K;
    for (int64_t u = 0; u * 32 < K; ++u) {
      const int64_t g = std::min((u * 32) / group, G - 1);
      const __m256 s = _mm256_set1_ps(scale[n * G + g]), t = _mm256_set1_ps(shift[n * G + g]);
      __m256 w0, w1, w2, w3;
      decode_unit<BITS>(p, u, w0, w1, w2, w3);
      float* dst = u * 32 + 32 <= K ? out + u * 32 : tail;
      _mm256_storeu_ps(dst, _mm256_fmadd_ps(w0, s, t));
      _mm256_storeu_ps(dst + 8, _mm256_fmadd_ps(w1, s, t));
      _mm256_storeu_ps(dst + 16, _mm256_fmadd_ps(w2, s, t));
      _mm256_storeu_ps(dst + 24, _mm256_fmadd_ps(w3, s, t));
      if (dst == tail) std::copy(tail, tail + (K - u * 32), out + u * 32);
    }
  }
}

void check(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& shift, int64_t bits,
           int64_t K, int64_t group) {
  TORCH_CHECK(bits == 4 || bits == 8, "codes are stored in 4 or 8 bits");
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 2, "codes: uint8 [N, bytes]");
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous(), "scale: float32 [N, groups]");
  TORCH_CHECK(shift.dtype() == torch::kFloat32 && shift.is_contiguous(), "shift: float32 [N, groups]");
  const int64_t bytes = padded_cols(K, bits) * bits / 8;
  TORCH_CHECK(codes.size(1) == bytes, "codes hold ", codes.size(1), " bytes a row, not ", bytes);
  TORCH_CHECK(group > 0 && group % 32 == 0, "group must be a positive multiple of 32");
  TORCH_CHECK(scale.size(0) == codes.size(0) && scale.sizes() == shift.sizes(), "scale/shift shape");
  TORCH_CHECK(scale.size(1) == (K + group - 1) / group, "scale has ", scale.size(1), " groups, not ceil(K / group)");
}

}  // namespace

// y [M, N] = x [M, K] · Wᵀ, one row of x at a time (decode: M is small).
torch::Tensor gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor shift, int64_t bits,
                   int64_t group) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x: float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), G = scale.size(1);
  check(codes, scale, shift, bits, K, group);
  const int64_t Kp = padded_cols(K, bits);
  // x padded with zeros to Kp columns, and Σ x over each group (plain loops: M and K are small in decode)
  auto xc = x.contiguous();
  auto xp = torch::zeros({M, Kp}, x.options());
  auto xsum = torch::zeros({M, G}, x.options());
  for (int64_t m = 0; m < M; ++m) {
    const float* src = xc.data_ptr<float>() + m * K;
    float* dst = xp.data_ptr<float>() + m * Kp;
    float* xs = xsum.data_ptr<float>() + m * G;
    for (int64_t k = 0; k < K; ++k) {
      dst[k] = src[k];
      xs[k / group] += src[k];
    }
  }
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float *sp = scale.data_ptr<float>(), *tp = shift.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = xp.data_ptr<float>() + m * Kp;
    const float* xs = xsum.data_ptr<float>() + m * G;
    float* ym = y.data_ptr<float>() + m * N;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      if (bits == 4)
        gemv_rows<4>(xm, xs, cp, sp, tp, ym, n0, n1, Kp, group, G);
      else
        gemv_rows<8>(xm, xs, cp, sp, tp, ym, n0, n1, Kp, group, G);
    });
  }
  return y;
}

// Rows n0..n1 of W as float32 into out (at least (n1 − n0) · K floats, row-major [n1 − n0, K]): prefill
// dequantizes a slice into one reused buffer, then one float32 GEMM.
torch::Tensor dequantize(torch::Tensor codes, torch::Tensor scale, torch::Tensor shift, int64_t bits, int64_t K,
                         int64_t group, int64_t n0, int64_t n1, torch::Tensor out) {
  check(codes, scale, shift, bits, K, group);
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= codes.size(0), "rows out of range");
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.numel() >= (n1 - n0) * K,
              "out: a contiguous float32 buffer of at least (n1 - n0) * K elements");
  const int64_t Kp = padded_cols(K, bits), G = scale.size(1);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float *sp = scale.data_ptr<float>(), *tp = shift.data_ptr<float>();
  float* wp = out.data_ptr<float>();
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) {
    if (bits == 4)
      dequant_rows<4>(cp, sp, tp, wp + (a - n0) * K, a, b, Kp, K, group, G);
    else
      dequant_rows<8>(cp, sp, tp, wp + (a - n0) * K, a, b, Kp, K, group, G);
  });
  return out.view({-1}).narrow(0, 0, (n1 - n0) * K).view({n1 - n0, K});
}

// ---- W8A8: int8 activations × int8 weights → int32, exact (lmcompress.kernels.int8act) ----------------------
// Per token (row of x): s = max(max_k |x[k]| / divisor, 1e-12), q[k] = round_half_even(clamp(x[k] / s, −128, 127)),
// the same float32 operations as lmcompress.algorithms.actquant.quantize_per_token_int8, so the codes are identical.
// Dot products widen both int8 operands to int16 and use _mm256_madd_epi16 (products ≤ 2¹⁴, pair sums ≤ 2¹⁵, no
// saturation), accumulating in int32: exact for K < 2¹⁷.

namespace {

// Codes (int16, for madd) and scale of one row of x of length K.
inline float quantize_row(const float* x, int64_t K, float divisor, int16_t* q) {
  __m256 vmax = _mm256_setzero_ps();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + k), absmask));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.f;
  for (int i = 0; i < 8; ++i) amax = std::max(amax, lanes[i]);
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float s = std::max(amax / divisor, 1e-12f);
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
  for (k = 0; k + 8 <= K; k += 8) {
    __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), vs), lo), hi);
    __m256i i32 = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), i16);
  }
  for (; k < K; ++k) q[k] = static_cast<int16_t>(std::nearbyint(std::min(std::max(x[k] / s, -128.f), 127.f)));
  return s;
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Σ_k xq[m, k] · w[n, k] for ROWS weight rows n.. and every token m (weights read once, x from cache).
template <int ROWS>
inline void int8_dot_block(const int16_t* xq, int64_t M, const int8_t* w, int64_t K, int64_t n, int32_t* acc,
                           int64_t N) {
  const int8_t* p[ROWS];
  for (int r = 0; r < ROWS; ++r) p[r] = w + (n + r) * K;
  for (int64_t m = 0; m < M; ++m) {
    const int16_t* xm = xq + m * K;
    __m256i a[ROWS], b[ROWS];
    for (int r = 0; r < ROWS; ++r) a[r] = b[r] = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + k));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + k + 16));
      for (int r = 0; r < ROWS; ++r) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[r] + k)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[r] + k + 16)));
        a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(w0, x0));
        b[r] = _mm256_add_epi32(b[r], _mm256_madd_epi16(w1, x1));
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      int32_t s = hsum_epi32(_mm256_add_epi32(a[r], b[r]));
      for (int64_t j = k; j < K; ++j) s += static_cast<int32_t>(xm[j]) * p[r][j];
      acc[m * N + n + r] = s;
    }
  }
}

void check_int8_weight(const torch::Tensor& w, const torch::Tensor& sw, const torch::Tensor& bias) {
  TORCH_CHECK(w.dtype() == torch::kInt8 && w.dim() == 2 && w.is_contiguous(), "weight: contiguous int8 [N, K]");
  TORCH_CHECK(w.size(1) < (1 << 17), "K must be below 2^17 for exact int32 accumulation");
  TORCH_CHECK(sw.dtype() == torch::kFloat32 && sw.is_contiguous() && sw.numel() == w.size(0),
              "weight scale: float32 [N]");
  TORCH_CHECK(!bias.defined() || (bias.dtype() == torch::kFloat32 && bias.is_contiguous() && bias.numel() == w.size(0)),
              "bias: float32 [N]");
}

}  // namespace

// Per-token int8 codes and scales of x [M, K] float32: (q int8 [M, K], s float32 [M, 1]).
std::vector<torch::Tensor> quantize_per_token(torch::Tensor x, double divisor) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x: float32 [M, K]");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  auto q = torch::empty({M, K}, xc.options().dtype(torch::kInt8));
  auto s = torch::empty({M, 1}, xc.options());
  const float* xp = xc.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<int16_t> row(K);
    for (int64_t m = m0; m < m1; ++m) {
      sp[m] = quantize_row(xp + m * K, K, static_cast<float>(divisor), row.data());
      for (int64_t k = 0; k < K; ++k) qp[m * K + k] = static_cast<int8_t>(row[k]);
    }
  });
  return {q, s};
}

// y [M, N] = (q_x · wᵀ) · s_x[m] · s_w[n] + bias[n], with q_x, s_x the per-token codes of x (few rows: decode).
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor sw, c10::optional<torch::Tensor> bias_opt,
                        double divisor) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x: float32 [M, K]");
  torch::Tensor bias = bias_opt.has_value() ? *bias_opt : torch::Tensor();
  check_int8_weight(w, sw, bias);
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "x has ", K, " columns, the weight ", w.size(1));
  std::vector<int16_t> xq(M * K);
  std::vector<float> sx(M);
  for (int64_t m = 0; m < M; ++m) sx[m] = quantize_row(xc.data_ptr<float>() + m * K, K, static_cast<float>(divisor),
                                                       xq.data() + m * K);
  auto acc = torch::empty({M, N}, xc.options().dtype(torch::kInt32));
  int32_t* ap = acc.data_ptr<int32_t>();
  const int8_t* wp = w.data_ptr<int8_t>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) int8_dot_block<2>(xq.data(), M, wp, K, n, ap, N);
    if (n < n1) int8_dot_block<1>(xq.data(), M, wp, K, n, ap, N);
  });
  auto y = torch::empty({M, N}, xc.options());
  const float* swp = sw.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      yp[m * N + n] = static_cast<float>(ap[m * N + n]) * sx[m] * swp[n] + (bp ? bp[n] : 0.f);
  return y;
}

// y [M, N] float32 = acc[m, n] · s_x[m] · s_w[n] + bias[n] for an int32 product acc [M, N] (prefill).
torch::Tensor int8_rescale(torch::Tensor acc, torch::Tensor sx, torch::Tensor sw, c10::optional<torch::Tensor> bias_opt) {
  TORCH_CHECK(acc.dtype() == torch::kInt32 && acc.dim() == 2, "acc: int32 [M, N]");
  torch::Tensor bias = bias_opt.has_value() ? *bias_opt : torch::Tensor();
  auto ac = acc.contiguous();
  auto sxc = sx.contiguous();
  const int64_t M = ac.size(0), N = ac.size(1);
  TORCH_CHECK(sxc.dtype() == torch::kFloat32 && sxc.numel() == M, "s_x: float32 [M]");
  TORCH_CHECK(sw.dtype() == torch::kFloat32 && sw.is_contiguous() && sw.numel() == N, "s_w: float32 [N]");
  TORCH_CHECK(!bias.defined() || (bias.dtype() == torch::kFloat32 && bias.is_contiguous() && bias.numel() == N),
              "bias: float32 [N]");
  auto y = torch::empty({M, N}, ac.options().dtype(torch::kFloat32));
  const int32_t* ap = ac.data_ptr<int32_t>();
  const float *sxp = sxc.data_ptr<float>(), *swp = sw.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const __m256 s = _mm256_set1_ps(sxp[m]);
      int64_t n = 0;
      for (; n + 8 <= N; n += 8) {
        __m256 v = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ap + m * N + n)));
        v = _mm256_mul_ps(_mm256_mul_ps(v, s), _mm256_loadu_ps(swp + n));
        if (bp) v = _mm256_add_ps(v, _mm256_loadu_ps(bp + n));
        _mm256_storeu_ps(yp + m * N + n, v);
      }
      for (; n < N; ++n) yp[m * N + n] = static_cast<float>(ap[m * N + n]) * sxp[m] * swp[n] + (bp ? bp[n] : 0.f);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = x · Wᵀ from 4- or 8-bit codes, float32 (small M)");
  m.def("dequantize", &dequantize, "rows n0..n1 of W as float32, written into out");
  m.def("quantize_per_token", &quantize_per_token, "per-token int8 codes and scales of float32 rows");
  m.def("int8_gemv", &int8_gemv, "W8A8 y = (q_x · q_wᵀ) s_x s_w + b, int32 accumulation (small M)");
  m.def("int8_rescale", &int8_rescale, "float32 acc · s_x · s_w + b from an int32 product");
}
