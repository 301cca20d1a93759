/* The option table: every option iteris-mpi accepts, its type, default, meaning and the modes /
 * methods it applies to. Values come from PETSc's options database, so the command line,
 * -options_file (PETSc format or YAML) and PETSC_OPTIONS all work; later wins. An option that is
 * unknown, or set but not used by the chosen mode/method, is an error. */
#include "cli/options.h"

#include "iteris/merge.h"

#include <errno.h>
#include <math.h>
#include <petscsys.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef enum { T_STR, T_STRLIST, T_INT, T_REAL, T_REALLIST, T_BOOL } opt_type;

/* where an option applies */
enum {
  U_MERGE = 1 << 0,  /* every merge, whatever the method */
  U_METHOD = 1 << 1, /* merges whose -method reads it (the method table's options, include/iteris/merge.h) */
  U_INSPECT = 1 << 6, U_LOGITS = 1 << 7, U_DEMO = 1 << 8,
  U_FEATURES = 1 << 9, /* also allowed with -features (with U_METHOD: only where the method reads it) */
  U_TRAIN = 1 << 10,   /* -train */
  U_TOKENIZE = 1 << 11,
  U_ENSEMBLE = 1 << 12, /* -ensemble */
  U_ALL = U_MERGE | U_INSPECT | U_LOGITS | U_DEMO | U_FEATURES | U_TRAIN | U_TOKENIZE | U_ENSEMBLE,
};

typedef struct {
  const char *name; /* without the leading '-' */
  opt_type type;
  size_t off;       /* offset of the value in itr_options */
  size_t count_off; /* offset of the count for list types */
  size_t cap;       /* bytes of a string value (T_STR) */
  const char *def;  /* default, as text ("" = none) */
  unsigned used_by;
  const char *help;
} opt_entry;

