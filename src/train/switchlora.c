/* SwitchLoRA (Zhou, Wang, Xu 2024; the reference code github.com/asfsdsf/SwitchLoRA, switch_lora.py):
 * during training, rows of every LoRA A and columns of every B are exchanged with candidate vectors,
 * at a rate that decays over the run, and the frozen weight absorbs each exchange so that the layer's
 * function does not change at the moment of the switch:
 *
 *   A row i: a -> c      W += s B[:, i] (a - c)^T      (W + s B A is unchanged)
 *   B col j: b -> c      W += s (b - c) A[j, :]        (with A after this step's row switches)
 *
 * The vector switched out becomes a candidate again (the pool is a ring: "continuous" switching, the
 * reference's default); the counterpart of a switched vector (B column i for A row i, A row j for B
 * column j) has its AdamW moments and step count reset and its gradient zeroed for `warm` steps.
 * Candidates (C = min(d_in, d_out) per factor, U(-bound, bound) with the reference's bounds) are made
 * from the seed only when first needed, so memory grows with the vectors actually switched out, not
 * with C. Pure functions of the seed and the step: every rank switches the same vectors. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "iteris/train.h"

typedef struct {
  int layer, module, r;
  int64_t d_out, d_in, C;
  size_t off;             /* flat offset of A (r, d_in) in the set's pack order; B (d_out, r) follows */
  float scaling;
  double bound[2];        /* candidate bounds of A (0) and B (1) */
  float **cand[2];        /* (C) candidates of A rows and B columns; NULL: not made yet */
  int64_t *sel[2];        /* (r) candidate index held by A row i / B column i */
  int *fix[2];            /* (r) steps A row i / B column i stays frozen */
  int ptr[2];             /* next A row / B column to switch */
  double acc;             /* the schedule's fractional switches carried to the next step */
} sw_slot;

struct itr_switch {
  itr_switch_opts o;
  int n;
  sw_slot *slots;
  int64_t switched, stored;
};

/* The reference's get_init_lora_bound: Kaiming-like with gain sqrt(1/3) (leaky_relu, a = sqrt(5)),
 * chosen so that A dB and dA B have the same size; bound = sqrt(3) std. */
static void bounds(int64_t m, int64_t n, int r, double *bA, double *bB) {
  double gain = sqrt(2.0 / (1.0 + 5.0));
  double sA = pow(sqrt((double)m) * r / pow((double)n, 1.5), 0.25) * sqrt(gain);
  double sB = pow(r / sqrt((double)m * (double)n), 0.25) * sqrt(gain);
  *bA = sqrt(3.0) * sA;
  *bB = sqrt(3.0) * sB;
}

/* Candidate j of factor f (0: A rows of length d_in, 1: B columns of length d_out), made on first use. */
static itr_err cand(itr_switch *s, sw_slot *sl, int f, int64_t j, float **out) {
  if (!sl->cand[f][j]) {
    int64_t len = f ? sl->d_out : sl->d_in;
    float *v = NULL;
    ITR_TRY(itr_calloc((size_t)len, sizeof(float), "SwitchLoRA candidate", &v));
    itr_rng g;
    uint64_t stream = (0x53574cull << 40) ^ ((uint64_t)(sl->layer * ITR_MODULE_COUNT + sl->module) << 33) ^
                      ((uint64_t)f << 32) ^ (uint64_t)j;
    itr_rng_init_stream(&g, s->o.seed, stream);
    for (int64_t i = 0; i < len; i++) v[i] = (float)((2 * itr_rng_uniform(&g) - 1) * sl->bound[f]);
    sl->cand[f][j] = v;
    s->stored++;
  }
  *out = sl->cand[f][j];
  return ITR_OK;
}

