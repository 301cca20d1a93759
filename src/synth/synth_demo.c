/* The bundled demo case: a tiny Llama, three adapters of ranks 4, 8, 16 aimed at their tasks' inputs,
 * and per-task token files. */
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "iteris/io.h"
#include "iteris/synth.h"
#include "synth/synth_internal.h"

void itr_synth_demo_config(itr_model_config *c) {
  memset(c, 0, sizeof *c);
  c->arch = ITR_ARCH_LLAMA;
  snprintf(c->model_type, sizeof c->model_type, "llama");
  c->hidden_size = 64;
  c->intermediate_size = 172;
  c->num_hidden_layers = 4;
  c->num_attention_heads = 4;
  c->num_key_value_heads = 2;
  c->head_dim = 16;
  c->vocab_size = 256;
  c->max_position_embeddings = 2048;
  c->rms_norm_eps = 1e-5;
  c->rope_theta = 10000.0;
}

/* GPT-2's bytes_to_unicode: byte b's symbol in a byte-level BPE vocabulary, as UTF-8 into u (3 bytes). */
static void byte_symbol(int b, char *u) {
  int cp = b, n = 0;
  const int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
  if (!printable) { /* the 68 other bytes take 256, 257, ... in byte order */
    for (int x = 0; x < b; x++) n += !((x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF));
    cp = 256 + n;
  }
  if (cp < 0x80) {
    u[0] = (char)cp, u[1] = 0;
  } else {
    u[0] = (char)(0xC0 | (cp >> 6)), u[1] = (char)(0x80 | (cp & 0x3F)), u[2] = 0;
  }
}

/* DIR/base/tokenizer.json: a Hugging Face byte-level BPE tokenizer (GPT-2 style pre-tokenisation) whose
 * vocabulary is the 256 byte symbols, byte b = id b, and no merges: all the demo's 256 ids allow. */
static itr_err write_tokenizer(const char *base) {
  char path[ITR_PATH_MAX];
  ITR_TRY(itr_synth_join(path, sizeof path, base, "tokenizer.json"));
  cJSON *root = cJSON_CreateObject(), *pre = cJSON_CreateObject(), *dec = cJSON_CreateObject(),
        *model = cJSON_CreateObject(), *vocab = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "version", "1.0");
  cJSON_AddNullToObject(root, "truncation");
  cJSON_AddNullToObject(root, "padding");
  cJSON_AddArrayToObject(root, "added_tokens");
  cJSON_AddNullToObject(root, "normalizer");
  cJSON_AddStringToObject(pre, "type", "ByteLevel");
  cJSON_AddFalseToObject(pre, "add_prefix_space");
  cJSON_AddTrueToObject(pre, "trim_offsets");
  cJSON_AddTrueToObject(pre, "use_regex");
  cJSON_AddItemToObject(root, "pre_tokenizer", pre);
  cJSON_AddNullToObject(root, "post_processor");
  cJSON_AddStringToObject(dec, "type", "ByteLevel");
  cJSON_AddFalseToObject(dec, "add_prefix_space");
  cJSON_AddTrueToObject(dec, "trim_offsets");
  cJSON_AddTrueToObject(dec, "use_regex");
  cJSON_AddItemToObject(root, "decoder", dec);
  cJSON_AddStringToObject(model, "type", "BPE");
  cJSON_AddNullToObject(model, "dropout");
  cJSON_AddNullToObject(model, "unk_token");
  cJSON_AddNullToObject(model, "continuing_subword_prefix");
  cJSON_AddNullToObject(model, "end_of_word_suffix");
  cJSON_AddFalseToObject(model, "fuse_unk");
  cJSON_AddFalseToObject(model, "byte_fallback");
  cJSON_AddFalseToObject(model, "ignore_merges");
  for (int b = 0; b < 256; b++) {
    char u[4];
    byte_symbol(b, u);
    cJSON_AddNumberToObject(vocab, u, b);
  }
  cJSON_AddItemToObject(model, "vocab", vocab);
  cJSON_AddArrayToObject(model, "merges");
  cJSON_AddItemToObject(root, "model", model);
  itr_err e = itr_synth_write_json(path, root);
  cJSON_Delete(root);
  return e;
}

/* DIR/{calib,heldout}_text_{i}.jsonl: {"text": ...} lines of words drawn from task i's list. With the
 * byte tokenizer above each task's bytes fall mostly in its third of the ids, as calib_i.jsonl's do:
 * task 0 capitals A-T, digits and punctuation (bytes 32..84), task 1 lower case (97..122), task 2
 * Cyrillic letters a..p (UTF-8 0xD0 0xB0..0xBF). */
