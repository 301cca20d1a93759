/* itr_lora_set: per (layer, module) lists of factored LoRA terms and an optional dense update,
 * all f32, shapes checked against the model configuration. Pure memory: no files. */
#include <stdlib.h>
#include <string.h>

#include "iteris/model.h"
#include "model/model_internal.h"

static const char *const mod_names_[ITR_MODULE_COUNT] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"};

itr_err itr_lora_set_create(const itr_model_config *cfg, itr_lora_set **out) {
  itr_model_dims d;
  ITR_TRY(itr_model_dims_from_config(cfg, &d));
  itr_lora_set *s = NULL;
  ITR_TRY(itr_calloc(1, sizeof *s, "LoRA set", &s));
  size_t n = (size_t)(d.L > 0 ? d.L : 1) * ITR_MODULE_COUNT;
  itr_err err = itr_calloc(n, sizeof(itr_lora_slot), "LoRA set slots", &s->slots);
  if (err != ITR_OK) {
    free(s);
    return itr_error_frame(err, __func__, __FILE__, __LINE__);
  }
  s->cfg = *cfg;
  s->num_layers = d.L;
  *out = s;
  return ITR_OK;
}

static void slot_clear(itr_lora_slot *sl) {
  for (int k = 0; k < sl->n_terms; k++) {
    free(sl->terms[k].A);
    free(sl->terms[k].B);
  }
  free(sl->terms);
  free(sl->dW_owned);
  memset(sl, 0, sizeof *sl);
}

void itr_lora_set_clear_modules(itr_lora_set *s, unsigned mask) {
  for (int i = 0; i < s->num_layers * ITR_MODULE_COUNT; i++)
    if (mask & (1u << (i % ITR_MODULE_COUNT))) slot_clear(&s->slots[i]);
}

static void moe_clear(itr_lora_moe *mo) {
  for (int k = 0; mo->experts && k < 3 * mo->E; k++) {
    free(mo->experts[k].A);
    free(mo->experts[k].B);
  }
  free(mo->experts);
  free(mo->router);
  memset(mo, 0, sizeof *mo);
}

void itr_lora_set_clear(itr_lora_set *s) {
  if (!s) return;
  for (int i = 0; i < s->num_layers * ITR_MODULE_COUNT; i++) slot_clear(&s->slots[i]);
  for (int l = 0; s->moe && l < s->num_layers; l++) moe_clear(&s->moe[l]);
}

void itr_lora_set_destroy(itr_lora_set *s) {
  if (!s) return;
  itr_lora_set_clear(s);
  free(s->slots);
  free(s->moe);
  free(s);
}

const itr_lora_slot *itr_lora_set_slot(const itr_lora_set *s, int layer, itr_module m) {
  if (!s || layer < 0 || layer >= s->num_layers || (unsigned)m >= ITR_MODULE_COUNT) return NULL;
  return &s->slots[layer * ITR_MODULE_COUNT + m];
}

static itr_err slot_for(itr_lora_set *s, int layer, itr_module m, itr_lora_slot **sl, int64_t *d_out,
                        int64_t *d_in) {
  ITR_CHECK((unsigned)m < ITR_MODULE_COUNT, ITR_ERR_INPUT, "LoRA set: module index %d is not a module", (int)m);
  ITR_CHECK(layer >= 0 && layer < s->num_layers, ITR_ERR_INPUT,
            "LoRA set: layer %d is outside [0, %d) (num_hidden_layers of the base model)", layer,
            s->num_layers);
  itr_model_dims d;
  ITR_TRY(itr_model_dims_from_config(&s->cfg, &d));
  itr_model_dims_module(&d, m, d_out, d_in);
  *sl = &s->slots[layer * ITR_MODULE_COUNT + m];
  return ITR_OK;
}

