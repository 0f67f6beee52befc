// SPDX-License-Identifier: MIT
/*
 * Opaque buffers, the engine half of ublk zero copy (qcow2_req_opaque): the
 * engine must pass the buffer's addresses on in single-iovec aios and never
 * touch them, and end a request with -EXDEV exactly where some byte is not
 * in a plain allocated cluster (holes, zeros, backing file, compressed),
 * and for a write that allocates, exactly where the new clusters need bytes
 * besides the request's (zeros around it, copy-on-write). The buffers here are a PROT_NONE mapping (a
 * touch is a crash); a wrapping backend plays READ_FIXED/WRITE_FIXED: it
 * moves such aios' bytes from or to a real buffer at the same offset.
 * Requests that end with -EXDEV are retried with a real buffer, as the
 * target does. The backend may also refuse an aio at submit with -EXDEV,
 * as the target does when another queue's thread runs the engine: the
 * request, however far it got, must end with -EXDEV and leave nothing
 * allocated that the retry does not use. Reads must match a mirror that starts as qemu-img's view;
 * at the end the image must read as the mirror after a reopen and pass
 * qemu-img check.
 */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "batch.h"
#include "files.h"
#include "run.h"
#include "internal.h"

#define DISK_SIZE	(16ull << 20)
#define BATCH		16
#define MAX_LEN		(256u << 10)
#define SECTORS		(DISK_SIZE / 512)

struct op {
	struct tu_op t;			/* t.buf: what the token stands for */
	bool write;
	uint8_t pat;
	bool short_io;			/* the backend moved less than asked */
	bool refused;			/* the backend refused one of its aios */
	bool plain;			/* all plain when submitted (see is_plain) */
};

/* The backend: qcow2_uring, with reads into tokens served by pread. */
struct wrap {
	struct qcow2_io io;
	struct qcow2_io *inner;
	uint8_t *tokens;		/* BATCH * MAX_LEN, PROT_NONE */
	struct op *ops;
	struct qcow2_aio *ready[64];	/* token reads done, callbacks not yet run */
	int res[64];
	unsigned int nr_ready, nr_fixed;
	unsigned int refuse;		/* refuse every refuse'th token aio (0: none) */
	unsigned int nr_token, nr_refused;
};

static char dir[] = "/tmp/uq-opaque-XXXXXX";
static uint64_t unit_bytes;		/* what a write allocates: cluster or subcluster */
static uint64_t rng = 0x2545f4914f6cdd1dull;

static int wrap_submit(struct qcow2_io *io, struct qcow2_aio *aio)
{
	struct wrap *w = (struct wrap *)io;
	size_t rel;
	ssize_t n;

	if (aio->op == QCOW2_AIO_FSYNC ||
	    (uintptr_t)aio->iov[0].iov_base - (uintptr_t)w->tokens >= (size_t)BATCH * MAX_LEN)
		return w->inner->submit(w->inner, aio);
	ck_assert_uint_eq(aio->iovcnt, 1);
	ck_assert_uint_lt(w->nr_ready, 64);
	rel = (size_t)((uint8_t *)aio->iov[0].iov_base - w->tokens);
	ck_assert_uint_le(rel % MAX_LEN + aio->iov[0].iov_len, MAX_LEN);
	if (w->refuse && ++w->nr_token % w->refuse == 0) {
		w->ops[rel / MAX_LEN].refused = true;
		w->nr_refused++;
		return -EXDEV;
	}
	if (aio->op == QCOW2_AIO_READ)
		n = pread(aio->fd, w->ops[rel / MAX_LEN].t.buf + rel % MAX_LEN,
			  aio->iov[0].iov_len, (off_t)aio->off);
	else
		n = pwrite(aio->fd, w->ops[rel / MAX_LEN].t.buf + rel % MAX_LEN,
			   aio->iov[0].iov_len, (off_t)aio->off);
	/* A cluster at the end of the file may be partly written: it ends early. */
	if (n >= 0 && (size_t)n < aio->iov[0].iov_len)
		w->ops[rel / MAX_LEN].short_io = true;
	w->ready[w->nr_ready] = aio;
	w->res[w->nr_ready++] = n < 0 ? -errno : (int)n;
	w->nr_fixed++;
	return 0;
}