#define OFF(f) offsetof(itr_options, f)
/* -ensemble's list is read straight into itr_eval_opts as a T_STRLIST of ITR_MAX_TASKS x ITR_OPT_PATH */
_Static_assert(ITR_EVAL_MAX == ITR_MAX_TASKS && ITR_TRAIN_PATH == ITR_OPT_PATH, "-ensemble list layout");
static const opt_entry table_[] = {
    {"base", T_STR, OFF(m.base), 0, sizeof(((itr_options *)0)->m.base), "", U_MERGE | U_LOGITS | U_TRAIN | U_TOKENIZE | U_ENSEMBLE,
     "Hugging Face model folder (config.json + safetensors; its tokenizer.json, tokenizer.model or tokenizer.bin for text lines)"},
    {"adapters", T_STRLIST, OFF(m.adapters), OFF(m.n_adapters), 0, "", U_MERGE | U_FEATURES, "PEFT LoRA adapter folders, comma-separated"},
    {"calib", T_STRLIST, OFF(m.calib), OFF(m.n_calib), 0, "", U_MERGE,
     "calibration JSONL files, one per adapter, same order ({\"input_ids\": [...]} or {\"text\": \"...\"} per line)"},
    {"heldout", T_STRLIST, OFF(m.heldout), OFF(m.n_heldout), 0, "", U_MERGE | U_ENSEMBLE,
     "held-out JSONL files, one per adapter: the report gives kl_ratio and top1 per task (-ensemble: one file)"},
    {"out", T_STR, OFF(m.out), 0, sizeof(((itr_options *)0)->m.out), "", U_MERGE | U_FEATURES | U_TRAIN, "output folder for the merged (or trained) PEFT adapter and the report"},
    {"method", T_STR, OFF(m.method), 0, sizeof(((itr_options *)0)->m.method), "iteris", U_MERGE | U_FEATURES,
     "iteris | task_arithmetic | regmean | ties | dare | knots | mixlora (compose: experts behind routers)"},
    {"max_iter", T_INT, OFF(m.max_iter), 0, 0, "10", U_METHOD, "IterIS iterations (solves)"},
    {"alpha_1", T_REAL, OFF(m.alpha_1), 0, 0, "1e-7", U_METHOD | U_FEATURES, "ridge on X_i^T Xt_i, relative to its Frobenius norm"},
    {"alpha_2", T_REAL, OFF(m.alpha_2), 0, 0, "1e-7", U_METHOD | U_FEATURES,
     "ridge on Xt_i^T Xt_i, relative to its Frobenius norm"},
    {"reg_coef", T_REAL, OFF(m.reg_coef), 0, 0, "0", U_METHOD | U_FEATURES, "mixing rho: Xt_i <- (1-rho) Xt_i + rho X_i"},
    {"manual_coef", T_REALLIST, OFF(m.manual_coef), OFF(m.n_manual_coef), 0, "", U_METHOD | U_FEATURES,
     "manual weight w_i per adapter, comma-separated (default 1 each)"},
    {"with_pretrain", T_BOOL, OFF(m.with_pretrain), 0, 0, "0", U_METHOD,
     "use W0 + dW_i in the solve (full-rank result, written with -out_rank)"},
    {"out_rank", T_INT, OFF(m.out_rank), 0, 0, "0", U_MERGE | U_FEATURES, "truncate the merged update to this rank (0: exact)"},
    {"out_dtype", T_STR, OFF(m.out_dtype), 0, sizeof(((itr_options *)0)->m.out_dtype), "F32", U_MERGE | U_FEATURES, "dtype of the written adapter: F32 | BF16 | F16 | F64"},
    {"ta_lambda", T_REAL, OFF(m.ta_lambda), 0, 0, "1", U_METHOD | U_FEATURES, "scale lambda of the merged update"},
    {"regmean_alpha", T_REAL, OFF(m.regmean_alpha), 0, 0, "1", U_METHOD | U_FEATURES, "RegMean: scale of the Grams' off-diagonal entries"},
    {"density", T_REAL, OFF(m.density), 0, 0, "0.2", U_METHOD, "TIES, KnOTS-TIES, -dare_ties 1: fraction of entries kept per task"},
    {"dare_p", T_REAL, OFF(m.dare_p), 0, 0, "0.5", U_METHOD, "DARE: drop probability"},
    {"dare_ties", T_BOOL, OFF(m.dare_ties), 0, 0, "0", U_METHOD, "DARE: combine with TIES instead of a sum"},
    {"seed", T_INT, OFF(m.seed), 0, 0, "0", U_METHOD | U_TRAIN, "random seed (DARE; -train: initialisation, data order, dropout; -refine_steps uses it too)"},
    {"restart", T_BOOL, OFF(m.restart), 0, 0, "0", U_METHOD | U_TRAIN, "resume from the checkpoint in OUT.partial/ (written after every iteration and on SIGTERM)"},
    {"solve_groups", T_INT, OFF(m.solve_groups), 0, 0, "1", U_METHOD,
     "split the ranks into N groups with their own grids; rank 0 assigns each layer's solves to them by cost, and they solve at the same time"},
    {"stages", T_INT, OFF(m.stages), 0, 0, "1", U_METHOD,
     "pipeline stages: split the ranks into N groups, each holding a contiguous range of layers and its own grid; "
     "activations pass from stage to stage, and a stage starts its next iteration as soon as its layers are solved"},
    {"system", T_STR, OFF(m.system), 0, sizeof(((itr_options *)0)->m.system), "auto", U_METHOD,
     "auto | inputs | tokens: solve each input site's systems over the d_in inputs, or in token space (n x n, n = "
     "the site's calibration rows: cheaper when n < d_in; docs/ALGORITHM.md); auto chooses per site by cost"},
    {"block_size", T_INT, OFF(m.block_size), 0, 0, "64", U_MERGE | U_FEATURES,
     "ScaLAPACK block size of the distributed statistics and solves (16 .. 1024)"},
    {"grid_rows", T_INT, OFF(m.grid_rows), 0, 0, "0", U_MERGE | U_FEATURES,
     "process rows of the ScaLAPACK grid (a divisor of the rank count, or of each stage's with -stages); 0: the "
     "squarest grid with rows <= columns (1 x 2, 2 x 2, 2 x 4, 4 x 4, ...)"},
    {"gram_exchange", T_STR, OFF(m.gram_exchange), 0, sizeof(((itr_options *)0)->m.gram_exchange), "auto", U_MERGE,
     "auto | columns | partial: how the Grams of input sites are formed over several ranks: every rank's rows go, in "
     "the columns each process needs, to the owners of the Gram's blocks (bytes per rank shrink with the ranks), or each "
     "rank forms the partial Gram of its rows and the partials are summed (d_in^2 / 2 values per rank, no rows move); "
     "auto takes columns when they move under half the bytes (results/scaling.md)"},
    {"plots", T_BOOL, OFF(m.plots), 0, 0, "1", U_MERGE,
     "write OUT/convergence.png (gnuplot): the solves' scaled residuals per iteration and module (0: no plot)"},
    {"fidelity_per_iter", T_BOOL, OFF(m.fidelity_per_iter), 0, 0, "1", U_METHOD,
     "with -heldout and -max_iter > 1: measure kl_ratio and top-1 after every iteration (merge_report.json, "
     "convergence.png); costs one held-out forward of the merged model per iteration (0: only at the end)"},
    {"max_tokens", T_INT, OFF(m.max_tokens), 0, 0, "0", U_METHOD, "keep the first N tokens of every calibration sequence (0: all)"},
    {"inspect", T_STR, OFF(inspect), 0, sizeof(((itr_options *)0)->inspect), "", U_INSPECT, "print a summary of a model or adapter folder and exit"},
    {"make_demo", T_STR, OFF(make_demo), 0, sizeof(((itr_options *)0)->make_demo), "", U_DEMO,
     "write the demo case (tiny model, 3 adapters, calibration data) into this folder and exit"},
    {"features", T_STR, OFF(m.features), 0, sizeof(((itr_options *)0)->m.features), "", U_MERGE | U_FEATURES,
     "merge from external features in this HDF5 file (inputs or statistics per task and module; docs/FEATURES.md)"},
    {"logits", T_STR, OFF(logits), 0, sizeof(((itr_options *)0)->logits), "", U_LOGITS, "JSONL token file: write the logits of -base (+ -adapter)"},
    {"logits_out", T_STR, OFF(logits_out), 0, sizeof(((itr_options *)0)->logits_out), "", U_LOGITS, "safetensors file for -logits (logits.0, logits.1, ...)"},
    {"adapter", T_STRLIST, OFF(adapter), OFF(n_adapter_logits), 0, "", U_LOGITS,
     "adapter folder(s) applied on top of -base for -logits"},
    {"train", T_BOOL, OFF(train), 0, 0, "0", U_TRAIN, "train a LoRA adapter on -data (data parallel over the ranks)"},
    {"data", T_STR, OFF(t.data), 0, sizeof(((itr_options *)0)->t.data), "", U_TRAIN,
     "-train: JSONL of {\"input_ids\": [...]} or {\"text\": ...} lines, optionally with a prompt (prompt_len, completion, "
     "or choices + label): next-token loss beyond the prompt"},
    {"init_adapter", T_STR, OFF(t.init_adapter), 0, sizeof(((itr_options *)0)->t.init_adapter), "", U_TRAIN,
     "-train: start from this PEFT adapter (its modules, ranks and scalings) instead of PEFT's initialisation"},
    {"grad_out", T_STR, OFF(t.grad_out), 0, sizeof(((itr_options *)0)->t.grad_out), "", U_TRAIN,
     "-train: write the gradient of the mean loss over all of -data at the start (F64 safetensors) and stop"},
    {"r", T_INT, OFF(t.r), 0, 0, "8", U_TRAIN, "-train: LoRA rank"},
    {"lora_alpha", T_REAL, OFF(t.lora_alpha), 0, 0, "16", U_TRAIN, "-train: LoRA alpha (scaling alpha / r)"},
    {"rslora", T_BOOL, OFF(t.rslora), 0, 0, "0", U_TRAIN, "-train: rank-stabilised scaling alpha / sqrt(r)"},
    {"targets", T_STR, OFF(targets), 0, sizeof(((itr_options *)0)->targets), "q_proj,v_proj", U_TRAIN,
     "-train: modules to adapt (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or all)"},
    {"lora_dropout", T_REAL, OFF(t.dropout), 0, 0, "0", U_TRAIN, "-train: LoRA dropout probability (PEFT's)"},
    {"steps", T_INT, OFF(t.steps), 0, 0, "100", U_TRAIN, "-train: optimizer steps"},
    {"batch", T_INT, OFF(t.batch), 0, 0, "8", U_TRAIN, "-train: sequences per step, over all ranks"},
    {"grad_accum", T_INT, OFF(t.grad_accum), 0, 0, "1", U_TRAIN, "-train: micro-batches per rank per step (less memory, same result)"},
    {"lr", T_REAL, OFF(t.lr), 0, 0, "2e-4", U_TRAIN, "-train: peak learning rate (AdamW)"},
    {"warmup", T_INT, OFF(t.warmup), 0, 0, "0", U_TRAIN, "-train: linear warmup steps, then cosine decay"},
    {"min_lr_ratio", T_REAL, OFF(t.min_lr_ratio), 0, 0, "0", U_TRAIN, "-train: the cosine decays to this fraction of -lr"},
    {"adam_beta1", T_REAL, OFF(t.beta1), 0, 0, "0.9", U_TRAIN, "-train: AdamW beta1"},
    {"adam_beta2", T_REAL, OFF(t.beta2), 0, 0, "0.999", U_TRAIN, "-train: AdamW beta2"},
    {"adam_eps", T_REAL, OFF(t.eps), 0, 0, "1e-8", U_TRAIN, "-train: AdamW epsilon"},
    {"weight_decay", T_REAL, OFF(t.weight_decay), 0, 0, "0", U_TRAIN, "-train: AdamW decoupled weight decay"},
    {"max_grad_norm", T_REAL, OFF(t.max_grad_norm), 0, 0, "1", U_TRAIN, "-train: clip the gradient's 2-norm to this (0: no clipping)"},
    {"full_rank", T_BOOL, OFF(t.full_rank), 0, 0, "0", U_TRAIN,
     "-train: train every weight of the model (full-rank; OUT is a model folder) instead of a LoRA adapter"},
    {"from_scratch", T_BOOL, OFF(t.from_scratch), 0, 0, "0", U_TRAIN,
     "-train: start from a random initialisation (N(0, 0.02^2), norms 1) of -base's configuration; without -full_rank: "
     "LoRA pre-training (the -targets projections stay frozen and train through LoRA, the rest fully; OUT is a model folder)"},
    {"switch_lora", T_BOOL, OFF(t.switch_lora), 0, 0, "0", U_TRAIN,
     "-train: SwitchLoRA (LoRA vectors switched with candidates, W absorbing each switch; trains what -from_scratch "
     "trains; OUT is a model folder)"},
    {"switch_lora_interval", T_INT, OFF(t.switch_interval), 0, 0, "40", U_TRAIN,
     "-train -switch_lora: base interval: r / interval vectors of each factor switched per step at first"},
    {"switch_lora_descent", T_REAL, OFF(t.switch_descent), 0, 0, "0.1", U_TRAIN,
     "-train -switch_lora: the interval grows by 1/0.3 every (this x -steps) steps (0: constant)"},
    {"switch_lora_warm", T_INT, OFF(t.switch_warm), 0, 0, "5", U_TRAIN,
     "-train -switch_lora: steps a switched vector's counterpart stays frozen (its AdamW state reset)"},
    {"distil", T_STRLIST, OFF(t.teachers), OFF(t.n_teachers), 0, "", U_TRAIN,
     "-train: distil into -init_adapter (e.g. a merge) from these teacher adapters: KL(teacher i || student) on -distil_data i"},
    {"distil_drop", T_REAL, OFF(t.distil_drop), 0, 0, "0", U_TRAIN,
     "-train -distil: leave out each token (but the first) with this probability, anew every step: more inputs from the same rows"},
    {"distil_data", T_STRLIST, OFF(t.teacher_data), OFF(t.n_teacher_data), 0, "", U_TRAIN,
     "-train -distil: one JSONL per teacher (its calibration sequences)"},
    {"mixlora_top_k", T_INT, OFF(m.mixlora_top_k), 0, 0, "1", U_MERGE | U_TRAIN,
     "-method mixlora, -train -mixlora_experts: experts per token (the reference trains with 2)"},
    {"mixlora_experts", T_INT, OFF(t.mixlora_experts), 0, 0, "0", U_TRAIN,
     "-train: train a MixLoRA adapter: the gate/up/down modules of -targets become this many rank -r LoRA experts "
     "per layer behind a router (0: plain LoRA)"},
    {"mixlora_aux_coef", T_REAL, OFF(t.mixlora_aux_coef), 0, 0, "0.001", U_TRAIN,
     "-train: MixLoRA's load-balancing loss coefficient (router_aux_loss_coef; the reference's default 0.001)"},
    {"train_only", T_STR, OFF(train_only), 0, sizeof(((itr_options *)0)->train_only), "", U_TRAIN,
     "-train with a MixLoRA adapter: train only these groups (attention, routers, experts; comma-separated), freeze the rest"},
    {"mixlora_ridge", T_REAL, OFF(m.mixlora_ridge), 0, 0, "1e-3", U_MERGE,
     "-method mixlora: the routers' ridge (relative to the mean diagonal of the FFN inputs' Gram matrix)"},
    {"refine_steps", T_INT, OFF(refine_steps), 0, 0, "0", U_MERGE,
     "merge, then distil: refine the merged adapter for N steps by KL(base + adapter i || base + merged) on -calib i"},
    {"refine_lr", T_REAL, OFF(refine_lr), 0, 0, "2e-3", U_MERGE, "-refine_steps: peak learning rate (AdamW, cosine)"},
    {"refine_batch", T_INT, OFF(refine_batch), 0, 0, "16", U_MERGE, "-refine_steps: calibration sequences per step"},
    {"refine_weight_decay", T_REAL, OFF(refine_weight_decay), 0, 0, "0.1", U_MERGE, "-refine_steps: AdamW weight decay"},
    {"refine_drop", T_REAL, OFF(refine_drop), 0, 0, "0.2", U_MERGE,
     "-refine_steps: leave out each calibration token with this probability, anew every step (as -distil_drop)"},
    {"refine_val", T_REAL, OFF(refine_val), 0, 0, "0.2", U_MERGE,
     "-refine_steps: hold out this fraction of each -calib file and keep the refinement step of lowest KL on it"},
    {"refine_train_only", T_STR, OFF(refine_train_only), 0, sizeof(((itr_options *)0)->refine_train_only), "", U_MERGE,
     "-method mixlora -refine_steps: refine only these groups (attention, routers, experts), as -train_only"},
    {"val_fraction", T_REAL, OFF(t.val_fraction), 0, 0, "0", U_TRAIN,
     "-train: hold out this fraction of the sequences (of each -distil_data file), measure their loss every "
     "-eval_every steps, write the parameters of the lowest (early stopping)"},
    {"eval_every", T_INT, OFF(t.eval_every), 0, 0, "0", U_TRAIN, "-train -val_fraction: steps between validations (0: steps / 20)"},
    {"checkpoint_every", T_INT, OFF(t.checkpoint_every), 0, 0, "0", U_TRAIN,
     "-train: also write the checkpoint every N steps (it is always written when a signal stops the run)"},
    {"log_every", T_INT, OFF(t.log_every), 0, 0, "10", U_TRAIN, "-train: print loss, tokens/s and ETA every N steps"},
    {"tokenize", T_STR, OFF(tokenize), 0, sizeof(((itr_options *)0)->tokenize), "", U_TOKENIZE,
     "JSONL file of {\"text\": ...} (or input_ids) lines: tokenize with -base's tokenizer (tokenizer.json, "
     "tokenizer.model or tokenizer.bin; special tokens as the model adds them)"},
    {"tokenize_out", T_STR, OFF(tokenize_out), 0, sizeof(((itr_options *)0)->tokenize_out), "", U_TOKENIZE,
     "JSONL file written by -tokenize: a line per input line ({\"input_ids\": [...]}, with prompt_len, or a "
     "question's choices and label)"},
    {"ensemble", T_STRLIST, OFF(e.adapters), OFF(e.n_adapters), 0, "", U_ENSEMBLE,
     "score these adapters and their probability-averaged ensemble on -heldout (NLL, accuracy, ECE)"},
    {"eval_out", T_STR, OFF(e.out), 0, sizeof(((itr_options *)0)->e.out), "", U_ENSEMBLE, "-ensemble: also write the table as JSON here"},
    {"ece_bins", T_INT, OFF(e.bins), 0, 0, "10", U_ENSEMBLE, "-ensemble: equal-width bins of the expected calibration error"},
    {"eval_reference", T_STR, OFF(e.reference), 0, sizeof(((itr_options *)0)->e.reference), "", U_ENSEMBLE,
     "-ensemble: one of its adapters (e.g. a task's own): add kl_ratio, top-1 agreement and the share of its "
     "adaptation each model keeps"},
    {"verbose", T_INT, OFF(m.verbose), 0, 0, "0", U_ALL, "0: progress, 1: details, 2: debug"},
};
#define N_OPTS (sizeof table_ / sizeof table_[0])

