// The packed-llama decoder layers in C++ (bias-free Llama layers, float32; the Python loop covers the rest).
//
// layers_forward: any number of new tokens. The same ATen ops, in the same order, as PackedLlamaBackend's
//   Python loop, so results are bitwise equal, without Python's per-op overhead.
// decode_layers: a few new tokens per row (decode steps, speculative verification). Up to SKINNY_MAX_ROWS
//   rows in all, the four weight matmuls run in skinny_linear below (each weight read once for all rows);
//   more rows go through ATen (into preallocated buffers, residual adds folded into addmm_). RMSNorm, RoPE,
//   the KV-cache write, attention over the cached keys and SiLU*up are plain loops. Same math, other
//   summation order: equal to the Python loop within float rounding (tested), not bitwise.
// skinny_linear: x @ w.T for a few rows of x, exposed for the LM head.
// decode_layers_ex: decode_layers with bfloat16, float16, int8 (row-scaled) or 4-bit (Q4_1 blocks) weights,
//   low-precision activations (q8 blocks for int8 / 4-bit weights, bfloat16 for bfloat16 weights) and/or per-row
//   LoRA terms on
//   q/k/v/o/gate/up/down, gathered from stacked adapter pools (BGMV: each row reads its own adapter's A and B,
//   Chen et al. 2023, "Punica").
//
// Weights are in nn.Linear's layout, [out_features, in_features], contiguous (4-bit: [out, in / 32 * 24] bytes of
// blocks, see skinny_q4).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
// AVX-512 paths (VNNI integer dot products; AVX-512 BF16 dot products; 512-bit float vectors only with
// -DDAERT_FLOAT_BITS=512), taken when the build targets them (-march=native on a CPU that has them); -DDAERT_NO_AVX512=1 builds the AVX2 paths instead, for side by
// side comparisons (experiments/bench_isa.py) and tests.
#ifndef DAERT_NO_AVX512
#define DAERT_NO_AVX512 0
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !DAERT_NO_AVX512
#define DAERT_AVX512 1
#else
#define DAERT_AVX512 0
#endif
#if DAERT_AVX512 && defined(__AVX512VNNI__)
#define DAERT_VNNI 1
#else
#define DAERT_VNNI 0
#endif
#if DAERT_AVX512 && defined(__AVX512BF16__)
#define DAERT_AVX512BF16 1
#else
#define DAERT_AVX512BF16 0
#endif

using torch::Tensor;

static Tensor rms(const Tensor& x, const Tensor& w, double eps) {
  // LlamaRMSNorm in fp32: w * (x * rsqrt(mean(x^2) + eps))
  return w * (x * at::rsqrt(x.pow(2).mean({-1}, true).add_(eps)));
}

static void check_lists(const std::vector<Tensor>& norm1, const std::vector<Tensor>& wqkv,
                        const std::vector<Tensor>& wo, const std::vector<Tensor>& norm2,
                        const std::vector<Tensor>& wgu, const std::vector<Tensor>& wdown, const Tensor& cache_k,
                        const Tensor& cache_v) {
  const auto n = norm1.size();
  TORCH_CHECK(wqkv.size() == n && wo.size() == n && norm2.size() == n && wgu.size() == n && wdown.size() == n,
              "one tensor per layer in every weight list");
  TORCH_CHECK(cache_k.size(0) == static_cast<int64_t>(n) && cache_v.size(0) == static_cast<int64_t>(n),
              "cache has the wrong number of layers");
}

Tensor layers_forward(Tensor h, const std::vector<Tensor>& norm1, const std::vector<Tensor>& wqkv,
                      const std::vector<Tensor>& wo, const std::vector<Tensor>& norm2,
                      const std::vector<Tensor>& wgu, const std::vector<Tensor>& wdown, const Tensor& cache_k,
                      const Tensor& cache_v, const Tensor& cos, const Tensor& sin, const Tensor& attn_mask,
                      int64_t start, int64_t H, int64_t KV, int64_t D, double eps) {
  TORCH_CHECK(h.dim() == 3 && h.scalar_type() == at::kFloat, "h must be a float32 [B, T, d] tensor");
  check_lists(norm1, wqkv, wo, norm2, wgu, wdown, cache_k, cache_v);
  const auto n = norm1.size();
  const int64_t B = h.size(0), T = h.size(1), end = start + T, half = D / 2;
  TORCH_CHECK(end <= cache_k.size(3), "KV cache overflow");
  const double scale = std::pow(static_cast<double>(D), -0.5);
  for (size_t i = 0; i < n; ++i) {
    Tensor qkv = at::linear(rms(h, norm1[i], eps), wqkv[i]);
    Tensor qk = qkv.narrow(-1, 0, (H + KV) * D).view({B, T, H + KV, D}).transpose(1, 2);
    qk = qk * cos + qk.roll({half}, {-1}) * sin;
    Tensor ck = cache_k.select(0, i), cv = cache_v.select(0, i);
    ck.narrow(2, start, T).copy_(qk.narrow(1, H, KV));
    cv.narrow(2, start, T).copy_(qkv.narrow(-1, (H + KV) * D, KV * D).view({B, T, KV, D}).transpose(1, 2));
    Tensor o = at::scaled_dot_product_attention(qk.narrow(1, 0, H), ck.narrow(2, 0, end), cv.narrow(2, 0, end),
                                                attn_mask, 0.0, false, scale, H != KV);
    h = h + at::linear(o.transpose(1, 2).reshape({B, T, H * D}), wo[i]);
    Tensor gu = at::linear(rms(h, norm2[i], eps), wgu[i]);
    const int64_t m = gu.size(-1) / 2;
    h = h + at::linear(at::silu(gu.narrow(-1, 0, m)) * gu.narrow(-1, m, m), wdown[i]);
  }
  return h;
}

// Sum of a[i] * b[i] with 16 independent partial sums (vectorisable without -ffast-math).
static inline float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

// --- skinny_linear: out[m, n] (+)= sum_k x[m, k] * w[n, k] for a few rows m -----------------------------
// BLAS time for [M, K] @ W grows about linearly with M for small M on CPUs measured here (M = 3: 2x M = 1),
// although the step is memory-bound: each weight row should be read once for all M rows. This kernel streams
// the weight rows (contiguous) and keeps the M input rows in L1. GCC vector extensions of VW floats: 8 (ymm with AVX2,
// and with AVX-512 too: measured faster at one row, experiments/bench_isa.py), or 16 (zmm) built with
// -DDAERT_FLOAT_BITS=512 on AVX-512; other targets split them as they can.
#ifndef DAERT_FLOAT_BITS
#define DAERT_FLOAT_BITS 256
#endif
#if DAERT_AVX512 && DAERT_FLOAT_BITS == 512
#define DAERT_ZMM 1
constexpr int64_t VW = 16;
#else
#define DAERT_ZMM 0
constexpr int64_t VW = 8;
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4), may_alias));  // unaligned loads and stores
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));
typedef uint16_t v8h __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint32_t v8i __attribute__((vector_size(32)));
typedef int8_t v8b __attribute__((vector_size(8), aligned(1), may_alias));
constexpr int64_t SKINNY_MAX_ROWS = 16;
// software prefetch distances in bytes (0: none), see prefetch_ahead; experiments/bench_prefetch.py builds this
// file with other values (-DDAERT_PF_F32=...) to compare them side by side
#ifndef DAERT_PF_F32
#define DAERT_PF_F32 0
#endif
#ifndef DAERT_PF_16
#define DAERT_PF_16 1024
#endif
#ifndef DAERT_PF_8
#define DAERT_PF_8 4096
#endif
constexpr int64_t PREFETCH_BYTES = DAERT_PF_8;  // int8 and 4-bit rows
constexpr int64_t ROWS_PREFETCH = 4096;  // the multi-row path (batch > 1), every format

