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