itr_err itr_lora_set_add(itr_lora_set *s, int layer, itr_module m, int r, float scaling, const float *A,
                         const float *B) {
  itr_lora_slot *sl;
  int64_t d_out, d_in;
  ITR_TRY(slot_for(s, layer, m, &sl, &d_out, &d_in));
  ITR_CHECK(r >= 1 && A && B, ITR_ERR_INPUT,
            "LoRA set: term for layer %d %s has rank %d or no factors (need r >= 1, A and B)", layer,
            mod_names_[m], r);
  if (sl->n_terms == sl->cap) {
    int cap = sl->cap ? 2 * sl->cap : 2;
    itr_lora_term *t = realloc(sl->terms, (size_t)cap * sizeof *t);
    ITR_CHECK(t, ITR_ERR_INTERNAL, "LoRA set: out of memory growing the term list of layer %d", layer);
    sl->terms = t;
    sl->cap = cap;
  }
  itr_lora_term tm = {r, scaling, NULL, NULL};
  itr_err err = itr_calloc((size_t)r * (size_t)d_in, sizeof(float), "LoRA A (f32)", &tm.A);
  if (err == ITR_OK) err = itr_calloc((size_t)d_out * (size_t)r, sizeof(float), "LoRA B (f32)", &tm.B);
  if (err != ITR_OK) {
    free(tm.A);
    return itr_error_frame(err, __func__, __FILE__, __LINE__);
  }
  memcpy(tm.A, A, (size_t)r * (size_t)d_in * sizeof(float));
  memcpy(tm.B, B, (size_t)d_out * (size_t)r * sizeof(float));
  sl->terms[sl->n_terms++] = tm;
  return ITR_OK;
}

itr_err itr_lora_set_set_dense(itr_lora_set *s, int layer, itr_module m, const float *dW, float scale,
                               int copy) {
  itr_lora_slot *sl;
  int64_t d_out, d_in;
  ITR_TRY(slot_for(s, layer, m, &sl, &d_out, &d_in));
  ITR_CHECK(dW, ITR_ERR_INPUT, "LoRA set: dense update of layer %d is NULL", layer);
  float *own = NULL;
  if (copy) {
    ITR_TRY(itr_calloc((size_t)d_out * (size_t)d_in, sizeof(float), "dense update (f32)", &own));
    memcpy(own, dW, (size_t)d_out * (size_t)d_in * sizeof(float));
  }
  free(sl->dW_owned);
  sl->dW_owned = own;
  sl->dW = copy ? own : dW;
  sl->dW_scale = scale;
  return ITR_OK;
}

/* ---- MixLoRA feed-forwards -------------------------------------------------------------------- */

itr_err itr_lora_set_set_moe(itr_lora_set *s, int layer, int E, int top_k, const float *router) {
  ITR_CHECK(layer >= 0 && layer < s->num_layers, ITR_ERR_INPUT, "MixLoRA: layer %d is outside [0, %d)", layer,
            s->num_layers);
  ITR_CHECK(E >= 1 && top_k >= 1 && top_k <= E && router, ITR_ERR_INPUT,
            "MixLoRA: layer %d has %d experts and top_k %d (need 1 <= top_k <= E) or no router", layer, E, top_k);
  if (!s->moe) ITR_TRY(itr_calloc((size_t)s->num_layers, sizeof *s->moe, "MixLoRA layers", &s->moe));
  itr_lora_moe *mo = &s->moe[layer];
  moe_clear(mo);
  size_t D = (size_t)s->cfg.hidden_size;
  ITR_TRY(itr_calloc((size_t)E * D, sizeof(float), "MixLoRA router", &mo->router));
  itr_err err = itr_calloc((size_t)3 * E, sizeof(itr_lora_term), "MixLoRA experts", &mo->experts);
  if (err != ITR_OK) {
    moe_clear(mo);
    return itr_error_frame(err, __func__, __FILE__, __LINE__);
  }
  memcpy(mo->router, router, (size_t)E * D * sizeof(float));
  mo->E = E;
  mo->top_k = top_k;
  return ITR_OK;
}