/* -out names the output folder; OUT.partial/ and OUT.old.PID/ are made beside it from the name, so
 * "DIR/", "DIR/." and "DIR/./" become "DIR". A name that is no folder of its own ("", ".", "..", "/",
 * ".../..") is refused. */
static itr_err normalize_out(char *p) {
  const char *given = NULL;
  char orig[ITR_OPT_PATH];
  snprintf(orig, sizeof orig, "%s", p);
  given = orig;
  size_t n = strlen(p);
  for (;;) {
    if (n > 1 && p[n - 1] == '/') {
      p[--n] = 0;
    } else if (n >= 2 && p[n - 1] == '.' && p[n - 2] == '/') {
      n -= 2;
      p[n] = 0;
    } else {
      break;
    }
  }
  const int dotdot = (n == 2 && !strcmp(p, "..")) || (n >= 3 && !strcmp(p + n - 3, "/.."));
  ITR_CHECK(n > 0 && strcmp(p, ".") != 0 && strcmp(p, "/") != 0 && !dotdot, ITR_ERR_INPUT,
            "-out '%s' does not name a folder of its own (the merge writes OUT.partial/ beside it and renames it to "
            "OUT): give a new folder name, e.g. -out merged",
            given);
  return ITR_OK;
}

/* Whether option i may be set in this mode with this method. */
static int option_used(size_t i, itr_mode mode, unsigned use, const itr_method *method) {
  const unsigned u = table_[i].used_by;
  if (mode != ITR_MODE_MERGE && mode != ITR_MODE_FEATURES) return (u & use) != 0;
  if (mode == ITR_MODE_FEATURES && !(u & U_FEATURES)) return 0;
  return (u & U_MERGE) || ((u & U_METHOD) && itr_method_reads(method, table_[i].name));
}

