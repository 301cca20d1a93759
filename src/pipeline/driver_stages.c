/* Pipeline stages (-stages S): the ranks form S process groups; stage g holds the contiguous layers
 * [lo_g, hi_g), maps only their tensors, shares each task's calibration sequences out over its own
 * ranks, forms the statistics of its modules on its own BLACS grid and solves them there.
 *
 * Activations: when stage g has run the last of its layers in iteration k, it sends the hidden
 * states to stage g+1 (each sequence from its owner in g to its owner in g+1): the source model's
 * in the first iteration of the run only (they are the same every iteration; the receiver keeps
 * them), and the merged model's from iteration 2 on. Stage g then solves and goes on to iteration
 * k+1 at once: the merged model of its layers needs only its own updates, so the stages work at
 * the same time on different iterations (a wavefront) and block only on their input.
 *
 * Messages (on a duplicate of the world communicator, so nothing else can match them):
 *   TAG_HDR  stage g's first rank -> every rank of g+1, before each transfer: {code, k, kinds, msg}.
 *            A header with an error code ends the transfers: stage g stopped.
 *   TAG_DATA the rows, one message (in chunks) per task, kind and pair of ranks that share rows.
 *   TAG_UP   stage g+1's first rank -> stage g's first rank, exactly once per run: "done", or
 *            "stopped with this error" (stage g then stops at its next layer boundary), with the
 *            number of TAG_PROG messages sent before it.
 *   TAG_PROG stage g+1's first rank -> stage g's first rank after each of its iterations: the
 *            last iteration that stage g+1 and every stage after it have checkpointed.
 * A stage that stops sends one message upstream, receives (and drops) what its upstream still
 * sends until that one stops too, sends an error header downstream, and waits for the one message
 * from downstream: every stage ends its part of the run in finite time, whichever stage failed
 * first, and then all ranks agree on the first error, verbatim.
 *
 * Checkpoints: each stage writes its updates after each of its iterations
 * (checkpoint_write_stage); -restart resumes every stage after the last iteration that every
 * stage finished. A stage keeps its files from min(k - 1, what the later stages reported) on: an
 * earlier stage has always started the iteration a later one finished, so it has finished the one
 * before, and the newest iteration that all stages have is always kept by all. At the end every stage broadcasts its layers' updates, weights and residuals to
 * all ranks, which then evaluate and write as without stages. */
#include <petscsys.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/pipeline_internal.h"
#include "iteris/pipeline.h"

enum { TAG_HDR = 7101, TAG_DATA = 7102, TAG_UP = 7103, TAG_PROG = 7104 };
enum { KIND_SRC = 1, KIND_MRG = 2 };
#define LINK_MSG_CAP 2048
#define CHUNK_FLOATS ((size_t)1 << 28) /* 1 GiB per message: counts stay ints */

typedef struct {
  int code, k, kinds;
  char msg[LINK_MSG_CAP];
} link_msg;

struct merge_stages {
  MPI_Comm stage_comm;           /* this stage's ranks (c->comm during the run) */
  MPI_Comm link;                 /* a duplicate of the world: messages between stages */
  int first[ITR_MAX_TASKS + 1];  /* first world rank of each stage; first[S] = P */
  int *own[ITR_MAX_TASKS][3];    /* stage-local owner of each sequence: previous stage, this one, next one */
  float *h_in[ITR_MAX_TASKS];    /* g > 0: the source model's hidden states entering this stage */
  float *sbuf[ITR_MAX_TASKS][2]; /* packed rows in flight to the next stage, per kind */
  float *rbuf;                   /* received rows before they are put in sequence order */
  MPI_Request *req;              /* sends in flight to the next stage */
  int n_req, cap_req;
  MPI_Request up_req;            /* the one message upstream */
  link_msg hdr_out, up_out;
  int sent_upto, recv_upto;      /* last iteration sent downstream / received from upstream */
  int up_closed;                 /* the previous stage sends nothing more */
  int down_heard;                /* (first rank) the next stage's one message has arrived */
  int down_count;                /* (first rank) progress messages it said it sent before */
  int *prog_out;                 /* (first rank, g > 0) progress sent upstream, one per iteration */
  MPI_Request *prog_req;
  int n_prog_sent, n_prog_recv;
  int down_progress;             /* (first rank) last iteration checkpointed by every later stage */
  int trimmed;                   /* (first rank) this stage's files of iterations <= trimmed are removed */
  int ckpt_done;                 /* (first rank) the last iteration this stage checkpointed */
  int reported;                  /* (first rank, g > 0) the last progress sent upstream */
};

static int stage_size(const merge_stages *st, int g) { return st->first[g + 1] - st->first[g]; }


/* ---- setup ------------------------------------------------------------------------------------- */

/* Number of float messages (chunks) for n floats. */
static int n_chunks(size_t n) { return n == 0 ? 0 : (int)((n + CHUNK_FLOATS - 1) / CHUNK_FLOATS); }

