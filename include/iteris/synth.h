/* iteris-mpi synth: deterministic generators of test cases — a random Llama-family model
 * (config.json + safetensors, optionally sharded), PEFT LoRA adapters with noticeable updates
 * (random, or aimed at one task's inputs), JSONL token files, and the bundled demo case.
 * Everything is a pure function of the seed: the random numbers come from xoshiro256** seeded
 * by splitmix64 and normals from Marsaglia's polar method, so the files do not depend on the
 * platform, the number of shards or the call order.
 * Not Collective: nothing here calls MPI (call it on one rank, then synchronise). */
#ifndef ITERIS_SYNTH_H
#define ITERIS_SYNTH_H

#include <stdint.h>

#include "iteris/core.h"
#include "iteris/io.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- random numbers: itr_rng (core.h) ---------------------------------------------------------- */

/* A seed derived from (seed, name) (FNV-1a of name mixed by splitmix64): one stream per tensor. */
uint64_t itr_synth_seed(uint64_t seed, const char *name);

/* ---- generators ------------------------------------------------------------------------------ */

/* Relative size of a synthetic adapter's update: ||scaling B A||_F ~= this x ||W0||_F (in
 * expectation, for W0 drawn by itr_synth_model_write). */
#define ITR_SYNTH_ADAPTER_REL_NORM 0.2

/* Writes DIR/config.json and the weights of a random model (creating DIR): one
 * DIR/model.safetensors, or with n_shards > 1, DIR/model-0000k-of-0000n.safetensors and
 * DIR/model.safetensors.index.json. Projections W (d_out, d_in) ~ N(0, 1/d_in); RMSNorm weights
 * 1 + N(0, 0.1^2); biases (when cfg asks) N(0, 0.1^2); embeddings N(0, 1) (N(0, 9/D) when tied,
 * so logits stay moderate); lm_head (untied) N(0, 9/D). Every tensor has its own stream
 * itr_synth_seed(seed, name), so values do not depend on n_shards. */
itr_err itr_synth_model_write(const char *dir, const itr_model_config *cfg, itr_dtype dtype, int n_shards,
                              uint64_t seed);

/* Writes DIR/adapter_config.json and DIR/adapter_model.safetensors (creating DIR): a PEFT LoRA
 * of rank r on the modules whose bit (1u << itr_module) is set in module_mask, in every layer,
 * with lora_alpha alpha and use_rslora as given. A (r, d_in) ~ N(0, 1/d_in); B (d_out, r) scaled
 * so that ||scaling B A||_F ~= ITR_SYNTH_ADAPTER_REL_NORM ||W0||_F. */
itr_err itr_synth_adapter_write(const char *dir, const itr_model_config *cfg, int r, double alpha, int use_rslora,
                                unsigned module_mask, itr_dtype dtype, uint64_t seed, const char *base_model_name);

/* Writes a PEFT LoRA like itr_synth_adapter_write, but aimed at one task's inputs, as a trained
 * adapter is: for each (layer, module) in order, with C = sum_t w_t x_t x_t^T the second moment
 * of the module's inputs x_t when the base model in base_dir plus this adapter's earlier modules
 * runs on token t alone (a sequence of one token, float64, no context), token_weights (V) the
 * task's distribution over token ids (>= 0, normalised here):
 *   A (r, d_in) = sqrt(aim) Q + sqrt(1 - aim) Z, Q orthonormal rows spanning the top-r principal
 *                 subspace of C (40 subspace iterations from a seeded start; rows past d_in zero),
 *                 Z ~ N(0, 1/d_in);
 *   B (d_out, r) ~ N(0, 1), scaled so that ||scaling B A||_F = ITR_SYNTH_ADAPTER_REL_NORM ||W0||_F
 *                 exactly (with the stored, rounded factors).
 * aim in [0, 1]: 0 gives a random adapter. Costs O(L V (D + F)^2) flops: for small test models.
 * Plain float64 loops in a fixed order (no BLAS): the files depend only on the arguments and the
 * base's files (and, like the normals, on libm's sqrt/exp/log being IEEE-faithful). */
itr_err itr_synth_adapter_write_aimed(const char *dir, const char *base_dir, int r, double alpha, int use_rslora,
                                      unsigned module_mask, itr_dtype dtype, const double *token_weights,
                                      double aim, uint64_t seed, const char *base_model_name);

/* Writes n_seqs sequences of lengths uniform in [min_len, max_len], ids uniform in [0, vocab). */
itr_err itr_synth_tokens_write(const char *path, int vocab, int n_seqs, int min_len, int max_len, uint64_t seed);
/* Same, but each id is drawn from [band_lo, band_hi) with probability in_band and from the whole
 * vocabulary otherwise: tasks with different bands have distinguishable data. */
itr_err itr_synth_tokens_write_band(const char *path, int vocab, int band_lo, int band_hi, double in_band,
                                    int n_seqs, int min_len, int max_len, uint64_t seed);

/* The bundled demo case, under DIR (created):
 *   DIR/base           Llama, D 64, F 172, L 4, 4 heads (2 key/value heads), vocab 256, BF16, untied
 *   DIR/calib_{0,1,2}.jsonl (32 sequences) and DIR/heldout_{0,1,2}.jsonl (16), lengths 16..48;
 *                      task i draws 90% of its ids from its own third of the vocabulary.
 *   DIR/base/tokenizer.json  a Hugging Face byte-level BPE tokenizer: the 256 byte symbols, byte b = id b
 *   DIR/calib_text_{0,1,2}.jsonl (32) and DIR/heldout_text_{0,1,2}.jsonl (16): {"text": ...} lines of 16..48
 *                      bytes whose bytes fall mostly in task i's third (capitals and digits, lower case,
 *                      Cyrillic), for the demo merged from text (jobs/demo-text.yaml).
 *   DIR/adapter_{0,1,2} LoRA on all seven modules: r 4 (alpha 8, BF16), r 8 (alpha 16, F32),
 *                      r 16 (alpha 16, use_rslora, F16), each aimed at its task's inputs
 *                      (itr_synth_adapter_write_aimed with task i's token distribution, aim
 *                      ITR_SYNTH_DEMO_AIM), so that the tasks interfere as real adapters do. */
#define ITR_SYNTH_DEMO_AIM 0.9
itr_err itr_synth_demo_write(const char *dir);
/* The demo's base config (what DIR/base/config.json holds). */
void itr_synth_demo_config(itr_model_config *cfg);

#ifdef __cplusplus
}
#endif
#endif