/* Every option a method names exists in the table (the two tables stay in step). */
static itr_err check_method_options(const itr_method *method) {
  char names[512];
  snprintf(names, sizeof names, "%s", method->options);
  for (char *save = NULL, *w = strtok_r(names, " ", &save); w; w = strtok_r(NULL, " ", &save)) {
    size_t i = 0;
    while (i < N_OPTS && strcmp(table_[i].name, w) != 0) i++;
    ITR_CHECK(i < N_OPTS && (table_[i].used_by & U_METHOD), ITR_ERR_INTERNAL,
              "method '%s' reads -%s, which the option table does not give to methods", method->name, w);
  }
  return ITR_OK;
}

void itr_options_print_help(FILE *f) {
  fprintf(f,
          "iteris-mpi: merge LoRA adapters of one base model into one adapter with IterIS (CVPR 2025), with MPI.\n\n"
          "usage:\n"
          "  mpirun -np P iteris-mpi -base DIR -adapters D1,D2,... -calib C1.jsonl,C2.jsonl,... -out OUT [options]\n"
          "  srun iteris-mpi -options_file jobs/NAME.yaml          (YAML job file: one 'key: value' per option)\n"
          "  iteris-mpi -inspect DIR                              (summary of a model or adapter folder)\n"
          "  iteris-mpi -base DIR [-adapter DIR] -logits IN.jsonl -logits_out OUT.safetensors\n"
          "  iteris-mpi -base DIR -tokenize IN.jsonl -tokenize_out OUT.jsonl   (text lines to input_ids)\n"
          "  iteris-mpi -make_demo DIR                            (write the bundled demo case)\n"
          "  mpirun -np P iteris-mpi -train 1 -base DIR -data TRAIN.jsonl -out ADAPTER [-r 8 -lora_alpha 16\n"
          "      -targets q_proj,v_proj -steps 100 -batch 8 -lr 2e-4 ...]    (train a LoRA adapter)\n"
          "  mpirun -np P iteris-mpi -base DIR -ensemble A1,A2,... -heldout H.jsonl [-eval_out R.json]\n"
          "                                                       (score adapters and their ensemble)\n"
          "  iteris-mpi -features F.h5 -adapters D1,D2,... -out OUT [-method iteris|regmean|task_arithmetic]\n"
          "                                                       (merge from external features: docs/FEATURES.md)\n\n"
          "options (default in brackets):\n");
  for (size_t i = 0; i < N_OPTS; i++) {
    const opt_entry *e = &table_[i];
    char lhs[64];
    snprintf(lhs, sizeof lhs, "-%s%s", e->name,
             e->type == T_BOOL ? " 0|1" : e->type == T_INT ? " N" : e->type == T_REAL ? " X" :
             e->type == T_REALLIST ? " X,X,..." : e->type == T_STRLIST ? " A,B,..." : " S");
    fprintf(f, "  %-24s %s", lhs, e->help);
    if (e->def[0]) fprintf(f, " [%s]", e->def);
    fputc('\n', f);
  }
  fprintf(f,
          "\nPETSc options that also work: -options_file FILE, -log_view [:FILE], -help.\n"
          "Unknown options, and options the chosen mode or -method does not use, are errors.\n"
          "exit codes: 0 success, 2 usage or input error, 3 numerical error (e.g. a system that is not\n"
          "positive definite: raise -alpha_2), 4 internal error, 5 stopped by SIGTERM/SIGINT/SIGUSR1 after\n"
          "saving a checkpoint in OUT.partial/ (rerun the same command with -restart 1 to continue).\n");
}

