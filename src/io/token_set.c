/* Calibration / evaluation token data as JSONL: one {"input_ids": [ints]} object per line (other
 * keys ignored, blank lines skipped), or with itr_token_set_read_text also {"text": "..."} encoded by
 * the base model's tokenizer (tokenizer.c), opened when the first text line needs it. Every error
 * names the file and the line. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/iofile.h"
#include "iteris/io.h"

/* Growable arrays of the reader. */
typedef struct {
  int64_t *offsets;
  size_t n_off, cap_off;
  int32_t *ids;
  size_t n_ids, cap_ids;
  int vocab; /* V, for a tokenizer opened while reading */
  /* supervision, one entry per sequence (offsets[1..]) */
  int64_t *prompt;
  int32_t *group, *is_label;
  size_t cap_sup;
  int n_groups, any_sup;
} builder;

static itr_err grow(void **p, size_t *cap, size_t need, size_t elem, const char *file) {
  if (need <= *cap) return ITR_OK;
  size_t nc = *cap ? *cap : 1024;
  while (nc < need) {
    ITR_CHECK(nc <= SIZE_MAX / 2, ITR_ERR_INPUT, "%s: too many tokens", file);
    nc *= 2;
  }
  size_t bytes;
  ITR_CHECK(itr_mul_size(nc, elem, &bytes), ITR_ERR_INPUT, "%s: too many tokens", file);
  void *q = realloc(*p, bytes);
  ITR_CHECK(q, ITR_ERR_INTERNAL, "out of memory reading %s (%zu bytes)", file, bytes);
  *p = q;
  *cap = nc;
  return ITR_OK;
}

static int is_blank(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n') return 0;
  return 1;
}

/* Where "text" lines get their tokenizer: none (itr_token_set_read), or *tok, opened from dir on first need. */
typedef struct {
  int allow;
  const char *dir;
  itr_tokenizer **tok;
} text_source;

/* 1 when the JSON text of a line holds the escape \u0000 (an odd run of backslashes before "u0000"):
 * cJSON would cut the string there, and a tokenizer would silently see less than the line says. */
static int has_nul_escape(const char *line, size_t len) {
  for (size_t i = 0; i + 6 <= len; i++) {
    if (line[i] != '\\' || memcmp(line + i + 1, "u0000", 5) != 0) continue;
    size_t k = 0;
    while (k < i && line[i - 1 - k] == '\\') k++;
    if (k % 2 == 0) return 1;
  }
  return 0;
}

/* Encodes a line's text (with BOS when add_bos) and appends its ids; opens the tokenizer on first need. */
static itr_err append_text(const cJSON *text, const char *line, size_t len, const char *file, long lineno,
                           const text_source *src, builder *b, int add_bos) {
  ITR_CHECK(cJSON_IsString(text) && text->valuestring, ITR_ERR_INPUT,
            "%s:%ld: 'text' must be a string, as must 'completion' and text choices (or give {\"input_ids\": [...]})",
            file, lineno);
  ITR_CHECK(!has_nul_escape(line, len), ITR_ERR_INPUT,
            "%s:%ld: a string holds \\u0000 (NUL), which the text cannot carry; remove it", file, lineno);
  if (!*src->tok) {
    ITR_CHECK(src->dir, ITR_ERR_INPUT,
              "%s:%ld: has 'text' but no 'input_ids', and no tokenizer was given; tokenize the text first", file,
              lineno);
    char path[ITR_PATH_MAX];
    itr_err e = itr_tokenizer_find(src->dir, path, sizeof path);
    if (e == ITR_OK && !path[0])
      return itr_error_set(ITR_ERR_INPUT, "%s:%ld: has 'text', but the base folder %s has no tokenizer (looked for "
                           "tokenizer.json, a SentencePiece tokenizer.model, llama2.c's tokenizer.bin and tok*.bin); give "
                           "{\"input_ids\": [...]} rows instead",
                           file, lineno, src->dir);
    if (e == ITR_OK) e = itr_tokenizer_open(path, b->vocab, src->tok);
    if (e != ITR_OK) {
      char head[2048];
      itr_error_headline(head, sizeof head);
      return itr_error_set(e, "%s:%ld: has 'text', which needs the base model's tokenizer: %s", file, lineno, head);
    }
  }
  int32_t *ids = NULL;
  int64_t n = 0;
  itr_err e = itr_tokenizer_encode(*src->tok, text->valuestring, strlen(text->valuestring), add_bos, 0, &ids, &n);
  if (e != ITR_OK) {
    char head[2048];
    itr_error_headline(head, sizeof head);
    return itr_error_set(e, "%s:%ld: cannot tokenize 'text': %s", file, lineno, head);
  }
  if (n == 0 && add_bos) { /* a Hugging Face tokenizer without BOS (GPT-2, Qwen2) on an empty text */
    free(ids);
    return itr_error_set(ITR_ERR_INPUT, "%s:%ld: 'text' gives no tokens (%s adds no BOS); drop the line or give text",
                         file, lineno, itr_tokenizer_path(*src->tok));
  }
  e = grow((void **)&b->ids, &b->cap_ids, b->n_ids + (size_t)n, sizeof(int32_t), file);
  if (e == ITR_OK) {
    memcpy(b->ids + b->n_ids, ids, (size_t)n * sizeof(int32_t));
    b->n_ids += (size_t)n;
  }
  free(ids);
  return e;
}