static int wrap_wait(struct qcow2_io *io)
{
	struct wrap *w = (struct wrap *)io;
	struct qcow2_aio *ready[64];
	int res[64];
	unsigned int i, n = w->nr_ready;

	if (!n)
		return w->inner->wait(w->inner);
	/* Callbacks may submit more: run the ones taken now. */
	memcpy(ready, w->ready, n * sizeof(*ready));
	memcpy(res, w->res, n * sizeof(*res));
	w->nr_ready = 0;
	for (i = 0; i < n; i++)
		ready[i]->done(ready[i], res[i]);
	return 0;
}

/*
 * Whether @o can go straight to the file: every sector it reads, every
 * cluster it writes (in place, no allocation) is plain allocated. A write
 * also takes [*first, *end), its clusters.
 */
static bool is_plain(const uint8_t *plain, const struct op *o, uint64_t *first, uint64_t *end)
{
	uint64_t unit = o->write ? unit_bytes : 512;

	*first = o->t.off / unit * unit;
	*end = (o->t.off + o->t.len + unit - 1) / unit * unit;
	return memchr(plain + *first / 512, 0, (*end - *first) / 512) == NULL;
}

static void wait_all(struct wrap *w, struct op *ops, int n)
{
	while (!tu_ops_done(ops, sizeof(ops[0]), n))
		ck_assert_int_eq(w->io.wait(&w->io), 0);
}

/*
 * @ext: extended L2 (2 KiB subclusters): an in-place write needs only its
 * subclusters allocated; a copied-out cluster gets all of them, which the
 * model here does not track, so past the start of a batch it only knows
 * that plain ranges stay plain.
 */
