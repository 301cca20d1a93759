/* iteris-mpi io: safetensors (mmap'd reader, sharded folders, atomic writer), Hugging Face
 * config.json, PEFT LoRA adapters (reader and writer), calibration JSONL (token ids, or text through
 * a Hugging Face tokenizer.json, a SentencePiece tokenizer.model or llama2.c's tokenizer.bin), and the one table of
 * Hugging Face / PEFT tensor names. Every file is treated as hostile: each length is bounded by
 * the bytes left, products are checked for overflow, errors name the file and the field.
 * Not Collective: nothing here calls MPI. Files are written to a temporary name, synced and
 * renamed, so no reader ever sees half a file.
 *
 * safetensors layout (https://github.com/huggingface/safetensors), byte by byte:
 *   bytes [0, 8)        N, unsigned 64-bit little-endian: length of the JSON header
 *   bytes [8, 8+N)      UTF-8 JSON object: { "__metadata__": {str: str, ...} (optional),
 *                         "<name>": {"dtype": "F32"|"F16"|"BF16"|"F64",
 *                                    "shape": [d0, d1, ...],
 *                                    "data_offsets": [begin, end]}, ... }
 *                       padded with spaces; the writer pads so that 8+N is a multiple of 8.
 *   bytes [8+N, size)   the data buffer; a tensor's bytes are [8+N+begin, 8+N+end), row-major,
 *                       little-endian; end-begin == prod(shape) * dtype size; tensors do not
 *                       overlap and together cover the whole buffer (no bytes left over).
 *
 * llama2.c tokenizer.bin (karpathy/llama2.c, tokenizer.py export), byte by byte, little-endian;
 * V, the number of tokens, is not in the file: it must equal config.json's vocab_size:
 *   bytes [0, 4)        max_token_length, int32: the longest piece in bytes (>= 1)
 *   then V times        score, float32 (finite; higher merges first)
 *                       len, int32, 1 <= len <= max_token_length
 *                       len bytes: the piece (UTF-8, no NUL; SentencePiece's U+2581 written as ' ')
 *   nothing after the V-th token. Ids 0, 1, 2 are <unk>, BOS and EOS; ids 3..258 the byte
 *   fallback pieces <0x00>..<0xFF>.
 *
 * SentencePiece tokenizer.model: a protobuf ModelProto (google/sentencepiece,
 * src/sentencepiece_model.proto), read in C by src/io/tokenizer_spm.c (libsentencepiece is C++ only;
 * Debian's python3-sentencepiece is the reference in the tests). Fields used: pieces (piece, score,
 * type NORMAL/UNKNOWN/CONTROL/USER_DEFINED/UNUSED/BYTE), trainer_spec (model_type, byte_fallback,
 * treat_whitespace_as_suffix, unk/bos/eos_piece), normalizer_spec (precompiled_charsmap,
 * add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces). Piece i is token id i.
 */
#ifndef ITERIS_IO_H
#define ITERIS_IO_H

#include <stdint.h>
#include <stdio.h>

#include "iteris/core.h"