itr_err itr_lora_set_set_expert(itr_lora_set *s, int layer, int e, itr_module m, int r, float scaling,
                                const float *A, const float *B) {
  ITR_CHECK(s->moe && layer >= 0 && layer < s->num_layers && s->moe[layer].E > 0, ITR_ERR_INPUT,
            "MixLoRA: layer %d has no MixLoRA feed-forward (itr_lora_set_set_moe first)", layer);
  itr_lora_moe *mo = &s->moe[layer];
  ITR_CHECK(e >= 0 && e < mo->E && m >= ITR_GATE_PROJ && m <= ITR_DOWN_PROJ && r >= 1 && A && B, ITR_ERR_INPUT,
            "MixLoRA: expert %d of %d, module %d, rank %d: need a gate, up or down term of rank >= 1", e, mo->E,
            (int)m, r);
  int64_t d_out, d_in;
  itr_module_shape(&s->cfg, m, &d_out, &d_in);
  itr_lora_term *t = &mo->experts[3 * e + (m - ITR_GATE_PROJ)];
  free(t->A);
  free(t->B);
  memset(t, 0, sizeof *t);
  ITR_TRY(itr_calloc((size_t)r * (size_t)d_in, sizeof(float), "MixLoRA expert A", &t->A));
  ITR_TRY(itr_calloc((size_t)d_out * (size_t)r, sizeof(float), "MixLoRA expert B", &t->B));
  memcpy(t->A, A, (size_t)r * (size_t)d_in * sizeof(float));
  memcpy(t->B, B, (size_t)d_out * (size_t)r * sizeof(float));
  t->r = r;
  t->scaling = scaling;
  return ITR_OK;
}

/* ---- sets of the same shape, flat views (the trainer's gradients and moments) ---------------- */

static void term_dims(const itr_lora_set *s, int layer_slot, int64_t *d_out, int64_t *d_in) {
  itr_model_dims d;
  (void)itr_model_dims_from_config(&s->cfg, &d); /* s was created from a valid configuration */
  itr_model_dims_module(&d, (itr_module)(layer_slot % ITR_MODULE_COUNT), d_out, d_in);
}

itr_err itr_lora_set_create_like(const itr_lora_set *s, itr_lora_set **out) {
  itr_lora_set *g = NULL;
  ITR_TRY(itr_lora_set_create(&s->cfg, &g));
  for (int i = 0; i < s->num_layers * ITR_MODULE_COUNT; i++) {
    const itr_lora_slot *sl = &s->slots[i];
    if (sl->n_terms == 0) continue;
    int64_t d_out, d_in;
    term_dims(s, i, &d_out, &d_in);
    int max_r = 0;
    for (int k = 0; k < sl->n_terms; k++) max_r = sl->terms[k].r > max_r ? sl->terms[k].r : max_r;
    float *zero = NULL;
    size_t n = (size_t)max_r * (size_t)(d_in > d_out ? d_in : d_out);
    itr_err err = itr_calloc(n, sizeof(float), "zero factors", &zero);
    for (int k = 0; err == ITR_OK && k < sl->n_terms; k++)
      err = itr_lora_set_add(g, i / ITR_MODULE_COUNT, (itr_module)(i % ITR_MODULE_COUNT), sl->terms[k].r,
                             sl->terms[k].scaling, zero, zero);
    free(zero);
    if (err != ITR_OK) {
      itr_lora_set_destroy(g);
      return itr_error_frame(err, __func__, __FILE__, __LINE__);
    }
  }
  for (int l = 0; s->moe && l < s->num_layers; l++) { /* MixLoRA: a zero router and zero experts */
    const itr_lora_moe *mo = &s->moe[l];
    if (mo->E == 0) continue;
    int64_t D = s->cfg.hidden_size, F = s->cfg.intermediate_size, wide = D > F ? D : F;
    int max_r = 1;
    for (int i = 0; i < 3 * mo->E; i++) max_r = mo->experts[i].r > max_r ? mo->experts[i].r : max_r;
    size_t nz = (size_t)mo->E * (size_t)D > (size_t)max_r * (size_t)wide ? (size_t)mo->E * (size_t)D
                                                                          : (size_t)max_r * (size_t)wide;
    float *zero = NULL;
    itr_err err = itr_calloc(nz, sizeof(float), "zero router and experts", &zero);
    if (err == ITR_OK) err = itr_lora_set_set_moe(g, l, mo->E, mo->top_k, zero);
    for (int i = 0; err == ITR_OK && i < 3 * mo->E; i++)
      if (mo->experts[i].r > 0)
        err = itr_lora_set_set_expert(g, l, i / 3, (itr_module)(ITR_GATE_PROJ + i % 3), mo->experts[i].r,
                                      mo->experts[i].scaling, zero, zero);
    free(zero);
    if (err != ITR_OK) {
      itr_lora_set_destroy(g);
      return itr_error_frame(err, __func__, __FILE__, __LINE__);
    }
  }
  *out = g;
  return ITR_OK;
}

