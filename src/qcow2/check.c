// SPDX-License-Identifier: MIT
/*
 * Check and repair: count every reference to every host cluster from the
 * metadata as it is on disk (read here, never through the caches), compare
 * with the refcount blocks and, when asked, fix leaks, low refcounts, COPIED
 * flags, or rebuild the whole refcount structure. qemu-img check is the
 * oracle: same messages, same counts, same decisions about what is fixable.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "internal.h"

/* All I/O here is in 512-byte sectors from 4 KiB-aligned buffers (O_DIRECT). */
#define SECTOR			512u
#define BUF_ALIGN		4096u

#define CHECK_MAX_CLUSTERS	((uint64_t)INT32_MAX)	/* QEMU's limit */
#define CHECK_FRAG_INFO		1	/* count allocation statistics (active L1) */

/* Snapshot table (docs/interop/qcow2.rst, "Snapshots"); QEMU's limits. */
#define SN_HEADER_LEN		40u
#define SN_EXTRA_LEN		24u	/* vm_state_size_large, disk_size, icount */
#define SN_MAX			65536u
#define SN_MAX_TABLE_BYTES	(64u << 20)
#define SN_MAX_EXTRA		1024u

/* Bitmaps extension and directory ("Bitmaps"); QEMU's limits. */
#define BM_EXT_LEN		24u
#define BM_ENTRY_LEN		24u
#define BM_MAX			65535u
#define BM_MAX_DIR_BYTES	(64u << 20)
#define BM_MAX_TABLE_ENTRIES	0x8000000u
#define BM_MAX_PHYS_BYTES	0x20000000ull
#define BM_MAX_NAME		1023u
#define BM_RESERVED_FLAGS	0xfffffffcu
#define BM_TYPE_DIRTY		1u
#define BME_RESERVED_MASK	0xff000000000001feull
#define BME_OFFSET_MASK		0x00fffffffffffe00ull
#define BME_ALL_ONES		1ull

/* Extended L2 entries: allocation bits low, reads-as-zero bits high. */
#define L2_BITMAP_ALL_ALLOC	0xffffffffull
#define L2_BITMAP_ALL_ZEROES	(L2_BITMAP_ALL_ALLOC << 32)

enum cluster_type {
	CL_UNALLOCATED,
	CL_ZERO_PLAIN,
	CL_ZERO_ALLOC,
	CL_NORMAL,
	CL_COMPRESSED,
};

struct check_snap {
	uint64_t l1_off;
	uint32_t l1_size;
	uint64_t pos;			/* where the entry starts in the table */
	uint32_t extra, id_len, name_len;
	char id[32];			/* truncated: for messages only */
	char name[64];
};

struct check {
	struct qcow2 *img;
	struct qcow2_check_result *res;
	void (*report)(void *opaque, const char *line);
	void *opaque;
	uint32_t cluster_bits;
	uint32_t cluster_size;
	bool data_file;			/* data clusters live in another file */
	bool extl2;
	bool rebuild;			/* the refcount structure itself is broken */
	bool wrote;			/* metadata changed: engine state is stale */
	uint64_t file_size;

	/* Computed refcounts, laid out exactly like refcount blocks so that a
	 * rebuild can write slices of it as they are. Whole clusters. */
	uint8_t *imrt;
	uint64_t nb_clusters;
	uint64_t imrt_bytes;

	uint64_t *reftable;		/* as on disk, host byte order */
	uint64_t reftable_size;		/* entries */
	uint8_t *rb;			/* one refcount block read from disk */
	uint64_t rb_off;		/* its offset, 0 if none */
	bool rb_dirty;
	uint8_t *l2;			/* one L2 table */

	struct check_snap *snaps;
	uint32_t nb_snaps;
	uint64_t snaps_bytes;
	uint8_t *snaps_raw;		/* the table as read (zeros past the end of the file) */
	uint32_t snaps_incomplete;	/* entries short of extra data: check_snaps_rewrite */
	bool snaps_counted;		/* check_inc() counted the table, before any repair */

	uint64_t crypto_off, crypto_len;
	uint32_t nb_bitmaps;
	uint64_t bm_dir_off, bm_dir_size;
};

static void __attribute__((format(printf, 2, 3)))
check_report(struct check *c, const char *fmt, ...)
{
	char line[512];
	va_list ap;

	if (!c->report)
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	c->report(c->opaque, line);
}

static uint64_t round_up(uint64_t v, uint64_t align)
{
	return (v + align - 1) / align * align;
}

/* ---- File I/O ------------------------------------------------------------- */

/* Zeroed, aligned, rounded up to whole sectors. NULL on ENOMEM. */
static void *check_alloc(uint64_t len)
{
	void *p;

	len = round_up(len ? len : 1, SECTOR);
	if (len > SIZE_MAX || posix_memalign(&p, BUF_ALIGN, len))
		return NULL;
	memset(p, 0, len);
	return p;
}

/* Read @len bytes at @off, bouncing through an aligned buffer if needed. */
static int check_read(struct check *c, void *buf, uint64_t len, uint64_t off)
{
	struct qcow2 *img = c->img;
	uint64_t start = off & ~(uint64_t)(SECTOR - 1);
	uint64_t span = round_up(off - start + len, SECTOR);
	uint8_t *tmp = buf;
	int ret;

	if (off >= (1ull << 62) || len >= (1ull << 40))
		return qcow2_error(img, -EINVAL, "check: read of %#" PRIx64 " bytes at %#" PRIx64
				   " out of range", len, off);
	if (start != off || span != len || (uintptr_t)buf % BUF_ALIGN) {
		tmp = check_alloc(span);
		if (!tmp)
			return qcow2_error(img, -ENOMEM, "check: out of memory");
	}
	ret = qcow2_io_pread(img->io, img->fd, tmp, span, start);
	if (tmp != buf) {
		if (!ret)
			memcpy(buf, tmp + (off - start), len);
		free(tmp);
	}
	if (ret < 0)
		return qcow2_error(img, ret, "check: cannot read at %#" PRIx64 ": %s", off,
				   strerror(-ret));
	return 0;
}

/* Write whole sectors from an aligned buffer. */
static int check_write(struct check *c, const void *buf, uint64_t len, uint64_t off)
{
	struct qcow2 *img = c->img;
	int ret;

	c->wrote = true;
	ret = qcow2_io_pwrite(img->io, img->fd, buf, len, off);
	if (off + len > img->file_end)
		img->file_end = off + len;
	if (ret < 0)
		return qcow2_error(img, ret, "check: cannot write at %#" PRIx64 ": %s", off,
				   strerror(-ret));
	return 0;
}

static int check_sync(struct check *c)
{
	int ret = qcow2_io_fsync(c->img->io, c->img->fd);

	if (ret < 0)
		return qcow2_error(c->img, ret, "check: cannot sync: %s", strerror(-ret));
	return 0;
}

static int check_file_size(struct check *c)
{
	struct stat st;

	if (fstat(c->img->fd, &st) < 0)
		return qcow2_error(c->img, -errno, "check: cannot stat: %s", strerror(errno));
	c->file_size = st.st_size;
	return 0;
}

/* ---- The in-memory refcount table --------------------------------------- */

static uint64_t imrt_get(const struct check *c, uint64_t k)
{
	return qcow2_rc_read(c->imrt, k, c->img->h.refcount_order);
}

static void imrt_set(struct check *c, uint64_t k, uint64_t v)
{
	qcow2_rc_write(c->imrt, k, c->img->h.refcount_order, v);
}