// Weight formats streamed by the skinny kernel, each widened to float32 in registers (fp32 accumulation):
// float32; bfloat16 (the top half of a float32: shift left by 16); float16; int8 with one float32 scale per output row
// (applied once to each finished dot product).
struct F32 {
  using T = float;
  static constexpr int64_t PREFETCH = DAERT_PF_F32;
  static inline vf load(const float* p) { return *(const vfu*)p; }
  static inline float one(const float* p) { return *p; }
};
struct BF16 {
  using T = uint16_t;
  static constexpr int64_t PREFETCH = DAERT_PF_16;
  // GCC splits the vector-extension widening into two 128-bit halves; with AVX2 it is one vpmovzxwd + vpslld
#if DAERT_ZMM
  static inline vf load(const uint16_t* p) {
    const __m512i i = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return (vf)_mm512_castsi512_ps(_mm512_slli_epi32(i, 16));
  }
#elif defined(__AVX2__)
  static inline vf load(const uint16_t* p) {
    const __m256i i = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return (vf)_mm256_castsi256_ps(_mm256_slli_epi32(i, 16));
  }
#else
  static inline vf load(const uint16_t* p) {
    const v8i i = __builtin_convertvector(*(const v8h*)p, v8i) << 16;
    return (vf)i;
  }
#endif
  static inline float one(const uint16_t* p) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
};
// IEEE half precision: one vcvtph2ps per 8 weights with F16C (the x86 path where bfloat16 is not native)
struct F16 {
  using T = uint16_t;
  static constexpr int64_t PREFETCH = DAERT_PF_16;
#if DAERT_ZMM
  static inline vf load(const uint16_t* p) {
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
#elif defined(__F16C__)
  static inline vf load(const uint16_t* p) {
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
#else
  static inline vf load(const uint16_t* p) {
    vf v;
    for (int j = 0; j < VW; ++j) v[j] = c10::detail::fp16_ieee_to_fp32_value(p[j]);
    return v;
  }
#endif
  static inline float one(const uint16_t* p) { return c10::detail::fp16_ieee_to_fp32_value(*p); }
};
struct I8 {
  using T = int8_t;
  static constexpr int64_t PREFETCH = PREFETCH_BYTES;
  // GCC scalarises a char -> float vector conversion (8 movsbl + vcvtsi2ss); with AVX2 it is one sign-extending
  // load (vpmovsxbd) and one vcvtdq2ps
#if DAERT_ZMM
  static inline vf load(const int8_t* p) {
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
#elif defined(__AVX2__)
  static inline vf load(const int8_t* p) {
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
#else
  static inline vf load(const int8_t* p) { return __builtin_convertvector(*(const v8b*)p, vf); }
#endif
  static inline float one(const int8_t* p) { return static_cast<float>(*p); }
};

// Software prefetch DIST bytes ahead of a weight row being streamed, once per cache line (0: none). The weight
// rows of a thread are contiguous, so this reaches into the rows it takes next. The multi-row path takes
// ROWS_PREFETCH; the one-row path (batch 1) takes W::PREFETCH, the fastest of 0, 1 KiB and 4 KiB for SmolLM2
// decode steps at batch 1 on a 2-core AVX2 EPYC (experiments/bench_prefetch.py): float32 with none, 16-bit with
// 1 KiB, int8 and 4-bit with 4 KiB.
template <class W, int64_t DIST = W::PREFETCH>
static inline void prefetch_ahead(const typename W::T* row, int64_t k) {
  if constexpr (DIST > 0) {
    if ((k * sizeof(typename W::T)) % 64 == 0)
      __builtin_prefetch(reinterpret_cast<const char*>(row + k) + DIST);
  }
}

template <class V>
static inline float hsum(V v) {
  float s = 0.f;
  for (size_t i = 0; i < sizeof(V) / sizeof(float); ++i) s += v[i];
  return s;
}

template <class W>
static inline float tail_dot(const float* a, const typename W::T* b, int64_t k0, int64_t K) {
  float s = 0.f;
  for (int64_t k = k0; k < K; ++k) s += a[k] * W::one(b + k);
  return s;
}

// MR rows of x against weight rows w0 and w1 (w1 may equal w0 for an odd last row; then only o[0] is written);
// sc0 / sc1: the rows' scales (1 for unscaled formats)
template <int MR, class W>
static inline void dot_rows(const float* x, int64_t K, const typename W::T* w0, const typename W::T* w1, float* o,
                            int64_t ldo, bool two, bool acc, float sc0, float sc1) {
  vf a[MR], b[MR];
  for (int m = 0; m < MR; ++m) a[m] = b[m] = vf{};
  const int64_t K8 = K - K % VW;
  for (int64_t k = 0; k < K8; k += VW) {
    prefetch_ahead<W, ROWS_PREFETCH>(w0, k);
    prefetch_ahead<W, ROWS_PREFETCH>(w1, k);
    const vf p = W::load(w0 + k), q = W::load(w1 + k);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const vf xv = *(const vfu*)(x + m * K + k);
      a[m] += xv * p;
      b[m] += xv * q;
    }
  }
  for (int m = 0; m < MR; ++m) {
    const float* xm = x + m * K;
    const float s0 = (hsum(a[m]) + tail_dot<W>(xm, w0, K8, K)) * sc0;
    const float s1 = (hsum(b[m]) + tail_dot<W>(xm, w1, K8, K)) * sc1;
    float* om = o + m * ldo;
    om[0] = acc ? om[0] + s0 : s0;
    if (two) om[1] = acc ? om[1] + s1 : s1;
  }
}

// one row of x against one weight row, 4 * VW inputs per iteration into four accumulators (the M = 1 decode step).
// One weight row at a time keeps each thread on one sequential stream, which the prefetchers follow best:
// measured on a 2-core AVX2 EPYC (float16, 98304 x 576, 2 threads), ~14 GB/s against ~10 GB/s for four rows
// interleaved 8 inputs at a time.
template <class W>
static inline float dot_one_row(const float* x, int64_t K, const typename W::T* w) {
  vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};
  int64_t k = 0;
  for (; k + 4 * VW <= K; k += 4 * VW) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) prefetch_ahead<W>(w, k + j * VW);  // each cache line once (prefetch_ahead)
    a0 += *(const vfu*)(x + k) * W::load(w + k);
    a1 += *(const vfu*)(x + k + VW) * W::load(w + k + VW);
    a2 += *(const vfu*)(x + k + 2 * VW) * W::load(w + k + 2 * VW);
    a3 += *(const vfu*)(x + k + 3 * VW) * W::load(w + k + 3 * VW);
  }
  for (; k + VW <= K; k += VW) a0 += *(const vfu*)(x + k) * W::load(w + k);
  return hsum((a0 + a1) + (a2 + a3)) + tail_dot<W>(x, w, k, K);
}

