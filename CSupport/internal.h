/* SPDX-License-Identifier: Apache-2.0 */
/* Private to CSupport: the only place besides the .c files that sees liburing. */
#ifndef CSUPPORT_INTERNAL_H
#define CSUPPORT_INTERNAL_H

/* System headers before liburing.h: liburing 2.3 defines feature macros (STYLE.md 2.3). */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <liburing.h>

#include "include/CSupport.h"

struct csupport_ring {
	struct io_uring ring;
};

#endif /* CSUPPORT_INTERNAL_H */
