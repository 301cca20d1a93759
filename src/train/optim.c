/* The optimizer of the trainer: AdamW as torch.optim.AdamW, gradient-norm clipping as
 * torch.nn.utils.clip_grad_norm_, and the warmup + cosine learning-rate schedule. Pure functions
 * of their arguments: every rank runs them on the same summed gradient and stays in step. */
#include <math.h>
#include <stdlib.h>

#include "iteris/train.h"

double itr_train_lr_factor(int s, int steps, int warmup, double min_ratio) {
  if (warmup > 0 && s < warmup) return (double)s / (double)warmup;
  int span = steps - warmup;
  double progress = span > 0 ? (double)(s - warmup) / (double)span : 0.0;
  if (progress > 1) progress = 1;
  return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + cos(3.14159265358979323846 * progress));
}

itr_err itr_adamw_init(itr_adamw *o, size_t n) {
  o->n = n;
  o->t = 0;
  o->m = o->v = NULL;
  o->age = NULL;
  ITR_TRY(itr_calloc(n ? n : 1, sizeof(double), "AdamW first moments", &o->m));
  itr_err err = itr_calloc(n ? n : 1, sizeof(double), "AdamW second moments", &o->v);
  if (err != ITR_OK) {
    free(o->m);
    o->m = NULL;
    return itr_error_frame(err, __func__, __FILE__, __LINE__);
  }
  return ITR_OK;
}

void itr_adamw_fini(itr_adamw *o) {
  free(o->m);
  free(o->v);
  free(o->age);
  o->m = o->v = NULL;
  o->age = NULL;
}

itr_err itr_adamw_enable_age(itr_adamw *o) {
  if (o->age) return ITR_OK;
  ITR_TRY(itr_calloc(o->n ? o->n : 1, sizeof(int32_t), "AdamW step per entry", &o->age));
  for (size_t i = 0; i < o->n; i++) o->age[i] = (int32_t)o->t;
  return ITR_OK;
}

void itr_adamw_reset(itr_adamw *o, size_t first, size_t count, size_t stride) {
  for (size_t k = 0, i = first; k < count; k++, i += stride) {
    o->m[i] = o->v[i] = 0;
    if (o->age) o->age[i] = 0;
  }
}

void itr_adamw_step(itr_adamw *o, float *params, const double *g, double lr, double beta1, double beta2,
                    double eps, double weight_decay) {
  o->t++;
  double c1 = 1.0 - pow(beta1, (double)o->t), c2 = 1.0 - pow(beta2, (double)o->t);
  int32_t last = -1;
  for (size_t i = 0; i < o->n; i++) {
    if (o->age && ++o->age[i] != last) { /* runs of equal ages: one pow pair per run */
      last = o->age[i];
      c1 = 1.0 - pow(beta1, (double)last), c2 = 1.0 - pow(beta2, (double)last);
    }
    double p = params[i] * (1.0 - lr * weight_decay);
    o->m[i] = beta1 * o->m[i] + (1.0 - beta1) * g[i];
    o->v[i] = beta2 * o->v[i] + (1.0 - beta2) * g[i] * g[i];
    p -= lr * (o->m[i] / c1) / (sqrt(o->v[i] / c2) + eps);
    params[i] = (float)p;
  }
}

double itr_clip_grad_norm(double *g, size_t n, double max_norm) {
  double ss = 0;
  for (size_t i = 0; i < n; i++) ss += g[i] * g[i];
  double norm = sqrt(ss);
  if (max_norm > 0) {
    double coef = max_norm / (norm + 1e-6);
    if (coef < 1)
      for (size_t i = 0; i < n; i++) g[i] *= coef;
  }
  return norm;
}
