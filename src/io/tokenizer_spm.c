/* SentencePiece tokenizer.model: a hostile-input reader of its protobuf (ModelProto, schema in
 * google/sentencepiece src/sentencepiece_model.proto) and the BPE encoder of libsentencepiece
 * v0.1.97 (Debian 12's; src/normalizer.cc Normalize, src/bpe_model.cc SampleEncode,
 * src/sentencepiece_processor.cc PopulateSentencePieceText), written in C because the program is
 * C11 and libsentencepiece is C++ only. tests/ref/ checks it against python3-sentencepiece.
 *
 * Protobuf wire format read here: a message is a run of fields, each a varint key (field << 3 |
 * wire type) then: wire type 0 a varint (<= 10 bytes), 1 eight bytes, 2 a varint length and that
 * many bytes, 5 four bytes (little-endian float). Groups (3, 4) and 6, 7 are refused. Fields read:
 *   ModelProto      1 pieces (repeated message), 2 trainer_spec, 3 normalizer_spec
 *   SentencePiece   1 piece (string), 2 score (float), 3 type (1 NORMAL, 2 UNKNOWN, 3 CONTROL,
 *                   4 USER_DEFINED, 5 UNUSED, 6 BYTE; default NORMAL)
 *   TrainerSpec     3 model_type (1 UNIGRAM default, 2 BPE, 3 WORD, 4 CHAR), 24
 *                   treat_whitespace_as_suffix, 35 byte_fallback, 46 / 47 bos / eos_piece (<unk> is
 *                   the one UNKNOWN piece, as in sentencepiece)
 *   NormalizerSpec  1 name, 2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces,
 *                   5 escape_whitespaces (the three default to true)
 * Other fields are skipped by wire type; a known field with the wrong wire type, a value out of its
 * enum, or any length past the bytes left is ITR_ERR_INPUT naming the file, the field and the piece.
 * Later occurrences of a scalar win and repeated sub-messages merge, as in protobuf.
 *
 * Encoding (EncodeAsIds):
 *   1. normalise (identity: a non-empty precompiled_charsmap is refused): a malformed UTF-8 byte
 *      becomes U+FFFD; with remove_extra_whitespaces leading, trailing and repeated ' ' go;
 *      add_dummy_prefix puts one ' ' first (last with treat_whitespace_as_suffix); with
 *      escape_whitespaces every ' ' becomes U+2581; USER_DEFINED pieces are copied as they are;
 *   2. cut into symbols: the longest USER_DEFINED piece at that point (never merged), else one
 *      UTF-8 character;
 *   3. repeatedly merge the adjacent pair whose concatenation is a NORMAL, USER_DEFINED or UNUSED
 *      piece of the highest score, the leftmost on ties (a heap; stale entries skipped);
 *   4. UNUSED results are split back into the two symbols that made them; a symbol that is no piece
 *      is <unk>: with byte_fallback its bytes become <0xXX>, without it a run of them is one <unk>;
 *   5. BOS / EOS: the pieces named by trainer_spec's bos_piece / eos_piece (CONTROL pieces). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "io/iofile.h"
#include "io/tok_spm.h"
#include "iteris/io.h"

#define SPM_FILE_CAP ((size_t)1 << 30) /* largest tokenizer.model accepted (Llama 2's is 0.5 MB) */
#define SPM_TEXT_MAX ((size_t)1 << 28) /* longest text one call encodes, in bytes (x3 after escaping) */
#define SPM_NAME_MAX 256               /* longest bos_piece etc. and normaliser name kept */

enum { T_NORMAL = 1, T_UNKNOWN = 2, T_CONTROL = 3, T_USER = 4, T_UNUSED = 5, T_BYTE = 6 };
enum { M_UNIGRAM = 1, M_BPE = 2, M_WORD = 3, M_CHAR = 4 };

static const char *const type_name[] = {"?", "NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED", "BYTE"};

struct itr_spm {
  char path[ITR_PATH_MAX];
  int vocab;          /* config.json's vocab_size: every id is below it */
  int n;              /* pieces in the file (<= vocab) */
  int cap;            /* allocated pieces */
  char *pool;         /* the pieces' bytes, back to back */
  size_t pool_len, pool_cap;
  int64_t *off;       /* (cap + 1): piece i is pool[off[i] .. off[i+1]) */
  float *score;       /* (cap) */
  unsigned char *type; /* (cap) T_* */
  int32_t *slot_norm; /* (n_slot) hash of the NORMAL / USER_DEFINED / UNUSED pieces: id or -1 */
  int32_t *slot_res;  /* (n_slot) hash of the UNKNOWN / CONTROL / BYTE pieces: id or -1 */
  size_t n_slot;
  /* user-defined pieces as a byte trie: (node << 8 | byte) -> child in an open-addressing table */
  uint64_t *trie_key; /* (trie_slots) key + 1, 0 = empty */
  int32_t *trie_child;
  int32_t *trie_len;  /* (n_nodes) the piece ending at this node: its length, or 0 */
  size_t trie_slots;
  int32_t n_nodes;
  int has_user, has_unused;
  int32_t unk, bos, eos; /* ids; bos / eos -1 when the model has none */
  int32_t byte_id[256];  /* <0xXX> ids when byte_fallback */
  /* trainer_spec and normalizer_spec */
  int model_type, byte_fallback, ws_suffix;
  int add_dummy_prefix, remove_extra_ws, escape_ws;
  size_t charsmap_len;
  char norm_name[SPM_NAME_MAX], bos_piece[SPM_NAME_MAX], eos_piece[SPM_NAME_MAX];
  /* tokenizer_config.json beside the model */
  int add_bos_token, add_eos_token;
};

