/* iteris-mpi model: the rank-local forward pass of a Llama-family decoder (Llama 2/3, Mistral,
 * Qwen2) with Hugging Face semantics, LoRA terms applied in factored form, and activation capture.
 * Not Collective anywhere: nothing here calls MPI. A process owns layers [layer_begin, layer_end)
 * (and optionally the embedding and the head); the dist layer moves hidden states between ranks.
 *
 * Computation (float32, OpenBLAS sgemm), per layer l, on a block of T tokens made of sequences
 * packed back to back (itr_seq_layout; attention never crosses a sequence; no padding):
 *   x  = rmsnorm(h) * w_in          rmsnorm(x) = x / sqrt(mean(x^2) + eps)
 *   site ATTN_IN  (T, D)       -> q = x Wq^T + bq, k = x Wk^T + bk, v = x Wv^T + bv
 *   rotary (rotate-half), position = index inside its sequence (from 0), inv_freq_i = theta^(-2i/hd)
 *   a  = softmax(q k^T / sqrt(hd) + causal mask) v, per head, kv head = head / (heads / kv_heads)
 *   site ATTN_OUT (T, H*hd)    -> h += a Wo^T (+ bo)
 *   x  = rmsnorm(h) * w_post
 *   site MLP_IN   (T, D)       -> m = silu(x Wg^T) * (x Wu^T)
 *   site MLP_OUT  (T, F)       -> h += m Wd^T
 * Every projection y = x W^T (+ b) also gets, for each LoRA term of its (layer, module),
 * scaling * (x A^T) B^T, and, when given, scale * x dW^T (see itr_lora_set).
 * Logits: rmsnorm(h) * w_final, then (T, V) = that lm_head^T (lm_head = embed_tokens when tied).
 * Mistral's sliding_window is not applied (exact for sequences not longer than the window). */
#ifndef ITERIS_MODEL_H
#define ITERIS_MODEL_H

#include <stdint.h>