/* Tokens of the sequences owned by rank p of one stage (oa) and rank q of the other (ob). */
static int64_t shared_rows(const itr_token_set *ts, const int *oa, int p, const int *ob, int q) {
  int64_t n = 0;
  for (int s = 0; s < ts->n_seqs; s++)
    if (oa[s] == p && ob[s] == q) n += ts->offsets[s + 1] - ts->offsets[s];
  return n;
}

/* Owners of ts's sequences in the previous stage, this one and the next ([0], [1], [2]; NULL where
 * there is no such stage), each stage sharing them out over its own ranks. */
static itr_err neighbour_owners(const merge_ctx *c, const itr_token_set *ts, int *own[3]) {
  const size_t n = (size_t)(ts->n_seqs ? ts->n_seqs : 1);
  for (int w = 0; w < 3; w++) {
    const int h = c->stage - 1 + w;
    if (h < 0 || h >= c->n_stages) continue;
    ITR_TRY(itr_calloc(n, sizeof(int), "sequence owners", &own[w]));
    ITR_TRY(merge_shard_owners(ts, stage_size(c->st, h), own[w]));
  }
  return ITR_OK;
}

static itr_err stages_alloc(merge_ctx *c, merge_stages *st) {
  const int g = c->stage, S = c->n_stages, N = c->N;
  const int64_t D = c->cfg.hidden_size;
  int64_t max_T = 1;
  for (int i = 0; i < N; i++) {
    const itr_token_set *ts = &c->calib[i];
    ITR_TRY(neighbour_owners(c, ts, st->own[i]));
    int64_t T = 0;
    for (int s = 0; s < ts->n_seqs; s++)
      if (st->own[i][1][s] == c->rank) T += ts->offsets[s + 1] - ts->offsets[s];
    if (T > max_T) max_T = T;
    const size_t nf = (size_t)(T ? T : 1) * (size_t)D;
    if (g > 0) ITR_TRY(itr_calloc(nf, sizeof(float), "hidden states entering the stage", &st->h_in[i]));
    if (g < S - 1)
      for (int kind = 0; kind < 2; kind++) ITR_TRY(itr_calloc(nf, sizeof(float), "activations in flight", &st->sbuf[i][kind]));
    /* requests: every chunk of every (kind, next rank) message */
    if (g < S - 1)
      for (int q = 0; q < stage_size(st, g + 1); q++)
        st->cap_req += 2 * n_chunks((size_t)shared_rows(ts, st->own[i][1], c->rank, st->own[i][2], q) * (size_t)D);
  }
  if (g > 0) ITR_TRY(itr_calloc((size_t)max_T * (size_t)D, sizeof(float), "received activations", &st->rbuf));
  if (g < S - 1) st->cap_req += stage_size(st, g + 1); /* headers */
  ITR_TRY(itr_calloc((size_t)(st->cap_req ? st->cap_req : 1), sizeof(MPI_Request), "send requests", &st->req));
  const size_t K1 = (size_t)merge_n_iters(c) + 1;
  ITR_TRY(itr_calloc(K1, sizeof(int), "progress messages", &st->prog_out));
  ITR_TRY(itr_calloc(K1, sizeof(MPI_Request), "progress requests", &st->prog_req));
  return ITR_OK;
}

itr_err merge_stages_setup(merge_ctx *c) {
  const int S = c->opt->stages, L = c->cfg.num_hidden_layers;
  c->n_stages = 1;
  c->stage = 0;
  c->layer_lo = 0;
  c->layer_hi = L;
  if (S <= 1) return ITR_OK;
  ITR_CHECK(S <= c->wsize, ITR_ERR_INPUT, "-stages %d needs at least %d ranks, this run has %d: lower -stages or run more ranks",
            S, S, c->wsize);
  ITR_CHECK(S <= L, ITR_ERR_INPUT, "-stages %d is more than the %d layers of '%s': give at most %d", S, L, c->opt->base, L);
  merge_stages *st = NULL;
  ITR_TRY(itr_dist_agree(c->world, itr_calloc(1, sizeof *st, "pipeline stages", &st)));
  c->st = st;
  st->stage_comm = st->link = MPI_COMM_NULL;
  st->up_req = MPI_REQUEST_NULL;
  for (int g = 0; g <= S; g++) st->first[g] = itr_dist_group_first(g, S, c->wsize);
  int g = 0;
  while (c->wrank >= st->first[g + 1]) g++;
  c->n_stages = S;
  c->stage = g;
  merge_stage_layers(g, S, L, &c->layer_lo, &c->layer_hi);
  ITR_CHECK(MPI_Comm_split(c->world, g, c->wrank, &st->stage_comm) == MPI_SUCCESS &&
                MPI_Comm_dup(c->world, &st->link) == MPI_SUCCESS,
            ITR_ERR_INTERNAL, "cannot make the communicators of the pipeline stages");
  c->comm = st->stage_comm;
  (void)MPI_Comm_rank(c->comm, &c->rank);
  (void)MPI_Comm_size(c->comm, &c->size);
  itr_err e = ITR_OK;
  if (c->method->flags & ITR_METHOD_STATS) e = stages_alloc(c, st);
  ITR_TRY(itr_dist_agree(c->world, e));
  char line[1024];
  int n = snprintf(line, sizeof line, "%d pipeline stages (ranks: layers):", S);
  for (int h = 0; h < S && n < (int)sizeof line; h++) {
    int lo, hi;
    merge_stage_layers(h, S, L, &lo, &hi);
    n += snprintf(line + n, sizeof line - (size_t)n, " %d-%d: %d-%d%s", st->first[h], st->first[h + 1] - 1, lo + 1,
                  hi, h + 1 < S ? "," : "");
  }
  itr_log(ITR_LOG_INFO, "%s", line);
  return ITR_OK;
}