static itr_err split_list(const char *name, const char *s, char *out, size_t elem, size_t cap, int *n) {
  int k = 0;
  const char *p = s;
  while (*p) {
    const char *c = strchr(p, ',');
    size_t len = c ? (size_t)(c - p) : strlen(p);
    ITR_CHECK(len > 0, ITR_ERR_INPUT, "option -%s: empty item in list '%s'", name, s);
    ITR_CHECK(len < elem, ITR_ERR_INPUT, "option -%s: item too long in '%s'", name, s);
    ITR_CHECK((size_t)k < cap, ITR_ERR_INPUT, "option -%s: more than %zu items", name, cap);
    memcpy(out + (size_t)k * elem, p, len);
    out[(size_t)k * elem + len] = '\0';
    k++;
    if (!c) break;
    p = c + 1;
    ITR_CHECK(*p, ITR_ERR_INPUT, "option -%s: list '%s' ends with a comma", name, s);
  }
  *n = k;
  return ITR_OK;
}

static itr_err parse_real(const char *name, const char *s, double *out) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  ITR_CHECK(end != s && *end == '\0' && errno == 0 && isfinite(v), ITR_ERR_INPUT,
            "option -%s: '%s' is not a finite number", name, s);
  *out = v;
  return ITR_OK;
}

static itr_err parse_long(const char *name, const char *s, long *out) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  ITR_CHECK(end != s && *end == '\0' && errno == 0, ITR_ERR_INPUT, "option -%s: '%s' is not an integer",
            name, s);
  *out = v;
  return ITR_OK;
}

static itr_err set_value(itr_options *opt, const opt_entry *e, const char *s) {
  char *base = (char *)opt;
  switch (e->type) {
    case T_STR:
      ITR_CHECK(strlen(s) < e->cap, ITR_ERR_INPUT, "option -%s: value longer than %zu characters", e->name,
                e->cap - 1);
      strcpy(base + e->off, s);
      return ITR_OK;
    case T_STRLIST:
      return split_list(e->name, s, base + e->off, ITR_OPT_PATH, ITR_MAX_TASKS, (int *)(base + e->count_off));
    case T_INT: {
      long v;
      ITR_TRY(parse_long(e->name, s, &v));
      ITR_CHECK(v >= 0 && v <= 1000000000L, ITR_ERR_INPUT, "option -%s: %ld is out of range [0, 1e9]", e->name, v);
      if (e->off == OFF(m.seed)) *(long *)(base + e->off) = v;
      else *(int *)(base + e->off) = (int)v;
      return ITR_OK;
    }
    case T_BOOL: {
      long v;
      if (strcmp(s, "true") == 0) v = 1;
      else if (strcmp(s, "false") == 0) v = 0;
      else ITR_TRY(parse_long(e->name, s, &v));
      ITR_CHECK(v == 0 || v == 1, ITR_ERR_INPUT, "option -%s: expected 0 or 1, got '%s'", e->name, s);
      *(int *)(base + e->off) = (int)v;
      return ITR_OK;
    }
    case T_REAL: return parse_real(e->name, s, (double *)(base + e->off));
    case T_REALLIST: {
      char items[ITR_MAX_TASKS][64];
      int n;
      ITR_TRY(split_list(e->name, s, &items[0][0], 64, ITR_MAX_TASKS, &n));
      for (int i = 0; i < n; i++) ITR_TRY(parse_real(e->name, items[i], (double *)(base + e->off) + i));
      *(int *)(base + e->count_off) = n;
      return ITR_OK;
    }
  }
  return itr_error_set(ITR_ERR_INTERNAL, "option -%s: unknown type", e->name);
}

