/* SPDX-License-Identifier: MIT */
/*
 * The qcow2 engine's whole public API. The engine knows nothing of ublk:
 * front ends (the ublk queue loop, the host tools) hand it requests and an
 * I/O backend (struct qcow2_io) that carries its reads, writes and syncs.
 */
#ifndef QCOW2_H
#define QCOW2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/* ---- I/O backend ---------------------------------------------------- */

enum qcow2_aio_op {
	QCOW2_AIO_READ,
	QCOW2_AIO_WRITE,
	QCOW2_AIO_FSYNC,	/* fdatasync */
};

/*
 * One file operation. The engine fills it and passes it to io->submit; the
 * backend calls done() exactly once, later, from io->wait(), with the byte
 * count transferred (short counts are possible) or a negative errno.
 */
struct qcow2_aio {
	enum qcow2_aio_op op;
	int fd;
	const struct iovec *iov;
	unsigned int iovcnt;
	uint64_t off;
	void (*done)(struct qcow2_aio *aio, int res);
};

struct qcow2_io {
	/* Queue @aio. 0 on success (done() will follow), -errno otherwise. */
	int (*submit)(struct qcow2_io *io, struct qcow2_aio *aio);
	/* Submit what is queued, wait for one or more completions and run
	 * their done() callbacks. 0 or -errno. */
	int (*wait)(struct qcow2_io *io);
};

/* A ready backend: one io_uring owned by the caller's thread. */
struct qcow2_io *qcow2_uring_new(unsigned int depth);
void qcow2_uring_free(struct qcow2_io *io);

/* ---- Images ---------------------------------------------------------- */

struct qcow2;

/* A passphrase (bytes as given, not NUL-terminated). */
struct qcow2_key {
	const void *data;
	size_t len;
};

struct qcow2_opts {
	bool read_only;
	bool direct;			/* O_DIRECT on the image file */
	bool no_repair;			/* open for the check: a dirty image read-write without
					 * repair (check -r), a snapshot table past the end of
					 * the file allowed (check reports and repairs it) */
	bool no_backing;		/* do not open the backing file (reads fail there) */
	const char *format;		/* "qcow2", "raw" or NULL to probe */
	uint64_t l2_cache_bytes;	/* metadata memory: the L1 and refcount tables, the
					 * rest L2 slices (a quarter at least); 0: default (L2
					 * slices enough for the whole disk, up to 32 MiB) */
	uint64_t refcount_cache_bytes;	/* 0: default (256 KiB) */
	uint32_t slice_bytes;		/* 0: default (4 KiB, or the cluster size if smaller) */
	const char *snapshot;		/* read this internal snapshot (id or name): read-only */
	const struct qcow2_key *keys;	/* passphrases, tried in order on every LUKS
					 * image of the chain (legacy AES takes the
					 * first: it cannot tell a wrong key) */
	unsigned int nr_keys;
	bool no_key;			/* encrypted without a key: metadata only (info, check) */
	bool no_data_file;		/* metadata only (info): an external data file is not
					 * opened, nor need it be named; guest I/O then fails */
	int max_backing;		/* backing levels allowed below this image: 0 the
					 * default (up to 64), -1 none: an image naming a
					 * backing file fails to open (untrusted images) */
};

/*
 * Open @path. On failure returns -errno and writes one line naming the file
 * and the problem to @err. Nothing is written to an image that fails to open.
 */
int qcow2_open(struct qcow2 **out, const char *path, const struct qcow2_opts *opts,
	       struct qcow2_io *io, char *err, size_t errlen);

/* Flush (if writable) and free. Returns 0 or the first error. */
int qcow2_close(struct qcow2 *img);

/* The last error message of an open image ("" if none). */
const char *qcow2_errmsg(const struct qcow2 *img);

struct qcow2_info {
	uint32_t version;
	uint32_t cluster_bits;
	uint32_t refcount_bits;
	uint64_t virtual_size;
	uint64_t incompatible;
	uint64_t compatible;
	uint64_t autoclear;
	uint32_t l1_size;
	uint32_t nb_snapshots;
	bool lazy_refcounts;
	bool corrupt;
	bool dirty;
	bool extended_l2;
	int compression_type;		/* 0 zlib, 1 zstd */
	const char *backing_file;	/* NULL if none */
	const char *backing_fmt;	/* NULL if none */
	const char *data_file;		/* NULL if none */
	uint64_t file_size;		/* bytes of the image file */
	bool raw;			/* a raw image (format "raw") */
	const char *filename;
	const struct qcow2 *backing;	/* the opened backing image, or NULL */
	bool encrypted;			/* the data is encrypted */
};