void merge_stages_fini(merge_ctx *c) {
  merge_stages *st = c->st;
  if (!st) return;
  for (int i = 0; i < ITR_MAX_TASKS; i++) {
    for (int w = 0; w < 3; w++) free(st->own[i][w]);
    free(st->h_in[i]);
    free(st->sbuf[i][0]);
    free(st->sbuf[i][1]);
  }
  free(st->rbuf);
  free(st->req);
  free(st->prog_out);
  free(st->prog_req);
  if (st->stage_comm != MPI_COMM_NULL) (void)MPI_Comm_free(&st->stage_comm);
  if (st->link != MPI_COMM_NULL) (void)MPI_Comm_free(&st->link);
  free(st);
  c->st = NULL;
}

/* ---- activations between stages ----------------------------------------------------------------- */

/* Copies the rows of the sequences that rank p of the sending stage (owners oa) and rank q of the
 * receiving one (ob) share, between the sender's shard order (h) and a packed buffer; dir > 0
 * packs (h -> buf), dir < 0 unpacks on the receiver (buf -> h, h in q's shard order). Returns the
 * number of floats. */
static size_t copy_rows(const itr_token_set *ts, const int *oa, int p, const int *ob, int q, int64_t D, float *h,
                        float *buf, int dir) {
  const int *mine = dir > 0 ? oa : ob;
  const int me = dir > 0 ? p : q;
  int64_t off = 0;
  size_t w = 0;
  for (int s = 0; s < ts->n_seqs; s++) {
    const int64_t len = ts->offsets[s + 1] - ts->offsets[s];
    if (mine[s] != me) continue;
    if (oa[s] == p && ob[s] == q) {
      const size_t n = (size_t)len * (size_t)D;
      if (dir > 0)
        memcpy(buf + w, h + off * D, n * sizeof(float));
      else
        memcpy(h + off * D, buf + w, n * sizeof(float));
      w += n;
    }
    off += len;
  }
  return w;
}

/* n floats to dest in CHUNK_FLOATS messages, one request each appended to req[*n_req...]. */
static void isend_chunks(MPI_Comm link, const float *buf, size_t n, int dest, MPI_Request *req, int *n_req) {
  for (size_t o = 0; o < n; o += CHUNK_FLOATS) {
    const size_t m = n - o < CHUNK_FLOATS ? n - o : CHUNK_FLOATS;
    (void)MPI_Isend(buf + o, (int)m, MPI_FLOAT, dest, TAG_DATA, link, &req[(*n_req)++]);
  }
}

/* The n floats isend_chunks sent from src. */
static void recv_chunks(MPI_Comm link, float *buf, size_t n, int src) {
  for (size_t o = 0; o < n; o += CHUNK_FLOATS) {
    const size_t m = n - o < CHUNK_FLOATS ? n - o : CHUNK_FLOATS;
    (void)MPI_Recv(buf + o, (int)m, MPI_FLOAT, src, TAG_DATA, link, MPI_STATUS_IGNORE);
  }
}

static void wait_sends(merge_stages *st) {
  if (st->n_req) (void)MPI_Waitall(st->n_req, st->req, MPI_STATUSES_IGNORE);
  st->n_req = 0;
}

/* Sends this stage's output hidden states of iteration k (the kinds asked) to the next stage.
 * Cannot fail: every buffer and request slot was made at setup. */
static void send_down(merge_ctx *c, int k, int kinds) {
  merge_stages *st = c->st;
  const int g = c->stage, nq = stage_size(st, g + 1);
  const int64_t D = c->cfg.hidden_size;
  wait_sends(st); /* the previous iteration's rows have left these buffers */
  st->hdr_out.code = ITR_OK;
  st->hdr_out.k = k;
  st->hdr_out.kinds = kinds;
  st->hdr_out.msg[0] = '\0';
  if (c->rank == 0)
    for (int q = 0; q < nq; q++)
      (void)MPI_Isend(&st->hdr_out, (int)sizeof st->hdr_out, MPI_BYTE, st->first[g + 1] + q, TAG_HDR, st->link,
                &st->req[st->n_req++]);
  for (int kind = 0; kind < 2; kind++) {
    if (!(kinds & (1 << kind))) continue;
    for (int i = 0; i < c->N; i++) {
      float *h = kind == 0 ? c->h_src[i] : c->h_mrg[i], *buf = st->sbuf[i][kind];
      size_t w = 0;
      for (int q = 0; q < nq; q++) {
        size_t n = copy_rows(&c->calib[i], st->own[i][1], c->rank, st->own[i][2], q, D, h, buf + w, 1);
        isend_chunks(st->link, buf + w, n, st->first[g + 1] + q, st->req, &st->n_req);
        w += n;
      }
    }
  }
  st->sent_upto = k;
}