void itr_options_defaults(itr_options *opt) {
  memset(opt, 0, sizeof *opt);
  for (size_t i = 0; i < N_OPTS; i++)
    if (table_[i].def[0]) (void)set_value(opt, &table_[i], table_[i].def);
}

/* -train_only / -refine_train_only: a comma-separated list of groups into ITR_LORA_GROUP_* bits ("": 0, all). */
static itr_err parse_groups(const char *opt_name, const char *value, unsigned *out) {
  static const char *const group[] = {"attention", "routers", "experts"}; /* bit g: group[g] */
  char list[64];
  snprintf(list, sizeof list, "%s", value);
  unsigned bits = 0;
  for (char *save = NULL, *w = strtok_r(list, ",", &save); w; w = strtok_r(NULL, ",", &save)) {
    int g = 0;
    while (g < 3 && strcmp(group[g], w) != 0) g++;
    ITR_CHECK(g < 3, ITR_ERR_INPUT, "-%s: unknown parameter group '%s' (attention, routers, experts)", opt_name, w);
    bits |= 1u << g;
  }
  ITR_CHECK(bits || !value[0], ITR_ERR_INPUT, "-%s '%s' names no group (attention, routers, experts)", opt_name, value);
  *out = bits;
  return ITR_OK;
}

/* -train: the shared options copied in, -targets parsed; the trainer checks the rest. */
static itr_err train_opts(itr_options *opt) {
  itr_train_opts *t = &opt->t;
  snprintf(t->base, sizeof t->base, "%s", opt->m.base);
  snprintf(t->out, sizeof t->out, "%s", opt->m.out);
  t->seed = opt->m.seed;
  t->verbose = opt->m.verbose;
  t->restart = opt->m.restart;
  t->mixlora_top_k = opt->m.mixlora_top_k;
  ITR_CHECK(t->base[0], ITR_ERR_INPUT, "-train needs -base DIR (the Hugging Face model folder); see -help");
  ITR_CHECK(t->data[0] || t->n_teachers, ITR_ERR_INPUT, "-train needs -data FILE.jsonl (or -distil); see -help");
  ITR_CHECK(t->out[0] || t->grad_out[0], ITR_ERR_INPUT, "-train needs -out DIR (where the adapter goes); see -help");
  if (t->out[0]) ITR_TRY(normalize_out(t->out));
  t->targets = 0;
  char list[256];
  snprintf(list, sizeof list, "%s", opt->targets);
  for (char *save = NULL, *w = strtok_r(list, ",", &save); w; w = strtok_r(NULL, ",", &save)) {
    if (!strcmp(w, "all")) {
      t->targets = (1u << ITR_MODULE_COUNT) - 1;
      continue;
    }
    int m = 0;
    while (m < ITR_MODULE_COUNT && strcmp(itr_module_name((itr_module)m), w) != 0) m++;
    ITR_CHECK(m < ITR_MODULE_COUNT, ITR_ERR_INPUT,
              "-targets: unknown module '%s' (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, all)", w);
    t->targets |= 1u << m;
  }
  ITR_CHECK(t->targets != 0, ITR_ERR_INPUT, "-targets names no module");
  return parse_groups("train_only", opt->train_only, &t->train_only);
}

static int is_petsc_option(const char *name) {
  /* options PETSc itself reads; they never count as unknown */
  static const char *const ok[] = {"options_file", "options_file_yaml", "log_view", "help", "skip_petscrc",
                                   "options_left", "malloc_debug", "malloc_dump", "log_view_memory",
                                   "info", "on_error_abort", "no_signal_handler", "checkstack"};
  for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
    if (strcmp(name, ok[i]) == 0) return 1;
  return 0;
}