size_t itr_lora_set_n_params(const itr_lora_set *s) {
  size_t n = 0;
  for (int i = 0; i < s->num_layers * ITR_MODULE_COUNT; i++) {
    const itr_lora_slot *sl = &s->slots[i];
    if (sl->n_terms == 0) continue;
    int64_t d_out, d_in;
    term_dims(s, i, &d_out, &d_in);
    for (int k = 0; k < sl->n_terms; k++) n += (size_t)sl->terms[k].r * (size_t)(d_in + d_out);
  }
  for (int l = 0; s->moe && l < s->num_layers; l++) {
    const itr_lora_moe *mo = &s->moe[l];
    if (mo->E == 0) continue;
    n += (size_t)mo->E * (size_t)s->cfg.hidden_size;
    for (int i = 0; i < 3 * mo->E; i++) {
      int64_t d_out, d_in;
      itr_module_shape(&s->cfg, (itr_module)(ITR_GATE_PROJ + i % 3), &d_out, &d_in);
      n += (size_t)mo->experts[i].r * (size_t)(d_in + d_out);
    }
  }
  return n;
}

/* dir = 0: factors -> flat; dir = 1: flat -> factors. */
static void lora_set_copy_flat(itr_lora_set *s, float *flat, int dir) {
  size_t off = 0;
  for (int i = 0; i < s->num_layers * ITR_MODULE_COUNT; i++) {
    itr_lora_slot *sl = &s->slots[i];
    if (sl->n_terms == 0) continue;
    int64_t d_out, d_in;
    term_dims(s, i, &d_out, &d_in);
    for (int k = 0; k < sl->n_terms; k++) {
      size_t na = (size_t)sl->terms[k].r * (size_t)d_in, nb = (size_t)sl->terms[k].r * (size_t)d_out;
      if (dir == 0) {
        memcpy(flat + off, sl->terms[k].A, na * sizeof(float));
        memcpy(flat + off + na, sl->terms[k].B, nb * sizeof(float));
      } else {
        memcpy(sl->terms[k].A, flat + off, na * sizeof(float));
        memcpy(sl->terms[k].B, flat + off + na, nb * sizeof(float));
      }
      off += na + nb;
    }
  }
  /* then each MixLoRA layer: its router, then expert e's gate, up, down (A, B) for e = 0, 1, ... */
  for (int l = 0; s->moe && l < s->num_layers; l++) {
    itr_lora_moe *mo = &s->moe[l];
    if (mo->E == 0) continue;
    size_t nr = (size_t)mo->E * (size_t)s->cfg.hidden_size;
    if (dir == 0) memcpy(flat + off, mo->router, nr * sizeof(float));
    else memcpy(mo->router, flat + off, nr * sizeof(float));
    off += nr;
    for (int i = 0; i < 3 * mo->E; i++) {
      itr_lora_term *tm = &mo->experts[i];
      if (tm->r == 0) continue;
      int64_t d_out, d_in;
      itr_module_shape(&s->cfg, (itr_module)(ITR_GATE_PROJ + i % 3), &d_out, &d_in);
      size_t na = (size_t)tm->r * (size_t)d_in, nb = (size_t)tm->r * (size_t)d_out;
      if (dir == 0) {
        memcpy(flat + off, tm->A, na * sizeof(float));
        memcpy(flat + off + na, tm->B, nb * sizeof(float));
      } else {
        memcpy(tm->A, flat + off, na * sizeof(float));
        memcpy(tm->B, flat + off + na, nb * sizeof(float));
      }
      off += na + nb;
    }
  }
}

