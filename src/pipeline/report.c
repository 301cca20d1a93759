/* merge_report.json and the summary printed at the end of a merge. */
#include <cjson/cJSON.h>
#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/pipeline_internal.h"

static cJSON *num_or_null(double v) { return isfinite(v) ? cJSON_CreateNumber(v) : cJSON_CreateNull(); }

/* DIR/merge_report.json from root (deleted here), atomically. */
static itr_err write_report(cJSON *root, const char *dir) {
  char *text = cJSON_Print(root);
  cJSON_Delete(root);
  ITR_CHECK(text, ITR_ERR_INTERNAL, "out of memory printing the merge report");
  char path[ITR_PATH_MAX + 32];
  snprintf(path, sizeof path, "%s/merge_report.json", dir);
  itr_err e = itr_iofile_write_atomic(path, text, strlen(text));
  free(text);
  return e;
}

static cJSON *options_json(const itr_merge_opts *o) {
  cJSON *j = cJSON_CreateObject();
  cJSON_AddStringToObject(j, "base", o->base);
  if (o->features[0]) cJSON_AddStringToObject(j, "features", o->features);
  cJSON *ad = cJSON_AddArrayToObject(j, "adapters"), *ca = cJSON_AddArrayToObject(j, "calib"),
        *ho = cJSON_AddArrayToObject(j, "heldout"), *mc = cJSON_AddArrayToObject(j, "manual_coef");
  for (int i = 0; i < o->n_adapters; i++) {
    cJSON_AddItemToArray(ad, cJSON_CreateString(o->adapters[i]));
    cJSON_AddItemToArray(mc, cJSON_CreateNumber(o->manual_coef[i]));
  }
  for (int i = 0; i < o->n_calib; i++) cJSON_AddItemToArray(ca, cJSON_CreateString(o->calib[i]));
  for (int i = 0; i < o->n_heldout; i++) cJSON_AddItemToArray(ho, cJSON_CreateString(o->heldout[i]));
  cJSON_AddStringToObject(j, "out", o->out);
  cJSON_AddStringToObject(j, "method", o->method);
  cJSON_AddNumberToObject(j, "max_iter", o->max_iter);
  cJSON_AddNumberToObject(j, "alpha_1", o->alpha_1);
  cJSON_AddNumberToObject(j, "alpha_2", o->alpha_2);
  cJSON_AddNumberToObject(j, "reg_coef", o->reg_coef);
  cJSON_AddNumberToObject(j, "with_pretrain", o->with_pretrain);
  cJSON_AddNumberToObject(j, "out_rank", o->out_rank);
  cJSON_AddStringToObject(j, "out_dtype", o->out_dtype);
  cJSON_AddNumberToObject(j, "ta_lambda", o->ta_lambda);
  cJSON_AddNumberToObject(j, "regmean_alpha", o->regmean_alpha);
  return j;
}