static void run_one(bool direct, bool ext, unsigned int refuse)
{
	struct qcow2_opts opts = { .l2_cache_bytes = 16384, .refcount_cache_bytes = 8192,
				   .slice_bytes = 4096, .direct = direct };
	struct wrap w = { .io = { .submit = wrap_submit, .wait = wrap_wait }, .refuse = refuse };
	struct op ops[BATCH];
	uint8_t *mirror, *plain;
	unsigned int round, exdev = 0, whole = 0, wexdev = 0, wwhole = 0, walloc = 0, shorts = 0;
	char path[128], err[256];
	struct qcow2 *img;
	size_t len;
	int i;

	/*
	 * 64k clusters (or extended L2): data, zeros, compressed, unallocated over a shorter
	 * backing file (12 of 16 MiB), partial writes; plain.bin has a 1 for
	 * each sector of a plain allocated cluster (qemu-img map: depth 0,
	 * data at an offset).
	 */
	tu_sh("set -e; cd %s; qemu-img create -q -f qcow2 base.qcow2 12M; "
	      "qemu-io -f qcow2 -c 'write -P 0xb1 0 12M' base.qcow2 >/dev/null; "
	      "truncate -s 16M c.raw; "
	      "qemu-io -f raw -c 'write -P 0xc1 4M 2M' -c 'write -P 0xc2 13M 1M' c.raw >/dev/null; "
	      "qemu-img convert -c -O qcow2 %s c.raw d.qcow2; "
	      "qemu-img rebase -u -b base.qcow2 -F qcow2 d.qcow2; "
	      "qemu-io -f qcow2 -c 'write -P 0xa1 0 2M' -c 'write -z 2M 1M' "
	      "-c 'write -P 0xa2 7M 100k' -c 'write -P 0xa3 11M 2304k' -c 'write -z 14M 64k' "
	      "d.qcow2 >/dev/null; "
	      "qemu-img convert -O raw d.qcow2 mirror.raw; "
	      "qemu-img map --output=json d.qcow2 | python3 -c '\n"
	      "import json, sys\n"
	      "p = bytearray(%llu)\n"
	      "for e in json.load(sys.stdin):\n"
	      "    if e[\"depth\"] == 0 and e[\"data\"] and \"offset\" in e:\n"
	      "        p[e[\"start\"] // 512:(e[\"start\"] + e[\"length\"]) // 512] = b\"\\1\" * (e[\"length\"] // 512)\n"
	      "open(\"plain.bin\", \"wb\").write(p)' ", dir, ext ? "-o extended_l2=on" : "", (unsigned long long)SECTORS);
	unit_bytes = ext ? 2048 : 65536;
	snprintf(path, sizeof(path), "%s/mirror.raw", dir);
	mirror = tu_slurp(path, &len);
	ck_assert_uint_eq(len, DISK_SIZE);
	snprintf(path, sizeof(path), "%s/plain.bin", dir);
	plain = tu_slurp(path, &len);
	ck_assert_uint_eq(len, SECTORS);

	w.inner = qcow2_uring_new(32);
	ck_assert_ptr_nonnull(w.inner);
	w.tokens = mmap(NULL, (size_t)BATCH * MAX_LEN, PROT_NONE,
			MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	ck_assert(w.tokens != MAP_FAILED);
	w.ops = ops;
	snprintf(path, sizeof(path), "%s/d.qcow2", dir);
	ck_assert_msg(qcow2_open(&img, path, &opts, &w.io, err, sizeof(err)) == 0, "%s", err);
	tu_ops_alloc(img, ops, sizeof(ops[0]), BATCH, MAX_LEN, 4096);
	for (round = 0; round < 60; round++) {
		for (i = 0; i < BATCH; i++) {
			struct op *o = &ops[i];

			/* 512-byte aligned, as ublk sends; a third inside one cluster. */
			do {
				o->t.len = (1 + tu_rnd(&rng) % (tu_rnd(&rng) % 3 ? MAX_LEN / 512 : 128)) * 512;
				o->t.off = (tu_rnd(&rng) % ((DISK_SIZE - o->t.len) / 512 + 1)) * 512;
			} while (tu_ops_overlap(ops, sizeof(ops[0]), i, o->t.off, o->t.len));
			o->write = tu_rnd(&rng) % 4 == 0;
			o->pat = (uint8_t)(tu_rnd(&rng) % 255) + 1;
			memset(o->t.buf, o->write ? o->pat : 0xee, MAX_LEN);
			o->t.done = false;
			o->short_io = false;
			o->refused = false;
		}
		for (i = 0; i < BATCH; i++) {
			uint64_t first, end;

			ops[i].plain = is_plain(plain, &ops[i], &first, &end);
			qcow2_req_opaque(ops[i].t.req);
			qcow2_req_submit(ops[i].t.req, ops[i].write ? QCOW2_OP_WRITE : QCOW2_OP_READ,
					 ops[i].t.off, ops[i].t.len, w.tokens + (size_t)i * MAX_LEN,
					 tu_op_done, &ops[i]);
		}
		wait_all(&w, ops, BATCH);
		/* Whichever way a write goes, its clusters are plain after. */
		for (i = 0; i < BATCH; i++) {
			uint64_t first, end;

			if (!ops[i].write)
				continue;
			is_plain(plain, &ops[i], &first, &end);
			memset(plain + first / 512, 1, (end - first) / 512);
			memset(mirror + ops[i].t.off, ops[i].pat, ops[i].t.len);
		}
		/*
		 * Straight to the file where it was all plain before, back with
		 * -EXDEV where it was not all plain after; in between (a write of
		 * the same batch allocated the cluster meanwhile) either.
		 */
		for (i = 0; i < BATCH; i++) {
			struct op *o = &ops[i];
			uint64_t first, end;
			bool after = is_plain(plain, o, &first, &end);

			if (o->refused)
				ck_assert_msg(o->t.res == -EXDEV, "opaque %s [%llu, +%llu), an aio refused: %d",
					      o->write ? "write" : "read", (unsigned long long)o->t.off,
					      (unsigned long long)o->t.len, o->t.res);
			else if (o->plain && !o->short_io)
				ck_assert_msg(o->t.res == 0, "opaque %s [%llu, +%llu) of plain clusters: %d",
					      o->write ? "write" : "read", (unsigned long long)o->t.off,
					      (unsigned long long)o->t.len, o->t.res);
			else if (!after && !ext)
				ck_assert_msg(o->t.res == -EXDEV, "opaque %s [%llu, +%llu) past plain clusters: %d",
					      o->write ? "write" : "read", (unsigned long long)o->t.off,
					      (unsigned long long)o->t.len, o->t.res);
			else
				ck_assert(o->t.res == 0 || o->t.res == -EXDEV);
			if (o->t.res == 0) {
				ck_assert_msg(o->write || memcmp(o->t.buf, mirror + o->t.off, o->t.len) == 0,
					      "opaque read at %llu differs", (unsigned long long)o->t.off);
				*(o->write ? &wwhole : &whole) += 1;
				walloc += o->write && !o->plain;
				continue;
			}
			*(o->write ? &wexdev : &exdev) += 1;
			shorts += o->short_io;
			/* The target's way back: a real buffer. */
			o->t.done = false;
			qcow2_req_submit(o->t.req, o->write ? QCOW2_OP_WRITE : QCOW2_OP_READ, o->t.off,
					 o->t.len, o->t.buf, tu_op_done, o);
		}
		wait_all(&w, ops, BATCH);
		for (i = 0; i < BATCH; i++) {
			ck_assert_msg(ops[i].t.res == 0, "%s: %d %s", ops[i].write ? "write" : "read",
				      ops[i].t.res, qcow2_errmsg(img));
			ck_assert_msg(ops[i].write ||
				      memcmp(ops[i].t.buf, mirror + ops[i].t.off, ops[i].t.len) == 0,
				      "read at %llu differs", (unsigned long long)ops[i].t.off);
		}
	}
	/* Both ways taken, and the engine's errors were not set by -EXDEV. */
	ck_assert_uint_gt(whole, 50);
	ck_assert_uint_gt(exdev, 50);
	ck_assert_uint_gt(wwhole, 20);
	ck_assert_uint_gt(wexdev, 20);
	/* Allocating writes into fresh clusters need no bytes but theirs. */
	ck_assert_uint_gt(walloc, 5);
	ck_assert_uint_gt(w.nr_fixed, whole + wwhole);
	ck_assert(!refuse || w.nr_refused > 20);
	ck_assert_str_eq(qcow2_errmsg(img), "");
	printf("opaque %s%s: reads %u whole, %u -EXDEV (%u short); writes %u whole (%u allocating), "
	       "%u -EXDEV; %u aios refused\n", direct ? "direct" : "buffered", ext ? " extended L2" : "",
	       whole, exdev, shorts, wwhole, walloc, wexdev, w.nr_refused);
	tu_ops_free(ops, sizeof(ops[0]), BATCH);
	tu_reopen_verify(img, path, &opts, &w.io, mirror, DISK_SIZE);
	munmap(w.tokens, (size_t)BATCH * MAX_LEN);
	qcow2_uring_free(w.inner);
	free(mirror);
	free(plain);
	tu_sh("rm -f %s/*", dir);
}

START_TEST(test_opaque_buffered) { run_one(false, false, 0); }
END_TEST
START_TEST(test_opaque_direct) { run_one(true, false, 0); }
END_TEST
START_TEST(test_opaque_extl2) { run_one(true, true, 0); }
END_TEST
START_TEST(test_opaque_refused) { run_one(true, false, 7); }
END_TEST

int main(void)
{
	const TTest *const tests[] = {
		test_opaque_buffered, test_opaque_direct, test_opaque_extl2, test_opaque_refused,
	};

	return tu_run_tests("opaque", "opaque read buffers", 120, dir, tests,
			    sizeof(tests) / sizeof(tests[0]));
}