#include "iteris/core.h"
#include "iteris/io.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- the architecture descriptor (arch.c) -------------------------------------------------------
 * What the layers above need to know of a model's layout, in one place: its target modules (their
 * names, shapes, biases and the input site each reads), the input sites (width, the modules that
 * share each one's captured rows), the number of layers and whether the embedding is tied. Built
 * from config.json (itr_model_config) and io's one name table; the pipeline, its checkpoints and
 * stats.h5 take their layout from it, so no count of modules or sites is written anywhere else. */

#define ITR_ARCH_MAX_MODULES 16
#define ITR_ARCH_MAX_SITES 8

typedef struct {
  itr_module id;      /* in io's name table (tensor names, PEFT target names) */
  const char *name;   /* "q_proj" */
  const char *block;  /* "self_attn" or "mlp" */
  int site;           /* index into itr_arch_desc.site */
  int64_t d_out, d_in;
  int has_bias;
} itr_arch_module;

typedef struct {
  itr_site id;
  const char *name;   /* "attn_in", "attn_out", "mlp_in", "mlp_out" */
  int64_t d_in;       /* width of the captured rows */
  int n_modules;
  int modules[ITR_ARCH_MAX_MODULES]; /* indices into itr_arch_desc.module, in module order */
} itr_arch_site;

typedef struct {
  int n_layers;                                 /* L */
  int64_t hidden_size, vocab_size;              /* D, V */
  int tied_embeddings;                          /* lm_head = embed_tokens */
  int n_modules;                                /* modules per layer (index q: a slot is l * n_modules + q) */
  itr_arch_module module[ITR_ARCH_MAX_MODULES]; /* in the name table's order */
  int n_sites;
  itr_arch_site site[ITR_ARCH_MAX_SITES];
} itr_arch_desc;

/* Fills arch from a validated configuration. Not Collective. */
itr_err itr_arch_desc_init(const itr_model_config *cfg, itr_arch_desc *arch);
/* The index of module id / site id in arch (-1: not there). */
int itr_arch_desc_module(const itr_arch_desc *arch, itr_module id);
int itr_arch_desc_site(const itr_arch_desc *arch, itr_site id);

/* ---- LoRA terms: what is added to the base projections --------------------------------------- */

typedef struct {
  int r;         /* rank of this term */
  float scaling; /* the term adds scaling * B A */
  float *A;      /* (r, d_in) f32, owned by the set */
  float *B;      /* (d_out, r) f32, owned by the set */
} itr_lora_term;

typedef struct {
  int n_terms, cap;
  itr_lora_term *terms;
  const float *dW; /* (d_out, d_in) f32 dense update or NULL; added as dW_scale * x dW^T */
  float dW_scale;
  float *dW_owned; /* == dW when the set owns it, else NULL */
} itr_lora_slot;

/* Per (layer, module) lists of terms. Any number of adapters (each with its own rank and scaling)
 * are summed; a module with no term contributes nothing. The merged factorised update is one more
 * term with scaling 1; with_pretrain's dense update is the slot's dW. */
/* A MixLoRA feed-forward (Li et al. 2024; the reference github.com/TUDB-Labs/MixLoRA): E experts, each
 * a LoRA term on gate, up and down (rank 0: none); a router (E, D) on the FFN input x (after the
 * post-attention norm). Per token, p = softmax(router x); the top_k experts by p (ties: the lower
 * index), w_e = p_e / sum of the chosen p; the block adds sum_e w_e y_e to the residual, where
 * y_e = down_e(silu(gate_e(x)) * up_e(x)) and module_e = the base projection + expert e's term. */
typedef struct {
  int E, top_k;
  float *router;          /* (E, D) f32 */
  itr_lora_term *experts; /* (3 E): expert e's gate [3e], up [3e + 1], down [3e + 2] */
} itr_lora_moe;

typedef struct {
  itr_model_config cfg;  /* copied at creation; shapes are checked against it */
  int num_layers;        /* L */
  itr_lora_slot *slots;  /* [L * ITR_MODULE_COUNT], index layer * ITR_MODULE_COUNT + m */
  itr_lora_moe *moe;     /* NULL, or [L]: layer l's MixLoRA feed-forward when moe[l].E > 0 (its gate, up
                            and down slots must then be empty) */
} itr_lora_set;

/* An empty set for a model of this configuration. Not Collective. */
itr_err itr_lora_set_create(const itr_model_config *cfg, itr_lora_set **out);
void itr_lora_set_destroy(itr_lora_set *s); /* accepts NULL */
/* Adds a term scaling * B A to (layer, m); copies A (r, d_in) f32 and B (d_out, r) f32. */
itr_err itr_lora_set_add(itr_lora_set *s, int layer, itr_module m, int r, float scaling,
                         const float *A, const float *B);
/* Sets the dense update of (layer, m): scale * dW, dW (d_out, d_in) f32. copy = 1: the set keeps a
 * copy; copy = 0: the caller keeps dW alive and unchanged while the set is used. Replaces an
 * earlier dense update of the slot. */
itr_err itr_lora_set_set_dense(itr_lora_set *s, int layer, itr_module m, const float *dW,
                               float scale, int copy);
/* Adds every module of adapter a in layers [layer_begin, layer_end) as a term with scaling
 * weight * a's scaling, converting A and B to f32 (only those layers are read). Not Collective. */
itr_err itr_lora_set_add_adapter(itr_lora_set *s, const itr_adapter *a, int layer_begin,
                                 int layer_end, double weight);
/* Makes layer's feed-forward a MixLoRA one: E experts (no terms yet), top_k, router (E, D) copied. */
itr_err itr_lora_set_set_moe(itr_lora_set *s, int layer, int E, int top_k, const float *router);
/* Sets expert e's term on m (gate, up or down) of layer: copies A (r, d_in), B (d_out, r). */
itr_err itr_lora_set_set_expert(itr_lora_set *s, int layer, int e, itr_module m, int r, float scaling,
                                const float *A, const float *B);
/* Adds a MixLoRA adapter: its attention LoRA as terms (scaling weight * its scaling) and, in every layer
 * with a router, the experts and router as that layer's MixLoRA feed-forward. Not Collective. */
itr_err itr_lora_set_add_mixlora(itr_lora_set *s, const itr_mixlora *x, double weight);
/* Adds the adapter in dir, PEFT LoRA or MixLoRA (by adapter_config.json's peft_type), every layer. */
itr_err itr_lora_set_add_dir(itr_lora_set *s, const char *dir, double weight);
/* Removes the terms and dense updates of the modules whose bit is set in mask, in every layer. */
void itr_lora_set_clear_modules(itr_lora_set *s, unsigned mask);
/* Removes every term and dense update (keeps the allocation of the slot table). */
void itr_lora_set_clear(itr_lora_set *s);
/* A set with the same terms (layer, module, rank, scaling) as s, every factor zero, no dense
 * updates, and the same MixLoRA layers (E, top_k, expert ranks) with zero routers and experts: the
 * shape of a gradient or an optimizer moment. Not Collective. */
itr_err itr_lora_set_create_like(const itr_lora_set *s, itr_lora_set **out);
/* Number of floats in all factors of s (sum over terms of r (d_in + d_out)), routers (E D) and
 * experts included. */
size_t itr_lora_set_n_params(const itr_lora_set *s);
/* Copies every factor to flat (n_params) / from flat, in the order layer, module, term, A, B; then
 * each MixLoRA layer in order: its router, then expert e's gate, up, down (A, B) for e = 0, 1, ...
 * (terms of rank 0 skipped). itr_lora_set_zero zeroes the same floats. */
void itr_lora_set_pack(const itr_lora_set *s, float *flat);
void itr_lora_set_unpack(itr_lora_set *s, const float *flat);
/* Sets every factor to zero. */
void itr_lora_set_zero(itr_lora_set *s);
/* The parameter groups of a set, for freezing some in training (-train_only): plain LoRA terms (a MixLoRA
 * layer's attention), MixLoRA routers, MixLoRA experts. */
enum { ITR_LORA_GROUP_ATTENTION = 1, ITR_LORA_GROUP_ROUTERS = 2, ITR_LORA_GROUP_EXPERTS = 4 };
/* group (n_params): each float's ITR_LORA_GROUP_*, in itr_lora_set_pack's order. Not Collective. */
void itr_lora_set_groups(const itr_lora_set *s, unsigned char *group);
const itr_lora_slot *itr_lora_set_slot(const itr_lora_set *s, int layer, itr_module m);

/* ---- the model --------------------------------------------------------------------------------- */

typedef struct itr_model itr_model;

/* Sequence boundaries inside a block of T tokens: sequence s is rows [offsets[s], offsets[s+1]),
 * offsets[0] = 0, strictly increasing, offsets[n_seqs] = T. Positions restart at 0 for each. */
typedef struct {
  int n_seqs;
  const int64_t *offsets; /* (n_seqs + 1) */
} itr_seq_layout;

/* Called with the input of every target module before it is applied, once per input site (q/k/v
 * share ATTN_IN, gate/up share MLP_IN). rows (T, d_in) f32 is valid only during the call:
 * d_in = D for ATTN_IN and MLP_IN, heads * head_dim for ATTN_OUT, F for MLP_OUT. Returning an
 * error stops the forward pass, which returns that error. */
typedef itr_err (*itr_capture_fn)(int layer, itr_site site, const float *rows, int64_t T,
                                  int64_t d_in, void *ctx);

/* A model owning layers [layer_begin, layer_end) (0 <= begin <= end <= L), the embedding when
 * with_embed, the final norm and lm_head when with_head; every weight zero. Fill it through the
 * accessors below (tests) or use itr_model_load. Not Collective. */
itr_err itr_model_create(const itr_model_config *cfg, int layer_begin, int layer_end,
                         int with_embed, int with_head, itr_model **out);
/* Every layer, the embedding and the head, but without the weight matrix of the modules whose bit is
 * set in no_weight (bit m: itr_module m; itr_model_weight gives NULL for them; biases and norms are
 * kept). The weight gradient of LoRA training from scratch, where those projections are frozen and
 * trained through their LoRA factors. Not Collective. */
itr_err itr_model_create_except(const itr_model_config *cfg, unsigned no_weight, itr_model **out);
/* Same as itr_model_create, then reads the owned weights (bf16/f16/f32) from store, converted to f32; checks every
 * shape against cfg and names the tensor on error. Not Collective. */
itr_err itr_model_load(const itr_model_config *cfg, itr_tensor_store *store, int layer_begin,
                       int layer_end, int with_embed, int with_head, itr_model **out);
/* The number of floats the parameters of such a model take (one block). Not Collective. */
itr_err itr_model_param_floats(const itr_model_config *cfg, int layer_begin, int layer_end, int with_embed,
                               int with_head, size_t *n);
/* itr_model_create over the caller's memory mem of n floats (at least itr_model_param_floats'): not
 * zeroed, not freed by itr_model_destroy; it must outlive the model. Not Collective. */
itr_err itr_model_create_in(const itr_model_config *cfg, int layer_begin, int layer_end, int with_embed, int with_head,
                            float *mem, size_t n, itr_model **out);
/* itr_model_load into the caller's memory (itr_model_create_in): every parameter is overwritten, so a
 * caller that streams layers of one shape reuses one block and its pages. Not Collective. */
itr_err itr_model_load_into(const itr_model_config *cfg, itr_tensor_store *store, int layer_begin, int layer_end,
                            int with_embed, int with_head, float *mem, size_t n, itr_model **out);
void itr_model_destroy(itr_model *m); /* accepts NULL */

const itr_model_config *itr_model_config_of(const itr_model *m);
void itr_model_layers(const itr_model *m, int *layer_begin, int *layer_end);

/* Weight accessors (f32, writable). NULL when the model does not own it or it does not exist. */
float *itr_model_weight(itr_model *m, int layer, itr_module mod); /* (d_out, d_in) */
float *itr_model_bias(itr_model *m, int layer, itr_module mod);   /* (d_out); NULL: no bias */
float *itr_model_norm(itr_model *m, int layer, int post_attention); /* (D) */
float *itr_model_embed_weight(itr_model *m);                      /* (V, D) */
float *itr_model_final_norm(itr_model *m);                        /* (D) */
/* (V, D); when tie_word_embeddings and with_embed this is the embedding itself. */
float *itr_model_lm_head(itr_model *m);
/* 1 when lm_head is the embedding (tied and with_embed). */
int itr_model_head_is_embed(const itr_model *m);

/* hidden (T, D) f32 = rows of the embedding for ids (T); each id in [0, V). Needs with_embed. */
itr_err itr_model_embed(const itr_model *m, const int32_t *ids, int64_t T, float *hidden);
/* Called once per layer and module with ||y||_F^2 (float64 sum of the float32 entries) of the
 * module's product y = x (W0 + LoRA)^T (T, d_out) on the block, before its bias, rotary
 * embedding or residual add: the denominator of IterIS's adaptive weight when the LoRA set is
 * base + adapter i. */
typedef void (*itr_output_norm_fn)(int layer, itr_module m, double sumsq, void *ctx);

/* Runs layers [a, b) (owned) on hidden (T, D) f32 in place. seqs NULL: one sequence of T tokens.
 * lora NULL: base model. sink NULL: nothing captured. */
itr_err itr_model_run_layers(const itr_model *m, int a, int b, float *hidden, int64_t T,
                             const itr_seq_layout *seqs, const itr_lora_set *lora,
                             itr_capture_fn sink, void *ctx);
/* The same, with out_norm (may be NULL) called for every module of every layer run. */
itr_err itr_model_run_layers_ex(const itr_model *m, int a, int b, float *hidden, int64_t T,
                                const itr_seq_layout *seqs, const itr_lora_set *lora,
                                itr_capture_fn sink, itr_output_norm_fn out_norm, void *ctx);
/* logits (T, V) f32 = final norm of hidden (T, D) (not modified) times lm_head^T. Needs with_head. */
itr_err itr_model_logits(const itr_model *m, const float *hidden, int64_t T, float *logits);
/* Whole forward (needs every layer, embedding and head): logits (T, V) f32 for ids (T). */
itr_err itr_model_forward(const itr_model *m, const int32_t *ids, int64_t T,
                          const itr_seq_layout *seqs, const itr_lora_set *lora,
                          itr_capture_fn sink, void *ctx, float *logits);

/* ---- training: the loss and its gradient with respect to the LoRA factors (backward.c) ------- */

/* LoRA dropout with PEFT's semantics: each LoRA term's input is x * keep / (1 - p), keep ~
 * Bernoulli(1 - p), a separate mask per (layer, module); the base product sees x unchanged. The
 * mask of an entry is a hash of (seed, step, layer, module, the sequence's global index, the
 * position in it, the column), so it does not depend on how sequences are spread over ranks. */
typedef struct {
  double p;               /* dropout probability in [0, 1); 0: none */
  uint64_t seed, step;
  const int64_t *seq_ids; /* (n_seqs) global index of each sequence of the block; NULL: 0, 1, ... */
} itr_lora_dropout;

/* MixLoRA's auxiliary load-balancing loss (the reference's 'mixtral' router loss, TUDB-Labs/MixLoRA
 * mlora/mix_lora.py _mixtral_load_balancing_loss_func, as Hugging Face's Mixtral): over the N routed
 * (layer, token) pairs of a batch (the router logits of every MixLoRA layer concatenated, every token),
 *   aux = E sum_e f_e P_e,  f_e = c_e / N (c_e: pairs with e among their top_k),  P_e = mean of p_e,
 * p = softmax(router logits). f is piecewise constant (no gradient): c comes from a counting pass over
 * the whole batch (itr_model_moe_counts, summed over ranks), so a training call adds
 * weight E / N^2 sum_e c_e S_e (S_e: the sum of p_e over its own pairs) to the loss sum and its gradient,
 * and the sum of these over the batch's calls is weight * aux, whatever the ranks and micro-batches. */
typedef struct {
  double weight;        /* coefficient times what the caller divides the loss sum by (its target count) */
  int E;                /* experts of every MixLoRA layer */
  const double *counts; /* (E) c_e over the batch */
  double n_routed;      /* N > 0 */
  double *aux_part;     /* out, +=: E / N^2 sum_e c_e S_e of this call (without weight) */
} itr_moe_aux;

/* The routing counts of a block: counts (E) += the number of (layer, token) pairs of the MixLoRA layers
 * of lora whose top_k holds e; *n_routed += their number. Every MixLoRA layer must have E experts.
 * Needs every layer and the embedding. Not Collective. */
itr_err itr_model_moe_counts(const itr_model *m, const int32_t *ids, int64_t T, const itr_seq_layout *seqs,
                             const itr_lora_set *lora, int E, double *counts, double *n_routed);

/* Next-token cross-entropy of a block and its gradient with respect to every LoRA factor of lora.
 * ids (T) are the inputs; labels (T) the target of each position (the next token id), or a
 * negative value where no loss is taken (the last token of a sequence, a prompt). *loss_sum gets
 * sum over targeted positions of -log softmax(logits_t)[labels_t] (float64), *n_targets their
 * count. grad must have the same terms as lora (itr_lora_set_create_like); the gradient of
 * *loss_sum is ADDED to its factors (term k of a slot to term k). Base weights, norms, biases and
 * dense updates are frozen. drop NULL: no dropout. Needs every layer, the embedding and the head.
 * Activations of the whole block are kept during the call: about T (4D + 2(qd + kvd) + 3F) floats
 * per layer, plus the logits of 256 positions at a time. Not Collective. */
itr_err itr_model_loss_grad(const itr_model *m, const int32_t *ids, const int32_t *labels, int64_t T,
                            const itr_seq_layout *seqs, const itr_lora_set *lora,
                            const itr_lora_dropout *drop, itr_lora_set *grad, double *loss_sum,
                            int64_t *n_targets);

/* The same, also (gm not NULL) with the gradient of *loss_sum with respect to every weight of the
 * model ADDED to gm's weights: a model of the same configuration with every layer, the embedding
 * and the head (itr_model_create; a tied model's embedding gets both uses). grad may be NULL (no
 * LoRA gradient) and lora NULL (the base model alone). Full-rank training.
 * teacher (T, V) f32 logits or NULL: distillation. Then the loss at a position with labels[t] >= 0
 * is KL(q_t || p_t), q_t = softmax(teacher row t), p_t the model's next-token distribution (the
 * label's value is not used).
 * MixLoRA (lora->moe): the gradient of every router and expert factor too (grad from
 * itr_lora_set_create_like). The chosen experts are piecewise constant: the gradient is that of the
 * loss with the selection of this point held fixed (ties: the lower index, as the forward); through the
 * renormalised weights w = softmax of the chosen logits, dz_i = w_i (dw_i - sum_j w_j dw_j) for chosen i.
 * Experts see no dropout (drop applies to the attention terms); gm must be NULL. aux (NULL: none) adds
 * the load-balancing loss (itr_moe_aux) to *loss_sum and its gradient. Not Collective. */
itr_err itr_model_loss_grad_full(const itr_model *m, const int32_t *ids, const int32_t *labels, int64_t T,
                                 const itr_seq_layout *seqs, const itr_lora_set *lora,
                                 const itr_lora_dropout *drop, const float *teacher, const itr_moe_aux *aux,
                                 itr_lora_set *grad, itr_model *gm, double *loss_sum, int64_t *n_targets);
/* Every parameter the model owns as one array (the one allocation: layers in order, then the
 * embedding, the final norm and a separate head), and its length. Not Collective. */
float *itr_model_params(itr_model *m, size_t *n);

/* For the CLI (`-logits FILE.jsonl -logits_out OUT.safetensors`): loads the model in base_dir and
 * the adapters (summed, each with its own scaling), runs every line of tokens_jsonl
 * ({"input_ids": [...]}) as its own sequence and writes F32 tensors logits.0, logits.1, ...
 * (seq_len, V) to out_safetensors (atomically). Not Collective (run it on one rank). */
itr_err itr_model_write_logits(const char *base_dir, const char *const *adapter_dirs, int n_adapters,
                               const char *tokens_jsonl, const char *out_safetensors);

#ifdef __cplusplus
}
#endif
#endif
