// SPDX-License-Identifier: MIT
/*
 * Deferred write data, the engine half of ublk's NEED_GET_DATA: writes are
 * submitted without their bytes; the engine maps, allocates and reads what
 * copy-on-write needs, then asks for the data at the place it must land.
 * This test plays the kernel: it hands the data over late and out of order,
 * fails some hand-overs, and checks the result against a mirror, after a
 * reopen and with `qemu-img check`. Images: an overlay over a filled base
 * (COW from the backing file), a compressed image (COW out of compressed
 * clusters) and an image with an internal snapshot (shared clusters). With
 * 2 MiB clusters, the COW buffers the finished requests keep stay within
 * QCOW2_SCRATCH_KEEP.
 */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "batch.h"
#include "files.h"
#include "run.h"
#include "internal.h"

#define DISK_SIZE	(8ull << 20)
#define BATCH		24
#define MAX_LEN		(160u << 10)

struct op {
	struct tu_op t;
	uint8_t *dst;			/* where the engine asked the data to land */
	uint8_t pat;
	bool asked, fail;
};

static char dir[] = "/tmp/uq-defer-XXXXXX";
static uint64_t rng = 0x9e3779b97f4a7c15ull;
static unsigned int landed_elsewhere;	/* fetches that did not target the buffer */

static void op_fetch(struct qcow2_req *req, void *dst, void *priv)
{
	struct op *o = priv;

	(void)req;
	ck_assert(!o->asked);
	o->asked = true;
	o->dst = dst;
	if (dst != o->t.buf)
		landed_elsewhere++;
}

/* Hand the data over to some of the requests that asked (all, if @all). */
static int deliver(struct op *ops, int n, bool all)
{
	int i, given = 0;

	for (i = 0; i < n; i++) {
		struct op *o = &ops[i];

		if (!o->asked || o->t.done || (!all && tu_rnd(&rng) % 2))
			continue;
		o->asked = false;
		given++;
		if (o->fail) {
			qcow2_req_data_ready(o->t.req, -EIO);
			continue;
		}
		memcpy(o->dst, o->t.buf, o->t.len);
		/* The engine must not read the submitted buffer when the data landed elsewhere. */
		if (o->dst != o->t.buf)
			memset(o->t.buf, 0xee, o->t.len);
		qcow2_req_data_ready(o->t.req, 0);
	}
	return given;
}

/*
 * @direct: O_DIRECT, with what ublk sends: 512-byte aligned ranges in
 * page-aligned buffers (the image files live on the disk, not tmpfs).
 */
static void run_one(const char *setup, bool expect_cow, bool direct)
{
	struct qcow2_opts opts = { .l2_cache_bytes = 16384, .refcount_cache_bytes = 8192,
				   .slice_bytes = 4096, .direct = direct };
	struct qcow2_io *io = qcow2_uring_new(32);
	uint8_t *mirror = malloc(DISK_SIZE);
	struct op ops[BATCH];
	char path[128], cmd[1024], err[256];
	struct qcow2 *img;
	int round, i, n, failed = 0;
	FILE *f;

	ck_assert_ptr_nonnull(mirror);
	ck_assert_ptr_nonnull(io);
	snprintf(path, sizeof(path), "%s/d.qcow2", dir);
	/* @setup makes d.qcow2 (8 MiB) in $D whose content is $D/mirror.raw. */
	snprintf(cmd, sizeof(cmd), "set -e; D=%s; cd $D; %s", dir, setup);
	ck_assert_int_eq(system(cmd), 0);
	snprintf(cmd, sizeof(cmd), "%s/mirror.raw", dir);
	f = fopen(cmd, "rb");
	ck_assert_ptr_nonnull(f);
	ck_assert_int_eq(fread(mirror, 1, DISK_SIZE, f), DISK_SIZE);
	fclose(f);

	ck_assert_msg(qcow2_open(&img, path, &opts, io, err, sizeof(err)) == 0, "%s", err);
	tu_ops_alloc(img, ops, sizeof(ops[0]), BATCH, MAX_LEN, 4096);
	landed_elsewhere = 0;
	for (round = 0; round < 30; round++) {
		for (n = 0; n < BATCH; n++) {
			struct op *o = &ops[n];

			do {
				/* Mostly small writes inside one or two clusters. */
				o->t.len = 1 + tu_rnd(&rng) % (tu_rnd(&rng) % 4 ? 8192 : MAX_LEN);
				o->t.off = tu_rnd(&rng) % (DISK_SIZE - o->t.len);
				if (direct) {
					o->t.off &= ~511ull;
					o->t.len = (o->t.len + 511) & ~511ull;
				}
			} while (tu_ops_overlap(ops, sizeof(ops[0]), n, o->t.off, o->t.len));
			o->pat = (uint8_t)(tu_rnd(&rng) % 255) + 1;
			memset(o->t.buf, o->pat, o->t.len);
			o->fail = tu_rnd(&rng) % 10 == 0;
			o->asked = o->t.done = false;
		}
		for (i = 0; i < n; i++) {
			qcow2_req_defer_data(ops[i].t.req, op_fetch);
			qcow2_req_submit(ops[i].t.req, QCOW2_OP_WRITE, ops[i].t.off, ops[i].t.len,
					 ops[i].t.buf, tu_op_done, &ops[i]);
		}
		while (!tu_ops_done(ops, sizeof(ops[0]), n)) {
			if (!deliver(ops, n, false) && io->wait(io) == -EAGAIN)
				ck_assert_msg(deliver(ops, n, true) > 0, "stalled: nothing to deliver");
		}
		for (i = 0; i < n; i++) {
			struct op *o = &ops[i];

			if (o->fail) {
				ck_assert_int_eq(o->t.res, -EIO);
				failed++;
				continue;
			}
			ck_assert_msg(o->t.res == 0, "write failed: %d %s", o->t.res, qcow2_errmsg(img));
			memset(mirror + o->t.off, o->pat, o->t.len);
		}
		ck_assert_uint_le(img->scratch_bytes, QCOW2_SCRATCH_KEEP);
		if (round % 10 == 9)
			tu_verify_image(img, mirror, DISK_SIZE);
	}
	ck_assert_int_gt(failed, 0);
	if (expect_cow)
		ck_assert_msg(landed_elsewhere > 0, "no fetch landed in a COW buffer");
	tu_ops_free(ops, sizeof(ops[0]), BATCH);
	tu_reopen_verify(img, path, &opts, io, mirror, DISK_SIZE);
	snprintf(cmd, sizeof(cmd), "rm -f %s/*", dir);
	ck_assert_int_eq(system(cmd), 0);
	qcow2_uring_free(io);
	free(mirror);
}

