/* SPDX-License-Identifier: Apache-2.0 */
/* _GNU_SOURCE here only (not in the header), as swift-system's CSystem does: defined in a
 * header it clashes with the modules Swift imports. */
#define _GNU_SOURCE
#include <stddef.h>
#include <sys/socket.h>

#include "include/CExactIOLinux.h"

int cexactio_accept4(int fd, int flags)
{
	return accept4(fd, NULL, NULL, flags);
}
