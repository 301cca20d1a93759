// Tests of the forward pass (src/model/model.c, lora.c) with weights given in memory.
// Oracles: hand-derived cases, a naive double-precision forward written here (no BLAS, one
// sequence at a time, LoRA folded into the weights), and invariants (causality, packing, layer
// splits, GQA vs duplicated heads, zero B, folded adapters).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <gtest/gtest.h>

extern "C" {
#include "iteris/model.h"
}

namespace {

using Vec = std::vector<double>;

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 2654435761u + 12345) {}
  double uniform() {  // in [-1, 1)
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return ((s >> 11) * (1.0 / 9007199254740992.0)) * 2 - 1;
  }
};

itr_model_config make_cfg(int D, int F, int L, int H, int Hkv, int V, int hd = 0) {
  itr_model_config c;
  std::memset(&c, 0, sizeof c);
  c.arch = ITR_ARCH_LLAMA;
  std::strcpy(c.model_type, "llama");
  c.hidden_size = D;
  c.intermediate_size = F;
  c.num_hidden_layers = L;
  c.num_attention_heads = H;
  c.num_key_value_heads = Hkv;
  c.head_dim = hd ? hd : D / H;
  c.vocab_size = V;
  c.max_position_embeddings = 512;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  return c;
}

void module_shape(const itr_model_config &c, int m, int64_t *o, int64_t *i) {
  int64_t qd = (int64_t)c.num_attention_heads * c.head_dim, kvd = (int64_t)c.num_key_value_heads * c.head_dim;
  int64_t D = c.hidden_size, F = c.intermediate_size;
  const int64_t outs[7] = {qd, kvd, kvd, D, F, F, D}, ins[7] = {D, D, D, qd, D, D, F};
  *o = outs[m];
  *i = ins[m];
}

struct ModelPtr {
  itr_model *m = nullptr;
  ~ModelPtr() { itr_model_destroy(m); }
};
struct LoraPtr {
  itr_lora_set *s = nullptr;
  ~LoraPtr() { itr_lora_set_destroy(s); }
};

// Fills every weight the model owns with random values (norm weights near 1).
void fill_random(itr_model *m, const itr_model_config &c, uint64_t seed, int a, int b) {
  Rng rng(seed);
  for (int l = a; l < b; l++) {
    for (int k = 0; k < ITR_MODULE_COUNT; k++) {
      int64_t o, i;
      module_shape(c, k, &o, &i);
      float *w = itr_model_weight(m, l, (itr_module)k);
      double sc = 1.0 / std::sqrt((double)i);
      for (int64_t j = 0; j < o * i; j++) w[j] = (float)(rng.uniform() * sc * 1.5);
      float *bias = itr_model_bias(m, l, (itr_module)k);
      if (bias)
        for (int64_t j = 0; j < o; j++) bias[j] = (float)(0.3 * rng.uniform());
    }
    for (int post = 0; post < 2; post++) {
      float *n = itr_model_norm(m, l, post);
      for (int j = 0; j < c.hidden_size; j++) n[j] = (float)(1 + 0.3 * rng.uniform());
    }
  }
  if (itr_model_embed_weight(m)) {
    float *e = itr_model_embed_weight(m);
    for (int64_t j = 0; j < (int64_t)c.vocab_size * c.hidden_size; j++) e[j] = (float)rng.uniform();
  }
  if (itr_model_final_norm(m)) {
    float *n = itr_model_final_norm(m);
    for (int j = 0; j < c.hidden_size; j++) n[j] = (float)(1 + 0.3 * rng.uniform());
    float *h = itr_model_lm_head(m);
    if (h != itr_model_embed_weight(m))
      for (int64_t j = 0; j < (int64_t)c.vocab_size * c.hidden_size; j++) h[j] = (float)rng.uniform();
  }
}

// Copies the weights of a whole model (every layer, embed, head) in double; `w` indexed [l][m].
struct RefWeights {
  itr_model_config c;
  std::vector<std::vector<Vec>> w, b;  // [l][m]; b empty when no bias
  std::vector<Vec> n_in, n_post;
  Vec embed, final_norm, head;
};

Vec to_vec(const float *p, int64_t n) { return Vec(p, p + n); }

RefWeights ref_from_model(itr_model *m, const itr_model_config &c) {
  RefWeights r;
  r.c = c;
  int L = c.num_hidden_layers;
  r.w.assign(L, std::vector<Vec>(7));
  r.b.assign(L, std::vector<Vec>(7));
  for (int l = 0; l < L; l++) {
    for (int k = 0; k < 7; k++) {
      int64_t o, i;
      module_shape(c, k, &o, &i);
      r.w[l][k] = to_vec(itr_model_weight(m, l, (itr_module)k), o * i);
      if (itr_model_bias(m, l, (itr_module)k)) r.b[l][k] = to_vec(itr_model_bias(m, l, (itr_module)k), o);
    }
    r.n_in.push_back(to_vec(itr_model_norm(m, l, 0), c.hidden_size));
    r.n_post.push_back(to_vec(itr_model_norm(m, l, 1), c.hidden_size));
  }
  r.embed = to_vec(itr_model_embed_weight(m), (int64_t)c.vocab_size * c.hidden_size);
  r.final_norm = to_vec(itr_model_final_norm(m), c.hidden_size);
  r.head = to_vec(itr_model_lm_head(m), (int64_t)c.vocab_size * c.hidden_size);
  return r;
}

// W += scale * B A (all double), folding a LoRA term into the reference weights.
void fold_term(Vec &W, int64_t o, int64_t i, int r, double scale, const float *A, const float *B) {
  for (int64_t a = 0; a < o; a++)
    for (int64_t j = 0; j < i; j++) {
      double s = 0;
      for (int k = 0; k < r; k++) s += (double)B[a * r + k] * A[k * i + j];
      W[a * i + j] += scale * s;
    }
}