/* Appends the ids of a JSON list (a completion or a choice) after checking them. */
static itr_err append_ids(const cJSON *arr, const char *key, const char *file, long lineno, int vocab, builder *b) {
  ITR_CHECK(cJSON_IsArray(arr) && arr->child, ITR_ERR_INPUT, "%s:%ld: '%s' must be a non-empty list of token ids",
            file, lineno, key);
  long k = 0;
  for (const cJSON *v = arr->child; v; v = v->next, k++) {
    double x = cJSON_IsNumber(v) ? v->valuedouble : NAN;
    ITR_CHECK(cJSON_IsNumber(v) && isfinite(x) && x == floor(x) && x >= 0 && x < (double)vocab, ITR_ERR_INPUT,
              "%s:%ld: %s[%ld] is not a token id in [0, %d)", file, lineno, key, k, vocab);
    ITR_TRY(grow((void **)&b->ids, &b->cap_ids, b->n_ids + 1, sizeof(int32_t), file));
    b->ids[b->n_ids++] = (int32_t)x;
  }
  return ITR_OK;
}

/* Closes one sequence (its ids end at n_ids) with its supervision. */
static itr_err push_seq(builder *b, const char *file, int64_t prompt, int32_t group, int32_t is_label) {
  ITR_TRY(grow((void **)&b->offsets, &b->cap_off, b->n_off + 1, sizeof(int64_t), file));
  b->offsets[b->n_off++] = (int64_t)b->n_ids;
  size_t s = b->n_off - 2, cap = b->cap_sup;
  ITR_TRY(grow((void **)&b->prompt, &cap, s + 1, sizeof(int64_t), file));
  cap = b->cap_sup;
  ITR_TRY(grow((void **)&b->group, &cap, s + 1, sizeof(int32_t), file));
  cap = b->cap_sup;
  ITR_TRY(grow((void **)&b->is_label, &cap, s + 1, sizeof(int32_t), file));
  b->cap_sup = cap;
  b->prompt[s] = prompt;
  b->group[s] = group;
  b->is_label[s] = is_label;
  return ITR_OK;
}

/* The line's prompt (ids from offsets[n_off - 1] to n_ids) is read: adds "prompt_len", a completion, or
 * one sequence per choice, and closes the line's sequence(s). */
