// The trainer's optimizer pieces (src/train/optim.c) against hand-derived values.
#include <cmath>
#include <vector>

#include <gtest/gtest.h>

#include "iteris/train.h"

TEST(Optim, LearningRateScheduleWarmupThenCosine) {
  // 10 steps, 2 of warmup, decaying to 0.1: s/2 during warmup, then 0.1 + 0.9 * 0.5 (1 + cos(pi (s - 2) / 8))
  EXPECT_DOUBLE_EQ(itr_train_lr_factor(0, 10, 2, 0.1), 0.0);
  EXPECT_DOUBLE_EQ(itr_train_lr_factor(1, 10, 2, 0.1), 0.5);
  EXPECT_NEAR(itr_train_lr_factor(2, 10, 2, 0.1), 1.0, 1e-15);
  EXPECT_NEAR(itr_train_lr_factor(6, 10, 2, 0.1), 0.55, 1e-15);  // half way: cos(pi/2) = 0
  EXPECT_NEAR(itr_train_lr_factor(10, 10, 2, 0.1), 0.1, 1e-15);
  EXPECT_NEAR(itr_train_lr_factor(4, 10, 0, 0.0), 0.5 * (1 + std::cos(M_PI * 0.4)), 1e-15);
}

TEST(Optim, AdamWFirstStepsByHand) {
  // step 1: m = (1-b1) g, v = (1-b2) g^2; bias-corrected m/(1-b1) = g, v/(1-b2) = g^2: p -= lr g / (|g| + eps),
  // after the decoupled decay p *= 1 - lr wd
  itr_adamw o;
  ASSERT_EQ(itr_adamw_init(&o, 2), ITR_OK);
  float p[2] = {1.0f, -2.0f};
  double g[2] = {0.5, -4.0};
  const double lr = 0.1, b1 = 0.9, b2 = 0.99, eps = 1e-3, wd = 0.01;
  itr_adamw_step(&o, p, g, lr, b1, b2, eps, wd);
  EXPECT_NEAR(p[0], 1.0 * (1 - lr * wd) - lr * 0.5 / (0.5 + eps), 1e-6);
  EXPECT_NEAR(p[1], -2.0 * (1 - lr * wd) + lr * 4.0 / (4.0 + eps), 1e-6);
  // step 2 with gradient 0: m = b1 (1-b1) g, v = b2 (1-b2) g^2; corrected by 1 - b1^2, 1 - b2^2
  double p0 = p[0], z[2] = {0, 0};
  itr_adamw_step(&o, p, z, lr, b1, b2, eps, wd);
  double mh = b1 * (1 - b1) * 0.5 / (1 - b1 * b1), vh = b2 * (1 - b2) * 0.25 / (1 - b2 * b2);
  EXPECT_NEAR(p[0], p0 * (1 - lr * wd) - lr * mh / (std::sqrt(vh) + eps), 1e-6);
  EXPECT_EQ(o.t, 2);
  itr_adamw_fini(&o);
}

TEST(Optim, ClipGradNormAsTorch) {
  double g[2] = {3.0, 4.0};  // norm 5
  EXPECT_DOUBLE_EQ(itr_clip_grad_norm(g, 2, 10.0), 5.0);
  EXPECT_DOUBLE_EQ(g[0], 3.0);  // under the limit: unchanged
  EXPECT_DOUBLE_EQ(itr_clip_grad_norm(g, 2, 1.0), 5.0);
  EXPECT_NEAR(g[0], 3.0 / (5.0 + 1e-6), 1e-15);
  EXPECT_NEAR(g[1], 4.0 / (5.0 + 1e-6), 1e-15);
  double h[1] = {2.0};
  itr_clip_grad_norm(h, 1, 0.0);  // 0: no clipping
  EXPECT_DOUBLE_EQ(h[0], 2.0);
}