itr_err itr_switch_create(const itr_switch_opts *o, itr_lora_set *lora, itr_switch **out) {
  ITR_CHECK(o->interval >= 1 && o->warm >= 0 && o->descent_rate >= 0 && isfinite(o->descent_rate), ITR_ERR_INPUT,
            "-switch_lora_interval %d must be >= 1, -switch_lora_warm %d >= 0, -switch_lora_descent %g >= 0",
            o->interval, o->warm, o->descent_rate);
  itr_switch *s = NULL;
  ITR_TRY(itr_calloc(1, sizeof *s, "SwitchLoRA", &s));
  s->o = *o;
  *out = s;
  int total = lora->num_layers * ITR_MODULE_COUNT;
  ITR_TRY(itr_calloc((size_t)(total ? total : 1), sizeof(sw_slot), "SwitchLoRA slots", &s->slots));
  size_t off = 0;
  for (int i = 0; i < total; i++) {
    itr_lora_slot *ls = &lora->slots[i];
    if (ls->n_terms == 0) continue;
    ITR_CHECK(ls->n_terms == 1, ITR_ERR_INPUT, "SwitchLoRA: layer %d module %d has %d LoRA terms (needs one)",
              i / ITR_MODULE_COUNT, i % ITR_MODULE_COUNT, ls->n_terms);
    sw_slot *sl = &s->slots[s->n++];
    sl->layer = i / ITR_MODULE_COUNT;
    sl->module = i % ITR_MODULE_COUNT;
    sl->r = ls->terms[0].r;
    sl->scaling = ls->terms[0].scaling;
    itr_module_shape(&lora->cfg, (itr_module)sl->module, &sl->d_out, &sl->d_in);
    sl->C = sl->d_in < sl->d_out ? sl->d_in : sl->d_out;
    sl->off = off;
    off += (size_t)sl->r * (size_t)(sl->d_in + sl->d_out);
    bounds(sl->d_out, sl->d_in, sl->r, &sl->bound[0], &sl->bound[1]);
    int r = sl->r;
    for (int f = 0; f < 2; f++) {
      ITR_TRY(itr_calloc((size_t)sl->C, sizeof(float *), "SwitchLoRA candidate list", &sl->cand[f]));
      ITR_TRY(itr_calloc((size_t)r, sizeof(int64_t), "SwitchLoRA selection", &sl->sel[f]));
      ITR_TRY(itr_calloc((size_t)r, sizeof(int), "SwitchLoRA frozen steps", &sl->fix[f]));
    }
    /* A rows hold candidates C-r .. C-1; B columns the same, rotated by r/2 so that the rows and
     * columns switched in one step are different indices (the reference's initial state) */
    int64_t first = sl->C - r > 0 ? sl->C - r : 0;
    for (int k = 0; k < r; k++) {
      sl->sel[0][k] = (first + k) % sl->C;
      sl->sel[1][k] = (first + ((k - r / 2) % r + r) % r) % sl->C;
    }
    sl->ptr[0] = 0;
    sl->ptr[1] = r / 2;
    itr_lora_term *tm = &ls->terms[0];
    for (int k = 0; k < r; k++) {
      float *a, *b;
      ITR_TRY(cand(s, sl, 0, sl->sel[0][k], &a));
      ITR_TRY(cand(s, sl, 1, sl->sel[1][k], &b));
      memcpy(tm->A + (int64_t)k * sl->d_in, a, (size_t)sl->d_in * sizeof(float));
      for (int64_t o2 = 0; o2 < sl->d_out; o2++) tm->B[o2 * r + k] = b[o2];
    }
  }
  return ITR_OK;
}

void itr_switch_destroy(itr_switch *s) {
  if (!s) return;
  for (int i = 0; s->slots && i < s->n; i++)
    for (int f = 0; f < 2; f++) {
      for (int64_t j = 0; s->slots[i].cand[f] && j < s->slots[i].C; j++) free(s->slots[i].cand[f][j]);
      free(s->slots[i].cand[f]);
      free(s->slots[i].sel[f]);
      free(s->slots[i].fix[f]);
    }
  free(s->slots);
  free(s);
}

double itr_switch_rate(const itr_switch_opts *o, int r, int step) {
  double rate = 1.0, span = o->descent_rate * o->steps;
  if (span > 0) rate = pow(0.3, (step + 1) / span); /* 0.3 at descent_rate * steps */
  if (rate < 1e-8) rate = 1e-8;
  return r * rate / o->interval; /* vectors per step: r / interval, interval = base / rate */
}