// The thread split of the skinny kernels, out [M, N] (row stride ldo): at one row of x, weight rows one at a time
// (one(n): row n's dot product); at more, pairs of weight rows (n, n + 1; two: whether n + 1 exists) against blocks
// of up to 6 rows of x (rows(std::integral_constant<int, MR>, m0, n, two) writes out rows m0 .. m0 + MR - 1), 6 rows
// x 2 weight rows being 12 accumulators + 2 weight vectors
template <class One, class Rows>
static void split_rows(int64_t M, int64_t N, float* out, bool acc, One one, Rows rows) {
  if (M == 1) {
    at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const float v = one(n);
        out[n] = acc ? out[n] + v : v;
      }
    });
    return;
  }
  at::parallel_for(0, (N + 1) / 2, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n = 2 * t;
      const bool two = n + 1 < N;
      for (int64_t m0 = 0; m0 < M; m0 += 6) {
        switch (std::min<int64_t>(6, M - m0)) {
          case 6: rows(std::integral_constant<int, 6>{}, m0, n, two); break;
          case 5: rows(std::integral_constant<int, 5>{}, m0, n, two); break;
          case 4: rows(std::integral_constant<int, 4>{}, m0, n, two); break;
          case 3: rows(std::integral_constant<int, 3>{}, m0, n, two); break;
          case 2: rows(std::integral_constant<int, 2>{}, m0, n, two); break;
          default: rows(std::integral_constant<int, 1>{}, m0, n, two);
        }
      }
    }
  });
}

// x [M, K], w [N, K], out [M, N] (row stride ldo), all row-major; weight rows split over threads; scale: [N]
// per-row scales or nullptr
template <class W>
static void skinny(const float* x, int64_t M, int64_t K, const typename W::T* w, int64_t N, float* out, int64_t ldo,
                   bool acc, const float* scale) {
  split_rows(M, N, out, acc, [&](int64_t n) { return dot_one_row<W>(x, K, w + n * K) * (scale ? scale[n] : 1.f); },
             [&](auto mr, int64_t m0, int64_t n, bool two) {
               const typename W::T *w0 = w + n * K, *w1 = two ? w0 + K : w0;
               const float sc0 = scale ? scale[n] : 1.f, sc1 = scale && two ? scale[n + 1] : sc0;
               dot_rows<decltype(mr)::value, W>(x + m0 * K, K, w0, w1, out + m0 * ldo + n, ldo, two, acc, sc0, sc1);
             });
}

// --- bfloat16 weights with bfloat16 activations: x rounded to bfloat16 once per call ---------------------------
// A bfloat16 x bfloat16 product is exact in float32 (8-bit significands), so the activations' rounding is the only
// change from float32 activations. With AVX-512 BF16 each vdpbf16ps takes 16 (ymm) or 32 (zmm) bfloat16 weights
// (8 or 16 pairs) into float32 sums (denormals flushed), with no widening; elsewhere the widening kernel above runs
// on x's rounded values (the same products, other summation order).
static inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's float -> bfloat16 (NaN payloads aside)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays a quiet NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#if DAERT_AVX512BF16
#if DAERT_ZMM
typedef __m512 bacc;
typedef __m512i bvec;
constexpr int64_t BW = 32;  // bfloat16 values per vector
static inline bvec bload(const uint16_t* p) { return _mm512_loadu_si512(p); }
static inline bacc bdot(bacc a, bvec x, bvec w) { return _mm512_dpbf16_ps(a, (__m512bh)x, (__m512bh)w); }
static inline bacc bzero() { return _mm512_setzero_ps(); }
#else
typedef __m256 bacc;
typedef __m256i bvec;
constexpr int64_t BW = 16;
static inline bvec bload(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline bacc bdot(bacc a, bvec x, bvec w) { return _mm256_dpbf16_ps(a, (__m256bh)x, (__m256bh)w); }
static inline bacc bzero() { return _mm256_setzero_ps(); }
#endif
static inline float bsum(bacc a) {
  float v[BW / 2];
  std::memcpy(v, &a, sizeof v);
  float s = 0.f;
  for (int64_t i = 0; i < BW / 2; ++i) s += v[i];
  return s;
}

// K % BW == 0; one row of x (bf16) against one weight row, 4 vectors per iteration into four accumulators
static inline float bf16_one_row(const uint16_t* x, int64_t K, const uint16_t* w) {
  bacc a0 = bzero(), a1 = bzero(), a2 = bzero(), a3 = bzero();
  int64_t k = 0;
  for (; k + 4 * BW <= K; k += 4 * BW) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) prefetch_ahead<BF16>(w, k + j * BW);  // each cache line once
    a0 = bdot(a0, bload(x + k), bload(w + k));
    a1 = bdot(a1, bload(x + k + BW), bload(w + k + BW));
    a2 = bdot(a2, bload(x + k + 2 * BW), bload(w + k + 2 * BW));
    a3 = bdot(a3, bload(x + k + 3 * BW), bload(w + k + 3 * BW));
  }
  for (; k < K; k += BW) a0 = bdot(a0, bload(x + k), bload(w + k));
  return bsum(a0) + bsum(a1) + bsum(a2) + bsum(a3);
}

// MR rows of x (bf16) against weight rows w0 and w1 (w1 == w0: only o[0] is written), as dot_rows
template <int MR>
static inline void bf16_rows(const uint16_t* x, int64_t K, const uint16_t* w0, const uint16_t* w1, float* o,
                             int64_t ldo, bool two, bool acc) {
  bacc a[MR], b[MR];
  for (int m = 0; m < MR; ++m) a[m] = b[m] = bzero();
  for (int64_t k = 0; k < K; k += BW) {
    prefetch_ahead<BF16, ROWS_PREFETCH>(w0, k);
    prefetch_ahead<BF16, ROWS_PREFETCH>(w1, k);
    const bvec p = bload(w0 + k), q = bload(w1 + k);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const bvec xv = bload(x + m * K + k);
      a[m] = bdot(a[m], xv, p);
      b[m] = bdot(b[m], xv, q);
    }
  }
  for (int m = 0; m < MR; ++m) {
    float* om = o + m * ldo;
    const float s0 = bsum(a[m]), s1 = bsum(b[m]);
    om[0] = acc ? om[0] + s0 : s0;
    if (two) om[1] = acc ? om[1] + s1 : s1;
  }
}
#endif