// y (n, o) = x (n, i) W^T + b
Vec matmul_t(const Vec &x, int64_t n, const Vec &W, int64_t o, int64_t i, const Vec &b) {
  Vec y(n * o);
  for (int64_t t = 0; t < n; t++)
    for (int64_t a = 0; a < o; a++) {
      double s = b.empty() ? 0.0 : b[a];
      for (int64_t j = 0; j < i; j++) s += x[t * i + j] * W[a * i + j];
      y[t * o + a] = s;
    }
  return y;
}

Vec rms(const Vec &x, int64_t n, int D, const Vec &w, double eps) {
  Vec y(x.size());
  for (int64_t t = 0; t < n; t++) {
    double ss = 0;
    for (int j = 0; j < D; j++) ss += x[t * D + j] * x[t * D + j];
    double inv = 1.0 / std::sqrt(ss / D + eps);
    for (int j = 0; j < D; j++) y[t * D + j] = w[j] * x[t * D + j] * inv;
  }
  return y;
}

// Rotate-half rotary embedding of one head vector v (hd) at position pos.
void rope(double *v, int hd, int pos, double theta) {
  int half = hd / 2;
  std::vector<double> out(hd);
  for (int i = 0; i < half; i++) {
    double ang = pos / std::pow(theta, (2.0 * i) / hd);
    out[i] = v[i] * std::cos(ang) - v[i + half] * std::sin(ang);
    out[i + half] = v[i + half] * std::cos(ang) + v[i] * std::sin(ang);
  }
  for (int i = 0; i < hd; i++) v[i] = out[i];
}

struct RefCapture {
  std::vector<std::vector<Vec>> site;  // [l][site], rows of one sequence
};

// Naive double forward of one sequence; returns logits (n, V). Captures per-site inputs.
Vec ref_forward(const RefWeights &r, const std::vector<int> &ids, RefCapture *cap = nullptr) {
  const itr_model_config &c = r.c;
  int D = c.hidden_size, F = c.intermediate_size, H = c.num_attention_heads, Hkv = c.num_key_value_heads,
      hd = c.head_dim, V = c.vocab_size;
  int64_t n = (int64_t)ids.size();
  Vec h(n * D);
  for (int64_t t = 0; t < n; t++)
    for (int j = 0; j < D; j++) h[t * D + j] = r.embed[(int64_t)ids[t] * D + j];
  if (cap) cap->site.assign(c.num_hidden_layers, std::vector<Vec>(4));
  for (int l = 0; l < c.num_hidden_layers; l++) {
    int64_t o, i;
    Vec x = rms(h, n, D, r.n_in[l], c.rms_norm_eps);
    if (cap) cap->site[l][0] = x;
    module_shape(c, 0, &o, &i);
    Vec q = matmul_t(x, n, r.w[l][0], o, i, r.b[l][0]);
    module_shape(c, 1, &o, &i);
    Vec k = matmul_t(x, n, r.w[l][1], o, i, r.b[l][1]);
    Vec v = matmul_t(x, n, r.w[l][2], o, i, r.b[l][2]);
    for (int64_t t = 0; t < n; t++) {
      for (int hh = 0; hh < H; hh++) rope(&q[t * H * hd + hh * hd], hd, (int)t, c.rope_theta);
      for (int hh = 0; hh < Hkv; hh++) rope(&k[t * Hkv * hd + hh * hd], hd, (int)t, c.rope_theta);
    }
    Vec att(n * H * hd, 0.0);
    for (int hh = 0; hh < H; hh++) {
      int kh = hh * Hkv / H;
      for (int64_t t = 0; t < n; t++) {
        std::vector<double> p(t + 1);
        double mx = -1e300, sum = 0;
        for (int64_t s = 0; s <= t; s++) {
          double dot = 0;
          for (int j = 0; j < hd; j++) dot += q[t * H * hd + hh * hd + j] * k[s * Hkv * hd + kh * hd + j];
          p[s] = dot / std::sqrt((double)hd);
          mx = std::max(mx, p[s]);
        }
        for (int64_t s = 0; s <= t; s++) sum += (p[s] = std::exp(p[s] - mx));
        for (int64_t s = 0; s <= t; s++)
          for (int j = 0; j < hd; j++) att[t * H * hd + hh * hd + j] += p[s] / sum * v[s * Hkv * hd + kh * hd + j];
      }
    }
    if (cap) cap->site[l][1] = att;
    module_shape(c, 3, &o, &i);
    Vec ao = matmul_t(att, n, r.w[l][3], o, i, r.b[l][3]);
    for (int64_t j = 0; j < n * D; j++) h[j] += ao[j];
    x = rms(h, n, D, r.n_post[l], c.rms_norm_eps);
    if (cap) cap->site[l][2] = x;
    module_shape(c, 4, &o, &i);
    Vec g = matmul_t(x, n, r.w[l][4], o, i, r.b[l][4]);
    Vec u = matmul_t(x, n, r.w[l][5], o, i, r.b[l][5]);
    for (int64_t j = 0; j < n * F; j++) g[j] = g[j] / (1 + std::exp(-g[j])) * u[j];
    if (cap) cap->site[l][3] = g;
    module_shape(c, 6, &o, &i);
    Vec dn = matmul_t(g, n, r.w[l][6], o, i, r.b[l][6]);
    for (int64_t j = 0; j < n * D; j++) h[j] += dn[j];
  }
  Vec x = rms(h, n, D, r.final_norm, c.rms_norm_eps);
  return matmul_t(x, n, r.head, V, D, Vec());
}

// max |a - b| / max |b|
double rel_err(const float *a, const Vec &b, size_t off = 0) {
  double md = 0, mb = 0;
  for (size_t j = 0; j < b.size(); j++) {
    md = std::max(md, std::fabs((double)a[off + j] - b[j]));
    mb = std::max(mb, std::fabs(b[j]));
  }
  return md / (mb > 0 ? mb : 1);
}
double rel_err_f(const std::vector<float> &a, const std::vector<float> &b) {
  double md = 0, mb = 0;
  for (size_t j = 0; j < b.size(); j++) {
    md = std::max(md, std::fabs((double)a[j] - b[j]));
    mb = std::max(mb, std::fabs((double)b[j]));
  }
  return md / (mb > 0 ? mb : 1);
}

