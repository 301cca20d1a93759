// SwitchLoRA's switching step (src/train/switchlora.c) against hand-derived positions and invariants:
// W + s B A does not change when vectors switch; the ring of candidates gives a switched-out vector back
// unchanged; counterparts are frozen (gradient zero) and their AdamW state reset; the state round-trips.
#include <cmath>
#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "iteris/train.h"

namespace {

// One layer, hidden 8, FFN 12, 2 heads of 4 (1 key/value head): q_proj 8 x 8 (C = 8), down_proj 8 x 12 (C = 8).
itr_model_config tiny_config() {
  itr_model_config c;
  std::memset(&c, 0, sizeof c);
  c.arch = ITR_ARCH_LLAMA;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 4;
  c.num_hidden_layers = 1;
  c.vocab_size = 16;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000;
  c.max_position_embeddings = 64;
  return c;
}

struct Case {
  itr_model_config cfg = tiny_config();
  itr_model *model = nullptr;
  itr_lora_set *lora = nullptr;
  itr_switch *sw = nullptr;
  const int r = 4;
  Case(int interval, double descent, int warm, int steps) {
    EXPECT_EQ(itr_model_create(&cfg, 0, 1, 1, 1, &model), ITR_OK);
    size_t n;
    float *p = itr_model_params(model, &n);
    for (size_t i = 0; i < n; i++) p[i] = (float)std::sin(0.37 * (double)i + 1.0);
    EXPECT_EQ(itr_lora_set_create(&cfg, &lora), ITR_OK);
    for (itr_module m : {ITR_Q_PROJ, ITR_DOWN_PROJ}) {
      int64_t d_out, d_in;
      itr_module_shape(&cfg, m, &d_out, &d_in);
      std::vector<float> z((size_t)(d_out > d_in ? d_out : d_in) * r, 0.0f);
      EXPECT_EQ(itr_lora_set_add(lora, 0, m, r, 0.25f, z.data(), z.data()), ITR_OK);
    }
    itr_switch_opts o = {interval, descent, warm, steps, 7};
    EXPECT_EQ(itr_switch_create(&o, lora, &sw), ITR_OK);
  }
  ~Case() {
    itr_switch_destroy(sw);
    itr_lora_set_destroy(lora);
    itr_model_destroy(model);
  }
  const itr_lora_term &term(itr_module m) const { return itr_lora_set_slot(lora, 0, m)->terms[0]; }
  // W + s B A in float64
  std::vector<double> effective(itr_module m) {
    int64_t d_out, d_in;
    itr_module_shape(&cfg, m, &d_out, &d_in);
    const itr_lora_term &t = term(m);
    const float *W = itr_model_weight(model, 0, m);
    std::vector<double> e((size_t)(d_out * d_in));
    for (int64_t o = 0; o < d_out; o++)
      for (int64_t i = 0; i < d_in; i++) {
        double s = 0;
        for (int k = 0; k < r; k++) s += (double)t.B[o * r + k] * t.A[k * d_in + i];
        e[(size_t)(o * d_in + i)] = W[o * d_in + i] + (double)t.scaling * s;
      }
    return e;
  }
};

double max_diff(const std::vector<double> &a, const std::vector<double> &b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); i++) m = std::fmax(m, std::fabs(a[i] - b[i]));
  return m;
}

}  // namespace

TEST(SwitchLoRA, SwitchingKeepsTheLayerFunction) {
  Case c(2, 0.0, 2, 10);  // 2 vectors per factor per step, frozen 2 steps
  auto q0 = c.effective(ITR_Q_PROJ), d0 = c.effective(ITR_DOWN_PROJ);
  std::vector<float> A0(c.term(ITR_Q_PROJ).A, c.term(ITR_Q_PROJ).A + c.r * 8);
  for (int s = 0; s < 6; s++) ASSERT_EQ(itr_switch_step(c.sw, s, c.lora, c.model, nullptr, nullptr), ITR_OK);
  int64_t switched, held;
  itr_switch_counts(c.sw, &switched, &held);
  // steps 0, 2, 4 switch 2 A rows and 2 B columns in each of the 2 modules; 1, 3, 5 wait for the frozen ones
  EXPECT_EQ(switched, 3 * 2 * 2 * 2);
  EXPECT_LT(max_diff(c.effective(ITR_Q_PROJ), q0), 1e-5);
  EXPECT_LT(max_diff(c.effective(ITR_DOWN_PROJ), d0), 1e-5);
  EXPECT_GT(max_diff(std::vector<double>(A0.begin(), A0.end()),
                     std::vector<double>(c.term(ITR_Q_PROJ).A, c.term(ITR_Q_PROJ).A + c.r * 8)),
            1e-3);  // the factors did change
}

TEST(SwitchLoRA, RingGivesSwitchedOutVectorsBack) {
  // A rows start as candidates 4..7 (C 8, r 4). Step 0: rows 0, 1 <- candidates 0, 1 (their old values go to
  // slots 4, 5); step 2: rows 2, 3 <- 2, 3; step 4: rows 0, 1 <- 4, 5: the values they held at the start.
  Case c(2, 0.0, 2, 10);
  const itr_lora_term &t = c.term(ITR_Q_PROJ);
  std::vector<float> A0(t.A, t.A + c.r * 8);
  for (int s = 0; s < 4; s++) ASSERT_EQ(itr_switch_step(c.sw, s, c.lora, c.model, nullptr, nullptr), ITR_OK);
  EXPECT_NE(std::memcmp(t.A, A0.data(), 2 * 8 * sizeof(float)), 0);
  ASSERT_EQ(itr_switch_step(c.sw, 4, c.lora, c.model, nullptr, nullptr), ITR_OK);
  EXPECT_EQ(std::memcmp(t.A, A0.data(), 2 * 8 * sizeof(float)), 0);  // bit for bit
  EXPECT_NE(std::memcmp(t.A + 16, A0.data() + 16, 2 * 8 * sizeof(float)), 0);
}

