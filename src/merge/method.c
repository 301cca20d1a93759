/* The method table: one entry per merge method (include/iteris/merge.h says what each field means;
 * docs/METHODS.md how to add a method). */
#include <stdio.h>
#include <string.h>

#include "iteris/merge.h"

static const itr_method methods_[ITR_METHOD_COUNT] = {
    {"iteris", ITR_METHOD_ITERIS, ITR_METHOD_STATS | ITR_METHOD_ITERATES | ITR_METHOD_ADAPTIVE | ITR_METHOD_FEATURES,
     "max_iter alpha_1 alpha_2 reg_coef manual_coef with_pretrain restart solve_groups stages max_tokens system "
     "fidelity_per_iter",
     itr_iteris_terms, "IterIS (CVPR 2025): iterated inference-solving alignment, adaptive weights"},
    {"regmean", ITR_METHOD_REGMEAN, ITR_METHOD_STATS | ITR_METHOD_GRAM_DIAG | ITR_METHOD_FEATURES,
     "alpha_2 regmean_alpha solve_groups stages max_tokens system", itr_regmean_terms,
     "RegMean (ICLR 2023): one regression on the source models' inputs"},
    {"task_arithmetic", ITR_METHOD_TASK_ARITHMETIC, ITR_METHOD_FEATURES, "manual_coef ta_lambda", NULL,
     "task arithmetic: lambda sum_i w_i dW_i, exact rank R"},
    {"ties", ITR_METHOD_TIES, ITR_METHOD_DENSE, "manual_coef ta_lambda density", NULL,
     "TIES: trim, elect sign, disjoint mean (dense: -out_rank)"},
    {"dare", ITR_METHOD_DARE, ITR_METHOD_DENSE, "manual_coef ta_lambda density dare_p dare_ties seed", NULL,
     "DARE: random drop and rescale (dense: -out_rank)"},
    {"knots", ITR_METHOD_KNOTS, 0, "manual_coef ta_lambda density", NULL,
     "KnOTS-TIES: TIES on the aligned right singular vectors"},
};

const itr_method *itr_method_find(const char *name) {
  for (int i = 0; i < ITR_METHOD_COUNT; i++)
    if (strcmp(methods_[i].name, name) == 0) return &methods_[i];
  return NULL;
}

const itr_method *itr_method_get(itr_method_id id) { return &methods_[id]; }

int itr_method_reads(const itr_method *m, const char *option) {
  const size_t n = strlen(option);
  for (const char *p = m->options; (p = strstr(p, option)) != NULL; p += n)
    if ((p == m->options || p[-1] == ' ') && (p[n] == ' ' || p[n] == 0)) return 1;
  return 0;
}

void itr_method_names(const char *sep, char *buf, size_t len) {
  size_t used = 0;
  if (len) buf[0] = 0;
  for (int i = 0; i < ITR_METHOD_COUNT && used < len; i++) {
    int w = snprintf(buf + used, len - used, "%s%s", i ? sep : "", methods_[i].name);
    if (w < 0) break;
    used += (size_t)w;
  }
}