std::vector<float> run_forward(itr_model *m, const std::vector<int32_t> &ids, const std::vector<int64_t> &offs,
                               const itr_lora_set *lora, itr_capture_fn sink = nullptr, void *ctx = nullptr) {
  const itr_model_config *c = itr_model_config_of(m);
  std::vector<float> logits(ids.size() * c->vocab_size);
  itr_seq_layout lay = {(int)offs.size() - 1, offs.data()};
  itr_err e = itr_model_forward(m, ids.data(), (int64_t)ids.size(), offs.empty() ? nullptr : &lay, lora, sink, ctx,
                                logits.data());
  EXPECT_EQ(e, ITR_OK) << itr_error_message();
  return logits;
}

// Random LoRA terms: two "adapters" with ranks 2 and 3, adapter 0 skips k_proj and down_proj.
void add_random_lora(itr_lora_set *s, const itr_model_config &c, uint64_t seed, RefWeights *fold) {
  Rng rng(seed);
  const int ranks[2] = {2, 3};
  const float scal[2] = {0.7f, 1.9f};
  for (int ad = 0; ad < 2; ad++)
    for (int l = 0; l < c.num_hidden_layers; l++)
      for (int k = 0; k < 7; k++) {
        if (ad == 0 && (k == ITR_K_PROJ || k == ITR_DOWN_PROJ)) continue;
        int64_t o, i;
        module_shape(c, k, &o, &i);
        int r = ranks[ad];
        std::vector<float> A(r * i), B(o * r);
        for (auto &x : A) x = (float)(rng.uniform() / std::sqrt((double)i));
        for (auto &x : B) x = (float)(0.5 * rng.uniform());
        ASSERT_EQ(itr_lora_set_add(s, l, (itr_module)k, r, scal[ad], A.data(), B.data()), ITR_OK)
            << itr_error_message();
        if (fold) fold_term(fold->w[l][k], o, i, r, scal[ad], A.data(), B.data());
      }
}

// ---- hand-derived cases ----------------------------------------------------------------------

// D = 2, one head, hd = 2, one token: attention returns v; with identity q/k/v/o/gate/up/down,
// unit norms and eps = 0: x = [1, -1] -> rms 1 -> v = [1, -1], h = [2, -2];
// rms([2,-2]) = 2 -> x = [1, -1]; silu(1)*1 = 0.7310586, silu(-1)*(-1) = 0.2689414;
// h = [2.7310586, -1.7310586]; logits = rmsnorm(h) with lm_head = I.
TEST(ForwardHand, OneTokenIdentityWeights) {
  itr_model_config c = make_cfg(2, 2, 1, 1, 1, 2);
  c.rms_norm_eps = 0;
  ModelPtr m;
  ASSERT_EQ(itr_model_create(&c, 0, 1, 1, 1, &m.m), ITR_OK) << itr_error_message();
  for (int k = 0; k < 7; k++) {
    float *w = itr_model_weight(m.m, 0, (itr_module)k);
    w[0] = w[3] = 1;
  }
  for (int p = 0; p < 2; p++) itr_model_norm(m.m, 0, p)[0] = itr_model_norm(m.m, 0, p)[1] = 1;
  float *e = itr_model_embed_weight(m.m);
  e[0] = 1, e[1] = -1, e[2] = 5, e[3] = 5;
  float *fn = itr_model_final_norm(m.m);
  fn[0] = fn[1] = 1;
  float *hd = itr_model_lm_head(m.m);
  hd[0] = hd[3] = 1;
  int32_t id = 0;
  float h[2];
  ASSERT_EQ(itr_model_embed(m.m, &id, 1, h), ITR_OK);
  ASSERT_EQ(itr_model_run_layers(m.m, 0, 1, h, 1, nullptr, nullptr, nullptr, nullptr), ITR_OK);
  EXPECT_NEAR(h[0], 2.7310586, 1e-6);
  EXPECT_NEAR(h[1], -1.7310586, 1e-6);
  float lg[2];
  ASSERT_EQ(itr_model_logits(m.m, h, 1, lg), ITR_OK);
  double rmsv = std::sqrt((2.7310586 * 2.7310586 + 1.7310586 * 1.7310586) / 2);
  EXPECT_NEAR(lg[0], 2.7310586 / rmsv, 1e-6);
  EXPECT_NEAR(lg[1], -1.7310586 / rmsv, 1e-6);
}

// Two tokens, D = hd = 2, one head, theta irrelevant for hd = 2 (inv_freq = 1): MLP off (down = 0).
// x0 = [1, 1], x1 = [1, -1] (both rms 1). q0 = k0 = v0 = [1, 1]; at position 1 the rotation by
// 1 rad gives q1 = k1 = [cos1 + sin1, sin1 - cos1], v1 = [1, -1].
// Scores of token 1: q1.k0 / sqrt2 = sqrt2 sin1, q1.k1 / sqrt2 = sqrt2.
// out1 = p0 [1, 1] + p1 [1, -1] = [1, p0 - p1]; h1 = x1 + out1 = [2, p0 - p1 - 1]; h0 = [2, 2].
TEST(ForwardHand, TwoTokensRotaryAttention) {
  itr_model_config c = make_cfg(2, 2, 1, 1, 1, 2);
  c.rms_norm_eps = 0;
  ModelPtr m;
  ASSERT_EQ(itr_model_create(&c, 0, 1, 0, 0, &m.m), ITR_OK) << itr_error_message();
  for (int k = 0; k < 4; k++) {
    float *w = itr_model_weight(m.m, 0, (itr_module)k);
    w[0] = w[3] = 1;
  }
  for (int p = 0; p < 2; p++) itr_model_norm(m.m, 0, p)[0] = itr_model_norm(m.m, 0, p)[1] = 1;
  float h[4] = {1, 1, 1, -1};
  ASSERT_EQ(itr_model_run_layers(m.m, 0, 1, h, 2, nullptr, nullptr, nullptr, nullptr), ITR_OK);
  double s0 = std::sqrt(2.0) * std::sin(1.0), s1 = std::sqrt(2.0);
  double p0 = std::exp(s0) / (std::exp(s0) + std::exp(s1)), p1 = 1 - p0;
  EXPECT_NEAR(h[0], 2, 1e-6);
  EXPECT_NEAR(h[1], 2, 1e-6);
  EXPECT_NEAR(h[2], 2, 1e-6);
  EXPECT_NEAR(h[3], p0 - p1 - 1, 1e-6);
}

