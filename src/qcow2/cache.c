// SPDX-License-Identifier: MIT
/*
 * Slice caches for L2 tables and refcount blocks: a fixed array of entries
 * over one aligned buffer, a hash by host offset, LRU eviction of clean
 * slices. A miss starts one load that every waiter shares; when no slice can
 * be evicted the request parks (on a flush if slices are dirty) instead of
 * failing. Writing dirty slices back is flush.c's job; it writes them from
 * here, so a get that means to modify a slice parks while its write is due.
 */
#include <stdlib.h>

#include "internal.h"

static unsigned int hash_off(const struct qcow2_cache *c, uint64_t off)
{
	return (unsigned int)((off / c->slice_bytes) * 0x9e3779b97f4a7c15ull >> 32) & c->hash_mask;
}

static struct qcow2_slice *hash_find(struct qcow2_cache *c, uint64_t off)
{
	struct qcow2_slice *s;

	for (s = c->hash[hash_off(c, off)]; s; s = s->hnext)
		if (s->off == off)
			return s;
	return NULL;
}

static void hash_insert(struct qcow2_cache *c, struct qcow2_slice *s)
{
	unsigned int h = hash_off(c, s->off);

	s->hnext = c->hash[h];
	c->hash[h] = s;
}

static void hash_remove(struct qcow2_cache *c, struct qcow2_slice *s)
{
	struct qcow2_slice **pp = &c->hash[hash_off(c, s->off)];

	while (*pp && *pp != s)
		pp = &(*pp)->hnext;
	if (*pp)
		*pp = s->hnext;
	s->hnext = NULL;
}

/**
 * qcow2_cache_init - set up @nr slices of @slice_bytes each
 *
 * The buffer is not touched here, so memory is only used as slices fill.
 * Returns 0 or -ENOMEM.
 */
int qcow2_cache_init(struct qcow2_cache *c, struct qcow2 *img, const char *name,
		     unsigned int nr, uint32_t slice_bytes)
{
	unsigned int i, hsize = 1;
	void *buf;

	memset(c, 0, sizeof(*c));
	while (hsize < 2 * nr)
		hsize <<= 1;
	c->img = img;
	c->name = name;
	c->nr = nr;
	c->slice_bytes = slice_bytes;
	c->hash_mask = hsize - 1;
	c->slices = calloc(nr, sizeof(*c->slices));
	c->hash = calloc(hsize, sizeof(*c->hash));
	if (!c->slices || !c->hash || posix_memalign(&buf, 4096, (size_t)nr * slice_bytes)) {
		free(c->slices);
		free(c->hash);
		memset(c, 0, sizeof(*c));
		return -ENOMEM;
	}
	c->buf = buf;
	for (i = 0; i < nr; i++) {
		c->slices[i].cache = c;
		c->slices[i].data = c->buf + (size_t)i * slice_bytes;
	}
	return 0;
}

void qcow2_cache_destroy(struct qcow2_cache *c)
{
	free(c->slices);
	free(c->hash);
	free(c->buf);
	memset(c, 0, sizeof(*c));
}

static void load_done(struct qcow2_aio *aio, int res)
{
	struct qcow2_slice *s = (struct qcow2_slice *)((char *)aio - offsetof(struct qcow2_slice, aio));
	struct qcow2_cache *c = s->cache;

	if (res >= 0) {
		/* A short read means the table runs past EOF: those bytes are zero. */
		if ((uint32_t)res < c->slice_bytes)
			memset(s->data + res, 0, c->slice_bytes - res);
		s->state = SLICE_READY;
		qcow2_waitq_wake(&s->waiters, 0);
	} else {
		hash_remove(c, s);
		s->state = SLICE_EMPTY;
		qcow2_error(c->img, res, "cannot read %s table at 0x%llx: %s", c->name,
			    (unsigned long long)s->off, strerror(-res));
		qcow2_waitq_wake(&s->waiters, res);
	}
	qcow2_waitq_wake(&c->full_waiters, 0);
}

/* The least recently used slice that nobody needs, or NULL. */
static struct qcow2_slice *pick_victim(struct qcow2_cache *c)
{
	struct qcow2_slice *best = NULL;
	unsigned int i;

	for (i = 0; i < c->nr; i++) {
		struct qcow2_slice *s = &c->slices[i];

		if (s->state == SLICE_EMPTY)
			return s;
		if (s->state != SLICE_READY || s->ref || s->dirty || s->writing)
			continue;
		if (!best || s->lru < best->lru)
			best = s;
	}
	return best;
}

int qcow2_cache_get(struct qcow2_cache *c, uint64_t off, int flags,
		    struct qcow2_wait *w, struct qcow2_slice **out)
{
	struct qcow2_slice *s = hash_find(c, off);
	int ret;

	if (s) {
		if (s->state == SLICE_LOADING || (s->flushing && (flags & QCOW2_CACHE_MODIFY))) {
			qcow2_waitq_add(&s->waiters, w);
			return -EAGAIN;
		}
		s->ref++;
		s->lru = ++c->lru_clock;
		*out = s;
		return 0;
	}
	s = pick_victim(c);
	if (!s) {
		if (c->nr_dirty && (flags & QCOW2_CACHE_NOFLUSH))
			return -ENOBUFS;
		if (c->nr_dirty) {
			ret = qcow2_flush_start(c->img, w);
			return ret;
		}
		qcow2_waitq_add(&c->full_waiters, w);
		return -EAGAIN;
	}
	if (s->state != SLICE_EMPTY)
		hash_remove(c, s);
	s->off = off;
	s->lru = ++c->lru_clock;
	hash_insert(c, s);
	if (flags & QCOW2_CACHE_NOLOAD) {
		memset(s->data, 0, c->slice_bytes);
		s->state = SLICE_READY;
		s->ref = 1;
		*out = s;
		return 0;
	}
	s->state = SLICE_LOADING;
	s->iov.iov_base = s->data;
	s->iov.iov_len = c->slice_bytes;
	s->aio = (struct qcow2_aio){
		.op = QCOW2_AIO_READ, .fd = c->img->fd, .iov = &s->iov, .iovcnt = 1,
		.off = off, .done = load_done,
	};
	qcow2_waitq_add(&s->waiters, w);
	ret = qcow2_submit(c->img, &s->aio);
	if (ret < 0) {
		s->waiters.head = s->waiters.tail = NULL;
		hash_remove(c, s);
		s->state = SLICE_EMPTY;
		return ret;
	}
	return -EAGAIN;
}

void qcow2_cache_put(struct qcow2_slice *s)
{
	if (--s->ref == 0 && s->cache->full_waiters.head)
		qcow2_waitq_wake(&s->cache->full_waiters, 0);
}

void qcow2_cache_mark_dirty(struct qcow2_slice *s)
{
	if (!s->dirty) {
		s->dirty = true;
		s->cache->nr_dirty++;
	}
}

void qcow2_cache_write_done(struct qcow2_slice *s)
{
	if (!s->flushing)
		return;
	s->flushing = false;
	qcow2_waitq_wake(&s->waiters, 0);
}

void qcow2_cache_drop(struct qcow2_cache *c)
{
	unsigned int i;

	for (i = 0; i < c->nr; i++) {
		struct qcow2_slice *s = &c->slices[i];

		if (s->state == SLICE_READY && !s->ref && !s->writing) {
			if (s->dirty)
				c->nr_dirty--;
			s->dirty = false;
			hash_remove(c, s);
			s->state = SLICE_EMPTY;
		}
	}
}
