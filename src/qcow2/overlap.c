// SPDX-License-Identifier: MIT
/*
 * Metadata overlap checks, in the spirit of QEMU's "cached" overlap-check
 * mode: before the engine writes to the image file, the target clusters are
 * compared with the metadata its in-memory tables locate (header, active L1
 * and L2 tables, refcount table and blocks, snapshot table, snapshot L1
 * tables, LUKS header). Refcounts can lie; this check does not trust them.
 * A write that would land on metadata is refused and the image is marked
 * corrupt, so no later write is tried. Knows nothing of requests or caches.
 */
#include <stdlib.h>

#include "internal.h"

struct qcow2_ol_snap {
	uint64_t off;
	uint64_t bytes;
};

static const char *const ol_names[] = {
	"header", "active L1 table", "active L2 table", "refcount table",
	"refcount block", "snapshot table", "inactive L1 table", "encryption header",
};

/* Does [@off, @off + @len) meet [@moff, @moff + @mlen)? Saturating: offsets
 * come from the image. */
static bool overlaps(uint64_t off, uint64_t len, uint64_t moff, uint64_t mlen)
{
	uint64_t mend = moff + mlen < moff ? UINT64_MAX : moff + mlen;

	return mlen && off < mend && moff < off + len;
}

/*
 * Does any of the @n entries at @c (its cluster, under @mask) fall in the
 * clusters [@lo, @lo + @span)? Without an early exit so the compiler may
 * vectorize it: this runs for every data write.
 */
static bool chunk_hits(const uint64_t *c, uint64_t n, uint64_t mask, uint64_t lo, uint64_t span)
{
	unsigned int hit = 0;
	uint64_t i;

	for (i = 0; i < n; i++) {
		uint64_t e = c[i] & mask;

		hit |= (e != 0) & (e - lo < span);
	}
	return hit;
}

/*
 * The same over table @t, up to its entry @n (the last nonzero one: the
 * marks below), skipping absent chunks (all zeros). Written for the common
 * case of a table whose entries in use fit in its first chunk: one pointer
 * load more than a flat array's scan; inlined, as that scan was (a call
 * costs more than the scan of a few entries).
 */
static inline __attribute__((always_inline)) bool
table_hits(const struct qcow2_table *t, uint64_t n, uint64_t mask, uint64_t lo, uint64_t span)
{
	uint64_t *const *cp = t->chunks;
	bool hit = false;

	for (; __builtin_expect(n > QCOW2_TABLE_CHUNK, 0); n -= QCOW2_TABLE_CHUNK, cp++)
		if (*cp != qcow2_table_zero)
			hit |= chunk_hits(*cp, QCOW2_TABLE_CHUNK, mask, lo, span);
	/* The last one even if absent: the zero chunk hits nothing. */
	if (n)
		hit |= chunk_hits(*cp, n, mask, lo, span);
	return hit;
}

/* Recompute the scan marks of a table that was replaced or resized (rare: out of line). */
static __attribute__((cold, noinline)) void overlap_marks_compute(struct qcow2 *img)
{
	img->ol_l1 = img->l1.chunks;
	img->ol_l1_size = img->l1.nr;
	img->ol_l1_hi = img->l1.chunks ? qcow2_table_hi(&img->l1, img->l1.nr) : 0;
	img->ol_rt = img->reftable.chunks;
	img->ol_rt_size = img->reftable.nr;
	img->ol_rt_hi = img->reftable.chunks ? qcow2_table_hi(&img->reftable, img->reftable.nr) : 0;
}

static void overlap_marks(struct qcow2 *img)
{
	if (__builtin_expect(img->ol_l1 != img->l1.chunks || img->ol_l1_size != img->l1.nr ||
			     img->ol_rt != img->reftable.chunks ||
			     img->ol_rt_size != img->reftable.nr, 0))
		overlap_marks_compute(img);
}