/* Tells the next stage that this one stopped (in place of its next transfer). */
static void send_stop_down(merge_ctx *c, itr_err e) {
  merge_stages *st = c->st;
  const int g = c->stage;
  wait_sends(st);
  st->hdr_out.code = (int)e;
  st->hdr_out.k = st->sent_upto + 1;
  st->hdr_out.kinds = 0;
  snprintf(st->hdr_out.msg, sizeof st->hdr_out.msg, "%s", itr_error_message());
  if (c->rank == 0)
    for (int q = 0; q < stage_size(st, g + 1); q++)
      (void)MPI_Isend(&st->hdr_out, (int)sizeof st->hdr_out, MPI_BYTE, st->first[g + 1] + q, TAG_HDR, st->link,
                &st->req[st->n_req++]);
  st->sent_upto = merge_n_iters(c);
}

/* Receives the previous stage's next transfer into h_src / h_mrg. Returns its header (an error
 * code there: the previous stage stopped, and sends nothing more). Every rank of the stage gets
 * the same header. */
static link_msg *recv_up(merge_ctx *c, link_msg *hdr) {
  merge_stages *st = c->st;
  const int g = c->stage, np = stage_size(st, g - 1);
  const int64_t D = c->cfg.hidden_size;
  (void)MPI_Recv(hdr, (int)sizeof *hdr, MPI_BYTE, st->first[g - 1], TAG_HDR, st->link, MPI_STATUS_IGNORE);
  hdr->msg[LINK_MSG_CAP - 1] = '\0';
  if (hdr->code != ITR_OK) {
    st->up_closed = 1;
    return hdr;
  }
  for (int kind = 0; kind < 2; kind++) {
    if (!(hdr->kinds & (1 << kind))) continue;
    for (int i = 0; i < c->N; i++) {
      float *h = kind == 0 ? c->h_src[i] : c->h_mrg[i];
      size_t w = 0;
      for (int p = 0; p < np; p++) {
        const size_t n = (size_t)shared_rows(&c->calib[i], st->own[i][0], p, st->own[i][1], c->rank) * (size_t)D;
        recv_chunks(st->link, st->rbuf + w, n, st->first[g - 1] + p);
        copy_rows(&c->calib[i], st->own[i][0], p, st->own[i][1], c->rank, D, h, st->rbuf + w, -1);
        w += n;
      }
    }
  }
  st->recv_upto = hdr->k;
  if (hdr->k >= merge_n_iters(c)) st->up_closed = 1;
  return hdr;
}

/* The hidden states entering this stage's first layer in iteration k. */
static itr_err stage_inputs(merge_ctx *c, int k) {
  merge_stages *st = c->st;
  const int64_t D = c->cfg.hidden_size;
  const int first_iter = k == c->start_iter;
  if (c->stage == 0) {
    itr_err e = merge_embed_all(c, c->h_src);
    if (e == ITR_OK && k >= 2) e = merge_embed_all(c, c->h_mrg);
    return itr_dist_agree(c->comm, e);
  }
  link_msg hdr;
  recv_up(c, &hdr);
  if (hdr.code != ITR_OK) return itr_error_set((itr_err)hdr.code, "%s", hdr.msg);
  const int want = (first_iter ? KIND_SRC : 0) | (k >= 2 ? KIND_MRG : 0);
  ITR_CHECK(hdr.k == k && hdr.kinds == want, ITR_ERR_INTERNAL,
            "stage %d expected the activations of iteration %d (kinds %d) and got iteration %d (kinds %d)", c->stage + 1,
            k, want, hdr.k, hdr.kinds);
  for (int i = 0; i < c->N; i++) {
    const size_t n = (size_t)c->calib_sh[i].T * (size_t)D * sizeof(float);
    if (first_iter)
      memcpy(st->h_in[i], c->h_src[i], n);
    else
      memcpy(c->h_src[i], st->h_in[i], n);
  }
  return ITR_OK;
}

/* (first rank, not the last stage) Receives the next stage's progress messages: those already
 * there (until < 0), or until `until` have arrived. */