// Rotary frequencies with hd = 4, theta = 100: pair i = 0 turns by pos, pair i = 1 by pos / 10.
// One head, q = k from x; a single query at position 2 against keys at 0..2: check through the
// captured ATTN_OUT rows against a closed form computed here.
TEST(ForwardHand, RotaryFrequenciesHeadDim4) {
  itr_model_config c = make_cfg(4, 2, 1, 1, 1, 4);
  c.rms_norm_eps = 0;
  c.rope_theta = 100;
  ModelPtr m;
  ASSERT_EQ(itr_model_create(&c, 0, 1, 0, 0, &m.m), ITR_OK) << itr_error_message();
  for (int k = 0; k < 4; k++) {
    float *w = itr_model_weight(m.m, 0, (itr_module)k);
    for (int j = 0; j < 4; j++) w[j * 4 + j] = 1;
  }
  for (int p = 0; p < 2; p++)
    for (int j = 0; j < 4; j++) itr_model_norm(m.m, 0, p)[j] = 1;
  // three tokens, each with rms 1
  float h[12] = {1, 1, 1, 1, 1, -1, 1, -1, 2, 0, 0, 0};
  double x[3][4] = {{1, 1, 1, 1}, {1, -1, 1, -1}, {2, 0, 0, 0}};
  struct Cap {
    std::vector<float> att;
  } cap;
  auto sink = [](int, itr_site site, const float *rows, int64_t T, int64_t d, void *ctx) -> itr_err {
    if (site == ITR_SITE_ATTN_OUT) static_cast<Cap *>(ctx)->att.assign(rows, rows + T * d);
    return ITR_OK;
  };
  ASSERT_EQ(itr_model_run_layers(m.m, 0, 1, h, 3, nullptr, nullptr, sink, &cap), ITR_OK);
  ASSERT_EQ(cap.att.size(), 12u);
  // closed form: pair (0, 2) rotates by angle pos * 1, pair (1, 3) by pos * 100^(-1/2) = pos / 10
  double rot[3][4];
  for (int p = 0; p < 3; p++) {
    double a0 = p, a1 = p / 10.0;
    rot[p][0] = x[p][0] * std::cos(a0) - x[p][2] * std::sin(a0);
    rot[p][2] = x[p][2] * std::cos(a0) + x[p][0] * std::sin(a0);
    rot[p][1] = x[p][1] * std::cos(a1) - x[p][3] * std::sin(a1);
    rot[p][3] = x[p][3] * std::cos(a1) + x[p][1] * std::sin(a1);
  }
  double sc[3], mx = -1e9, sum = 0;
  for (int s = 0; s < 3; s++) {
    sc[s] = 0;
    for (int j = 0; j < 4; j++) sc[s] += rot[2][j] * rot[s][j];
    sc[s] /= 2.0;  // sqrt(hd)
    mx = std::max(mx, sc[s]);
  }
  for (int s = 0; s < 3; s++) sum += (sc[s] = std::exp(sc[s] - mx));
  for (int j = 0; j < 4; j++) {
    double o = 0;
    for (int s = 0; s < 3; s++) o += sc[s] / sum * x[s][j];
    EXPECT_NEAR(cap.att[8 + j], o, 1e-6) << "component " << j;
  }
}

// ---- against the double-precision loop ------------------------------------------------------------

struct Variant {
  const char *name;
  int D, F, L, H, Hkv, V, hd;
  int tied, qwen_bias, o_bias, mlp_bias, lora, dense;
};

class ForwardReference : public ::testing::TestWithParam<Variant> {};

TEST_P(ForwardReference, MatchesDoubleLoop) {
  const Variant &v = GetParam();
  itr_model_config c = make_cfg(v.D, v.F, v.L, v.H, v.Hkv, v.V, v.hd);
  c.tie_word_embeddings = v.tied;
  if (v.qwen_bias) c.arch = ITR_ARCH_QWEN2, c.attention_bias = 1;
  c.o_bias = v.o_bias;
  if (v.o_bias) c.attention_bias = 1;
  c.mlp_bias = v.mlp_bias;
  c.rope_theta = 500000.0;
  ModelPtr m;
  ASSERT_EQ(itr_model_create(&c, 0, v.L, 1, 1, &m.m), ITR_OK) << itr_error_message();
  fill_random(m.m, c, 7, 0, v.L);
  if (v.tied) {
    EXPECT_EQ(itr_model_lm_head(m.m), itr_model_embed_weight(m.m));
  }
  RefWeights ref = ref_from_model(m.m, c);
  LoraPtr lora;
  if (v.lora || v.dense) {
    ASSERT_EQ(itr_lora_set_create(&c, &lora.s), ITR_OK);
  }
  if (v.lora) add_random_lora(lora.s, c, 99, &ref);
  std::vector<std::vector<float>> dense_keep;
  if (v.dense) {
    Rng rng(5);
    for (int l = 0; l < v.L; l++) {
      int k = l % 7;
      int64_t o, i;
      module_shape(c, k, &o, &i);
      dense_keep.emplace_back(o * i);
      for (auto &x : dense_keep.back()) x = (float)(0.2 * rng.uniform());
      ASSERT_EQ(itr_lora_set_set_dense(lora.s, l, (itr_module)k, dense_keep.back().data(), 0.5f, l % 2), ITR_OK);
      for (int64_t j = 0; j < o * i; j++) ref.w[l][k][j] += 0.5 * dense_keep.back()[j];
    }
  }
  // three sequences of lengths 5, 1, 7 packed in one block
  std::vector<std::vector<int>> seqs = {{1, 4, 2, 9, 3}, {6}, {0, 5, 5, 7, 2, 8, 1}};
  std::vector<int32_t> ids;
  std::vector<int64_t> offs = {0};
  for (auto &s : seqs) {
    for (int t : s) ids.push_back(t % v.V);
    offs.push_back((int64_t)ids.size());
  }
  std::vector<float> got = run_forward(m.m, ids, offs, lora.s);
  for (size_t s = 0; s < seqs.size(); s++) {
    std::vector<int> sid(ids.begin() + offs[s], ids.begin() + offs[s + 1]);
    Vec want = ref_forward(ref, sid);
    double e = rel_err(got.data(), want, (size_t)offs[s] * v.V);
    EXPECT_LT(e, 2e-5) << v.name << " sequence " << s;
  }
}