static void skinny_bf16_act(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* out,
                            int64_t ldo, bool acc) {
  std::vector<uint16_t> xb(M * K);
  for (int64_t i = 0; i < M * K; ++i) xb[i] = to_bf16(x[i]);
#if DAERT_AVX512BF16
  if (K % BW == 0) {
    const uint16_t* xp = xb.data();
    split_rows(M, N, out, acc, [&](int64_t n) { return bf16_one_row(xp, K, w + n * K); },
               [&](auto mr, int64_t m0, int64_t n, bool two) {
                 const uint16_t *w0 = w + n * K, *w1 = two ? w0 + K : w0;
                 bf16_rows<decltype(mr)::value>(xp + m0 * K, K, w0, w1, out + m0 * ldo + n, ldo, two, acc);
               });
    return;
  }
#endif
  std::vector<float> xr(M * K);
  for (int64_t i = 0; i < M * K; ++i) xr[i] = BF16::one(&xb[i]);
  skinny<BF16>(xr.data(), M, K, w, N, out, ldo, acc, nullptr);
}

// --- 4-bit weights in blocks of 32 along K (GGUF's Q4_1 block, with float32 scale and minimum) ------------
// w [N, K/32 * 24] uint8, 24 bytes a block: float32 d, float32 m, then 16 bytes of nibbles, byte j holding
// element 32b + j (low nibble) and 32b + 16 + j (high); w = d * q + m. Scales and nibbles interleaved keep each
// row one sequential stream. A block's dot product with x is
// d * sum_j x_j q_j + m * sum_j x_j; the block sums of x are computed once per call, for all N rows.
constexpr int64_t Q4_BLOCK = 32, Q4_BYTES = 24;

static inline int64_t cols(const Tensor& w) {
  return w.scalar_type() == at::kByte ? w.size(1) / Q4_BYTES * Q4_BLOCK : w.size(1);
}
static inline float q4_scale(const uint8_t* block, int j) {  // j = 0: d, 1: m
  float v;
  std::memcpy(&v, block + 4 * j, 4);
  return v;
}

// the 32 values q of one block's nibbles as float32, elements 0 .. 31 in 32 / VW vectors
constexpr int Q4_VECS = Q4_BLOCK / VW;
static inline void q4_unpack(const uint8_t* p, vf (&f)[Q4_VECS]) {
#if DAERT_ZMM
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), mask = _mm_set1_epi8(0x0F);
  f[0] = (vf)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, mask)));
  f[1] = (vf)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), mask)));
#elif defined(__AVX2__)
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  f[0] = (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  f[1] = (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  f[2] = (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  f[3] = (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
#else
  for (int j = 0; j < 16; ++j) {
    f[j / VW][j % VW] = static_cast<float>(p[j] & 0x0F);
    f[(16 + j) / VW][(16 + j) % VW] = static_cast<float>(p[j] >> 4);
  }
#endif
}

// MR rows of x against one weight row; xs: the rows' block sums [MR][nb] (row stride nb)
template <int MR>
static inline void q4_rows(const float* x, int64_t K, const uint8_t* w, const float* xs, float* o, int64_t ldo,
                           bool acc) {
  const int64_t nb = K / Q4_BLOCK;
  vf a[MR];
  float mins[MR];
  for (int m = 0; m < MR; ++m) a[m] = vf{}, mins[m] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * Q4_BYTES;
    if constexpr (PREFETCH_BYTES > 0) __builtin_prefetch(blk + PREFETCH_BYTES);
    vf f[Q4_VECS];
    q4_unpack(blk + 8, f);
    const float d = q4_scale(blk, 0), mn = q4_scale(blk, 1);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const float* xb = x + m * K + b * Q4_BLOCK;
      vf v = *(const vfu*)xb * f[0];
#pragma GCC unroll 4
      for (int j = 1; j < Q4_VECS; ++j) v += *(const vfu*)(xb + j * VW) * f[j];
      a[m] += d * v;
      mins[m] += mn * xs[m * nb + b];
    }
  }
  for (int m = 0; m < MR; ++m) {
    const float s = hsum(a[m]) + mins[m];
    o[m * ldo] = acc ? o[m * ldo] + s : s;
  }
}

static void skinny_q4(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, float* out,
                      int64_t ldo, bool acc) {
  const int64_t nb = K / Q4_BLOCK;
  std::vector<float> xs(M * nb);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      float s = 0.f;
      for (int64_t j = 0; j < Q4_BLOCK; ++j) s += x[m * K + b * Q4_BLOCK + j];
      xs[m * nb + b] = s;
    }
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const uint8_t* wn = w + n * nb * Q4_BYTES;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const float* xr = x + m0 * K;
        const float* xsr = xs.data() + m0 * nb;
        float* o = out + m0 * ldo + n;
        switch (std::min<int64_t>(4, M - m0)) {
          case 4: q4_rows<4>(xr, K, wn, xsr, o, ldo, acc); break;
          case 3: q4_rows<3>(xr, K, wn, xsr, o, ldo, acc); break;
          case 2: q4_rows<2>(xr, K, wn, xsr, o, ldo, acc); break;
          default: q4_rows<1>(xr, K, wn, xsr, o, ldo, acc);
        }
      }
    }
  });
}

// --- int8 activations against int8 or 4-bit weights: integer dot products per block of 32 ---------------------
// The rows of x are quantized per block of 32 as llama.cpp's Q8_0 / Q8_1 activations: dx = absmax / 127,
// qx = round(x / dx) in -127..127. A block's dot product is then exact in int32 and scaled once in float32:
//   int8 weights (one scale sw per row):  sw * sum_b dx_b * sum_j qx_j qw_j
//   4-bit Q4_1 blocks (w = d q + m):      sum_b d_b dx_b * sum_j qx_j q_j + m_b * sum_j x_j
// (the minimum's term takes the block sum of x itself, in float32, so only the q part sees the rounding of x).
// With AVX2 a block takes one vpmaddubsw (unsigned x signed bytes to int16 pairs) and one vpmaddwd (to int32);
// int8 weights go through it as |w| and sign(w) * qx. No int16 pair can saturate: 2 * 127 * 127 < 2^15.
constexpr int64_t Q8_BLOCK = 32;

struct Q8Rows {  // x quantized: q [M, K], dx and the float32 sum of x per block [M, K / 32]
  std::vector<int8_t> q;
  std::vector<float> d, s;
  int64_t K = 0, nb = 0;
};

static void quantize_rows_q8(const float* x, int64_t M, int64_t K, Q8Rows& a) {
  a.K = K, a.nb = K / Q8_BLOCK;
  a.q.resize(M * K), a.d.resize(M * a.nb), a.s.resize(M * a.nb);
  for (int64_t r = 0; r < M * a.nb; ++r) {
    const float* xb = x + r * Q8_BLOCK;
    float amax = 0.f, sum = 0.f;
    for (int64_t j = 0; j < Q8_BLOCK; ++j) amax = std::max(amax, std::fabs(xb[j])), sum += xb[j];
    const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    int8_t* qb = a.q.data() + r * Q8_BLOCK;
    for (int64_t j = 0; j < Q8_BLOCK; ++j)
      qb[j] = static_cast<int8_t>(std::nearbyint(xb[j] * id));  // round half to even, as torch.round
    a.d[r] = d, a.s[r] = sum;
  }
}

