// The packed-llama decoder layers in C++: the same ATen ops, in the same order, as
// PackedLlamaBackend's Python loop (so results are bitwise equal), without Python's per-op overhead.
// Bias-free Llama layers only; the Python loop covers the rest.
#include <torch/extension.h>

#include <cmath>
#include <vector>

using torch::Tensor;

static Tensor rms(const Tensor& x, const Tensor& w, double eps) {
  // LlamaRMSNorm in fp32: w * (x * rsqrt(mean(x^2) + eps))
  return w * (x * at::rsqrt(x.pow(2).mean({-1}, true).add_(eps)));
}

Tensor layers_forward(Tensor h, const std::vector<Tensor>& norm1, const std::vector<Tensor>& wqkv,
                      const std::vector<Tensor>& wo, const std::vector<Tensor>& norm2,
                      const std::vector<Tensor>& wgu, const std::vector<Tensor>& wdown, const Tensor& cache_k,
                      const Tensor& cache_v, const Tensor& cos, const Tensor& sin, const Tensor& attn_mask,
                      int64_t start, int64_t H, int64_t KV, int64_t D, double eps) {
  TORCH_CHECK(h.dim() == 3 && h.scalar_type() == at::kFloat, "h must be a float32 [B, T, d] tensor");
  const auto n = norm1.size();
  TORCH_CHECK(wqkv.size() == n && wo.size() == n && norm2.size() == n && wgu.size() == n && wdown.size() == n,
              "one tensor per layer in every weight list");
  TORCH_CHECK(cache_k.size(0) == static_cast<int64_t>(n) && cache_v.size(0) == static_cast<int64_t>(n),
              "cache has the wrong number of layers");
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("layers_forward", &layers_forward, "packed Llama decoder layers"); }