itr_err merge_report_write(const merge_ctx *c, const char *dir) {
  const int L = c->cfg.num_hidden_layers, N = c->N;
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "tool", "iteris-mpi");
  cJSON_AddItemToObject(root, "options", options_json(c->opt));
  cJSON_AddNumberToObject(root, "ranks", c->size);
  cJSON_AddNumberToObject(root, "stages", c->n_stages);
  cJSON_AddNumberToObject(root, "iterations", c->iters_done);
  cJSON_AddNumberToObject(root, "seconds_merge", c->seconds_merge);
  if (c->n_stages > 1) { /* where each stage's time went: its iterations, and waiting for its input */
    cJSON *sa = cJSON_AddArrayToObject(root, "stage_timings");
    for (int h = 0; h < c->n_stages; h++) {
      cJSON *o = cJSON_CreateObject();
      int lo, hi;
      merge_stage_layers(h, c->n_stages, L, &lo, &hi);
      cJSON_AddNumberToObject(o, "stage", h + 1);
      cJSON_AddNumberToObject(o, "first_layer", lo);
      cJSON_AddNumberToObject(o, "last_layer", hi - 1);
      cJSON_AddNumberToObject(o, "seconds", c->stage_secs[h][0]);
      cJSON_AddNumberToObject(o, "seconds_waiting", c->stage_secs[h][1]);
      cJSON_AddItemToArray(sa, o);
    }
  }
  cJSON_AddNumberToObject(root, "residual_threshold", ITR_RESIDUAL_THRESHOLD);
  if (c->opt->out_rank > 0) cJSON_AddNumberToObject(root, "energy_kept_min", c->energy_kept_min);

  cJSON *tasks = cJSON_AddArrayToObject(root, "tasks");
  for (int i = 0; i < N; i++) {
    cJSON *t = cJSON_CreateObject();
    cJSON_AddStringToObject(t, "adapter", c->opt->adapters[i]);
    cJSON_AddNumberToObject(t, "r", c->ad[i]->r);
    cJSON_AddNumberToObject(t, "lora_alpha", c->ad[i]->lora_alpha);
    if (c->opt->n_calib > i) {
      cJSON_AddNumberToObject(t, "calib_sequences", c->calib[i].n_seqs);
      cJSON_AddNumberToObject(t, "calib_tokens", (double)c->calib[i].n_tokens);
    }
    if (c->evaluated) {
      cJSON_AddItemToObject(t, "kl_ratio", num_or_null(c->kl_ratio[i]));
      cJSON_AddItemToObject(t, "top1", num_or_null(c->top1[i]));
    }
    if (merge_fidelity_per_iter(c)) { /* null: not measured (an iteration before a -restart) */
      cJSON *kl = cJSON_AddArrayToObject(t, "kl_ratio_per_iteration"), *t1 = cJSON_AddArrayToObject(t, "top1_per_iteration");
      for (int k = 0; k < merge_n_iters(c); k++) {
        cJSON_AddItemToArray(kl, num_or_null(c->kl_iter[(size_t)k * (size_t)N + (size_t)i]));
        cJSON_AddItemToArray(t1, num_or_null(c->top1_iter[(size_t)k * (size_t)N + (size_t)i]));
      }
    }
    cJSON_AddItemToArray(tasks, t);
  }
  if (c->evaluated) {
    double kl = 0, t1 = 0;
    for (int i = 0; i < N; i++) kl += c->kl_ratio[i] / N, t1 += c->top1[i] / N;
    cJSON *f = cJSON_AddObjectToObject(root, "fidelity_mean");
    cJSON_AddItemToObject(f, "kl_ratio", num_or_null(kl));
    cJSON_AddItemToObject(f, "top1", num_or_null(t1));
  }

  /* per module: adaptive weights and the residual of every iteration's solve */
  cJSON *mods = cJSON_AddArrayToObject(root, "modules");
  const int K = merge_n_iters(c);
  for (int l = 0; l < L; l++)
    for (int m = 0; m < c->arch.n_modules; m++) {
      if (!TARGETED(c, m)) continue;
      size_t slot = SLOT(l, m);
      cJSON *j = cJSON_CreateObject();
      char name[96];
      snprintf(name, sizeof name, "layers.%d.%s.%s", l, c->arch.module[m].block, c->arch.module[m].name);
      cJSON_AddStringToObject(j, "module", name);
      cJSON_AddNumberToObject(j, "rank", (double)c->cur[slot].rank);
      if (c->opt->out_rank > 0) {
        cJSON_AddNumberToObject(j, "out_rank", c->opt->out_rank);
        cJSON_AddItemToObject(j, "energy_kept", num_or_null(c->energy_kept[slot]));
      }
      if (c->method->flags & ITR_METHOD_ADAPTIVE) {
        cJSON *w = cJSON_AddArrayToObject(j, "adaptive_weight");
        for (int i = 0; i < N; i++) cJSON_AddItemToArray(w, num_or_null(c->coef[slot * (size_t)N + (size_t)i]));
      }
      if (c->method->flags & ITR_METHOD_STATS) {
        cJSON *r = cJSON_AddArrayToObject(j, "scaled_residual");
        for (int k = 0; k < c->iters_done && k < K; k++)
          cJSON_AddItemToArray(r, num_or_null(c->resid[(size_t)k * NSLOTS(c) + slot]));
      }
      if (c->method->flags & ITR_METHOD_ITERATES) { /* ||dW_k - dW_k-1|| / ||dW_k||: null for k = 1 */
        cJSON *r = cJSON_AddArrayToObject(j, "update_change");
        for (int k = 0; k < c->iters_done && k < K; k++)
          cJSON_AddItemToArray(r, num_or_null(c->change[(size_t)k * NSLOTS(c) + slot]));
      }
      cJSON_AddItemToArray(mods, j);
    }
  return write_report(root, dir);
}