static void recv_progress(merge_ctx *c, int until) {
  merge_stages *st = c->st;
  if (c->stage == c->n_stages - 1) return;
  for (;;) {
    if (until >= 0 && st->n_prog_recv >= until) return;
    int flag = 1, v = 0;
    if (until < 0) (void)MPI_Iprobe(st->first[c->stage + 1], TAG_PROG, st->link, &flag, MPI_STATUS_IGNORE);
    if (!flag) return;
    (void)MPI_Recv(&v, 1, MPI_INT, st->first[c->stage + 1], TAG_PROG, st->link, MPI_STATUS_IGNORE);
    st->n_prog_recv++;
    if (v > st->down_progress) st->down_progress = v;
  }
}

/* (first rank) Takes in the next stage's progress, tells the previous stage when the last
 * iteration checkpointed by this stage and every later one has moved on, and removes the files no
 * restart can need. */
static void progress_update(merge_ctx *c) {
  merge_stages *st = c->st;
  const int last = c->stage == c->n_stages - 1, b = st->ckpt_done;
  recv_progress(c, -1);
  const int later = last || b < st->down_progress ? b : st->down_progress;
  if (c->stage > 0 && later > st->reported) { /* strictly increasing: at most max_iter messages */
    st->prog_out[st->n_prog_sent] = later;
    (void)MPI_Isend(&st->prog_out[st->n_prog_sent], 1, MPI_INT, st->first[c->stage - 1], TAG_PROG, st->link,
              &st->prog_req[st->n_prog_sent]);
    st->n_prog_sent++;
    st->reported = later;
  }
  const int keep = later < b - 1 ? later : b - 1;
  while (st->trimmed + 1 < keep) checkpoint_remove_stage(c, ++st->trimmed);
}

/* At a layer boundary (before layer l of iteration k): a signal, or the next stage's message
 * that it stopped, stops this stage. The first rank's view is shared with the stage. */
static itr_err stage_check(merge_ctx *c, int k, int l) {
  merge_stages *st = c->st;
  link_msg m;
  m.code = ITR_OK;
  m.msg[0] = '\0';
  if (c->rank == 0 && c->stage < c->n_stages - 1 && !st->down_heard) {
    int flag = 0;
    (void)MPI_Iprobe(st->first[c->stage + 1], TAG_UP, st->link, &flag, MPI_STATUS_IGNORE);
    if (flag) {
      (void)MPI_Recv(&m, (int)sizeof m, MPI_BYTE, st->first[c->stage + 1], TAG_UP, st->link, MPI_STATUS_IGNORE);
      m.msg[LINK_MSG_CAP - 1] = '\0';
      st->down_heard = 1;
      st->down_count = m.k;
    }
  }
  if (c->rank == 0 && (c->method->flags & ITR_METHOD_ITERATES)) progress_update(c);
  const int sig = merge_stop_agree(c, k, l);
  (void)MPI_Bcast(&m, (int)sizeof m, MPI_BYTE, 0, c->comm);
  if (m.code != ITR_OK) return itr_error_set((itr_err)m.code, "%s", m.msg);
  if (sig)
    return itr_error_set(ITR_ERR_INTERRUPTED,
                         "stopped by signal %d in iteration %d (stage %d of %d); every finished iteration is "
                         "checkpointed in %s.partial/: rerun the same command with -restart 1 to continue",
                         sig, k, c->stage + 1, c->n_stages, c->opt->out);
  return ITR_OK;
}

/* ---- the run ------------------------------------------------------------------------------------ */

static itr_err stage_loop(merge_ctx *c) {
  const int K = merge_n_iters(c), S = c->n_stages, g = c->stage;
  const int lo = c->layer_lo, hi = c->layer_hi;
  const int total = (K - c->start_iter + 1) * (hi - lo);
  const double t0 = itr_wtime();
  int done = 0;
  for (int k = c->start_iter; k <= K; k++) {
    const double tw = itr_wtime();
    itr_err ei = stage_inputs(c, k);
    if (g > 0) c->stage_secs[g][1] += itr_wtime() - tw; /* the first stage embeds: no waiting */
    ITR_TRY(ei);
    const int kinds = (k == c->start_iter ? KIND_SRC : 0) | (k >= 2 ? KIND_MRG : 0);
    for (int l = lo; l < hi; l++) {
      double tl = itr_wtime(), max_resid = 0;
      PetscLogStagePush(c->stage_forward);
      itr_err e = merge_forward_layer(c, k, l);
      PetscLogStagePop();
      ITR_TRY(itr_dist_agree(c->comm, e));
      if (l == hi - 1 && g < S - 1) send_down(c, k, kinds); /* the next stage can start while this one solves */
      ITR_TRY(merge_solve_layer(c, k, l, &max_resid));
      merge_progress(c, k, l, itr_wtime() - tl, max_resid, ++done, total, t0);
      if (l + 1 < hi) ITR_TRY(stage_check(c, k, l + 1));
    }
    itr_err ec = ITR_OK;
    for (int l = lo; l < hi; l++)
      for (int m = 0; m < c->arch.n_modules && ec == ITR_OK; m++) ec = merge_commit_update(c, k, SLOT(l, m));
    ITR_TRY(itr_dist_agree(c->comm, ec));
    ITR_TRY(itr_dist_agree(c->comm, merge_rebuild_lora(c)));
    c->iters_done = k;
    if (c->method->flags & ITR_METHOD_ITERATES) {
      ITR_TRY(itr_dist_agree(c->comm, c->rank == 0 ? checkpoint_write_stage(c, k) : ITR_OK));
      if (c->rank == 0) {
        c->st->ckpt_done = k;
        progress_update(c);
      }
    }
    if (k < K) ITR_TRY(stage_check(c, k + 1, lo));
  }
  return ITR_OK;
}

