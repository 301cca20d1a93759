/* Text to token ids. This file finds the tokenizer of a folder (the first present of tokenizer.json,
 * tokenizer.model, tokenizer.bin, one tok*.bin) and dispatches to it: a Hugging Face tokenizer.json to
 * tokenizer_json.c (tok_internal.h), a SentencePiece tokenizer.model to tokenizer_spm.c (tok_spm.h),
 * and llama2.c's tokenizer.bin is read and encoded here.
 * llama2.c's tokenizer.bin (karpathy/llama2.c, run.c: build_tokenizer, encode): the file is read whole and treated as hostile (layout in include/iteris/io.h); the
 * encoder gives exactly llama2.c's ids:
 *   1. BOS (when asked), then the dummy prefix " " when the text is not empty;
 *   2. the text cut into UTF-8 code points the way llama2.c cuts it (a lead or ASCII byte starts a
 *      piece, up to 3 continuation bytes follow it; stray continuation bytes form pieces of up to 4):
 *      a piece that is a vocabulary token is that token, otherwise each of its bytes b is the byte
 *      fallback token b + 3 (<0xNN>);
 *   3. repeatedly, the adjacent pair whose concatenated pieces are a vocabulary token of the highest
 *      score (above -1e10, the first such pair on ties) is replaced by that token;
 *   4. EOS (when asked).
 * llama2.c rescans every pair after each merge (O(n^2)); here the candidate pairs sit in a heap
 * ordered by (score descending, position ascending) and stale entries are skipped, which picks the
 * same pair at every step in O(n log n). tests/ref/llama2c_tok_ref.py is the plain rescanning loop. */
#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/iofile.h"
#include "io/tok_internal.h"
#include "io/tok_spm.h"
#include "iteris/io.h"

#define TOK_FILE_CAP ((size_t)1 << 30) /* largest tokenizer.bin accepted (Llama 2's is 0.4 MB) */
#define TOK_TEXT_MAX ((size_t)1 << 30) /* longest text one call encodes, in bytes */
#define BOS_ID 1
#define EOS_ID 2
#define BYTE_FALLBACK0 3 /* <0x00> is token 3: after <unk>, <s>, </s> */
#define MERGE_FLOOR (-1e10f) /* llama2.c's initial best score: a pair must score above it */

struct itr_tokenizer {
  char path[ITR_PATH_MAX];
  int vocab;          /* V */
  int max_len;        /* the file's max_token_length: every piece is 1..max_len bytes */
  char *pool;         /* the pieces' bytes, back to back */
  int64_t *off;       /* (V + 1): piece i is pool[off[i] .. off[i+1]) */
  float *score;       /* (V) */
  int32_t *slot;      /* (n_slot) open-addressing hash of the pieces: a token id, or -1 */
  size_t n_slot;      /* power of two, >= 2 V */
  itr_spm *spm;       /* a SentencePiece tokenizer.model (tokenizer_spm.c): the fields above are unused */
  itr_tok_json *json; /* a Hugging Face tokenizer.json (tokenizer_json.c): everything above unused */
};

/* ---- reading ---------------------------------------------------------------------------------- */

