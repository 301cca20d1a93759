/* Graceful stop: signal handlers that only record the signal (include/iteris/dist.h). */
#include "iteris/dist.h"

#include <signal.h>
#include <string.h>

static volatile sig_atomic_t stop_signal_ = 0;

static void on_signal(int sig) {
  if (stop_signal_ == 0) stop_signal_ = sig; /* keep the first one */
}

void itr_signals_install(void) {
  static const int sigs[] = {SIGTERM, SIGINT, SIGUSR1};
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) sigaddset(&sa.sa_mask, sigs[i]);
  sa.sa_flags = SA_RESTART; /* do not make read()/write()/poll() inside MPI or HDF5 fail with EINTR */
  stop_signal_ = 0;
  for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) (void)sigaction(sigs[i], &sa, NULL);
}

int itr_signals_requested(void) { return (int)stop_signal_; }

int itr_signals_agree(MPI_Comm comm) {
  int mine = (int)stop_signal_, all = 0;
  MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MAX, comm);
  return all;
}

void itr_signals_clear(void) { stop_signal_ = 0; }