/* Ends this stage's part of the run, whatever happened (see the top of the file). */
static void stage_finish(merge_ctx *c, itr_err e) {
  merge_stages *st = c->st;
  const int g = c->stage, S = c->n_stages, K = merge_n_iters(c);
  if (g > 0 && c->rank == 0) {
    st->up_out.code = (int)e;
    st->up_out.k = st->n_prog_sent;
    st->up_out.kinds = 0;
    snprintf(st->up_out.msg, sizeof st->up_out.msg, "%s", e == ITR_OK ? "" : itr_error_message());
    (void)MPI_Isend(&st->up_out, (int)sizeof st->up_out, MPI_BYTE, st->first[g - 1], TAG_UP, st->link, &st->up_req);
  }
  if (g > 0) {
    link_msg hdr;
    while (!st->up_closed) recv_up(c, &hdr); /* drop what the previous stage still sends */
  }
  if (g < S - 1 && st->sent_upto < K) send_stop_down(c, e);
  if (g < S - 1 && c->rank == 0 && !st->down_heard) {
    link_msg m;
    (void)MPI_Recv(&m, (int)sizeof m, MPI_BYTE, st->first[g + 1], TAG_UP, st->link, MPI_STATUS_IGNORE);
    st->down_heard = 1;
    st->down_count = m.k;
  }
  if (g < S - 1 && c->rank == 0) recv_progress(c, st->down_count);
  wait_sends(st);
  if (st->n_prog_sent) (void)MPI_Waitall(st->n_prog_sent, st->prog_req, MPI_STATUSES_IGNORE);
  if (st->up_req != MPI_REQUEST_NULL) (void)MPI_Wait(&st->up_req, MPI_STATUS_IGNORE);
}

/* Broadcasts update u from world rank root to every rank. */
static itr_err bcast_update(merge_ctx *c, itr_update *u, int root, int64_t d_out, int64_t d_in) {
  int64_t hd[2] = {u->rank, u->dense != NULL};
  if (MPI_Bcast(hd, 2, MPI_INT64_T, root, c->world) != 0) return itr_error_set(ITR_ERR_INTERNAL, "MPI_Bcast of an update failed");
  if (hd[0] == 0 && !hd[1]) return ITR_OK;
  itr_err e = ITR_OK;
  if (c->wrank != root) {
    itr_update_fini(u);
    u->d_out = d_out;
    u->d_in = d_in;
    u->rank = hd[0];
    u->energy_kept = 1;
    if (hd[0] > 0) {
      e = itr_calloc((size_t)(hd[0] * d_in), sizeof(double), "gathered A", &u->A);
      if (e == ITR_OK) e = itr_calloc((size_t)(hd[0] * d_out), sizeof(double), "gathered B", &u->B);
    } else {
      e = itr_calloc((size_t)(d_out * d_in), sizeof(double), "gathered dense update", &u->dense);
    }
  }
  ITR_TRY(itr_dist_agree(c->world, e));
  const int64_t nA = hd[0] * d_in, nB = hd[0] * d_out, nD = d_out * d_in;
  int ok = 1;
  for (int64_t o = 0; hd[0] > 0 && o < nA; o += (int64_t)CHUNK_FLOATS)
    ok &= MPI_Bcast(u->A + o, (int)(nA - o < (int64_t)CHUNK_FLOATS ? nA - o : (int64_t)CHUNK_FLOATS), MPI_DOUBLE, root, c->world) == 0;
  for (int64_t o = 0; hd[0] > 0 && o < nB; o += (int64_t)CHUNK_FLOATS)
    ok &= MPI_Bcast(u->B + o, (int)(nB - o < (int64_t)CHUNK_FLOATS ? nB - o : (int64_t)CHUNK_FLOATS), MPI_DOUBLE, root, c->world) == 0;
  for (int64_t o = 0; hd[0] == 0 && o < nD; o += (int64_t)CHUNK_FLOATS)
    ok &= MPI_Bcast(u->dense + o, (int)(nD - o < (int64_t)CHUNK_FLOATS ? nD - o : (int64_t)CHUNK_FLOATS), MPI_DOUBLE, root, c->world) == 0;
  return ok ? ITR_OK : itr_error_set(ITR_ERR_INTERNAL, "MPI_Bcast of an update failed");
}