INSTANTIATE_TEST_SUITE_P(
    ForwardVariants, ForwardReference,
    ::testing::Values(Variant{"mha_untied", 16, 24, 2, 4, 4, 11, 0, 0, 0, 0, 0, 0, 0},
                      Variant{"gqa_tied", 16, 20, 2, 4, 2, 13, 0, 1, 0, 0, 0, 0, 0},
                      Variant{"mqa_headdim", 12, 20, 2, 2, 1, 9, 8, 0, 0, 0, 0, 0, 0},
                      Variant{"qwen2_bias", 16, 24, 2, 4, 2, 10, 0, 1, 1, 0, 0, 0, 0},
                      Variant{"llama_all_bias", 8, 12, 2, 2, 1, 10, 0, 0, 0, 1, 1, 0, 0},
                      Variant{"lora_two_adapters", 16, 24, 2, 4, 2, 12, 0, 0, 0, 0, 0, 1, 0},
                      Variant{"lora_and_dense", 12, 16, 3, 3, 1, 10, 0, 1, 1, 0, 0, 1, 1}),
    [](const ::testing::TestParamInfo<Variant> &i) { return std::string(i.param.name); });

// Captured inputs at each site equal the double loop's (one sequence).
TEST(ForwardCapture, SitesMatchDoubleLoop) {
  itr_model_config c = make_cfg(12, 20, 2, 3, 1, 10);
  ModelPtr m;
  ASSERT_EQ(itr_model_create(&c, 0, 2, 1, 1, &m.m), ITR_OK);
  fill_random(m.m, c, 3, 0, 2);
  RefWeights ref = ref_from_model(m.m, c);
  std::vector<int> sid = {3, 1, 4, 1, 5, 9};
  RefCapture rc;
  ref_forward(ref, sid, &rc);
  struct Seen {
    std::vector<std::vector<Vec>> rows;  // [l][site]
    std::vector<std::pair<int, int>> order;
    std::vector<int64_t> widths;
  } seen;
  seen.rows.assign(2, std::vector<Vec>(4));
  auto sink = [](int l, itr_site site, const float *rows, int64_t T, int64_t d, void *ctx) -> itr_err {
    Seen *s = static_cast<Seen *>(ctx);
    s->rows[l][site] = Vec(rows, rows + T * d);
    s->order.push_back({l, (int)site});
    s->widths.push_back(d);
    return ITR_OK;
  };
  std::vector<int32_t> ids(sid.begin(), sid.end());
  run_forward(m.m, ids, {}, nullptr, sink, &seen);
  ASSERT_EQ(seen.order.size(), 8u);
  const int64_t widths[4] = {12, 12, 12, 20};
  for (int j = 0; j < 8; j++) {
    EXPECT_EQ(seen.order[j].first, j / 4);
    EXPECT_EQ(seen.order[j].second, j % 4);
    EXPECT_EQ(seen.widths[j], widths[j % 4]);
  }
  for (int l = 0; l < 2; l++)
    for (int s = 0; s < 4; s++) {
      std::vector<float> f(seen.rows[l][s].begin(), seen.rows[l][s].end());
      EXPECT_LT(rel_err(f.data(), rc.site[l][s]), 2e-6) << "layer " << l << " site " << s;
    }
}

// The output norms (IterIS's c_i denominators) equal ||x W^T||^2 in a double loop over the captured
// inputs and the folded weights W0 + s B A: the bias, the rotary embedding and the residual add
// must not enter. A model with every bias and a LoRA on every module.
TEST(ForwardCapture, OutputNormsMatchDoubleLoop) {
  itr_model_config c = make_cfg(12, 20, 2, 3, 1, 10);
  c.attention_bias = 1;
  c.o_bias = 1;
  c.mlp_bias = 1;
  ModelPtr m;
  ASSERT_EQ(itr_model_create(&c, 0, 2, 1, 1, &m.m), ITR_OK) << itr_error_message();
  fill_random(m.m, c, 5, 0, 2);
  RefWeights folded = ref_from_model(m.m, c);
  LoraPtr lora;
  ASSERT_EQ(itr_lora_set_create(&c, &lora.s), ITR_OK);
  add_random_lora(lora.s, c, 23, &folded);
  struct Seen {
    std::vector<std::vector<Vec>> rows;  // [l][site] captured inputs
    double norm[2][ITR_MODULE_COUNT];
    int calls = 0;
  } seen;
  seen.rows.assign(2, std::vector<Vec>(4));
  auto sink = [](int l, itr_site site, const float *rows, int64_t T, int64_t d, void *ctx) -> itr_err {
    static_cast<Seen *>(ctx)->rows[l][site] = Vec(rows, rows + T * d);
    return ITR_OK;
  };
  auto onorm = [](int l, itr_module mod, double ss, void *ctx) {
    Seen *s = static_cast<Seen *>(ctx);
    s->norm[l][mod] = ss;
    s->calls++;
  };
  const int64_t T = 7;
  std::vector<int32_t> ids = {3, 1, 4, 1, 5, 9, 2};
  std::vector<float> h(T * 12);
  ASSERT_EQ(itr_model_embed(m.m, ids.data(), T, h.data()), ITR_OK);
  ASSERT_EQ(itr_model_run_layers_ex(m.m, 0, 2, h.data(), T, nullptr, lora.s, sink, onorm, &seen), ITR_OK)
      << itr_error_message();
  EXPECT_EQ(seen.calls, 2 * ITR_MODULE_COUNT);
  for (int l = 0; l < 2; l++)
    for (int k = 0; k < ITR_MODULE_COUNT; k++) {
      int64_t o, i;
      module_shape(c, k, &o, &i);
      const Vec &x = seen.rows[l][itr_module_site((itr_module)k)];
      const Vec &w = folded.w[l][k];
      double ref = 0.0;
      for (int64_t t = 0; t < T; t++)
        for (int64_t r = 0; r < o; r++) {
          double y = 0.0;
          for (int64_t j = 0; j < i; j++) y += x[t * i + j] * w[r * i + j];
          ref += y * y;
        }
      EXPECT_NEAR(seen.norm[l][k], ref, 1e-5 * ref) << "layer " << l << " module " << k;
    }
  // and the forward itself is unchanged by asking for the norms
  std::vector<float> h2(T * 12);
  ASSERT_EQ(itr_model_embed(m.m, ids.data(), T, h2.data()), ITR_OK);
  ASSERT_EQ(itr_model_run_layers(m.m, 0, 2, h2.data(), T, nullptr, lora.s, nullptr, nullptr), ITR_OK);
  EXPECT_EQ(h, h2);
}