#if defined(__AVX2__)
typedef __m256i wbytes;  // one block of weights as 32 bytes in element order: |w| (int8) or q (4-bit)
static inline wbytes q8_weights(const int8_t* w) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)); }
static inline wbytes q4_weights(const uint8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
}
// sum_j w_j x_j of one block, as 8 int32 partial sums widened to float32; signed: w holds int8 weights
template <bool SIGNED>
static inline v8 block_dot(wbytes w, const int8_t* x) {
  __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), wu = w;
  if (SIGNED) xv = _mm256_sign_epi8(xv, w), wu = _mm256_sign_epi8(w, w);
#if DAERT_VNNI
  // one vpdpbusd: each int32 lane sums the same four byte products as vpmaddubsw + vpmaddwd (bitwise equal)
  return (v8)_mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), wu, xv));
#else
  const __m256i pairs = _mm256_maddubs_epi16(wu, xv);
  return (v8)_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}
#else
struct wbytes { int16_t v[32]; };
static inline wbytes q8_weights(const int8_t* w) { wbytes b; for (int j = 0; j < 32; ++j) b.v[j] = w[j]; return b; }
static inline wbytes q4_weights(const uint8_t* p) {
  wbytes b;
  for (int j = 0; j < 16; ++j) b.v[j] = p[j] & 0x0F, b.v[16 + j] = p[j] >> 4;
  return b;
}
template <bool SIGNED>
static inline v8 block_dot(const wbytes& w, const int8_t* x) {
  int32_t s = 0;
  for (int j = 0; j < 32; ++j) s += static_cast<int32_t>(w.v[j]) * x[j];
  v8 r = v8{};
  r[0] = static_cast<float>(s);
  return r;
}
#endif

// MR quantized rows of x against one weight row (int8: w [K], sw its scale; q4: w the row's 24-byte blocks, sw
// 1); two accumulators per row alternate blocks (the float adds would chain otherwise)
template <bool Q4, int MR>
static inline void q8_rows(const Q8Rows& a, int64_t r0, const void* wrow, float sw, float* o, int64_t ldo,
                           bool acc) {
  const int64_t nb = a.nb, K = a.K;
  v8 s[MR][2];
  float mins[MR];
  for (int m = 0; m < MR; ++m) s[m][0] = s[m][1] = v8{}, mins[m] = 0.f;
  const int8_t* xq = a.q.data() + r0 * K;
  const float *xd = a.d.data() + r0 * nb, *xs = a.s.data() + r0 * nb;
  for (int64_t b = 0; b < nb; ++b) {
    wbytes w;
    float d = 1.f, mn = 0.f;
    if constexpr (Q4) {
      const uint8_t* blk = static_cast<const uint8_t*>(wrow) + b * Q4_BYTES;
      if constexpr (PREFETCH_BYTES > 0) __builtin_prefetch(blk + PREFETCH_BYTES);
      d = q4_scale(blk, 0), mn = q4_scale(blk, 1);
      w = q4_weights(blk + 8);
    } else {
      const int8_t* wp = static_cast<const int8_t*>(wrow) + b * Q8_BLOCK;
      if (PREFETCH_BYTES > 0 && b % 2 == 0) __builtin_prefetch(wp + PREFETCH_BYTES);
      w = q8_weights(wp);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const v8 f = block_dot<!Q4>(w, xq + m * K + b * Q8_BLOCK);
      s[m][b & 1] += f * (d * xd[m * nb + b]);
      if constexpr (Q4) mins[m] += mn * xs[m * nb + b];
    }
  }
  for (int m = 0; m < MR; ++m) {
    const float v = (hsum(s[m][0]) + hsum(s[m][1])) * sw + mins[m];
    o[m * ldo] = acc ? o[m * ldo] + v : v;
  }
}

// x [M, K] against int8 (scale [N]) or 4-bit (24-byte blocks) weights w, x quantized to Q8 blocks first
template <bool Q4>
static void skinny_q8(const float* x, int64_t M, int64_t K, const void* w, const float* scale, int64_t N,
                      float* out, int64_t ldo, bool acc) {
  Q8Rows a;
  quantize_rows_q8(x, M, K, a);
  const int64_t row_bytes = Q4 ? K / Q4_BLOCK * Q4_BYTES : K;
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const void* wn = static_cast<const uint8_t*>(w) + n * row_bytes;
      const float sw = Q4 ? 1.f : scale[n];
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        float* o = out + m0 * ldo + n;
        switch (std::min<int64_t>(4, M - m0)) {
          case 4: q8_rows<Q4, 4>(a, m0, wn, sw, o, ldo, acc); break;
          case 3: q8_rows<Q4, 3>(a, m0, wn, sw, o, ldo, acc); break;
          case 2: q8_rows<Q4, 2>(a, m0, wn, sw, o, ldo, acc); break;
          default: q8_rows<Q4, 1>(a, m0, wn, sw, o, ldo, acc);
        }
      }
    }
  });
}

static inline bool low_act_ok(const Tensor& w) {
  const auto t = w.scalar_type();
  return t == at::kChar || t == at::kByte || t == at::kBFloat16;
}

