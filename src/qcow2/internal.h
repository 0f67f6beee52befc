/* SPDX-License-Identifier: MIT */
/*
 * Structures shared inside the qcow2 engine: the on-disk layout (field
 * offsets, flag bits, byte order), the in-memory image, the slice caches and
 * the wait queues requests park on. Nothing outside src/qcow2 includes this.
 */
#ifndef QCOW2_INTERNAL_H
#define QCOW2_INTERNAL_H

#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <string.h>
#include <sys/types.h>

#include "qcow2.h"

/* ---- On-disk format (docs/interop/qcow2.rst); all fields big-endian --- */

#define QCOW2_MAGIC			0x514649fbu	/* "QFI\xfb" */
#define QCOW2_V2_HEADER_LEN		72
#define QCOW2_V3_HEADER_LEN		104
#define QCOW2_MIN_CLUSTER_BITS		9
#define QCOW2_MAX_CLUSTER_BITS		21
#define QCOW2_MAX_L1_BYTES		(32u << 20)	/* QEMU's limit */
#define QCOW2_MAX_REFTABLE_BYTES	(8u << 20)	/* QEMU's limit */
#define QCOW2_MAX_BACKING_NAME		1023

#define QCOW2_INCOMPAT_DIRTY		(1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT		(1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE	(1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION	(1ull << 3)
#define QCOW2_INCOMPAT_EXTL2		(1ull << 4)
#define QCOW2_COMPAT_LAZY_REFCOUNTS	(1ull << 0)
#define QCOW2_AUTOCLEAR_BITMAPS		(1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW	(1ull << 1)

#define QCOW2_EXT_END			0x00000000u
#define QCOW2_EXT_BACKING_FMT		0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE		0x6803f857u
#define QCOW2_EXT_BITMAPS		0x23852875u
#define QCOW2_EXT_CRYPTO		0x0537be77u
#define QCOW2_EXT_DATA_FILE		0x44415441u

/* L1 entry: bits 9-55 L2 table offset, bit 63 COPIED. */
#define L1E_OFFSET_MASK			0x00fffffffffffe00ull
#define L1E_RESERVED_MASK		0x7f000000000001ffull
/* L2 entry (standard): bit 0 zero, bits 9-55 host offset, 62 compressed, 63 COPIED. */
#define L2E_OFFSET_MASK			0x00fffffffffffe00ull
#define L2E_RESERVED_MASK		0x3f000000000001feull
#define L2E_ZERO			(1ull << 0)
#define L2E_COMPRESSED			(1ull << 62)
#define QCOW2_OFLAG_COPIED		(1ull << 63)
/* Refcount table entry: bits 9-63 refcount block offset. */
#define RTE_OFFSET_MASK			0xfffffffffffffe00ull
#define RTE_RESERVED_MASK		0x00000000000001ffull

