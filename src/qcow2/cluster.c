// SPDX-License-Identifier: MIT
/*
 * Guest-to-host mapping: L1 and L2 entries decoded and validated in one
 * place, runs of like clusters looked up through the L2 cache, references
 * released, and qcow2_map for the tools.
 */
#include <stdlib.h>

#include "internal.h"

int qcow2_l2_classify(struct qcow2 *img, uint64_t e, enum l2_type *type, uint64_t *host)
{
	if (e & L2E_COMPRESSED) {
		*type = L2_COMPRESSED;
		*host = e;		/* the whole descriptor */
		return 0;
	}
	*host = e & L2E_OFFSET_MASK;
	if (*host & (img->cluster_size - 1))
		return qcow2_corrupt(img, "L2 entry 0x%llx: cluster offset not aligned",
				     (unsigned long long)e);
	/* Bit 0 is reserved before v3: QEMU calls a zero flag there corrupt. */
	if ((e & L2E_ZERO) && img->h.version < 3)
		return qcow2_corrupt(img, "L2 entry 0x%llx: zero flag in a version 2 image",
				     (unsigned long long)e);
	/* A zero cluster at offset 0 is plain, as QEMU calls it, data file or not. */
	if (e & L2E_ZERO)
		*type = *host ? L2_ZERO_ALLOC : L2_ZERO_PLAIN;
	else
		*type = qcow2_l2e_has_cluster(img, e) ? L2_NORMAL : L2_UNALLOC;
	return 0;
}

/*
 * The type of subcluster @sc of an extended L2 entry @e with @bitmap, and
 * the host offset of the subcluster (the descriptor if compressed). Without
 * extended L2 the whole cluster is subcluster 0 and @bitmap is ignored.
 */
int qcow2_l2_classify_sc(struct qcow2 *img, uint64_t e, uint64_t bitmap, unsigned int sc,
			 enum l2_type *type, uint64_t *host)
{
	bool alloc;
	int ret;

	if (img->l2_entry_bytes != 16 || (e & L2E_COMPRESSED))
		return qcow2_l2_classify(img, e, type, host);
	/* Bit 0 (the zero flag) is unused: the bitmap says what reads as zero. */
	ret = qcow2_l2_classify(img, e & ~L2E_ZERO, type, host);
	if (ret < 0)
		return ret;
	/* Not *host != 0: in an external data file offset 0 is guest cluster 0. */
	alloc = *type == L2_NORMAL;
	if ((bitmap >> 32) & bitmap & L2B_ALL_ALLOC)
		return qcow2_corrupt(img, "L2 bitmap 0x%llx: subclusters both allocated and zero",
				     (unsigned long long)bitmap);
	if (!alloc && (bitmap & L2B_ALL_ALLOC))
		return qcow2_corrupt(img, "L2 bitmap 0x%llx: allocated subclusters without a cluster",
				     (unsigned long long)bitmap);
	if (bitmap & L2B_ZERO(sc))
		*type = alloc ? L2_ZERO_ALLOC : L2_ZERO_PLAIN;
	else if (bitmap & L2B_ALLOC(sc))
		*type = L2_NORMAL;
	else
		*type = L2_UNALLOC;	/* keeps the cluster's host offset, for map */
	if (alloc)
		*host += (uint64_t)sc << img->unit_bits;
	return 0;
}

/* Drop the reference L2 entry @e holds (after the next flush). 0 or -errno. */
int qcow2_free_entry(struct qcow2 *img, uint64_t e)
{
	uint64_t host, coff, first, last;
	enum l2_type type = L2_UNALLOC;
	uint32_t clen;
	int ret = qcow2_l2_classify(img, e, &type, &host);

	if (ret < 0)
		return ret;
	switch (type) {
	case L2_NORMAL:
	case L2_ZERO_ALLOC:
		/* Clusters of an external data file are not refcounted. */
		if (img->data_fd >= 0)
			return 0;
		return qcow2_free_clusters(img, host, 1);
	case L2_COMPRESSED:
		ret = qcow2_compressed_locate(img, e, &coff, &clen);
		if (ret < 0)
			return ret;
		/* Every host cluster the compressed bytes touch holds one reference. */
		first = coff >> img->h.cluster_bits;
		last = (coff + clen - 1) >> img->h.cluster_bits;
		return qcow2_free_clusters(img, first << img->h.cluster_bits, last - first + 1);
	default:
		return 0;
	}
}