/* Moves vector k of factor f (0: A row, 1: B column) to candidate dest; W absorbs the difference. */
static itr_err switch_one(itr_switch *s, sw_slot *sl, itr_lora_term *tm, float *W, int f, int k, int64_t dest) {
  int r = sl->r;
  float *c, *old;
  ITR_TRY(cand(s, sl, f, dest, &c));
  ITR_TRY(cand(s, sl, f, sl->sel[f][k], &old)); /* the slot the current vector returns to */
  int64_t len = f ? sl->d_out : sl->d_in;
  float *diff = NULL;
  ITR_TRY(itr_calloc((size_t)len, sizeof(float), "SwitchLoRA difference", &diff));
  if (f == 0) {
    float *a = tm->A + (int64_t)k * sl->d_in;
    for (int64_t i = 0; i < len; i++) diff[i] = a[i] - c[i];
    /* W (d_out, d_in) += s B[:, k] diff^T */
    cblas_sger(CblasRowMajor, (int)sl->d_out, (int)sl->d_in, sl->scaling, tm->B + k, r, diff, 1, W, (int)sl->d_in);
    memcpy(old, a, (size_t)len * sizeof(float));
    memcpy(a, c, (size_t)len * sizeof(float));
  } else {
    for (int64_t i = 0; i < len; i++) diff[i] = tm->B[i * r + k] - c[i];
    /* W += s diff A[k, :] */
    cblas_sger(CblasRowMajor, (int)sl->d_out, (int)sl->d_in, sl->scaling, diff, 1, tm->A + (int64_t)k * sl->d_in, 1,
               W, (int)sl->d_in);
    for (int64_t i = 0; i < len; i++) old[i] = tm->B[i * r + k], tm->B[i * r + k] = c[i];
  }
  free(diff);
  sl->sel[f][k] = dest;
  s->switched++;
  return ITR_OK;
}

itr_err itr_switch_step(itr_switch *s, int step, itr_lora_set *lora, itr_model *model, double *grad, itr_adamw *opt) {
  for (int i = 0; i < s->n; i++) {
    sw_slot *sl = &s->slots[i];
    int r = sl->r;
    itr_lora_term *tm = &lora->slots[sl->layer * ITR_MODULE_COUNT + sl->module].terms[0];
    float *W = itr_model_weight(model, sl->layer, (itr_module)sl->module);
    ITR_CHECK(W, ITR_ERR_INTERNAL, "SwitchLoRA: layer %d module %d has no weight", sl->layer, sl->module);
    /* how many: the schedule, rounded by carrying the fraction (the reference rounds at random) */
    sl->acc += itr_switch_rate(&s->o, r, step);
    int k = (int)floor(sl->acc);
    sl->acc -= k;
    int nfix[2] = {0, 0};
    for (int f = 0; f < 2; f++)
      for (int j = 0; j < r; j++) nfix[f] += sl->fix[f][j] > 0;
    int availA = ((sl->ptr[0] - nfix[0] - sl->ptr[1]) % r + r) % r, availB = ((sl->ptr[1] - nfix[1] - sl->ptr[0]) % r + r) % r;
    int avail = availA < availB ? availA : availB;
    if (sl->C - r < avail) avail = (int)(sl->C - r); /* destinations must lie outside the selection */
    if (k > avail) k = avail;
    for (int f = 0; f < 2 && k > 0; f++) { /* A rows first, then B columns (with the new A) */
      int first = sl->ptr[f];
      int64_t begin = sl->sel[f][(first - 1 + r) % r] + 1;
      for (int j = 0; j < k; j++) {
        int idx = (first + j) % r;
        ITR_TRY(switch_one(s, sl, tm, W, f, idx, (begin + j) % sl->C));
        sl->fix[1 - f][idx] = s->o.warm; /* the counterpart: B column idx for A row idx, and back */
      }
      sl->ptr[f] = (first + k) % r;
    }
    /* counterparts frozen now: reset their moments; every frozen vector: no gradient this step */
    size_t offA = sl->off, offB = sl->off + (size_t)r * (size_t)sl->d_in;
    for (int j = 0; j < r; j++) {
      if (sl->fix[0][j] > 0) {
        if (sl->fix[0][j] == s->o.warm && opt) itr_adamw_reset(opt, offA + (size_t)j * sl->d_in, (size_t)sl->d_in, 1);
        if (grad) memset(grad + offA + (size_t)j * sl->d_in, 0, (size_t)sl->d_in * sizeof(double));
        sl->fix[0][j]--;
      }
      if (sl->fix[1][j] > 0) {
        if (sl->fix[1][j] == s->o.warm && opt) itr_adamw_reset(opt, offB + (size_t)j, (size_t)sl->d_out, (size_t)r);
        if (grad)
          for (int64_t o2 = 0; o2 < sl->d_out; o2++) grad[offB + (size_t)o2 * r + j] = 0;
        sl->fix[1][j]--;
      }
    }
  }
  return ITR_OK;
}

