/* SPDX-License-Identifier: MIT */
/*
 * An image as the subcommands see it: qcow2 (through the engine's public
 * API) or raw (plain file I/O), optionally with its backing chain opened,
 * and block status in qemu-img's terms (present / zero / data / offset).
 */
#ifndef UQ_IMAGE_H
#define UQ_IMAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qcow2.h"

enum uq_fmt {
	UQ_FMT_RAW,
	UQ_FMT_QCOW2,
};

#define UQ_OPEN_RDONLY		(1u << 0)
#define UQ_OPEN_CHAIN		(1u << 1)	/* open the chain here, a level each (status) */
#define UQ_OPEN_NO_REPAIR	(1u << 2)	/* qcow2: leave a dirty image for check -r */
#define UQ_OPEN_NO_BACKING	(1u << 3)	/* qcow2: metadata only, no backing file */
#define UQ_OPEN_NO_KEY		(1u << 4)	/* qcow2: metadata only, encrypted or not: no key */
#define UQ_OPEN_OVERLAY		(1u << 5)	/* our own overlay: under --no-backing its
						 * backing file (the user's image) is allowed */
#define UQ_OPEN_NO_DATA_FILE	(1u << 6)	/* qcow2: metadata only, the external data
						 * file not opened (info) */

struct uq_image {
	char *path;
	enum uq_fmt fmt;
	bool read_only;
	struct qcow2_io *io;		/* qcow2 only */
	bool own_io;			/* free @io on close */
	struct qcow2 *qcow2;		/* qcow2 only */
	int fd;				/* raw: the image; qcow2: read-only, for holes */
	uint64_t size;			/* virtual size */
	bool file_holes;		/* qcow2: data in file holes reads as zero (status) */
	struct uq_image *backing;	/* with UQ_OPEN_CHAIN */
};

/* One run of like blocks, as qemu-img map reports it. */
struct uq_status {
	uint64_t len;
	unsigned int depth;		/* chain level that answered: 0 is the top */
	bool present;			/* allocated at that level */
	bool zero;			/* reads as zeros */
	bool data;
	bool has_offset;
	uint64_t offset;		/* host offset in @img's file */
	struct uq_image *img;		/* the level that answered */
};

/* "raw"/"qcow2" to enum; 0 or -EINVAL. */
int uq_fmt_parse(const char *name, enum uq_fmt *fmt);
const char *uq_fmt_name(enum uq_fmt fmt);

/*
 * Detect the format of @path from its first bytes (qcow2 by its magic,
 * anything else is raw). 0 or -errno with the message in @err.
 */
int uq_probe(const char *path, enum uq_fmt *fmt, char *err, size_t errlen);

/*
 * Open @path as @fmt (NULL: probe), with an io_uring of its own. By default
 * the engine opens a qcow2 image's backing chain itself and reads fall
 * through to it. With UQ_OPEN_CHAIN each backing file is opened here
 * instead, read-only, as img->backing (relative names resolved against the
 * directory of the image naming them), so that block status can tell the
 * levels apart. 0 or -errno with one line in @err.
 */
int uq_image_open(struct uq_image **out, const char *path, const char *fmt,
		  unsigned int flags, char *err, size_t errlen);

/*
 * The same, with the qcow2 levels doing their I/O through @io (owned by
 * the caller, freed after the image), so that requests of several images
 * complete through one io->wait(). 0 or -errno with one line in @err.
 */
int uq_image_open_io(struct uq_image **out, const char *path, const char *fmt,
		     unsigned int flags, struct qcow2_io *io, char *err, size_t errlen);

/*
 * uq_image_open_io (@io may be NULL: an io_uring of its own) reading the
 * internal snapshot @snapshot (id or name) of the top level, read-only.
 */
int uq_image_open_snapshot(struct uq_image **out, const char *path, const char *fmt,
			   const char *snapshot, unsigned int flags, struct qcow2_io *io,
			   char *err, size_t errlen);

/* Flush (if writable) and close @img and its chain. 0 or the first -errno. */
int uq_image_close(struct uq_image *img);

/* The one-line message (naming the file) of the last failed operation below. */
const char *uq_image_errmsg(void);

/*
 * Record the result @ret of an engine call the caller made on img->qcow2
 * itself (an asynchronous request), for uq_image_errmsg. Returns @ret.
 */
int uq_image_fail(struct uq_image *img, int ret);

/* Blocking data I/O on the top level. 0 or -errno. */
int uq_image_pread(struct uq_image *img, void *buf, uint64_t len, uint64_t off);
int uq_image_pwrite(struct uq_image *img, const void *buf, uint64_t len, uint64_t off);
int uq_image_write_zeroes(struct uq_image *img, uint64_t len, uint64_t off, bool unmap);
int uq_image_discard(struct uq_image *img, uint64_t len, uint64_t off);
int uq_image_flush(struct uq_image *img);

/*
 * Block status of [@off, @off + @len) through the opened chain: the first
 * run of like blocks (st->len >= 1, at most @len). 0 or -errno.
 */
int uq_image_status(struct uq_image *img, uint64_t off, uint64_t len, struct uq_status *st);

/*
 * Read the st->len bytes at @off that uq_image_status described in @st
 * (from a chain-opened image): from the level that holds them, or zeros.
 * 0 or -errno.
 */
int uq_status_read(const struct uq_status *st, void *buf, uint64_t off);

/* ---- Secrets of encrypted images ---------------------------------------- */

/*
 * The options every image-opening subcommand takes (getopt_long values
 * above any short option): --object secret,id=ID,data=PW|file=PATH as
 * qemu-img, and the shorter --key-secret PW / --key-file PATH.
 */
enum {
	UQ_OPT_OBJECT = 0x1000,
	UQ_OPT_KEY_SECRET,
	UQ_OPT_KEY_FILE,
	UQ_OPT_NO_BACKING,
	UQ_OPT_FAILED,		/* uq_getopt(): a shared option was bad */
};

#define UQ_KEY_LONGOPTS \
	{ "object", required_argument, NULL, UQ_OPT_OBJECT }, \
	{ "key-secret", required_argument, NULL, UQ_OPT_KEY_SECRET }, \
	{ "key-file", required_argument, NULL, UQ_OPT_KEY_FILE }

#define UQ_KEY_HELP \
	"  --object secret,id=ID,data=PW|file=PATH  a secret (qemu-img style)\n" \
	"  --key-secret PW  passphrase of an encrypted image (repeatable: each\n" \
	"                   encrypted image of a chain takes the first that opens it)\n" \
	"  --key-file PATH  read a passphrase from PATH (repeatable, likewise)\n"

struct option;

/*
 * getopt_long() for the subcommands: takes the options above and
 * --no-backing (below) itself, so each command parses only its own.
 * Returns the next other option as getopt_long() does, -1 at the end, or
 * UQ_OPT_FAILED when a shared option was bad (its error line printed).
 */
int uq_getopt(int argc, char **argv, const char *shortopts, const struct option *longopts);

/*
 * The passphrases images are opened with, in the order given: every
 * --key-secret/--key-file, else every secret object. Each encrypted LUKS
 * image of a chain takes the first that opens it (legacy AES: the first).
 * Returns how many, *@keys pointing at them (valid until the next call).
 */
unsigned int uq_keys_get(const struct qcow2_key **keys);

/* The secret object @id (encrypt.key-secret=ID), or NULL. */
const char *uq_secret_lookup(const char *id, size_t *len);

/* ---- Backing file policy ----------------------------------------------------- */

/*
 * --no-backing (add, io, convert, map): every image opened from then on
 * that names a backing file fails to open, and no backing file is opened
 * or probed. For untrusted images, whose backing file names could point
 * anywhere on the host.
 */
#define UQ_NO_BACKING_LONGOPT	{ "no-backing", no_argument, NULL, UQ_OPT_NO_BACKING }
#define UQ_NO_BACKING_HELP \
	"  --no-backing    refuse images that name a backing file (untrusted images)\n"
extern bool uq_no_backing;

/* engine max_backing for an open with @flags under the policy above. */
static inline int uq_max_backing(unsigned int flags)
{
	return !uq_no_backing ? 0 : (flags & UQ_OPEN_OVERLAY) ? 1 : -1;
}

#endif