// out (+)= x @ w.T (times the row scales of an int8 w): the skinny kernel for up to SKINNY_MAX_ROWS rows in any
// format, ATen beyond (float32 weights only)
// low_act: low-precision activations, by weight format: int8 / 4-bit weights take the x rows quantized to Q8
// blocks (integer dot products, above), bfloat16 weights take them rounded to bfloat16; other formats refuse it
static void linear_into(const Tensor& x, const Tensor& w, Tensor& out, bool acc, const Tensor* scale = nullptr,
                        bool low_act = false) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ldo = out.size(1);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool scaled = scale != nullptr && scale->numel() > 0;
  const float* sp = scaled ? scale->data_ptr<float>() : nullptr;
  TORCH_CHECK(!low_act || low_act_ok(w), "low-precision activations need int8, 4-bit or bfloat16 weights");
  switch (w.scalar_type()) {
    case at::kFloat:
      if (M <= SKINNY_MAX_ROWS) {
        skinny<F32>(xp, M, K, w.data_ptr<float>(), N, op, ldo, acc, nullptr);
      } else if (acc) {
        out.addmm_(x, w.t());
      } else {
        at::mm_out(out, x, w.t());
      }
      return;
    case at::kBFloat16:
      TORCH_CHECK(M <= SKINNY_MAX_ROWS, "bfloat16 weights take at most ", SKINNY_MAX_ROWS, " rows");
      if (low_act) {
        skinny_bf16_act(xp, M, K, reinterpret_cast<const uint16_t*>(w.data_ptr()), N, op, ldo, acc);
        return;
      }
      skinny<BF16>(xp, M, K, reinterpret_cast<const uint16_t*>(w.data_ptr()), N, op, ldo, acc, nullptr);
      return;
    case at::kHalf:
      TORCH_CHECK(M <= SKINNY_MAX_ROWS, "float16 weights take at most ", SKINNY_MAX_ROWS, " rows");
      skinny<F16>(xp, M, K, reinterpret_cast<const uint16_t*>(w.data_ptr()), N, op, ldo, acc, nullptr);
      return;
    case at::kChar:
      TORCH_CHECK(M <= SKINNY_MAX_ROWS, "int8 weights take at most ", SKINNY_MAX_ROWS, " rows");
      TORCH_CHECK(scaled && scale->numel() == N && scale->scalar_type() == at::kFloat,
                  "int8 weights need one float32 scale per output row");
      if (low_act) {
        TORCH_CHECK(K % Q8_BLOCK == 0, "int8 activations: K must be a multiple of ", Q8_BLOCK, ", got ", K);
        skinny_q8<false>(xp, M, K, w.data_ptr<int8_t>(), sp, N, op, ldo, acc);
      } else {
        skinny<I8>(xp, M, K, w.data_ptr<int8_t>(), N, op, ldo, acc, sp);
      }
      return;
    case at::kByte:
      TORCH_CHECK(M <= SKINNY_MAX_ROWS, "4-bit weights take at most ", SKINNY_MAX_ROWS, " rows");
      TORCH_CHECK(w.size(1) % Q4_BYTES == 0 && cols(w) == K, "4-bit weights: w [N, K/32 * ", Q4_BYTES,
                  "] bytes of (d, m, nibbles) blocks");
      TORCH_CHECK(!scaled, "4-bit weights carry their scales in their blocks");
      if (low_act) {
        skinny_q8<true>(xp, M, K, w.data_ptr<uint8_t>(), nullptr, N, op, ldo, acc);
      } else {
        skinny_q4(xp, M, K, w.data_ptr<uint8_t>(), N, op, ldo, acc);
      }
      return;
    default:
      TORCH_CHECK(false, "weights must be float32, bfloat16, float16, int8 or 4-bit (uint8), got ", w.scalar_type());
  }
}

Tensor skinny_linear(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& scale, bool low_act) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.scalar_type() == at::kFloat,
              "skinny_linear: x [M, K] (float32) and w [N, K] must be matrices");
  TORCH_CHECK(w.scalar_type() != at::kByte || w.size(1) % Q4_BYTES == 0,
              "skinny_linear: 4-bit weights are rows of 24-byte blocks (workbench.engine.weights.kernel_args)");
  TORCH_CHECK(x.size(1) == cols(w), "skinny_linear: x has ", x.size(1), " columns, w has ", cols(w));
  TORCH_CHECK(w.is_contiguous(), "skinny_linear: w must be contiguous");
  TORCH_CHECK(w.scalar_type() == at::kFloat || x.size(0) <= SKINNY_MAX_ROWS,
              "skinny_linear: low-precision weights take at most ", SKINNY_MAX_ROWS, " rows");
  TORCH_CHECK(!low_act || low_act_ok(w),
              "skinny_linear: low-precision activations need int8, 4-bit (q8) or bfloat16 (bf16) weights");
  const Tensor xc = x.contiguous();
  Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  Tensor sc = scale.has_value() ? scale->contiguous() : Tensor();
  linear_into(xc, w, out, false, scale.has_value() ? &sc : nullptr, low_act);
  return out;
}

static void rms_rows(const float* x, const float* w, float* out, int64_t B, int64_t d, float eps) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * d;
    float* o = out + b * d;
    const float r = 1.f / std::sqrt(dot(xr, xr, d) / static_cast<float>(d) + eps);
    for (int64_t j = 0; j < d; ++j) o[j] = w[j] * (xr[j] * r);
  }
}

// --- LoRA terms: out[r, col0 + n] += sum_j (a[s, j] . x[r]) * bt[s, j, n], s = the slot of row r's request ----
// Pools per (layer, kind): a [S, r_max, K], bt [S, r_max, N] (scaling folded in), rank [S] int32; an empty
// tensor: no adapter in the batch adapts that module. kind: 0..6 = q, k, v, o, gate, up, down.
constexpr int LORA_KINDS = 7;

struct Lora {
  const int64_t* idx;  // [B]: slot per batch row, -1 for none
  int64_t T;           // tokens per row (flattened row r belongs to batch row r / T)
  const std::vector<Tensor>* a;
  const std::vector<Tensor>* bt;
  const std::vector<Tensor>* rank;
};

static void check_lora(const Lora& L, size_t layers, int64_t B) {
  TORCH_CHECK(L.a->size() == layers * LORA_KINDS && L.bt->size() == L.a->size() && L.rank->size() == L.a->size(),
              "decode_layers_ex: one a / bt / rank entry per layer and kind (", layers * LORA_KINDS, ")");
  for (size_t e = 0; e < L.a->size(); ++e) {
    const Tensor &a = (*L.a)[e], &bt = (*L.bt)[e], &rk = (*L.rank)[e];
    if (a.numel() == 0) continue;
    TORCH_CHECK(a.dim() == 3 && bt.dim() == 3 && a.size(0) == bt.size(0) && a.size(1) == bt.size(1) &&
                    a.is_contiguous() && bt.is_contiguous() && a.scalar_type() == at::kFloat &&
                    bt.scalar_type() == at::kFloat && rk.scalar_type() == at::kInt && rk.numel() == a.size(0),
                "decode_layers_ex: pool ", e, " must be float32 a [S, r, K], bt [S, r, N] and int32 rank [S]");
    TORCH_CHECK(a.is_cpu() && bt.is_cpu() && rk.is_cpu() && rk.is_contiguous(),
                "decode_layers_ex: pool ", e, " must be contiguous CPU tensors");
    const int32_t* r = rk.data_ptr<int32_t>();
    for (int64_t s = 0; s < rk.numel(); ++s)
      TORCH_CHECK(r[s] >= 0 && r[s] <= a.size(1), "decode_layers_ex: pool ", e, " slot ", s, " has rank ", r[s],
                  " outside [0, ", a.size(1), "]");
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(L.idx[b] < a.size(0), "decode_layers_ex: slot ", L.idx[b], " outside pool ", e);
  }
}

static void lora_add(const Lora* L, size_t layer, int kind, const float* x, int64_t K, int64_t R, float* out,
                     int64_t ldo, int64_t col0) {
  if (L == nullptr) return;
  const size_t e = layer * LORA_KINDS + kind;
  const Tensor &A = (*L->a)[e], &Bt = (*L->bt)[e];
  if (A.numel() == 0) return;
  TORCH_CHECK(A.size(2) == K && col0 + Bt.size(2) <= ldo, "decode_layers_ex: pool ", e, " has the wrong shape");
  const int64_t rmax = A.size(1), N = Bt.size(2);
  const float *ap = A.data_ptr<float>(), *bp = Bt.data_ptr<float>();
  const int32_t* rk = (*L->rank)[e].data_ptr<int32_t>();
  at::parallel_for(0, R, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> y(rmax);
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t s = L->idx[r / L->T];
      if (s < 0 || rk[s] == 0) continue;
      const int64_t rank = rk[s];
      const float *as = ap + s * rmax * K, *xs = x + r * K, *bs = bp + s * rmax * N;
      for (int64_t j = 0; j < rank; ++j) y[j] = dot(xs, as + j * K, K);  // shrink
      float* o = out + r * ldo + col0;
      for (int64_t j = 0; j < rank; ++j) {  // expand, one B row at a time (o stays in L1)
        const float yj = y[j];
        const float* bj = bs + j * N;
        for (int64_t n = 0; n < N; ++n) o[n] += yj * bj[n];
      }
    }
  });
}