void itr_switch_counts(const itr_switch *s, int64_t *switched, int64_t *stored_candidates) {
  *switched = s->switched;
  *stored_candidates = s->stored;
}

/* ---- state as one float64 array (checkpoints, broadcast) ---------------------------------------------- */

itr_err itr_switch_serialize(const itr_switch *s, double **out, size_t *len) {
  size_t n = 3;
  for (int i = 0; i < s->n; i++) {
    const sw_slot *sl = &s->slots[i];
    n += 3 + 4 * (size_t)sl->r + 2;
    for (int f = 0; f < 2; f++)
      for (int64_t j = 0; j < sl->C; j++)
        if (sl->cand[f][j]) n += 1 + (size_t)(f ? sl->d_out : sl->d_in);
  }
  double *b = NULL;
  ITR_TRY(itr_calloc(n, sizeof(double), "SwitchLoRA state", &b));
  size_t p = 0;
  b[p++] = s->n, b[p++] = (double)s->switched, b[p++] = (double)s->stored;
  for (int i = 0; i < s->n; i++) {
    const sw_slot *sl = &s->slots[i];
    b[p++] = sl->ptr[0], b[p++] = sl->ptr[1], b[p++] = sl->acc;
    for (int f = 0; f < 2; f++)
      for (int j = 0; j < sl->r; j++) b[p++] = (double)sl->sel[f][j], b[p++] = sl->fix[f][j];
    for (int f = 0; f < 2; f++) {
      size_t count_at = p++;
      int64_t len = f ? sl->d_out : sl->d_in, cnt = 0;
      for (int64_t j = 0; j < sl->C; j++)
        if (sl->cand[f][j]) {
          b[p++] = (double)j;
          for (int64_t q = 0; q < len; q++) b[p++] = sl->cand[f][j][q];
          cnt++;
        }
      b[count_at] = (double)cnt;
    }
  }
  *out = b;
  *len = p;
  return ITR_OK;
}

itr_err itr_switch_deserialize(itr_switch *s, const double *b, size_t len) {
#define NEED(k) ITR_CHECK(p + (size_t)(k) <= len, ITR_ERR_INPUT, "SwitchLoRA state: truncated (%zu values)", len)
  size_t p = 0;
  NEED(3);
  ITR_CHECK((int)b[0] == s->n, ITR_ERR_INPUT, "SwitchLoRA state: %d modules, this run has %d", (int)b[0], s->n);
  s->switched = (int64_t)b[1];
  p = 3;
  for (int i = 0; i < s->n; i++) {
    sw_slot *sl = &s->slots[i];
    NEED(3 + 4 * sl->r);
    sl->ptr[0] = (int)b[p++], sl->ptr[1] = (int)b[p++], sl->acc = b[p++];
    for (int f = 0; f < 2; f++)
      for (int j = 0; j < sl->r; j++) {
        sl->sel[f][j] = (int64_t)b[p++], sl->fix[f][j] = (int)b[p++];
        ITR_CHECK(sl->sel[f][j] >= 0 && sl->sel[f][j] < sl->C && sl->ptr[f] >= 0 && sl->ptr[f] < sl->r,
                  ITR_ERR_INPUT, "SwitchLoRA state: index out of range");
      }
    for (int f = 0; f < 2; f++) {
      NEED(1);
      int64_t cnt = (int64_t)b[p++], vlen = f ? sl->d_out : sl->d_in;
      for (int64_t c = 0; c < cnt; c++) {
        NEED(1 + vlen);
        int64_t j = (int64_t)b[p++];
        ITR_CHECK(j >= 0 && j < sl->C, ITR_ERR_INPUT, "SwitchLoRA state: candidate %lld out of range", (long long)j);
        float *v;
        ITR_TRY(cand(s, sl, f, j, &v));
        for (int64_t q = 0; q < vlen; q++) v[q] = (float)b[p++];
      }
    }
  }
  s->stored = (int64_t)b[2];
#undef NEED
  return ITR_OK;
}