static uint32_t rd_u32(const unsigned char *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static int32_t rd_i32(const unsigned char *p) {
  uint32_t u = rd_u32(p);
  int32_t v;
  memcpy(&v, &u, sizeof v);
  return v;
}
static float rd_f32(const unsigned char *p) {
  uint32_t u = rd_u32(p);
  float v;
  memcpy(&v, &u, sizeof v);
  return v;
}

static size_t piece_len(const itr_tokenizer *t, int id) { return (size_t)(t->off[id + 1] - t->off[id]); }
static const char *piece(const itr_tokenizer *t, int id) { return t->pool + t->off[id]; }

static size_t hash_slot(const itr_tokenizer *t, const char *s, size_t n) {
  return (size_t)itr_hash64_bytes(itr_hash64(NULL), s, n) & (t->n_slot - 1);
}

/* The token whose piece is s[0..n) (the lowest id when the file repeats a piece), or -1. */
static int lookup(const itr_tokenizer *t, const char *s, size_t n) {
  for (size_t h = hash_slot(t, s, n);; h = (h + 1) & (t->n_slot - 1)) {
    const int id = t->slot[h];
    if (id < 0) return -1;
    if (piece_len(t, id) == n && memcmp(piece(t, id), s, n) == 0) return id;
  }
}

static itr_err build_index(itr_tokenizer *t) {
  size_t n = 16;
  while (n < 2 * (size_t)t->vocab) n *= 2;
  t->n_slot = n;
  ITR_TRY(itr_calloc(n, sizeof(int32_t), "tokenizer index", &t->slot));
  for (size_t h = 0; h < n; h++) t->slot[h] = -1;
  for (int id = 0; id < t->vocab; id++) {
    if (lookup(t, piece(t, id), piece_len(t, id)) >= 0) continue; /* a repeated piece: the first id wins */
    size_t h = hash_slot(t, piece(t, id), piece_len(t, id));
    while (t->slot[h] >= 0) h = (h + 1) & (n - 1);
    t->slot[h] = id;
  }
  return ITR_OK;
}

/* Parses the bytes of a tokenizer.bin into t (which owns nothing yet). */
static itr_err parse(itr_tokenizer *t, const unsigned char *buf, size_t size) {
  const char *f = t->path;
  const int V = t->vocab;
  ITR_CHECK(size >= 4, ITR_ERR_INPUT, "%s: %zu bytes, too short for a llama2.c tokenizer.bin (it starts with a 4-byte "
            "max_token_length)", f, size);
  const int32_t max_len = rd_i32(buf);
  ITR_CHECK(max_len >= 1 && (size_t)max_len <= size - 4, ITR_ERR_INPUT,
            "%s: max_token_length is %d; it must be in 1..%zu (the bytes after it). Is this a llama2.c tokenizer.bin?",
            f, (int)max_len, size - 4);
  t->max_len = max_len;
  size_t pos = 4;
  int n_tok = 0; /* tokens found in the file */
  int64_t pool_bytes = 0;
  /* first pass: check every token, count them (also past V, for the message) and their bytes */
  while (pos < size) {
    const int i = n_tok;
    ITR_CHECK(size - pos >= 8, ITR_ERR_INPUT,
              "%s: token %d is truncated: %zu byte(s) left where its score and length need 8", f, i, size - pos);
    const float score = rd_f32(buf + pos);
    const int32_t len = rd_i32(buf + pos + 4);
    pos += 8;
    ITR_CHECK(isfinite(score), ITR_ERR_INPUT, "%s: token %d has score %g; scores must be finite", f, i, (double)score);
    ITR_CHECK(len >= 1 && len <= max_len, ITR_ERR_INPUT,
              "%s: token %d has length %d; lengths must be in 1..%d (the file's max_token_length)", f, i, (int)len,
              (int)max_len);
    ITR_CHECK((size_t)len <= size - pos, ITR_ERR_INPUT,
              "%s: token %d is truncated: its length is %d but %zu byte(s) are left", f, i, (int)len, size - pos);
    ITR_CHECK(memchr(buf + pos, '\0', (size_t)len) == NULL, ITR_ERR_INPUT,
              "%s: token %d holds a NUL byte; llama2.c's pieces are C strings", f, i);
    pos += (size_t)len;
    if (n_tok < V) pool_bytes += len;
    ITR_CHECK(n_tok < INT32_MAX, ITR_ERR_INPUT, "%s: too many tokens", f);
    n_tok++;
  }
  ITR_CHECK(n_tok == V, ITR_ERR_INPUT,
            "%s holds %d tokens but the model's vocab_size (config.json) is %d. Is this the tokenizer of another "
            "model?", f, n_tok, V);
  ITR_TRY(itr_calloc((size_t)pool_bytes + 1, 1, "tokenizer pieces", &t->pool));
  ITR_TRY(itr_calloc((size_t)V + 1, sizeof(int64_t), "tokenizer offsets", &t->off));
  ITR_TRY(itr_calloc((size_t)V, sizeof(float), "tokenizer scores", &t->score));
  /* second pass: copy (every length was checked above) */
  pos = 4;
  for (int i = 0; i < V; i++) {
    const int32_t len = rd_i32(buf + pos + 4);
    t->score[i] = rd_f32(buf + pos);
    memcpy(t->pool + t->off[i], buf + pos + 8, (size_t)len);
    t->off[i + 1] = t->off[i] + len;
    pos += 8 + (size_t)len;
  }
  ITR_TRY(build_index(t));
  return ITR_OK;
}

static itr_err open_file(const char *path, int vocab_size, itr_tokenizer **out) {
  itr_tokenizer *t = NULL;
  ITR_TRY(itr_calloc(1, sizeof *t, "tokenizer", &t));
  snprintf(t->path, sizeof t->path, "%s", path);
  t->vocab = vocab_size;
  char *buf = NULL;
  size_t size = 0;
  itr_err e = itr_iofile_read(path, TOK_FILE_CAP, &buf, &size);
  if (e == ITR_OK) e = parse(t, (const unsigned char *)buf, size);
  free(buf);
  if (e != ITR_OK) {
    itr_tokenizer_destroy(t);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  *out = t;
  return ITR_OK;
}

static int ends_with(const char *s, const char *suffix) {
  const size_t n = strlen(s), k = strlen(suffix);
  return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* A Hugging Face tokenizer.json (tokenizer_json.c) as an itr_tokenizer. */
static itr_err open_json(const char *path, int vocab_size, itr_tokenizer **out) {
  itr_tokenizer *t = NULL;
  ITR_TRY(itr_calloc(1, sizeof *t, "tokenizer", &t));
  snprintf(t->path, sizeof t->path, "%s", path);
  t->vocab = vocab_size;
  itr_err e = itr_tok_json_open(path, vocab_size, &t->json);
  if (e != ITR_OK) {
    itr_tokenizer_destroy(t);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  *out = t;
  return ITR_OK;
}

itr_err itr_tokenizer_find(const char *dir, char *path, size_t len) {
  ITR_CHECK(len > 0, ITR_ERR_INTERNAL, "itr_tokenizer_find: no room for the path");
  path[0] = '\0';
  char p[ITR_PATH_MAX + 64];
  /* the first present of: tokenizer.json, tokenizer.model, tokenizer.bin, one tok*.bin */
  ITR_TRY(itr_iofile_join(p, sizeof p, dir, "tokenizer.json"));
  if (!itr_iofile_is_file(p)) ITR_TRY(itr_iofile_join(p, sizeof p, dir, "tokenizer.model"));
  if (!itr_iofile_is_file(p)) ITR_TRY(itr_iofile_join(p, sizeof p, dir, "tokenizer.bin"));
  if (!itr_iofile_is_file(p)) {
    /* tok*.bin (llama2.c's custom vocabularies, e.g. tok512.bin): exactly one */
    DIR *d = opendir(dir);
    ITR_CHECK(d, ITR_ERR_INPUT, "cannot list the folder '%s' to look for a tokenizer", dir);
    char first[256] = "", second[256] = "";
    for (struct dirent *de; (de = readdir(d)) != NULL;) {
      const char *n = de->d_name;
      if (strncmp(n, "tok", 3) != 0 || !ends_with(n, ".bin") || strlen(n) >= sizeof first) continue;
      char q[ITR_PATH_MAX + 300];
      snprintf(q, sizeof q, "%s/%s", dir, n);
      if (!itr_iofile_is_file(q)) continue;
      if (!first[0] || strcmp(n, first) < 0) {
        snprintf(second, sizeof second, "%s", first);
        snprintf(first, sizeof first, "%s", n);
      } else if (!second[0] || strcmp(n, second) < 0) {
        snprintf(second, sizeof second, "%s", n);
      }
    }
    closedir(d);
    ITR_CHECK(!second[0], ITR_ERR_INPUT,
              "%s holds several tokenizers (%s, %s, ...); keep one, or name it tokenizer.bin", dir, first, second);
    if (!first[0]) return ITR_OK; /* none */
    ITR_TRY(itr_iofile_join(p, sizeof p, dir, first));
  }
  ITR_CHECK(strlen(p) < len, ITR_ERR_INPUT, "path too long: '%s'", p);
  snprintf(path, len, "%s", p);
  return ITR_OK;
}

/* Opens the file path by its name: *.json is Hugging Face's, *.model SentencePiece, anything else
 * llama2.c's format. */
static itr_err open_any(const char *path, int vocab_size, itr_tokenizer **out) {
  if (ends_with(path, ".json")) {
    ITR_TRY(open_json(path, vocab_size, out));
    return ITR_OK;
  }
  if (!ends_with(path, ".model")) {
    ITR_CHECK(vocab_size >= BYTE_FALLBACK0, ITR_ERR_INPUT,
              "tokenizer %s: vocab_size %d is too small (ids 0, 1, 2 are <unk>, BOS and EOS)", path, vocab_size);
    ITR_TRY(open_file(path, vocab_size, out));
    return ITR_OK;
  }
  ITR_CHECK(vocab_size >= 1, ITR_ERR_INPUT, "tokenizer %s: vocab_size %d is too small", path, vocab_size);
  itr_tokenizer *t = NULL;
  ITR_TRY(itr_calloc(1, sizeof *t, "tokenizer", &t));
  snprintf(t->path, sizeof t->path, "%s", path);
  t->vocab = vocab_size;
  const itr_err e = itr_spm_open(path, vocab_size, &t->spm);
  if (e != ITR_OK) {
    free(t);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  *out = t;
  return ITR_OK;
}

itr_err itr_tokenizer_open(const char *base_dir_or_file, int vocab_size, itr_tokenizer **out) {
  ITR_CHECK(vocab_size >= 1, ITR_ERR_INPUT, "tokenizer %s: vocab_size %d must be positive", base_dir_or_file,
            vocab_size);
  if (!itr_iofile_is_dir(base_dir_or_file)) {
    ITR_TRY(open_any(base_dir_or_file, vocab_size, out));
    return ITR_OK;
  }
  char path[ITR_PATH_MAX];
  ITR_TRY(itr_tokenizer_find(base_dir_or_file, path, sizeof path));
  ITR_CHECK(path[0], ITR_ERR_INPUT,
            "the folder %s has no tokenizer (looked for tokenizer.json, tokenizer.model, tokenizer.bin and tok*.bin)",
            base_dir_or_file);
  ITR_TRY(open_any(path, vocab_size, out));
  return ITR_OK;
}

void itr_tokenizer_destroy(itr_tokenizer *t) {
  if (!t) return;
  itr_spm_destroy(t->spm);
  itr_tok_json_destroy(t->json);
  free(t->pool);
  free(t->off);
  free(t->score);
  free(t->slot);
  free(t);
}

int itr_tokenizer_bos(const itr_tokenizer *t) {
  return !t ? -1 : t->json ? itr_tok_json_bos(t->json) : t->spm ? itr_spm_bos(t->spm) : BOS_ID;
}
int itr_tokenizer_eos(const itr_tokenizer *t) {
  return !t ? -1 : t->json ? itr_tok_json_eos(t->json) : t->spm ? itr_spm_eos(t->spm) : EOS_ID;
}
int itr_tokenizer_vocab_size(const itr_tokenizer *t) { return t->vocab; }
const char *itr_tokenizer_path(const itr_tokenizer *t) { return t->path; }

/* ---- encoding --------------------------------------------------------------------------------- */

/* A candidate merge of the adjacent symbols left and right (positions in the text's symbol list),
 * valid while both still hold the ids they had when it was pushed and are still neighbours. */
typedef struct {
  float score;   /* of the merged token */
  int32_t left, right, id_left, id_right, merged;
} cand;

/* a before b in the heap: higher score first, then the leftmost pair (llama2.c's first on ties) */
static int cand_before(const cand *a, const cand *b) {
  if (a->score != b->score) return a->score > b->score;
  return a->left < b->left;
}

typedef struct {
  cand *c;
  size_t n, cap;
} heap;

static void heap_push(heap *h, cand x) {
  ITR_ASSERT(h->n < h->cap); /* the caller sized the heap for every push (itr_tokenizer_encode) */
  size_t i = h->n++;
  while (i > 0) {
    size_t p = (i - 1) / 2;
    if (!cand_before(&x, &h->c[p])) break;
    h->c[i] = h->c[p];
    i = p;
  }
  h->c[i] = x;
}

static cand heap_pop(heap *h) {
  cand top = h->c[0], x = h->c[--h->n];
  size_t i = 0;
  for (;;) {
    size_t l = 2 * i + 1, r = l + 1, m = i;
    const cand *best = &x;
    if (l < h->n && cand_before(&h->c[l], best)) m = l, best = &h->c[l];
    if (r < h->n && cand_before(&h->c[r], best)) m = r;
    if (m == i) break;
    h->c[i] = h->c[m];
    i = m;
  }
  if (h->n > 0) h->c[i] = x;
  return top;
}

/* The symbol list during merging: ids and neighbours (-1 at either end). */
typedef struct {
  int32_t *id, *prev, *next;
} symbols;

/* Pushes the merge of the symbols a and b (neighbours) when their pieces concatenated are a token. */
static void consider(const itr_tokenizer *t, const symbols *s, int32_t a, int32_t b, char *buf, heap *h) {
  if (a < 0 || b < 0) return;
  const size_t la = piece_len(t, s->id[a]), lb = piece_len(t, s->id[b]);
  memcpy(buf, piece(t, s->id[a]), la);
  memcpy(buf + la, piece(t, s->id[b]), lb);
  const int m = lookup(t, buf, la + lb);
  if (m < 0 || !(t->score[m] > MERGE_FLOOR)) return;
  cand x = {t->score[m], a, b, s->id[a], s->id[b], m};
  heap_push(h, x);
}

/* Appends the symbols of text[0..len) (steps 1-2 of the header), *n of them, to ids. */
static itr_err split_text(const itr_tokenizer *t, const unsigned char *text, size_t len, int32_t *ids, size_t *n) {
  size_t k = *n;
  if (len > 0) {
    const int sp = lookup(t, " ", 1);
    if (sp >= 0) ids[k++] = sp;
    else { /* llama2.c would write -1 here; take the byte fallback of ' ' */
      ITR_CHECK(BYTE_FALLBACK0 + ' ' < t->vocab, ITR_ERR_INPUT,
                "%s: the vocabulary has no \" \" for the dummy prefix and too few tokens (%d) for byte fallback",
                t->path, t->vocab);
      ids[k++] = BYTE_FALLBACK0 + ' ';
    }
  }
  size_t i = 0;
  while (i < len) {
    size_t j = i + 1; /* the piece is text[i..j): one byte, then up to 4 bytes with continuation bytes */
    while (j < len && (text[j] & 0xC0) == 0x80 && j - i < 4) j++;
    const int id = lookup(t, (const char *)text + i, j - i);
    if (id >= 0) {
      ids[k++] = id;
    } else {
      for (size_t q = i; q < j; q++) {
        const int fb = BYTE_FALLBACK0 + text[q];
        ITR_CHECK(fb < t->vocab, ITR_ERR_INPUT,
                  "%s: byte 0x%02X of the text (offset %zu) is no token and its byte fallback <0x%02X> would be token "
                  "%d, but the vocabulary has %d tokens", t->path, text[q], q, text[q], fb, t->vocab);
        ids[k++] = fb;
      }
    }
    i = j;
  }
  *n = k;
  return ITR_OK;
}

itr_err itr_tokenizer_encode(const itr_tokenizer *t, const char *text, size_t len, int add_bos, int add_eos,
                             int32_t **ids, int64_t *n) {
  ITR_CHECK(t && (text || len == 0) && ids && n, ITR_ERR_INTERNAL, "itr_tokenizer_encode: NULL argument");
  if (t->json) { /* add_bos: the special tokens the model adds by default (see include/iteris/io.h) */
    ITR_TRY(itr_tok_json_encode(t->json, text, len, add_bos, add_eos, ids, n));
    return ITR_OK;
  }
  if (t->spm) {
    ITR_TRY(itr_spm_encode(t->spm, text, len, add_bos, add_eos, ids, n));
    return ITR_OK;
  }
  ITR_CHECK(len <= TOK_TEXT_MAX, ITR_ERR_INPUT, "text of %zu bytes is too long to tokenize (at most %zu)", len,
            TOK_TEXT_MAX);
  const size_t cap = len + 3; /* BOS, the dummy prefix, one symbol per byte, EOS */
  symbols s = {NULL, NULL, NULL};
  heap h = {NULL, 0, 0};
  char *buf = NULL;
  itr_err e = itr_calloc(cap, sizeof(int32_t), "token ids", &s.id);
  if (e == ITR_OK) e = itr_calloc(cap, sizeof(int32_t), "token list", &s.prev);
  if (e == ITR_OK) e = itr_calloc(cap, sizeof(int32_t), "token list", &s.next);
  /* pushes: cap - 1 initial pairs, then at most 2 per merge (at most cap - 1 merges) */
  if (e == ITR_OK) e = itr_calloc(3 * cap, sizeof(cand), "merge candidates", &h.c);
  if (e == ITR_OK) e = itr_calloc(2 * (size_t)t->max_len, 1, "merge buffer", &buf);
  h.cap = 3 * cap;
  size_t count = 0;
  if (e == ITR_OK && add_bos) s.id[count++] = BOS_ID; /* as in llama2.c, BOS takes part in the merges */
  if (e == ITR_OK) e = split_text(t, (const unsigned char *)text, len, s.id, &count);
  if (e == ITR_OK) {
    for (size_t i = 0; i < count; i++) {
      s.prev[i] = (int32_t)i - 1;
      s.next[i] = i + 1 < count ? (int32_t)i + 1 : -1;
    }
    for (size_t i = 0; i + 1 < count; i++) consider(t, &s, (int32_t)i, (int32_t)i + 1, buf, &h);
    while (h.n > 0) {
      const cand x = heap_pop(&h);
      if (s.id[x.left] != x.id_left || s.id[x.right] != x.id_right || s.next[x.left] != x.right) continue; /* stale */
      s.id[x.left] = x.merged;
      s.id[x.right] = -1;
      const int32_t after = s.next[x.right];
      s.next[x.left] = after;
      if (after >= 0) s.prev[after] = x.left;
      consider(t, &s, s.prev[x.left], x.left, buf, &h);
      consider(t, &s, x.left, after, buf, &h);
    }
    /* compact the surviving symbols in order (the first symbol is never merged away) */
    size_t k = 0;
    for (int32_t i = count > 0 ? 0 : -1; i >= 0; i = s.next[i]) s.id[k++] = s.id[i];
    if (add_eos) s.id[k++] = EOS_ID;
    count = k;
  }
  free(s.prev);
  free(s.next);
  free(h.c);
  free(buf);
  if (e != ITR_OK) {
    free(s.id);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  *ids = s.id;
  *n = (int64_t)count;
  return ITR_OK;
}