/* Make room for @nb entries; new ones are zero. */
static int imrt_resize(struct check *c, uint64_t nb)
{
	uint64_t bytes;
	uint8_t *p;

	if (nb > 2 * CHECK_MAX_CLUSTERS)
		return qcow2_error(c->img, -EFBIG, "check: image too large (%" PRIu64
				   " clusters)", nb);
	bytes = round_up(((nb << c->img->h.refcount_order) + 7) / 8, c->cluster_size);
	if (bytes > c->imrt_bytes) {
		p = check_alloc(bytes);
		if (!p)
			return qcow2_error(c->img, -ENOMEM,
					   "check: out of memory for %" PRIu64 " refcounts", nb);
		if (c->imrt)
			memcpy(p, c->imrt, c->imrt_bytes);
		free(c->imrt);
		c->imrt = p;
		c->imrt_bytes = bytes;
	}
	if (nb > c->nb_clusters)
		c->nb_clusters = nb;
	return 0;
}

/* Whether check_inc() counts [@off, @off + @size): it ends less than a cluster past the file. */
static bool check_in_reach(const struct check *c, uint64_t off, uint64_t size)
{
	uint64_t lim = c->file_size + c->cluster_size;

	return off < lim && size < lim - off;
}

/*
 * Count one more reference to each cluster of [@off, @off + @size). A range
 * reaching a cluster or more past the end of the file is a corruption, as is
 * a count that would overflow the refcount width. 0 or -errno.
 */
static int check_inc(struct check *c, uint64_t off, uint64_t size)
{
	uint64_t k, last;
	int ret;

	if (!size)
		return 0;
	if (!check_in_reach(c, off, size)) {
		check_report(c, "ERROR: counting reference for region exceeding the end of the "
			     "file by one cluster or more: offset 0x%" PRIx64 " size 0x%" PRIx64,
			     off, size);
		c->res->corruptions++;
		return 0;
	}
	last = (off + size - 1) >> c->cluster_bits;
	if (last >= c->nb_clusters) {
		ret = imrt_resize(c, last + 1);
		if (ret < 0) {
			c->res->check_errors++;
			return ret;
		}
	}
	for (k = off >> c->cluster_bits; k <= last; k++) {
		uint64_t v = imrt_get(c, k);

		if (v == c->img->refcount_max) {
			check_report(c, "ERROR: overflow cluster offset=0x%" PRIx64,
				     k << c->cluster_bits);
			check_report(c, "Widen the refcount entries (refcount_bits) or convert "
				     "the image to a clean copy");
			c->res->corruptions++;
			continue;
		}
		imrt_set(c, k, v + 1);
	}
	return 0;
}

/* ---- Refcounts on disk ------------------------------------------------------ */

/* Write back the loaded refcount block if a repair changed it. */
static int check_rb_flush(struct check *c)
{
	int ret;

	if (!c->rb_dirty)
		return 0;
	ret = check_write(c, c->rb, c->cluster_size, c->rb_off);
	if (ret < 0)
		return ret;
	c->rb_dirty = false;
	return 0;
}

/*
 * Load the refcount block that covers cluster @k. 1 when loaded, 0 when
 * there is none or it lies past the end of the file (every refcount in its
 * range is 0), -EIO for a misaligned
 * block, or -errno.
 */
static int check_rb_load(struct check *c, uint64_t k)
{
	uint64_t idx = k >> c->img->rb_bits;
	uint64_t off;
	int ret;

	if (idx >= c->reftable_size)
		return 0;
	off = c->reftable[idx] & RTE_OFFSET_MASK;
	if (!off)
		return 0;
	if (!qcow2_aligned(c->img, off))
		return -EIO;
	/*
	 * QEMU reads zeros past the end of the file: refcounts 0, as no block;
	 * up to its largest request end (2^63 - 2^30), past which it fails (EIO).
	 */
	if (off >= c->file_size && off <= (1ull << 63) - (1ull << 30) - c->cluster_size)
		return 0;
	if (off == c->rb_off)
		return 1;
	ret = check_rb_flush(c);
	if (ret < 0)
		return ret;
	c->rb_off = 0;
	ret = check_read(c, c->rb, c->cluster_size, off);
	if (ret < 0)
		return ret;
	c->rb_off = off;
	return 1;
}

/* The on-disk refcount of cluster @k. 0 or -errno. */
static int check_refcount_get(struct check *c, uint64_t k, uint64_t *out)
{
	int ret = check_rb_load(c, k);

	if (ret < 0)
		return ret;
	*out = ret ? qcow2_rc_read(c->rb, k & ((1ull << c->img->rb_bits) - 1),
				   c->img->h.refcount_order) : 0;
	return 0;
}

/* Set the on-disk refcount of cluster @k, whose block check_refcount_get
 * just loaded. Written back by check_rb_flush. */
static void check_refcount_set(struct check *c, uint64_t k, uint64_t v)
{
	qcow2_rc_write(c->rb, k & ((1ull << c->img->rb_bits) - 1), c->img->h.refcount_order, v);
	c->rb_dirty = true;
}

static int check_reftable_load(struct check *c)
{
	struct qcow2 *img = c->img;
	uint64_t bytes = (uint64_t)img->h.refcount_table_clusters << c->cluster_bits;
	uint64_t i;
	int ret;

	if (bytes > QCOW2_MAX_REFTABLE_BYTES || !qcow2_aligned(img, img->h.refcount_table_offset))
		return qcow2_error(img, -EINVAL, "check: invalid refcount table");
	c->reftable = check_alloc(bytes);
	if (!c->reftable)
		return qcow2_error(img, -ENOMEM, "check: out of memory");
	c->reftable_size = bytes / 8;
	ret = check_read(c, c->reftable, bytes, img->h.refcount_table_offset);
	if (ret < 0)
		return ret;
	for (i = 0; i < c->reftable_size; i++)
		c->reftable[i] = be64toh(c->reftable[i]);
	return 0;
}

/* ---- L1 and L2 tables ------------------------------------------------------- */

static enum cluster_type check_l2_type(const struct check *c, uint64_t e)
{
	if (e & L2E_COMPRESSED)
		return CL_COMPRESSED;
	if ((e & L2E_ZERO) && !c->extl2)
		return (e & L2E_OFFSET_MASK) ? CL_ZERO_ALLOC : CL_ZERO_PLAIN;
	if (!(e & L2E_OFFSET_MASK)) {
		/* Offset 0 is valid in an external data file; COPIED tells. */
		if (c->data_file && (e & QCOW2_OFLAG_COPIED))
			return CL_NORMAL;
		return CL_UNALLOCATED;
	}
	return CL_NORMAL;
}

/* Host range of a compressed cluster: whole 512-byte sectors from its offset. */
static void check_compressed_range(const struct check *c, uint64_t e, uint64_t *off,
				   uint64_t *len)
{
	uint32_t shift = 62 - (c->cluster_bits - 8);
	uint64_t sectors = ((e >> shift) & ((1ull << (c->cluster_bits - 8)) - 1)) + 1;

	*off = e & ((1ull << shift) - 1);
	*len = sectors * SECTOR - (*off & (SECTOR - 1));
}

/*
 * An unaligned preallocated zero cluster holds no data: make the entry a
 * plain zero entry. 0 fixed, 1 not fixable here, -errno.
 */