/* ---- protobuf wire format --------------------------------------------------------------------- */

typedef struct {
  const unsigned char *buf; /* the whole file (offsets in messages are from its start) */
  size_t pos, end;          /* this message is buf[pos .. end) */
} reader;

typedef struct {
  uint32_t num; /* field number */
  int wt;       /* wire type */
  uint64_t v;   /* wire type 0: the varint; 1, 5: the raw bits */
  size_t at;    /* offset of the key */
  size_t start, len; /* wire type 2: the bytes buf[start .. start + len) */
} field;

static int get_varint(reader *r, uint64_t *v) {
  uint64_t x = 0;
  for (int s = 0; s < 70; s += 7) {
    if (r->pos >= r->end) return 0;
    const unsigned char c = r->buf[r->pos++];
    if (s == 63 && c > 1) return 0; /* more than 64 bits */
    x |= (uint64_t)(c & 0x7F) << s;
    if (!(c & 0x80)) {
      *v = x;
      return 1;
    }
  }
  return 0;
}

/* Reads the next field of r (the caller checks r->pos < r->end). where names the message. */
static itr_err next_field(const itr_spm *m, reader *r, const char *where, field *f) {
  const char *p = m->path;
  f->at = r->pos;
  uint64_t key = 0;
  ITR_CHECK(get_varint(r, &key), ITR_ERR_INPUT,
            "%s: %s: the field key at byte %zu is truncated or longer than 10 bytes. Is this a SentencePiece "
            "tokenizer.model?", p, where, f->at);
  f->num = (uint32_t)(key >> 3);
  f->wt = (int)(key & 7);
  ITR_CHECK(key >> 3 >= 1 && key >> 3 <= 536870911u, ITR_ERR_INPUT,
            "%s: %s: field number %llu at byte %zu is out of protobuf's range 1..2^29-1. Is this a SentencePiece "
            "tokenizer.model?", p, where, (unsigned long long)(key >> 3), f->at);
  const size_t left = r->end - r->pos;
  switch (f->wt) {
  case 0:
    ITR_CHECK(get_varint(r, &f->v), ITR_ERR_INPUT, "%s: %s: field %u: the varint at byte %zu is truncated", p,
              where, f->num, f->at);
    break;
  case 1:
  case 5: {
    const size_t k = f->wt == 1 ? 8 : 4;
    ITR_CHECK(left >= k, ITR_ERR_INPUT, "%s: %s: field %u at byte %zu needs %zu bytes but %zu are left", p, where,
              f->num, f->at, k, left);
    f->v = 0;
    for (size_t i = 0; i < k; i++) f->v |= (uint64_t)r->buf[r->pos + i] << (8 * i);
    r->pos += k;
    break;
  }
  case 2: {
    uint64_t len = 0;
    ITR_CHECK(get_varint(r, &len), ITR_ERR_INPUT, "%s: %s: field %u: the length at byte %zu is truncated", p,
              where, f->num, f->at);
    ITR_CHECK(len <= r->end - r->pos, ITR_ERR_INPUT,
              "%s: %s: field %u at byte %zu has length %llu but %zu byte(s) are left", p, where, f->num, f->at,
              (unsigned long long)len, r->end - r->pos);
    f->start = r->pos;
    f->len = (size_t)len;
    r->pos += (size_t)len;
    break;
  }
  default:
    return itr_error_set(ITR_ERR_INPUT,
                         "%s: %s: field %u at byte %zu has wire type %d, which is not one of 0, 1, 2, 5 (groups are "
                         "not used by sentencepiece_model.proto). Is this a SentencePiece tokenizer.model?",
                         p, where, f->num, f->at, f->wt);
  }
  return ITR_OK;
}

static itr_err want_wt(const itr_spm *m, const char *where, const field *f, const char *name, int wt) {
  ITR_CHECK(f->wt == wt, ITR_ERR_INPUT, "%s: %s: field %u (%s) at byte %zu has wire type %d; it must be %d", m->path,
            where, f->num, name, f->at, f->wt, wt);
  return ITR_OK;
}

static itr_err get_enum(const itr_spm *m, const char *where, const field *f, const char *name, int lo, int hi,
                        int *out) {
  ITR_TRY(want_wt(m, where, f, name, 0));
  ITR_CHECK(f->v >= (uint64_t)lo && f->v <= (uint64_t)hi, ITR_ERR_INPUT,
            "%s: %s: %s is %lld; it must be in %d..%d", m->path, where, name, (long long)f->v, lo, hi);
  *out = (int)f->v;
  return ITR_OK;
}

static itr_err get_bool(const itr_spm *m, const char *where, const field *f, const char *name, int *out) {
  ITR_TRY(want_wt(m, where, f, name, 0));
  *out = f->v != 0;
  return ITR_OK;
}

static itr_err get_string(const itr_spm *m, const reader *r, const char *where, const field *f, const char *name,
                          char *out) {
  ITR_TRY(want_wt(m, where, f, name, 2));
  ITR_CHECK(f->len < SPM_NAME_MAX, ITR_ERR_INPUT, "%s: %s: %s is %zu bytes long; at most %d are accepted", m->path,
            where, name, f->len, SPM_NAME_MAX - 1);
  ITR_CHECK(memchr(r->buf + f->start, '\0', f->len) == NULL, ITR_ERR_INPUT, "%s: %s: %s holds a NUL byte", m->path,
            where, name);
  memcpy(out, r->buf + f->start, f->len);
  out[f->len] = '\0';
  return ITR_OK;
}

