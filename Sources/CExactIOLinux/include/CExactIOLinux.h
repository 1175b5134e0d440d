/* SPDX-License-Identifier: Apache-2.0 */
/*
 * CExactIOLinux: the Linux system interfaces Swift's Glibc module does not expose (epoll,
 * eventfd, accept4), for the event loop's epoll backend and its wakeups. Declarations only,
 * plus prefixed wrappers for what needs _GNU_SOURCE.
 */
#ifndef CEXACTIO_LINUX_H
#define CEXACTIO_LINUX_H

#include <sys/epoll.h>
#include <sys/eventfd.h>

/* accept4(2) with no address: the new descriptor or -1 with errno set. */
int cexactio_accept4(int fd, int flags);

#endif
