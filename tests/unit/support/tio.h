/* SPDX-License-Identifier: MIT */
/*
 * A test I/O backend for the engine: it wraps the io_uring backend, records
 * every write and fdatasync the engine sends to the files it tracks (offset,
 * bytes, order, completion: a write log for crash simulation), and fails
 * chosen operations (EIO, ENOSPC) for fault tests. The engine sees only a
 * struct qcow2_io, the hook it already has: release builds carry nothing.
 */
#ifndef UQ_TEST_TIO_H
#define UQ_TEST_TIO_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "qcow2.h"

#define TIO_MAX_FILES	4

/* One entry of the event log, in the order things happened. */
enum tio_ev_kind {
	TIO_W_SUB,	/* write @ref submitted */
	TIO_W_DONE,	/* write @ref completed */
	TIO_F_SUB,	/* fdatasync @ref submitted */
	TIO_F_DONE,	/* fdatasync @ref completed */
	TIO_G_SUB,	/* guest request @ref submitted (the test's numbering) */
	TIO_G_DONE,	/* guest request @ref acknowledged */
};

struct tio_ev {
	uint8_t kind;
	uint32_t ref;
};

struct tio_write {
	int file;		/* tracked file index */
	uint64_t off;
	uint64_t len;
	uint8_t *data;		/* what was submitted */
	uint32_t sub, done;	/* event indices; done UINT32_MAX while in flight */
	int res;		/* bytes written or -errno */
};

struct tio_sync {
	int file;
	uint32_t sub, done;
	int res;
};

/* Which operations fail, and how. */
struct tio_fault {
	unsigned int ops;	/* mask of 1 << QCOW2_AIO_READ/WRITE/FSYNC; 0: off */
	int err;		/* -EIO, -ENOSPC */
	uint64_t nth;		/* fail the nth matching operation (from 1)... */
	bool persist;		/* ...and every one after it */
	uint32_t per_64k;	/* or, with nth 0: each one with this chance in 65536 */
	uint64_t seed;
	bool land;		/* a failed write still reaches the file (unknown outcome) */
	bool short_write;	/* with ops writes only: half the first piece lands, the
				   write completes short (a full file system); err unused */
};

struct tio {
	struct qcow2_io io;
	struct qcow2_io *inner;
	struct {
		dev_t dev;
		ino_t ino;
		char *path;
	} files[TIO_MAX_FILES];
	int nr_files;

	bool logging;
	struct tio_ev *evs;
	uint32_t nr_evs, evs_alloc;
	struct tio_write *writes;
	uint32_t nr_writes, writes_alloc;
	struct tio_sync *syncs;
	uint32_t nr_syncs, syncs_alloc;
	uint64_t stray_writes;	/* writes to files nobody tracks (backing files) */

	struct tio_fault fault;
	uint64_t matched;	/* operations the fault rule matched */
	uint64_t injected;	/* faults injected */
	uint64_t rng;
	struct tio_shadow *failed, *failed_tail;	/* to complete from wait() */
	unsigned int inflight;
};

/* The wrapped io_uring backend with @depth entries; NULL on failure. */
struct tio *tio_new(unsigned int depth);
void tio_free(struct tio *t);

/* Track writes to @path (by device and inode). Index, or -errno. */
int tio_track(struct tio *t, const char *path);
/* Forget the log (keeps the tracked files). */
void tio_log_clear(struct tio *t);
/* Record a guest event. 0 or -ENOMEM. */
int tio_guest(struct tio *t, enum tio_ev_kind kind, uint32_t ref);
/* Arm @f (a copy is kept) with its counters reset; NULL disarms. */
void tio_fault_set(struct tio *t, const struct tio_fault *f);

#endif