/* ---- reading the model ------------------------------------------------------------------------ */

static size_t piece_len(const itr_spm *m, int id) { return (size_t)(m->off[id + 1] - m->off[id]); }
static const char *piece(const itr_spm *m, int id) { return m->pool + m->off[id]; }
static int is_norm(int type) { return type == T_NORMAL || type == T_USER || type == T_UNUSED; }

static itr_err grow_pieces(itr_spm *m) {
  const int cap = m->cap ? 2 * m->cap : 1024;
  ITR_CHECK(m->cap < (1 << 29), ITR_ERR_INPUT, "%s: too many pieces", m->path);
  int64_t *off = realloc(m->off, ((size_t)cap + 1) * sizeof *off);
  if (off) m->off = off;
  float *score = realloc(m->score, (size_t)cap * sizeof *score);
  if (score) m->score = score;
  unsigned char *type = realloc(m->type, (size_t)cap);
  if (type) m->type = type;
  ITR_CHECK(off && score && type, ITR_ERR_INTERNAL, "out of memory for %d tokenizer pieces", cap);
  if (m->cap == 0) m->off[0] = 0;
  m->cap = cap;
  return ITR_OK;
}

/* Appends the SentencePiece message buf[start .. start + len) as piece m->n. */
static itr_err read_piece(itr_spm *m, const unsigned char *buf, size_t start, size_t len) {
  const int i = m->n;
  char where[64];
  snprintf(where, sizeof where, "piece %d", i);
  if (i == m->cap) ITR_TRY(grow_pieces(m));
  reader r = {buf, start, start + len};
  size_t p_start = 0, p_len = 0;
  int has_piece = 0, type = T_NORMAL;
  float score = 0.0f;
  while (r.pos < r.end) {
    field f;
    ITR_TRY(next_field(m, &r, where, &f));
    if (f.num == 1) {
      ITR_TRY(want_wt(m, where, &f, "piece", 2));
      p_start = f.start, p_len = f.len, has_piece = 1;
    } else if (f.num == 2) {
      ITR_TRY(want_wt(m, where, &f, "score", 5));
      const uint32_t u = (uint32_t)f.v;
      memcpy(&score, &u, sizeof score);
    } else if (f.num == 3) {
      ITR_TRY(get_enum(m, where, &f, "type", T_NORMAL, T_BYTE, &type));
    }
  }
  ITR_CHECK(has_piece && p_len > 0, ITR_ERR_INPUT, "%s: piece %d is empty (SentencePiece refuses empty pieces)",
            m->path, i);
  ITR_CHECK(isfinite(score), ITR_ERR_INPUT, "%s: piece %d has score %g; scores must be finite", m->path, i,
            (double)score);
  if (m->pool_len + p_len + 1 > m->pool_cap) {
    size_t cap = m->pool_cap ? m->pool_cap : 4096;
    while (cap < m->pool_len + p_len + 1) cap *= 2;
    char *pool = realloc(m->pool, cap);
    ITR_CHECK(pool, ITR_ERR_INTERNAL, "out of memory for %zu bytes of tokenizer pieces", cap);
    m->pool = pool;
    m->pool_cap = cap;
  }
  memcpy(m->pool + m->pool_len, buf + p_start, p_len);
  m->pool_len += p_len;
  m->score[i] = score;
  m->type[i] = (unsigned char)type;
  m->off[i + 1] = (int64_t)m->pool_len;
  m->n = i + 1;
  return ITR_OK;
}

static itr_err read_trainer(itr_spm *m, const unsigned char *buf, size_t start, size_t len) {
  const char *w = "trainer_spec";
  reader r = {buf, start, start + len};
  while (r.pos < r.end) {
    field f;
    ITR_TRY(next_field(m, &r, w, &f));
    switch (f.num) {
    case 3: ITR_TRY(get_enum(m, w, &f, "model_type", M_UNIGRAM, M_CHAR, &m->model_type)); break;
    case 24: ITR_TRY(get_bool(m, w, &f, "treat_whitespace_as_suffix", &m->ws_suffix)); break;
    case 35: ITR_TRY(get_bool(m, w, &f, "byte_fallback", &m->byte_fallback)); break;
    case 46: ITR_TRY(get_string(m, &r, w, &f, "bos_piece", m->bos_piece)); break;
    case 47: ITR_TRY(get_string(m, &r, w, &f, "eos_piece", m->eos_piece)); break;
    default: break; /* unk_id, bos_id, ...: sentencepiece finds the tokens by type and piece, not by id */
    }
  }
  return ITR_OK;
}