static Tensor decode_impl(const Tensor& h_in, const std::vector<Tensor>& norm1, const std::vector<Tensor>& wqkv,
                          const std::vector<Tensor>& wo, const std::vector<Tensor>& norm2,
                          const std::vector<Tensor>& wgu, const std::vector<Tensor>& wdown, const Tensor& cache_k,
                          const Tensor& cache_v, const Tensor& cos_in, const Tensor& sin_in, const Tensor& mask_in,
                          int64_t start, int64_t H, int64_t KV, int64_t D, double eps_d, const Lora* lora,
                          const std::vector<Tensor>* scales, bool low_act) {
  TORCH_CHECK(h_in.dim() == 3 && h_in.scalar_type() == at::kFloat,
              "decode_layers: h must be a float32 [B, T, d] tensor");
  check_lists(norm1, wqkv, wo, norm2, wgu, wdown, cache_k, cache_v);
  const int64_t B = h_in.size(0), T = h_in.size(1), d = h_in.size(2), R = B * T;
  const int64_t end = start + T, half = D / 2, L = cache_k.size(3);
  TORCH_CHECK(H % KV == 0 && D % 2 == 0, "heads must be a multiple of kv_heads and head_dim even");
  TORCH_CHECK(end <= L, "KV cache overflow");
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous() && cache_k.scalar_type() == at::kFloat &&
                  cache_v.scalar_type() == at::kFloat && cache_k.size(1) == B && cache_k.size(2) == KV &&
                  cache_k.size(4) == D && cache_v.sizes() == cache_k.sizes(),
              "decode_layers: the KV cache must be contiguous float32 [layers, B, kv_heads, max_len, head_dim]");
  TORCH_CHECK(cos_in.numel() == R * D && sin_in.numel() == R * D, "decode_layers: cos/sin must hold B * T * head_dim");
  TORCH_CHECK(mask_in.numel() == B * end || mask_in.numel() == R * end,
              "decode_layers: the attention mask must hold B * (cached + T) or B * T * (cached + T) entries");
  for (size_t i = 0; i < norm1.size(); ++i)
    TORCH_CHECK(norm1[i].is_contiguous() && norm2[i].is_contiguous() && norm1[i].numel() == d &&
                    norm2[i].numel() == d && wqkv[i].size(0) == (H + 2 * KV) * D && cols(wqkv[i]) == d &&
                    wqkv[i].is_contiguous() && wo[i].is_contiguous() && wgu[i].is_contiguous() &&
                    wdown[i].is_contiguous() && wo[i].size(0) == d && cols(wo[i]) == H * D && wdown[i].size(0) == d &&
                    cols(wgu[i]) == d && cols(wdown[i]) * 2 == wgu[i].size(0),
                "decode_layers: layer ", i, " has unexpected or non-contiguous weights");
  const bool low = wqkv[0].scalar_type() != at::kFloat;
  TORCH_CHECK(!low || R <= SKINNY_MAX_ROWS, "decode_layers: low-precision weights take at most ", SKINNY_MAX_ROWS,
              " rows in all (B * T)");
  TORCH_CHECK(scales == nullptr || scales->empty() || scales->size() == 4 * norm1.size(),
              "decode_layers: one scale entry per layer and matrix (qkv, o, gate/up, down), or none");
  const bool scaled = scales != nullptr && !scales->empty();
  auto sc = [&](size_t i, int j) -> const Tensor* { return scaled ? &(*scales)[4 * i + j] : nullptr; };
  const float eps = static_cast<float>(eps_d), scale = 1.f / std::sqrt(static_cast<float>(D));
  const Tensor cos = cos_in.reshape({R, D}).contiguous(), sin = sin_in.reshape({R, D}).contiguous();
  // mask[b, t, key]: a key mask shared by the row's queries is expanded
  const Tensor mask = mask_in.reshape({B, -1, end}).expand({B, T, end}).to(at::kBool).contiguous();
  const auto opts = h_in.options();
  Tensor h = h_in.reshape({R, d}).clone();  // the residual stream, updated in place
  Tensor xn = at::empty({R, d}, opts), qkv = at::empty({R, (H + 2 * KV) * D}, opts);
  Tensor q = at::empty({R, H, D}, opts), att = at::empty({R, H * D}, opts);
  const int64_t I = wgu[0].size(0) / 2;
  Tensor gu = at::empty({R, 2 * I}, opts), act = at::empty({R, I}, opts);
  const float *cs = cos.data_ptr<float>(), *sn = sin.data_ptr<float>();
  const bool* ok = mask.data_ptr<bool>();
  float *hp = h.data_ptr<float>(), *xp = xn.data_ptr<float>(), *qkvp = qkv.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *attp = att.data_ptr<float>(), *gup = gu.data_ptr<float>();
  float* actp = act.data_ptr<float>();
  const int64_t group = H / KV, row = (H + 2 * KV) * D, layer_stride = B * KV * L * D;
  // attention work per (query, head) ~ end * D: split over threads only when it pays
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, end * D));
  constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < norm1.size(); ++i) {
    float* ck = cache_k.data_ptr<float>() + i * layer_stride;
    float* cv = cache_v.data_ptr<float>() + i * layer_stride;
    rms_rows(hp, norm1[i].data_ptr<float>(), xp, R, d, eps);
    linear_into(xn, wqkv[i], qkv, false, sc(i, 0), low_act);
    lora_add(lora, i, 0, xp, d, R, qkvp, row, 0);
    lora_add(lora, i, 1, xp, d, R, qkvp, row, H * D);
    lora_add(lora, i, 2, xp, d, R, qkvp, row, (H + KV) * D);
    // RoPE (rotate-half form with a sign-folded sin) on q and k; k and v go into cache slot start + t
    for (int64_t r = 0; r < R; ++r) {
      const int64_t b = r / T, slot = start + r % T;
      const float* src = qkvp + r * row;
      const float *c = cs + r * D, *s = sn + r * D;
      for (int64_t j = 0; j < H + KV; ++j) {
        const float* x = src + j * D;
        float* dst = j < H ? qp + (r * H + j) * D : ck + ((b * KV + (j - H)) * L + slot) * D;
        for (int64_t e = 0; e < D; ++e) dst[e] = x[e] * c[e] + x[(e + half) % D] * s[e];
      }
      for (int64_t g = 0; g < KV; ++g) {
        const float* x = src + (H + KV + g) * D;
        float* dst = cv + ((b * KV + g) * L + slot) * D;
        for (int64_t e = 0; e < D; ++e) dst[e] = x[e];
      }
    }
    // softmax(q k^T * scale over the allowed keys) v, per (query, head); grouped-query heads share a kv head
    at::parallel_for(0, R * H, grain, [&](int64_t lo, int64_t hi) {
      std::vector<float> p(end);
      for (int64_t rh = lo; rh < hi; ++rh) {
        const int64_t r = rh / H, j = rh % H, b = r / T, g = j / group;
        const float* qv = qp + rh * D;
        const float* keys = ck + (b * KV + g) * L * D;
        const float* vals = cv + (b * KV + g) * L * D;
        const bool* okr = ok + r * end;
        float mx = NEG_INF;
        for (int64_t t = 0; t < end; ++t) {
          p[t] = okr[t] ? dot(qv, keys + t * D, D) * scale : NEG_INF;
          mx = std::max(mx, p[t]);
        }
        float* o = attp + rh * D;
        for (int64_t e = 0; e < D; ++e) o[e] = 0.f;
        if (mx == NEG_INF) continue;  // no allowed key: zeros
        float total = 0.f;
        for (int64_t t = 0; t < end; ++t) {
          p[t] = okr[t] ? std::exp(p[t] - mx) : 0.f;
          total += p[t];
        }
        const float inv = 1.f / total;
        for (int64_t t = 0; t < end; ++t) {
          if (p[t] == 0.f) continue;
          const float w = p[t] * inv;
          const float* v = vals + t * D;
          for (int64_t e = 0; e < D; ++e) o[e] += w * v[e];
        }
      }
    });
    linear_into(att, wo[i], h, true, sc(i, 1), low_act);  // h += attn @ Wo.T
    lora_add(lora, i, 3, attp, H * D, R, hp, d, 0);
    rms_rows(hp, norm2[i].data_ptr<float>(), xp, R, d, eps);
    linear_into(xn, wgu[i], gu, false, sc(i, 2), low_act);
    lora_add(lora, i, 4, xp, d, R, gup, 2 * I, 0);
    lora_add(lora, i, 5, xp, d, R, gup, 2 * I, I);
    for (int64_t r = 0; r < R; ++r) {
      const float *g = gup + r * 2 * I, *u = g + I;
      float* a = actp + r * I;
      for (int64_t e = 0; e < I; ++e) a[e] = g[e] / (1.f + std::exp(-g[e])) * u[e];
    }
    linear_into(act, wdown[i], h, true, sc(i, 3), low_act);  // h += silu(gate) * up @ Wdown.T
    lora_add(lora, i, 6, actp, I, R, hp, d, 0);
  }
  return h.view({B, T, d});
}