static itr_err finish_line(const cJSON *o, const char *line, size_t len, const char *file, long lineno,
                           const text_source *src, builder *b) {
  const cJSON *pl = cJSON_GetObjectItemCaseSensitive(o, "prompt_len");
  const cJSON *comp = cJSON_GetObjectItemCaseSensitive(o, "completion");
  const cJSON *comp_ids = cJSON_GetObjectItemCaseSensitive(o, "completion_ids");
  const cJSON *choices = cJSON_GetObjectItemCaseSensitive(o, "choices");
  const cJSON *label = cJSON_GetObjectItemCaseSensitive(o, "label");
  const int64_t start = b->offsets[b->n_off - 1], plen = (int64_t)b->n_ids - start;
  ITR_CHECK((pl != NULL) + (comp || comp_ids) + (choices != NULL) <= 1 && !(comp && comp_ids), ITR_ERR_INPUT,
            "%s:%ld: give at most one of 'prompt_len', 'completion' (or 'completion_ids') and 'choices'", file, lineno);
  ITR_CHECK(!label || choices, ITR_ERR_INPUT, "%s:%ld: 'label' needs 'choices'", file, lineno);
  if (pl) {
    double k = cJSON_IsNumber(pl) ? pl->valuedouble : -1;
    ITR_CHECK(k >= 0 && k == floor(k) && k < (double)plen, ITR_ERR_INPUT,
              "%s:%ld: prompt_len must be an integer in [0, %lld) (the sequence has %lld tokens)", file, lineno,
              (long long)plen, (long long)plen);
    b->any_sup = 1;
    return push_seq(b, file, (int64_t)k, -1, 0);
  }
  if (comp || comp_ids) {
    if (comp) {
      ITR_CHECK(src->allow, ITR_ERR_INPUT, "%s:%ld: 'completion' is text; give 'completion_ids'", file, lineno);
      ITR_TRY(append_text(comp, line, len, file, lineno, src, b, 0));
    } else {
      ITR_TRY(append_ids(comp_ids, "completion_ids", file, lineno, b->vocab, b));
    }
    ITR_CHECK((int64_t)b->n_ids > start + plen, ITR_ERR_INPUT, "%s:%ld: the completion is empty", file, lineno);
    b->any_sup = 1;
    return push_seq(b, file, plen, -1, 0);
  }
  if (choices) {
    int n = cJSON_IsArray(choices) ? cJSON_GetArraySize(choices) : 0;
    ITR_CHECK(n >= 2, ITR_ERR_INPUT, "%s:%ld: 'choices' must be a list of at least two completions", file, lineno);
    double j = label && cJSON_IsNumber(label) ? label->valuedouble : -1;
    ITR_CHECK(j >= 0 && j == floor(j) && j < n, ITR_ERR_INPUT,
              "%s:%ld: 'label' must be the index of the right choice, in [0, %d)", file, lineno, n);
    /* the prompt's ids are copied before each further choice */
    int32_t *prompt = NULL;
    ITR_TRY(itr_calloc((size_t)(plen > 0 ? plen : 1), sizeof(int32_t), "prompt ids", &prompt));
    memcpy(prompt, b->ids + start, (size_t)plen * sizeof(int32_t));
    itr_err e = ITR_OK;
    int c = 0;
    for (const cJSON *ch = choices->child; e == ITR_OK && ch; ch = ch->next, c++) {
      if (c > 0) {
        e = grow((void **)&b->ids, &b->cap_ids, b->n_ids + (size_t)plen, sizeof(int32_t), file);
        if (e != ITR_OK) break;
        memcpy(b->ids + b->n_ids, prompt, (size_t)plen * sizeof(int32_t));
        b->n_ids += (size_t)plen;
      }
      size_t before = b->n_ids;
      if (cJSON_IsString(ch)) {
        e = src->allow ? append_text(ch, line, len, file, lineno, src, b, 0)
                       : itr_error_set(ITR_ERR_INPUT, "%s:%ld: choice %d is text; give lists of ids", file, lineno, c);
      } else {
        e = append_ids(ch, "choices[]", file, lineno, b->vocab, b);
      }
      if (e == ITR_OK && b->n_ids == before)
        e = itr_error_set(ITR_ERR_INPUT, "%s:%ld: choice %d is empty", file, lineno, c);
      if (e == ITR_OK) e = push_seq(b, file, plen, b->n_groups, c == (int)j);
    }
    free(prompt);
    ITR_TRY(e);
    ITR_CHECK(plen >= 1, ITR_ERR_INPUT, "%s:%ld: a question needs a prompt", file, lineno);
    b->n_groups++;
    b->any_sup = 1;
    return ITR_OK;
  }
  return push_seq(b, file, 0, -1, 0);
}