static itr_err read_normalizer(itr_spm *m, const unsigned char *buf, size_t start, size_t len) {
  const char *w = "normalizer_spec";
  reader r = {buf, start, start + len};
  while (r.pos < r.end) {
    field f;
    ITR_TRY(next_field(m, &r, w, &f));
    switch (f.num) {
    case 1: ITR_TRY(get_string(m, &r, w, &f, "name", m->norm_name)); break;
    case 2:
      ITR_TRY(want_wt(m, w, &f, "precompiled_charsmap", 2));
      m->charsmap_len = f.len;
      break;
    case 3: ITR_TRY(get_bool(m, w, &f, "add_dummy_prefix", &m->add_dummy_prefix)); break;
    case 4: ITR_TRY(get_bool(m, w, &f, "remove_extra_whitespaces", &m->remove_extra_ws)); break;
    case 5: ITR_TRY(get_bool(m, w, &f, "escape_whitespaces", &m->escape_ws)); break;
    default: break;
    }
  }
  return ITR_OK;
}

/* ---- lookups ---------------------------------------------------------------------------------- */

static size_t hash_slot(const itr_spm *m, const char *s, size_t n) {
  return (size_t)itr_hash64_bytes(itr_hash64(NULL), s, n) & (m->n_slot - 1);
}

static int lookup_in(const itr_spm *m, const int32_t *slot, const char *s, size_t n) {
  for (size_t h = hash_slot(m, s, n);; h = (h + 1) & (m->n_slot - 1)) {
    const int id = slot[h];
    if (id < 0) return -1;
    if (piece_len(m, id) == n && memcmp(piece(m, id), s, n) == 0) return id;
  }
}

/* sentencepiece's PieceToId: the reserved pieces first, then the others, else <unk> */
static int piece_to_id(const itr_spm *m, const char *s, size_t n) {
  int id = lookup_in(m, m->slot_res, s, n);
  if (id < 0) id = lookup_in(m, m->slot_norm, s, n);
  return id < 0 ? m->unk : id;
}

/* The slot of the trie edge key (node << 8 | byte): where it is, or the empty slot it would take. */
static void trie_find(const itr_spm *m, uint64_t key, size_t *slot) {
  size_t h = (size_t)((key + 1) * 0x9E3779B97F4A7C15ull >> 20) & (m->trie_slots - 1);
  while (m->trie_key[h] && m->trie_key[h] != key + 1) h = (h + 1) & (m->trie_slots - 1);
  *slot = h;
}

static int32_t trie_child(const itr_spm *m, int32_t node, unsigned char c) {
  size_t h;
  const uint64_t key = (uint64_t)node << 8 | c;
  trie_find(m, key, &h);
  return m->trie_key[h] ? m->trie_child[h] : -1;
}

/* Length of the longest USER_DEFINED piece that starts s[0..n), 0 when none (PrefixMatcher). */
static size_t user_prefix(const itr_spm *m, const unsigned char *s, size_t n) {
  if (!m->has_user) return 0;
  size_t best = 0;
  int32_t node = 0;
  for (size_t i = 0; i < n; i++) {
    node = trie_child(m, node, s[i]);
    if (node < 0) break;
    if (m->trie_len[node]) best = i + 1;
  }
  return best;
}