static int check_l2_zero_entry(struct check *c, uint64_t l2_off, uint32_t i)
{
	uint32_t eb = c->img->l2_entry_bytes;
	uint8_t *p = c->l2 + (uint64_t)i * eb;
	uint64_t sector = ((uint64_t)i * eb) & ~(uint64_t)(SECTOR - 1);
	int ret;

	if (!qcow2_aligned(c->img, l2_off))
		return 1;	/* the table itself is misplaced: leave it be */
	if (c->extl2) {
		uint64_t bm = get_be64(p + 8);

		bm = (bm | bm << 32) & L2_BITMAP_ALL_ZEROES;
		put_be64(p, 0);
		put_be64(p + 8, bm);
	} else {
		put_be64(p, L2E_ZERO);
	}
	ret = check_write(c, c->l2 + sector, SECTOR, l2_off + sector);
	if (ret < 0)
		return ret;
	c->res->corruptions--;
	c->res->corruptions_fixed++;
	return 0;
}

/* Count the clusters one L2 table references and check its entries. */
static int check_l2(struct check *c, uint64_t l2_off, int flags, int fix)
{
	struct qcow2_check_result *res = c->res;
	uint32_t nr = 1u << c->img->l2_bits, eb = c->img->l2_entry_bytes, i;
	uint64_t next_contiguous = 0, off, len;
	int ret;

	ret = check_read(c, c->l2, c->cluster_size, l2_off);
	if (ret < 0) {
		check_report(c, "ERROR: I/O error in check_refcounts_l2");
		res->check_errors++;
		return ret;
	}
	for (i = 0; i < nr; i++) {
		uint64_t e = get_be64(c->l2 + (uint64_t)i * eb);
		uint64_t bm = c->extl2 ? get_be64(c->l2 + (uint64_t)i * eb + 8) : 0;
		enum cluster_type type = check_l2_type(c, e);

		if (type != CL_COMPRESSED && (e & L2E_RESERVED_MASK)) {
			check_report(c, "ERROR found l2 entry with reserved bits set: %" PRIx64, e);
			res->corruptions++;
		}
		switch (type) {
		case CL_COMPRESSED:
			check_compressed_range(c, e, &off, &len);
			if (e & QCOW2_OFLAG_COPIED) {
				check_report(c, "ERROR: coffset=0x%" PRIx64 ": copied flag must never "
					     "be set for compressed clusters", off);
				res->corruptions++;
			}
			if (c->data_file) {
				check_report(c, "ERROR compressed cluster %u with data file, "
					     "entry=0x%" PRIx64, i, e);
				res->corruptions++;
				break;
			}
			if (bm) {
				check_report(c, "ERROR compressed cluster %u with non-zero subcluster "
					     "allocation bitmap, entry=0x%" PRIx64, i, e);
				res->corruptions++;
				break;
			}
			ret = check_inc(c, off, len);
			if (ret < 0)
				return ret;
			if (flags & CHECK_FRAG_INFO) {
				/* Sub-sector data: fragmented by nature, as QEMU counts. */
				res->allocated_clusters++;
				res->compressed_clusters++;
				res->fragmented_clusters++;
			}
			break;
		case CL_ZERO_ALLOC:
		case CL_NORMAL:
			off = e & L2E_OFFSET_MASK;
			if ((bm >> 32) & bm) {
				check_report(c, "ERROR offset=%" PRIx64 ": Allocated cluster has "
					     "corrupted subcluster allocation bitmap", off);
				res->corruptions++;
			}
			if (!qcow2_aligned(c->img, off)) {
				bool has_data = c->extl2 ? (bm & L2_BITMAP_ALL_ALLOC) : !(e & L2E_ZERO);

				res->corruptions++;
				if (has_data) {
					check_report(c, "ERROR offset=%" PRIx64 ": Data cluster is not "
						     "properly aligned; L2 entry corrupted.", off);
				} else {
					check_report(c, "%s offset=%" PRIx64 ": Preallocated cluster is "
						     "not properly aligned; L2 entry corrupted.",
						     fix & QCOW2_FIX_ERRORS ? "Repairing" : "ERROR", off);
					if (fix & QCOW2_FIX_ERRORS) {
						ret = check_l2_zero_entry(c, l2_off, i);
						if (ret < 0)
							return ret;
						if (ret == 0)
							continue;
					}
				}
			}
			if (flags & CHECK_FRAG_INFO) {
				res->allocated_clusters++;
				if (next_contiguous && off != next_contiguous)
					res->fragmented_clusters++;
				next_contiguous = off + c->cluster_size;
			}
			if (!c->data_file) {
				ret = check_inc(c, off, c->cluster_size);
				if (ret < 0)
					return ret;
			}
			break;
		case CL_ZERO_PLAIN:
			break;
		case CL_UNALLOCATED:
			if (bm & L2_BITMAP_ALL_ALLOC) {
				check_report(c, "ERROR: Unallocated cluster has non-zero subcluster "
					     "allocation map");
				res->corruptions++;
			}
			break;
		}
	}
	return 0;
}

/* Read an L1 table (whole sectors, so that one can be written back). */
static int check_l1_read(struct check *c, uint64_t l1_off, uint32_t l1_size, uint8_t **out)
{
	uint64_t bytes = round_up((uint64_t)l1_size * 8, SECTOR);
	uint8_t *l1 = check_alloc(bytes);
	int ret;

	/*
	 * Set on every path: inlined at -O3, gcc cannot see that
	 * qcow2_error() returns nonzero and warns that callers use it unset.
	 */
	*out = NULL;
	if (!l1)
		return qcow2_error(c->img, -ENOMEM, "check: out of memory");
	ret = check_read(c, l1, bytes, l1_off);
	if (ret < 0) {
		free(l1);
		return ret;
	}
	*out = l1;
	return 0;
}

/* Count an L1 table, its L2 tables and everything they reference. */
static int check_l1(struct check *c, uint64_t l1_off, uint32_t l1_size, int flags, int fix)
{
	struct qcow2_check_result *res = c->res;
	uint8_t *l1;
	uint32_t i;
	int ret;

	if (!l1_size)
		return 0;
	ret = check_inc(c, l1_off, (uint64_t)l1_size * 8);
	if (ret < 0)
		return ret;
	ret = check_l1_read(c, l1_off, l1_size, &l1);
	if (ret < 0) {
		check_report(c, "ERROR: I/O error in check_refcounts_l1");
		res->check_errors++;
		return ret;
	}
	for (i = 0; i < l1_size; i++) {
		uint64_t e = get_be64(l1 + 8 * (uint64_t)i), l2_off;

		if (!e)
			continue;
		if (e & L1E_RESERVED_MASK) {
			check_report(c, "ERROR found L1 entry with reserved bits set: %" PRIx64, e);
			res->corruptions++;
		}
		l2_off = e & L1E_OFFSET_MASK;
		ret = check_inc(c, l2_off, c->cluster_size);
		if (ret < 0)
			goto out;
		if (!qcow2_aligned(c->img, l2_off)) {
			check_report(c, "ERROR l2_offset=%" PRIx64 ": Table is not cluster aligned; "
				     "L1 entry corrupted", l2_off);
			res->corruptions++;
		}
		ret = check_l2(c, l2_off, flags, fix);
		if (ret < 0)
			goto out;
	}
	ret = 0;
out:
	free(l1);
	return ret;
}

/* ---- Snapshot table, header extensions, bitmaps ---------------------------- */

/* Have at least @need bytes of the snapshot table in *@buf (*@have loaded). */
static int check_snaps_fill(struct check *c, uint8_t **buf, uint64_t *have, uint64_t need)
{
	uint64_t want = round_up(need, 64 << 10);
	uint8_t *p;
	int ret;

	if (need <= *have)
		return 0;
	/* Grow geometrically: a table may hold 64 Ki small entries. */
	if (want < 2 * *have && 2 * *have <= SN_MAX_TABLE_BYTES)
		want = 2 * *have;
	p = check_alloc(want);
	if (!p)
		return qcow2_error(c->img, -ENOMEM, "check: out of memory");
	if (*buf)
		memcpy(p, *buf, *have);
	free(*buf);
	*buf = p;
	ret = check_read(c, p + *have, want - *have, c->img->h.snapshots_offset + *have);
	if (ret < 0)
		return ret;
	*have = want;
	return 0;
}