itr_err itr_options_parse(itr_options *opt) {
  itr_options_defaults(opt);
  int set[N_OPTS] = {0};
  char *val = NULL;
  ITR_TRY(itr_calloc(ITR_OPT_PATH * 4, 1, "option value", &val));
  itr_err err = ITR_OK;
  for (size_t i = 0; i < N_OPTS && err == ITR_OK; i++) {
    char key[64];
    snprintf(key, sizeof key, "-%s", table_[i].name);
    PetscBool has = PETSC_FALSE;
    val[0] = '\0';
    if (PetscOptionsGetString(NULL, NULL, key, val, ITR_OPT_PATH * 4, &has) != 0) {
      err = itr_error_set(ITR_ERR_INPUT, "option %s: could not be read", key);
      break;
    }
    if (!has) continue;
    set[i] = 1;
    if (val[0] == '\0' && table_[i].type == T_BOOL) snprintf(val, 2, "1"); /* "-train" alone: as PETSc's flags */
    if (val[0] == '\0') {
      err = itr_error_set(ITR_ERR_INPUT, "option %s needs a value (see -help)", key);
      break;
    }
    err = set_value(opt, &table_[i], val);
  }
  free(val);
  ITR_TRY(err);

  /* unknown options: whatever PETSc holds that nobody asked for */
  PetscInt nleft = 0;
  char **names = NULL, **values = NULL;
  if (PetscOptionsLeftGet(NULL, &nleft, &names, &values) == 0) {
    for (PetscInt i = 0; i < nleft && err == ITR_OK; i++)
      if (!is_petsc_option(names[i]))
        err = itr_error_set(ITR_ERR_INPUT, "unknown option -%s%s%s (see -help for the list)", names[i],
                            values[i] ? " " : "", values[i] ? values[i] : "");
    PetscOptionsLeftRestore(NULL, &nleft, &names, &values);
  }
  ITR_TRY(err);

  /* mode, then method, then options that the mode/method does not use */
  int nmodes = (opt->inspect[0] != 0) + (opt->make_demo[0] != 0) + (opt->logits[0] != 0) + (opt->tokenize[0] != 0) +
               (opt->train != 0) + (opt->e.n_adapters != 0);
  ITR_CHECK(nmodes <= 1, ITR_ERR_INPUT,
            "-inspect, -make_demo, -logits, -tokenize, -train and -ensemble are separate modes: give one");
  unsigned use = 0;
  const itr_method *method = NULL;
  if (opt->inspect[0]) opt->mode = ITR_MODE_INSPECT, use = U_INSPECT;
  else if (opt->make_demo[0]) opt->mode = ITR_MODE_MAKE_DEMO, use = U_DEMO;
  else if (opt->logits[0]) opt->mode = ITR_MODE_LOGITS, use = U_LOGITS;
  else if (opt->train) opt->mode = ITR_MODE_TRAIN, use = U_TRAIN;
  else if (opt->e.n_adapters) opt->mode = ITR_MODE_ENSEMBLE, use = U_ENSEMBLE;
  else if (opt->tokenize[0]) opt->mode = ITR_MODE_TOKENIZE, use = U_TOKENIZE;
  else {
    opt->mode = opt->m.features[0] ? ITR_MODE_FEATURES : ITR_MODE_MERGE;
    if (strcmp(opt->m.method, "mixlora") == 0 && opt->mode == ITR_MODE_MERGE) { /* IterIS for the attention */
      opt->mixlora = 1;
      snprintf(opt->m.method, sizeof opt->m.method, "iteris");
    }
    method = itr_method_find(opt->m.method);
    char names[256];
    itr_method_names(", ", names, sizeof names);
    ITR_CHECK(method, ITR_ERR_INPUT, "option -method: unknown method '%s' (%s)", opt->m.method, names);
    ITR_TRY(check_method_options(method));
    ITR_CHECK(opt->mode != ITR_MODE_FEATURES || (method->flags & ITR_METHOD_FEATURES), ITR_ERR_INPUT,
              "-features supports -method iteris, regmean and task_arithmetic, not '%s'", opt->m.method);
  }
  for (size_t i = 0; i < N_OPTS; i++)
    ITR_CHECK(!set[i] || option_used(i, opt->mode, use, method),
              ITR_ERR_INPUT, "option -%s is not used %s%s: remove it (see -help)", table_[i].name,
              opt->mode == ITR_MODE_MERGE ? "by -method " : opt->mode == ITR_MODE_FEATURES ? "with -features by -method " : "in this mode",
              opt->mode == ITR_MODE_MERGE || opt->mode == ITR_MODE_FEATURES ? opt->m.method : "");

  /* required options and value checks */
  if (opt->mode == ITR_MODE_LOGITS) {
    ITR_CHECK(opt->m.base[0], ITR_ERR_INPUT, "-logits needs -base DIR");
    ITR_CHECK(opt->logits_out[0], ITR_ERR_INPUT, "-logits needs -logits_out OUT.safetensors");
  }
  if (opt->mode == ITR_MODE_TRAIN) ITR_TRY(train_opts(opt));
  if (opt->mode == ITR_MODE_MERGE) {
    ITR_TRY(parse_groups("refine_train_only", opt->refine_train_only, &opt->refine_only));
    ITR_CHECK(!opt->refine_only || (opt->mixlora && opt->refine_steps > 0), ITR_ERR_INPUT,
              "-refine_train_only freezes groups of a composed MixLoRA adapter: it needs -method mixlora -refine_steps K");
  }
  if (opt->mode == ITR_MODE_ENSEMBLE) {
    ITR_CHECK(opt->m.base[0], ITR_ERR_INPUT, "-ensemble needs -base DIR");
    ITR_CHECK(opt->m.n_heldout == 1, ITR_ERR_INPUT, "-ensemble needs one -heldout FILE.jsonl (got %d)", opt->m.n_heldout);
    ITR_CHECK(opt->e.bins >= 1 && opt->e.bins <= 1000, ITR_ERR_INPUT, "-ece_bins must be in 1..1000, got %d", opt->e.bins);
    snprintf(opt->e.base, sizeof opt->e.base, "%s", opt->m.base);
    snprintf(opt->e.heldout, sizeof opt->e.heldout, "%s", opt->m.heldout[0]);
  }
  if (opt->mode == ITR_MODE_TOKENIZE) {
    ITR_CHECK(opt->m.base[0], ITR_ERR_INPUT, "-tokenize needs -base DIR (the model folder holding the tokenizer)");
    ITR_CHECK(opt->tokenize_out[0], ITR_ERR_INPUT, "-tokenize needs -tokenize_out OUT.jsonl");
  }
  if (opt->mode == ITR_MODE_MERGE || opt->mode == ITR_MODE_FEATURES) {
    ITR_CHECK(opt->m.base[0] || opt->mode == ITR_MODE_FEATURES, ITR_ERR_INPUT, "missing -base DIR (the Hugging Face model folder); see -help");
    ITR_CHECK(opt->m.n_adapters >= 1, ITR_ERR_INPUT, "missing -adapters D1,D2,... (PEFT adapter folders); see -help");
    ITR_CHECK(opt->m.out[0], ITR_ERR_INPUT, "missing -out DIR (where the merged adapter goes); see -help");
    ITR_TRY(normalize_out(opt->m.out));
    int needs_calib = opt->mode == ITR_MODE_MERGE && (method->flags & ITR_METHOD_STATS) != 0;
    if (needs_calib)
      ITR_CHECK(opt->m.n_calib == opt->m.n_adapters, ITR_ERR_INPUT,
                "-calib has %d file(s) but -adapters has %d: give one calibration file per adapter, same order",
                opt->m.n_calib, opt->m.n_adapters);
    else
      ITR_CHECK(opt->m.n_calib == 0 || opt->m.n_calib == opt->m.n_adapters, ITR_ERR_INPUT,
                "-calib has %d file(s) but -adapters has %d", opt->m.n_calib, opt->m.n_adapters);
    ITR_CHECK(opt->m.n_heldout == 0 || opt->m.n_heldout == opt->m.n_adapters, ITR_ERR_INPUT,
              "-heldout has %d file(s) but -adapters has %d: give one per adapter, same order", opt->m.n_heldout,
              opt->m.n_adapters);
    ITR_CHECK(opt->m.n_manual_coef == 0 || opt->m.n_manual_coef == opt->m.n_adapters, ITR_ERR_INPUT,
              "-manual_coef has %d value(s) but -adapters has %d", opt->m.n_manual_coef, opt->m.n_adapters);
    for (int i = 0; i < opt->m.n_manual_coef; i++)
      ITR_CHECK(opt->m.manual_coef[i] > 0, ITR_ERR_INPUT, "-manual_coef: weight %d is %g; weights must be > 0", i + 1,
                opt->m.manual_coef[i]);
    if (opt->m.n_manual_coef == 0)
      for (int i = 0; i < opt->m.n_adapters; i++) opt->m.manual_coef[i] = 1.0;
    ITR_CHECK(opt->m.block_size >= 16 && opt->m.block_size <= 1024, ITR_ERR_INPUT,
              "-block_size must be in 16..1024, got %d", opt->m.block_size);
    itr_gram_exchange how;
    ITR_CHECK(itr_dist_gram_exchange_parse(opt->m.gram_exchange, &how), ITR_ERR_INPUT,
              "-gram_exchange must be auto, columns or partial, got '%s'", opt->m.gram_exchange);
    const char *sy = opt->m.system;
    ITR_CHECK(!strcmp(sy, "auto") || !strcmp(sy, "inputs") || !strcmp(sy, "tokens"), ITR_ERR_INPUT,
              "-system must be auto, inputs or tokens, got '%s'", sy);
    ITR_CHECK(strcmp(sy, "tokens") || (!opt->m.with_pretrain && opt->m.solve_groups == 1 && opt->m.alpha_2 > 0 &&
                                       (strcmp(opt->m.method, "regmean") || opt->m.regmean_alpha == 1.0)),
              ITR_ERR_INPUT,
              "-system tokens needs a system that is a Gram of rows plus a ridge: -alpha_2 > 0, no -with_pretrain, "
              "-solve_groups 1 and (RegMean) -regmean_alpha 1; use -system auto or inputs");
    ITR_CHECK(opt->m.solve_groups >= 1 && opt->m.solve_groups <= ITR_MAX_TASKS, ITR_ERR_INPUT,
              "-solve_groups must be in 1..%d, got %d", ITR_MAX_TASKS, opt->m.solve_groups);
    ITR_CHECK(opt->m.stages >= 1 && opt->m.stages <= ITR_MAX_TASKS, ITR_ERR_INPUT, "-stages must be in 1..%d, got %d",
              ITR_MAX_TASKS, opt->m.stages);
    ITR_CHECK(opt->m.max_iter >= 1, ITR_ERR_INPUT, "-max_iter must be at least 1, got %d", opt->m.max_iter);
    ITR_CHECK(opt->m.alpha_1 >= 0 && opt->m.alpha_2 >= 0, ITR_ERR_INPUT, "-alpha_1 and -alpha_2 must be >= 0");
    /* relative ridges (times a Frobenius norm): above 1e6 the Gram no longer counts and float64 overflows */
    ITR_CHECK(opt->m.alpha_1 <= 1e6 && opt->m.alpha_2 <= 1e6, ITR_ERR_INPUT,
              "-alpha_1 %g / -alpha_2 %g: these are ridges relative to a Gram's Frobenius norm, in [0, 1e6] (the "
              "default is 1e-7; 1e-3 is already a strong ridge)",
              opt->m.alpha_1, opt->m.alpha_2);
    ITR_CHECK(opt->m.reg_coef >= 0 && opt->m.reg_coef <= 1, ITR_ERR_INPUT, "-reg_coef must be in [0, 1], got %g",
              opt->m.reg_coef);
    ITR_CHECK(opt->m.density > 0 && opt->m.density <= 1, ITR_ERR_INPUT, "-density must be in (0, 1], got %g", opt->m.density);
    ITR_CHECK(opt->m.dare_p >= 0 && opt->m.dare_p < 1, ITR_ERR_INPUT, "-dare_p must be in [0, 1), got %g", opt->m.dare_p);
    ITR_CHECK(!(method->flags & ITR_METHOD_DENSE) || opt->m.out_rank > 0, ITR_ERR_INPUT,
              "-method %s gives a dense (full-rank) update: give -out_rank k to write it as a LoRA of rank k",
              opt->m.method);
    ITR_CHECK(!opt->m.with_pretrain || opt->m.out_rank > 0, ITR_ERR_INPUT,
              "-with_pretrain 1 gives a full-rank update: give -out_rank k to write it as a LoRA of rank k");
    ITR_CHECK(strcmp(opt->m.out_dtype, "F32") == 0 || strcmp(opt->m.out_dtype, "BF16") == 0 ||
                  strcmp(opt->m.out_dtype, "F16") == 0 || strcmp(opt->m.out_dtype, "F64") == 0,
              ITR_ERR_INPUT, "-out_dtype must be F32, BF16, F16 or F64, got '%s'", opt->m.out_dtype);
  }
  return ITR_OK;
}