static itr_err parse_line(const char *line, size_t len, const char *file, long lineno, int vocab,
                          const text_source *src, builder *b) {
  const char *end = NULL;
  cJSON *o = cJSON_ParseWithLengthOpts(line, len, &end, 0);
  if (!o) {
    size_t pos = (end && end >= line && end <= line + len) ? (size_t)(end - line) : 0;
    return itr_error_set(ITR_ERR_INPUT, "%s:%ld: not valid JSON (column %zu); each line must be an object like "
                         "{\"input_ids\": [1, 2, 3]}", file, lineno, pos + 1);
  }
  /* one object per line: anything but blanks after it (text, a second object) is refused */
  const size_t used = (end && end >= line && end <= line + len) ? (size_t)(end - line) : len;
  for (size_t q = used; q < len; q++)
    if (line[q] != ' ' && line[q] != '\t' && line[q] != '\r' && line[q] != '\n') {
      cJSON_Delete(o);
      return itr_error_set(ITR_ERR_INPUT, "%s:%ld: text after the JSON object at column %zu; each line must hold "
                           "exactly one object like {\"input_ids\": [1, 2, 3]}", file, lineno, q + 1);
    }
  itr_err e = ITR_OK;
  const cJSON *ids = cJSON_IsObject(o) ? cJSON_GetObjectItemCaseSensitive(o, "input_ids") : NULL;
  const cJSON *mask = cJSON_IsObject(o) ? cJSON_GetObjectItemCaseSensitive(o, "attention_mask") : NULL;
  const cJSON *text = cJSON_IsObject(o) ? cJSON_GetObjectItemCaseSensitive(o, "text") : NULL;
  if (!cJSON_IsObject(o)) {
    e = itr_error_set(ITR_ERR_INPUT, "%s:%ld: expected a JSON object like {\"input_ids\": [1, 2, 3]}", file, lineno);
  } else if (!ids && text && src->allow) {
    e = append_text(text, line, len, file, lineno, src, b, 1);
    if (e == ITR_OK) e = finish_line(o, line, len, file, lineno, src, b);
    cJSON_Delete(o);
    return e;
  } else if (!ids && src->allow) {
    e = itr_error_set(ITR_ERR_INPUT, "%s:%ld: no 'input_ids' or 'text' key; each line needs {\"input_ids\": [...]} "
                      "or {\"text\": \"...\"}", file, lineno);
  } else if (!ids) {
    e = itr_error_set(ITR_ERR_INPUT, "%s:%ld: no 'input_ids' key; each line needs {\"input_ids\": [...]} "
                      "(tokenize text before calibration)", file, lineno);
  } else if (!cJSON_IsArray(ids)) {
    e = itr_error_set(ITR_ERR_INPUT, "%s:%ld: 'input_ids' must be a list of integers", file, lineno);
  } else if (!ids->child) {
    e = itr_error_set(ITR_ERR_INPUT, "%s:%ld: 'input_ids' is empty; every sequence needs at least one token",
                      file, lineno);
  }
  if (e == ITR_OK && mask && cJSON_IsArray(mask)) {
    for (const cJSON *v = mask->child; v; v = v->next)
      if (cJSON_IsNumber(v) && v->valuedouble == 0) {
        e = itr_error_set(ITR_ERR_INPUT, "%s:%ld: attention_mask has zeros (padded sequence); write sequences "
                          "without padding", file, lineno);
        break;
      }
  }
  long k = 0;
  for (const cJSON *v = (e == ITR_OK) ? ids->child : NULL; v; v = v->next, k++) {
    double x = cJSON_IsNumber(v) ? v->valuedouble : NAN;
    if (!cJSON_IsNumber(v) || !isfinite(x) || x != floor(x)) {
      char got[96];
      itr_json_describe(v, got, sizeof got);
      e = itr_error_set(ITR_ERR_INPUT, "%s:%ld: input_ids[%ld] is %s, not an integer token id", file, lineno, k,
                        got);
      break;
    }
    if (x < 0 || x >= (double)vocab) {
      e = itr_error_set(ITR_ERR_INPUT, "%s:%ld: input_ids[%ld] = %.0f is outside the vocabulary [0, %d). Was "
                        "this data tokenized for another model?", file, lineno, k, x, vocab);
      break;
    }
    e = grow((void **)&b->ids, &b->cap_ids, b->n_ids + 1, sizeof(int32_t), file);
    if (e != ITR_OK) break;
    b->ids[b->n_ids++] = (int32_t)x;
  }
  if (e == ITR_OK) e = finish_line(o, line, len, file, lineno, src, b);
  cJSON_Delete(o);
  return e;
}

