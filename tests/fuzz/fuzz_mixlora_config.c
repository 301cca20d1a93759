/* libFuzzer: a MixLoRA adapter_config.json (src/io/mixlora.c) beside a small valid adapter_model.safetensors
 * with the reference's tensor names (a router and experts for layer 0, attention LoRA): itr_adapter_is_mixlora,
 * then itr_mixlora_open against a tiny base configuration (shapes, ranks, experts from the config). */
#include "fuzz_common.h"
#include "iteris/io.h"

static itr_model_config base(void) {
  itr_model_config c;
  memset(&c, 0, sizeof c);
  c.arch = ITR_ARCH_LLAMA;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 4;
  c.num_hidden_layers = 2;
  c.vocab_size = 16;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000;
  c.max_position_embeddings = 64;
  return c;
}

/* Once: 2 experts of rank 2 on gate/up/down and a router in layer 0, q_proj LoRA of rank 2 in both layers. */
static void write_tensors(const itr_model_config *c) {
  static int done = 0;
  if (done) return;
  done = 1;
  static float zeros[256];
  itr_st_writer *w = NULL;
  if (itr_st_writer_create(&w) != ITR_OK) abort();
  char name[160];
  int64_t router[2] = {2, 8};
  itr_mixlora_router_name(0, name, sizeof name);
  if (itr_st_writer_add_f32(w, name, ITR_F32, 2, router, zeros) != ITR_OK) abort();
  for (int l = 0; l < 2; l++)
    for (char which = 'A'; which <= 'B'; which++) {
      int64_t d_out, d_in;
      itr_module_shape(c, ITR_Q_PROJ, &d_out, &d_in);
      int64_t sh[2] = {which == 'A' ? 2 : d_out, which == 'A' ? d_in : 2};
      itr_mixlora_name(l, -1, ITR_Q_PROJ, which, name, sizeof name);
      if (itr_st_writer_add_f32(w, name, ITR_F32, 2, sh, zeros) != ITR_OK) abort();
    }
  for (int e = 0; e < 2; e++)
    for (int m = ITR_GATE_PROJ; m <= ITR_DOWN_PROJ; m++)
      for (char which = 'A'; which <= 'B'; which++) {
        int64_t d_out, d_in;
        itr_module_shape(c, (itr_module)m, &d_out, &d_in);
        int64_t sh[2] = {which == 'A' ? 2 : d_out, which == 'A' ? d_in : 2};
        itr_mixlora_name(0, e, (itr_module)m, which, name, sizeof name);
        if (itr_st_writer_add_f32(w, name, ITR_F32, 2, sh, zeros) != ITR_OK) abort();
      }
  if (itr_st_writer_write(w, fuzz_path("adapter_model.safetensors")) != ITR_OK) abort();
  itr_st_writer_destroy(w);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  itr_model_config c = base();
  write_tensors(&c);
  (void)fuzz_file("adapter_config.json", data, n);
  (void)itr_adapter_is_mixlora(fuzz_dir());
  itr_mixlora *x = NULL;
  if (itr_mixlora_open(fuzz_dir(), &c, &x) == ITR_OK) itr_mixlora_destroy(x);
  itr_error_clear();
  return 0;
}