static itr_err write_texts(const char *path, int task, int n_seqs, uint64_t seed) {
  static const char *const words[3][12] = {
      {"ORDER", "SHIP", "42", "DEPOT", "GATE 7:", "CODE", "ALERT!", "1984", "NORTH", "EAST-3", "TEST", "HOLD,"},
      {"the", "cat", "sat", "on", "a", "warm", "mat", "while", "rain", "fell", "softly", "outside"},
      {"\xd0\xb2\xd0\xbe\xd0\xb4\xd0\xb0", "\xd0\xb4\xd0\xbe\xd0\xbc", "\xd0\xbc\xd0\xb0\xd0\xbc\xd0\xb0",
       "\xd0\xbb\xd0\xb5\xd0\xbe\xd0\xbd", "\xd0\xbd\xd0\xbe\xd0\xb6", "\xd0\xba\xd0\xb8\xd0\xbd\xd0\xbe",
       "\xd0\xb8\xd0\xb3\xd0\xbe\xd0\xbb\xd0\xba\xd0\xb0", "\xd0\xbe\xd0\xba\xd0\xbd\xd0\xbe",
       "\xd0\xb1\xd0\xb5\xd0\xb3", "\xd0\xb7\xd0\xb8\xd0\xbc\xd0\xb0", "\xd0\xb3\xd0\xbe\xd0\xbb\xd0\xbe\xd0\xb4",
       "\xd0\xb4\xd0\xb5\xd0\xbd\xd1\x8c"}};
  itr_rng g;
  itr_rng_init(&g, seed);
  FILE *f = fopen(path, "wb");
  ITR_CHECK(f, ITR_ERR_INPUT, "cannot create '%s'", path);
  int ok = 1;
  for (int s = 0; s < n_seqs && ok; s++) {
    char text[128] = "";
    const size_t want = 16 + (size_t)itr_rng_below(&g, 33); /* 16..48 bytes, as the id files' lengths */
    while (strlen(text) < want) {
      const char *w = words[task][itr_rng_below(&g, 12)];
      if (strlen(text) + strlen(w) + 2 >= sizeof text) break;
      if (text[0]) strcat(text, " ");
      strcat(text, w);
    }
    cJSON *line = cJSON_CreateObject();
    cJSON_AddStringToObject(line, "text", text);
    char *j = cJSON_PrintUnformatted(line);
    ok = j && fprintf(f, "%s\n", j) > 0;
    cJSON_free(j);
    cJSON_Delete(line);
  }
  ok &= fclose(f) == 0;
  ITR_CHECK(ok, ITR_ERR_INTERNAL, "cannot write '%s' (disk full?)", path);
  return ITR_OK;
}

itr_err itr_synth_demo_write(const char *dir) {
  static const struct {
    int r;
    double alpha;
    int rslora;
    itr_dtype dtype;
  } ad[3] = {{4, 8.0, 0, ITR_BF16}, {8, 16.0, 0, ITR_F32}, {16, 16.0, 1, ITR_F16}};
  const uint64_t seed = 20250101;
  itr_model_config c;
  itr_synth_demo_config(&c);
  char path[ITR_PATH_MAX], base[ITR_PATH_MAX];
  ITR_TRY(itr_iofile_mkdirs(dir));
  ITR_TRY(itr_synth_join(base, sizeof base, dir, "base"));
  ITR_TRY(itr_synth_model_write(base, &c, ITR_BF16, 1, seed));
  const int band = c.vocab_size / 3;
  ITR_CHECK(c.vocab_size <= 256, ITR_ERR_INTERNAL, "demo vocabulary %d exceeds the token weights table", c.vocab_size);
  const double in_band = 0.9; /* task i draws this fraction of its ids from its band */
  double wt[256];
  for (int i = 0; i < 3; i++) {
    char name[64];
    int lo = i * band, hi = i == 2 ? c.vocab_size : (i + 1) * band;
    /* Task i's token distribution, as itr_synth_tokens_write_band draws it. */
    for (int t = 0; t < c.vocab_size; t++)
      wt[t] = (1 - in_band) / c.vocab_size + (t >= lo && t < hi ? in_band / (hi - lo) : 0.0);
    snprintf(name, sizeof name, "adapter_%d", i);
    ITR_TRY(itr_synth_join(path, sizeof path, dir, name));
    ITR_TRY(itr_synth_adapter_write_aimed(path, base, ad[i].r, ad[i].alpha, ad[i].rslora,
                                          (1u << ITR_MODULE_COUNT) - 1, ad[i].dtype, wt, ITR_SYNTH_DEMO_AIM,
                                          seed + 100 + (uint64_t)i, "iteris-mpi/demo-llama-d64"));
    snprintf(name, sizeof name, "calib_%d.jsonl", i);
    ITR_TRY(itr_synth_join(path, sizeof path, dir, name));
    ITR_TRY(itr_synth_tokens_write_band(path, c.vocab_size, lo, hi, in_band, 32, 16, 48, seed + 200 + (uint64_t)i));
    snprintf(name, sizeof name, "heldout_%d.jsonl", i);
    ITR_TRY(itr_synth_join(path, sizeof path, dir, name));
    ITR_TRY(itr_synth_tokens_write_band(path, c.vocab_size, lo, hi, in_band, 16, 16, 48, seed + 300 + (uint64_t)i));
    snprintf(name, sizeof name, "calib_text_%d.jsonl", i);
    ITR_TRY(itr_synth_join(path, sizeof path, dir, name));
    ITR_TRY(write_texts(path, i, 32, seed + 400 + (uint64_t)i));
    snprintf(name, sizeof name, "heldout_text_%d.jsonl", i);
    ITR_TRY(itr_synth_join(path, sizeof path, dir, name));
    ITR_TRY(write_texts(path, i, 16, seed + 500 + (uint64_t)i));
  }
  ITR_TRY(write_tokenizer(base));
  return ITR_OK;
}
