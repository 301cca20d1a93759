// Fidelity metrics against hand-computed values.
#include <cmath>

#include <gtest/gtest.h>

#include "iteris/eval.h"

TEST(Fidelity, KlOfHandComputedDistributions) {
  // p = softmax(log(0.5), log(0.25), log(0.25)), q uniform over 3: KL = sum p log(3p)
  float p[3] = {std::log(0.5f), std::log(0.25f), std::log(0.25f)};
  float q[3] = {7.0f, 7.0f, 7.0f};  // shift-invariant: uniform
  double want = 0.5 * std::log(1.5) + 2 * 0.25 * std::log(0.75);
  EXPECT_NEAR(itr_kl_logits(p, q, 3), want, 1e-7);
  EXPECT_NEAR(itr_kl_logits(p, p, 3), 0.0, 1e-12);
}

TEST(Fidelity, RatioAndTop1) {
  // two positions, V = 2; the merged model equals the task model at position 0 and the base at 1
  float task[4] = {2, 0, 0, 3}, base[4] = {0, 1, 1, 0}, merged[4] = {2, 0, 1, 0};
  itr_fidelity_acc acc = {0, 0, 0, 0};
  itr_fidelity_add(&acc, task, merged, base, 2, 2);
  double klr, top1;
  itr_fidelity_result(&acc, &klr, &top1);
  double kl1 = itr_kl_logits(task + 2, base + 2, 2);
  double kl0 = itr_kl_logits(task, base, 2);
  EXPECT_NEAR(klr, kl1 / (kl0 + kl1), 1e-12);
  EXPECT_DOUBLE_EQ(top1, 0.5);
  EXPECT_EQ(acc.n, 2);
}

TEST(Calibration, EceOfHandBinnedPredictions) {
  // 10 bins. Confidences 0.95, 0.95 (one right): bin 10, acc 0.5 conf 0.95 -> 2 * 0.45;
  // 0.55 right, 0.6 wrong: bins 6, 6: acc 0.5, conf 0.575 -> 2 * 0.075; 0.3 right: bin 3 -> 0.7. Total / 5.
  double conf[5] = {0.95, 0.95, 0.55, 0.6, 0.3};
  int correct[5] = {1, 0, 1, 0, 1};
  EXPECT_NEAR(itr_ece(conf, correct, 5, 10), (0.9 + 0.15 + 0.7) / 5, 1e-12);
  // a bin's upper edge belongs to it: 0.6 is in (0.5, 0.6]; 1.0 in the last bin
  double c2[2] = {0.6, 1.0};
  int k2[2] = {1, 1};
  EXPECT_NEAR(itr_ece(c2, k2, 2, 10), (0.4 + 0.0) / 2, 1e-12);
  EXPECT_TRUE(std::isnan(itr_ece(conf, correct, 0, 10)));
}

TEST(Calibration, LogSoftmaxAt) {
  float z[3] = {1.0f, 2.0f, 3.0f};
  double lse = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0));
  EXPECT_NEAR(itr_log_softmax_at(z, 3, 1), 2.0 - lse, 1e-12);
}
