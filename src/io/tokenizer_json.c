/* Hugging Face tokenizer.json (huggingface/tokenizers, model "BPE") read as hostile input, and its
 * encoder, giving the ids of the `tokenizers` crate (Tokenizer::encode). The pipeline, as there:
 *   1. added tokens (added_vocabulary.rs): the text is cut at the added tokens whose "normalized" is
 *      false (leftmost match, the longest at that position; lstrip/rstrip/single_word honoured), each
 *      becoming its id;
 *   2. the normalizer on every other piece (Sequence, Prepend, Replace with a String pattern, NFC /
 *      NFD / NFKC / NFKD through ICU), then the cut at the added tokens whose "normalized" is true;
 *   3. the pre_tokenizer (Sequence, Split with a Regex or String pattern, ByteLevel, Metaspace) cuts
 *      each piece into pre-tokens (empty ones dropped); ByteLevel maps every byte to the GPT-2
 *      bytes_to_unicode character;
 *   4. the BPE model on each pre-token (models/bpe/model.rs and word.rs): with ignore_merges a
 *      pre-token that is a vocabulary entry is that entry; otherwise one symbol per character (a
 *      character outside the vocabulary: its bytes' <0xXX> tokens with byte_fallback, else unk_token
 *      (fused with fuse_unk), else dropped), then merges lowest rank first, leftmost on equal rank,
 *      with word.rs's check of a stale queue entry (the pair now at its position must merge to the
 *      same id);
 *   5. the post_processor's special tokens (TemplateProcessing, Roberta/Bert, Sequence) when asked.
 * Regexes run through PCRE2 (UTF + UCP). The tokenizers crate compiles them with Oniguruma, whose
 * \s also matches U+0085 (NEL): \s and \S are rewritten so PCRE2 agrees. A match limit bounds the
 * work of a hostile regex. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>

#include "io/iofile.h"
#include "io/tok_internal.h"
#include "iteris/io.h"

#define TJ_FILE_CAP ((size_t)256 << 20) /* largest tokenizer.json accepted (Llama 3's is 9 MB) */
#define TJ_TEXT_MAX ((size_t)1 << 30)   /* longest text one call encodes, in bytes */
#define TJ_MAX_STEPS 16                 /* normalizer / pre-tokenizer steps after flattening */
#define TJ_MAX_SPECIAL 16               /* ids in the post-processor's prefix or suffix */
#define TJ_MATCH_LIMIT 10000000u        /* PCRE2 backtracking bound per match attempt */

/* ---- small growable buffers ------------------------------------------------------------------ */

typedef struct {
  char *p;
  size_t n, cap;
} tj_buf;

static itr_err buf_reserve(tj_buf *b, size_t extra) {
  ITR_CHECK(extra <= SIZE_MAX / 4 - b->n, ITR_ERR_INPUT, "tokenizer: text too large");
  if (b->n + extra + 1 <= b->cap) return ITR_OK;
  size_t cap = b->cap ? b->cap : 64;
  while (cap < b->n + extra + 1) cap *= 2;
  char *p = realloc(b->p, cap);
  ITR_CHECK(p, ITR_ERR_INTERNAL, "tokenizer: out of memory (%zu bytes)", cap);
  b->p = p;
  b->cap = cap;
  return ITR_OK;
}
static itr_err buf_add(tj_buf *b, const void *s, size_t n) {
  ITR_TRY(buf_reserve(b, n));
  if (n) memcpy(b->p + b->n, s, n);
  b->n += n;
  b->p[b->n] = '\0';
  return ITR_OK;
}

typedef struct {
  int32_t *p;
  size_t n, cap;
} tj_ids;

static itr_err ids_add(tj_ids *v, int32_t id) {
  if (v->n == v->cap) {
    size_t cap = v->cap ? 2 * v->cap : 64;
    ITR_CHECK(cap < SIZE_MAX / sizeof(int32_t), ITR_ERR_INTERNAL, "tokenizer: too many ids");
    int32_t *p = realloc(v->p, cap * sizeof(int32_t));
    ITR_CHECK(p, ITR_ERR_INTERNAL, "tokenizer: out of memory (%zu ids)", cap);
    v->p = p;
    v->cap = cap;
  }
  v->p[v->n++] = id;
  return ITR_OK;
}

/* A list of pieces: byte ranges of one buffer, each with "starts at offset 0 of the text". */
typedef struct {
  tj_buf data;
  size_t *off, *len;
  unsigned char *at0;
  size_t n, cap;
} tj_pieces;

static itr_err pieces_add(tj_pieces *P, const char *s, size_t n, int at0) {
  if (n == 0) return ITR_OK; /* the crate drops empty pieces */
  if (P->n == P->cap) {
    size_t cap = P->cap ? 2 * P->cap : 16;
    size_t *o = realloc(P->off, cap * sizeof(size_t));
    if (o) P->off = o;
    size_t *l = o ? realloc(P->len, cap * sizeof(size_t)) : NULL;
    if (l) P->len = l;
    unsigned char *a = l ? realloc(P->at0, cap) : NULL;
    ITR_CHECK(a, ITR_ERR_INTERNAL, "tokenizer: out of memory (%zu pieces)", cap);
    P->at0 = a;
    P->cap = cap;
  }
  P->off[P->n] = P->data.n;
  P->len[P->n] = n;
  P->at0[P->n] = (unsigned char)(at0 != 0);
  P->n++;
  return buf_add(&P->data, s, n);
}
static void pieces_clear(tj_pieces *P) {
  P->n = 0;
  P->data.n = 0;
}
static void pieces_free(tj_pieces *P) {
  free(P->data.p);
  free(P->off);
  free(P->len);
  free(P->at0);
}

/* ---- UTF-8 ------------------------------------------------------------------------------------- */

/* Length of the valid UTF-8 sequence at s[0..n) (1..4), or 0 when invalid (overlong, surrogate,
 * beyond U+10FFFF, truncated). *cp = its code point. */
static size_t utf8_next(const unsigned char *s, size_t n, uint32_t *cp) {
  const unsigned c = s[0];
  if (c < 0x80) return *cp = c, 1;
  size_t k;
  uint32_t v, min;
  if (c >= 0xC2 && c <= 0xDF) k = 2, v = c & 0x1F, min = 0x80;
  else if (c >= 0xE0 && c <= 0xEF) k = 3, v = c & 0x0F, min = 0x800;
  else if (c >= 0xF0 && c <= 0xF4) k = 4, v = c & 0x07, min = 0x10000;
  else return 0;
  if (n < k) return 0;
  for (size_t i = 1; i < k; i++) {
    if ((s[i] & 0xC0) != 0x80) return 0;
    v = v << 6 | (s[i] & 0x3F);
  }
  if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 0;
  *cp = v;
  return k;
}

/* Offset of the first invalid byte of s[0..n), or n when it is all valid UTF-8. */
static size_t utf8_check(const unsigned char *s, size_t n) {
  size_t i = 0;
  uint32_t cp;
  while (i < n) {
    const size_t k = utf8_next(s + i, n - i, &cp);
    if (k == 0) return i;
    i += k;
  }
  return n;
}

static size_t utf8_put(uint32_t cp, char *out) {
  if (cp < 0x80) return out[0] = (char)cp, 1;
  if (cp < 0x800) {
    out[0] = (char)(0xC0 | cp >> 6);
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
  }
  if (cp < 0x10000) {
    out[0] = (char)(0xE0 | cp >> 12);
    out[1] = (char)(0x80 | (cp >> 6 & 0x3F));
    out[2] = (char)(0x80 | (cp & 0x3F));
    return 3;
  }
  out[0] = (char)(0xF0 | cp >> 18);
  out[1] = (char)(0x80 | (cp >> 12 & 0x3F));
  out[2] = (char)(0x80 | (cp >> 6 & 0x3F));
  out[3] = (char)(0x80 | (cp & 0x3F));
  return 4;
}

/* Unicode White_Space (Rust's char::is_whitespace, the `regex` crate's \s). */
static int is_white_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/* ---- the tokenizer ----------------------------------------------------------------------------- */

typedef struct {
  uint32_t off, len; /* the key, in pool */
  int32_t id;
} tj_entry;

typedef struct {
  int32_t a, b, rank, merged;
} tj_merge;

typedef struct {
  uint32_t off, len; /* content, in pool */
  int32_t id;
  unsigned char special, lstrip, rstrip, single_word, normalized;
} tj_added;

enum { NORM_PREPEND, NORM_REPLACE, NORM_UNICODE };
typedef struct {
  int kind;
  uint32_t a_off, a_len, b_off, b_len; /* Prepend: a; Replace: a -> b (in pool) */
  const UNormalizer2 *icu;             /* NFC, NFD, NFKC, NFKD (ICU's singleton: not freed) */
} tj_norm;

enum { PRE_BYTELEVEL, PRE_SPLIT, PRE_METASPACE };
enum { SPLIT_ISOLATED, SPLIT_REMOVED, SPLIT_MERGED_PREV, SPLIT_MERGED_NEXT };
enum { SCHEME_ALWAYS, SCHEME_FIRST, SCHEME_NEVER };
typedef struct {
  int kind;
  int add_prefix_space; /* ByteLevel */
  pcre2_code *re;       /* ByteLevel with use_regex (the GPT-2 pattern), Split */
  int behavior;         /* Split */
  char repl[8];         /* Metaspace: the replacement character's UTF-8 */
  size_t repl_len;
  int scheme, split; /* Metaspace */
} tj_pre;

