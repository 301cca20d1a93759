/* Label-free fidelity: KL divergences and top-1 agreement between next-token distributions. */
#include <math.h>

#include "iteris/eval.h"

/* log-sum-exp of a row, in float64 */
static double lse(const float *x, int64_t V) {
  double m = -INFINITY;
  for (int64_t v = 0; v < V; v++) m = x[v] > m ? x[v] : m;
  double s = 0;
  for (int64_t v = 0; v < V; v++) s += exp((double)x[v] - m);
  return m + log(s);
}

static int64_t argmax(const float *x, int64_t V) {
  int64_t best = 0;
  for (int64_t v = 1; v < V; v++)
    if (x[v] > x[best]) best = v;
  return best;
}

double itr_kl_logits(const float *p, const float *q, int64_t V) {
  double lp = lse(p, V), lq = lse(q, V), kl = 0;
  for (int64_t v = 0; v < V; v++) {
    double logp = (double)p[v] - lp;
    kl += exp(logp) * (logp - ((double)q[v] - lq));
  }
  return kl > 0 ? kl : 0; /* rounding can give -1e-17 */
}

void itr_fidelity_add(itr_fidelity_acc *acc, const float *lt, const float *lm, const float *lb, int64_t T,
                      int64_t V) {
  for (int64_t t = 0; t < T; t++) {
    const float *a = lt + t * V, *m = lm + t * V, *b = lb + t * V;
    acc->kl_merged += itr_kl_logits(a, m, V);
    acc->kl_base += itr_kl_logits(a, b, V);
    acc->top1 += argmax(a, V) == argmax(m, V);
    acc->n += 1;
  }
}

void itr_fidelity_result(const itr_fidelity_acc *acc, double *kl_ratio, double *top1) {
  *kl_ratio = acc->kl_base > 0 ? acc->kl_merged / acc->kl_base : NAN;
  *top1 = acc->n > 0 ? acc->top1 / acc->n : NAN;
}
