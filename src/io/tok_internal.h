/* Private interface between tokenizer.c (the dispatcher behind itr_tokenizer_*: which file a folder
 * uses, llama2.c's tokenizer.bin) and the other tokenizer implementations in src/io. Not public API.
 *
 * tokenizer_json.c: a Hugging Face tokenizer.json (model BPE: byte-level like GPT-2 / Llama 3 /
 * Qwen2, or SentencePiece-style like Llama 2 / Mistral / TinyLlama), encoding exactly like the
 * `tokenizers` crate (huggingface/tokenizers). Not Collective. */
#ifndef ITERIS_IO_TOK_INTERNAL_H
#define ITERIS_IO_TOK_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "iteris/core.h"

typedef struct itr_tok_json itr_tok_json;

/* Reads path (a tokenizer.json) and, when present, tokenizer_config.json beside it. Every id must
 * be < vocab_size (config.json's). ITR_ERR_INPUT naming the file and the field on anything
 * malformed or unsupported. */
itr_err itr_tok_json_open(const char *path, int vocab_size, itr_tok_json **out);
void itr_tok_json_destroy(itr_tok_json *t); /* accepts NULL */
/* Encodes text[0..len) (valid UTF-8, else ITR_ERR_INPUT naming the byte offset). add_special:
 * the tokens the model adds by default (Hugging Face's add_special_tokens=True: the post_processor's
 * template, adjusted by tokenizer_config.json's add_bos_token / add_eos_token); add_eos: also end
 * with the EOS token (once). *ids is malloc'd (the caller frees it), *n its length. */
itr_err itr_tok_json_encode(const itr_tok_json *t, const char *text, size_t len, int add_special, int add_eos,
                            int32_t **ids, int64_t *n);
int itr_tok_json_bos(const itr_tok_json *t); /* the BOS id, or -1 when the files name none */
int itr_tok_json_eos(const itr_tok_json *t); /* the EOS id, or -1 */

#endif