Tensor decode_layers(const Tensor& h_in, const std::vector<Tensor>& norm1, const std::vector<Tensor>& wqkv,
                     const std::vector<Tensor>& wo, const std::vector<Tensor>& norm2,
                     const std::vector<Tensor>& wgu, const std::vector<Tensor>& wdown, const Tensor& cache_k,
                     const Tensor& cache_v, const Tensor& cos_in, const Tensor& sin_in, const Tensor& mask_in,
                     int64_t start, int64_t H, int64_t KV, int64_t D, double eps) {
  return decode_impl(h_in, norm1, wqkv, wo, norm2, wgu, wdown, cache_k, cache_v, cos_in, sin_in, mask_in, start, H,
                     KV, D, eps, nullptr, nullptr, false);
}

// decode_layers with weights in any skinny format (scales: int8 row scales, 4 per layer,
// or empty), per-row LoRA terms (lora_idx undefined or empty lists: none) and, for int8 / 4-bit weights, the
// matmul inputs in low precision (low_act: Q8 blocks for int8 / 4-bit weights, bfloat16 for bfloat16 weights)
Tensor decode_layers_ex(const Tensor& h_in, const std::vector<Tensor>& norm1, const std::vector<Tensor>& wqkv,
                        const std::vector<Tensor>& wo, const std::vector<Tensor>& norm2,
                        const std::vector<Tensor>& wgu, const std::vector<Tensor>& wdown, const Tensor& cache_k,
                        const Tensor& cache_v, const Tensor& cos_in, const Tensor& sin_in, const Tensor& mask_in,
                        int64_t start, int64_t H, int64_t KV, int64_t D, double eps,
                        const std::vector<Tensor>& scales, const c10::optional<Tensor>& lora_idx,
                        const std::vector<Tensor>& lora_a, const std::vector<Tensor>& lora_bt,
                        const std::vector<Tensor>& lora_rank, bool low_act) {
  TORCH_CHECK(h_in.dim() == 3, "decode_layers_ex: h must be [B, T, d]");
  TORCH_CHECK(!low_act || wqkv.empty() || low_act_ok(wqkv[0]),
              "decode_layers_ex: low-precision activations need int8, 4-bit (q8) or bfloat16 (bf16) weights");
  if (!lora_idx.has_value() || lora_a.empty())
    return decode_impl(h_in, norm1, wqkv, wo, norm2, wgu, wdown, cache_k, cache_v, cos_in, sin_in, mask_in, start,
                       H, KV, D, eps, nullptr, &scales, low_act);
  const Tensor& idx = *lora_idx;
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.is_contiguous() && idx.numel() == h_in.size(0),
              "decode_layers_ex: lora_idx must be a contiguous int64 tensor with one slot per batch row");
  const Lora lora{idx.data_ptr<int64_t>(), h_in.size(1), &lora_a, &lora_bt, &lora_rank};
  check_lora(lora, norm1.size(), h_in.size(0));
  return decode_impl(h_in, norm1, wqkv, wo, norm2, wgu, wdown, cache_k, cache_v, cos_in, sin_in, mask_in, start, H,
                     KV, D, eps, &lora, &scales, low_act);
}

// the instruction-set paths this build takes (the vector width of the float kernels; whether the q8 block dot
// products use VNNI, and whether bfloat16 activations use AVX-512 BF16 dot products)
py::dict isa() {
  py::dict d;
  d["vector_bits"] = VW * 32;
  d["avx512"] = static_cast<bool>(DAERT_AVX512);
  d["vnni"] = static_cast<bool>(DAERT_VNNI);
  d["avx512_bf16"] = static_cast<bool>(DAERT_AVX512BF16);
#if defined(__AVX2__)
  d["avx2"] = true;
#else
  d["avx2"] = false;
#endif
  return d;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &isa, "the instruction-set paths of this build");
  m.def("layers_forward", &layers_forward, "packed Llama decoder layers (ATen ops, bitwise equal to Python)");
  m.def("decode_layers", &decode_layers, "packed Llama decoder layers for a few new tokens per row (fused loops)");
  m.def("decode_layers_ex", &decode_layers_ex,
        "decode_layers with low-precision weights, per-row LoRA terms from adapter pools, low-precision activations");
  m.def("skinny_linear", &skinny_linear, "x @ w.T for a few rows of x, each weight row read once",
        py::arg("x"), py::arg("w"), py::arg("scale") = py::none(), py::arg("low_act") = false);
}