struct itr_tok_json {
  char path[ITR_PATH_MAX];
  int vocab_size; /* config.json's V: every id is < V */
  tj_buf pool;    /* every string's bytes */
  tj_entry *ent;  /* (n_ent) the model vocabulary */
  size_t n_ent;
  int32_t *slot; /* (n_slot) open addressing: entry index or -1 */
  size_t n_slot;
  tj_merge *mrg; /* (n_mrg) rank = index */
  size_t n_mrg;
  int32_t *mslot; /* (n_mslot) open addressing over (a, b): merge index or -1 */
  size_t n_mslot;
  tj_added *added; /* (n_added) */
  size_t n_added;
  tj_norm norm[TJ_MAX_STEPS];
  int n_norm;
  tj_pre pre[TJ_MAX_STEPS];
  int n_pre;
  int byte_fallback, fuse_unk, ignore_merges;
  int32_t unk_id;  /* -1: none */
  int32_t fb[256]; /* <0xXX> ids, -1 when absent */
  int32_t prefix[TJ_MAX_SPECIAL], suffix[TJ_MAX_SPECIAL];
  int n_prefix, n_suffix;
  int32_t bos_id, eos_id;
  pcre2_code *word_end, *word_start; /* \w$ and ^\w for single_word */
  char byte_char[256][3];            /* bytes_to_unicode: UTF-8 of byte b's character */
  unsigned char first[2][256];       /* [normalized][b]: some added token starts with byte b */
  unsigned char byte_char_len[256];
};

static const char *pool_str(const itr_tok_json *t, uint32_t off) { return t->pool.p + off; }

static uint64_t hash_bytes(const char *s, size_t n) { return itr_hash64_bytes(itr_hash64(NULL), s, n); }

/* The entry index of the vocabulary key s[0..n), or -1. */
static int32_t vocab_find(const itr_tok_json *t, const char *s, size_t n) {
  if (!t->n_slot) return -1;
  for (size_t h = (size_t)hash_bytes(s, n) & (t->n_slot - 1);; h = (h + 1) & (t->n_slot - 1)) {
    const int32_t e = t->slot[h];
    if (e < 0) return -1;
    if (t->ent[e].len == n && memcmp(pool_str(t, t->ent[e].off), s, n) == 0) return e;
  }
}
static int32_t vocab_id(const itr_tok_json *t, const char *s, size_t n) {
  const int32_t e = vocab_find(t, s, n);
  return e < 0 ? -1 : t->ent[e].id;
}

static size_t merge_hash(int32_t a, int32_t b) {
  uint64_t k = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  return (size_t)k;
}
/* The merge of the pair (a, b), or NULL. */
static const tj_merge *merge_find(const itr_tok_json *t, int32_t a, int32_t b) {
  if (!t->n_mslot) return NULL;
  for (size_t h = merge_hash(a, b) & (t->n_mslot - 1);; h = (h + 1) & (t->n_mslot - 1)) {
    const int32_t m = t->mslot[h];
    if (m < 0) return NULL;
    if (t->mrg[m].a == a && t->mrg[m].b == b) return &t->mrg[m];
  }
}

static void init_bytes_to_unicode(itr_tok_json *t) {
  /* GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the other 68 bytes to
   * U+0100, U+0101, ... in byte order */
  int extra = 0;
  for (int b = 0; b < 256; b++) {
    const int keep = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    const uint32_t cp = keep ? (uint32_t)b : 0x100u + (uint32_t)extra++;
    t->byte_char_len[b] = (unsigned char)utf8_put(cp, t->byte_char[b]);
  }
}

/* ---- regexes ----------------------------------------------------------------------------------- */

/* Unicode White_Space as class members: Oniguruma's \s (and Rust's, and Python's regex module's).
 * PCRE2 10.42's UCP \s also matches U+180E, which is no longer White_Space. */
static const char WHITE_SPACE[] = "\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}"
                                  "\\x{202F}\\x{205F}\\x{3000}";

/* Rewrites a tokenizers-crate (Oniguruma) pattern for PCRE2: \s -> [WHITE_SPACE] and \S ->
 * [^WHITE_SPACE] outside a class, \s -> WHITE_SPACE inside one. */
static itr_err rewrite_regex(const char *file, const char *field, const char *pat, tj_buf *out) {
  const size_t ws = sizeof WHITE_SPACE - 1;
  int in_class = 0;
  size_t class_start = 0; /* out position just after '[' or '[^' */
  for (size_t i = 0; pat[i]; i++) {
    const char c = pat[i];
    if (c == '\\' && pat[i + 1]) {
      const char d = pat[i + 1];
      if (d == 's' || d == 'S') {
        ITR_CHECK(!(in_class && d == 'S'), ITR_ERR_INPUT, "%s: %s: \\S inside a character class is not supported", file,
                  field);
        if (!in_class) ITR_TRY(buf_add(out, d == 's' ? "[" : "[^", d == 's' ? 1 : 2));
        ITR_TRY(buf_add(out, WHITE_SPACE, ws));
        if (!in_class) ITR_TRY(buf_add(out, "]", 1));
      } else {
        ITR_TRY(buf_add(out, pat + i, 2));
      }
      i++;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = 1;
      ITR_TRY(buf_add(out, "[", 1));
      if (pat[i + 1] == '^') {
        ITR_TRY(buf_add(out, "^", 1));
        i++;
      }
      class_start = out->n;
      continue;
    }
    if (in_class && c == ']' && out->n != class_start) in_class = 0;
    ITR_TRY(buf_add(out, &c, 1));
  }
  return ITR_OK;
}

static itr_err compile_regex(const char *file, const char *field, const char *pat, int literal, pcre2_code **out) {
  tj_buf b = {NULL, 0, 0};
  itr_err e = literal ? buf_add(&b, pat, strlen(pat)) : rewrite_regex(file, field, pat, &b);
  if (e != ITR_OK) {
    free(b.p);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  int code = 0;
  PCRE2_SIZE at = 0;
  pcre2_code *re = pcre2_compile((PCRE2_SPTR)(b.p ? b.p : ""), b.n, PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0),
                                 &code, &at, NULL);
  free(b.p);
  if (!re) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(code, msg, sizeof msg);
    return itr_error_set(ITR_ERR_INPUT, "%s: %s: the regex '%.200s' does not compile (PCRE2: %s, near offset %zu)", file,
                         field, pat, (const char *)msg, (size_t)at);
  }
  (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* faster when available; the interpreter otherwise */
  *out = re;
  return ITR_OK;
}

/* Matches re in s[0..n) at or after start: *ms, *me the match, or *ms = n + 1 when there is none.
 * ITR_ERR_INPUT when the match limit is hit (a pathological pattern). */
static itr_err regex_find(const itr_tok_json *t, pcre2_code *re, const char *s, size_t n, size_t start,
                          pcre2_match_data *md, pcre2_match_context *mc, size_t *ms, size_t *me) {
  const int rc = pcre2_match(re, (PCRE2_SPTR)s, n, start, PCRE2_NO_UTF_CHECK, md, mc);
  if (rc == PCRE2_ERROR_NOMATCH) {
    *ms = n + 1;
    return ITR_OK;
  }
  if (rc < 0) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(rc, msg, sizeof msg);
    return itr_error_set(ITR_ERR_INPUT, "%s: a pre-tokenizer regex failed on a piece of %zu bytes (PCRE2: %s)", t->path,
                         n, (const char *)msg);
  }
  const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
  *ms = ov[0];
  *me = ov[1];
  return ITR_OK;
}

/* ---- reading tokenizer.json -------------------------------------------------------------------- */

static itr_err pool_add(itr_tok_json *t, const char *s, size_t n, uint32_t *off) {
  ITR_CHECK(t->pool.n + n < UINT32_MAX / 2, ITR_ERR_INPUT, "%s: too many string bytes", t->path);
  *off = (uint32_t)t->pool.n;
  ITR_TRY(buf_add(&t->pool, s, n));
  return ITR_OK;
}

static const cJSON *get(const cJSON *o, const char *k) { return cJSON_GetObjectItemCaseSensitive(o, k); }
static int is_absent(const cJSON *v) { return !v || cJSON_IsNull(v); }

/* *out = the boolean field k of o, def when absent or null. */
static itr_err get_bool(const itr_tok_json *t, const cJSON *o, const char *where, const char *k, int def, int *out) {
  const cJSON *v = get(o, k);
  if (is_absent(v)) return *out = def, ITR_OK;
  ITR_CHECK(cJSON_IsBool(v), ITR_ERR_INPUT, "%s: %s.%s must be true or false", t->path, where, k);
  *out = cJSON_IsTrue(v);
  return ITR_OK;
}
/* *out = the string field k of o (owned by o), NULL when absent or null. */
static itr_err get_str(const itr_tok_json *t, const cJSON *o, const char *where, const char *k, const char **out) {
  const cJSON *v = get(o, k);
  if (is_absent(v)) return *out = NULL, ITR_OK;
  ITR_CHECK(cJSON_IsString(v) && v->valuestring, ITR_ERR_INPUT, "%s: %s.%s must be a string", t->path, where, k);
  const size_t n = strlen(v->valuestring);
  ITR_CHECK(utf8_check((const unsigned char *)v->valuestring, n) == n, ITR_ERR_INPUT,
            "%s: %s.%s is not valid UTF-8", t->path, where, k);
  *out = v->valuestring;
  return ITR_OK;
}
/* A token id: an integer in 0..vocab_size-1. */
static itr_err get_id(const itr_tok_json *t, const cJSON *v, const char *what, const char *name, int32_t *out) {
  ITR_CHECK(v && cJSON_IsNumber(v), ITR_ERR_INPUT, "%s: %s '%.80s' has no integer id", t->path, what, name);
  const double d = v->valuedouble;
  ITR_CHECK(d >= 0 && d < (double)t->vocab_size && d == (double)(int32_t)d, ITR_ERR_INPUT,
            "%s: %s '%.80s' has id %.0f, outside 0..%d (config.json's vocab_size is %d). Is this the tokenizer of "
            "another model?", t->path, what, name, d, t->vocab_size - 1, t->vocab_size);
  *out = (int32_t)d;
  return ITR_OK;
}

