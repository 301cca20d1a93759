/* The small modes: -inspect, -make_demo, -logits, -tokenize. Each runs on rank 0; the other ranks wait at
 * the agreement point and return the same error. */
#include <string.h>

#include "cli/cli.h"
#include "iteris/dist.h"
#include "iteris/io.h"
#include "iteris/model.h"
#include "iteris/synth.h"

itr_err itr_cli_inspect(const itr_options *opt, MPI_Comm comm) {
  int rank;
  MPI_Comm_rank(comm, &rank);
  itr_err err = rank == 0 ? itr_inspect_dir(opt->inspect, stdout) : ITR_OK;
  fflush(stdout);
  return itr_dist_agree(comm, err);
}

itr_err itr_cli_make_demo(const itr_options *opt, MPI_Comm comm) {
  int rank;
  MPI_Comm_rank(comm, &rank);
  itr_err err = ITR_OK;
  if (rank == 0) {
    err = itr_synth_demo_write(opt->make_demo);
    if (err == ITR_OK)
      itr_log(ITR_LOG_INFO,
              "demo case written to %s: base/ (tiny Llama, byte-level tokenizer.json), adapter_{0,1,2}/ "
              "(ranks 4, 8, 16), calib_{0,1,2}.jsonl, heldout_{0,1,2}.jsonl (token ids), "
              "calib_text_{0,1,2}.jsonl, heldout_text_{0,1,2}.jsonl (text)",
              opt->make_demo);
  }
  return itr_dist_agree(comm, err);
}

itr_err itr_cli_logits(const itr_options *opt, MPI_Comm comm) {
  int rank;
  MPI_Comm_rank(comm, &rank);
  itr_err err = ITR_OK;
  if (rank == 0) {
    const char *dirs[ITR_MAX_TASKS];
    for (int i = 0; i < opt->n_adapter_logits; i++) dirs[i] = opt->adapter[i];
    err = itr_model_write_logits(opt->m.base, dirs, opt->n_adapter_logits, opt->logits, opt->logits_out);
  }
  return itr_dist_agree(comm, err);
}

/* -tokenize IN -tokenize_out OUT: every line of IN as {"input_ids": [...]}: text lines through the
 * tokenizer of -base (BOS first, as for calibration), input_ids lines checked and kept. */
itr_err itr_cli_tokenize(const itr_options *opt, MPI_Comm comm) {
  int rank;
  MPI_Comm_rank(comm, &rank);
  itr_err err = ITR_OK;
  if (rank == 0) {
    itr_model_config cfg;
    itr_tokenizer *tok = NULL;
    itr_token_set ts;
  memset(&ts, 0, sizeof ts);
    err = itr_model_config_read(opt->m.base, &cfg);
    if (err == ITR_OK) err = itr_token_set_read_text(opt->tokenize, cfg.vocab_size, opt->m.base, &tok, &ts);
    if (err == ITR_OK) err = itr_token_set_write(opt->tokenize_out, &ts);
    if (err == ITR_OK)
      itr_log(ITR_LOG_INFO, "wrote %d sequences (%lld tokens) to %s%s%s", ts.n_seqs, (long long)ts.n_tokens,
              opt->tokenize_out, tok ? "; tokenizer " : "", tok ? itr_tokenizer_path(tok) : "");
    itr_token_set_fini(&ts);
    itr_tokenizer_destroy(tok);
  }
  return itr_dist_agree(comm, err);
}
