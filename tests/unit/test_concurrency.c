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

#include "files.h"
#include "qcow2.h"

#define DISK_SIZE	(48ull << 20)
#define BATCH		48
#define MAX_LEN		(192u << 10)

struct op {
	struct qcow2_req *req;
	enum qcow2_op op;
	uint64_t off, len;
	uint8_t *buf;
	int res;
	bool done;
};

static char dir[] = "/tmp/uq-conc-XXXXXX";
static uint64_t rng = 88172645463325252ull;

static uint64_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static void op_done(struct qcow2_req *req, int res, void *priv)
{
	struct op *o = priv;

	(void)req;
	o->res = res;
	o->done = true;
}

static bool overlaps(const struct op *ops, int n, uint64_t off, uint64_t len)
{
	int i;

	for (i = 0; i < n; i++)
		if (off < ops[i].off + ops[i].len && ops[i].off < off + len)
			return true;
	return false;
}

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
	for (i = 0; i < BATCH; i++) {
		ops[i].req = qcow2_req_new(img);
		ops[i].buf = malloc(MAX_LEN);
		ck_assert_ptr_nonnull(ops[i].req);
		ck_assert_ptr_nonnull(ops[i].buf);
	}
	for (round = 0; round < 40; round++) {
		for (n = 0; n < BATCH; n++) {
			struct op *o = &ops[n];
			uint64_t kind = rnd() % 16;

			do {
				o->len = 1 + rnd() % MAX_LEN;
				o->off = rnd() % (DISK_SIZE - o->len);
				if (kind >= 13) {	/* discard: whole 64k-aligned units */
					o->off &= ~0xffffull;
					o->len = (o->len + 0xffff) & ~0xffffull;
					if (o->off + o->len > DISK_SIZE)
						o->len = DISK_SIZE - o->off;
				}
			} while (overlaps(ops, n, o->off, o->len));
			o->op = kind < 10 ? QCOW2_OP_WRITE : kind < 13 ? QCOW2_OP_WRITE_ZEROES :
				kind < 15 ? QCOW2_OP_DISCARD : QCOW2_OP_FLUSH;
			if (o->op == QCOW2_OP_WRITE)
				memset(o->buf, (int)(rnd() % 255) + 1, o->len);
			o->done = false;
		}
		for (i = 0; i < n; i++)
			qcow2_req_submit(ops[i].req, ops[i].op, ops[i].op == QCOW2_OP_FLUSH ? 0 : ops[i].off,
					 ops[i].op == QCOW2_OP_FLUSH ? 0 : ops[i].len, ops[i].buf,
					 op_done, &ops[i]);
		ck_assert_int_eq(qcow2_drain(img), 0);
		for (i = 0; i < n; i++) {
			struct op *o = &ops[i];

			ck_assert(o->done);
			ck_assert_msg(o->res == 0, "op %d failed: %d %s", o->op, o->res,
				      qcow2_errmsg(img));
			if (o->op == QCOW2_OP_WRITE)
				memcpy(mirror + o->off, o->buf, o->len);
			else if (o->op == QCOW2_OP_WRITE_ZEROES)
				memset(mirror + o->off, 0, o->len);
			else if (o->op == QCOW2_OP_DISCARD)
				memset(mirror + o->off, 0, o->len);
		}
		if (round % 10 == 9)
			tu_verify_image(img, mirror, DISK_SIZE);
	}
	for (i = 0; i < BATCH; i++) {
		qcow2_req_free(ops[i].req);
		free(ops[i].buf);
	}
	ck_assert_int_eq(qcow2_close(img), 0);

	ck_assert_msg(qcow2_open(&img, path, &opts, io, err, sizeof(err)) == 0, "%s", err);
	tu_verify_image(img, mirror, DISK_SIZE);
	ck_assert_int_eq(qcow2_close(img), 0);
	snprintf(cmd, sizeof(cmd), "qemu-img check -q %s", path);
	ck_assert_int_eq(system(cmd), 0);
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
	Suite *s = suite_create("concurrency");
	TCase *tc = tcase_create("batches");
	SRunner *sr;
	int failed;

	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return EXIT_FAILURE;
	}
	tcase_set_timeout(tc, 240);
	tcase_add_test(tc, test_conc_64k);
	tcase_add_test(tc, test_conc_4k_rc1);
	tcase_add_test(tc, test_conc_512_rc64);
	tcase_add_test(tc, test_conc_v2);
	suite_add_tcase(s, tc);
	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	rmdir(dir);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