/* The L2 table offset for guest offset @pos (0 if none). 0 or -EIO. */
int qcow2_l1_lookup(struct qcow2 *img, uint64_t pos, uint64_t *l2_off, uint64_t *l1e)
{
	uint64_t i = qcow2_l1_index(img, pos);

	if (i >= img->h.l1_size)
		return qcow2_corrupt(img, "guest offset %llu beyond the L1 table",
				     (unsigned long long)pos);
	*l1e = qcow2_table_get(&img->l1, i);
	*l2_off = *l1e & L1E_OFFSET_MASK;
	if (*l2_off & (img->cluster_size - 1))
		return qcow2_corrupt(img, "L2 table offset 0x%llx (L1 index %llu) not aligned",
				     (unsigned long long)*l2_off, (unsigned long long)i);
	/* A table past everything ever written: a write there would stretch
	 * the file to wherever the image points (QEMU reads zeros there). */
	if (*l2_off >= img->file_end)
		return qcow2_corrupt(img, "L2 table offset 0x%llx (L1 index %llu) lies beyond "
				     "the end of the file", (unsigned long long)*l2_off,
				     (unsigned long long)i);
	return 0;
}

/* Locate the L2 entry of @pos: its slice offset and index in the slice. */
void qcow2_l2_locate(struct qcow2 *img, uint64_t l2_off, uint64_t pos,
		      uint64_t *slice_off, uint64_t *idx)
{
	uint64_t per_slice = img->l2_cache.slice_bytes / img->l2_entry_bytes;
	uint64_t i = qcow2_l2_index(img, pos);

	*slice_off = l2_off + (i / per_slice) * img->l2_cache.slice_bytes;
	*idx = i % per_slice;
}

/*
 * Whether a unit of @type in L2 entry @e has a host offset (which can be 0,
 * in an external data file).
 */
static bool unit_has_host(struct qcow2 *img, uint64_t e, enum l2_type type)
{
	if (type == L2_NORMAL || type == L2_ZERO_ALLOC)
		return true;
	if (type != L2_UNALLOC || img->l2_entry_bytes != 16)
		return false;
	/* An unused subcluster of an allocated cluster keeps its offset. */
	return qcow2_l2e_has_cluster(img, e);
}

/*
 * The run of like clusters (subclusters with extended L2) starting at guest
 * byte @pos, ending at @end at most: its type, host offset of @pos (DATA),
 * whether that offset is one (*@has_host) and length. Stops at the end of
 * the L2 slice. 0 / -EAGAIN (parked on @w) / -errno.
 */
static int lookup_run(struct qcow2 *img, uint64_t pos, uint64_t end, struct qcow2_wait *w,
		      enum l2_type *type, uint64_t *host, bool *has_host, uint64_t *run)
{
	uint64_t l2_off, l1e, slice_off, idx, per_slice, first, h, n, limit, e;
	uint64_t unit = 1ull << img->unit_bits, in_unit = pos & (unit - 1);
	unsigned int upc = 1u << (img->h.cluster_bits - img->unit_bits), u0, u;
	struct qcow2_slice *s;
	enum l2_type t;
	int ret;