static void check_copy_name(char *dst, size_t dstlen, const uint8_t *src, size_t len)
{
	if (len >= dstlen)
		len = dstlen - 1;
	memcpy(dst, src, len);
	dst[len] = '\0';
}

/* Parse the snapshot table: every entry's L1 table and the table's size. */
static int check_snaps_load(struct check *c, int fix)
{
	struct qcow2 *img = c->img;
	uint64_t pos = 0, have = 0;
	uint8_t *buf = NULL;
	uint32_t i;
	int ret;

	c->nb_snaps = img->h.nb_snapshots;
	c->snaps_bytes = 0;
	if (!c->nb_snaps)
		return 0;
	if (c->nb_snaps > SN_MAX) {
		check_report(c, "ERROR snapshot table too large");
		return qcow2_error(img, -EFBIG, "check: %u snapshots, at most %u supported",
				   c->nb_snaps, SN_MAX);
	}
	if (!qcow2_aligned(img, img->h.snapshots_offset) ||
	    img->h.snapshots_offset >= (1ull << 56)) {
		check_report(c, "ERROR snapshot table offset invalid");
		return qcow2_error(img, -EINVAL, "check: snapshot table offset invalid");
	}
	c->snaps = calloc(c->nb_snaps, sizeof(*c->snaps));
	if (!c->snaps)
		return qcow2_error(img, -ENOMEM, "check: out of memory");
	for (i = 0; i < c->nb_snaps; i++) {
		struct check_snap *sn = &c->snaps[i];
		uint32_t extra, id_len, name_len;
		uint64_t end;
		uint8_t *p;

		pos = round_up(pos, 8);
		ret = check_snaps_fill(c, &buf, &have, pos + SN_HEADER_LEN);
		if (ret < 0)
			goto out;
		p = buf + pos;
		sn->l1_off = get_be64(p);
		sn->l1_size = get_be32(p + 8);
		id_len = get_be16(p + 12);
		name_len = get_be16(p + 14);
		extra = get_be32(p + 36);
		if (extra > SN_MAX_EXTRA) {
			check_report(c, "ERROR failed to read the snapshot table: Too much extra "
				     "metadata in snapshot table entry %u", i);
			ret = qcow2_error(img, -EFBIG, "check: snapshot %u: too much extra data", i);
			goto out;
		}
		end = pos + SN_HEADER_LEN + extra + id_len + name_len;
		if (end > SN_MAX_TABLE_BYTES) {
			check_report(c, "ERROR failed to read the snapshot table: snapshot table "
				     "too large");
			ret = qcow2_error(img, -EFBIG, "check: snapshot table too large");
			goto out;
		}
		ret = check_snaps_fill(c, &buf, &have, end);
		if (ret < 0)
			goto out;
		p = buf + pos + SN_HEADER_LEN + extra;
		check_copy_name(sn->id, sizeof(sn->id), p, id_len);
		check_copy_name(sn->name, sizeof(sn->name), p + id_len, name_len);
		sn->pos = pos;
		sn->extra = extra;
		sn->id_len = id_len;
		sn->name_len = name_len;
		pos = end;
	}
	c->snaps_bytes = pos;
	/* Against the file before any rebuild grows it. */
	c->snaps_counted = check_in_reach(c, img->h.snapshots_offset, pos);
	/* Version 3 entries carry at least the 64-bit VM state size and the disk size. */
	for (i = 0; img->h.version >= 3 && i < c->nb_snaps; i++) {
		if (c->snaps[i].extra >= 16)
			continue;
		check_report(c, "%s snapshot table entry %u is incomplete",
			     fix & QCOW2_FIX_ERRORS ? "Repairing" : "ERROR", i);
		c->res->corruptions++;
		c->snaps_incomplete++;
	}
	c->snaps_raw = buf;
	buf = NULL;
	ret = 0;
out:
	free(buf);
	return ret;
}

/*
 * Write the snapshot table anew, as QEMU's check -r all does when it found
 * incomplete entries (a table past the end of the file reads as such):
 * every entry with its 24 bytes of known extra data, the missing ones
 * filled in (the disk size: the current one, as far as the entry's L1
 * table covers it, which our open insists on), in clusters the engine
 * allocates; the header then points at it and the old table's clusters,
 * where inside the file, are freed. The engine's refcounts must
 * be current (the check's repairs on disk and reloaded). 0 or -errno.
 */
static int check_snaps_rewrite(struct check *c)
{
	struct qcow2 *img = c->img;
	uint64_t pos = 0, len, off, old = img->h.snapshots_offset, span = qcow2_l2_span(img);
	uint8_t *buf;
	uint32_t i;
	int ret;

	for (i = 0; i < c->nb_snaps; i++) {
		const struct check_snap *sn = &c->snaps[i];
		uint32_t extra = sn->extra > SN_EXTRA_LEN ? sn->extra : SN_EXTRA_LEN;

		pos = round_up(pos, 8) + SN_HEADER_LEN + extra + sn->id_len + sn->name_len;
	}
	len = round_up(pos, c->cluster_size);
	/* One refcount block's worth at most: what the engine allocates in one run. */
	if (len >> c->cluster_bits >= (8ull << c->cluster_bits) >> img->h.refcount_order)
		return qcow2_error(img, -EFBIG, "check: snapshot table too large to rewrite");
	buf = check_alloc(len);
	if (!buf)
		return qcow2_error(img, -ENOMEM, "check: out of memory");
	pos = 0;
	for (i = 0; i < c->nb_snaps; i++) {
		const struct check_snap *sn = &c->snaps[i];
		const uint8_t *src = c->snaps_raw + sn->pos;
		uint32_t extra = sn->extra > SN_EXTRA_LEN ? sn->extra : SN_EXTRA_LEN;
		uint64_t disk = img->h.size;
		uint8_t *p;

		pos = round_up(pos, 8);
		p = buf + pos;
		memcpy(p, src, SN_HEADER_LEN);
		put_be32(p + 36, extra);
		memcpy(p + SN_HEADER_LEN, src + SN_HEADER_LEN, sn->extra);
		if (sn->extra < 8)
			put_be64(p + SN_HEADER_LEN, get_be32(src + 32));
		if (sn->extra < 16) {
			if (disk > (uint64_t)sn->l1_size * span)
				disk = (uint64_t)sn->l1_size * span;
			put_be64(p + SN_HEADER_LEN + 8, disk);
		}
		if (sn->extra < SN_EXTRA_LEN)
			put_be64(p + SN_HEADER_LEN + 16, UINT64_MAX);
		memcpy(p + SN_HEADER_LEN + extra, src + SN_HEADER_LEN + sn->extra,
		       sn->id_len + sn->name_len);
		pos += SN_HEADER_LEN + extra + sn->id_len + sn->name_len;
	}
	ret = qcow2_alloc_contig(img, len >> c->cluster_bits, &off);
	if (ret < 0)
		goto out;
	ret = qcow2_sync_pwrite(img, buf, len, off);
	/* Its refcounts on disk before the header points at it. */
	if (!ret)
		ret = qcow2_flush(img);
	if (ret < 0) {
		qcow2_free_clusters(img, off, len >> c->cluster_bits);
		goto out;
	}
	img->h.snapshots_offset = off;
	ret = qcow2_header_write(img);
	if (ret < 0) {
		img->h.snapshots_offset = old;
		goto out;
	}
	img->snaps_past_eof = false;
	/*
	 * Only what the refcounts hold for it: a table the check did not count
	 * lay past the end of the file, where a rebuild may have put its own
	 * structures since.
	 */
	if (c->snaps_counted) {
		uint64_t end = round_up(old + c->snaps_bytes, c->cluster_size);

		ret = qcow2_free_clusters(img, old, (end - old) >> c->cluster_bits);
	}
	/*
	 * A flush applies the frees to the cached refcounts after it wrote
	 * them; the second one writes them, for the pass that reads the disk.
	 */
	if (!ret)
		ret = qcow2_flush(img);
	if (!ret)
		ret = qcow2_flush(img);
	if (!ret)
		ret = qcow2_overlap_load(img);
out:
	free(buf);
	return ret;
}