TEST(ForwardCapture, SinkErrorStopsTheForward) {
  itr_model_config c = make_cfg(8, 8, 2, 2, 2, 5);
  ModelPtr m;
  ASSERT_EQ(itr_model_create(&c, 0, 2, 0, 0, &m.m), ITR_OK);
  std::vector<float> h(3 * 8, 0.5f);
  int calls = 0;
  auto sink = [](int l, itr_site site, const float *, int64_t, int64_t, void *ctx) -> itr_err {
    ++*static_cast<int *>(ctx);
    if (l == 1 && site == ITR_SITE_MLP_IN) return itr_error_set(ITR_ERR_INTERNAL, "sink full");
    return ITR_OK;
  };
  EXPECT_EQ(itr_model_run_layers(m.m, 0, 2, h.data(), 3, nullptr, nullptr, sink, &calls), ITR_ERR_INTERNAL);
  EXPECT_EQ(calls, 7);
  EXPECT_NE(std::string(itr_error_message()).find("sink full"), std::string::npos);
}

// ---- invariants ------------------------------------------------------------------------------------

struct Fixture {
  itr_model_config c;
  ModelPtr m;
  explicit Fixture(int Hkv = 2, int L = 3) {
    c = make_cfg(16, 24, L, 4, Hkv, 17);
    EXPECT_EQ(itr_model_create(&c, 0, L, 1, 1, &m.m), ITR_OK) << itr_error_message();
    fill_random(m.m, c, 11, 0, L);
  }
};

TEST(ForwardInvariants, LaterTokensDoNotChangeEarlierLogits) {
  Fixture f;
  std::vector<int32_t> a = {1, 2, 3, 4, 5, 6, 7, 8}, b = a;
  b[5] = 16, b[6] = 0, b[7] = 9;
  std::vector<float> la = run_forward(f.m.m, a, {}, nullptr), lb = run_forward(f.m.m, b, {}, nullptr);
  size_t keep = 5 * 17;
  std::vector<float> pa(la.begin(), la.begin() + keep), pb(lb.begin(), lb.begin() + keep);
  EXPECT_LT(rel_err_f(pb, pa), 1e-6);
  std::vector<float> qa(la.begin() + keep, la.end()), qb(lb.begin() + keep, lb.end());
  EXPECT_GT(rel_err_f(qb, qa), 1e-3);  // the changed positions do change
}

TEST(ForwardInvariants, PackingEqualsSeparateRuns) {
  Fixture f;
  std::vector<int32_t> s1 = {3, 1, 4, 1, 5}, s2 = {9, 2, 6}, s3 = {5, 3, 5, 8, 9, 7, 9};
  std::vector<int32_t> all;
  for (auto *s : {&s1, &s2, &s3}) all.insert(all.end(), s->begin(), s->end());
  std::vector<float> packed = run_forward(f.m.m, all, {0, 5, 8, 15}, nullptr);
  size_t off = 0;
  for (auto *s : {&s1, &s2, &s3}) {
    std::vector<float> sep = run_forward(f.m.m, *s, {}, nullptr);
    std::vector<float> part(packed.begin() + off, packed.begin() + off + sep.size());
    EXPECT_LT(rel_err_f(part, sep), 1e-6);
    off += sep.size();
  }
}