itr_err merge_report_write_modules(const itr_merge_opts *o, const itr_method *method, int ranks, double seconds,
                                  double energy_kept_min, int n, const report_module *mods, const char *dir) {
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "tool", "iteris-mpi");
  cJSON_AddStringToObject(root, "mode", "features");
  cJSON_AddItemToObject(root, "options", options_json(o));
  cJSON_AddNumberToObject(root, "ranks", ranks);
  cJSON_AddNumberToObject(root, "stages", 1);
  cJSON_AddNumberToObject(root, "iterations", 1);
  cJSON_AddNumberToObject(root, "seconds_merge", seconds);
  cJSON_AddNumberToObject(root, "residual_threshold", ITR_RESIDUAL_THRESHOLD);
  if (o->out_rank > 0) cJSON_AddNumberToObject(root, "energy_kept_min", energy_kept_min);
  cJSON *tasks = cJSON_AddArrayToObject(root, "tasks");
  for (int i = 0; i < o->n_adapters; i++) {
    cJSON *t = cJSON_CreateObject();
    cJSON_AddStringToObject(t, "adapter", o->adapters[i]);
    cJSON_AddItemToArray(tasks, t);
  }
  cJSON *ma = cJSON_AddArrayToObject(root, "modules");
  for (int q = 0; q < n; q++) {
    const report_module *m = &mods[q];
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "module", m->name);
    cJSON_AddNumberToObject(j, "d_out", (double)m->d_out);
    cJSON_AddNumberToObject(j, "d_in", (double)m->d_in);
    cJSON_AddNumberToObject(j, "rank", (double)m->rank);
    if (o->out_rank > 0) {
      cJSON_AddNumberToObject(j, "out_rank", o->out_rank);
      cJSON_AddItemToObject(j, "energy_kept", num_or_null(m->energy_kept));
    }
    if (method->flags & ITR_METHOD_ADAPTIVE) {
      cJSON *w = cJSON_AddArrayToObject(j, "adaptive_weight");
      for (int i = 0; i < o->n_adapters; i++) cJSON_AddItemToArray(w, num_or_null(m->coef[i]));
    }
    if (method->flags & ITR_METHOD_STATS) {
      cJSON *r = cJSON_AddArrayToObject(j, "scaled_residual");
      cJSON_AddItemToArray(r, num_or_null(m->residual));
    }
    cJSON_AddItemToArray(ma, j);
  }
  return write_report(root, dir);
}

/* Writes one table of the plot's data: x = iteration (per_iter) or layer, a column per targeted
 * module: the largest value of v (K x L x modules) over the other axis (from iteration k0 on). */
static void plot_table(const merge_ctx *c, FILE *f, const char *title, const double *v, int K, int k0, int per_iter) {
  const int L = c->arch.n_layers;
  fprintf(f, "# %s\n%s", title, per_iter ? "iteration" : "layer");
  for (int m = 0; m < c->arch.n_modules; m++)
    if (TARGETED(c, m)) fprintf(f, " %s", c->arch.module[m].name);
  fprintf(f, "\n");
  for (int x = per_iter ? k0 : 0; x < (per_iter ? K : L); x++) {
    fprintf(f, "%d", x + 1);
    for (int m = 0; m < c->arch.n_modules; m++) {
      if (!TARGETED(c, m)) continue;
      double w = NAN;
      for (int k = per_iter ? x : k0; k < (per_iter ? x + 1 : K); k++)
        for (int l = per_iter ? 0 : x; l < (per_iter ? L : x + 1); l++) {
          const double y = v[(size_t)k * NSLOTS(c) + SLOT(l, m)];
          if (!isnan(y) && !(y <= w)) w = y;
        }
      if (isnan(w)) fprintf(f, " NaN");
      else fprintf(f, " %.6e", w);
    }
    fprintf(f, "\n");
  }
  fprintf(f, "\n\n");
}

