/* SPDX-License-Identifier: Apache-2.0 */
/* The io_uring part: compiled only on Linux with the IOUring trait (Package.swift). */
#ifdef EXACTIO_URING
/* Registered ("fixed") buffers: whole table, sparse table, and per-slot updates. */
#include "internal.h"

int csupport_register_sparse(csupport_ring *ring, unsigned nr)
{
	int ret = csupport_ring_check(ring);

	if (ret < 0)
		return ret;
	if (nr == 0)
		return -EINVAL;
	return io_uring_register_buffers_sparse(&ring->ring, nr);
}

int csupport_register_buffers(csupport_ring *ring, void *const *bases, const size_t *lens,
			      unsigned nr)
{
	struct iovec *iov;
	unsigned i;
	int ret = csupport_ring_check(ring);

	if (ret < 0)
		return ret;
	if (!bases || !lens || nr == 0)
		return -EINVAL;
	iov = calloc(nr, sizeof(*iov));
	if (!iov)
		return -ENOMEM;
	for (i = 0; i < nr; i++)
		iov[i] = (struct iovec){ .iov_base = bases[i], .iov_len = lens[i] };
	ret = io_uring_register_buffers(&ring->ring, iov, nr);
	free(iov);
	return ret;
}

int csupport_register_slot(csupport_ring *ring, unsigned slot, void *base, size_t len)
{
	struct iovec iov = { .iov_base = len ? base : NULL, .iov_len = len };
	__u64 tag = 0;
	int ret = csupport_ring_check(ring);

	/* A broken ring still accepts unregistration: it is a register syscall, not a request. */
	if (ret == -ENOTRECOVERABLE && len == 0)
		ret = 0;
	if (ret < 0)
		return ret;
	if (len && !base)
		return -EINVAL;
	ret = io_uring_register_buffers_update_tag(&ring->ring, slot, &iov, &tag, 1);
	/* The syscall returns the number of slots updated. */
	if (ret < 0)
		return ret;
	return ret == 1 ? 0 : -EINVAL;
}

int csupport_unregister_buffers(csupport_ring *ring)
{
	int ret = csupport_ring_check(ring);

	if (ret < 0 && ret != -ENOTRECOVERABLE)
		return ret;
	return io_uring_unregister_buffers(&ring->ring);
}

#endif /* EXACTIO_URING */