TEST(SwitchLoRA, CounterpartsFrozenAndMomentsReset) {
  // Step 0 switches A rows 0, 1 and B columns 2, 3 (B's pointer starts at r/2): B columns 0, 1 and A rows 2, 3
  // are frozen for 2 steps (gradient zero in steps 0 and 1) and their moments and ages reset. Step 1 switches
  // nothing (the next vectors are frozen); step 2 switches A rows 2, 3 and B columns 0, 1, freezing the others.
  Case c(2, 0.0, 2, 10);
  const int r = c.r;
  size_t n = itr_lora_set_n_params(c.lora);  // q_proj: A 4 x 8, B 8 x 4; then down_proj
  itr_adamw opt;
  ASSERT_EQ(itr_adamw_init(&opt, n), ITR_OK);
  opt.t = 3;
  ASSERT_EQ(itr_adamw_enable_age(&opt), ITR_OK);
  for (size_t i = 0; i < n; i++) opt.m[i] = opt.v[i] = 1;
  auto frozen = [&](size_t i, int s) {  // q_proj's entries only
    bool late = s == 2;
    if (i < (size_t)r * 8) return late ? i / 8 < 2 : i / 8 >= 2;                 // A row i / 8
    if (i < (size_t)r * 16) return late ? (i - r * 8) % r >= 2 : (i - r * 8) % r < 2;  // B column (i - 32) % r
    return false;
  };
  for (int s = 0; s < 3; s++) {
    std::vector<double> g(n, 1.0);
    ASSERT_EQ(itr_switch_step(c.sw, s, c.lora, c.model, g.data(), &opt), ITR_OK);
    for (size_t i = 0; i < (size_t)r * 16; i++) {
      bool z = frozen(i, s);
      EXPECT_EQ(g[i], z ? 0.0 : 1.0) << "step " << s << " entry " << i;
      if (s == 0) {
        EXPECT_EQ(opt.m[i], z ? 0.0 : 1.0) << "entry " << i;
        EXPECT_EQ(opt.age[i], z ? 0 : 3) << "entry " << i;
      }
    }
  }
  itr_adamw_fini(&opt);
}

TEST(SwitchLoRA, ScheduleDecaysToThirtyPercent) {
  itr_switch_opts o = {40, 0.1, 5, 1000, 0};
  EXPECT_NEAR(itr_switch_rate(&o, 16, 99), 16.0 * 0.3 / 40, 1e-15);  // at descent * steps
  EXPECT_NEAR(itr_switch_rate(&o, 16, 0), 16.0 * std::pow(0.3, 0.01) / 40, 1e-15);
  o.descent_rate = 0;
  EXPECT_EQ(itr_switch_rate(&o, 16, 500), 16.0 / 40);
}

TEST(SwitchLoRA, StateRoundTrip) {
  Case a(3, 0.5, 1, 20), b(3, 0.5, 1, 20);
  auto e0 = a.effective(ITR_DOWN_PROJ);
  for (int s = 0; s < 5; s++) {
    ASSERT_EQ(itr_switch_step(a.sw, s, a.lora, a.model, nullptr, nullptr), ITR_OK);
    EXPECT_LT(max_diff(a.effective(ITR_DOWN_PROJ), e0), 1e-5) << "step " << s;
  }
  double *state = nullptr;
  size_t len = 0;
  ASSERT_EQ(itr_switch_serialize(a.sw, &state, &len), ITR_OK);
  EXPECT_NE(itr_switch_deserialize(b.sw, state, len / 2), ITR_OK);  // truncated: refused
  ASSERT_EQ(itr_switch_deserialize(b.sw, state, len), ITR_OK);
  free(state);
  size_t nm;
  float *pa = itr_model_params(a.model, &nm), *pb = itr_model_params(b.model, &nm);
  std::memcpy(pb, pa, nm * sizeof(float));
  std::vector<float> flat(itr_lora_set_n_params(a.lora));
  itr_lora_set_pack(a.lora, flat.data());
  itr_lora_set_unpack(b.lora, flat.data());
  for (int s = 5; s < 12; s++) {
    ASSERT_EQ(itr_switch_step(a.sw, s, a.lora, a.model, nullptr, nullptr), ITR_OK);
    ASSERT_EQ(itr_switch_step(b.sw, s, b.lora, b.model, nullptr, nullptr), ITR_OK);
  }
  EXPECT_EQ(max_diff(a.effective(ITR_DOWN_PROJ), b.effective(ITR_DOWN_PROJ)), 0.0);
  EXPECT_EQ(std::memcmp(a.term(ITR_DOWN_PROJ).A, b.term(ITR_DOWN_PROJ).A, 4 * 12 * sizeof(float)), 0);
  int64_t sa, ha, sb, hb;
  itr_switch_counts(a.sw, &sa, &ha);
  itr_switch_counts(b.sw, &sb, &hb);
  EXPECT_EQ(sa, sb);
  EXPECT_GT(sa, 0);
}