static inline uint16_t get_be16(const void *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static inline uint32_t get_be32(const void *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static inline uint64_t get_be64(const void *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }
static inline void put_be16(void *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static inline void put_be32(void *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static inline void put_be64(void *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }

/* Write a header extension at @off of @buf; returns the offset after it (padded to 8). */
static inline uint32_t qcow2_put_ext(uint8_t *buf, uint32_t off, uint32_t type,
				     const void *data, uint32_t len)
{
	put_be32(buf + off, type);
	put_be32(buf + off + 4, len);
	memcpy(buf + off + 8, data, len);
	return off + 8 + ((len + 7) & ~7u);
}

/* The header, parsed into host byte order (header.c owns the layout). */
struct qcow2_header {
	uint32_t version;
	uint64_t backing_file_offset;
	uint32_t backing_file_size;
	uint32_t cluster_bits;
	uint64_t size;
	uint32_t crypt_method;
	uint32_t l1_size;
	uint64_t l1_table_offset;
	uint64_t refcount_table_offset;
	uint32_t refcount_table_clusters;
	uint32_t nb_snapshots;
	uint64_t snapshots_offset;
	uint64_t incompatible;
	uint64_t compatible;
	uint64_t autoclear;
	uint32_t refcount_order;
	uint32_t header_length;
	uint8_t compression_type;
};

/*
 * Parse and validate the first cluster of an image (@buf, @len bytes, at
 * least the whole header and its extensions) into @img's header fields and
 * extensions. 0 or -errno with img->errmsg set.
 */
struct qcow2;
int qcow2_header_parse(struct qcow2 *img, const uint8_t *buf, size_t len, uint64_t file_size);

/*
 * Serialize the header and the extensions this engine keeps into @buf
 * (@len bytes, zero-filled by the caller): the header cluster as a whole.
 * Returns the bytes used or -ENOSPC if they do not fit.
 */
int qcow2_header_serialize(const struct qcow2 *img, uint8_t *buf, size_t len);

/* Write the header cluster from @img and fdatasync (blocking). 0 or -errno. */
int qcow2_header_write(struct qcow2 *img);

/* ---- Waiting ---------------------------------------------------------- */

/*
 * A parked continuation. Whoever a request waits on (a slice being loaded,
 * an in-flight allocation, a flush) keeps a list of these and calls fn once
 * with 0 (retry) or a negative errno (give up).
 */
struct qcow2_wait {
	struct qcow2_wait *next;
	void (*fn)(struct qcow2_wait *w, int res);
};

struct qcow2_waitq {
	struct qcow2_wait *head, *tail;
};

static inline void qcow2_waitq_add(struct qcow2_waitq *q, struct qcow2_wait *w)
{
	w->next = NULL;
	if (q->tail)
		q->tail->next = w;
	else
		q->head = w;
	q->tail = w;
}

/* Wake everyone on @q with @res; safe against re-parking from fn. */
void qcow2_waitq_wake(struct qcow2_waitq *q, int res);

/* ---- Slice caches (cache.c) -------------------------------------------- */

enum qcow2_slice_state {
	SLICE_EMPTY,
	SLICE_LOADING,
	SLICE_READY,
};

struct qcow2_slice {
	uint64_t off;			/* host offset of the slice */
	uint64_t lru;
	uint32_t ref;			/* pins held within one step */
	uint8_t state;
	bool dirty;
	bool writing;			/* held by a flush until it ends: not evictable */
	bool flushing;			/* a flush writes its buffer: modifiers wait */
	struct qcow2_slice *hnext;	/* hash chain */
	struct qcow2_waitq waiters;
	struct qcow2_cache *cache;
	uint8_t *data;
	struct qcow2_aio aio;
	struct iovec iov;
};

struct qcow2_cache {
	struct qcow2 *img;
	const char *name;		/* "L2" or "refcount", for messages */
	struct qcow2_slice *slices;
	unsigned int nr;
	uint32_t slice_bytes;
	uint8_t *buf;
	struct qcow2_slice **hash;
	unsigned int hash_mask;
	uint64_t lru_clock;
	unsigned int nr_dirty;
	struct qcow2_waitq full_waiters;	/* parked because every slice was busy */
};

int qcow2_cache_init(struct qcow2_cache *c, struct qcow2 *img, const char *name,
		     unsigned int nr, uint32_t slice_bytes);
void qcow2_cache_destroy(struct qcow2_cache *c);

#define QCOW2_CACHE_NOLOAD	1	/* caller knows the slice is zeros on disk */
#define QCOW2_CACHE_NOFLUSH	2	/* -ENOBUFS instead of flushing for room */
#define QCOW2_CACHE_MODIFY	4	/* caller changes the slice: wait out its write */

/*
 * Find the slice at host offset @off, loading it if needed. 0 with the
 * slice pinned in *@out; -EAGAIN with @w parked (called back when worth a
 * retry); or -errno. Release with qcow2_cache_put before returning to the
 * event loop. A caller that will change the slice passes QCOW2_CACHE_MODIFY:
 * a flush writes slices from the cache itself, so it parks while one does.
 */
int qcow2_cache_get(struct qcow2_cache *c, uint64_t off, int flags,
		    struct qcow2_wait *w, struct qcow2_slice **out);
void qcow2_cache_put(struct qcow2_slice *s);
void qcow2_cache_mark_dirty(struct qcow2_slice *s);
/* The flush's write of @s is over: its modifiers go on. */
void qcow2_cache_write_done(struct qcow2_slice *s);
/* Forget every slice (after check -r rewrote metadata behind the cache). */
void qcow2_cache_drop(struct qcow2_cache *c);

/* ---- Sparse L1 / refcount tables (table.c) ------------------------------------ */

/*
 * A table of 64-bit entries (host byte order) held in chunks of
 * QCOW2_TABLE_CHUNK entries (4 KiB), a chunk allocated only once an entry
 * in it becomes nonzero. Absent chunks point at one shared chunk of zeros
 * (never written), so that a read needs no test: the L1 lookup and the
 * overlap scan run for every I/O. The L1 table of a
 * fresh 4 TiB image with 4 KiB clusters is 16 MiB of zeros; held this way
 * it costs its pointer array (32 KiB) plus the chunks in use.
 */
#define QCOW2_TABLE_CHUNK_BITS	9
#define QCOW2_TABLE_CHUNK	(1u << QCOW2_TABLE_CHUNK_BITS)
extern const uint64_t qcow2_table_zero[QCOW2_TABLE_CHUNK];
struct qcow2_table {
	uint64_t **chunks;		/* absent ones: qcow2_table_zero */
	uint64_t nr;			/* entries it holds (readable, settable) */
	uint64_t nr_held;		/* chunks allocated */
};

/* Allocate chunk @k (zeroed). 0 or -ENOMEM. */
int qcow2_table_chunk_alloc(struct qcow2_table *t, uint64_t k);

/* Entry @i (< t->nr). */
static inline uint64_t qcow2_table_get(const struct qcow2_table *t, uint64_t i)
{
	return t->chunks[i >> QCOW2_TABLE_CHUNK_BITS][i & (QCOW2_TABLE_CHUNK - 1)];
}

/* Set entry @i (< t->nr) to @v. 0, or -ENOMEM when its chunk cannot be allocated. */
static inline int qcow2_table_set(struct qcow2_table *t, uint64_t i, uint64_t v)
{
	uint64_t k = i >> QCOW2_TABLE_CHUNK_BITS;

	if (t->chunks[k] == qcow2_table_zero) {
		int ret;

		if (!v)
			return 0;
		ret = qcow2_table_chunk_alloc(t, k);
		if (ret < 0)
			return ret;
	}
	t->chunks[k][i & (QCOW2_TABLE_CHUNK - 1)] = v;
	return 0;
}

/* An empty table of @nr entries (all zero). 0 or -ENOMEM. */
int qcow2_table_init(struct qcow2_table *t, uint64_t nr);
void qcow2_table_free(struct qcow2_table *t);
/*
 * Make @t hold @nr entries: new ones read zero, entries past a smaller @nr
 * are dropped. 0, or -ENOMEM with @t unchanged.
 */
int qcow2_table_resize(struct qcow2_table *t, uint64_t nr);
/* Allocate the chunks of entries [@first, @first + @n), so that setting them cannot fail. */
int qcow2_table_reserve(struct qcow2_table *t, uint64_t first, uint64_t n);
/* Entries [@first, @first + @n) big-endian into @be; those past t->nr are zeros. */
void qcow2_table_read_be(const struct qcow2_table *t, uint64_t first, uint64_t n, uint64_t *be);
/*
 * Set entries [@first, @first + @n) from big-endian @be; zero entries of
 * NULL chunks allocate nothing. 0 or -ENOMEM (some entries set).
 */
int qcow2_table_load_be(struct qcow2_table *t, uint64_t first, const uint64_t *be, uint64_t n);
/* Is the chunk holding entry @i absent (all its entries zero)? */
static inline bool qcow2_table_hole(const struct qcow2_table *t, uint64_t i)
{
	return t->chunks[i >> QCOW2_TABLE_CHUNK_BITS] == qcow2_table_zero;
}
/* One past the last nonzero entry below @n. */
uint64_t qcow2_table_hi(const struct qcow2_table *t, uint64_t n);
/* Memory the table holds: its pointer array and chunks. */
uint64_t qcow2_table_bytes(const struct qcow2_table *t);
/* Every entry zero: the chunks go. */
void qcow2_table_clear(struct qcow2_table *t);
/*
 * Read the table of @entries at @off of @img's file into @t (initialized
 * here; free it even on failure) through a bounded buffer. 0 or -errno.
 */
int qcow2_table_load(struct qcow2 *img, uint64_t off, uint64_t entries, struct qcow2_table *t);
/* Exchange the contents of @a and @b. */
void qcow2_table_swap(struct qcow2_table *a, struct qcow2_table *b);


/* ---- The image --------------------------------------------------------- */

/*
 * The 512-byte pieces (64 entries) of the L1 or refcount table changed since
 * the last flush, so that a flush copies and writes those, not the whole
 * table (4 MiB of L1 per TiB of disk with 4 KiB clusters).
 */
#define QCOW2_PIECE_ENTRIES	64
struct qcow2_pieces {
	uint64_t *bits;
	uint64_t nr;			/* pieces the bitmap covers */
	uint64_t nr_dirty;
};

/*
 * Entry @i of a table changed: mark its piece, or the whole table (*@whole)
 * where the bitmap does not reach (a table grown since open).
 */
static inline void qcow2_pieces_mark(struct qcow2_pieces *p, bool *whole, uint64_t i)
{
	uint64_t k = i / QCOW2_PIECE_ENTRIES;

	if (k >= p->nr) {
		*whole = true;
	} else if (!(p->bits[k / 64] & (1ull << (k % 64)))) {
		p->bits[k / 64] |= 1ull << (k % 64);
		p->nr_dirty++;
	}
}

/* A deferred refcount decrement: applied once the L2 change is durable. */
struct qcow2_free {
	uint64_t host_off;
	uint64_t nr_clusters;
};

/* A guest range whose mapping a request is changing; others wait on it. */
struct qcow2_inflight {
	struct qcow2_inflight *next;
	uint64_t guest_off;
	uint64_t len;
	struct qcow2_waitq waiters;
};

struct qcow2_flush_job;
struct qcow2_rc_grow;

struct qcow2 {
	struct qcow2_io *io;
	char *path;
	int fd;
	bool read_only;
	bool corrupt;
	bool snaps_past_eof;		/* the snapshot table starts past the end of the file */
	bool raw;			/* raw image: guest offset == file offset */
	struct qcow2 *backing;		/* opened backing image, NULL if none */
	unsigned int depth;		/* 0 for the image the user opened */
	struct qcow2_header h;

	uint32_t cluster_size;
	uint32_t refcount_bits;
	uint64_t refcount_max;
	uint32_t l2_bits;		/* log2 of L2 entries per table */
	uint32_t l2_entry_bytes;	/* 8, or 16 with extended L2 */
	uint32_t unit_bits;		/* log2 of the mapping unit: cluster or subcluster */
	uint32_t rb_bits;		/* log2 of refcount entries per block */
	uint64_t file_size;		/* at open; allocation may grow past it */
	uint64_t file_end;		/* past every byte written: beyond is holes */
	bool grow_ok;			/* refcount.c may fallocate ahead */
	uint64_t grow_end;		/* the file's length after its last fallocate */

	char *backing_file;
	char *backing_fmt;
	char *data_file;
	int data_fd;			/* external data file, or -1 */
	bool data_raw;			/* data_file_raw: the data file is the raw disk */
	bool no_data_file;		/* opts.no_data_file: see qcow2.h */
	uint8_t *unknown_exts;		/* extensions we keep verbatim */
	uint32_t unknown_exts_len;

	struct qcow2_table l1;		/* l1.nr == h.l1_size */
	bool l1_dirty;			/* the whole table is to be written */
	struct qcow2_pieces l1_pieces;	/* or only these parts */
	struct qcow2_table reftable;	/* reftable.nr: entries of its clusters */
	bool reftable_dirty;		/* the whole table is to be written */
	struct qcow2_pieces rt_pieces;	/* or only these parts */
	bool header_dirty;
	uint64_t free_hint;		/* cluster index: nothing below is free */

	struct qcow2_cache l2_cache;
	struct qcow2_cache rc_cache;

	struct qcow2_inflight *inflight;
	struct qcow2_free *frees;	/* decrements waiting for a flush */
	size_t nr_frees, frees_alloc;
	size_t nr_frees_sealed;		/* covered by the flush in progress */
	uint64_t free_progress;		/* clusters of frees[0] already applied */
	struct qcow2_rc_grow *rc_grow;	/* refcount block creation / table growth */

	struct qcow2_flush_job *flush;
	unsigned int nr_reqs_active;
	size_t scratch_bytes;		/* requests' COW, compression and crypto buffers */
	uint8_t *zero_buf;		/* max cluster size of zeros, mmap'd */
	struct qcow2_crypt *crypt;	/* encrypted images only (crypto.c) */
	uint64_t crypt_hdr_off;		/* crypto header extension: LUKS header area */
	uint64_t crypt_hdr_len;

	char errmsg[256];

	uint64_t free_byte_off;		/* compressed writes: next free byte of a
					 * partly used host cluster, or 0 */

	struct qcow2_ol_snap *ol_snaps;	/* overlap.c: snapshot L1 tables */
	uint32_t ol_nr_snaps;
	uint64_t ol_snap_bytes;		/* bytes of the snapshot table */
	/*
	 * overlap.c scans only the L1 and refcount table entries below these
	 * marks (every write pays for the scan); recomputed when a table is
	 * replaced or resized. Whoever sets an entry in place calls
	 * qcow2_l1_note() / qcow2_reftable_note().
	 */
	const void *ol_l1, *ol_rt;	/* the tables' chunk arrays the marks were computed for */
	uint64_t ol_l1_size, ol_rt_size;
	uint64_t ol_l1_hi, ol_rt_hi;
};

/* Record a message (one line, names the file) and return @err. */
int qcow2_error(struct qcow2 *img, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* Mark the image corrupt (header bit set on the next flush), return -EIO. */
int qcow2_corrupt(struct qcow2 *img, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/*
 * Hand @aio to the backend, keeping img->file_end past every write so that
 * clusters beyond it are known to read as zeros. 0 or -errno.
 */
static inline int qcow2_submit(struct qcow2 *img, struct qcow2_aio *aio)
{
	if (aio->op == QCOW2_AIO_WRITE && aio->fd == img->fd) {
		uint64_t end = aio->off;
		unsigned int i;

		for (i = 0; i < aio->iovcnt; i++)
			end += aio->iov[i].iov_len;
		if (end > img->file_end)
			img->file_end = end;
	}
	return img->io->submit(img->io, aio);
}

/* Blocking file I/O through the backend (open, create, check). 0 or -errno;
 * reads past the end of the file return zeros. */
int qcow2_io_pread(struct qcow2_io *io, int fd, void *buf, size_t len, uint64_t off);
int qcow2_io_pwrite(struct qcow2_io *io, int fd, const void *buf, size_t len, uint64_t off);
int qcow2_io_fsync(struct qcow2_io *io, int fd);

/* Where data clusters live: the external data file, or the image itself. */
static inline int qcow2_data_fd(const struct qcow2 *img)
{
	return img->data_fd >= 0 ? img->data_fd : img->fd;
}

/*
 * Whether uncompressed L2 entry @e points at a host cluster: in an external
 * data file offset 0 is guest cluster 0, so there COPIED tells.
 */
static inline bool qcow2_l2e_has_cluster(const struct qcow2 *img, uint64_t e)
{
	return (e & L2E_OFFSET_MASK) || (img->data_fd >= 0 && (e & QCOW2_OFLAG_COPIED));
}

/* ---- Index math ---------------------------------------------------------- */

static inline uint64_t qcow2_l2_span(const struct qcow2 *img)
{
	return (uint64_t)img->cluster_size << img->l2_bits;
}

static inline uint64_t qcow2_l1_index(const struct qcow2 *img, uint64_t guest_off)
{
	return guest_off >> (img->h.cluster_bits + img->l2_bits);
}

static inline uint64_t qcow2_l2_index(const struct qcow2 *img, uint64_t guest_off)
{
	return (guest_off >> img->h.cluster_bits) & ((1ull << img->l2_bits) - 1);
}

static inline uint64_t qcow2_cluster_off(const struct qcow2 *img, uint64_t off)
{
	return off & ~((uint64_t)img->cluster_size - 1);
}

static inline bool qcow2_aligned(const struct qcow2 *img, uint64_t off)
{
	return (off & (img->cluster_size - 1)) == 0;
}

/* Refcount entries of @order bits (0..6), as QEMU lays them out: sub-byte
 * widths fill each byte from its least significant bit, wider ones are
 * big-endian. */
static inline uint64_t qcow2_rc_read(const uint8_t *blk, uint64_t i, uint32_t order)
{
	switch (order) {
	case 0: return (blk[i / 8] >> (i % 8)) & 1;
	case 1: return (blk[i / 4] >> (2 * (i % 4))) & 3;
	case 2: return (blk[i / 2] >> (4 * (i % 2))) & 15;
	case 3: return blk[i];
	case 4: return get_be16(blk + 2 * i);
	case 5: return get_be32(blk + 4 * i);
	default: return get_be64(blk + 8 * i);
	}
}

static inline void qcow2_rc_write(uint8_t *blk, uint64_t i, uint32_t order, uint64_t v)
{
	unsigned int shift;

	switch (order) {
	case 0: shift = i % 8; blk[i / 8] = (blk[i / 8] & ~(1u << shift)) | (v << shift); break;
	case 1: shift = 2 * (i % 4); blk[i / 4] = (blk[i / 4] & ~(3u << shift)) | (v << shift); break;
	case 2: shift = 4 * (i % 2); blk[i / 2] = (blk[i / 2] & ~(15u << shift)) | (v << shift); break;
	case 3: blk[i] = v; break;
	case 4: put_be16(blk + 2 * i, v); break;
	case 5: put_be32(blk + 4 * i, v); break;
	default: put_be64(blk + 8 * i, v); break;
	}
}

/* ---- Refcounts (refcount.c) ---------------------------------------------- */

/* Read the refcount of host cluster @cluster. 0 / -EAGAIN (parked) / -errno. */
int qcow2_refcount_get(struct qcow2 *img, uint64_t cluster, struct qcow2_wait *w,
		       uint64_t *out);
/*
 * Allocate up to @want contiguous free clusters (refcount set to 1 in the
 * cache). 0 with *@host_off and *@got (>= 1) / -EAGAIN (parked) / -errno.
 */
int qcow2_alloc_clusters(struct qcow2 *img, uint64_t want, struct qcow2_wait *w,
			 uint64_t *host_off, uint64_t *got);
/*
 * Fresh clusters [@off, +@len) that get only part of their bytes written:
 * allocate the rest in the file too (best effort).
 */
void qcow2_reserve_fresh(struct qcow2 *img, uint64_t off, uint64_t len);
/* Queue a decrement of @nr clusters at @host_off for after the next flush. */
int qcow2_free_clusters(struct qcow2 *img, uint64_t host_off, uint64_t nr);
/* Apply the frees sealed by the current flush. 0 / -EAGAIN (parked) / -errno. */
int qcow2_apply_frees(struct qcow2 *img, struct qcow2_wait *w);
void qcow2_refcount_free(struct qcow2 *img);

/* ---- Requests (request.c, cluster.c, write.c) ----------------------------- */

/* Buffer and offset alignment that O_DIRECT may ask for (the largest logical block). */
#define QCOW2_DIO_ALIGN	4096
/* Scratch buffer bytes finished requests may keep for reuse (request.c). */
#define QCOW2_SCRATCH_KEEP	(4u << 20)

#define REQ_AIOS	8

enum l2_type {
	L2_UNALLOC,
	L2_ZERO_PLAIN,
	L2_ZERO_ALLOC,
	L2_NORMAL,
	L2_COMPRESSED,
};

enum alloc_state {
	ALLOC_NONE,
	ALLOC_COW,		/* reading what the write does not cover, or
				 * waiting for the write's data (fetch) */
	ALLOC_DATA,		/* cluster data being written */
	ALLOC_LINK,		/* data written: set the L2 entries */
	ALLOC_L2_READ,		/* shared L2 table being read for its copy */
	ALLOC_L2_COPY,		/* read: write the copy (from dbuf) */
	ALLOC_L2_ZERO,		/* new L2 table being written */
	ALLOC_L2_LINK,		/* zeroed: set the L1 entry */
};

struct req_aio {
	struct qcow2_aio aio;
	struct iovec iov[3];
	struct qcow2_req *req;
	size_t len;
	bool busy;
	bool alloc;			/* completes the allocation in progress */
	bool compressed;		/* cbuf: decompress, copy to dst */
	bool cow;			/* a read the allocation waits for */
	bool cow_copy;			/* dbuf holds the old cluster: cow_fill */
	uint8_t *dst;
	uint32_t dst_skip;
	uint32_t c_skip, c_len;		/* compressed bytes within the aligned read */
	bool decrypt;			/* encrypted data: decrypt once read */
	uint64_t crypt_guest;		/* guest offset of the bytes (legacy AES IVs) */
};

struct qcow2_req {
	struct qcow2 *img;
	enum qcow2_op op;
	uint64_t off, len, pos;
	uint8_t *buf;
	uint8_t *data;			/* where the WRITE's bytes are (buf, or landed in cow) */
	qcow2_fetch_fn fetch;		/* deferred data: ask for it when needed */
	qcow2_fetch_fn fetch_next;	/* set by qcow2_req_defer_data for the next submit */
	bool fetching;			/* asked, not yet ready */
	bool opaque;			/* buf is opaque (qcow2_req_opaque): never touch it */
	bool opaque_next;		/* set by qcow2_req_opaque for the next submit */
	qcow2_done_fn done;
	void *priv;
	unsigned int pending;
	int err;
	bool active, stepping, again;
	bool parked;			/* r->wait sits on some wait queue */
	unsigned int wakes;
	struct qcow2_wait wait;

	enum alloc_state alloc;
	struct qcow2_inflight flight;
	uint64_t a_guest;		/* first guest byte the allocation covers */
	uint64_t a_end;			/* guest byte after the write */
	uint64_t a_host;		/* host offset of the first cluster */
	uint64_t a_nr;			/* clusters */
	bool a_new;			/* refcounts were raised for it */
	uint64_t a_l1;			/* L1 index (L2 table allocation) */
	uint64_t a_old_l2;		/* shared L2 table being copied, or 0 */

	bool a_cow;			/* head/tail come from r->cow, not zeros */
	uint64_t a_ws, a_we;		/* guest range written: whole clusters, or with
					 * extended L2 the touched subclusters */
	uint64_t a_bitmap;		/* extended L2: the bitmap LINK stores */
	uint32_t a_zmask;		/* extended L2: subclusters the COW fill zeroes */
	uint32_t a_bmask;		/* ... whose unwritten bytes then come from the
					 * backing file (a shared cluster lacked them) */
	unsigned int cow_pending;	/* COW reads in flight */
	uint64_t a_old;			/* L2 entry to release after LINK, or 0 */
	uint8_t *cow;			/* head and tail clusters (2 clusters), lazily;
					 * with one cluster allocated, both are in the first */
	struct qcow2_req *sub[2];	/* reads from the backing image */
	bool sub_busy[2];
	uint8_t *cbuf;			/* compressed bytes (2 clusters), lazily */
	uint8_t *dbuf;			/* one decompressed cluster, lazily */
	bool cbuf_busy;
	uint8_t *crypt_buf;		/* encrypted write data (crypto.c), lazily */
	size_t crypt_buf_len;

	struct req_aio aios[REQ_AIOS];
};

/* L2 entry @idx of an L2 slice (8 bytes, or 16 with extended L2). */
static inline uint64_t qcow2_l2_get(const struct qcow2_slice *s, uint64_t idx)
{
	return get_be64(s->data + idx * s->cache->img->l2_entry_bytes);
}

static inline void qcow2_l2_set(struct qcow2_slice *s, uint64_t idx, uint64_t v)
{
	put_be64(s->data + idx * s->cache->img->l2_entry_bytes, v);
}

/* Extended L2: the subcluster bitmap after the entry (0 without extended L2). */
static inline uint64_t qcow2_l2_bitmap(const struct qcow2_slice *s, uint64_t idx)
{
	if (s->cache->img->l2_entry_bytes != 16)
		return 0;
	return get_be64(s->data + idx * 16 + 8);
}

static inline void qcow2_l2_set_bitmap(struct qcow2_slice *s, uint64_t idx, uint64_t v)
{
	put_be64(s->data + idx * 16 + 8, v);
}

/* Extended L2: subclusters per cluster, and the bitmap bits of subcluster @sc. */
#define QCOW2_SUBCLUSTERS		32
#define L2B_ALLOC(sc)			(1ull << (sc))
#define L2B_ZERO(sc)			(1ull << (32 + (sc)))
#define L2B_ALL_ALLOC			0x00000000ffffffffull

/* cluster.c: L1/L2 entries and lookups. */
int qcow2_l2_classify(struct qcow2 *img, uint64_t e, enum l2_type *type, uint64_t *host);
int qcow2_l2_classify_sc(struct qcow2 *img, uint64_t e, uint64_t bitmap, unsigned int sc,
			 enum l2_type *type, uint64_t *host);
int qcow2_free_entry(struct qcow2 *img, uint64_t e);
int qcow2_l1_lookup(struct qcow2 *img, uint64_t pos, uint64_t *l2_off, uint64_t *l1e);
void qcow2_l2_locate(struct qcow2 *img, uint64_t l2_off, uint64_t pos,
		     uint64_t *slice_off, uint64_t *idx);
int qcow2_lookup_run(struct qcow2 *img, uint64_t pos, uint64_t end, struct qcow2_wait *w,
		     enum l2_type *type, uint64_t *host, uint64_t *run);

/* request.c: the state machine and data I/O. */
void qcow2_req_step(struct qcow2_req *r);
struct req_aio *qcow2_req_aio_get(struct qcow2_req *r);
int qcow2_req_aio_submit(struct qcow2_req *r, struct req_aio *a, enum qcow2_aio_op op,
			 uint64_t host_off, unsigned int iovcnt, bool alloc);
/* The same for guest data: to the external data file when there is one. */
int qcow2_req_data_submit(struct qcow2_req *r, struct req_aio *a, enum qcow2_aio_op op,
			  uint64_t host_off, unsigned int iovcnt, bool alloc);
int qcow2_req_cbufs(struct qcow2_req *r);
int qcow2_backing_read(struct qcow2_req *r, uint8_t *dst, uint64_t off, uint64_t len);
int qcow2_read_compressed(struct qcow2_req *r, struct req_aio *a, uint64_t e,
			  uint8_t *dst, uint64_t len, bool cow);

/* write.c: allocating writes, copy-on-write, write-zeroes and discard. */
int qcow2_write_piece(struct qcow2_req *r, uint64_t end);
int qcow2_zero_piece(struct qcow2_req *r);
int qcow2_alloc_write(struct qcow2_req *r, struct req_aio *a);
int qcow2_alloc_link(struct qcow2_req *r);
int qcow2_l2_table_copy(struct qcow2_req *r, struct req_aio *a);
int qcow2_l2_table_link(struct qcow2_req *r);
void qcow2_inflight_del(struct qcow2_req *r);
void qcow2_alloc_abort(struct qcow2_req *r);
bool qcow2_data_wait(struct qcow2_req *r, uint8_t *dst);
void qcow2_cow_fill(struct qcow2_req *r, const uint8_t *old);

/* ---- Backing chain (backing.c) ----------------------------------------------- */

#define QCOW2_MAX_CHAIN		64

/* Files already in the chain being opened, to refuse loops. */
struct qcow2_chain {
	dev_t dev[QCOW2_MAX_CHAIN + 1];
	ino_t ino[QCOW2_MAX_CHAIN + 1];
	unsigned int n;
};

int qcow2_open_chain(struct qcow2 **out, const char *path, const struct qcow2_opts *opts,
		     struct qcow2_io *io, char *err, size_t errlen, struct qcow2_chain *chain);
/* @name relative to the directory of @image, unless absolute; malloc'ed or NULL. */
char *qcow2_relative_path(const char *image, const char *name);
/* -EPERM if opts->max_backing refuses img's backing file. */
int qcow2_backing_allowed(struct qcow2 *img, const struct qcow2_opts *opts);
/* Open img's backing file (after its header is parsed). 0 or -errno. */
int qcow2_backing_open(struct qcow2 *img, const struct qcow2_opts *opts,
		       struct qcow2_chain *chain);

/* ---- Compressed clusters (compress.c) -------------------------------------- */

int qcow2_compressed_locate(struct qcow2 *img, uint64_t e, uint64_t *off, uint32_t *len);
int qcow2_decompress(struct qcow2 *img, const uint8_t *src, size_t src_len, uint8_t *dst);

/* ---- Flush (flush.c) ------------------------------------------------------ */

/*
 * Write every dirty metadata slice back in dependency order and fdatasync;
 * @w is called when a flush that started after this call has completed.
 * Returns -EAGAIN (parked) or -errno.
 */
int qcow2_flush_start(struct qcow2 *img, struct qcow2_wait *w);
bool qcow2_flush_busy(const struct qcow2 *img);
void qcow2_flush_free(struct qcow2 *img);

/* ---- Check (check.c) ------------------------------------------------------ */

/* Drop caches and reload the refcount table after check rewrote metadata. */
int qcow2_reload_refcounts(struct qcow2 *img);

/* ---- Internal snapshots (snapshot.c) ---------------------------------------- */

/* One entry of the snapshot table (docs/interop/qcow2.rst, "Snapshots"). */
struct qcow2_snap {
	uint64_t l1_off;
	uint32_t l1_size;
	char *id;
	char *name;
	uint32_t date_sec;
	uint32_t date_nsec;
	uint64_t vm_clock_nsec;
	uint64_t vm_state_size;		/* the 64-bit field when present */
	uint64_t disk_size;		/* the image's size when absent */
	uint64_t icount;		/* UINT64_MAX when absent */
	uint8_t *extra;			/* extra data past the fields we know, verbatim */
	uint32_t extra_len;
};

struct qcow2_snap_table {
	struct qcow2_snap *s;
	uint32_t nr;
	uint64_t bytes;			/* on disk, from h.snapshots_offset */
};

/* Read and validate the snapshot table the header points to. 0 or -errno. */
int qcow2_snap_table_read(struct qcow2 *img, struct qcow2_snap_table *t);
int qcow2_snap_table_read_loose(struct qcow2 *img, struct qcow2_snap_table *t);
void qcow2_snap_table_free(struct qcow2_snap_table *t);

/*
 * Make @img (read-only, header parsed, L1 not yet loaded) read snapshot
 * @id_or_name: its L1 table and disk size replace the active ones. 0 or -errno.
 */
int qcow2_snapshot_select(struct qcow2 *img, const char *id_or_name);

/*
 * Add @delta to the refcount of host cluster @cluster through the cache
 * (offline snapshot operations). -ERANGE if it would leave 0..refcount_max,
 * 0 / -EAGAIN (parked on @w) / -errno.
 */
int qcow2_refcount_add(struct qcow2 *img, uint64_t cluster, int64_t delta, struct qcow2_wait *w);

/*
 * Make the refcount table hold entry @rt_idx, growing it (new table and the
 * blocks that cover it, placed in the range of entry @rt_idx + 1) when it is
 * shorter.
 * 0 / -EAGAIN (parked on @w) / -errno.
 */
int qcow2_reftable_reserve(struct qcow2 *img, uint64_t rt_idx, struct qcow2_wait *w);

/* ---- Offline operations: compressed writes, resize (offline.c) ----------- */

/*
 * A blocking wait for engine steps that park (cache loads, refcount block
 * creation, flushes): offline operations run them to completion with
 * QCOW2_SYNC while no request is in flight.
 */
struct qcow2_sync {
	struct qcow2_wait w;
	bool woken;
	int res;
};

void qcow2_sync_init(struct qcow2_sync *s);
/* Run the backend until @s is woken. 0 (retry) or -errno. */
int qcow2_sync_wait(struct qcow2 *img, struct qcow2_sync *s);

/* Evaluate @call (which parks &(s)->w on -EAGAIN) until it stops parking. */
#define QCOW2_SYNC(img, s, call) ({				\
	int __sync_ret;						\
	for (;;) {						\
		(s)->woken = false;				\
		__sync_ret = (call);				\
		if (__sync_ret != -EAGAIN)			\
			break;					\
		__sync_ret = qcow2_sync_wait((img), (s));	\
		if (__sync_ret < 0)				\
			break;					\
	}							\
	__sync_ret;						\
})

/* Blocking write of file bytes that keeps img->file_end right. 0 or -errno. */
int qcow2_sync_pwrite(struct qcow2 *img, const void *buf, size_t len, uint64_t off);
/* The L2 table of guest @off exists (created zeroed if not) and is ours alone
 * (a copy of one shared with a snapshot). 0 with *@l2_off, or -errno. */
int qcow2_l2_table_sync(struct qcow2 *img, uint64_t off, uint64_t *l2_off);
/* resize.c: @n contiguous free clusters (fewer than a refcount block covers),
 * refcounts raised; 0 with *@out, or -errno. */
int qcow2_alloc_contig(struct qcow2 *img, uint64_t n, uint64_t *out);

/* compress.c: compress one cluster into @dst; the length, -ENOSPC when it
 * does not fit in @dst_len bytes, or -errno. */
int qcow2_compress(struct qcow2 *img, const uint8_t *src, uint8_t *dst, size_t dst_len);

/* ---- Encryption (crypto.c) --------------------------------------------------- */

struct qcow2_crypt;

/* After the header is parsed: read, check and unlock the encryption header. */
int qcow2_crypt_open(struct qcow2 *img, const struct qcow2_opts *opts);
void qcow2_crypt_free(struct qcow2 *img);
/* En/decrypt data cluster bytes in place (512-aligned). 0 or -errno. */
int qcow2_crypt_buf(struct qcow2 *img, uint64_t host_off, uint64_t guest_off, uint8_t *buf,
		    size_t len, bool encrypt);
/* Gather @iov into r->crypt_buf encrypted for @host_off; returns 1 (new iovcnt) or -errno. */
int qcow2_crypt_iov(struct qcow2_req *r, struct iovec *iov, unsigned int iovcnt,
		    uint64_t host_off, uint64_t guest_off);
/* True while a write from r->crypt_buf is in flight. */
bool qcow2_crypt_busy(const struct qcow2_req *r);
/* Blocking READ/WRITE/WRITE_ZEROES not aligned to 512 bytes on an encrypted image. */
int qcow2_crypt_unaligned(struct qcow2 *img, enum qcow2_op op, void *buf, uint64_t len,
			  uint64_t off);

/* ---- Metadata overlap checks (overlap.c) ------------------------------------ */

/* What a write may overlap: the @ign bits name what it is meant to update. */
#define QCOW2_OL_HEADER			(1u << 0)
#define QCOW2_OL_ACTIVE_L1		(1u << 1)
#define QCOW2_OL_ACTIVE_L2		(1u << 2)
#define QCOW2_OL_REFCOUNT_TABLE		(1u << 3)
#define QCOW2_OL_REFCOUNT_BLOCK		(1u << 4)
#define QCOW2_OL_SNAPSHOT_TABLE		(1u << 5)
#define QCOW2_OL_INACTIVE_L1		(1u << 6)
#define QCOW2_OL_CRYPT_HEADER		(1u << 7)
#define QCOW2_OL_ALL			0xffu

/* 0, or -EIO with the image marked corrupt: the write would hit metadata. */
int qcow2_overlap_check(struct qcow2 *img, unsigned int ign, uint64_t off, uint64_t len);
int qcow2_overlap_set_snapshots(struct qcow2 *img, const struct qcow2_snap_table *t);
int qcow2_overlap_load(struct qcow2 *img);
void qcow2_overlap_free(struct qcow2 *img);
/* An L1 / refcount table entry @i was just set: keep the overlap scan covering it. */
static inline void qcow2_l1_note(struct qcow2 *img, uint64_t i)
{
	if (i >= img->ol_l1_hi)
		img->ol_l1_hi = i + 1;
}

static inline void qcow2_reftable_note(struct qcow2 *img, uint64_t i)
{
	if (i >= img->ol_rt_hi)
		img->ol_rt_hi = i + 1;
}

/* Many L1 entries changed at once: rescan before the next check. */
static inline void qcow2_overlap_reset(struct qcow2 *img)
{
	img->ol_l1 = img->ol_rt = NULL;
}

/* qcow2_sync_pwrite for a write meant to update the metadata in @ign. */
int qcow2_sync_pwrite_ol(struct qcow2 *img, unsigned int ign, const void *buf, size_t len,
			 uint64_t off);

/* ---- Serpent and twofish (cipher_nettle.c) ------------------------------------ */

enum qcow2_cipher_mode { QCOW2_CIPHER_ECB, QCOW2_CIPHER_CBC, QCOW2_CIPHER_XTS, QCOW2_CIPHER_CTR };
struct qcow2_nettle;
bool qcow2_nettle_has(const char *name, enum qcow2_cipher_mode mode, uint32_t key_bytes);
int qcow2_nettle_new(struct qcow2_nettle **out, const char *name, enum qcow2_cipher_mode mode,
		     const uint8_t *key, uint32_t key_bytes);
size_t qcow2_nettle_block_size(const struct qcow2_nettle *n);
int qcow2_nettle_crypt(struct qcow2_nettle *n, const uint8_t *iv, uint8_t *buf, size_t len,
		       bool enc);
void qcow2_nettle_free(struct qcow2_nettle *n);


#endif