void merge_report_plot(const merge_ctx *c, const char *dir) {
  const int K = c->iters_done < merge_n_iters(c) ? c->iters_done : merge_n_iters(c), L = c->arch.n_layers;
  if (!c->opt->plots || !(c->method->flags & ITR_METHOD_STATS) || K < 1) return;
  /* with iterations: the update's change per iteration (convergence) above the residuals per iteration;
   * one iteration: the residuals per layer. One line per module, its largest value over the layers. */
  const int per_iter = K >= 2;
  char dat[ITR_PATH_MAX + 32], png[ITR_PATH_MAX + 32];
  snprintf(dat, sizeof dat, "%s/convergence.dat", dir);
  snprintf(png, sizeof png, "%s/convergence.png", dir);
  FILE *f = fopen(dat, "w");
  if (!f) {
    itr_log(ITR_LOG_WARN, "cannot write %s: no convergence plot", dat);
    return;
  }
  if (per_iter) plot_table(c, f, "||dW_k - dW_k-1||_F / ||dW_k||_F, largest over the layers", c->change, K, 1, 1);
  int change_pos = 0; /* a log scale needs a positive value: a fixed point from iteration 2 on (one adapter) has none */
  for (size_t q = NSLOTS(c); per_iter && q < (size_t)K * NSLOTS(c); q++) change_pos |= c->change[q] > 0;
  plot_table(c, f, per_iter ? "scaled residual (HPL) of the solves, largest over the layers"
                            : "scaled residual (HPL) of the solves",
             c->resid, K, 0, per_iter);
  int fid = 0; /* -fidelity_per_iter: kl_ratio per iteration and task, and their mean */
  for (int q = 0; per_iter && merge_fidelity_per_iter(c) && q < K * c->N; q++) fid |= !isnan(c->kl_iter[q]);
  if (fid) {
    fprintf(f, "# kl_ratio of the merged model on each task's held-out sequences (0: as the task's adapter, 1: as "
               "the base model)\niteration");
    for (int i = 0; i < c->N; i++) { /* the adapter folder's name, as a one-word column header */
      const char *a = c->opt->adapters[i], *b = a + strlen(a);
      while (b > a && b[-1] == '/') b--;
      const char *s = b;
      while (s > a && s[-1] != '/') s--;
      if (s == b) fprintf(f, " task%d", i + 1);
      else fputc(' ', f);
      for (; s < b; s++) fputc(isspace((unsigned char)*s) || *s == '"' || *s == '\'' ? '_' : *s, f);
    }
    fprintf(f, " mean\n");
    for (int k = 0; k < K; k++) {
      double mean = 0;
      fprintf(f, "%d", k + 1);
      for (int i = 0; i < c->N; i++) {
        const double v = c->kl_iter[(size_t)k * (size_t)c->N + (size_t)i];
        mean += v / c->N;
        if (isnan(v)) fprintf(f, " NaN");
        else fprintf(f, " %.6e", v);
      }
      if (isnan(mean)) fprintf(f, " NaN\n");
      else fprintf(f, " %.6e\n", mean);
    }
    fprintf(f, "\n\n");
  }
  const int ok = fclose(f) == 0;
  FILE *g = ok ? popen("gnuplot 2>/dev/null", "w") : NULL;
  if (!g) {
    itr_log(ITR_LOG_WARN, "gnuplot did not start: %s has the numbers, no convergence.png", dat);
    return;
  }
  fprintf(g,
          "set terminal pngcairo size 900,%d font ',11' noenhanced\nset output '%s'\n"
          "set logscale y\nset format y '%%.0e'\nset grid\nset key outside right autotitle columnheader\n"
          "set xtics 1\nset datafile missing 'NaN'\nset lmargin 12\nset rmargin 24\n",
          per_iter ? (fid ? 1180 : 820) : 480, png);
  if (per_iter) {
    fprintf(g,
            "set multiplot layout %d,1 title 'iteris-mpi -method %s: %d adapters, %d layers, %d iterations'\n"
            "set ylabel 'relative change of dW'\nset xlabel 'iteration'\n%s"
            "plot for [col=2:*] '%s' index 0 using 1:col with linespoints lw 2 pt 7\n"
            "set logscale y\nset format y '%%.0e'\nset autoscale y\nset ylabel 'scaled residual (PASSED < 16)'\n"
            "plot for [col=2:*] '%s' index 1 using 1:col with linespoints lw 2 pt 7\n",
            fid ? 3 : 2, c->opt->method, c->N, L, K,
            change_pos ? "" : "unset logscale y\nset format y '%.1f'\nset yrange [0:1]\n", dat, dat);
    if (fid)
      fprintf(g,
              "set ylabel 'held-out kl_ratio (0: task adapter, 1: base)'\nunset logscale y\nset format y '%%.3f'\n"
              "plot for [col=2:*] '%s' index 2 using 1:col with linespoints lw 2 pt 7\n",
              dat);
    fprintf(g, "unset multiplot\n");
  }
  else
    fprintf(g,
            "set title 'iteris-mpi -method %s: %d adapters, %d layers: scaled residual of each solve (PASSED < 16)'\n"
            "set xlabel 'layer'\nset ylabel 'scaled residual'\n"
            "plot for [col=2:*] '%s' index 0 using 1:col with linespoints lw 2 pt 7\n",
            c->opt->method, c->N, L, dat);
  if (pclose(g) != 0) {
    remove(png);
    itr_log(ITR_LOG_WARN, "gnuplot failed: %s has the numbers, no convergence.png", dat);
  }
}

void merge_report_print(const merge_ctx *c, FILE *f) {
  fprintf(f, "merged %d adapters with %s in %.2f s on %d rank(s): %s\n", c->N, c->opt->method, c->seconds_merge,
          c->size, c->opt->out);
  if (c->opt->out_rank > 0)
    fprintf(f, "written at rank %d: kept energy ||kept||^2/||dW||^2 >= %.6f in every module (per module in merge_report.json)\n",
            c->opt->out_rank, c->energy_kept_min);
  if (!c->evaluated) return;
  fprintf(f, "%-8s %-40s %10s %8s\n", "task", "adapter", "kl_ratio", "top1");
  double kl = 0, t1 = 0;
  for (int i = 0; i < c->N; i++) {
    fprintf(f, "%-8d %-40s %10.4f %8.4f\n", i, c->opt->adapters[i], c->kl_ratio[i], c->top1[i]);
    kl += c->kl_ratio[i] / c->N;
    t1 += c->top1[i] / c->N;
  }
  fprintf(f, "%-8s %-40s %10.4f %8.4f\n", "mean", c->opt->method, kl, t1);
  fflush(f);
}
