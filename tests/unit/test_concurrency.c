// SPDX-License-Identifier: MIT
/*
 * Many requests in flight at once through the async engine, with caches
 * small enough that requests park on slice loads, on each other's
 * allocations and on flushes for room. Byte ranges in one batch never
 * overlap (clusters may), so the result is defined: it must match an
 * in-memory mirror, survive a reopen, and pass `qemu-img check`.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "batch.h"
#include "files.h"
#include "run.h"
#include "qcow2.h"

#define DISK_SIZE	(48ull << 20)
#define BATCH		48
#define MAX_LEN		(192u << 10)

struct op {
	struct tu_op t;
	enum qcow2_op op;
};

static char dir[] = "/tmp/uq-conc-XXXXXX";
static uint64_t rng = 88172645463325252ull;

static void run_one(const char *create_opts)
{
	struct qcow2_opts opts = { .l2_cache_bytes = 8192, .refcount_cache_bytes = 8192,
				   .slice_bytes = 512 };
	uint8_t *mirror = calloc(1, DISK_SIZE);
	struct qcow2_io *io = qcow2_uring_new(32);
	struct op ops[BATCH];
	char path[128], cmd[512], err[256];
	struct qcow2 *img;
	int round, i, n;

	ck_assert_ptr_nonnull(mirror);
	ck_assert_ptr_nonnull(io);
	snprintf(path, sizeof(path), "%s/c.qcow2", dir);
	snprintf(cmd, sizeof(cmd), "qemu-img create -q -f qcow2 -o %s %s %llu",
		 create_opts, path, (unsigned long long)DISK_SIZE);
	ck_assert_int_eq(system(cmd), 0);
	ck_assert_msg(qcow2_open(&img, path, &opts, io, err, sizeof(err)) == 0, "%s", err);
	tu_ops_alloc(img, ops, sizeof(ops[0]), BATCH, MAX_LEN, 0);
	for (round = 0; round < 40; round++) {
		for (n = 0; n < BATCH; n++) {
			struct op *o = &ops[n];
			uint64_t kind = tu_rnd(&rng) % 16;

			do {
				o->t.len = 1 + tu_rnd(&rng) % MAX_LEN;
				o->t.off = tu_rnd(&rng) % (DISK_SIZE - o->t.len);
				if (kind >= 13) {	/* discard: whole 64k-aligned units */
					o->t.off &= ~0xffffull;
					o->t.len = (o->t.len + 0xffff) & ~0xffffull;
					if (o->t.off + o->t.len > DISK_SIZE)
						o->t.len = DISK_SIZE - o->t.off;
				}
			} while (tu_ops_overlap(ops, sizeof(ops[0]), n, o->t.off, o->t.len));
			o->op = kind < 10 ? QCOW2_OP_WRITE : kind < 12 ? QCOW2_OP_WRITE_ZEROES :
				kind < 13 ? QCOW2_OP_WRITE_ZEROES_NOUNMAP :
				kind < 15 ? QCOW2_OP_DISCARD : QCOW2_OP_FLUSH;
			if (o->op == QCOW2_OP_WRITE)
				memset(o->t.buf, (int)(tu_rnd(&rng) % 255) + 1, o->t.len);
			o->t.done = false;
		}
		for (i = 0; i < n; i++)
			qcow2_req_submit(ops[i].t.req, ops[i].op, ops[i].op == QCOW2_OP_FLUSH ? 0 : ops[i].t.off,
					 ops[i].op == QCOW2_OP_FLUSH ? 0 : ops[i].t.len, ops[i].t.buf,
					 tu_op_done, &ops[i]);
		ck_assert_int_eq(qcow2_drain(img), 0);
		for (i = 0; i < n; i++) {
			struct op *o = &ops[i];

			ck_assert(o->t.done);
			ck_assert_msg(o->t.res == 0, "op %d failed: %d %s", o->op, o->t.res,
				      qcow2_errmsg(img));
			if (o->op == QCOW2_OP_WRITE)
				memcpy(mirror + o->t.off, o->t.buf, o->t.len);
			else if (o->op != QCOW2_OP_FLUSH)
				memset(mirror + o->t.off, 0, o->t.len);	/* zeroes, discard */
		}
		if (round % 10 == 9)
			tu_verify_image(img, mirror, DISK_SIZE);
	}
	tu_ops_free(ops, sizeof(ops[0]), BATCH);
	tu_reopen_verify(img, path, &opts, io, mirror, DISK_SIZE);
	unlink(path);
	qcow2_uring_free(io);
	free(mirror);
}

/* Discards are 64k-aligned: with 64k clusters they really deallocate. */
START_TEST(test_conc_64k) { run_one("cluster_size=65536"); }
END_TEST
START_TEST(test_conc_4k_rc1) { run_one("cluster_size=4096,refcount_bits=1"); }
END_TEST
START_TEST(test_conc_512_rc64) { run_one("cluster_size=512,refcount_bits=64"); }
END_TEST
START_TEST(test_conc_v2) { run_one("compat=0.10,cluster_size=16384"); }
END_TEST

int main(void)
{
	const TTest *const tests[] = {
		test_conc_64k, test_conc_4k_rc1, test_conc_512_rc64, test_conc_v2,
	};

	return tu_run_tests("concurrency", "batches", 240, dir, tests, sizeof(tests) / sizeof(tests[0]));
}
