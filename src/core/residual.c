/* The one scaled residual of every solve (include/iteris/core.h). */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "iteris/core.h"

double itr_scaled_residual(double r_inf, double a_inf, double x_inf, double b_inf, int64_t n) {
  const double eps = DBL_EPSILON / 2; /* 2^-53, LAPACK's dlamch('E'), as HPL */
  const double den = (a_inf * x_inf + b_inf) * (double)n * eps;
  if (isnan(r_inf) || isnan(den)) return NAN;
  return den > 0 ? r_inf / den : (r_inf == 0 ? 0.0 : INFINITY);
}

int itr_residual_passed(double scaled) { return scaled < ITR_RESIDUAL_THRESHOLD; }

itr_err itr_residual_error(const char *label, double scaled, double alpha_2) {
  return itr_error_set(ITR_ERR_NUMERIC,
                       "module '%s': the solve's scaled residual is %.3g, above %.0f (FAILED): its system T2 is too "
                       "ill-conditioned for float64. Raise -alpha_2 (now %g), e.g. -alpha_2 %g",
                       label, scaled, ITR_RESIDUAL_THRESHOLD, alpha_2, alpha_2 > 0 ? alpha_2 * 100 : 1e-6);
}

static char fault_label_[256];

void itr_fault_residual_set(const char *label) { snprintf(fault_label_, sizeof fault_label_, "%s", label ? label : ""); }

int itr_fault_residual(const char *label) { return fault_label_[0] && label && strcmp(label, fault_label_) == 0; }