static itr_err build_index(itr_spm *m) {
  const char *p = m->path;
  size_t n = 16;
  while (n < 2 * (size_t)m->n) n *= 2;
  m->n_slot = n;
  ITR_TRY(itr_calloc(n, sizeof(int32_t), "tokenizer index", &m->slot_norm));
  ITR_TRY(itr_calloc(n, sizeof(int32_t), "tokenizer index", &m->slot_res));
  for (size_t h = 0; h < n; h++) m->slot_norm[h] = m->slot_res[h] = -1;
  size_t user_bytes = 0;
  m->unk = -1;
  for (int id = 0; id < m->n; id++) {
    const int t = m->type[id];
    int32_t *slot = is_norm(t) ? m->slot_norm : m->slot_res;
    const int dup = lookup_in(m, slot, piece(m, id), piece_len(m, id));
    ITR_CHECK(dup < 0, ITR_ERR_INPUT, "%s: piece %d '%.*s' (%s) repeats piece %d; SentencePiece refuses a model with "
              "a piece defined twice", p, id, (int)(piece_len(m, id) < 64 ? piece_len(m, id) : 64), piece(m, id),
              type_name[t], dup);
    size_t h = hash_slot(m, piece(m, id), piece_len(m, id));
    while (slot[h] >= 0) h = (h + 1) & (n - 1);
    slot[h] = id;
    if (t == T_UNKNOWN) {
      ITR_CHECK(m->unk < 0, ITR_ERR_INPUT, "%s: pieces %d and %d are both of type UNKNOWN; there must be one", p,
                m->unk, id);
      m->unk = id;
    }
    if (t == T_USER) {
      ITR_CHECK(memchr(piece(m, id), '\0', piece_len(m, id)) == NULL, ITR_ERR_INPUT,
                "%s: piece %d is USER_DEFINED and holds a NUL byte", p, id);
      m->has_user = 1;
      user_bytes += piece_len(m, id);
    }
    if (t == T_UNUSED) m->has_unused = 1;
    if (t == T_BYTE) {
      ITR_CHECK(m->byte_fallback, ITR_ERR_INPUT,
                "%s: piece %d is of type BYTE but trainer_spec.byte_fallback is false", p, id);
      unsigned b = 0;
      char tail = 0, canon[8];
      const int ok = piece_len(m, id) == 6 && sscanf(piece(m, id), "<0x%2X%c", &b, &tail) == 2 && tail == '>';
      if (ok) snprintf(canon, sizeof canon, "<0x%02X>", b);
      ITR_CHECK(ok && memcmp(canon, piece(m, id), 6) == 0, ITR_ERR_INPUT,
                "%s: piece %d is of type BYTE but is '%.*s', not <0xXX> (two upper-case hex digits)", p, id,
                (int)(piece_len(m, id) < 16 ? piece_len(m, id) : 16), piece(m, id));
    }
  }
  ITR_CHECK(m->unk >= 0, ITR_ERR_INPUT, "%s: no piece has type UNKNOWN (<unk>); SentencePiece needs one", p);
  if (m->byte_fallback)
    for (int b = 0; b < 256; b++) {
      char name[8];
      snprintf(name, sizeof name, "<0x%02X>", b);
      const int id = lookup_in(m, m->slot_res, name, 6);
      ITR_CHECK(id >= 0 && m->type[id] == T_BYTE, ITR_ERR_INPUT,
                "%s: trainer_spec.byte_fallback is true but there is no BYTE piece %s (all 256 are needed)", p, name);
      m->byte_id[b] = id;
    }
  /* BOS / EOS: bos_id() of sentencepiece: PieceToId(bos_piece) when that is a CONTROL piece; an
   * empty bos_piece / eos_piece means the default, as in model_interface.cc */
  if (!m->bos_piece[0]) snprintf(m->bos_piece, sizeof m->bos_piece, "<s>");
  if (!m->eos_piece[0]) snprintf(m->eos_piece, sizeof m->eos_piece, "</s>");
  const int bos = piece_to_id(m, m->bos_piece, strlen(m->bos_piece));
  const int eos = piece_to_id(m, m->eos_piece, strlen(m->eos_piece));
  m->bos = m->type[bos] == T_CONTROL ? bos : -1;
  m->eos = m->type[eos] == T_CONTROL ? eos : -1;
  if (m->has_user) { /* the trie: one node per byte of each piece at most */
    ITR_CHECK(user_bytes < (size_t)1 << 28, ITR_ERR_INPUT, "%s: the USER_DEFINED pieces are too long", p);
    size_t slots = 16;
    while (slots < 2 * user_bytes) slots *= 2;
    m->trie_slots = slots;
    ITR_TRY(itr_calloc(slots, sizeof(uint64_t), "tokenizer trie", &m->trie_key));
    ITR_TRY(itr_calloc(slots, sizeof(int32_t), "tokenizer trie", &m->trie_child));
    ITR_TRY(itr_calloc(user_bytes + 1, sizeof(int32_t), "tokenizer trie", &m->trie_len));
    m->n_nodes = 1;
    for (int id = 0; id < m->n; id++) {
      if (m->type[id] != T_USER) continue;
      int32_t node = 0;
      const unsigned char *s = (const unsigned char *)piece(m, id);
      for (size_t i = 0; i < piece_len(m, id); i++) {
        size_t h;
        const uint64_t key = (uint64_t)node << 8 | s[i];
        trie_find(m, key, &h);
        if (!m->trie_key[h]) {
          m->trie_key[h] = key + 1;
          m->trie_child[h] = m->n_nodes++;
        }
        node = m->trie_child[h];
      }
      m->trie_len[node] = (int32_t)piece_len(m, id);
    }
  }
  return ITR_OK;
}

/* tokenizer_config.json beside the model: add_bos_token / add_eos_token (booleans) when present. */
static itr_err read_tokenizer_config(itr_spm *m) {
  char cfg[ITR_PATH_MAX + 32];
  cJSON *root = NULL;
  ITR_TRY(itr_json_read_beside(m->path, "tokenizer_config.json", cfg, sizeof cfg, &root));
  if (!root) return ITR_OK;
  itr_err e = itr_json_bool(root, "add_bos_token", cfg, m->add_bos_token, &m->add_bos_token);
  if (e == ITR_OK) e = itr_json_bool(root, "add_eos_token", cfg, m->add_eos_token, &m->add_eos_token);
  cJSON_Delete(root);
  return e;
}

static itr_err parse(itr_spm *m, const unsigned char *buf, size_t size) {
  const char *p = m->path;
  reader r = {buf, 0, size};
  while (r.pos < r.end) {
    field f;
    ITR_TRY(next_field(m, &r, "ModelProto", &f));
    if (f.num == 1) {
      ITR_TRY(want_wt(m, "ModelProto", &f, "pieces", 2));
      ITR_TRY(read_piece(m, buf, f.start, f.len));
    } else if (f.num == 2) {
      ITR_TRY(want_wt(m, "ModelProto", &f, "trainer_spec", 2));
      ITR_TRY(read_trainer(m, buf, f.start, f.len));
    } else if (f.num == 3) {
      ITR_TRY(want_wt(m, "ModelProto", &f, "normalizer_spec", 2));
      ITR_TRY(read_normalizer(m, buf, f.start, f.len));
    }
  }
  ITR_CHECK(m->n > 0, ITR_ERR_INPUT, "%s holds no pieces (%zu bytes). Is this a SentencePiece tokenizer.model?", p,
            size);
  ITR_CHECK(m->n <= m->vocab, ITR_ERR_INPUT,
            "%s holds %d pieces but the model's vocab_size (config.json) is %d: ids up to %d would be out of range. "
            "Is this the tokenizer of another model?", p, m->n, m->vocab, m->n - 1);
  static const char *const model_name[] = {"?", "UNIGRAM", "BPE", "WORD", "CHAR"};
  ITR_CHECK(m->model_type == M_BPE, ITR_ERR_INPUT,
            "%s: trainer_spec.model_type is %s; only BPE models (Llama 2, Mistral, TinyLlama) are supported yet", p,
            model_name[m->model_type]);
  ITR_CHECK(m->charsmap_len == 0, ITR_ERR_INPUT,
            "%s: normalizer_spec '%s' has a precompiled_charsmap of %zu bytes (NFKC-style normalisation), which is "
            "not supported yet; only the identity normaliser (Llama 2, Mistral, TinyLlama) is",
            p, m->norm_name, m->charsmap_len);
  ITR_TRY(build_index(m));
  return ITR_OK;
}

