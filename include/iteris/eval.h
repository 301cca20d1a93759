/* iteris-mpi eval: label-free fidelity of a merged model (ALGORITHM.md, "Label-free fidelity").
 * For task i on its held-out tokens, with p_i the next-token distribution of base + adapter i,
 * p_M that of the merged model and p_0 that of the base model:
 *   kl_ratio_i = mean KL(p_i || p_M) / mean KL(p_i || p_0)   (0 perfect, 1 as bad as no adapter)
 *   top1_i     = fraction of positions where argmax p_M == argmax p_i
 * Accumulators are additive over token blocks, so ranks sum them (Not Collective here). */
#ifndef ITERIS_EVAL_H
#define ITERIS_EVAL_H

#include <stdint.h>

#include "iteris/core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  double kl_merged; /* sum over positions of KL(p_i || p_M), nats */
  double kl_base;   /* sum over positions of KL(p_i || p_0), nats */
  double top1;      /* number of positions where argmax p_M == argmax p_i */
  double n;         /* number of positions */
} itr_fidelity_acc;

/* Adds T positions. logits_task, logits_merged, logits_base: (T, V) f32 each. Not Collective. */
void itr_fidelity_add(itr_fidelity_acc *acc, const float *logits_task, const float *logits_merged,
                      const float *logits_base, int64_t T, int64_t V);
/* kl_ratio (NaN when kl_base is 0: the adapter does not change the model) and top1 fraction. */
void itr_fidelity_result(const itr_fidelity_acc *acc, double *kl_ratio, double *top1);
/* KL(p || q) in nats for two logit rows of length V (log-softmax in float64). */
double itr_kl_logits(const float *logits_p, const float *logits_q, int64_t V);

/* ---- scoring against labels (calibration.c) ---------------------------------------------------- */

/* log softmax(logits)[id] of one row of length V, in float64. */
double itr_log_softmax_at(const float *logits, int64_t V, int64_t id);
/* Expected calibration error of n predictions with confidence conf[i] (the probability given to the
 * predicted class) and correct[i] (1: the prediction was right): sum over `bins` equal-width bins
 * (lo, hi] of [0, 1] of |bin| / n * |accuracy(bin) - mean confidence(bin)|. NaN when n = 0. */
double itr_ece(const double *conf, const int *correct, int64_t n, int bins);

#ifdef __cplusplus
}
#endif
#endif