static unsigned int overlap_find(struct qcow2 *img, unsigned int chk, uint64_t off,
				 uint64_t len)
{
	uint64_t cs = img->cluster_size, cmask = ~(cs - 1), lo, hi;
	uint32_t i;

	if ((chk & QCOW2_OL_HEADER) && off < cs)
		return QCOW2_OL_HEADER;
	/* Whole clusters: metadata never shares a cluster with anything else. */
	lo = off & cmask;
	hi = off + len > UINT64_MAX - cs ? UINT64_MAX & cmask : (off + len + cs - 1) & cmask;
	if ((chk & QCOW2_OL_ACTIVE_L1) &&
	    overlaps(lo, hi - lo, img->h.l1_table_offset, (uint64_t)img->h.l1_size * 8))
		return QCOW2_OL_ACTIVE_L1;
	if ((chk & QCOW2_OL_REFCOUNT_TABLE) &&
	    overlaps(lo, hi - lo, img->h.refcount_table_offset,
		     (uint64_t)img->h.refcount_table_clusters * cs))
		return QCOW2_OL_REFCOUNT_TABLE;
	if ((chk & QCOW2_OL_SNAPSHOT_TABLE) && img->h.nb_snapshots &&
	    overlaps(lo, hi - lo, img->h.snapshots_offset, img->ol_snap_bytes))
		return QCOW2_OL_SNAPSHOT_TABLE;
	if (chk & QCOW2_OL_INACTIVE_L1)
		for (i = 0; i < img->ol_nr_snaps; i++)
			if (overlaps(lo, hi - lo, img->ol_snaps[i].off, img->ol_snaps[i].bytes))
				return QCOW2_OL_INACTIVE_L1;
	if ((chk & QCOW2_OL_CRYPT_HEADER) && img->h.crypt_method == 2 &&
	    overlaps(lo, hi - lo, img->crypt_hdr_off, img->crypt_hdr_len))
		return QCOW2_OL_CRYPT_HEADER;
	overlap_marks(img);
	/* Marks above 0 mean the tables exist. */
	if ((chk & QCOW2_OL_ACTIVE_L2) &&
	    table_hits(&img->l1, img->ol_l1_hi, L1E_OFFSET_MASK & cmask, lo, hi - lo))
		return QCOW2_OL_ACTIVE_L2;
	if ((chk & QCOW2_OL_REFCOUNT_BLOCK) &&
	    table_hits(&img->reftable, img->ol_rt_hi, RTE_OFFSET_MASK & cmask, lo, hi - lo))
		return QCOW2_OL_REFCOUNT_BLOCK;
	return 0;
}

/**
 * qcow2_overlap_check - may the engine write [@off, @off + @len) of the image file?
 *
 * @ign names the metadata the write is meant to update (QCOW2_OL_* bits);
 * everything else is checked. Returns 0, or -EIO with the image marked
 * corrupt (the header's corrupt bit goes out with the next flush) and the
 * message naming the metadata the write would have overwritten.
 */
int qcow2_overlap_check(struct qcow2 *img, unsigned int ign, uint64_t off, uint64_t len)
{
	unsigned int hit;
	int bit;

	if (!len || img->raw)
		return 0;
	hit = overlap_find(img, QCOW2_OL_ALL & ~ign, off, len);
	if (!hit)
		return 0;
	bit = __builtin_ctz(hit);
	return qcow2_corrupt(img, "write at 0x%llx (%llu bytes) would overwrite the %s: refused",
			     (unsigned long long)off, (unsigned long long)len, ol_names[bit]);
}

/**
 * qcow2_overlap_set_snapshots - remember where @t's table and L1 tables lie
 *
 * Called at open and whenever the snapshot table is replaced. Returns 0 or
 * -ENOMEM (the old list is kept).
 */
int qcow2_overlap_set_snapshots(struct qcow2 *img, const struct qcow2_snap_table *t)
{
	struct qcow2_ol_snap *s = NULL;
	uint32_t i;

	if (t->nr) {
		s = calloc(t->nr, sizeof(*s));
		if (!s)
			return qcow2_error(img, -ENOMEM, "out of memory");
	}
	for (i = 0; i < t->nr; i++) {
		s[i].off = t->s[i].l1_off;
		s[i].bytes = (uint64_t)t->s[i].l1_size * 8;
	}
	free(img->ol_snaps);
	img->ol_snaps = s;
	img->ol_nr_snaps = t->nr;
	img->ol_snap_bytes = t->bytes;
	return 0;
}

/**
 * qcow2_overlap_load - read and validate the snapshot table for the checks (at open)
 *
 * Returns 0 or -errno with img->errmsg naming the problem with the table.
 */
int qcow2_overlap_load(struct qcow2 *img)
{
	struct qcow2_snap_table t;
	int ret;

	/* A table past the end (open for the check only) has nothing to protect. */
	if (!img->h.nb_snapshots || img->snaps_past_eof)
		return 0;
	ret = qcow2_snap_table_read_loose(img, &t);
	if (ret < 0)
		return ret;
	ret = qcow2_overlap_set_snapshots(img, &t);
	qcow2_snap_table_free(&t);
	return ret;
}

void qcow2_overlap_free(struct qcow2 *img)
{
	free(img->ol_snaps);
	img->ol_snaps = NULL;
	img->ol_nr_snaps = 0;
}
