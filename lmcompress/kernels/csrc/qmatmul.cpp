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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = x · Wᵀ from 4- or 8-bit codes, float32 (small M)");
  m.def("dequantize", &dequantize, "rows n0..n1 of W as float32, written into out");
}
