/* The architecture descriptor of a Llama-family model (include/iteris/model.h). */
#include <string.h>

#include "iteris/model.h"
#include "model/model_internal.h"

static const char *site_name(itr_site s) {
  static const char *names[ITR_SITE_COUNT] = {"attn_in", "attn_out", "mlp_in", "mlp_out"};
  return (int)s >= 0 && s < ITR_SITE_COUNT ? names[s] : "?";
}

itr_err itr_arch_desc_init(const itr_model_config *cfg, itr_arch_desc *arch) {
  ITR_CHECK(ITR_MODULE_COUNT <= ITR_ARCH_MAX_MODULES && ITR_SITE_COUNT <= ITR_ARCH_MAX_SITES, ITR_ERR_INTERNAL,
            "the name table has %d modules and %d sites; the descriptor holds %d and %d", (int)ITR_MODULE_COUNT,
            (int)ITR_SITE_COUNT, ITR_ARCH_MAX_MODULES, ITR_ARCH_MAX_SITES);
  itr_arch_desc a;
  memset(&a, 0, sizeof a);
  a.n_layers = cfg->num_hidden_layers;
  a.hidden_size = cfg->hidden_size;
  a.vocab_size = cfg->vocab_size;
  a.tied_embeddings = cfg->tie_word_embeddings;
  a.n_sites = ITR_SITE_COUNT;
  for (int s = 0; s < ITR_SITE_COUNT; s++) {
    a.site[s].id = (itr_site)s;
    a.site[s].name = site_name((itr_site)s);
  }
  a.n_modules = ITR_MODULE_COUNT;
  for (int q = 0; q < ITR_MODULE_COUNT; q++) {
    itr_arch_module *m = &a.module[q];
    m->id = (itr_module)q;
    m->name = itr_module_name(m->id);
    m->block = itr_module_block(m->id);
    m->site = (int)itr_module_site(m->id);
    itr_module_shape(cfg, m->id, &m->d_out, &m->d_in);
    m->has_bias = itr_model_has_bias(cfg, m->id);
    itr_arch_site *st = &a.site[m->site];
    ITR_CHECK(st->n_modules == 0 || a.module[st->modules[0]].d_in == m->d_in, ITR_ERR_INPUT,
              "config: modules %s and %s read the same input but take %lld and %lld inputs",
              a.module[st->modules[0]].name, m->name, (long long)a.module[st->modules[0]].d_in, (long long)m->d_in);
    st->d_in = m->d_in;
    st->modules[st->n_modules++] = q;
  }
  *arch = a;
  return ITR_OK;
}

int itr_arch_desc_module(const itr_arch_desc *arch, itr_module id) {
  for (int q = 0; q < arch->n_modules; q++)
    if (arch->module[q].id == id) return q;
  return -1;
}

int itr_arch_desc_site(const itr_arch_desc *arch, itr_site id) {
  for (int s = 0; s < arch->n_sites; s++)
    if (arch->site[s].id == id) return s;
  return -1;
}
