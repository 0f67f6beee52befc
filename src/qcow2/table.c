// SPDX-License-Identifier: MIT
/*
 * Sparse tables: the L1 and refcount tables in memory, in 4 KiB chunks
 * allocated only where an entry is nonzero, so that their memory follows
 * what the image has allocated, not the virtual disk size. Knows nothing of
 * what the entries mean nor of the image file.
 */
#include <stdlib.h>

#include "internal.h"

const uint64_t qcow2_table_zero[QCOW2_TABLE_CHUNK];

/* Point chunks [@first, @end) at the zero chunk. */
static void chunks_absent(struct qcow2_table *t, uint64_t first, uint64_t end)
{
	for (; first < end; first++)
		t->chunks[first] = (uint64_t *)qcow2_table_zero;
}

static bool absent(const uint64_t *c)
{
	return c == qcow2_table_zero;
}

static uint64_t nr_chunks(uint64_t nr)
{
	return (nr + QCOW2_TABLE_CHUNK - 1) >> QCOW2_TABLE_CHUNK_BITS;
}

int qcow2_table_chunk_alloc(struct qcow2_table *t, uint64_t k)
{
	uint64_t *c = calloc(QCOW2_TABLE_CHUNK, 8);

	if (!c)
		return -ENOMEM;
	t->chunks[k] = c;
	t->nr_held++;
	return 0;
}

int qcow2_table_init(struct qcow2_table *t, uint64_t nr)
{
	/* One pointer at least: a table of 0 entries still has an array. */
	uint64_t n = nr_chunks(nr) ? nr_chunks(nr) : 1;

	t->chunks = malloc(n * sizeof(*t->chunks));
	if (!t->chunks)
		return -ENOMEM;
	chunks_absent(t, 0, n);
	t->nr = nr;
	t->nr_held = 0;
	return 0;
}

void qcow2_table_free(struct qcow2_table *t)
{
	uint64_t k;

	if (t->chunks)
		for (k = 0; k < nr_chunks(t->nr); k++)
			if (!absent(t->chunks[k]))
				free(t->chunks[k]);
	free(t->chunks);
	t->chunks = NULL;
	t->nr = t->nr_held = 0;
}

int qcow2_table_resize(struct qcow2_table *t, uint64_t nr)
{
	uint64_t old = nr_chunks(t->nr), n = nr_chunks(nr), k, i;

	if (n > old) {
		uint64_t **nc = realloc(t->chunks, n * sizeof(*nc));

		if (!nc)
			return -ENOMEM;
		t->chunks = nc;
		chunks_absent(t, old, n);
	} else {
		/* The array keeps its size: shrinking it could only fail. */
		for (k = n; k < old; k++) {
			if (!absent(t->chunks[k])) {
				free(t->chunks[k]);
				t->nr_held--;
			}
		}
		chunks_absent(t, n, old);
		/* Entries past @nr in the last chunk read zero if it grows again. */
		if (n && !absent(t->chunks[n - 1]))
			for (i = nr; i < n << QCOW2_TABLE_CHUNK_BITS; i++)
				t->chunks[n - 1][i & (QCOW2_TABLE_CHUNK - 1)] = 0;
	}
	t->nr = nr;
	return 0;
}

int qcow2_table_reserve(struct qcow2_table *t, uint64_t first, uint64_t n)
{
	uint64_t k;
	int ret;

	if (!n)
		return 0;
	for (k = first >> QCOW2_TABLE_CHUNK_BITS; k <= (first + n - 1) >> QCOW2_TABLE_CHUNK_BITS;
	     k++) {
		if (!absent(t->chunks[k]))
			continue;
		ret = qcow2_table_chunk_alloc(t, k);
		if (ret < 0)
			return ret;
	}
	return 0;
}

void qcow2_table_read_be(const struct qcow2_table *t, uint64_t first, uint64_t n, uint64_t *be)
{
	uint64_t i, end = first + n;

	for (i = first; i < end; i++) {
		const uint64_t *c;
		uint64_t stop;

		if (i >= t->nr) {
			memset(be, 0, (end - i) * 8);
			return;
		}
		c = t->chunks[i >> QCOW2_TABLE_CHUNK_BITS];
		stop = (i | (QCOW2_TABLE_CHUNK - 1)) + 1;
		if (stop > end)
			stop = end;
		if (stop > t->nr)
			stop = t->nr;
		if (absent(c)) {
			memset(be, 0, (stop - i) * 8);
			be += stop - i;
			i = stop - 1;
			continue;
		}
		for (; i < stop; i++)
			*be++ = htobe64(c[i & (QCOW2_TABLE_CHUNK - 1)]);
		i--;
	}
}

int qcow2_table_load_be(struct qcow2_table *t, uint64_t first, const uint64_t *be, uint64_t n)
{
	uint64_t i;
	int ret;

	for (i = 0; i < n; i++) {
		ret = qcow2_table_set(t, first + i, be64toh(be[i]));
		if (ret < 0)
			return ret;
	}
	return 0;
}

uint64_t qcow2_table_hi(const struct qcow2_table *t, uint64_t n)
{
	if (n > t->nr)
		n = t->nr;
	while (n) {
		const uint64_t *c = t->chunks[(n - 1) >> QCOW2_TABLE_CHUNK_BITS];

		if (absent(c)) {
			/* Skip the whole hole. */
			n = ((n - 1) >> QCOW2_TABLE_CHUNK_BITS) << QCOW2_TABLE_CHUNK_BITS;
			continue;
		}
		if (c[(n - 1) & (QCOW2_TABLE_CHUNK - 1)])
			break;
		n--;
	}
	return n;
}

void qcow2_table_clear(struct qcow2_table *t)
{
	uint64_t k;

	for (k = 0; k < nr_chunks(t->nr); k++)
		if (!absent(t->chunks[k]))
			free(t->chunks[k]);
	chunks_absent(t, 0, nr_chunks(t->nr));
	t->nr_held = 0;
}

uint64_t qcow2_table_bytes(const struct qcow2_table *t)
{
	return nr_chunks(t->nr) * sizeof(*t->chunks) + t->nr_held * QCOW2_TABLE_CHUNK * 8;
}

void qcow2_table_swap(struct qcow2_table *a, struct qcow2_table *b)
{
	struct qcow2_table tmp = *a;

	*a = *b;
	*b = tmp;
}
