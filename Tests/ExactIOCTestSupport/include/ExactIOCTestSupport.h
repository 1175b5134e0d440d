/* SPDX-License-Identifier: Apache-2.0 */
/* Test-only helpers that Swift cannot write itself (variadic prctl, sigaction). Not part of
 * the library: only ExactIOTests links this target. */
#ifndef CTESTSUPPORT_H
#define CTESTSUPPORT_H

#include <pthread.h>
#include <stdint.h>

/* Installs a seccomp filter that makes io_uring_setup, io_uring_enter and io_uring_register
 * fail with EPERM, as Docker's default profile does. Irreversible for the calling process.
 * Returns 0 or -errno. */
int ctest_deny_io_uring(void);

/* Starts a timer that sends SIGALRM every `usec` microseconds to a handler installed without
 * SA_RESTART, so blocking syscalls fail with EINTR. Returns 0 or -errno. */
int ctest_start_signal_storm(long usec);

/* Stops the timer; returns the number of signals delivered since the start. */
uint64_t ctest_stop_signal_storm(void);

/* Starts a thread that sends SIGUSR2 to thread `target` every `usec` microseconds (0: as fast
 * as it can), to a handler installed without SA_RESTART. Returns 0 or -errno. */
int ctest_start_thread_signal_storm(pthread_t target, long usec);
/* Stops it; returns the number of SIGUSR2 handled since the start. */
uint64_t ctest_stop_thread_signal_storm(void);

/* Makes the process dumpable again after a uid change (/proc/self readable). Returns 0 or -errno. */
int ctest_set_dumpable(void);

/* Heap allocation counting (malloc_count.c): 1 when this build counts (not under a sanitizer). */
int ctest_malloc_counting_available(void);
/* Starts counting the calling thread's allocations (malloc, calloc, realloc, memalign,
 * aligned_alloc, posix_memalign) from zero. */
void ctest_malloc_count_start(void);
/* Stops counting; returns the calling thread's allocations since the start (-1: unavailable). */
int64_t ctest_malloc_count_stop(void);

/* open(2) with O_DIRECT (read-only): the descriptor or -errno. */
int ctest_open_direct(const char *path);

#endif