void qcow2_get_info(const struct qcow2 *img, struct qcow2_info *info);

/* ---- Requests -------------------------------------------------------- */

enum qcow2_op {
	QCOW2_OP_READ,
	QCOW2_OP_WRITE,
	QCOW2_OP_WRITE_ZEROES,
	QCOW2_OP_DISCARD,
	QCOW2_OP_FLUSH,
	QCOW2_OP_WRITE_ZEROES_NOUNMAP,	/* allocated clusters stay allocated */
};

struct qcow2_req;

typedef void (*qcow2_done_fn)(struct qcow2_req *req, int res, void *priv);

/* Preallocate a request; front ends keep one per tag. NULL on ENOMEM. */
struct qcow2_req *qcow2_req_new(struct qcow2 *img);
/* Free an idle request (also after its image was closed). */
void qcow2_req_free(struct qcow2_req *req);

/*
 * Start @op on [@off, @off + @len) with @buf (READ fills it, WRITE takes
 * from it; others ignore it). @done runs exactly once, possibly before this
 * returns, with 0 or -errno. The request must be idle.
 */
void qcow2_req_submit(struct qcow2_req *req, enum qcow2_op op, uint64_t off,
		      uint64_t len, void *buf, qcow2_done_fn done, void *priv);

/*
 * Deferred write data (ublk's NEED_GET_DATA): the next WRITE submitted on
 * @req maps its range, allocates clusters and reads what copy-on-write
 * needs before it asks for the bytes. When it first needs them it calls
 * @fetch with the address where all of them must land: inside the cluster
 * buffer it is about to write, or the submitted buffer. The caller copies
 * the bytes there, now or later, then calls qcow2_req_data_ready() with 0
 * or -errno (the request then fails, its allocation undone). A request
 * that fails before it needs the data never calls @fetch.
 */
typedef void (*qcow2_fetch_fn)(struct qcow2_req *req, void *dst, void *priv);
void qcow2_req_defer_data(struct qcow2_req *req, qcow2_fetch_fn fetch);
void qcow2_req_data_ready(struct qcow2_req *req, int err);

/*
 * Make the next READ or WRITE of @req take an opaque buffer: an address
 * range the engine only passes on in its aio iovecs (one iovec each, at the
 * buffer's address plus the byte offset in the request) and never
 * dereferences; the I/O backend knows what it stands for. Where a piece
 * needs the bytes in memory (reads: a hole, zeros, a backing file, a
 * compressed cluster, a file that ends early; writes: anything but a
 * rewrite in place of clusters the image owns alone; both: an encrypted
 * image), or the backend's submit refuses such an aio with -EXDEV, the
 * request ends with -EXDEV once its I/O has drained, with some of the range
 * perhaps read or written (with the same bytes): submit it again with a
 * real buffer. Not with qcow2_req_defer_data().
 */
void qcow2_req_opaque(struct qcow2_req *req);

/* True while a request or a flush of @img is in flight. */
bool qcow2_busy(const struct qcow2 *img);

/* Run the I/O backend until no request of @img is in flight. 0 or -errno. */
int qcow2_drain(struct qcow2 *img);

/* Blocking conveniences for the host tools: submit one request and wait. */
int qcow2_pread(struct qcow2 *img, void *buf, uint64_t len, uint64_t off);
int qcow2_pwrite(struct qcow2 *img, const void *buf, uint64_t len, uint64_t off);
/* @unmap: allocated clusters may be freed (else they stay, as zero clusters). */
int qcow2_write_zeroes(struct qcow2 *img, uint64_t len, uint64_t off, bool unmap);
int qcow2_discard(struct qcow2 *img, uint64_t len, uint64_t off);
int qcow2_flush(struct qcow2 *img);

/* ---- Mapping (map, convert) ----------------------------------------- */

enum qcow2_extent_type {
	QCOW2_EXTENT_UNALLOCATED,	/* reads as zeros (or the backing file) */
	QCOW2_EXTENT_ZERO,		/* zero flag */
	QCOW2_EXTENT_DATA,		/* host data at host_off */
	QCOW2_EXTENT_COMPRESSED,	/* compressed cluster(s) */
};

struct qcow2_extent {
	uint64_t guest_off;
	uint64_t len;
	enum qcow2_extent_type type;
	uint64_t host_off;		/* DATA: host offset; ZERO and UNALLOCATED (an
					 * extended L2 subcluster): host offset if the
					 * cluster is allocated, else 0 */
	bool has_host;			/* host_off means one (0 can, in an external
					 * data file) */
};

