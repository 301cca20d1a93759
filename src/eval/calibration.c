/* Scores of predictions against labels: log-softmax of a logit row at one id, and the expected
 * calibration error over equal-width confidence bins. Pure functions (include/iteris/eval.h). */
#include <math.h>
#include <stdlib.h>

#include "iteris/eval.h"

double itr_log_softmax_at(const float *logits, int64_t V, int64_t id) {
  double mx = logits[0];
  for (int64_t j = 1; j < V; j++)
    if (logits[j] > mx) mx = logits[j];
  double sum = 0;
  for (int64_t j = 0; j < V; j++) sum += exp((double)logits[j] - mx);
  return (double)logits[id] - mx - log(sum);
}

double itr_ece(const double *conf, const int *correct, int64_t n, int bins) {
  if (n <= 0 || bins <= 0) return NAN;
  double total = 0;
  for (int b = 0; b < bins; b++) {
    double sc = 0, sa = 0;
    int64_t cnt = 0;
    for (int64_t i = 0; i < n; i++) {
      /* bin b holds confidences in (b/bins, (b+1)/bins]; bin 0 also 0 */
      int k = (int)ceil(conf[i] * bins) - 1;
      if (k < 0) k = 0;
      if (k >= bins) k = bins - 1;
      if (k != b) continue;
      sc += conf[i];
      sa += correct[i] ? 1.0 : 0.0;
      cnt++;
    }
    if (cnt > 0) total += fabs(sa - sc); /* = cnt |acc - conf| */
  }
  return total / (double)n;
}