/* Find the crypto and bitmaps extensions in the header cluster on disk. */
static int check_exts_load(struct check *c)
{
	struct qcow2 *img = c->img;
	uint32_t pos = img->h.version >= 3 ? img->h.header_length : QCOW2_V2_HEADER_LEN;
	uint64_t autoclear = 0;
	uint8_t *h = check_alloc(c->cluster_size);
	int ret;

	if (!h)
		return qcow2_error(img, -ENOMEM, "check: out of memory");
	ret = check_read(c, h, c->cluster_size, 0);
	if (ret < 0)
		goto out;
	/* What the file says: the engine may have cleared the bit since. */
	if (img->h.version >= 3)
		autoclear = get_be64(h + 88);
	while (pos + 8 <= c->cluster_size) {
		uint32_t type = get_be32(h + pos), len = get_be32(h + pos + 4);
		const uint8_t *d = h + pos + 8;

		if (type == QCOW2_EXT_END || len > c->cluster_size - pos - 8)
			break;
		if (type == QCOW2_EXT_CRYPTO && len >= 16) {
			c->crypto_off = get_be64(d);
			c->crypto_len = get_be64(d + 8);
		} else if (type == QCOW2_EXT_BITMAPS && len >= BM_EXT_LEN &&
			   (autoclear & QCOW2_AUTOCLEAR_BITMAPS)) {
			c->nb_bitmaps = get_be32(d);
			c->bm_dir_size = get_be64(d + 8);
			c->bm_dir_off = get_be64(d + 16);
		}
		pos += 8 + round_up(len, 8);
	}
	ret = 0;
out:
	free(h);
	return ret;
}

/* QEMU's constraints on a bitmap directory entry. */
static bool check_bitmap_entry_ok(const struct check *c, const uint8_t *e)
{
	uint64_t table_off = get_be64(e);
	uint32_t table_size = get_be32(e + 8), flags = get_be32(e + 12);
	uint32_t type = e[16], gran = e[17], name_len = get_be16(e + 18);
	uint64_t phys;

	if (!table_size || !table_off || !qcow2_aligned(c->img, table_off) ||
	    table_size > BM_MAX_TABLE_ENTRIES || gran > 31 || gran < 9 ||
	    (flags & BM_RESERVED_FLAGS) || name_len > BM_MAX_NAME || type != BM_TYPE_DIRTY)
		return false;
	phys = (uint64_t)table_size * c->cluster_size;
	return phys <= BM_MAX_PHYS_BYTES && c->img->h.size <= ((phys * 8) << gran);
}

/* Walk the directory; false if it is broken. */
static bool check_bitmap_dir_ok(struct check *c, const uint8_t *dir)
{
	uint64_t pos = 0, n = 0;

	while (pos < c->bm_dir_size) {
		const uint8_t *e = dir + pos;
		uint64_t esize;

		if (pos + BM_ENTRY_LEN > c->bm_dir_size || ++n > c->nb_bitmaps)
			return false;
		esize = round_up(BM_ENTRY_LEN + get_be16(e + 18) + (uint64_t)get_be32(e + 20), 8);
		if (pos + esize > c->bm_dir_size || get_be32(e + 20) != 0 ||
		    !check_bitmap_entry_ok(c, e))
			return false;
		pos += esize;
	}
	return n == c->nb_bitmaps;
}

/* Count the bitmap directory, each bitmap table and the clusters it uses. */
static int check_bitmaps(struct check *c)
{
	struct qcow2_check_result *res = c->res;
	uint8_t *dir = NULL, *table = NULL;
	uint64_t pos, i;
	int ret;

	if (!c->nb_bitmaps)
		return 0;
	ret = check_inc(c, c->bm_dir_off, c->bm_dir_size);
	if (ret < 0)
		return ret;
	if (c->nb_bitmaps > BM_MAX || !c->bm_dir_size || c->bm_dir_size > BM_MAX_DIR_BYTES ||
	    !qcow2_aligned(c->img, c->bm_dir_off) || c->bm_dir_off >= (1ull << 56))
		goto broken;
	dir = check_alloc(c->bm_dir_size);
	if (!dir)
		return qcow2_error(c->img, -ENOMEM, "check: out of memory");
	ret = check_read(c, dir, c->bm_dir_size, c->bm_dir_off);
	if (ret < 0)
		goto out;
	if (!check_bitmap_dir_ok(c, dir))
		goto broken;
	for (pos = 0; pos < c->bm_dir_size;
	     pos += round_up(BM_ENTRY_LEN + get_be16(dir + pos + 18), 8)) {
		uint64_t table_off = get_be64(dir + pos);
		uint64_t entries = get_be32(dir + pos + 8);

		ret = check_inc(c, table_off, entries * 8);
		if (ret < 0)
			goto out;
		table = check_alloc(entries * 8);
		if (!table) {
			ret = qcow2_error(c->img, -ENOMEM, "check: out of memory");
			goto out;
		}
		ret = check_read(c, table, entries * 8, table_off);
		if (ret < 0) {
			res->corruptions++;
			goto out;
		}
		for (i = 0; i < entries; i++) {
			uint64_t e = get_be64(table + 8 * i), off = e & BME_OFFSET_MASK;

			if ((e & BME_RESERVED_MASK) ||
			    (off && ((e & BME_ALL_ONES) || !qcow2_aligned(c->img, off)))) {
				res->corruptions++;
				continue;
			}
			if (off) {
				ret = check_inc(c, off, c->cluster_size);
				if (ret < 0)
					goto out;
			}
		}
		free(table);
		table = NULL;
	}
	ret = 0;
	goto out;

broken:
	res->corruptions++;
	check_report(c, "ERROR bitmap directory is broken");
	ret = qcow2_error(c->img, -EINVAL, "check: bitmap directory is broken");
out:
	free(table);
	free(dir);
	return ret;
}

/* ---- Refcount structure ------------------------------------------------------ */