/*
 * Describe the guest range starting at @off: the longest run (up to @len
 * bytes) of one type with contiguous host offsets. 0 or -errno.
 */
int qcow2_map(struct qcow2 *img, uint64_t off, uint64_t len, struct qcow2_extent *ext);

/* ---- Creation and checking ----------------------------------------- */

enum qcow2_prealloc {
	QCOW2_PREALLOC_OFF,
	QCOW2_PREALLOC_METADATA,
	QCOW2_PREALLOC_FALLOC,
	QCOW2_PREALLOC_FULL,
};

struct qcow2_create_opts {
	uint64_t size;
	uint32_t cluster_bits;		/* 0: 16 */
	uint32_t version;		/* 2 or 3; 0: 3 */
	uint32_t refcount_bits;		/* 0: 16 */
	bool lazy_refcounts;
	enum qcow2_prealloc prealloc;
	const char *backing_file;
	const char *backing_fmt;
	int compression_type;		/* 0 zlib, 1 zstd (needs version 3) */
	bool extended_l2;		/* subclusters (version 3, clusters >= 16 KiB) */
	const char *data_file;		/* external data file (version 3), created too */
	bool data_file_raw;		/* ... kept a consistent raw image */

	const struct qcow2_encrypt_opts *encrypt;	/* NULL: not encrypted */
};

/* Create (or truncate) @path as an empty image. 0 or -errno and @err. */
int qcow2_create(const char *path, const struct qcow2_create_opts *opts,
		 struct qcow2_io *io, char *err, size_t errlen);

enum qcow2_fix {
	QCOW2_FIX_LEAKS = 1,
	QCOW2_FIX_ERRORS = 2,
};

struct qcow2_check_result {
	uint64_t corruptions;
	uint64_t leaks;
	uint64_t check_errors;
	uint64_t corruptions_fixed;
	uint64_t leaks_fixed;
	uint64_t image_end_offset;
	uint64_t total_clusters;	/* guest clusters */
	uint64_t allocated_clusters;
	uint64_t fragmented_clusters;
	uint64_t compressed_clusters;
};

/*
 * Check the refcounts of @img against every reference in the image, and with
 * @fix repair what can be repaired (a full repair that leaves nothing wrong
 * also clears the corrupt and dirty bits). No request may be in flight. Problems are reported one per line on
 * @report (may be NULL). 0 when the check ran (see @res), -errno otherwise.
 */
int qcow2_check(struct qcow2 *img, int fix, struct qcow2_check_result *res,
		void (*report)(void *opaque, const char *line), void *opaque);

/* ---- Internal snapshots (snapshot.c) ------------------------------------ */

struct qcow2_snapshot_info {
	char *id;
	char *name;
	uint64_t vm_state_size;
	uint32_t date_sec;
	uint32_t date_nsec;
	uint64_t vm_clock_nsec;
	uint64_t icount;		/* UINT64_MAX: not recorded */
	uint64_t disk_size;
};

/*
 * The snapshot table: *@out (free with qcow2_snapshot_list_free) holds *@nr
 * entries in table order. 0 or -errno (with qcow2_errmsg).
 */
int qcow2_snapshot_list(struct qcow2 *img, struct qcow2_snapshot_info **out, uint32_t *nr);
void qcow2_snapshot_list_free(struct qcow2_snapshot_info *list, uint32_t nr);

/*
 * Offline snapshot operations, as qemu-img snapshot -c/-a/-d does them (no
 * request may be in flight; metadata is flushed first). Crash-safe: a crash
 * at any point leaves the old or the new state, at worst with leaked
 * clusters. 0 or -errno (with qcow2_errmsg); -EEXIST for a duplicate name,
 * -ENOENT for an unknown snapshot, -ERANGE when a refcount would overflow
 * (the image is then left as it was).
 *
 * create: a new snapshot @name of the active state, id = max numeric id + 1.
 * apply:  revert the active state to snapshot @id_or_name (id first).
 * delete: remove snapshot @name_or_id (name first, as qemu-img -d).
 */
int qcow2_snapshot_create(struct qcow2 *img, const char *name);
int qcow2_snapshot_apply(struct qcow2 *img, const char *id_or_name);
/*
 * 0 when snapshot @id_or_name exists and the table passes the checks apply
 * makes of it (the list reads it loosely): what a caller resizing the image
 * for the snapshot, as qemu-img does, asks first. -ENOENT or -errno.
 */
