/* The modes of iteris-mpi. Each is Collective on comm and returns the same error on every rank
 * (the message is set on rank 0 at least). */
#ifndef ITERIS_CLI_CLI_H
#define ITERIS_CLI_CLI_H

#include <mpi.h>

#include "cli/options.h"

itr_err itr_cli_inspect(const itr_options *opt, MPI_Comm comm);
itr_err itr_cli_make_demo(const itr_options *opt, MPI_Comm comm);
itr_err itr_cli_logits(const itr_options *opt, MPI_Comm comm);
itr_err itr_cli_tokenize(const itr_options *opt, MPI_Comm comm);
/* The merge (itr_pipeline_merge), then, with -refine_steps K > 0, its refinement by distillation (refine.c). */
itr_err itr_cli_merge(const itr_options *opt, MPI_Comm comm);

#endif