/* Count the refcount blocks and check that each is where it can be used. */
static int check_refblocks(struct check *c, int fix)
{
	struct qcow2_check_result *res = c->res;
	uint64_t i;
	int ret;

	for (i = 0; i < c->reftable_size; i++) {
		uint64_t off = c->reftable[i] & RTE_OFFSET_MASK;
		uint64_t k = off >> c->cluster_bits, v;

		if (c->reftable[i] & RTE_RESERVED_MASK) {
			check_report(c, "ERROR refcount table entry %" PRIu64 " has reserved bits set",
				     i);
			res->corruptions++;
			c->rebuild = true;
			continue;
		}
		if (!qcow2_aligned(c->img, off)) {
			check_report(c, "ERROR refcount block %" PRIu64 " is not cluster aligned; "
				     "refcount table entry corrupted", i);
			res->corruptions++;
			c->rebuild = true;
			continue;
		}
		if (k >= c->nb_clusters) {
			check_report(c, "%s refcount block %" PRIu64 " is outside image",
				     fix & QCOW2_FIX_ERRORS ? "Repairing" : "ERROR", i);
			res->corruptions++;
			if (!(fix & QCOW2_FIX_ERRORS))
				continue;
			/*
			 * QEMU grows the file to cover the block, which then
			 * reads as zeros: one more corruption, the block's own
			 * refcount 0, that its rebuild fixes. Ours leaves the
			 * file alone (the rebuild drops the block) but counts
			 * as QEMU does, so that the two reports agree.
			 */
			res->corruptions++;
			c->rebuild = true;
			continue;
		}
		if (!off)
			continue;
		ret = check_inc(c, off, c->cluster_size);
		if (ret < 0)
			return ret;
		v = imrt_get(c, k);
		if (v != 1) {
			check_report(c, "ERROR refcount block %" PRIu64 " refcount=%" PRIu64, i, v);
			res->corruptions++;
			c->rebuild = true;
		}
	}
	return 0;
}

/* Count every reference in the image into the in-memory refcount table. */
static int check_calculate(struct check *c, int fix)
{
	struct qcow2 *img = c->img;
	struct qcow2_check_result *res = c->res;
	uint32_t i;
	int ret;

	ret = check_inc(c, 0, c->cluster_size);
	if (ret < 0)
		return ret;
	ret = check_l1(c, img->h.l1_table_offset, img->h.l1_size, CHECK_FRAG_INFO, fix);
	if (ret < 0)
		return ret;
	if (c->data_file && c->nb_snaps) {
		check_report(c, "ERROR %u snapshots in image with data file", c->nb_snaps);
		res->corruptions++;
	}
	for (i = 0; i < c->nb_snaps; i++) {
		struct check_snap *sn = &c->snaps[i];

		if (!qcow2_aligned(img, sn->l1_off)) {
			check_report(c, "ERROR snapshot %s (%s) l1_offset=%#" PRIx64 ": L1 table is "
				     "not cluster aligned; snapshot table entry corrupted",
				     sn->id, sn->name, sn->l1_off);
			res->corruptions++;
			continue;
		}
		if (sn->l1_size > QCOW2_MAX_L1_BYTES / 8) {
			check_report(c, "ERROR snapshot %s (%s) l1_size=%#" PRIx32 ": L1 table is too "
				     "large; snapshot table entry corrupted",
				     sn->id, sn->name, sn->l1_size);
			res->corruptions++;
			continue;
		}
		ret = check_l1(c, sn->l1_off, sn->l1_size, 0, fix);
		if (ret < 0)
			return ret;
	}
	ret = check_inc(c, img->h.snapshots_offset, c->snaps_bytes);
	if (!ret)
		ret = check_inc(c, img->h.refcount_table_offset, c->reftable_size * 8);
	if (!ret && c->crypto_len)
		ret = check_inc(c, c->crypto_off, c->crypto_len);
	if (!ret)
		ret = check_bitmaps(c);
	if (!ret)
		ret = check_refblocks(c, fix);
	return ret;
}

/*
 * Compare the computed refcounts with the ones on disk; with @fix, correct
 * those the flags allow. A zero refcount on disk for a used cluster, or an
 * unreadable block, cannot be fixed in place: it asks for a rebuild.
 * Sets *@highest to the last cluster in use. 0 or -errno.
 */
static int check_compare(struct check *c, int fix, uint64_t *highest)
{
	struct qcow2_check_result *res = c->res;
	uint64_t i, rc1, rc2;
	int ret;

	*highest = 0;
	for (i = 0; i < c->nb_clusters; i++) {
		uint64_t *fixed = NULL;

		ret = check_refcount_get(c, i, &rc1);
		if (ret < 0) {
			check_report(c, "Can't get refcount for cluster %" PRIu64 ": %s", i,
				     strerror(-ret));
			res->check_errors++;
			continue;
		}
		rc2 = imrt_get(c, i);
		if (rc1 || rc2)
			*highest = i;
		if (rc1 == rc2)
			continue;
		if (rc1 == 0)
			c->rebuild = true;
		else if (rc1 > rc2 && (fix & QCOW2_FIX_LEAKS))
			fixed = &res->leaks_fixed;
		else if (rc1 < rc2 && (fix & QCOW2_FIX_ERRORS))
			fixed = &res->corruptions_fixed;
		check_report(c, "%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64,
			     fixed ? "Repairing" : rc1 < rc2 ? "ERROR" : "Leaked", i, rc1, rc2);
		if (fixed) {
			check_refcount_set(c, i, rc2);
			(*fixed)++;
		} else if (rc1 < rc2) {
			res->corruptions++;
		} else {
			res->leaks++;
		}
	}
	return check_rb_flush(c);
}

/* Append @n clusters at the end of the image (refcount 1); first in *@first. */
static int check_alloc_end(struct check *c, uint64_t n, uint64_t *first)
{
	uint64_t k = c->nb_clusters, i;
	int ret = imrt_resize(c, k + n);

	if (ret < 0)
		return ret;
	for (i = 0; i < n; i++)
		imrt_set(c, k + i, 1);
	*first = k;
	return 0;
}

/*
 * Write the refcount blocks for the clusters in use in [@first, @end), each
 * a slice of the in-memory table, allocating missing ones at the end of the
 * image (which extends the range, since they count themselves). *@rt grows
 * to whole clusters as needed. 1 if it grew, 0 if not, -errno.
 */
static int check_write_refblocks(struct check *c, uint64_t first, uint64_t end,
				 uint64_t **rt, uint64_t *rt_entries)
{
	uint64_t per_rb = 1ull << c->img->rb_bits, k, idx, off, blk;
	bool grown = false;
	int ret;

	for (k = first; k < end; k++) {
		if (!imrt_get(c, k))
			continue;
		idx = k / per_rb;
		if (idx < *rt_entries && (*rt)[idx]) {
			off = (*rt)[idx];
		} else {
			ret = check_alloc_end(c, 1, &blk);
			if (ret < 0)
				return ret;
			off = blk << c->cluster_bits;
			if (blk >= end)
				end = blk + 1;
			if (idx >= *rt_entries) {
				uint64_t n = round_up((idx + 1) * 8, c->cluster_size) / 8;
				uint64_t *p;

				if (n * 8 > QCOW2_MAX_REFTABLE_BYTES)
					return qcow2_error(c->img, -EFBIG,
							   "check: refcount table would be too large");
				p = realloc(*rt, n * 8);
				if (!p)
					return qcow2_error(c->img, -ENOMEM, "check: out of memory");
				memset(p + *rt_entries, 0, (n - *rt_entries) * 8);
				*rt = p;
				*rt_entries = n;
				grown = true;
			}
			(*rt)[idx] = off;
		}
		ret = check_write(c, c->imrt + idx * c->cluster_size, c->cluster_size, off);
		if (ret < 0)
			return ret;
		k = (idx + 1) * per_rb - 1;
	}
	return grown;
}

/* Point the header at a new refcount table: bytes 48..59 of sector 0. */
static int check_header_set_reftable(struct check *c, uint64_t off, uint32_t clusters)
{
	uint8_t *s = check_alloc(SECTOR);
	int ret;

	if (!s)
		return qcow2_error(c->img, -ENOMEM, "check: out of memory");
	ret = check_read(c, s, SECTOR, 0);
	if (!ret) {
		put_be64(s + 48, off);
		put_be32(s + 56, clusters);
		ret = check_write(c, s, SECTOR, 0);
	}
	if (!ret)
		ret = check_sync(c);
	free(s);
	if (ret < 0)
		return ret;
	c->img->h.refcount_table_offset = off;
	c->img->h.refcount_table_clusters = clusters;
	return 0;
}