/* Every rank gets every layer's updates, adaptive weights and residuals; comm becomes the world. */
static itr_err gather(merge_ctx *c) {
  merge_stages *st = c->st;
  const int L = c->cfg.num_hidden_layers, S = c->n_stages, N = c->N;
  const int K = merge_n_iters(c);
  for (int h = 0; h < S; h++) {
    int lo, hi;
    merge_stage_layers(h, S, L, &lo, &hi);
    for (int l = lo; l < hi; l++)
      for (int m = 0; m < c->arch.n_modules; m++) {
        if (!TARGETED(c, m)) continue;
        int64_t d_out, d_in;
        d_out = c->arch.module[m].d_out, d_in = c->arch.module[m].d_in;
        ITR_TRY(bcast_update(c, &c->cur[SLOT(l, m)], st->first[h], d_out, d_in));
      }
  }
  /* weights and residuals: each stage's first rank contributes its layers' entries */
  const size_t nslots = NSLOTS(c);
  const int contributes = c->rank == 0;
  for (size_t q = 0; q < nslots; q++) {
    const int l = (int)(q / (size_t)c->arch.n_modules), mine = contributes && l >= c->layer_lo && l < c->layer_hi;
    if (mine) continue;
    for (int i = 0; i < N; i++) c->coef[q * (size_t)N + (size_t)i] = 0;
    for (int k = 0; k < K; k++) c->resid[(size_t)k * nslots + q] = c->change[(size_t)k * nslots + q] = 0;
  }
  for (int h = 0; h < S; h++)
    if (h != c->stage || !contributes) c->stage_secs[h][0] = c->stage_secs[h][1] = 0.0;
  if (MPI_Allreduce(MPI_IN_PLACE, c->coef, (int)(nslots * (size_t)N), MPI_DOUBLE, MPI_SUM, c->world) != 0 ||
      MPI_Allreduce(MPI_IN_PLACE, c->resid, (int)(nslots * (size_t)K), MPI_DOUBLE, MPI_SUM, c->world) != 0 ||
      MPI_Allreduce(MPI_IN_PLACE, c->change, (int)(nslots * (size_t)K), MPI_DOUBLE, MPI_SUM, c->world) != 0 ||
      MPI_Allreduce(MPI_IN_PLACE, c->stage_secs, 2 * S, MPI_DOUBLE, MPI_SUM, c->world) != 0)
    return itr_error_set(ITR_ERR_INTERNAL, "MPI_Allreduce of the weights and residuals failed");
  c->iters_done = K;
  for (int h = 0; h < S; h++) {
    int lo, hi;
    merge_stage_layers(h, S, L, &lo, &hi);
    itr_log(ITR_LOG_INFO, "stage %d/%d (ranks %d-%d, layers %d-%d): %.1f s, %.1f s of it waiting for activations", h + 1,
            S, st->first[h], st->first[h + 1] - 1, lo + 1, hi, c->stage_secs[h][0], c->stage_secs[h][1]);
  }
  return itr_dist_agree(c->world, merge_rebuild_lora(c));
}

/* -heldout through the pipeline: each stage runs the base, task and merged models of its own
 * layers on the held-out states it receives, in one pass; the last stage computes the logits. All
 * buffers are made (and agreed on by all ranks) before the first transfer, so a transfer is never
 * left half done: a stage that fails sends an error header instead of its rows. */