static itr_err read_vocab(itr_tok_json *t, const cJSON *model) {
  const cJSON *vocab = get(model, "vocab");
  ITR_CHECK(cJSON_IsObject(vocab), ITR_ERR_INPUT, "%s: model.vocab must be an object {token: id}", t->path);
  size_t n = 0;
  for (const cJSON *e = vocab->child; e; e = e->next) n++;
  ITR_CHECK(n >= 1 && n <= (size_t)t->vocab_size, ITR_ERR_INPUT,
            "%s: model.vocab has %zu entries; it must have 1..%d (config.json's vocab_size)", t->path, n, t->vocab_size);
  ITR_TRY(itr_calloc(n, sizeof(tj_entry), "tokenizer vocabulary", &t->ent));
  size_t ns = 16;
  while (ns < 2 * n) ns *= 2;
  ITR_TRY(itr_calloc(ns, sizeof(int32_t), "tokenizer vocabulary index", &t->slot));
  for (size_t h = 0; h < ns; h++) t->slot[h] = -1;
  t->n_slot = ns;
  unsigned char *seen = NULL; /* (vocab_size) ids taken */
  ITR_TRY(itr_calloc((size_t)t->vocab_size, 1, "tokenizer id set", &seen));
  itr_err err = ITR_OK;
  for (const cJSON *e = vocab->child; e; e = e->next) {
    const char *k = e->string ? e->string : "";
    const size_t kl = strlen(k);
    int32_t id = 0;
    if (utf8_check((const unsigned char *)k, kl) != kl) { /* an empty key occurs (Llama 2's id 31353): it never matches */
      err = itr_error_set(ITR_ERR_INPUT, "%s: model.vocab has a token that is not valid UTF-8 (entry %zu)", t->path, t->n_ent);
      break;
    }
    if ((err = get_id(t, e, "model.vocab token", k, &id)) != ITR_OK) break;
    if (seen[id]) {
      err = itr_error_set(ITR_ERR_INPUT, "%s: model.vocab gives id %d twice (again to '%.80s')", t->path, (int)id, k);
      break;
    }
    if (vocab_find(t, k, kl) >= 0) {
      err = itr_error_set(ITR_ERR_INPUT, "%s: model.vocab lists the token '%.80s' twice", t->path, k);
      break;
    }
    seen[id] = 1;
    tj_entry *en = &t->ent[t->n_ent];
    if ((err = pool_add(t, k, kl, &en->off)) != ITR_OK) break;
    en->len = (uint32_t)kl;
    en->id = id;
    size_t h = (size_t)hash_bytes(k, kl) & (ns - 1);
    while (t->slot[h] >= 0) h = (h + 1) & (ns - 1);
    t->slot[h] = (int32_t)t->n_ent++;
  }
  free(seen);
  if (err != ITR_OK) return itr_error_frame(err, __func__, __FILE__, __LINE__);
  for (int b = 0; b < 256; b++) {
    char name[8];
    snprintf(name, sizeof name, "<0x%02X>", b);
    t->fb[b] = vocab_id(t, name, 6);
  }
  return ITR_OK;
}

/* The vocabulary id of the token s of a merge (index i), or an error naming it. */
static itr_err merge_side(const itr_tok_json *t, size_t i, const char *s, size_t n, int32_t *id) {
  *id = vocab_id(t, s, n);
  ITR_CHECK(*id >= 0, ITR_ERR_INPUT, "%s: model.merges[%zu] names the token '%.*s', which is not in model.vocab", t->path,
            i, (int)(n > 80 ? 80 : n), s);
  return ITR_OK;
}

static itr_err read_merges(itr_tok_json *t, const cJSON *model) {
  const cJSON *merges = get(model, "merges");
  if (is_absent(merges)) return ITR_OK;
  ITR_CHECK(cJSON_IsArray(merges), ITR_ERR_INPUT, "%s: model.merges must be an array", t->path);
  size_t n = 0;
  for (const cJSON *e = merges->child; e; e = e->next) n++;
  ITR_CHECK(n < (size_t)INT32_MAX / 4, ITR_ERR_INPUT, "%s: model.merges has too many entries (%zu)", t->path, n);
  if (n == 0) return ITR_OK;
  ITR_TRY(itr_calloc(n, sizeof(tj_merge), "tokenizer merges", &t->mrg));
  size_t ns = 16;
  while (ns < 2 * n) ns *= 2;
  ITR_TRY(itr_calloc(ns, sizeof(int32_t), "tokenizer merge index", &t->mslot));
  for (size_t h = 0; h < ns; h++) t->mslot[h] = -1;
  t->n_mslot = ns;
  tj_buf cat = {NULL, 0, 0};
  itr_err err = ITR_OK;
  size_t i = 0;
  for (const cJSON *e = merges->child; e && err == ITR_OK; e = e->next, i++) {
    const char *a, *b;
    size_t la, lb;
    if (cJSON_IsString(e) && e->valuestring) { /* "a b": exactly one space */
      a = e->valuestring;
      const char *sp = strchr(a, ' ');
      if (!sp || strchr(sp + 1, ' ')) {
        err = itr_error_set(ITR_ERR_INPUT, "%s: model.merges[%zu] is '%.80s'; a merge string is two tokens separated by "
                            "one space", t->path, i, a);
        break;
      }
      la = (size_t)(sp - a);
      b = sp + 1;
      lb = strlen(b);
    } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 && cJSON_IsString(e->child) &&
               cJSON_IsString(e->child->next) && e->child->valuestring && e->child->next->valuestring) {
      a = e->child->valuestring;
      b = e->child->next->valuestring;
      la = strlen(a);
      lb = strlen(b);
    } else {
      err = itr_error_set(ITR_ERR_INPUT, "%s: model.merges[%zu] must be \"a b\" or [\"a\", \"b\"]", t->path, i);
      break;
    }
    tj_merge *m = &t->mrg[t->n_mrg];
    if ((err = merge_side(t, i, a, la, &m->a)) != ITR_OK || (err = merge_side(t, i, b, lb, &m->b)) != ITR_OK) break;
    cat.n = 0;
    if ((err = buf_add(&cat, a, la)) != ITR_OK || (err = buf_add(&cat, b, lb)) != ITR_OK) break;
    m->merged = vocab_id(t, cat.p, cat.n);
    if (m->merged < 0) {
      err = itr_error_set(ITR_ERR_INPUT, "%s: model.merges[%zu] merges '%.*s' and '%.*s' into '%.160s', which is not "
                          "in model.vocab", t->path, i, (int)(la > 80 ? 80 : la), a, (int)(lb > 80 ? 80 : lb), b, cat.p);
      break;
    }
    if (merge_find(t, m->a, m->b)) {
      err = itr_error_set(ITR_ERR_INPUT, "%s: model.merges[%zu] repeats the merge '%.*s' '%.*s'", t->path, i,
                          (int)(la > 80 ? 80 : la), a, (int)(lb > 80 ? 80 : lb), b);
      break;
    }
    m->rank = (int32_t)t->n_mrg;
    size_t h = merge_hash(m->a, m->b) & (ns - 1);
    while (t->mslot[h] >= 0) h = (h + 1) & (ns - 1);
    t->mslot[h] = (int32_t)t->n_mrg++;
  }
  free(cat.p);
  if (err != ITR_OK) return itr_error_frame(err, __func__, __FILE__, __LINE__);
  return ITR_OK;
}

static itr_err read_model(itr_tok_json *t, const cJSON *root) {
  const cJSON *model = get(root, "model");
  ITR_CHECK(cJSON_IsObject(model), ITR_ERR_INPUT, "%s: 'model' must be an object", t->path);
  const char *type = NULL;
  ITR_TRY(get_str(t, model, "model", "type", &type));
  ITR_CHECK(!type || strcmp(type, "BPE") == 0, ITR_ERR_INPUT,
            "%s: model.type is '%.40s'; only BPE models are supported (not Unigram, WordPiece, WordLevel)", t->path,
            type);
  ITR_CHECK(type || get(model, "merges"), ITR_ERR_INPUT, "%s: model has no type and no merges; only BPE is supported",
            t->path);
  const cJSON *drop = get(model, "dropout");
  ITR_CHECK(is_absent(drop) || (cJSON_IsNumber(drop) && drop->valuedouble == 0), ITR_ERR_INPUT,
            "%s: model.dropout is set; BPE dropout is random and not supported for calibration data", t->path);
  const char *prefix = NULL, *suffix = NULL, *unk = NULL;
  ITR_TRY(get_str(t, model, "model", "continuing_subword_prefix", &prefix));
  ITR_TRY(get_str(t, model, "model", "end_of_word_suffix", &suffix));
  ITR_CHECK((!prefix || !*prefix) && (!suffix || !*suffix), ITR_ERR_INPUT,
            "%s: model.continuing_subword_prefix / end_of_word_suffix are not supported", t->path);
  ITR_TRY(get_bool(t, model, "model", "byte_fallback", 0, &t->byte_fallback));
  ITR_TRY(get_bool(t, model, "model", "fuse_unk", 0, &t->fuse_unk));
  ITR_TRY(get_bool(t, model, "model", "ignore_merges", 0, &t->ignore_merges));
  ITR_TRY(read_vocab(t, model));
  ITR_TRY(get_str(t, model, "model", "unk_token", &unk));
  t->unk_id = -1;
  if (unk) {
    t->unk_id = vocab_id(t, unk, strlen(unk));
    ITR_CHECK(t->unk_id >= 0, ITR_ERR_INPUT, "%s: model.unk_token '%.80s' is not in model.vocab", t->path, unk);
  }
  ITR_TRY(read_merges(t, model));
  return ITR_OK;
}