/*
 * Write a new refcount structure from the computed refcounts, at the end of
 * the image so that nothing in use is overwritten before the header switches
 * to it; the old structure becomes free space. The table may grow while its
 * own clusters are counted, so allocate it until it stops growing. Tables
 * given up on the way stay allocated, leaked, like QEMU's. 0 or -errno.
 */
static int check_rebuild(struct check *c)
{
	uint64_t *rt = NULL, rt_entries = 0, rt_clusters = 0, rt_first = 0, i;
	uint8_t *buf = NULL;
	int ret;

	check_report(c, "Rebuilding refcount structure");
	c->rb_off = 0;
	ret = check_write_refblocks(c, 0, c->nb_clusters, &rt, &rt_entries);
	while (ret > 0) {
		rt_clusters = rt_entries * 8 / c->cluster_size;
		ret = check_alloc_end(c, rt_clusters, &rt_first);
		if (ret < 0)
			break;
		ret = check_write_refblocks(c, rt_first, rt_first + rt_clusters, &rt, &rt_entries);
	}
	if (ret < 0)
		goto out;
	if (!rt_clusters) {
		ret = qcow2_error(c->img, -EIO, "check: nothing to rebuild the refcounts from");
		goto out;
	}
	buf = check_alloc(rt_clusters * c->cluster_size);
	if (!buf) {
		ret = qcow2_error(c->img, -ENOMEM, "check: out of memory");
		goto out;
	}
	for (i = 0; i < rt_entries; i++)
		put_be64(buf + 8 * i, rt[i]);
	ret = check_write(c, buf, rt_clusters * c->cluster_size, rt_first << c->cluster_bits);
	if (!ret)
		ret = check_sync(c);
	if (!ret)
		ret = check_header_set_reftable(c, rt_first << c->cluster_bits, rt_clusters);
	if (ret < 0)
		goto out;
	free(c->reftable);
	c->reftable = rt;
	c->reftable_size = rt_entries;
	rt = NULL;
out:
	free(buf);
	free(rt);
	return ret;
}

/*
 * COPIED must be set exactly on the active L1 and L2 entries whose cluster
 * has refcount 1. Reads refcounts as they are on disk after any repair.
 */
static int check_oflag_copied(struct check *c, int fix)
{
	struct qcow2 *img = c->img;
	struct qcow2_check_result *res = c->res;
	uint32_t nr = 1u << img->l2_bits, eb = img->l2_entry_bytes, i, j;
	uint64_t l1_off = img->h.l1_table_offset, rc;
	uint8_t *l1;
	bool repair;
	int ret;

	if (fix & QCOW2_FIX_ERRORS)
		repair = true;
	else if (fix & QCOW2_FIX_LEAKS)
		/* Only when the refcounts are known to be right now. */
		repair = !res->check_errors && !res->corruptions && !res->leaks;
	else
		repair = false;
	if (!img->h.l1_size)
		return 0;
	ret = check_l1_read(c, l1_off, img->h.l1_size, &l1);
	if (ret < 0) {
		res->check_errors++;
		return ret;
	}
	for (i = 0; i < img->h.l1_size; i++) {
		uint64_t e = get_be64(l1 + 8 * (uint64_t)i), l2_off = e & L1E_OFFSET_MASK;
		uint64_t dirty = 0;

		if (!l2_off)
			continue;
		/* An unreadable refcount was reported already. */
		if (check_refcount_get(c, l2_off >> c->cluster_bits, &rc) < 0)
			continue;
		if ((rc == 1) != !!(e & QCOW2_OFLAG_COPIED)) {
			res->corruptions++;
			check_report(c, "%s OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%" PRIx64
				     " refcount=%" PRIu64, repair ? "Repairing" : "ERROR", i, e, rc);
			if (repair) {
				uint64_t sector = (8 * (uint64_t)i) & ~(uint64_t)(SECTOR - 1);

				e = rc == 1 ? e | QCOW2_OFLAG_COPIED : e & ~QCOW2_OFLAG_COPIED;
				put_be64(l1 + 8 * (uint64_t)i, e);
				ret = check_write(c, l1 + sector, SECTOR, l1_off + sector);
				if (ret < 0) {
					res->check_errors++;
					goto out;
				}
				if (img->l1.chunks && i < img->l1.nr) {
					ret = qcow2_table_set(&img->l1, i, e);
					if (ret < 0) {
						res->check_errors++;
						goto out;
					}
					qcow2_l1_note(img, i);
				}
				res->corruptions--;
				res->corruptions_fixed++;
			}
		}
		ret = check_read(c, c->l2, c->cluster_size, l2_off);
		if (ret < 0) {
			check_report(c, "ERROR: Could not read L2 table: %s", strerror(-ret));
			res->check_errors++;
			goto out;
		}
		for (j = 0; j < nr; j++) {
			uint8_t *p = c->l2 + (uint64_t)j * eb;
			uint64_t l2e = get_be64(p);
			enum cluster_type type = check_l2_type(c, l2e);

			if (type != CL_NORMAL && type != CL_ZERO_ALLOC)
				continue;
			if (c->data_file)
				rc = 1;
			else if (check_refcount_get(c, (l2e & L2E_OFFSET_MASK) >> c->cluster_bits,
						    &rc) < 0)
				continue;
			if ((rc == 1) == !!(l2e & QCOW2_OFLAG_COPIED))
				continue;
			res->corruptions++;
			check_report(c, "%s OFLAG_COPIED data cluster: l2_entry=%" PRIx64
				     " refcount=%" PRIu64, repair ? "Repairing" : "ERROR", l2e, rc);
			if (repair) {
				put_be64(p, rc == 1 ? l2e | QCOW2_OFLAG_COPIED
						    : l2e & ~QCOW2_OFLAG_COPIED);
				dirty++;
			}
		}
		if (dirty) {
			ret = check_write(c, c->l2, c->cluster_size, l2_off);
			if (ret < 0) {
				check_report(c, "ERROR: Could not write L2 table: %s", strerror(-ret));
				res->check_errors++;
				goto out;
			}
			res->corruptions -= dirty;
			res->corruptions_fixed += dirty;
		}
	}
	ret = 0;
out:
	free(l1);
	return ret;
}

/* Forget what one pass read; keep the I/O buffers. */
static void check_reset(struct check *c)
{
	free(c->imrt);
	free(c->reftable);
	free(c->snaps);
	free(c->snaps_raw);
	c->snaps_raw = NULL;
	c->snaps_incomplete = 0;
	c->imrt = NULL;
	c->imrt_bytes = 0;
	c->nb_clusters = 0;
	c->reftable = NULL;
	c->reftable_size = 0;
	c->rb_off = 0;
	c->rb_dirty = false;
	c->snaps = NULL;
	c->nb_snaps = 0;
	c->crypto_off = c->crypto_len = 0;
	c->nb_bitmaps = 0;
	c->bm_dir_off = c->bm_dir_size = 0;
	c->rebuild = false;
}

