/* SentencePiece tokenizer.model behind itr_tokenizer (tokenizer.c dispatches here for a .model file).
 * Private to src/io. Format and encoder: tokenizer_spm.c's header comment and include/iteris/io.h. */
#ifndef ITERIS_IO_TOK_SPM_H
#define ITERIS_IO_TOK_SPM_H

#include <stddef.h>
#include <stdint.h>

#include "iteris/core.h"

typedef struct itr_spm itr_spm;

/* Reads the ModelProto at path (hostile input): every malformed field is ITR_ERR_INPUT naming the
 * file and the field or piece index; more pieces than vocab_size (config.json's) is ITR_ERR_INPUT.
 * Also reads tokenizer_config.json beside it when present (add_bos_token, add_eos_token). */
itr_err itr_spm_open(const char *path, int vocab_size, itr_spm **out);
void itr_spm_destroy(itr_spm *s); /* accepts NULL */
/* As SentencePieceProcessor::EncodeAsIds (v0.1.97) with the model's special tokens: see io.h. */
itr_err itr_spm_encode(const itr_spm *s, const char *text, size_t len, int add_bos, int add_eos, int32_t **ids,
                       int64_t *n);
int itr_spm_bos(const itr_spm *s); /* the id of trainer_spec's bos_piece (a CONTROL piece), or -1 */
int itr_spm_eos(const itr_spm *s); /* likewise eos_piece */
int itr_spm_n_pieces(const itr_spm *s);

#endif
