// SPDX-License-Identifier: MIT
/*
 * A queue's data buffers: one region carved into 4 KiB pages handed out
 * first-fit from a bitmap, so that the memory a queue touches is bounded by
 * the region, not by depth x the largest request. Single-threaded: only the
 * queue's own thread allocates and frees.
 */
#include <errno.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "internal.h"

#define WORD_BITS 64

static bool page_used(const struct ublk_pool *p, unsigned int i)
{
	return p->map[i / WORD_BITS] >> (i % WORD_BITS) & 1;
}

static void mark(struct ublk_pool *p, unsigned int first, unsigned int n, bool used)
{
	for (unsigned int i = first; i < first + n; i++) {
		uint64_t bit = 1ULL << (i % WORD_BITS);

		if (used)
			p->map[i / WORD_BITS] |= bit;
		else
			p->map[i / WORD_BITS] &= ~bit;
	}
}

int ublk_pool_init(struct ublk_pool *p, size_t bytes)
{
	void *base;

	p->pages = (unsigned int)((bytes + UBLK_POOL_PAGE - 1) / UBLK_POOL_PAGE);
	p->free = p->pages;
	p->map = calloc((p->pages + WORD_BITS - 1) / WORD_BITS, sizeof(*p->map));
	if (!p->map)
		return -ENOMEM;
	base = mmap(NULL, (size_t)p->pages * UBLK_POOL_PAGE, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (base == MAP_FAILED) {
		free(p->map);
		p->map = NULL;
		return -errno;
	}
	p->base = base;
	return 0;
}

void ublk_pool_fini(struct ublk_pool *p)
{
	if (p->base)
		munmap(p->base, (size_t)p->pages * UBLK_POOL_PAGE);
	free(p->map);
	p->base = NULL;
	p->map = NULL;
}

/* The first run of @n free pages: its first page, or -1 if there is none. */
int ublk_pool_alloc(struct ublk_pool *p, unsigned int n)
{
	unsigned int i = 0, run = 0;

	if (n == 0 || n > p->free)
		return -1;
	while (i < p->pages) {
		if (i % WORD_BITS == 0 && p->map[i / WORD_BITS] == ~0ULL) {
			run = 0;
			i += WORD_BITS;
			continue;
		}
		if (page_used(p, i)) {
			run = 0;
		} else if (++run == n) {
			mark(p, i + 1 - n, n, true);
			p->free -= n;
			return (int)(i + 1 - n);
		}
		i++;
	}
	return -1;
}

void ublk_pool_free(struct ublk_pool *p, unsigned int first, unsigned int n)
{
	mark(p, first, n, false);
	p->free += n;
}