/* One check of the whole image, repairing what @fix allows (QEMU's order). */
static int check_pass(struct check *c, int fix)
{
	struct qcow2 *img = c->img;
	struct qcow2_check_result *res = c->res, pre, old, saved;
	uint64_t highest = 0, fresh_leaks = 0, nb;
	int ret;

	ret = check_file_size(c);
	if (ret < 0)
		goto err;
	nb = (c->file_size + c->cluster_size - 1) >> c->cluster_bits;
	if (nb > CHECK_MAX_CLUSTERS) {
		ret = qcow2_error(img, -EFBIG, "check: image file too large (%" PRIu64
				  " clusters, at most %" PRIu64 ")", nb, CHECK_MAX_CLUSTERS);
		goto err;
	}
	res->total_clusters = (img->h.size + c->cluster_size - 1) >> c->cluster_bits;
	ret = check_reftable_load(c);
	if (!ret)
		ret = check_snaps_load(c, fix);
	if (!ret)
		ret = check_exts_load(c);
	if (!ret)
		ret = imrt_resize(c, nb);
	if (ret < 0)
		goto err;
	ret = check_calculate(c, fix);
	if (ret < 0)
		return ret;

	/* Find out first whether the structure needs a rebuild. */
	pre = *res;
	ret = check_compare(c, 0, &highest);
	if (ret < 0)
		return ret;
	if (c->rebuild && (fix & QCOW2_FIX_ERRORS)) {
		old = *res;
		ret = check_rebuild(c);
		if (ret < 0)
			goto err;
		res->corruptions = 0;
		res->leaks = 0;
		c->rebuild = false;
		memset(c->imrt, 0, c->imrt_bytes);
		ret = check_file_size(c);
		if (!ret)
			ret = check_calculate(c, 0);
		if (ret < 0)
			return ret;
		if (fix & QCOW2_FIX_LEAKS) {
			/* Leaks now are tables the rebuild gave up on. */
			saved = *res;
			memset(res, 0, sizeof(*res));
			ret = check_compare(c, QCOW2_FIX_LEAKS, &highest);
			if (ret < 0)
				return ret;
			if (c->rebuild)
				check_report(c, "ERROR rebuilt refcount structure is still broken");
			fresh_leaks = res->leaks;
			*res = saved;
		}
		if (res->corruptions < old.corruptions)
			res->corruptions_fixed += old.corruptions - res->corruptions;
		if (res->leaks < old.leaks)
			res->leaks_fixed += old.leaks - res->leaks;
		res->leaks += fresh_leaks;
	} else if (fix) {
		if (c->rebuild) {
			check_report(c, "ERROR need to rebuild refcount structures");
			res->check_errors++;
			return qcow2_error(img, -EIO, "check: the refcount structure is broken; "
					   "only a full repair (-r all) can rebuild it");
		}
		if (res->leaks || res->corruptions) {
			*res = pre;
			ret = check_compare(c, fix, &highest);
			if (ret < 0)
				return ret;
		}
	}
	ret = check_oflag_copied(c, fix);
	if (ret < 0)
		return ret;
	res->image_end_offset = (highest + 1) << c->cluster_bits;
	return 0;
err:
	res->check_errors++;
	return ret;
}

/*
 * Write back everything the engine holds dirty. Queued frees are applied to
 * the cache at the end of a flush, so a second one may be needed for them.
 */
static int check_engine_flush(struct qcow2 *img)
{
	int i, ret;

	for (i = 0; i < 3; i++) {
		ret = qcow2_flush(img);
		if (ret < 0)
			return ret;
		if (!img->nr_frees && !img->rc_cache.nr_dirty && !img->l2_cache.nr_dirty &&
		    !img->l1_dirty && !img->reftable_dirty && !img->header_dirty)
			return 0;
	}
	return qcow2_error(img, -EBUSY, "check: metadata still dirty after flushing");
}

int qcow2_check(struct qcow2 *img, int fix, struct qcow2_check_result *res,
		void (*report)(void *opaque, const char *line), void *opaque)
{
	struct check c = {
		.img = img, .res = res, .report = report, .opaque = opaque,
		.cluster_bits = img->h.cluster_bits, .cluster_size = img->cluster_size,
		.data_file = img->h.incompatible & QCOW2_INCOMPAT_DATA_FILE,
		.extl2 = img->h.incompatible & QCOW2_INCOMPAT_EXTL2,
	};
	struct qcow2_check_result first;
	int ret, ret2;

	memset(res, 0, sizeof(*res));
	if (fix & ~(QCOW2_FIX_LEAKS | QCOW2_FIX_ERRORS))
		return qcow2_error(img, -EINVAL, "check: unknown repair flags %#x", fix);
	if (fix && img->read_only)
		return qcow2_error(img, -EROFS, "check: cannot repair an image opened read-only");
	if (!img->read_only) {
		ret = check_engine_flush(img);
		if (ret < 0)
			return ret;
	}
	c.rb = check_alloc(c.cluster_size);
	c.l2 = check_alloc(c.cluster_size);
	if (!c.rb || !c.l2) {
		ret = qcow2_error(img, -ENOMEM, "check: out of memory");
		goto out;
	}
	ret = check_pass(&c, fix);
	/* Not from refcounts the check could not get right. */
	if (!ret && c.snaps_incomplete && (fix & QCOW2_FIX_ERRORS) && !res->check_errors) {
		/* Last, as in QEMU: the engine allocates, so it learns the repairs first. */
		ret = c.wrote ? check_sync(&c) : 0;
		if (!ret && c.wrote)
			ret = qcow2_reload_refcounts(img);
		if (!ret)
			ret = check_snaps_rewrite(&c);
		if (ret < 0) {
			check_report(&c, "ERROR failed to update snapshot table: %s",
				     strerror(-ret));
			res->check_errors++;
		} else {
			/* What the rewrite fixed: the incomplete entries (QEMU's count). */
			res->corruptions -= c.snaps_incomplete < res->corruptions ?
						    c.snaps_incomplete : res->corruptions;
			res->corruptions_fixed += c.snaps_incomplete;
		}
	}
	if (!ret && (res->corruptions_fixed || res->leaks_fixed)) {
		/* Report what is left, as qemu-img does after a repair. */
		first = *res;
		memset(res, 0, sizeof(*res));
		check_reset(&c);
		ret = check_pass(&c, 0);
		res->corruptions_fixed = first.corruptions_fixed;
		res->leaks_fixed = first.leaks_fixed;
	}
	if (c.wrote) {
		ret2 = check_sync(&c);
		if (!ret2)
			ret2 = qcow2_reload_refcounts(img);
		if (!ret)
			ret = ret2;
	}
	/* A full repair that left nothing wrong clears the warning bits, as QEMU does. */
	if (!ret && (fix & QCOW2_FIX_ERRORS) && !res->corruptions && !res->check_errors &&
	    (img->h.incompatible & (QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DIRTY))) {
		img->h.incompatible &= ~(QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DIRTY);
		img->corrupt = false;
		ret = qcow2_header_write(img);
	}
out:
	check_reset(&c);
	free(c.rb);
	free(c.l2);
	return ret;
}

int qcow2_reload_refcounts(struct qcow2 *img)
{
	uint64_t bytes = (uint64_t)img->h.refcount_table_clusters << img->h.cluster_bits;
	struct qcow2_table rt = { 0 };
	int ret;

	if (!bytes || bytes > QCOW2_MAX_REFTABLE_BYTES ||
	    !qcow2_aligned(img, img->h.refcount_table_offset))
		return qcow2_error(img, -EINVAL, "invalid refcount table after repair");
	ret = qcow2_table_load(img, img->h.refcount_table_offset, bytes / 8, &rt);
	if (ret < 0) {
		qcow2_table_free(&rt);
		if (ret == -ENOMEM)
			return qcow2_error(img, ret, "out of memory");
		return ret;
	}
	qcow2_cache_drop(&img->rc_cache);
	qcow2_cache_drop(&img->l2_cache);
	qcow2_table_swap(&img->reftable, &rt);
	qcow2_table_free(&rt);
	qcow2_overlap_reset(img);
	img->reftable_dirty = false;
	img->free_hint = 0;
	return 0;
}