itr_err itr_spm_open(const char *path, int vocab_size, itr_spm **out) {
  itr_spm *m = NULL;
  ITR_TRY(itr_calloc(1, sizeof *m, "tokenizer", &m));
  snprintf(m->path, sizeof m->path, "%s", path);
  m->vocab = vocab_size;
  m->model_type = M_UNIGRAM; /* the proto's defaults */
  m->add_dummy_prefix = m->remove_extra_ws = m->escape_ws = 1;
  snprintf(m->bos_piece, sizeof m->bos_piece, "<s>");
  snprintf(m->eos_piece, sizeof m->eos_piece, "</s>");
  m->add_bos_token = 1;
  m->add_eos_token = 0;
  char *buf = NULL;
  size_t size = 0;
  itr_err e = itr_iofile_read(path, SPM_FILE_CAP, &buf, &size);
  if (e == ITR_OK) e = parse(m, (const unsigned char *)buf, size);
  free(buf);
  if (e == ITR_OK) e = read_tokenizer_config(m);
  if (e != ITR_OK) {
    itr_spm_destroy(m);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  *out = m;
  return ITR_OK;
}

void itr_spm_destroy(itr_spm *m) {
  if (!m) return;
  free(m->pool);
  free(m->off);
  free(m->score);
  free(m->type);
  free(m->slot_norm);
  free(m->slot_res);
  free(m->trie_key);
  free(m->trie_child);
  free(m->trie_len);
  free(m);
}

int itr_spm_bos(const itr_spm *m) { return m->bos; }
int itr_spm_eos(const itr_spm *m) { return m->eos; }
int itr_spm_n_pieces(const itr_spm *m) { return m->n; }

/* ---- normalisation ---------------------------------------------------------------------------- */

/* Bytes of the valid UTF-8 character at s[0..n), or 0 when malformed (string_util::DecodeUTF8:
 * no overlong forms, no surrogates, nothing above U+10FFFF). */
static size_t utf8_len(const unsigned char *s, size_t n) {
  const unsigned c = s[0];
  if (c < 0x80) return 1;
  if (n >= 2 && (c & 0xE0) == 0xC0) {
    const uint32_t cp = (c & 0x1Fu) << 6 | (s[1] & 0x3Fu);
    return (s[1] & 0xC0) == 0x80 && cp >= 0x80 ? 2 : 0;
  }
  if (n >= 3 && (c & 0xF0) == 0xE0) {
    const uint32_t cp = (c & 0x0Fu) << 12 | (s[1] & 0x3Fu) << 6 | (s[2] & 0x3Fu);
    return (s[1] & 0xC0) == 0x80 && (s[2] & 0xC0) == 0x80 && cp >= 0x800 && (cp < 0xD800 || cp >= 0xE000) ? 3 : 0;
  }
  if (n >= 4 && (c & 0xF8) == 0xF0) {
    const uint32_t cp = (c & 0x07u) << 18 | (s[1] & 0x3Fu) << 12 | (s[2] & 0x3Fu) << 6 | (s[3] & 0x3Fu);
    return (s[1] & 0xC0) == 0x80 && (s[2] & 0xC0) == 0x80 && (s[3] & 0xC0) == 0x80 && cp >= 0x10000 &&
                   cp <= 0x10FFFF
               ? 4
               : 0;
  }
  return 0;
}

static const char kSpace[] = "\xe2\x96\x81"; /* U+2581, sentencepiece's escaped ' ' */
static const char kReplacement[] = "\xef\xbf\xbd"; /* U+FFFD */

/* NormalizePrefix with no charsmap: the text at s[0..n) gives *out[0..*out_len) and consumes *used. */
static void norm_prefix(const itr_spm *m, const unsigned char *s, size_t n, const char **out, size_t *out_len,
                        size_t *used) {
  size_t k = user_prefix(m, s, n);
  if (k > 0) {
    *out = (const char *)s, *out_len = k, *used = k;
    return;
  }
  k = utf8_len(s, n);
  if (k == 0) *out = kReplacement, *out_len = 3, *used = 1;
  else *out = (const char *)s, *out_len = k, *used = k;
}

/* Normalizer::Normalize: text[0..len) into norm (room for 3 len + 3 bytes); *nlen its length. */
static void normalize(const itr_spm *m, const unsigned char *text, size_t len, char *norm, size_t *nlen) {
  size_t pos = 0, k = 0;
  *nlen = 0;
  if (len == 0) return;
  const char *sp;
  size_t sl, used;
  if (m->remove_extra_ws)
    while (pos < len) {
      norm_prefix(m, text + pos, len - pos, &sp, &sl, &used);
      if (!(sl == 1 && sp[0] == ' ')) break;
      pos += used;
    }
  if (pos == len) return;
  const char *ws = m->escape_ws ? kSpace : " ";
  const size_t wl = m->escape_ws ? 3 : 1;
  if (!m->ws_suffix && m->add_dummy_prefix) memcpy(norm + k, ws, wl), k += wl;
  int prev_space = m->remove_extra_ws;
  while (pos < len) {
    norm_prefix(m, text + pos, len - pos, &sp, &sl, &used);
    while (prev_space && sl > 0 && sp[0] == ' ') sp++, sl--;
    if (sl > 0) {
      for (size_t i = 0; i < sl; i++) {
        if (m->escape_ws && sp[i] == ' ') memcpy(norm + k, kSpace, 3), k += 3;
        else norm[k++] = sp[i];
      }
      prev_space = sp[sl - 1] == ' ';
    }
    pos += used;
    if (!m->remove_extra_ws) prev_space = 0;
  }
  if (m->remove_extra_ws)
    while (k >= wl && memcmp(norm + k - wl, ws, wl) == 0) k -= wl;
  if (m->ws_suffix && m->add_dummy_prefix) memcpy(norm + k, ws, wl), k += wl;
  *nlen = k;
}

/* ---- BPE -------------------------------------------------------------------------------------- */

/* A candidate merge of the symbols left and right (indices), valid while both are non-empty and
 * their lengths still add up to len (bpe_model.cc's test). */
typedef struct {
  float score;
  int32_t left, right;
  int64_t len;
  int32_t merged;
} cand;

/* a before b: higher score first, then the leftmost pair (SymbolPairComparator) */
static int cand_before(const cand *a, const cand *b) {
  if (a->score != b->score) return a->score > b->score;
  return a->left < b->left;
}

typedef struct {
  cand *c;
  size_t n, cap;
} heap;

static void heap_push(heap *h, cand x) {
  ITR_ASSERT(h->n < h->cap);
  size_t i = h->n++;
  while (i > 0) {
    const size_t p = (i - 1) / 2;
    if (!cand_before(&x, &h->c[p])) break;
    h->c[i] = h->c[p];
    i = p;
  }
  h->c[i] = x;
}

static cand heap_pop(heap *h) {
  const cand top = h->c[0], x = h->c[--h->n];
  size_t i = 0;
  for (;;) {
    const size_t l = 2 * i + 1, r = l + 1;
    size_t b = i;
    const cand *best = &x;
    if (l < h->n && cand_before(&h->c[l], best)) b = l, best = &h->c[l];
    if (r < h->n && cand_before(&h->c[r], best)) b = r;
    if (b == i) break;
    h->c[i] = h->c[b];
    i = b;
  }
  if (h->n > 0) h->c[i] = x;
  return top;
}

typedef struct {
  const char *norm;
  int64_t *start, *len; /* symbol i is norm[start[i] .. start[i] + len[i]); len 0 once merged away */
  int32_t *prev, *next;
  unsigned char *freeze;
  int32_t *rev_split; /* (n pieces) for UNUSED pieces: the length of the left part of the last pair
                         that made it, or -1 (bpe_model.cc's rev_merge) */
} symbols;

static void consider(const itr_spm *m, symbols *s, int32_t a, int32_t b, heap *h) {
  if (a < 0 || b < 0 || s->freeze[a] || s->freeze[b]) return;
  const int64_t len = s->len[a] + s->len[b];
  const int id = lookup_in(m, m->slot_norm, s->norm + s->start[a], (size_t)len);
  if (id < 0) return;
  const cand x = {m->score[id], a, b, len, id};
  heap_push(h, x);
  if (m->type[id] == T_UNUSED) s->rev_split[id] = (int32_t)s->len[a];
}

itr_err itr_spm_encode(const itr_spm *m, const char *text, size_t len, int add_bos, int add_eos, int32_t **ids,
                       int64_t *n) {
  ITR_CHECK(m && (text || len == 0) && ids && n, ITR_ERR_INTERNAL, "itr_spm_encode: NULL argument");
  ITR_CHECK(len <= SPM_TEXT_MAX, ITR_ERR_INPUT, "text of %zu bytes is too long to tokenize (at most %zu)", len,
            SPM_TEXT_MAX);
  /* the model's special tokens: add_bos means "a whole sequence", as Hugging Face's add_special_tokens */
  const int want_bos = add_bos && m->add_bos_token, want_eos = add_eos || (add_bos && m->add_eos_token);
  ITR_CHECK(!want_bos || m->bos >= 0, ITR_ERR_INPUT,
            "%s: BOS is wanted but bos_piece '%s' is not a CONTROL piece of the model (set add_bos_token false in "
            "tokenizer_config.json if the model takes no BOS)", m->path, m->bos_piece);
  ITR_CHECK(!want_eos || m->eos >= 0, ITR_ERR_INPUT, "%s: EOS is wanted but eos_piece '%s' is not a CONTROL piece",
            m->path, m->eos_piece);
  const size_t cap = 3 * len + 3; /* normalised bytes (every byte at most 3), one symbol per byte at most */
  char *norm = NULL;
  symbols s = {0};
  heap h = {NULL, 0, 0};
  int32_t *out = NULL;
  size_t nlen = 0, count = 0, k = 0;
  itr_err e = itr_calloc(cap, 1, "normalised text", &norm);
  if (e == ITR_OK) {
    normalize(m, (const unsigned char *)text, len, norm, &nlen);
    s.norm = norm;
  }
  const size_t ns = nlen + 1;
  if (e == ITR_OK) e = itr_calloc(ns, sizeof(int64_t), "token list", &s.start);
  if (e == ITR_OK) e = itr_calloc(ns, sizeof(int64_t), "token list", &s.len);
  if (e == ITR_OK) e = itr_calloc(ns, sizeof(int32_t), "token list", &s.prev);
  if (e == ITR_OK) e = itr_calloc(ns, sizeof(int32_t), "token list", &s.next);
  if (e == ITR_OK) e = itr_calloc(ns, 1, "token list", &s.freeze);
  if (e == ITR_OK) e = itr_calloc(3 * ns, sizeof(cand), "merge candidates", &h.c);
  if (e == ITR_OK && m->has_unused) e = itr_calloc((size_t)m->n, sizeof(int32_t), "merge history", &s.rev_split);
  /* ids: at most one per normalised byte (byte fallback), BOS, EOS */
  if (e == ITR_OK) e = itr_calloc(nlen + 2, sizeof(int32_t), "token ids", &out);
  if (e != ITR_OK) goto done;
  h.cap = 3 * ns;
  if (s.rev_split)
    for (int i = 0; i < m->n; i++) s.rev_split[i] = -1;
  /* symbols: user-defined pieces whole and frozen, else one character (OneCharLen, clipped) */
  for (size_t pos = 0; pos < nlen;) {
    size_t l = user_prefix(m, (const unsigned char *)norm + pos, nlen - pos);
    s.freeze[count] = l > 0;
    if (l == 0) {
      static const unsigned char one_char_len[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
      l = one_char_len[(unsigned char)norm[pos] >> 4];
      if (l > nlen - pos) l = nlen - pos;
    }
    s.start[count] = (int64_t)pos;
    s.len[count] = (int64_t)l;
    s.prev[count] = (int32_t)count - 1;
    pos += l;
    s.next[count] = pos < nlen ? (int32_t)count + 1 : -1;
    count++;
  }
  for (size_t i = 1; i < count; i++) consider(m, &s, (int32_t)i - 1, (int32_t)i, &h);
  while (h.n > 0) {
    const cand x = heap_pop(&h);
    if (s.len[x.left] == 0 || s.len[x.right] == 0 || s.len[x.left] + s.len[x.right] != x.len) continue; /* stale */
    s.len[x.left] += s.len[x.right];
    s.next[x.left] = s.next[x.right];
    if (s.next[x.right] >= 0) s.prev[s.next[x.right]] = x.left;
    s.len[x.right] = 0;
    consider(m, &s, s.prev[x.left], x.left, &h);
    consider(m, &s, x.left, s.next[x.left], &h);
  }
  if (want_bos) out[k++] = m->bos;
  int prev_unk = 0;
  for (int32_t i = count > 0 ? 0 : -1; i >= 0; i = s.next[i]) {
    /* resegment: an UNUSED piece goes back to the two parts that made it, depth first; the
     * stack holds (start, len) of the parts still to emit, 64 on the C stack, more on the heap */
    int64_t st_start[64], st_len[64];
    int64_t *ss = st_start, *sl = st_len, *heap_ss = NULL;
    size_t depth = 0, depth_cap = 64;
    ss[depth] = s.start[i], sl[depth] = s.len[i], depth++;
    while (depth > 0 && e == ITR_OK) {
      depth--;
      const int64_t ws = ss[depth], wl = sl[depth];
      const char *w = norm + ws;
      int id = piece_to_id(m, w, (size_t)wl);
      if (m->type[id] == T_UNUSED && s.rev_split && s.rev_split[id] > 0 && s.rev_split[id] < wl) {
        if (depth + 2 > depth_cap) { /* a deep split: move to the heap */
          size_t nc = 2 * depth_cap;
          int64_t *q = malloc(2 * nc * sizeof *q);
          if (!q) {
            e = itr_error_set(ITR_ERR_INTERNAL, "out of memory while resegmenting");
            break;
          }
          memcpy(q, ss, depth * sizeof *q);
          memcpy(q + nc, sl, depth * sizeof *q);
          free(heap_ss);
          heap_ss = q, ss = q, sl = q + nc, depth_cap = nc;
        }
        const int64_t left = s.rev_split[id];
        ss[depth] = ws + left, sl[depth] = wl - left, depth++; /* right part popped second */
        ss[depth] = ws, sl[depth] = left, depth++;
        continue;
      }
      const int is_unk = m->type[id] == T_UNKNOWN;
      if (m->type[id] == T_CONTROL) {
        e = itr_error_set(ITR_ERR_INPUT,
                          "%s: the text holds '%.*s', which is the CONTROL piece %d; sentencepiece cannot encode "
                          "it either", m->path, (int)(wl < 32 ? wl : 32), w, id);
        break;
      }
      if (is_unk && m->byte_fallback) {
        for (int64_t b = 0; b < wl; b++) out[k++] = m->byte_id[(unsigned char)w[b]];
      } else if (!(is_unk && prev_unk)) { /* a run of unknown pieces is one <unk> */
        out[k++] = id;
      }
      prev_unk = is_unk;
    }
    free(heap_ss);
    if (e != ITR_OK) goto done;
  }
  if (want_eos) out[k++] = m->eos;
done:
  free(norm);
  free(s.start);
  free(s.len);
  free(s.prev);
  free(s.next);
  free(s.freeze);
  free(s.rev_split);
  free(h.c);
  if (e != ITR_OK) {
    free(out);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  *ids = out;
  *n = (int64_t)k;
  return ITR_OK;
}
