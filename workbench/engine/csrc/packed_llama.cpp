// The packed-llama decoder layers in C++ (bias-free Llama layers, float32; the Python loop covers the rest).
//
// layers_forward: any number of new tokens. The same ATen ops, in the same order, as PackedLlamaBackend's
//   Python loop, so results are bitwise equal, without Python's per-op overhead.
// decode_layers: a few new tokens per row (decode steps, speculative verification). Only the four weight
//   matmuls go through ATen (into preallocated buffers; the two residual adds are folded into addmm_);
//   RMSNorm, RoPE, the KV-cache write, attention over the cached keys and SiLU*up are plain loops. Same
//   math, other summation order: equal to the Python loop within float rounding (tested), not bitwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

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
    Tensor qkv = at::matmul(rms(h, norm1[i], eps), wqkv[i]);
    Tensor qk = qkv.narrow(-1, 0, (H + KV) * D).view({B, T, H + KV, D}).transpose(1, 2);
    qk = qk * cos + qk.roll({half}, {-1}) * sin;
    Tensor ck = cache_k.select(0, i), cv = cache_v.select(0, i);
    ck.narrow(2, start, T).copy_(qk.narrow(1, H, KV));
    cv.narrow(2, start, T).copy_(qkv.narrow(-1, (H + KV) * D, KV * D).view({B, T, KV, D}).transpose(1, 2));
    Tensor o = at::scaled_dot_product_attention(qk.narrow(1, 0, H), ck.narrow(2, 0, end), cv.narrow(2, 0, end),
                                                attn_mask, 0.0, false, scale, H != KV);
    h = h + at::matmul(o.transpose(1, 2).reshape({B, T, H * D}), wo[i]);
    Tensor gu = at::matmul(rms(h, norm2[i], eps), wgu[i]);
    const int64_t m = gu.size(-1) / 2;
    h = h + at::matmul(at::silu(gu.narrow(-1, 0, m)) * gu.narrow(-1, m, m), wdown[i]);
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

static void rms_rows(const float* x, const float* w, float* out, int64_t B, int64_t d, float eps) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * d;
    float* o = out + b * d;
    const float r = 1.f / std::sqrt(dot(xr, xr, d) / static_cast<float>(d) + eps);
    for (int64_t j = 0; j < d; ++j) o[j] = w[j] * (xr[j] * r);
  }
}

Tensor decode_layers(const Tensor& h_in, const std::vector<Tensor>& norm1, const std::vector<Tensor>& wqkv,
                     const std::vector<Tensor>& wo, const std::vector<Tensor>& norm2,
                     const std::vector<Tensor>& wgu, const std::vector<Tensor>& wdown, const Tensor& cache_k,
                     const Tensor& cache_v, const Tensor& cos_in, const Tensor& sin_in, const Tensor& mask_in,
                     int64_t start, int64_t H, int64_t KV, int64_t D, double eps_d) {
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
                    norm2[i].numel() == d && wqkv[i].size(1) == (H + 2 * KV) * D,
                "decode_layers: layer ", i, " has unexpected norm or qkv shapes");
  const float eps = static_cast<float>(eps_d), scale = 1.f / std::sqrt(static_cast<float>(D));
  const Tensor cos = cos_in.reshape({R, D}).contiguous(), sin = sin_in.reshape({R, D}).contiguous();
  // mask[b, t, key]: a key mask shared by the row's queries is expanded
  const Tensor mask = mask_in.reshape({B, -1, end}).expand({B, T, end}).to(at::kBool).contiguous();
  const auto opts = h_in.options();
  Tensor h = h_in.reshape({R, d}).clone();  // the residual stream, updated in place
  Tensor xn = at::empty({R, d}, opts), qkv = at::empty({R, (H + 2 * KV) * D}, opts);
  Tensor q = at::empty({R, H, D}, opts), att = at::empty({R, H * D}, opts);
  const int64_t I = wgu[0].size(1) / 2;
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
    at::mm_out(qkv, xn, wqkv[i]);
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
    h.addmm_(att, wo[i]);  // h += attn @ Wo
    rms_rows(hp, norm2[i].data_ptr<float>(), xp, R, d, eps);
    at::mm_out(gu, xn, wgu[i]);
    for (int64_t r = 0; r < R; ++r) {
      const float *g = gup + r * 2 * I, *u = g + I;
      float* a = actp + r * I;
      for (int64_t e = 0; e < I; ++e) a[e] = g[e] / (1.f + std::exp(-g[e])) * u[e];
    }
    h.addmm_(act, wdown[i]);  // h += silu(gate) * up @ Wdown
  }
  return h.view({B, T, d});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("layers_forward", &layers_forward, "packed Llama decoder layers (ATen ops, bitwise equal to Python)");
  m.def("decode_layers", &decode_layers, "packed Llama decoder layers for a few new tokens per row (fused loops)");
}