int qcow2_snapshot_check(struct qcow2 *img, const char *id_or_name);
int qcow2_snapshot_delete(struct qcow2 *img, const char *name_or_id);

/* ---- Backing file changes (rebase, commit) ----------------------------- */

/*
 * Make @name (NULL or "": none) with format @fmt (NULL: not recorded; ignored
 * without a name) the backing file of the writable qcow2 image @img, stored
 * as given: a relative name is relative to @img's directory. Pending
 * metadata is flushed first, then the header is rewritten in one write and
 * synced, so a crash leaves either the old or the new backing file. The
 * chain opened with @img does not change: reads keep going to it until the
 * image is reopened. 0 or -errno (-ENOSPC: the name does not fit in the
 * header cluster) with the image unchanged.
 */
int qcow2_set_backing(struct qcow2 *img, const char *name, const char *fmt);

/*
 * Make every guest cluster of the writable qcow2 image @img unallocated, so
 * that the backing file shows through (what qemu-img commit leaves behind),
 * and free the clusters only the active L1 table used. No request may be in
 * flight. A crash in between leaks clusters and never corrupts. 0 or -errno.
 */
int qcow2_make_empty(struct qcow2 *img);

/* ---- Compressed writes and resize (offline: no request in flight) ----- */

/*
 * Write guest cluster [@off, @off + @len) compressed, the way QEMU does:
 * @off cluster aligned, @len the cluster size (or less for the last
 * cluster of the disk, padded with zeros). Compressed bytes are packed into
 * shared host clusters; a cluster that does not compress to less than its
 * size is written uncompressed instead. @len 0 ends a run of compressed
 * writes (the file is rounded up to whole sectors, as QEMU does). The image
 * must not be opened with direct I/O. Returns 0 (compressed or @len 0),
 * 1 (written uncompressed) or -errno with qcow2_errmsg set.
 */
int qcow2_pwrite_compressed(struct qcow2 *img, const void *buf, uint64_t len, uint64_t off);

/*
 * Change the virtual size to @size (a multiple of 512), as qemu-img resize
 * does: growing may move the L1 table; shrinking drops every cluster past
 * the new end and truncates the file after the last used cluster. Refused
 * on v2 images with snapshots. Returns 0 or -errno with qcow2_errmsg set.
 */
int qcow2_resize(struct qcow2 *img, uint64_t size);

/* ---- Encryption ------------------------------------------------------ */

/* -o encrypt.* for creation, in qemu-img's names and defaults. */
struct qcow2_encrypt_opts {
	const char *format;		/* "luks" */
	const void *key;		/* passphrase */
	size_t key_len;
	const char *cipher_alg;		/* aes-128, aes-192, aes-256 (default) */
	const char *cipher_mode;	/* xts (default), cbc, ecb, ctr */
	const char *ivgen_alg;		/* plain64 (default), plain, essiv */
	const char *ivgen_hash_alg;	/* essiv: sha256 (default) */
	const char *hash_alg;		/* sha256 (default) */
	uint32_t iter_time_ms;		/* PBKDF2 time per key; 0: 2000 as QEMU */
};

/* What qemu-img info shows of an encrypted image. */
struct qcow2_crypt_info {
	const char *format;		/* "luks" or "aes" */
	char cipher_alg[40];		/* "aes-256" (luks only, as all below) */
	const char *cipher_mode;
	const char *ivgen_alg;
	const char *ivgen_hash_alg;	/* NULL unless essiv */
	const char *hash_alg;
	const char *uuid;
	uint64_t payload_offset;
	uint32_t master_key_iters;
	struct {
		bool active;
		uint32_t iters, stripes;
		uint64_t key_offset;
	} slots[8];
};

/* -ENOENT if @img is not encrypted, else 0 and @ci filled. */
int qcow2_get_crypt_info(const struct qcow2 *img, struct qcow2_crypt_info *ci);

/* Bytes of the LUKS header area for @o; 0 or -errno with @err. */
int qcow2_luks_header_size(const struct qcow2_encrypt_opts *o, uint64_t *bytes,
			   char *err, size_t errlen);
/* Build it into @out (zeroed, that many bytes). 0 or -errno with @err. */
int qcow2_luks_header_build(const struct qcow2_encrypt_opts *o, uint8_t *out,
			    char *err, size_t errlen);

/*
 * The most metadata memory qcow2_opts.l2_cache_bytes may ask for: 2^24 cache
 * slices of the smallest size (512 bytes, for 512-byte clusters), so any
 * image takes it. Tools check it before starting anything.
 */
#define QCOW2_MAX_CACHE_BYTES	(1ull << 33)

#endif