static itr_err read_added(itr_tok_json *t, const cJSON *root) {
  const cJSON *arr = get(root, "added_tokens");
  if (is_absent(arr)) return ITR_OK;
  ITR_CHECK(cJSON_IsArray(arr), ITR_ERR_INPUT, "%s: added_tokens must be an array", t->path);
  size_t n = 0;
  for (const cJSON *e = arr->child; e; e = e->next) n++;
  ITR_CHECK(n <= (size_t)t->vocab_size, ITR_ERR_INPUT, "%s: added_tokens has %zu entries, more than vocab_size %d",
            t->path, n, t->vocab_size);
  if (n == 0) return ITR_OK;
  ITR_TRY(itr_calloc(n, sizeof(tj_added), "tokenizer added tokens", &t->added));
  size_t i = 0;
  for (const cJSON *e = arr->child; e; e = e->next, i++) {
    char where[48];
    snprintf(where, sizeof where, "added_tokens[%zu]", i);
    ITR_CHECK(cJSON_IsObject(e), ITR_ERR_INPUT, "%s: %s must be an object", t->path, where);
    const char *content = NULL;
    ITR_TRY(get_str(t, e, where, "content", &content));
    ITR_CHECK(content && *content, ITR_ERR_INPUT, "%s: %s has no content", t->path, where);
    tj_added *a = &t->added[t->n_added];
    ITR_TRY(get_id(t, get(e, "id"), "added token", content, &a->id));
    int sp, ls, rs, sw, no;
    ITR_TRY(get_bool(t, e, where, "special", 0, &sp));
    ITR_TRY(get_bool(t, e, where, "lstrip", 0, &ls));
    ITR_TRY(get_bool(t, e, where, "rstrip", 0, &rs));
    ITR_TRY(get_bool(t, e, where, "single_word", 0, &sw));
    ITR_TRY(get_bool(t, e, where, "normalized", !sp, &no));
    const size_t cl = strlen(content);
    for (size_t k = 0; k < t->n_added; k++) {
      const tj_added *o = &t->added[k];
      ITR_CHECK(!(o->len == cl && memcmp(pool_str(t, o->off), content, cl) == 0), ITR_ERR_INPUT,
                "%s: %s repeats the added token '%.80s'", t->path, where, content);
    }
    const int32_t vid = vocab_id(t, content, cl);
    ITR_CHECK(vid < 0 || vid == a->id, ITR_ERR_INPUT, "%s: %s '%.80s' has id %d but model.vocab gives it id %d", t->path,
              where, content, (int)a->id, (int)vid);
    ITR_TRY(pool_add(t, content, cl, &a->off));
    a->len = (uint32_t)cl;
    a->special = (unsigned char)sp, a->lstrip = (unsigned char)ls, a->rstrip = (unsigned char)rs;
    a->single_word = (unsigned char)sw, a->normalized = (unsigned char)no;
    t->first[no][(unsigned char)content[0]] = 1;
    t->n_added++;
  }
  return ITR_OK;
}

static itr_err read_normalizer(itr_tok_json *t, const cJSON *n, const char *where, int depth) {
  if (is_absent(n)) return ITR_OK;
  ITR_CHECK(depth < 4 && cJSON_IsObject(n), ITR_ERR_INPUT, "%s: %s must be an object (or null)", t->path, where);
  const char *type = NULL;
  ITR_TRY(get_str(t, n, where, "type", &type));
  ITR_CHECK(type, ITR_ERR_INPUT, "%s: %s has no type", t->path, where);
  if (strcmp(type, "Sequence") == 0) {
    const cJSON *list = get(n, "normalizers");
    ITR_CHECK(cJSON_IsArray(list), ITR_ERR_INPUT, "%s: %s.normalizers must be an array", t->path, where);
    int k = 0;
    for (const cJSON *e = list->child; e; e = e->next, k++) {
      char w[96];
      snprintf(w, sizeof w, "%.60s.normalizers[%d]", where, k);
      ITR_TRY(read_normalizer(t, e, w, depth + 1));
    }
    return ITR_OK;
  }
  ITR_CHECK(t->n_norm < TJ_MAX_STEPS, ITR_ERR_INPUT, "%s: %s: more than %d normalizers", t->path, where, TJ_MAX_STEPS);
  tj_norm *s = &t->norm[t->n_norm];
  if (strcmp(type, "Prepend") == 0) {
    const char *p = NULL;
    ITR_TRY(get_str(t, n, where, "prepend", &p));
    ITR_CHECK(p, ITR_ERR_INPUT, "%s: %s (Prepend) has no 'prepend' string", t->path, where);
    s->kind = NORM_PREPEND;
    ITR_TRY(pool_add(t, p, strlen(p), &s->a_off));
    s->a_len = (uint32_t)strlen(p);
  } else if (strcmp(type, "Replace") == 0) {
    const cJSON *pat = get(n, "pattern");
    const char *from = NULL, *to = NULL;
    ITR_CHECK(cJSON_IsObject(pat), ITR_ERR_INPUT, "%s: %s.pattern must be {\"String\": ...}", t->path, where);
    ITR_CHECK(!get(pat, "Regex"), ITR_ERR_INPUT, "%s: %s: a Replace normalizer with a Regex pattern is not supported",
              t->path, where);
    ITR_TRY(get_str(t, pat, where, "String", &from));
    ITR_TRY(get_str(t, n, where, "content", &to));
    ITR_CHECK(from && *from && to, ITR_ERR_INPUT, "%s: %s (Replace) needs pattern.String (not empty) and content",
              t->path, where);
    s->kind = NORM_REPLACE;
    ITR_TRY(pool_add(t, from, strlen(from), &s->a_off));
    s->a_len = (uint32_t)strlen(from);
    ITR_TRY(pool_add(t, to, strlen(to), &s->b_off));
    s->b_len = (uint32_t)strlen(to);
  } else if (!strcmp(type, "NFC") || !strcmp(type, "NFD") || !strcmp(type, "NFKC") || !strcmp(type, "NFKD")) {
    UErrorCode st = U_ZERO_ERROR;
    s->kind = NORM_UNICODE;
    s->icu = !strcmp(type, "NFC")    ? unorm2_getNFCInstance(&st)
             : !strcmp(type, "NFD")  ? unorm2_getNFDInstance(&st)
             : !strcmp(type, "NFKC") ? unorm2_getNFKCInstance(&st)
                                     : unorm2_getNFKDInstance(&st);
    ITR_CHECK(U_SUCCESS(st) && s->icu, ITR_ERR_INTERNAL, "%s: %s: ICU has no %s normalizer (%s)", t->path, where, type,
              u_errorName(st));
  } else {
    return itr_error_set(ITR_ERR_INPUT, "%s: %s has type '%.40s'; supported normalizers: Sequence, Prepend, Replace "
                         "(String pattern), NFC, NFD, NFKC, NFKD", t->path, where, type);
  }
  t->n_norm++;
  return ITR_OK;
}