TEST(ForwardInvariants, SplitLayersAcrossModelPartsEqualsWhole) {
  Fixture f(2, 4);
  std::vector<int32_t> ids = {2, 7, 1, 8, 2, 8};
  std::vector<int64_t> offs = {0, 4, 6};
  itr_seq_layout lay = {2, offs.data()};
  std::vector<float> whole = run_forward(f.m.m, ids, offs, nullptr);
  // two "ranks": [0, 1) with the embedding, [1, 4) with the head; weights copied from f.m
  ModelPtr p0, p1;
  ASSERT_EQ(itr_model_create(&f.c, 0, 1, 1, 0, &p0.m), ITR_OK);
  ASSERT_EQ(itr_model_create(&f.c, 1, 4, 0, 1, &p1.m), ITR_OK);
  EXPECT_EQ(itr_model_lm_head(p1.m) != nullptr, true);
  for (int l = 0; l < 4; l++) {
    itr_model *dst = l < 1 ? p0.m : p1.m;
    for (int k = 0; k < 7; k++) {
      int64_t o, i;
      module_shape(f.c, k, &o, &i);
      std::memcpy(itr_model_weight(dst, l, (itr_module)k), itr_model_weight(f.m.m, l, (itr_module)k), o * i * 4);
    }
    for (int p = 0; p < 2; p++) std::memcpy(itr_model_norm(dst, l, p), itr_model_norm(f.m.m, l, p), 16 * 4);
  }
  EXPECT_EQ(itr_model_weight(p0.m, 1, ITR_Q_PROJ), nullptr);
  std::memcpy(itr_model_embed_weight(p0.m), itr_model_embed_weight(f.m.m), 17 * 16 * 4);
  std::memcpy(itr_model_final_norm(p1.m), itr_model_final_norm(f.m.m), 16 * 4);
  std::memcpy(itr_model_lm_head(p1.m), itr_model_lm_head(f.m.m), 17 * 16 * 4);
  std::vector<float> h(6 * 16), lg(6 * 17);
  ASSERT_EQ(itr_model_embed(p0.m, ids.data(), 6, h.data()), ITR_OK);
  ASSERT_EQ(itr_model_run_layers(p0.m, 0, 1, h.data(), 6, &lay, nullptr, nullptr, nullptr), ITR_OK);
  EXPECT_NE(itr_model_run_layers(p0.m, 1, 2, h.data(), 6, &lay, nullptr, nullptr, nullptr), ITR_OK);
  ASSERT_EQ(itr_model_run_layers(p1.m, 1, 3, h.data(), 6, &lay, nullptr, nullptr, nullptr), ITR_OK);
  ASSERT_EQ(itr_model_run_layers(p1.m, 3, 4, h.data(), 6, &lay, nullptr, nullptr, nullptr), ITR_OK);
  ASSERT_EQ(itr_model_logits(p1.m, h.data(), 6, lg.data()), ITR_OK);
  EXPECT_LT(rel_err_f(lg, whole), 1e-6);
}

TEST(ForwardInvariants, ZeroBAdapterEqualsBase) {
  Fixture f;
  LoraPtr s;
  ASSERT_EQ(itr_lora_set_create(&f.c, &s.s), ITR_OK);
  Rng rng(4);
  for (int l = 0; l < 3; l++)
    for (int k = 0; k < 7; k++) {
      int64_t o, i;
      module_shape(f.c, k, &o, &i);
      std::vector<float> A(4 * i), B(o * 4, 0.0f);
      for (auto &x : A) x = (float)rng.uniform();
      ASSERT_EQ(itr_lora_set_add(s.s, l, (itr_module)k, 4, 2.0f, A.data(), B.data()), ITR_OK);
    }
  std::vector<int32_t> ids = {1, 5, 9, 13, 2};
  EXPECT_EQ(run_forward(f.m.m, ids, {}, s.s), run_forward(f.m.m, ids, {}, nullptr));
}

TEST(ForwardInvariants, AdapterEqualsFoldedWeights) {
  Fixture f;
  LoraPtr s;
  ASSERT_EQ(itr_lora_set_create(&f.c, &s.s), ITR_OK);
  RefWeights folded = ref_from_model(f.m.m, f.c);
  add_random_lora(s.s, f.c, 21, &folded);
  std::vector<int32_t> ids = {4, 8, 15, 16, 2, 3};
  std::vector<float> with_lora = run_forward(f.m.m, ids, {}, s.s);
  // a second float model whose weights are W0 + sum s B A
  ModelPtr g;
  ASSERT_EQ(itr_model_create(&f.c, 0, 3, 1, 1, &g.m), ITR_OK);
  fill_random(g.m, f.c, 11, 0, 3);  // same seed: same norms, embedding, head
  for (int l = 0; l < 3; l++)
    for (int k = 0; k < 7; k++) {
      float *w = itr_model_weight(g.m, l, (itr_module)k);
      for (size_t j = 0; j < folded.w[l][k].size(); j++) w[j] = (float)folded.w[l][k][j];
    }
  std::vector<float> merged = run_forward(g.m, ids, {}, nullptr);
  EXPECT_LT(rel_err_f(with_lora, merged), 1e-5);
  EXPECT_GT(rel_err_f(with_lora, run_forward(f.m.m, ids, {}, nullptr)), 1e-3);  // the adapter matters
}

TEST(ForwardInvariants, GqaEqualsMhaWithDuplicatedKvHeads) {
  Fixture gqa(2, 2);  // 4 heads, 2 kv heads: heads 0,1 use kv 0; heads 2,3 use kv 1
  itr_model_config c = gqa.c;
  c.num_key_value_heads = 4;
  ModelPtr mha;
  ASSERT_EQ(itr_model_create(&c, 0, 2, 1, 1, &mha.m), ITR_OK);
  fill_random(mha.m, c, 11, 0, 2);
  int hd = 4, D = 16;
  for (int l = 0; l < 2; l++) {
    for (int k = 0; k < 7; k++) {
      if (k == ITR_K_PROJ || k == ITR_V_PROJ) {
        const float *src = itr_model_weight(gqa.m.m, l, (itr_module)k);  // (2*hd, D)
        float *dst = itr_model_weight(mha.m, l, (itr_module)k);          // (4*hd, D)
        for (int h = 0; h < 4; h++) std::memcpy(dst + h * hd * D, src + (h / 2) * hd * D, hd * D * 4);
      } else {
        int64_t o, i;
        module_shape(c, k, &o, &i);
        std::memcpy(itr_model_weight(mha.m, l, (itr_module)k), itr_model_weight(gqa.m.m, l, (itr_module)k), o * i * 4);
      }
    }
    for (int p = 0; p < 2; p++) std::memcpy(itr_model_norm(mha.m, l, p), itr_model_norm(gqa.m.m, l, p), D * 4);
  }
  std::memcpy(itr_model_embed_weight(mha.m), itr_model_embed_weight(gqa.m.m), 17 * D * 4);
  std::memcpy(itr_model_lm_head(mha.m), itr_model_lm_head(gqa.m.m), 17 * D * 4);
  std::memcpy(itr_model_final_norm(mha.m), itr_model_final_norm(gqa.m.m), D * 4);
  std::vector<int32_t> ids = {0, 3, 6, 9, 12, 15};
  EXPECT_LT(rel_err_f(run_forward(mha.m, ids, {}, nullptr), run_forward(gqa.m.m, ids, {}, nullptr)), 1e-6);
}