	ret = qcow2_l1_lookup(img, pos, &l2_off, &l1e);
	if (ret < 0)
		return ret;
	if (!l2_off) {
		limit = (qcow2_l1_index(img, pos) + 1) * qcow2_l2_span(img);
		*type = L2_UNALLOC;
		*host = 0;
		*has_host = false;
		*run = (end < limit ? end : limit) - pos;
		return 0;
	}
	qcow2_l2_locate(img, l2_off, pos, &slice_off, &idx);
	ret = qcow2_cache_get(&img->l2_cache, slice_off, 0, w, &s);
	if (ret < 0)
		return ret;
	/* Units: clusters, or with extended L2 the subclusters of the entries. */
	u0 = (pos & (img->cluster_size - 1)) >> img->unit_bits;
	e = qcow2_l2_get(s, idx);
	ret = qcow2_l2_classify_sc(img, e, qcow2_l2_bitmap(s, idx), u0, type, &first);
	if (ret < 0)
		goto out;
	*has_host = *type != L2_COMPRESSED && unit_has_host(img, e, *type);
	per_slice = img->l2_cache.slice_bytes / img->l2_entry_bytes;
	n = 1;
	while ((pos & ~(unit - 1)) + n * unit < end && *type != L2_COMPRESSED) {
		uint64_t i = idx + (u0 + n) / upc;

		u = (u0 + n) % upc;
		if (i >= per_slice)
			break;
		e = qcow2_l2_get(s, i);
		ret = qcow2_l2_classify_sc(img, e, qcow2_l2_bitmap(s, i), u, &t, &h);
		if (ret < 0)
			goto out;
		if (t != *type || t == L2_COMPRESSED)
			break;
		if (unit_has_host(img, e, t) != *has_host ||
		    (*has_host && h != first + n * unit))
			break;
		n++;
	}
	if (*type == L2_COMPRESSED) {
		/* A compressed cluster is one unit, whatever the subclusters. */
		*host = first;
		limit = qcow2_cluster_off(img, pos) + img->cluster_size;
	} else {
		*host = *has_host ? first + in_unit : 0;
		limit = (pos & ~(unit - 1)) + n * unit;
	}
	*run = (end < limit ? end : limit) - pos;
out:
	qcow2_cache_put(s);
	return ret;
}

int qcow2_lookup_run(struct qcow2 *img, uint64_t pos, uint64_t end, struct qcow2_wait *w,
		      enum l2_type *type, uint64_t *host, uint64_t *run)
{
	bool has_host;

	return lookup_run(img, pos, end, w, type, host, &has_host, run);
}

/* ---- Mapping ---------------------------------------------------------------------- */

struct sync_wait {
	struct qcow2_wait w;
	bool woken;
	int res;
};

static void sync_wake(struct qcow2_wait *w, int res)
{
	struct sync_wait *s = (struct sync_wait *)w;

	s->woken = true;
	s->res = res;
}

int qcow2_map(struct qcow2 *img, uint64_t off, uint64_t len, struct qcow2_extent *ext)
{
	struct sync_wait sw = { .w.fn = sync_wake };
	uint64_t end, host, run;
	enum l2_type type;
	int ret;

	if (off >= img->h.size)
		return qcow2_error(img, -EINVAL, "offset %llu beyond the virtual size",
				   (unsigned long long)off);
	end = len > img->h.size - off ? img->h.size : off + len;
	for (;;) {
		sw.woken = false;
		ret = lookup_run(img, off, end, &sw.w, &type, &host, &ext->has_host, &run);
		if (ret != -EAGAIN)
			break;
		while (!sw.woken) {
			ret = img->io->wait(img->io);
			if (ret < 0 && ret != -EAGAIN)
				return ret;
		}
		if (sw.res < 0)
			return sw.res;
	}
	if (ret < 0)
		return ret;
	ext->guest_off = off;
	ext->len = run;
	ext->host_off = host;
	switch (type) {
	case L2_UNALLOC:
		ext->type = QCOW2_EXTENT_UNALLOCATED;
		break;
	case L2_ZERO_PLAIN:
	case L2_ZERO_ALLOC:
		ext->type = QCOW2_EXTENT_ZERO;
		break;
	case L2_NORMAL:
		ext->type = QCOW2_EXTENT_DATA;
		break;
	case L2_COMPRESSED:
		ext->type = QCOW2_EXTENT_COMPRESSED;
		break;
	}
	return 0;
}

