/* SPDX-License-Identifier: Apache-2.0 */
#include <fcntl.h>
#include <errno.h>
#include <pthread.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

#include "include/ExactIOCTestSupport.h"

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#define __NR_io_uring_enter 426
#define __NR_io_uring_register 427
#endif

int ctest_deny_io_uring(void)
{
	struct sock_filter filter[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 3, 0),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_enter, 2, 0),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_register, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
	};
	struct sock_fprog prog = {
		.len = (unsigned short)(sizeof(filter) / sizeof(filter[0])),
		.filter = filter,
	};

	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
		return -errno;
	if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
		return -errno;
	return 0;
}

/* The handler runs on whichever thread the kernel picks: an atomic counter, and errno kept. */
static atomic_uint_fast64_t signals;

static void on_alarm(int sig)
{
	int saved = errno;

	(void)sig;
	atomic_fetch_add_explicit(&signals, 1, memory_order_relaxed);
	errno = saved;
}

int ctest_start_signal_storm(long usec)
{
	struct sigaction sa;
	struct itimerval it;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0; /* no SA_RESTART: interrupted syscalls fail with EINTR */
	if (sigaction(SIGALRM, &sa, NULL) != 0)
		return -errno;
	atomic_store(&signals, 0);
	memset(&it, 0, sizeof(it));
	it.it_interval.tv_usec = usec;
	it.it_value.tv_usec = usec;
	if (setitimer(ITIMER_REAL, &it, NULL) != 0)
		return -errno;
	return 0;
}

uint64_t ctest_stop_signal_storm(void)
{
	struct itimerval it;

	memset(&it, 0, sizeof(it));
	setitimer(ITIMER_REAL, &it, NULL);
	return (uint64_t)atomic_load(&signals);
}

/* The thread-directed storm: a thread of its own sends SIGUSR2 to one target thread. */
static pthread_t storm_thread;
static pthread_t storm_target;
static long storm_usec;
static atomic_int storm_running;
static atomic_ullong storm_sent;

static void on_usr2(int sig)
{
	int saved = errno;

	(void)sig;
	atomic_fetch_add_explicit(&signals, 1, memory_order_relaxed);
	errno = saved;
}

static void *storm_main(void *arg)
{
	(void)arg;
	while (atomic_load(&storm_running)) {
		if (pthread_kill(storm_target, SIGUSR2) != 0)
			break;
		atomic_fetch_add_explicit(&storm_sent, 1, memory_order_relaxed);
		if (storm_usec > 0)
			usleep((useconds_t)storm_usec);
	}
	return NULL;
}

int ctest_start_thread_signal_storm(pthread_t target, long usec)
{
	struct sigaction sa;
	int ret;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr2;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0; /* no SA_RESTART */
	if (sigaction(SIGUSR2, &sa, NULL) != 0)
		return -errno;
	atomic_store(&signals, 0);
	atomic_store(&storm_sent, 0);
	storm_target = target;
	storm_usec = usec;
	atomic_store(&storm_running, 1);
	ret = pthread_create(&storm_thread, NULL, storm_main, NULL);
	if (ret != 0) {
		atomic_store(&storm_running, 0);
		return -ret;
	}
	return 0;
}

uint64_t ctest_stop_thread_signal_storm(void)
{
	atomic_store(&storm_running, 0);
	pthread_join(storm_thread, NULL);
	return (uint64_t)atomic_load(&signals);
}

int ctest_set_dumpable(void)
{
	/* After setuid the kernel clears the dumpable flag: /proc/self then belongs to root and
	 * the child could not read its own status (VmRSS). Set it again. */
	return prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) == 0 ? 0 : -errno;
}

int ctest_open_direct(const char *path)
{
	int fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
	return fd < 0 ? -errno : fd;
}