// ---- input errors ----------------------------------------------------------------------------------

TEST(ForwardErrors, RejectsBadConfigLayoutsAndIds) {
  itr_model_config c = make_cfg(16, 24, 2, 4, 3, 10);
  itr_model *m = nullptr;
  EXPECT_EQ(itr_model_create(&c, 0, 2, 1, 1, &m), ITR_ERR_INPUT);  // 4 heads, 3 kv heads
  EXPECT_NE(std::string(itr_error_message()).find("num_key_value_heads"), std::string::npos);
  EXPECT_EQ(m, nullptr);
  c.num_key_value_heads = 2;
  EXPECT_EQ(itr_model_create(&c, 1, 3, 1, 1, &m), ITR_ERR_INPUT);  // past L
  c.head_dim = 3;
  EXPECT_EQ(itr_model_create(&c, 0, 2, 1, 1, &m), ITR_ERR_INPUT);  // odd head_dim
  c.head_dim = 4;
  ModelPtr ok;
  ASSERT_EQ(itr_model_create(&c, 0, 2, 1, 1, &ok.m), ITR_OK);
  std::vector<float> h(4 * 16, 0.1f);
  int32_t ids[4] = {1, 2, 10, 0};
  EXPECT_EQ(itr_model_embed(ok.m, ids, 4, h.data()), ITR_ERR_INPUT);
  EXPECT_NE(std::string(itr_error_message()).find("token id 10 at position 2"), std::string::npos);
  int64_t bad1[3] = {0, 3, 3};  // empty second sequence
  int64_t bad2[3] = {0, 2, 5};  // ends past T
  itr_seq_layout l1 = {2, bad1}, l2 = {2, bad2};
  EXPECT_EQ(itr_model_run_layers(ok.m, 0, 2, h.data(), 3, &l1, nullptr, nullptr, nullptr), ITR_ERR_INPUT);
  EXPECT_EQ(itr_model_run_layers(ok.m, 0, 2, h.data(), 4, &l2, nullptr, nullptr, nullptr), ITR_ERR_INPUT);
  EXPECT_EQ(itr_model_run_layers(ok.m, 0, 2, h.data(), 0, nullptr, nullptr, nullptr, nullptr), ITR_ERR_INPUT);
  ModelPtr nohead;
  ASSERT_EQ(itr_model_create(&c, 0, 1, 0, 0, &nohead.m), ITR_OK);
  EXPECT_EQ(itr_model_embed(nohead.m, ids, 2, h.data()), ITR_ERR_INPUT);
  EXPECT_EQ(itr_model_logits(nohead.m, h.data(), 2, h.data()), ITR_ERR_INPUT);
}

TEST(ForwardErrors, LoraSetChecksLayersAndRankAndModel) {
  itr_model_config c = make_cfg(8, 12, 2, 2, 2, 5);
  LoraPtr s;
  ASSERT_EQ(itr_lora_set_create(&c, &s.s), ITR_OK);
  std::vector<float> A(16 * 8, 0.1f), B(16 * 16, 0.1f);
  EXPECT_EQ(itr_lora_set_add(s.s, 2, ITR_Q_PROJ, 2, 1.0f, A.data(), B.data()), ITR_ERR_INPUT);
  EXPECT_EQ(itr_lora_set_add(s.s, 0, ITR_Q_PROJ, 0, 1.0f, A.data(), B.data()), ITR_ERR_INPUT);
  EXPECT_EQ(itr_lora_set_add(s.s, 0, (itr_module)7, 1, 1.0f, A.data(), B.data()), ITR_ERR_INPUT);
  EXPECT_EQ(itr_lora_set_add(s.s, 1, ITR_DOWN_PROJ, 3, 1.0f, A.data(), B.data()), ITR_OK);
  EXPECT_EQ(itr_lora_set_slot(s.s, 1, ITR_DOWN_PROJ)->n_terms, 1);
  EXPECT_EQ(itr_lora_set_slot(s.s, 1, ITR_DOWN_PROJ)->terms[0].r, 3);
  itr_lora_set_clear(s.s);
  EXPECT_EQ(itr_lora_set_slot(s.s, 1, ITR_DOWN_PROJ)->n_terms, 0);
  // a set made for another model is refused by the forward
  itr_model_config c2 = make_cfg(8, 16, 2, 2, 2, 5);
  ModelPtr m;
  ASSERT_EQ(itr_model_create(&c2, 0, 2, 0, 0, &m.m), ITR_OK);
  std::vector<float> h(2 * 8, 0.1f);
  EXPECT_EQ(itr_model_run_layers(m.m, 0, 2, h.data(), 2, nullptr, s.s, nullptr, nullptr), ITR_ERR_INPUT);
}

TEST(ForwardErrors, AllocationFailuresAreReported) {
  itr_model_config c = make_cfg(8, 12, 2, 2, 2, 5);
  for (long k = 1; k <= 3; k++) {
    itr_model *m = nullptr;
    itr_alloc_fail_after(k);
    itr_err e = itr_model_create(&c, 0, 2, 1, 1, &m);
    itr_alloc_fail_after(0);
    if (e == ITR_OK) {
      ASSERT_NE(m, nullptr);
      std::vector<float> h(3 * 8, 0.2f);
      itr_alloc_fail_after(1);
      EXPECT_EQ(itr_model_run_layers(m, 0, 2, h.data(), 3, nullptr, nullptr, nullptr, nullptr), ITR_ERR_INTERNAL);
      itr_alloc_fail_after(0);
      itr_model_destroy(m);
    } else {
      EXPECT_EQ(e, ITR_ERR_INTERNAL);
      EXPECT_EQ(m, nullptr);
    }
  }
}

}  // namespace