#ifdef __cplusplus
extern "C" {
#endif

#define ITR_MAX_DIMS 8
#define ITR_PATH_MAX 4096

/* ---- safetensors: one file ---------------------------------------------------------------- */

typedef struct {
  const char *name; /* owned by the file object */
  const char *file; /* path of the file holding it, for messages */
  itr_dtype dtype;
  int ndim;
  int64_t shape[ITR_MAX_DIMS];
  int64_t numel;
  size_t nbytes;
  const void *data; /* inside the mapping: little-endian, possibly unaligned; touch only what you need */
} itr_tensor_info;

typedef struct itr_safetensors itr_safetensors;

/* Maps and validates a whole file (header, dtypes, offsets, no overlap, no bytes left over,
 * no duplicate names). ITR_ERR_INPUT with the file's path and the offending tensor on failure. */
itr_err itr_safetensors_open(const char *path, itr_safetensors **out);
void itr_safetensors_destroy(itr_safetensors *st); /* accepts NULL */
int itr_safetensors_count(const itr_safetensors *st);
const itr_tensor_info *itr_safetensors_at(const itr_safetensors *st, int i); /* in file order */
const itr_tensor_info *itr_safetensors_find(const itr_safetensors *st, const char *name); /* NULL: absent */
const char *itr_safetensors_metadata(const itr_safetensors *st, const char *key);        /* NULL: absent */
const char *itr_safetensors_path(const itr_safetensors *st);

/* Converts a tensor's elements to f32 / f64 (dst holds numel). Rejects NaN or infinity with an
 * ITR_ERR_INPUT naming the file, the tensor and the first bad element's index. Afterwards the
 * pages of the mapping that held the tensor are released from this process (a later read maps
 * them again), so streaming a large model does not leave it resident. */
itr_err itr_tensor_read_f32(const itr_tensor_info *t, float *dst);
itr_err itr_tensor_read_f64(const itr_tensor_info *t, double *dst);
/* Checks that a tensor has exactly this shape; the message names file and tensor and both shapes.
 * `what` says what the shape was expected from (e.g. "the base model's q_proj"). */
itr_err itr_tensor_check_shape(const itr_tensor_info *t, int ndim, const int64_t *shape, const char *what);

/* ---- safetensors: a model folder (one file, or shards listed by model.safetensors.index.json) */

typedef struct itr_tensor_store itr_tensor_store;

/* Opens DIR/model.safetensors.index.json (weight_map: name -> shard file) or, without an index,
 * DIR/model.safetensors. Shards are mapped lazily, on first access, so a rank touches only the
 * shards holding its tensors. */
itr_err itr_tensor_store_open(const char *dir, itr_tensor_store **out);
void itr_tensor_store_destroy(itr_tensor_store *s); /* accepts NULL */
/* Looks up a tensor; ITR_ERR_INPUT naming the folder when absent. */
itr_err itr_tensor_store_get(itr_tensor_store *s, const char *name, const itr_tensor_info **out);
int itr_tensor_store_has(const itr_tensor_store *s, const char *name);
int itr_tensor_store_count(const itr_tensor_store *s);
const char *itr_tensor_store_name(const itr_tensor_store *s, int i); /* sorted by name */
const char *itr_tensor_store_dir(const itr_tensor_store *s);

/* ---- safetensors: writer -------------------------------------------------------------------- */

typedef struct itr_st_writer itr_st_writer;
itr_err itr_st_writer_create(itr_st_writer **out);
void itr_st_writer_destroy(itr_st_writer *w); /* accepts NULL */
/* Adds a tensor whose data (already in dtype, little-endian) the caller keeps alive until write. */
itr_err itr_st_writer_add(itr_st_writer *w, const char *name, itr_dtype dtype, int ndim,
                          const int64_t *shape, const void *data);
/* Adds a tensor given as f32, converted (and copied) to dtype now. */
itr_err itr_st_writer_add_f32(itr_st_writer *w, const char *name, itr_dtype dtype, int ndim,
                              const int64_t *shape, const float *data);
itr_err itr_st_writer_set_metadata(itr_st_writer *w, const char *key, const char *value);
/* Writes path atomically: path.tmp.<pid>, fsync, rename. Tensors are stored sorted by name. */
itr_err itr_st_writer_write(const itr_st_writer *w, const char *path);

/* ---- the one table of Hugging Face / PEFT names ----------------------------------------------- */

typedef enum {
  ITR_Q_PROJ = 0, ITR_K_PROJ, ITR_V_PROJ, ITR_O_PROJ, ITR_GATE_PROJ, ITR_UP_PROJ, ITR_DOWN_PROJ,
  ITR_MODULE_COUNT
} itr_module;
/* Input sites: modules that read the same input share its Gram. */
typedef enum { ITR_SITE_ATTN_IN = 0, ITR_SITE_ATTN_OUT, ITR_SITE_MLP_IN, ITR_SITE_MLP_OUT, ITR_SITE_COUNT } itr_site;

const char *itr_module_name(itr_module m);  /* "q_proj" */
const char *itr_module_block(itr_module m); /* "self_attn" or "mlp" */
itr_site itr_module_site(itr_module m);
int itr_module_parse(const char *s, itr_module *out); /* "q_proj" -> ITR_Q_PROJ; 0 when unknown */
/* "model.layers.<l>.self_attn.q_proj.weight" (suffix "weight" or "bias") */
void itr_name_base(int layer, itr_module m, const char *suffix, char *buf, size_t len);
/* "base_model.model.model.layers.<l>.self_attn.q_proj.lora_A.weight" (which = 'A' or 'B') */
void itr_name_lora(int layer, itr_module m, char which, char *buf, size_t len);
/* Parses a PEFT LoRA tensor name; returns 0 when it is not one. */
int itr_name_parse_lora(const char *name, int *layer, itr_module *m, char *which);
/* Non-layer names: "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
 * "model.layers.<l>.input_layernorm.weight", "model.layers.<l>.post_attention_layernorm.weight" */
extern const char *const ITR_NAME_EMBED, *const ITR_NAME_FINAL_NORM, *const ITR_NAME_LM_HEAD;
void itr_name_layer_norm(int layer, int post_attention, char *buf, size_t len);

/* ---- Hugging Face config.json --------------------------------------------------------------- */

typedef enum { ITR_ARCH_LLAMA = 0, ITR_ARCH_MISTRAL, ITR_ARCH_QWEN2 } itr_arch;

typedef struct {
  itr_arch arch;
  char model_type[32];         /* "llama", "mistral", "qwen2" */
  int hidden_size;             /* D */
  int intermediate_size;       /* F */
  int num_hidden_layers;       /* L */
  int num_attention_heads;
  int num_key_value_heads;     /* defaults to num_attention_heads */
  int head_dim;                /* defaults to hidden_size / num_attention_heads */
  int vocab_size;
  int max_position_embeddings;
  double rms_norm_eps;
  double rope_theta;           /* default 10000 */
  int tie_word_embeddings;     /* default 0 (llama), as in transformers */
  int attention_bias;          /* q/k/v (and o for llama) carry biases; qwen2: q/k/v always */
  int o_bias;                  /* o_proj has a bias (llama with attention_bias) */
  int mlp_bias;
} itr_model_config;

/* Reads DIR/config.json (or a path to a .json file). Unsupported architectures and values
 * (rope_scaling other than null, hidden_act other than silu, ...) are refused by name. */
itr_err itr_model_config_read(const char *path, itr_model_config *out);
itr_err itr_model_config_write(const char *path, const itr_model_config *cfg);
/* (d_out, d_in) of module m under cfg. */
void itr_module_shape(const itr_model_config *cfg, itr_module m, int64_t *d_out, int64_t *d_in);

/* ---- PEFT LoRA adapters --------------------------------------------------------------------- */

typedef struct {
  int present;                  /* 0: the adapter does not target this module: it contributes zero */
  int r;                        /* r_i after rank_pattern */
  double alpha;                 /* lora_alpha after alpha_pattern */
  double scaling;               /* alpha / r, or alpha / sqrt(r) with use_rslora */
  const itr_tensor_info *A;     /* (r, d_in)  */
  const itr_tensor_info *B;     /* (d_out, r) */
} itr_lora_module;

typedef struct {
  char dir[ITR_PATH_MAX];
  char base_model[512];          /* base_model_name_or_path ("" when absent) */
  int r;                         /* default r */
  double lora_alpha;             /* default lora_alpha */
  int use_rslora;
  int num_layers;                /* L of the base model */
  unsigned target_mask;          /* bit m set when some layer has module m */
  itr_lora_module *modules;      /* [L * ITR_MODULE_COUNT], index layer * ITR_MODULE_COUNT + m */
  itr_safetensors *file;         /* adapter_model.safetensors, mapped */
} itr_adapter;

/* Opens DIR/adapter_config.json and DIR/adapter_model.safetensors and checks them against the
 * base model: shapes, ranks against the config, lora_A without lora_B, NaN/Inf weights, layer
 * indices. Refuses DoRA, LoRA bias, modules_to_save and fan_in_fan_out with the reason. */
itr_err itr_adapter_open(const char *dir, const itr_model_config *base, itr_adapter **out);
void itr_adapter_destroy(itr_adapter *a); /* accepts NULL */
const itr_lora_module *itr_adapter_module(const itr_adapter *a, int layer, itr_module m);

/* ---- MixLoRA adapters (the format of github.com/TUDB-Labs/MixLoRA; src/io/mixlora.c) ------------ */

typedef struct {
  char dir[ITR_PATH_MAX];
  int num_layers, num_experts, top_k;
  int attn_r, expert_r;                   /* ranks: shared attention LoRA, each expert's */
  double attn_scaling, expert_scaling;    /* lora_alpha / r (rsLoRA: / sqrt(r)); experts: expert_lora's */
  unsigned target_mask;                   /* bit m: module m in target_modules */
  /* NULL where absent. Attention: [layer * 7 + m] for q, k, v, o; router: [layer], (E, D); experts:
     [(layer * E + e) * 7 + m] for gate, up, down. A layer without a router has a plain FFN. */
  const itr_tensor_info **attn_A, **attn_B, **router, **exp_A, **exp_B;
  itr_safetensors *file;                  /* adapter_model.safetensors, mapped */
} itr_mixlora;

/* Whether DIR/adapter_config.json says peft_type MIXLORA. */
int itr_adapter_is_mixlora(const char *dir);
/* Reads DIR/adapter_config.json and DIR/adapter_model.safetensors, checks shapes against base and
 * that every value is finite. ITR_ERR_INPUT naming the file and field on failure. */
itr_err itr_mixlora_open(const char *dir, const itr_model_config *base, itr_mixlora **out);
void itr_mixlora_destroy(itr_mixlora *x); /* accepts NULL */
/* Tensor names: attention factor which ('A'/'B') of (layer, m) (expert < 0), or expert's; the router. */
void itr_mixlora_name(int layer, int expert, itr_module m, char which, char *buf, size_t len);
void itr_mixlora_router_name(int layer, char *buf, size_t len);
/* Writes adapter_config.json in the reference's fields: lora_alpha = r and expert_lora's lora_alpha =
 * expert_r (scaling 1: the factors carry their scaling), mixtral routing, silu. Atomic. */
itr_err itr_mixlora_write_config(const char *file, const char *base_model, int num_experts, int top_k, int attn_r,
                                 int expert_r, unsigned target_mask);

/* ---- PEFT LoRA adapters of any architecture ------------------------------------------------ */

/* One module's factors: tensors "base_model.model.<path>.lora_A.weight" / "lora_B.weight". */
typedef struct {
  char *path;                   /* module path, e.g. "encoder.block.0.layer.0.SelfAttention.q" */
  int r;                        /* after rank_pattern */
  double alpha;                 /* after alpha_pattern */
  double scaling;               /* alpha / r, or alpha / sqrt(r) with use_rslora */
  const itr_tensor_info *A;     /* (r, d_in)  */
  const itr_tensor_info *B;     /* (d_out, r) */
} itr_lora_pair;

typedef struct {
  char dir[ITR_PATH_MAX];
  char base_model[512];         /* base_model_name_or_path ("" when absent) */
  char task_type[64];           /* task_type ("" when absent) */
  int n_mod;
  itr_lora_pair *mods;          /* in the file's order */
  itr_safetensors *file;        /* adapter_model.safetensors, mapped */
} itr_lora_file;

/* Opens DIR/adapter_config.json and DIR/adapter_model.safetensors of an adapter of any architecture:
 * the same config checks as itr_adapter_open (DoRA, biases, modules_to_save, patterns, ...), the
 * factors paired by module path, 2-D, ranks agreeing with the config, finite. */
itr_err itr_lora_file_open(const char *dir, itr_lora_file **out);
void itr_lora_file_destroy(itr_lora_file *a); /* accepts NULL */
const itr_lora_pair *itr_lora_file_find(const itr_lora_file *a, const char *path); /* NULL: not targeted */

/* Writes such an adapter: every module padded with zeros to the largest rank (one r, lora_alpha = r:
 * scaling 1, no rank_pattern), target_modules the module paths, in the order added. */
typedef struct itr_lora_writer itr_lora_writer;
itr_err itr_lora_writer_create(const char *base_model, const char *task_type, itr_dtype dtype,
                               itr_lora_writer **out);
void itr_lora_writer_destroy(itr_lora_writer *w); /* accepts NULL */
/* Copies A (r, d_in) and B (d_out, r); r = 0 writes a zero update of rank 1. */
itr_err itr_lora_writer_add_f64(itr_lora_writer *w, const char *path, int64_t d_out, int64_t d_in, int r,
                                const double *A, const double *B);
itr_err itr_lora_writer_write(const itr_lora_writer *w, const char *dir);

/* The merged adapter: per (layer, module) factors A (r, d_in) and B (d_out, r), any r >= 1 per
 * module. Written as PEFT expects, with lora_alpha per module equal to r (scaling 1) through
 * rank_pattern / alpha_pattern when the ranks differ. */
typedef struct itr_adapter_writer itr_adapter_writer;
itr_err itr_adapter_writer_create(const itr_model_config *base, const char *base_model_name,
                                  itr_dtype dtype, itr_adapter_writer **out);
void itr_adapter_writer_destroy(itr_adapter_writer *w);
/* Writes one lora_alpha for every module instead of scaling 1 (then dW = s B A with s = lora_alpha / r,
 * or lora_alpha / sqrt(r) with use_rslora), and lora_dropout, as a trained adapter carries them. */
itr_err itr_adapter_writer_set_scaling(itr_adapter_writer *w, double lora_alpha, int use_rslora,
                                       double lora_dropout);
/* Copies (and converts to the writer's dtype) the factors; dW = B A with scaling 1 (see
 * itr_adapter_writer_set_scaling). */
itr_err itr_adapter_writer_add(itr_adapter_writer *w, int layer, itr_module m, int r,
                               const float *A, const float *B);
/* Same from f64 factors (kept exactly when the writer's dtype is F64). */
itr_err itr_adapter_writer_add_f64(itr_adapter_writer *w, int layer, itr_module m, int r,
                                   const double *A, const double *B);
/* Writes DIR/adapter_config.json and DIR/adapter_model.safetensors (each atomically). */
itr_err itr_adapter_writer_write(const itr_adapter_writer *w, const char *dir);

/* ---- calibration / evaluation data (JSONL) ---------------------------------------------------- */

typedef struct {
  int n_seqs;
  int64_t n_tokens;
  int64_t *offsets; /* (n_seqs + 1): sequence s is ids[offsets[s] .. offsets[s+1]) */
  int32_t *ids;     /* (n_tokens) */
  /* supervision (NULL when no line carries any): */
  int64_t *prompt_len; /* (n_seqs) tokens of the prompt: no loss on predicting them (0: none) */
  int32_t *group;      /* (n_seqs) -1, or the question whose candidate completion this sequence is */
  int32_t *is_label;   /* (n_seqs) 1 when the sequence is a question's labelled completion */
  int n_groups;        /* questions (lines with "choices") */
} itr_token_set;

/* Reads one {"input_ids": [ints]} per line (blank lines skipped); checks 0 <= id < vocab_size
 * and non-empty sequences. Errors name the file and the line. A line may also carry supervision:
 *   "prompt_len": k            the first k tokens are a prompt (0 <= k < length)
 *   "completion_ids": [ints]   appended to input_ids; prompt_len = the length of input_ids
 *   "choices": [[ints], ...], "label": j    a question: one sequence per choice (input_ids + the
 *                              choice, prompt_len = length of input_ids) in one group; choice j is
 *                              the labelled one
 * (with itr_token_set_read_text: "completion": "..." and "choices": ["...", ...] as text, encoded
 * without BOS and appended to the encoded "text"). */
itr_err itr_token_set_read(const char *path, int vocab_size, itr_token_set *out);
void itr_token_set_fini(itr_token_set *ts);
/* Writes ts (atomically) as JSONL that itr_token_set_read reads back to the same set: a line
 * {"input_ids": [...]} per sequence, with "prompt_len" when it has a prompt (a completion's or a
 * prompt_len line's); a question as one line {"input_ids": prompt, "choices": [[...], ...], "label": j}.
 * ITR_ERR_INPUT when ts is malformed (empty sequences, negative ids, a question without a shared prompt
 * or without a labelled choice). Not Collective. */
itr_err itr_token_set_write(const char *path, const itr_token_set *ts);

/* ---- tokenizers (text in) --------------------------------------------------------------------- */

/* A tokenizer: a Hugging Face tokenizer.json (model BPE, encoded exactly as the `tokenizers` crate:
 * added tokens, normalizers Sequence/Prepend/Replace/NFC/NFD/NFKC/NFKD, pre-tokenizers
 * Sequence/Split/ByteLevel/Metaspace, byte_fallback, ignore_merges, TemplateProcessing; see
 * src/io/tokenizer_json.c), a SentencePiece tokenizer.model with libsentencepiece's BPE encoder
 * (src/io/tokenizer_spm.c), or llama2.c's tokenizer.bin (layout at the top of this file) with its
 * encoder (run.c, encode()). */
typedef struct itr_tokenizer itr_tokenizer;

/* Opens a tokenizer: base_dir_or_file is a tokenizer.json, a *.model (SentencePiece) or a
 * tokenizer.bin, or a model folder; a folder uses the first present of tokenizer.json,
 * tokenizer.model, tokenizer.bin, its one tok*.bin. tokenizer.json: tokenizer_config.json beside it
 * is read too (bos_token, eos_token, add_bos_token, add_eos_token); every id must be below vocab_size
 * (config.json's, which may be larger than the tokenizer's vocabulary). tokenizer.model: at most
 * vocab_size pieces, of model_type BPE, with no precompiled_charsmap (the identity normaliser: Llama 2,
 * Mistral, TinyLlama), else ITR_ERR_INPUT naming the file and what is unsupported;
 * tokenizer_config.json's add_bos_token (default true) and add_eos_token (default false) are read.
 * tokenizer.bin: the file must hold exactly vocab_size tokens. Every malformed or unsupported field
 * is ITR_ERR_INPUT naming the file and the field, token or piece index. Not Collective. */
itr_err itr_tokenizer_open(const char *base_dir_or_file, int vocab_size, itr_tokenizer **out);
void itr_tokenizer_destroy(itr_tokenizer *t); /* accepts NULL */
/* path = the tokenizer file itr_tokenizer_open would read in the folder dir, or "" when the folder
 * has none; ITR_ERR_INPUT (naming the file) when it holds an unsupported one, or several tok*.bin. */
itr_err itr_tokenizer_find(const char *dir, char *path, size_t len);
/* Encodes text[0..len). *ids is allocated here (at least *n entries; the caller free()s it), *n the
 * count. Not Collective.
 * tokenizer.json: the ids of Hugging Face's tokenizer.encode(text, add_special_tokens=add_bos):
 * add_bos = 1 adds the special tokens the model adds by default (the post_processor's template,
 * with tokenizer_config.json's add_bos_token / add_eos_token applied: <s> for Llama 2, <|begin_of_text|>
 * for Llama 3, nothing for GPT-2 or Qwen2), 0 none; add_eos = 1 then ends the ids with the EOS token
 * (tokenizer_config.json's eos_token, else the template's last special token) unless they already
 * end with it (ITR_ERR_INPUT when no EOS is named). The text must be valid UTF-8 (ITR_ERR_INPUT
 * naming the byte offset otherwise, as Hugging Face cannot take it either); truncation and padding
 * in the file are not applied.
 * tokenizer.model: exactly as libsentencepiece 0.1.97's EncodeAsIds (malformed UTF-8 bytes become
 * U+FFFD, as there; unknown characters go to byte fallback <0xXX> or, without it, one <unk> per run).
 * add_bos asks for a whole sequence with the model's special tokens: BOS unless
 * tokenizer_config.json says add_bos_token false, and EOS too when it says add_eos_token true;
 * add_eos adds EOS. ITR_ERR_INPUT when BOS / EOS is wanted and the model has no such CONTROL piece,
 * or when the text holds a CONTROL piece's text as a user-defined symbol (sentencepiece fails too).
 * tokenizer.bin: exactly as llama2.c's encode(): [BOS], the dummy prefix " " (when len > 0), UTF-8
 * code points looked up in the vocabulary (bytes of unknown ones -> byte fallback byte + 3), then
 * the best-scoring adjacent merges (the leftmost pair on ties), [EOS]. Any bytes are accepted
 * (invalid UTF-8 goes to byte fallback; a NUL byte is byte fallback <0x00>, where llama2.c would
 * stop). ITR_ERR_INPUT when a byte needs a fallback id >= vocab_size (a vocabulary without byte
 * tokens). */
itr_err itr_tokenizer_encode(const itr_tokenizer *t, const char *text, size_t len, int add_bos, int add_eos,
                             int32_t **ids, int64_t *n);
/* BOS / EOS ids: 1 / 2 for tokenizer.bin; for tokenizer.json tokenizer_config.json's bos_token /
 * eos_token, else the template's first / last special token, else -1; for tokenizer.model its
 * bos_piece's / eos_piece's id, or -1. */
int itr_tokenizer_bos(const itr_tokenizer *t);
int itr_tokenizer_eos(const itr_tokenizer *t);
int itr_tokenizer_vocab_size(const itr_tokenizer *t);
const char *itr_tokenizer_path(const itr_tokenizer *t); /* the file read */

/* Reads a token file like itr_token_set_read, where a line may give {"text": "..."} instead of
 * input_ids: the text is encoded with add_bos = 1 (BOS, or a tokenizer.json's default special
 * tokens), no EOS, by *tok; a text that gives no tokens at all is ITR_ERR_INPUT naming the line. A line with both keys uses input_ids.
 * The tokenizer is opened lazily: when *tok is NULL and a line has text, *tok = the tokenizer of the
 * folder tokenizer_dir (the base model's; kept for the next file; the caller destroys it). With
 * tokenizer_dir NULL, or a folder without a tokenizer, a text line is ITR_ERR_INPUT naming the file
 * and the line. Not Collective. */
itr_err itr_token_set_read_text(const char *path, int vocab_size, const char *tokenizer_dir, itr_tokenizer **tok,
                                itr_token_set *out);

/* ---- files ------------------------------------------------------------------------------------ */

/* Writes len bytes to path atomically: path.tmp.<pid>, fsync, rename. Not Collective. */
itr_err itr_iofile_write_atomic(const char *path, const void *data, size_t len);
/* mkdir -p (mode 0755); ITR_ERR_INPUT naming the folder on failure. */
itr_err itr_iofile_mkdirs(const char *dir);
/* 1 when path names an existing directory. */
int itr_iofile_is_dir(const char *path);
/* Removes a folder and everything under it (no symlinks followed); a missing folder is fine. */
itr_err itr_iofile_remove_tree(const char *dir);
/* Makes the finished folder partial the folder out: an existing out is moved aside
 * (out.old.<pid>), partial renamed to out, the old one removed. */
itr_err itr_iofile_commit_dir(const char *partial, const char *out);
/* buf = the folder that holds path ("." for a bare name, "/" for "/x"). */
void itr_iofile_parent(const char *path, char *buf, size_t len);
/* FNV-1a 64 (itr_hash64_bytes) of a file's size and contents, continued from *h; with
 * safetensors_header, of its 8-byte length and JSON header only (not the tensor data). *h is left
 * as it was when the file cannot be read (a missing file is reported where it is opened). */
void itr_iofile_digest(const char *path, int safetensors_header, uint64_t *h);
/* The same over a model folder: config.json, the shard index and every *.safetensors header
 * (names, shapes, offsets), combined independently of the order the folder lists them in. */
void itr_iofile_digest_model(const char *dir, uint64_t *h);

/* ---- HDF5 files (checkpoints, statistics) ------------------------------------------------------ */

/* A small HDF5 file of named f64 datasets ("a/b/c": groups created as needed) and string / number
 * attributes on the root. Not Collective: one process writes (serial HDF5 through the MPI-enabled
 * library). A created file lives at path.tmp.<pid> until itr_h5_close(h, 1) flushes, closes and
 * renames it to path, so a reader never sees half a checkpoint. */
typedef struct itr_h5 itr_h5;
itr_err itr_h5_create(const char *path, itr_h5 **out);
itr_err itr_h5_open(const char *path, itr_h5 **out); /* read-only */
/* commit = 1: publish a created file under its final name; 0: discard it (created) or just close. */
itr_err itr_h5_close(itr_h5 *h, int commit);
itr_err itr_h5_write_f64(itr_h5 *h, const char *name, int ndim, const int64_t *dims, const double *data);
/* Reads a dataset whose shape must equal dims (ndim dims); the message names file and dataset. */
itr_err itr_h5_read_f64(itr_h5 *h, const char *name, int ndim, const int64_t *dims, double *data);
/* Shape of a dataset (ndim <= ITR_MAX_DIMS); ITR_ERR_INPUT when absent. */
itr_err itr_h5_shape(itr_h5 *h, const char *name, int *ndim, int64_t *dims);
/* Rows [row0, row0 + nrows) of the 2-D dataset name (ncols columns) as f64 (a hyperslab). */
itr_err itr_h5_read_rows_f64(itr_h5 *h, const char *name, int64_t row0, int64_t nrows, int64_t ncols,
                             double *data);
int itr_h5_has(itr_h5 *h, const char *name);
itr_err itr_h5_set_attr(itr_h5 *h, const char *key, const char *value);
itr_err itr_h5_get_attr(itr_h5 *h, const char *key, char *buf, size_t len);

/* ---- inspect ---------------------------------------------------------------------------------- */

/* Prints a readable summary of a model folder (config, tensors, shapes, dtypes) or an adapter
 * folder (target modules, ranks and scaling per module) to f. */
itr_err itr_inspect_dir(const char *dir, FILE *f);

#ifdef __cplusplus
}
#endif
#endif