static itr_err stages_evaluate(merge_ctx *c) {
  merge_stages *st = c->st;
  const int g = c->stage, S = c->n_stages, N = c->N;
  const int64_t D = c->cfg.hidden_size;
  itr_shard sh[ITR_MAX_TASKS];
  float *h[ITR_MAX_TASKS][3];
  int *own[ITR_MAX_TASKS][3];
  float *sbuf = NULL, *rbuf = NULL;
  MPI_Request *req = NULL;
  int n_req = 0, cap = 1;
  link_msg hdr;
  memset(sh, 0, sizeof sh);
  memset(h, 0, sizeof h);
  memset(own, 0, sizeof own);
  memset(&hdr, 0, sizeof hdr);
  itr_err e = merge_eval_alloc(c, sh, h);
  int64_t T_all = 0, T_max = 1;
  for (int i = 0; i < N && e == ITR_OK; i++) {
    e = neighbour_owners(c, &c->heldout[i], own[i]);
    T_all += sh[i].T;
    if (sh[i].T > T_max) T_max = sh[i].T;
    if (g < S - 1 && e == ITR_OK)
      for (int q = 0; q < stage_size(st, g + 1); q++)
        cap += 3 * n_chunks((size_t)shared_rows(&c->heldout[i], own[i][1], c->rank, own[i][2], q) * (size_t)D);
  }
  if (e == ITR_OK && g < S - 1) {
    cap += stage_size(st, g + 1);
    e = itr_calloc((size_t)(3 * T_all + 1) * (size_t)D, sizeof(float), "held-out activations in flight", &sbuf);
    if (e == ITR_OK) e = itr_calloc((size_t)cap, sizeof(MPI_Request), "send requests", &req);
  }
  if (e == ITR_OK && g > 0) e = itr_calloc((size_t)T_max * (size_t)D, sizeof(float), "received activations", &rbuf);
  e = itr_dist_agree(c->world, e);
  const int go = e == ITR_OK; /* the same on all ranks: a stage sends exactly when the next one receives */
  if (go && g > 0) { /* the previous stage's states, or its error */
    (void)MPI_Recv(&hdr, (int)sizeof hdr, MPI_BYTE, st->first[g - 1], TAG_HDR, st->link, MPI_STATUS_IGNORE);
    hdr.msg[LINK_MSG_CAP - 1] = '\0';
    if (hdr.code != ITR_OK) e = itr_error_set((itr_err)hdr.code, "%s", hdr.msg);
    for (int v = 0; v < 3 && e == ITR_OK; v++)
      for (int i = 0; i < N; i++)
        for (int p = 0; p < stage_size(st, g - 1); p++) {
          const size_t n = (size_t)shared_rows(&c->heldout[i], own[i][0], p, own[i][1], c->rank) * (size_t)D;
          recv_chunks(st->link, rbuf, n, st->first[g - 1] + p);
          copy_rows(&c->heldout[i], own[i][0], p, own[i][1], c->rank, D, h[i][v], rbuf, -1);
        }
  }
  for (int l = c->layer_lo; l < c->layer_hi && e == ITR_OK; l++) /* e: the same on the whole stage */
    e = itr_dist_agree(c->comm, merge_eval_layer(c, l, sh, h, 0));
  if (go && g < S - 1) { /* on to the next stage: the states, or the error */
    hdr.code = (int)e;
    hdr.k = 0;
    hdr.kinds = 0;
    snprintf(hdr.msg, sizeof hdr.msg, "%s", e == ITR_OK ? "" : itr_error_message());
    if (c->rank == 0)
      for (int q = 0; q < stage_size(st, g + 1); q++)
        (void)MPI_Isend(&hdr, (int)sizeof hdr, MPI_BYTE, st->first[g + 1] + q, TAG_HDR, st->link, &req[n_req++]);
    size_t w = 0;
    for (int v = 0; v < 3 && e == ITR_OK; v++)
      for (int i = 0; i < N; i++)
        for (int q = 0; q < stage_size(st, g + 1); q++) {
          const size_t n = copy_rows(&c->heldout[i], own[i][1], c->rank, own[i][2], q, D, h[i][v], sbuf + w, 1);
          isend_chunks(st->link, sbuf + w, n, st->first[g + 1] + q, req, &n_req);
          w += n;
        }
    (void)MPI_Waitall(n_req, req, MPI_STATUSES_IGNORE);
  }
  e = merge_eval_finish(c, e, g == S - 1, sh, h);
  merge_eval_free(c, sh, h);
  for (int i = 0; i < N; i++)
    for (int w = 0; w < 3; w++) free(own[i][w]);
  free(sbuf);
  free(rbuf);
  free(req);
  return e;
}

itr_err merge_stages_run(merge_ctx *c) {
  merge_stages *st = c->st;
  const int K = merge_n_iters(c);
  st->sent_upto = st->recv_upto = c->start_iter - 1;
  st->up_closed = c->stage == 0 || st->recv_upto >= K;
  st->down_progress = c->start_iter - 1; /* a restart: every stage has that iteration */
  st->trimmed = st->reported = 0;
  st->ckpt_done = c->start_iter - 1;
  const double t0 = itr_wtime();
  itr_err e = stage_loop(c);
  c->stage_secs[c->stage][0] = itr_wtime() - t0;
  stage_finish(c, e);
  /* every stage ended with its own error or one relayed verbatim from another stage */
  ITR_TRY(itr_dist_agree_relayed(c->world, e));
  e = gather(c);
  if (e == ITR_OK && c->opt->n_heldout > 0) {
    PetscLogStagePush(c->stage_eval);
    e = stages_evaluate(c);
    PetscLogStagePop();
  }
  /* from here on (write, report) every rank acts as one of all */
  c->comm = c->world;
  c->rank = c->wrank;
  c->size = c->wsize;
  return e;
}

itr_err merge_stages_restart(merge_ctx *c, int *found) {
  *found = 0;
  ITR_TRY(itr_dist_agree(c->world, checkpoint_exists(c)
                                       ? itr_error_set(ITR_ERR_INPUT,
                                                       "-restart: %s.partial/checkpoint.h5 was made by a run without "
                                                       "-stages: rerun with the options of that run",
                                                       c->opt->out)
                                       : ITR_OK));
  int mine = checkpoint_stage_latest(c), all = 0;
  if (MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, c->world) != 0)
    return itr_error_set(ITR_ERR_INTERNAL, "MPI_Allreduce of the checkpoint iterations failed");
  if (all == 0) return ITR_OK;
  ITR_TRY(itr_dist_agree(c->world, checkpoint_read_stage(c, all)));
  c->start_iter = all + 1;
  c->start_layer = 0;
  c->iters_done = all;
  *found = 1;
  return ITR_OK;
}