/* The GPT-2 pattern (pre_tokenizers/byte_level.rs). */
static const char GPT2_PATTERN[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static itr_err read_pre(itr_tok_json *t, const cJSON *p, const char *where, int depth) {
  if (is_absent(p)) return ITR_OK;
  ITR_CHECK(depth < 4 && cJSON_IsObject(p), ITR_ERR_INPUT, "%s: %s must be an object (or null)", t->path, where);
  const char *type = NULL;
  ITR_TRY(get_str(t, p, where, "type", &type));
  ITR_CHECK(type, ITR_ERR_INPUT, "%s: %s has no type", t->path, where);
  if (strcmp(type, "Sequence") == 0) {
    const cJSON *list = get(p, "pretokenizers");
    ITR_CHECK(cJSON_IsArray(list), ITR_ERR_INPUT, "%s: %s.pretokenizers must be an array", t->path, where);
    int k = 0;
    for (const cJSON *e = list->child; e; e = e->next, k++) {
      char w[96];
      snprintf(w, sizeof w, "%.60s.pretokenizers[%d]", where, k);
      ITR_TRY(read_pre(t, e, w, depth + 1));
    }
    return ITR_OK;
  }
  ITR_CHECK(t->n_pre < TJ_MAX_STEPS, ITR_ERR_INPUT, "%s: %s: more than %d pre-tokenizers", t->path, where, TJ_MAX_STEPS);
  tj_pre *s = &t->pre[t->n_pre];
  if (strcmp(type, "ByteLevel") == 0) {
    int use_regex;
    s->kind = PRE_BYTELEVEL;
    ITR_TRY(get_bool(t, p, where, "add_prefix_space", 1, &s->add_prefix_space));
    ITR_TRY(get_bool(t, p, where, "use_regex", 1, &use_regex));
    if (use_regex) ITR_TRY(compile_regex(t->path, where, GPT2_PATTERN, 0, &s->re));
  } else if (strcmp(type, "Split") == 0) {
    const cJSON *pat = get(p, "pattern");
    const char *rx = NULL, *str = NULL, *beh = NULL;
    int invert;
    ITR_CHECK(cJSON_IsObject(pat), ITR_ERR_INPUT, "%s: %s.pattern must be {\"Regex\": ...} or {\"String\": ...}", t->path,
              where);
    ITR_TRY(get_str(t, pat, where, "Regex", &rx));
    ITR_TRY(get_str(t, pat, where, "String", &str));
    ITR_CHECK((rx != NULL) != (str != NULL), ITR_ERR_INPUT, "%s: %s.pattern must hold one of Regex, String", t->path,
              where);
    ITR_CHECK(str == NULL || *str, ITR_ERR_INPUT, "%s: %s.pattern.String is empty", t->path, where);
    ITR_TRY(get_bool(t, p, where, "invert", 0, &invert));
    ITR_CHECK(!invert, ITR_ERR_INPUT, "%s: %s: Split with invert true is not supported", t->path, where);
    ITR_TRY(get_str(t, p, where, "behavior", &beh));
    ITR_CHECK(beh, ITR_ERR_INPUT, "%s: %s has no behavior", t->path, where);
    if (strcmp(beh, "Isolated") == 0) s->behavior = SPLIT_ISOLATED;
    else if (strcmp(beh, "Removed") == 0) s->behavior = SPLIT_REMOVED;
    else if (strcmp(beh, "MergedWithPrevious") == 0) s->behavior = SPLIT_MERGED_PREV;
    else if (strcmp(beh, "MergedWithNext") == 0) s->behavior = SPLIT_MERGED_NEXT;
    else
      return itr_error_set(ITR_ERR_INPUT, "%s: %s.behavior is '%.40s'; supported: Isolated, Removed, "
                           "MergedWithPrevious, MergedWithNext", t->path, where, beh);
    s->kind = PRE_SPLIT;
    char w[112];
    snprintf(w, sizeof w, "%.80s.pattern", where);
    ITR_TRY(compile_regex(t->path, w, rx ? rx : str, rx == NULL, &s->re));
  } else if (strcmp(type, "Metaspace") == 0) {
    const char *rep = NULL, *scheme = NULL;
    int aps = -1, split;
    ITR_TRY(get_str(t, p, where, "replacement", &rep));
    ITR_CHECK(rep, ITR_ERR_INPUT, "%s: %s (Metaspace) has no replacement", t->path, where);
    uint32_t cp;
    const size_t rl = strlen(rep);
    ITR_CHECK(rl >= 1 && utf8_next((const unsigned char *)rep, rl, &cp) == rl, ITR_ERR_INPUT,
              "%s: %s.replacement must be one character", t->path, where);
    memcpy(s->repl, rep, rl);
    s->repl_len = rl;
    ITR_TRY(get_str(t, p, where, "prepend_scheme", &scheme));
    if (get(p, "add_prefix_space")) ITR_TRY(get_bool(t, p, where, "add_prefix_space", 1, &aps));
    if (scheme) {
      if (strcmp(scheme, "always") == 0) s->scheme = SCHEME_ALWAYS;
      else if (strcmp(scheme, "first") == 0) s->scheme = SCHEME_FIRST;
      else if (strcmp(scheme, "never") == 0) s->scheme = SCHEME_NEVER;
      else
        return itr_error_set(ITR_ERR_INPUT, "%s: %s.prepend_scheme is '%.40s'; expected always, first or never",
                             t->path, where, scheme);
    } else {
      s->scheme = aps == 0 ? SCHEME_NEVER : SCHEME_ALWAYS; /* the older form: add_prefix_space */
    }
    ITR_TRY(get_bool(t, p, where, "split", 1, &split));
    s->split = split;
    s->kind = PRE_METASPACE;
  } else {
    return itr_error_set(ITR_ERR_INPUT, "%s: %s has type '%.40s'; supported pre-tokenizers: Sequence, Split, "
                         "ByteLevel, Metaspace", t->path, where, type);
  }
  t->n_pre++;
  return ITR_OK;
}

/* The id of a special token named in the post-processor or tokenizer_config.json. */
static int32_t special_id(const itr_tok_json *t, const char *s) {
  const size_t n = strlen(s);
  for (size_t k = 0; k < t->n_added; k++)
    if (t->added[k].len == n && memcmp(pool_str(t, t->added[k].off), s, n) == 0) return t->added[k].id;
  return vocab_id(t, s, n);
}

static itr_err add_special(itr_tok_json *t, int32_t *list, int *n, int32_t id, const char *where) {
  ITR_CHECK(*n < TJ_MAX_SPECIAL, ITR_ERR_INPUT, "%s: %s adds more than %d special tokens", t->path, where,
            TJ_MAX_SPECIAL);
  list[(*n)++] = id;
  return ITR_OK;
}

static itr_err read_template(itr_tok_json *t, const cJSON *p, const char *where) {
  const cJSON *single = get(p, "single"), *specials = get(p, "special_tokens");
  ITR_CHECK(cJSON_IsArray(single), ITR_ERR_INPUT, "%s: %s.single must be an array", t->path, where);
  int seen_a = 0, k = 0;
  for (const cJSON *e = single->child; e; e = e->next, k++) {
    const cJSON *sp = get(e, "SpecialToken"), *seq = get(e, "Sequence");
    if (seq) {
      ITR_CHECK(!seen_a, ITR_ERR_INPUT, "%s: %s.single[%d]: the sequence appears twice", t->path, where, k);
      seen_a = 1;
      continue;
    }
    ITR_CHECK(cJSON_IsObject(sp), ITR_ERR_INPUT, "%s: %s.single[%d] must be {\"SpecialToken\": ...} or "
              "{\"Sequence\": ...}", t->path, where, k);
    const char *name = NULL;
    ITR_TRY(get_str(t, sp, where, "id", &name));
    ITR_CHECK(name, ITR_ERR_INPUT, "%s: %s.single[%d].SpecialToken has no id", t->path, where, k);
    const cJSON *def = cJSON_IsObject(specials) ? get(specials, name) : NULL;
    ITR_CHECK(cJSON_IsObject(def) && cJSON_IsArray(get(def, "ids")), ITR_ERR_INPUT,
              "%s: %s.special_tokens has no entry with ids for '%.80s'", t->path, where, name);
    for (const cJSON *i = get(def, "ids")->child; i; i = i->next) {
      int32_t id;
      ITR_TRY(get_id(t, i, "post_processor special token", name, &id));
      ITR_TRY(add_special(t, seen_a ? t->suffix : t->prefix, seen_a ? &t->n_suffix : &t->n_prefix, id, where));
    }
  }
  ITR_CHECK(seen_a, ITR_ERR_INPUT, "%s: %s.single has no {\"Sequence\": {\"id\": \"A\"}}", t->path, where);
  return ITR_OK;
}

static itr_err read_post(itr_tok_json *t, const cJSON *p, const char *where, int depth) {
  if (is_absent(p)) return ITR_OK;
  ITR_CHECK(depth < 4 && cJSON_IsObject(p), ITR_ERR_INPUT, "%s: %s must be an object (or null)", t->path, where);
  const char *type = NULL;
  ITR_TRY(get_str(t, p, where, "type", &type));
  ITR_CHECK(type, ITR_ERR_INPUT, "%s: %s has no type", t->path, where);
  if (strcmp(type, "Sequence") == 0) {
    const cJSON *list = get(p, "processors");
    ITR_CHECK(cJSON_IsArray(list), ITR_ERR_INPUT, "%s: %s.processors must be an array", t->path, where);
    int k = 0;
    for (const cJSON *e = list->child; e; e = e->next, k++) {
      char w[96];
      snprintf(w, sizeof w, "%.60s.processors[%d]", where, k);
      ITR_TRY(read_post(t, e, w, depth + 1));
    }
    return ITR_OK;
  }
  if (strcmp(type, "ByteLevel") == 0) return ITR_OK; /* offsets only */
  if (strcmp(type, "TemplateProcessing") == 0) return read_template(t, p, where);
  if (strcmp(type, "RobertaProcessing") == 0 || strcmp(type, "BertProcessing") == 0) {
    const cJSON *cls = get(p, "cls"), *sep = get(p, "sep");
    ITR_CHECK(cJSON_IsArray(cls) && cJSON_GetArraySize(cls) == 2 && cJSON_IsArray(sep) && cJSON_GetArraySize(sep) == 2,
              ITR_ERR_INPUT, "%s: %s: cls and sep must be [token, id]", t->path, where);
    int32_t a, b;
    ITR_TRY(get_id(t, cls->child->next, "post_processor cls", "cls", &a));
    ITR_TRY(get_id(t, sep->child->next, "post_processor sep", "sep", &b));
    ITR_TRY(add_special(t, t->prefix, &t->n_prefix, a, where));
    ITR_TRY(add_special(t, t->suffix, &t->n_suffix, b, where));
    return ITR_OK;
  }
  return itr_error_set(ITR_ERR_INPUT, "%s: %s has type '%.40s'; supported post-processors: TemplateProcessing, "
                       "ByteLevel, RobertaProcessing, BertProcessing, Sequence", t->path, where, type);
}

/* A token named by tokenizer_config.json: a string or {"content": string}; *id = -1 when absent. */
static itr_err config_token(itr_tok_json *t, const cJSON *cfg, const char *cfile, const char *key, int32_t *id) {
  const cJSON *v = get(cfg, key);
  *id = -1;
  if (is_absent(v)) return ITR_OK;
  if (cJSON_IsObject(v)) v = get(v, "content");
  ITR_CHECK(v && cJSON_IsString(v) && v->valuestring, ITR_ERR_INPUT,
            "%s: '%s' must be a token string or {\"content\": string}", cfile, key);
  *id = special_id(t, v->valuestring);
  ITR_CHECK(*id >= 0, ITR_ERR_INPUT, "%s: %s '%.80s' is neither an added token nor in the vocabulary of %s", cfile,
            key, v->valuestring, t->path);
  return ITR_OK;
}

static int list_has(const int32_t *l, int n, int32_t id) {
  for (int i = 0; i < n; i++)
    if (l[i] == id) return 1;
  return 0;
}

/* tokenizer_config.json beside the tokenizer.json: bos_token / eos_token, add_bos_token /
 * add_eos_token (true: the template's prefix starts with BOS / suffix ends with EOS; false: they
 * are taken out of it). */
static itr_err read_config(itr_tok_json *t) {
  char cfile[ITR_PATH_MAX + 32];
  cJSON *cfg = NULL;
  ITR_TRY(itr_json_read_beside(t->path, "tokenizer_config.json", cfile, sizeof cfile, &cfg));
  if (!cfg) return ITR_OK;
  int32_t bos, eos;
  int add_bos = -1, add_eos = -1;
  itr_err e = config_token(t, cfg, cfile, "bos_token", &bos);
  if (e == ITR_OK) e = config_token(t, cfg, cfile, "eos_token", &eos);
  if (e == ITR_OK && !is_absent(get(cfg, "add_bos_token"))) e = itr_json_bool(cfg, "add_bos_token", cfile, 0, &add_bos);
  if (e == ITR_OK && !is_absent(get(cfg, "add_eos_token"))) e = itr_json_bool(cfg, "add_eos_token", cfile, 0, &add_eos);
  cJSON_Delete(cfg);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  if (bos >= 0) t->bos_id = bos;
  if (eos >= 0) t->eos_id = eos;
  if (add_bos == 1) {
    ITR_CHECK(t->bos_id >= 0, ITR_ERR_INPUT, "%s: add_bos_token is true but no bos_token is named", cfile);
    if (!list_has(t->prefix, t->n_prefix, t->bos_id)) {
      ITR_CHECK(t->n_prefix < TJ_MAX_SPECIAL, ITR_ERR_INPUT, "%s: too many special tokens", cfile);
      memmove(t->prefix + 1, t->prefix, (size_t)t->n_prefix * sizeof(int32_t));
      t->prefix[0] = t->bos_id;
      t->n_prefix++;
    }
  } else if (add_bos == 0 && t->bos_id >= 0) {
    int k = 0;
    for (int i = 0; i < t->n_prefix; i++)
      if (t->prefix[i] != t->bos_id) t->prefix[k++] = t->prefix[i];
    t->n_prefix = k;
  }
  if (add_eos == 1) {
    ITR_CHECK(t->eos_id >= 0, ITR_ERR_INPUT, "%s: add_eos_token is true but no eos_token is named", cfile);
    if (!list_has(t->suffix, t->n_suffix, t->eos_id)) ITR_TRY(add_special(t, t->suffix, &t->n_suffix, t->eos_id, cfile));
  } else if (add_eos == 0 && t->eos_id >= 0) {
    int k = 0;
    for (int i = 0; i < t->n_suffix; i++)
      if (t->suffix[i] != t->eos_id) t->suffix[k++] = t->suffix[i];
    t->n_suffix = k;
  }
  return ITR_OK;
}

static itr_err parse(itr_tok_json *t, const char *text, size_t size) {
  cJSON *root = NULL;
  ITR_TRY(itr_json_parse_object(text, size, t->path, &root));
  itr_err e = read_model(t, root);
  if (e == ITR_OK) e = read_added(t, root);
  if (e == ITR_OK) e = read_normalizer(t, get(root, "normalizer"), "normalizer", 0);
  if (e == ITR_OK) e = read_pre(t, get(root, "pre_tokenizer"), "pre_tokenizer", 0);
  if (e == ITR_OK) e = read_post(t, get(root, "post_processor"), "post_processor", 0);
  cJSON_Delete(root);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  t->bos_id = t->n_prefix > 0 ? t->prefix[0] : -1;
  t->eos_id = t->n_suffix > 0 ? t->suffix[t->n_suffix - 1] : -1;
  ITR_TRY(read_config(t));
  for (int k = 0; k < t->n_pre; k++)
    ITR_CHECK(t->pre[k].kind != PRE_BYTELEVEL || k == t->n_pre - 1 || t->pre[k + 1].kind == PRE_BYTELEVEL,
              ITR_ERR_INPUT, "%s: pre_tokenizer: a ByteLevel step must come last (its output is byte-mapped text)",
              t->path);
  ITR_TRY(compile_regex(t->path, "single_word", "\\w$", 0, &t->word_end));
  ITR_TRY(compile_regex(t->path, "single_word", "^\\w", 0, &t->word_start));
  return ITR_OK;
}

itr_err itr_tok_json_open(const char *path, int vocab_size, itr_tok_json **out) {
  ITR_CHECK(vocab_size >= 1, ITR_ERR_INPUT, "%s: vocab_size %d must be positive", path, vocab_size);
  itr_tok_json *t = NULL;
  ITR_TRY(itr_calloc(1, sizeof *t, "tokenizer", &t));
  snprintf(t->path, sizeof t->path, "%s", path);
  t->vocab_size = vocab_size;
  t->unk_id = t->bos_id = t->eos_id = -1;
  init_bytes_to_unicode(t);
  char *buf = NULL;
  size_t size = 0;
  itr_err e = itr_iofile_read(path, TJ_FILE_CAP, &buf, &size);
  if (e == ITR_OK) e = parse(t, buf, size);
  free(buf);
  if (e != ITR_OK) {
    itr_tok_json_destroy(t);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  *out = t;
  return ITR_OK;
}

void itr_tok_json_destroy(itr_tok_json *t) {
  if (!t) return;
  for (int k = 0; k < t->n_pre; k++) pcre2_code_free(t->pre[k].re);
  pcre2_code_free(t->word_end);
  pcre2_code_free(t->word_start);
  free(t->pool.p);
  free(t->ent);
  free(t->slot);
  free(t->mrg);
  free(t->mslot);
  free(t->added);
  free(t);
}

int itr_tok_json_bos(const itr_tok_json *t) { return t->bos_id; }
int itr_tok_json_eos(const itr_tok_json *t) { return t->eos_id; }

/* ---- encoding ---------------------------------------------------------------------------------- */

typedef struct {
  const itr_tok_json *t;
  tj_ids *out;
  pcre2_match_data *md;
  pcre2_match_context *mc;
  tj_pieces A, B;  /* pre-tokenizer ping-pong */
  tj_buf norm;     /* a normalized piece */
  tj_buf word;     /* scratch */
  int32_t *sym_id; /* BPE symbols: id, prev, next, byte length */
  int32_t *sym_prev, *sym_next;
  size_t sym_cap;
  struct tj_cand *heap;
  size_t heap_n, heap_cap;
} tj_run;

typedef struct tj_cand {
  int32_t rank, pos, merged;
} tj_cand;

/* a before b: lower rank first, then the lower position (word.rs's Merge order) */
static int cand_before(const tj_cand *a, const tj_cand *b) {
  if (a->rank != b->rank) return a->rank < b->rank;
  return a->pos < b->pos;
}
static void heap_push(tj_run *r, tj_cand x) {
  ITR_ASSERT(r->heap_n < r->heap_cap);
  size_t i = r->heap_n++;
  while (i > 0) {
    const size_t p = (i - 1) / 2;
    if (!cand_before(&x, &r->heap[p])) break;
    r->heap[i] = r->heap[p];
    i = p;
  }
  r->heap[i] = x;
}
static tj_cand heap_pop(tj_run *r) {
  tj_cand top = r->heap[0], x = r->heap[--r->heap_n];
  size_t i = 0;
  for (;;) {
    size_t l = 2 * i + 1, rr = l + 1, m = i;
    const tj_cand *best = &x;
    if (l < r->heap_n && cand_before(&r->heap[l], best)) m = l, best = &r->heap[l];
    if (rr < r->heap_n && cand_before(&r->heap[rr], best)) m = rr;
    if (m == i) break;
    r->heap[i] = r->heap[m];
    i = m;
  }
  if (r->heap_n > 0) r->heap[i] = x;
  return top;
}

static itr_err sym_reserve(tj_run *r, size_t n) {
  if (n <= r->sym_cap) return ITR_OK;
  size_t cap = r->sym_cap ? r->sym_cap : 64;
  while (cap < n) cap *= 2;
  free(r->sym_id), free(r->sym_prev), free(r->sym_next), free(r->heap);
  r->sym_id = r->sym_prev = r->sym_next = NULL;
  r->heap = NULL;
  r->sym_cap = 0;
  ITR_TRY(itr_calloc(cap, sizeof(int32_t), "BPE symbols", &r->sym_id));
  ITR_TRY(itr_calloc(cap, sizeof(int32_t), "BPE symbols", &r->sym_prev));
  ITR_TRY(itr_calloc(cap, sizeof(int32_t), "BPE symbols", &r->sym_next));
  ITR_TRY(itr_calloc(3 * cap, sizeof(tj_cand), "BPE merge queue", &r->heap));
  r->sym_cap = cap;
  r->heap_cap = 3 * cap;
  return ITR_OK;
}

static void push_pair(tj_run *r, int32_t pos) {
  const int32_t nx = r->sym_next[pos];
  if (pos < 0 || nx < 0) return;
  const tj_merge *m = merge_find(r->t, r->sym_id[pos], r->sym_id[nx]);
  if (m) heap_push(r, (tj_cand){m->rank, pos, m->merged});
}

/* The BPE model on one pre-token w[0..n) (model.rs merge_word + word.rs merge_all). */
static itr_err bpe(tj_run *r, const char *w, size_t n) {
  const itr_tok_json *t = r->t;
  if (n == 0) return ITR_OK;
  if (t->ignore_merges) {
    const int32_t id = vocab_id(t, w, n);
    if (id >= 0) return ids_add(r->out, id);
  }
  ITR_TRY(sym_reserve(r, n + 1));
  size_t count = 0, i = 0;
  int32_t unk = -1; /* a pending unk symbol (its id), emitted before the next known character */
  while (i < n) {
    uint32_t cp;
    size_t k = utf8_next((const unsigned char *)w + i, n - i, &cp);
    ITR_ASSERT(k > 0);
    if (k == 0) k = 1;
    const int32_t id = vocab_id(t, w + i, k);
    if (id >= 0) {
      if (unk >= 0) r->sym_id[count++] = unk, unk = -1;
      r->sym_id[count++] = id;
    } else {
      int done = 0;
      if (t->byte_fallback) {
        int all = 1;
        for (size_t q = 0; q < k; q++) all &= t->fb[(unsigned char)w[i + q]] >= 0;
        if (all) {
          for (size_t q = 0; q < k; q++) r->sym_id[count++] = t->fb[(unsigned char)w[i + q]];
          done = 1;
        }
      }
      if (!done && t->unk_id >= 0) {
        if (unk >= 0 && !t->fuse_unk) r->sym_id[count++] = unk;
        unk = t->unk_id;
      }
    }
    i += k;
  }
  if (unk >= 0) r->sym_id[count++] = unk;
  for (size_t s = 0; s < count; s++) {
    r->sym_prev[s] = (int32_t)s - 1;
    r->sym_next[s] = s + 1 < count ? (int32_t)s + 1 : -1;
  }
  r->heap_n = 0;
  for (size_t s = 0; s + 1 < count; s++) push_pair(r, (int32_t)s);
  while (r->heap_n > 0) {
    const tj_cand top = heap_pop(r);
    if (r->sym_id[top.pos] < 0) continue; /* merged away */
    const int32_t nx = r->sym_next[top.pos];
    if (nx < 0) continue;
    const tj_merge *m = merge_find(t, r->sym_id[top.pos], r->sym_id[nx]);
    if (!m || m->merged != top.merged) continue; /* stale */
    r->sym_id[top.pos] = top.merged;
    r->sym_id[nx] = -1;
    const int32_t after = r->sym_next[nx];
    r->sym_next[top.pos] = after;
    if (after >= 0) r->sym_prev[after] = top.pos;
    if (r->sym_prev[top.pos] >= 0) push_pair(r, r->sym_prev[top.pos]);
    push_pair(r, top.pos);
  }
  for (int32_t s = count > 0 ? 0 : -1; s >= 0; s = r->sym_next[s]) ITR_TRY(ids_add(r->out, r->sym_id[s]));
  return ITR_OK;
}

/* One Split step on the piece s[0..n) into out. */
static itr_err split_piece(tj_run *r, const tj_pre *p, const char *s, size_t n, int at0, tj_pieces *out) {
  size_t prev = 0, pos = 0;
  /* MergedWithNext keeps a match to glue it to the next piece: pending [pend, prev) */
  size_t pend = 0;
  int have_pend = 0;
  while (pos <= n) {
    size_t ms, me;
    ITR_TRY(regex_find(r->t, p->re, s, n, pos, r->md, r->mc, &ms, &me));
    if (ms > n) break;
    if (me == ms) { /* an empty match splits nothing; step one character */
      uint32_t cp;
      const size_t k = ms < n ? utf8_next((const unsigned char *)s + ms, n - ms, &cp) : 1;
      pos = ms + (k ? k : 1);
      continue;
    }
    switch (p->behavior) {
    case SPLIT_ISOLATED:
      ITR_TRY(pieces_add(out, s + prev, ms - prev, at0 && prev == 0));
      ITR_TRY(pieces_add(out, s + ms, me - ms, at0 && ms == 0));
      break;
    case SPLIT_REMOVED: ITR_TRY(pieces_add(out, s + prev, ms - prev, at0 && prev == 0)); break;
    case SPLIT_MERGED_PREV: ITR_TRY(pieces_add(out, s + prev, me - prev, at0 && prev == 0)); break;
    case SPLIT_MERGED_NEXT:
      if (have_pend) ITR_TRY(pieces_add(out, s + pend, ms - pend, at0 && pend == 0));
      else ITR_TRY(pieces_add(out, s + prev, ms - prev, at0 && prev == 0));
      pend = ms;
      have_pend = 1;
      break;
    }
    prev = pos = me;
  }
  if (have_pend) ITR_TRY(pieces_add(out, s + pend, n - pend, at0 && pend == 0));
  else if (p->behavior != SPLIT_MERGED_PREV || prev < n) ITR_TRY(pieces_add(out, s + prev, n - prev, at0 && prev == 0));
  return ITR_OK;
}

/* The pre-tokenizer steps and the model on the normalized piece s[0..n). at0: it starts at offset 0
 * of the text (Metaspace's prepend_scheme "first"). */
static itr_err pretokenize_and_model(tj_run *r, const char *s, size_t n, int at0) {
  const itr_tok_json *t = r->t;
  pieces_clear(&r->A);
  ITR_TRY(pieces_add(&r->A, s, n, at0));
  for (int k = 0; k < t->n_pre; k++) {
    const tj_pre *p = &t->pre[k];
    pieces_clear(&r->B);
    for (size_t i = 0; i < r->A.n; i++) {
      const char *x = r->A.data.p + r->A.off[i];
      const size_t xn = r->A.len[i];
      const int x0 = r->A.at0[i];
      if (p->kind == PRE_SPLIT) {
        ITR_TRY(split_piece(r, p, x, xn, x0, &r->B));
      } else if (p->kind == PRE_BYTELEVEL) {
        tj_buf *w = &r->word;
        w->n = 0;
        if (p->add_prefix_space && x[0] != ' ') ITR_TRY(buf_add(w, " ", 1));
        ITR_TRY(buf_add(w, x, xn));
        tj_pieces *dst = &r->B;
        tj_pieces tmp = {{NULL, 0, 0}, NULL, NULL, NULL, 0, 0};
        itr_err e = ITR_OK;
        if (p->re) {
          tj_pre iso = *p;
          iso.behavior = SPLIT_ISOLATED;
          e = split_piece(r, &iso, w->p, w->n, x0, &tmp);
        } else {
          e = pieces_add(&tmp, w->p, w->n, x0);
        }
        for (size_t j = 0; e == ITR_OK && j < tmp.n; j++) { /* map bytes to characters */
          const unsigned char *y = (const unsigned char *)tmp.data.p + tmp.off[j];
          r->norm.n = 0;
          for (size_t q = 0; e == ITR_OK && q < tmp.len[j]; q++)
            e = buf_add(&r->norm, t->byte_char[y[q]], t->byte_char_len[y[q]]);
          if (e == ITR_OK) e = pieces_add(dst, r->norm.p, r->norm.n, tmp.at0[j]);
        }
        pieces_free(&tmp);
        if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
      } else { /* Metaspace */
        tj_buf *w = &r->word;
        w->n = 0;
        const int starts = xn >= p->repl_len && memcmp(x, p->repl, p->repl_len) == 0;
        const int space0 = xn >= 1 && x[0] == ' '; /* becomes the replacement below */
        if (!starts && !space0 && (p->scheme == SCHEME_ALWAYS || (p->scheme == SCHEME_FIRST && x0)))
          ITR_TRY(buf_add(w, p->repl, p->repl_len));
        for (size_t q = 0; q < xn; q++) ITR_TRY(x[q] == ' ' ? buf_add(w, p->repl, p->repl_len) : buf_add(w, x + q, 1));
        if (!p->split) {
          ITR_TRY(pieces_add(&r->B, w->p, w->n, x0));
        } else { /* MergedWithNext on the replacement character */
          size_t start = 0;
          for (size_t q = 1; q + p->repl_len <= w->n; q++) {
            if (memcmp(w->p + q, p->repl, p->repl_len) != 0) continue;
            ITR_TRY(pieces_add(&r->B, w->p + start, q - start, x0 && start == 0));
            start = q;
          }
          ITR_TRY(pieces_add(&r->B, w->p + start, w->n - start, x0 && start == 0));
        }
      }
    }
    tj_pieces swap = r->A;
    r->A = r->B;
    r->B = swap;
  }
  for (size_t i = 0; i < r->A.n; i++) ITR_TRY(bpe(r, r->A.data.p + r->A.off[i], r->A.len[i]));
  return ITR_OK;
}

/* An added token (normalized == want_norm) starting exactly at s[i], the longest; -1 when none. */
static int added_at(const itr_tok_json *t, const char *s, size_t n, size_t i, int want_norm) {
  int best = -1;
  size_t best_len = 0;
  for (size_t k = 0; k < t->n_added; k++) {
    const tj_added *a = &t->added[k];
    if (a->normalized != want_norm || a->len > n - i || a->len <= best_len) continue;
    if (memcmp(s + i, pool_str(t, a->off), a->len) == 0) best = (int)k, best_len = a->len;
  }
  return best;
}

static int regex_hits(const tj_run *r, pcre2_code *re, const char *s, size_t n) {
  return pcre2_match(re, (PCRE2_SPTR)s, n, 0, PCRE2_NO_UTF_CHECK, r->md, r->mc) >= 0;
}

/* Cuts s[0..n) at the added tokens whose normalized flag is want_norm (added_vocabulary.rs
 * find_matches); calls back for the pieces between (through stage) and emits the tokens' ids. */
typedef itr_err (*tj_stage)(tj_run *r, const char *s, size_t n, int at0);

static itr_err split_added(tj_run *r, const char *s, size_t n, int at0, int want_norm, tj_stage stage) {
  const itr_tok_json *t = r->t;
  size_t start_offset = 0, i = 0;
  int any = 0;
  for (size_t k = 0; k < t->n_added; k++) any |= t->added[k].normalized == want_norm;
  while (any && i < n) {
    const int k = t->first[want_norm][(unsigned char)s[i]] ? added_at(t, s, n, i, want_norm) : -1;
    if (k < 0) {
      i++;
      continue;
    }
    const tj_added *a = &t->added[k];
    size_t start = i, stop = i + a->len;
    i = stop; /* the next match starts after this one (even when it is discarded) */
    if (a->single_word) {
      const int start_space = start == 0 || !regex_hits(r, t->word_end, s, start);
      const int stop_space = stop == n || !regex_hits(r, t->word_start, s + stop, n - stop);
      if (!start_space || !stop_space) continue;
    }
    if (a->lstrip) { /* the white space before it joins it */
      size_t b = start;
      while (b > start_offset) {
        size_t c = b - 1;
        while (c > 0 && ((unsigned char)s[c] & 0xC0) == 0x80) c--;
        uint32_t cp;
        if (!utf8_next((const unsigned char *)s + c, b - c, &cp) || !is_white_space(cp)) break;
        b = c;
      }
      start = b;
    }
    if (a->rstrip) {
      uint32_t cp;
      size_t k2;
      while (stop < n && (k2 = utf8_next((const unsigned char *)s + stop, n - stop, &cp)) && is_white_space(cp)) stop += k2;
    }
    if (start_offset < start) ITR_TRY(stage(r, s + start_offset, start - start_offset, at0 && start_offset == 0));
    ITR_TRY(ids_add(r->out, a->id));
    start_offset = stop;
    if (i < stop) i = stop;
  }
  if (start_offset < n) ITR_TRY(stage(r, s + start_offset, n - start_offset, at0 && start_offset == 0));
  return ITR_OK;
}

static itr_err stage_after_norm(tj_run *r, const char *s, size_t n, int at0) {
  return pretokenize_and_model(r, s, n, at0);
}

/* out = the Unicode normalization (ICU's n) of s[0..len), through UTF-16. */
static itr_err unicode_normalize(const UNormalizer2 *nz, const char *s, size_t len, tj_buf *out) {
  ITR_CHECK(len < (size_t)INT32_MAX / 4, ITR_ERR_INPUT, "tokenizer: a piece of %zu bytes is too long to normalize", len);
  UErrorCode st = U_ZERO_ERROR;
  UChar *a = NULL, *b = NULL;
  int32_t na = 0, nb = 0, n8 = 0;
  const int32_t cap = 4 * (int32_t)len + 16; /* NFKD expands a UTF-16 unit to at most 18; retried below */
  itr_err e = itr_calloc((size_t)cap, sizeof(UChar), "normalizer buffer", &a);
  if (e == ITR_OK) u_strFromUTF8(a, cap, &na, s, (int32_t)len, &st);
  if (e == ITR_OK && U_SUCCESS(st)) {
    int32_t bcap = 4 * na + 16;
    for (int tries = 0; tries < 3 && e == ITR_OK; tries++, bcap *= 4) {
      free(b);
      b = NULL;
      st = U_ZERO_ERROR;
      e = itr_calloc((size_t)bcap, sizeof(UChar), "normalizer buffer", &b);
      if (e == ITR_OK) nb = unorm2_normalize(nz, a, na, b, bcap, &st);
      if (st != U_BUFFER_OVERFLOW_ERROR) break;
    }
  }
  if (e == ITR_OK && U_SUCCESS(st)) {
    u_strToUTF8(NULL, 0, &n8, b, nb, &st);
    if (st == U_BUFFER_OVERFLOW_ERROR || st == U_STRING_NOT_TERMINATED_WARNING) st = U_ZERO_ERROR;
    out->n = 0;
    if (U_SUCCESS(st)) e = buf_reserve(out, (size_t)n8);
    if (e == ITR_OK && U_SUCCESS(st)) u_strToUTF8(out->p, n8 + 1, &n8, b, nb, &st);
    if (e == ITR_OK && U_SUCCESS(st)) out->n = (size_t)n8, out->p[n8] = '\0';
  }
  free(a);
  free(b);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  ITR_CHECK(U_SUCCESS(st), ITR_ERR_INTERNAL, "tokenizer: Unicode normalization failed (ICU: %s)", u_errorName(st));
  return ITR_OK;
}

/* The normalizer on one piece, then the cut at the normalized added tokens. */
static itr_err stage_normalize(tj_run *r, const char *s, size_t n, int at0) {
  const itr_tok_json *t = r->t;
  tj_buf cur = {NULL, 0, 0}, nxt = {NULL, 0, 0};
  itr_err e = buf_add(&cur, s, n);
  for (int k = 0; e == ITR_OK && k < t->n_norm; k++) {
    const tj_norm *m = &t->norm[k];
    const char *a = pool_str(t, m->a_off);
    nxt.n = 0;
    if (m->kind == NORM_UNICODE) {
      e = unicode_normalize(m->icu, cur.p ? cur.p : "", cur.n, &nxt);
    } else if (m->kind == NORM_PREPEND) {
      if (cur.n > 0) {
        e = buf_add(&nxt, a, m->a_len);
        if (e == ITR_OK) e = buf_add(&nxt, cur.p, cur.n);
      } else {
        e = buf_add(&nxt, "", 0);
      }
    } else { /* Replace: every non-overlapping occurrence, left to right */
      const char *b = pool_str(t, m->b_off);
      size_t q = 0;
      while (e == ITR_OK && q < cur.n) {
        if (cur.n - q >= m->a_len && memcmp(cur.p + q, a, m->a_len) == 0) {
          e = buf_add(&nxt, b, m->b_len);
          q += m->a_len;
        } else {
          e = buf_add(&nxt, cur.p + q, 1);
          q++;
        }
      }
      if (e == ITR_OK && cur.n == 0) e = buf_add(&nxt, "", 0);
    }
    tj_buf sw = cur;
    cur = nxt;
    nxt = sw;
  }
  /* pieces keep pointers into cur while later stages run: it lives until they return */
  if (e == ITR_OK) e = split_added(r, cur.p ? cur.p : "", cur.n, at0, 1, stage_after_norm);
  free(cur.p);
  free(nxt.p);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}

itr_err itr_tok_json_encode(const itr_tok_json *t, const char *text, size_t len, int add_special, int add_eos,
                            int32_t **ids, int64_t *n) {
  ITR_CHECK(t && (text || len == 0) && ids && n, ITR_ERR_INTERNAL, "itr_tok_json_encode: NULL argument");
  ITR_CHECK(len <= TJ_TEXT_MAX, ITR_ERR_INPUT, "text of %zu bytes is too long to tokenize (at most %zu)", len,
            TJ_TEXT_MAX);
  const size_t bad = utf8_check((const unsigned char *)text, len);
  ITR_CHECK(bad == len, ITR_ERR_INPUT,
            "the text is not valid UTF-8 at byte offset %zu (byte 0x%02X); %s encodes Unicode text only, as Hugging "
            "Face's tokenizers do", bad, (unsigned)(unsigned char)text[bad], t->path);
  ITR_CHECK(!add_eos || t->eos_id >= 0, ITR_ERR_INPUT,
            "%s: an EOS token was asked for but neither the post_processor nor tokenizer_config.json names one",
            t->path);
  tj_ids out = {NULL, 0, 0};
  tj_run r;
  memset(&r, 0, sizeof r);
  r.t = t;
  r.out = &out;
  itr_err e = ITR_OK;
  r.md = pcre2_match_data_create(4, NULL);
  r.mc = pcre2_match_context_create(NULL);
  if (!r.md || !r.mc) e = itr_error_set(ITR_ERR_INTERNAL, "tokenizer: out of memory (PCRE2 match data)");
  if (e == ITR_OK) {
    pcre2_set_match_limit(r.mc, TJ_MATCH_LIMIT);
    pcre2_set_depth_limit(r.mc, TJ_MATCH_LIMIT);
  }
  for (int k = 0; e == ITR_OK && add_special && k < t->n_prefix; k++) e = ids_add(&out, t->prefix[k]);
  if (e == ITR_OK) e = split_added(&r, text ? text : "", len, 1, 0, stage_normalize);
  for (int k = 0; e == ITR_OK && add_special && k < t->n_suffix; k++) e = ids_add(&out, t->suffix[k]);
  if (e == ITR_OK && add_eos && !(out.n > 0 && out.p[out.n - 1] == t->eos_id)) e = ids_add(&out, t->eos_id);
  if (e == ITR_OK && out.n == 0) e = ids_add(&out, 0), out.n = 0; /* a non-NULL array for an empty result */
  pcre2_match_data_free(r.md);
  pcre2_match_context_free(r.mc);
  pieces_free(&r.A);
  pieces_free(&r.B);
  free(r.norm.p);
  free(r.word.p);
  free(r.sym_id), free(r.sym_prev), free(r.sym_next), free(r.heap);
  if (e != ITR_OK) {
    free(out.p);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  *ids = out.p;
  *n = (int64_t)out.n;
  return ITR_OK;
}
