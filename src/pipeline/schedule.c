/* Rank 0's decisions, in one place: which rank holds which calibration sequence, which layers each
 * pipeline stage holds, and which -solve_groups group solves which module. Each is a pure function
 * of its inputs, so every rank computes the same answer (or rank 0 computes it and broadcasts it).
 * Not Collective. */
#include <stdlib.h>
#include <string.h>

#include "pipeline/pipeline_internal.h"

/* ---- partition of sequences over ranks ------------------------------------------------------ */

/* Assigns the sequences of ts to ranks, longest first, each to the rank with the fewest tokens so
 * far (lowest rank on ties): deterministic, the same on every rank. */
itr_err merge_shard_owners(const itr_token_set *ts, int size, int *owner) {
  const int n = ts->n_seqs;
  int *order = NULL;
  int64_t *load = NULL;
  itr_err e = itr_calloc((size_t)(n ? n : 1), sizeof(int), "sequence order", &order);
  if (e == ITR_OK) e = itr_calloc((size_t)size, sizeof(int64_t), "rank loads", &load);
  if (e != ITR_OK) {
    free(order);
    return e;
  }
  for (int s = 0; s < n; s++) order[s] = s;
  /* insertion sort by length, descending, stable (n is a few dozen to a few thousand) */
  for (int a = 1; a < n; a++) {
    int v = order[a], b = a;
    int64_t lv = ts->offsets[v + 1] - ts->offsets[v];
    while (b > 0 && ts->offsets[order[b - 1] + 1] - ts->offsets[order[b - 1]] < lv) {
      order[b] = order[b - 1];
      b--;
    }
    order[b] = v;
  }
  for (int a = 0; a < n; a++) {
    int s = order[a], best = 0;
    for (int p = 1; p < size; p++)
      if (load[p] < load[best]) best = p;
    owner[s] = best;
    load[best] += ts->offsets[s + 1] - ts->offsets[s];
  }
  free(load);
  free(order);
  return ITR_OK;
}

itr_err merge_shard_from_owners(const itr_token_set *ts, const int *owner, int rank, itr_shard *sh) {
  memset(sh, 0, sizeof *sh);
  const int n = ts->n_seqs;
  for (int s = 0; s < n; s++)
    if (owner[s] == rank) {
      sh->n_seqs++;
      sh->T += ts->offsets[s + 1] - ts->offsets[s];
    }
  itr_err e = itr_calloc((size_t)sh->n_seqs + 1, sizeof(int64_t), "shard offsets", &sh->offsets);
  if (e == ITR_OK) e = itr_calloc((size_t)sh->T + 1, sizeof(int32_t), "shard tokens", &sh->ids);
  if (e != ITR_OK) {
    shard_fini(sh);
    return e;
  }
  int k = 0;
  for (int s = 0; s < n; s++)
    if (owner[s] == rank) {
      int64_t len = ts->offsets[s + 1] - ts->offsets[s];
      memcpy(sh->ids + sh->offsets[k], ts->ids + ts->offsets[s], (size_t)len * sizeof(int32_t));
      sh->offsets[k + 1] = sh->offsets[k] + len;
      k++;
    }
  return ITR_OK;
}

/* This rank's shard of ts over size ranks. */
itr_err merge_shard_make(const itr_token_set *ts, int rank, int size, itr_shard *sh) {
  memset(sh, 0, sizeof *sh);
  int *owner = NULL;
  ITR_TRY(itr_calloc((size_t)(ts->n_seqs ? ts->n_seqs : 1), sizeof(int), "sequence owners", &owner));
  itr_err e = merge_shard_owners(ts, size, owner);
  if (e == ITR_OK) e = merge_shard_from_owners(ts, owner, rank, sh);
  free(owner);
  return e;
}

void shard_fini(itr_shard *sh) {
  free(sh->offsets);
  free(sh->ids);
  memset(sh, 0, sizeof *sh);
}

/* ---- layers over stages, solves over groups ------------------------------------------------------ */

void merge_stage_layers(int g, int S, int L, int *lo, int *hi) {
  *lo = itr_dist_group_first(g, S, L);
  *hi = itr_dist_group_first(g + 1, S, L);
}

void merge_plan_solves(int nj, const double *cost, int n_groups, int size, int *group_of) {
  int order[ITR_ARCH_MAX_MODULES];
  double load[ITR_MAX_TASKS] = {0};
  for (int q = 0; q < nj; q++) order[q] = q;
  for (int a = 1; a < nj; a++) /* insertion sort, costliest first; ties by module order */
    for (int b = a; b > 0 && cost[order[b]] > cost[order[b - 1]]; b--) {
      int t = order[b];
      order[b] = order[b - 1];
      order[b - 1] = t;
    }
  for (int a = 0; a < nj; a++) {
    const int q = order[a];
    int best = 0;
    double best_end = 0;
    for (int g = 0; g < n_groups; g++) {
      const int gsize = itr_dist_group_first(g + 1, n_groups, size) - itr_dist_group_first(g, n_groups, size);
      const double end = load[g] + cost[q] / gsize;
      if (g == 0 || end < best_end) {
        best = g;
        best_end = end;
      }
    }
    group_of[q] = best;
    load[best] = best_end;
  }
}