#define FILL "truncate -s 8M mirror.raw; " \
	"qemu-io -f raw -c 'write -P 0x5a 0 3M' -c 'write -P 0xa5 5M 3M' mirror.raw >/dev/null; "
#define BACKING FILL "qemu-img convert -O qcow2 -o cluster_size=65536 mirror.raw base.qcow2; " \
	"qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 -o cluster_size=65536 d.qcow2 8M"
#define COMPRESSED FILL "qemu-img convert -c -O qcow2 -o cluster_size=16384 mirror.raw d.qcow2"
#define ZSTD_BACKING FILL "qemu-img convert -c -O qcow2 -o compression_type=zstd mirror.raw " \
	"base.qcow2; qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 d.qcow2 8M"
#define SNAPSHOT FILL "qemu-img convert -O qcow2 -o cluster_size=4096 mirror.raw d.qcow2; " \
	"qemu-img snapshot -c s1 d.qcow2"
#define BIG_BACKING FILL "qemu-img convert -O qcow2 -o cluster_size=2M mirror.raw base.qcow2; " \
	"qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 -o cluster_size=2M d.qcow2 8M"
#define EMPTY "truncate -s 8M mirror.raw; " \
	"qemu-img create -q -f qcow2 -o cluster_size=65536 d.qcow2 8M"

START_TEST(test_defer_backing) { run_one(BACKING, true, false); }
END_TEST
START_TEST(test_defer_compressed) { run_one(COMPRESSED, true, false); }
END_TEST
START_TEST(test_defer_snapshot) { run_one(SNAPSHOT, true, false); }
END_TEST
START_TEST(test_defer_big_clusters) { run_one(BIG_BACKING, true, true); }
END_TEST
START_TEST(test_defer_empty) { run_one(EMPTY, false, false); }
END_TEST
START_TEST(test_defer_direct_backing) { run_one(BACKING, true, true); }
END_TEST
START_TEST(test_defer_direct_compressed) { run_one(COMPRESSED, true, true); }
END_TEST
START_TEST(test_defer_direct_zstd_backing) { run_one(ZSTD_BACKING, true, true); }
END_TEST
START_TEST(test_defer_direct_snapshot) { run_one(SNAPSHOT, true, true); }
END_TEST

int main(void)
{
	const TTest *const tests[] = {
		test_defer_backing, test_defer_big_clusters, test_defer_compressed,
		test_defer_snapshot, test_defer_empty, test_defer_direct_backing,
		test_defer_direct_compressed, test_defer_direct_zstd_backing,
		test_defer_direct_snapshot,
	};

	return tu_run_tests("defer", "deferred data", 240, dir, tests,
			    sizeof(tests) / sizeof(tests[0]));
}
