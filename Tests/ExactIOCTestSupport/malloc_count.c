/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Counting heap allocations, the way SwiftNIO keeps malloc counts in CI: the test executable
 * defines malloc and its siblings, which the dynamic linker binds every library's calls to
 * (the Swift runtime's included), and forwards them to glibc's own allocator. Only the calling
 * thread's allocations are counted, and only between start and stop. Under a sanitizer, which
 * brings its own allocator, nothing is defined here and counting is unavailable.
 */
#include "ExactIOCTestSupport.h"

#include <errno.h>
#include <stddef.h>

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define CTEST_NO_MALLOC_HOOK 1
#endif
#endif

#ifndef CTEST_NO_MALLOC_HOOK

extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t size);
extern void *__libc_memalign(size_t alignment, size_t size);
extern void __libc_free(void *p);

/* Initial-exec TLS of the executable: reading it never allocates. */
static __thread int counting;
static __thread int64_t allocations;

static inline void note(void)
{
	if (counting)
		allocations++;
}

void *malloc(size_t size)
{
	note();
	return __libc_malloc(size);
}

void *calloc(size_t n, size_t size)
{
	note();
	return __libc_calloc(n, size);
}

void *realloc(void *p, size_t size)
{
	note();
	return __libc_realloc(p, size);
}

void free(void *p)
{
	__libc_free(p);
}

void *memalign(size_t alignment, size_t size)
{
	note();
	return __libc_memalign(alignment, size);
}

void *aligned_alloc(size_t alignment, size_t size)
{
	note();
	return __libc_memalign(alignment, size);
}

int posix_memalign(void **out, size_t alignment, size_t size)
{
	if (alignment < sizeof(void *) || (alignment & (alignment - 1)) != 0)
		return EINVAL;
	note();
	void *p = __libc_memalign(alignment, size);
	if (!p)
		return ENOMEM;
	*out = p;
	return 0;
}

int ctest_malloc_counting_available(void)
{
	return 1;
}

void ctest_malloc_count_start(void)
{
	allocations = 0;
	counting = 1;
}

int64_t ctest_malloc_count_stop(void)
{
	counting = 0;
	return allocations;
}

#else

int ctest_malloc_counting_available(void)
{
	return 0;
}

void ctest_malloc_count_start(void)
{
}

int64_t ctest_malloc_count_stop(void)
{
	return -1;
}

#endif