void itr_lora_set_pack(const itr_lora_set *s, float *flat) { lora_set_copy_flat((itr_lora_set *)s, flat, 0); }
void itr_lora_set_unpack(itr_lora_set *s, const float *flat) { lora_set_copy_flat(s, (float *)flat, 1); }

void itr_lora_set_groups(const itr_lora_set *s, unsigned char *group) {
  size_t off = 0;
  for (int i = 0; i < s->num_layers * ITR_MODULE_COUNT; i++) {
    const itr_lora_slot *sl = &s->slots[i];
    if (sl->n_terms == 0) continue;
    int64_t d_out, d_in;
    term_dims(s, i, &d_out, &d_in);
    for (int k = 0; k < sl->n_terms; k++) {
      size_t n = (size_t)sl->terms[k].r * (size_t)(d_in + d_out);
      memset(group + off, ITR_LORA_GROUP_ATTENTION, n);
      off += n;
    }
  }
  for (int l = 0; s->moe && l < s->num_layers; l++) { /* pack's order: router, then the experts */
    const itr_lora_moe *mo = &s->moe[l];
    if (mo->E == 0) continue;
    size_t nr = (size_t)mo->E * (size_t)s->cfg.hidden_size;
    memset(group + off, ITR_LORA_GROUP_ROUTERS, nr);
    off += nr;
    for (int i = 0; i < 3 * mo->E; i++) {
      if (mo->experts[i].r == 0) continue;
      int64_t d_out, d_in;
      itr_module_shape(&s->cfg, (itr_module)(ITR_GATE_PROJ + i % 3), &d_out, &d_in);
      size_t n = (size_t)mo->experts[i].r * (size_t)(d_in + d_out);
      memset(group + off, ITR_LORA_GROUP_EXPERTS, n);
      off += n;
    }
  }
}

void itr_lora_set_zero(itr_lora_set *s) {
  for (int i = 0; i < s->num_layers * ITR_MODULE_COUNT; i++) {
    itr_lora_slot *sl = &s->slots[i];
    if (sl->n_terms == 0) continue;
    int64_t d_out, d_in;
    term_dims(s, i, &d_out, &d_in);
    for (int k = 0; k < sl->n_terms; k++) {
      memset(sl->terms[k].A, 0, (size_t)sl->terms[k].r * (size_t)d_in * sizeof(float));
      memset(sl->terms[k].B, 0, (size_t)sl->terms[k].r * (size_t)d_out * sizeof(float));
    }
  }
  for (int l = 0; s->moe && l < s->num_layers; l++) {
    itr_lora_moe *mo = &s->moe[l];
    if (mo->E == 0) continue;
    memset(mo->router, 0, (size_t)mo->E * (size_t)s->cfg.hidden_size * sizeof(float));
    for (int i = 0; i < 3 * mo->E; i++) {
      if (mo->experts[i].r == 0) continue;
      int64_t d_out, d_in;
      itr_module_shape(&s->cfg, (itr_module)(ITR_GATE_PROJ + i % 3), &d_out, &d_in);
      memset(mo->experts[i].A, 0, (size_t)mo->experts[i].r * (size_t)d_in * sizeof(float));
      memset(mo->experts[i].B, 0, (size_t)mo->experts[i].r * (size_t)d_out * sizeof(float));
    }
  }
}