static itr_err read_jsonl(const char *path, int vocab_size, const text_source *src, itr_token_set *out) {
  ITR_CHECK(vocab_size >= 1, ITR_ERR_INPUT, "%s: vocabulary size %d must be positive", path, vocab_size);
  FILE *f = fopen(path, "rb");
  ITR_CHECK(f, ITR_ERR_INPUT, "cannot open '%s': %s", path, strerror(errno));
  builder b;
  memset(&b, 0, sizeof b);
  b.vocab = vocab_size;
  itr_err e = grow((void **)&b.offsets, &b.cap_off, 1, sizeof(int64_t), path);
  if (e == ITR_OK) b.offsets[b.n_off++] = 0;
  char *line = NULL;
  size_t cap = 0;
  long lineno = 0;
  ssize_t n;
  while (e == ITR_OK && (n = getline(&line, &cap, f)) >= 0) {
    lineno++;
    if (is_blank(line, (size_t)n)) continue;
    if (memchr(line, '\0', (size_t)n)) {
      e = itr_error_set(ITR_ERR_INPUT, "%s:%ld: contains a NUL byte; is this a text file?", path, lineno);
      break;
    }
    e = parse_line(line, (size_t)n, path, lineno, vocab_size, src, &b);
    if (e == ITR_OK && b.n_off - 1 > (size_t)(1 << 30))
      e = itr_error_set(ITR_ERR_INPUT, "%s: too many sequences", path);
  }
  if (e == ITR_OK && ferror(f)) e = itr_error_set(ITR_ERR_INPUT, "cannot read '%s': %s", path, strerror(errno));
  free(line);
  fclose(f);
  if (e == ITR_OK && b.n_off < 2)
    e = itr_error_set(ITR_ERR_INPUT, "%s: holds no sequences (expected one {\"input_ids\": [...]} per line)", path);
  if (e != ITR_OK) {
    free(b.offsets);
    free(b.ids);
    free(b.prompt);
    free(b.group);
    free(b.is_label);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  memset(out, 0, sizeof *out);
  out->n_seqs = (int)(b.n_off - 1);
  out->n_tokens = (int64_t)b.n_ids;
  out->offsets = b.offsets;
  out->ids = b.ids;
  if (b.any_sup) {
    out->prompt_len = b.prompt;
    out->group = b.group;
    out->is_label = b.is_label;
    out->n_groups = b.n_groups;
  } else {
    free(b.prompt);
    free(b.group);
    free(b.is_label);
  }
  return ITR_OK;
}

itr_err itr_token_set_read(const char *path, int vocab_size, itr_token_set *out) {
  const text_source none = {0, NULL, NULL};
  ITR_TRY(read_jsonl(path, vocab_size, &none, out));
  return ITR_OK;
}

itr_err itr_token_set_read_text(const char *path, int vocab_size, const char *tokenizer_dir, itr_tokenizer **tok,
                                itr_token_set *out) {
  ITR_CHECK(tok, ITR_ERR_INTERNAL, "itr_token_set_read_text: tok must point to a tokenizer or to NULL");
  const text_source src = {1, tokenizer_dir, tok};
  ITR_TRY(read_jsonl(path, vocab_size, &src, out));
  return ITR_OK;
}

void itr_token_set_fini(itr_token_set *ts) {
  if (!ts) return;
  free(ts->offsets);
  free(ts->ids);
  free(ts->prompt_len);
  free(ts->group);
  free(ts->is_label);
  memset(ts, 0, sizeof *ts);
}

itr_err itr_token_set_write(const char *path, const itr_token_set *ts) {
  ITR_CHECK(ts->n_seqs >= 1 && ts->offsets && ts->offsets[0] == 0 && ts->offsets[ts->n_seqs] == ts->n_tokens,
            ITR_ERR_INPUT, "token set for %s is malformed (%d sequences, %lld tokens)", path, ts->n_seqs,
            (long long)ts->n_tokens);
  for (int s = 0; s < ts->n_seqs; s++)
    ITR_CHECK(ts->offsets[s + 1] > ts->offsets[s], ITR_ERR_INPUT,
              "token set for %s: sequence %d is empty or its offsets decrease", path, s);
  for (int64_t i = 0; i < ts->n_tokens; i++)
    ITR_CHECK(ts->ids[i] >= 0, ITR_ERR_INPUT, "token set for %s: id %lld is negative (%d)", path, (long long)i,
              (int)ts->ids[i]);
  for (int s = 0; ts->group && s < ts->n_seqs; s++) /* a question's choices are consecutive, after one prompt */
    ITR_CHECK(ts->group[s] < 0 || (ts->prompt_len && ts->prompt_len[s] >= 1 &&
                                   ts->prompt_len[s] < ts->offsets[s + 1] - ts->offsets[s] &&
                                   (s == 0 || ts->group[s - 1] != ts->group[s] ||
                                    ts->prompt_len[s - 1] == ts->prompt_len[s])),
              ITR_ERR_INPUT, "token set for %s: sequence %d is a choice without a shared prompt", path, s);
  /* At most 12 characters per id ("2147483647, ") and 64 per sequence of framing (keys, prompt_len, label). */
  size_t cap, t1;
  ITR_CHECK(itr_mul_size((size_t)ts->n_tokens, 12, &t1) && itr_mul_size((size_t)ts->n_seqs, 64, &cap) &&
                cap <= SIZE_MAX - t1 - 1,
            ITR_ERR_INPUT, "token set for %s is too large", path);
  cap += t1 + 1;
  char *buf = NULL;
  ITR_TRY(itr_calloc(cap, 1, "token file text", &buf));
  size_t pos = 0;
#define PUT_IDS(a, b)                                                                                       \
  for (int64_t i = (a); i < (b); i++) pos += (size_t)snprintf(buf + pos, cap - pos, "%s%d", i > (a) ? ", " : "", (int)ts->ids[i])
  for (int s = 0; s < ts->n_seqs;) {
    const int64_t o = ts->offsets[s], k = ts->prompt_len ? ts->prompt_len[s] : 0;
    const int32_t g = ts->group ? ts->group[s] : -1;
    pos += (size_t)snprintf(buf + pos, cap - pos, "{\"input_ids\": [");
    if (g < 0) { /* a sequence, with the prompt_len its line gave (a completion's prompt, or prompt_len) */
      PUT_IDS(o, ts->offsets[s + 1]);
      if (k > 0) pos += (size_t)snprintf(buf + pos, cap - pos, "], \"prompt_len\": %lld}\n", (long long)k);
      else pos += (size_t)snprintf(buf + pos, cap - pos, "]}\n");
      s++;
      continue;
    }
    /* a question: the prompt once, each choice's ids after it, the label: the line it was read from */
    PUT_IDS(o, o + k);
    pos += (size_t)snprintf(buf + pos, cap - pos, "], \"choices\": [");
    int c = 0, label = -1;
    for (; s < ts->n_seqs && ts->group[s] == g; s++, c++) {
      pos += (size_t)snprintf(buf + pos, cap - pos, "%s[", c ? ", " : "");
      PUT_IDS(ts->offsets[s] + k, ts->offsets[s + 1]);
      pos += (size_t)snprintf(buf + pos, cap - pos, "]");
      if (ts->is_label && ts->is_label[s]) label = c;
    }
    if (label < 0) {
      free(buf);
      return itr_error_set(ITR_ERR_INPUT, "token set for %s: question %d has no labelled choice", path, (int)g);
    }
    pos += (size_t)snprintf(buf + pos, cap - pos, "], \"label\": %d}\n", label);
  }
#undef PUT_IDS
  itr_err e = itr_iofile_write_atomic(path, buf, pos);
  free(buf);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}
