/* SPDX-License-Identifier: Apache-2.0 */
/* The io_uring part: compiled only on Linux with the IOUring trait (Package.swift). */
#ifdef EXACTIO_URING
/* A test seam: make the next waits for completions on one ring fail, to exercise
 * cancel-and-drain and the broken-ring path that real kernels reach only on rare failures.
 * Costs one relaxed atomic load per wait when unused. */
#include "internal.h"

void csupport_debug_fail_waits(csupport_ring *ring, int count, int err)
{
	if (!ring)
		return;
	atomic_store(&ring->injected_errno, err > 0 ? err : EIO);
	atomic_store(&ring->injected_waits, count > 0 ? count : 0);
}

int csupport_injected_wait_failure(csupport_ring *ring)
{
	int n = atomic_load_explicit(&ring->injected_waits, memory_order_relaxed);

	while (n > 0) {
		if (atomic_compare_exchange_weak(&ring->injected_waits, &n, n - 1))
			return -atomic_load(&ring->injected_errno);
	}
	return 0;
}

void csupport_debug_shuffle_completions(csupport_ring *ring, int on)
{
	if (ring)
		atomic_store(&ring->shuffle_completions, on ? 1 : 0);
}

#endif /* EXACTIO_URING */
