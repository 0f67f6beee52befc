// SPDX-License-Identifier: MIT
/*
 * Opaque read buffers, the engine half of ublk zero copy (qcow2_req_opaque):
 * the engine must pass the buffer's addresses on in single-iovec aios and
 * never touch them, and end a request with -EXDEV exactly where some byte
 * is not a plain allocated cluster (holes, zeros, backing file, compressed).
 * The buffers here are a PROT_NONE mapping (a touch is a crash); a wrapping
 * backend plays READ_FIXED: it reads such aios into a real buffer at the
 * same offset. Reads that end with -EXDEV are retried with a real buffer,
 * as the target does. Both must match qemu-img's view of the image.
 */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "files.h"
#include "internal.h"

#define DISK_SIZE	(16ull << 20)
#define BATCH		16
#define MAX_LEN		(256u << 10)
#define SECTORS		(DISK_SIZE / 512)

struct op {
	struct qcow2_req *req;
	uint64_t off, len;
	uint8_t *buf;			/* what the token stands for */
	bool done;
	int res;
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
};

static char dir[] = "/tmp/uq-opaque-XXXXXX";
static uint64_t rng = 0x2545f4914f6cdd1dull;

static uint64_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static int wrap_submit(struct qcow2_io *io, struct qcow2_aio *aio)
{
	struct wrap *w = (struct wrap *)io;
	size_t rel;
	ssize_t n;

	if (aio->op == QCOW2_AIO_FSYNC ||
	    (uintptr_t)aio->iov[0].iov_base - (uintptr_t)w->tokens >= (size_t)BATCH * MAX_LEN)
		return w->inner->submit(w->inner, aio);
	ck_assert_int_eq(aio->op, QCOW2_AIO_READ);
	ck_assert_uint_eq(aio->iovcnt, 1);
	ck_assert_uint_lt(w->nr_ready, 64);
	rel = (size_t)((uint8_t *)aio->iov[0].iov_base - w->tokens);
	ck_assert_uint_le(rel % MAX_LEN + aio->iov[0].iov_len, MAX_LEN);
	n = pread(aio->fd, w->ops[rel / MAX_LEN].buf + rel % MAX_LEN, aio->iov[0].iov_len,
		  (off_t)aio->off);
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

static void op_done(struct qcow2_req *req, int res, void *priv)
{
	struct op *o = priv;

	(void)req;
	o->res = res;
	o->done = true;
}

static void wait_all(struct wrap *w, struct op *ops, int n)
{
	for (;;) {
		bool all_done = true;
		int i;

		for (i = 0; i < n; i++)
			all_done &= ops[i].done;
		if (all_done)
			return;
		ck_assert_int_eq(w->io.wait(&w->io), 0);
	}
}

static void run_one(bool direct)
{
	struct qcow2_opts opts = { .l2_cache_bytes = 16384, .refcount_cache_bytes = 8192,
				   .slice_bytes = 4096, .direct = direct };
	struct wrap w = { .io = { .submit = wrap_submit, .wait = wrap_wait } };
	struct op ops[BATCH];
	uint8_t *mirror, *plain;
	unsigned int round, exdev = 0, whole = 0;
	char path[128], err[256];
	struct qcow2 *img;
	size_t len;
	int i;

	/*
	 * 64k clusters: data, zeros, compressed, unallocated over a shorter
	 * backing file (12 of 16 MiB), partial writes; plain.bin has a 1 for
	 * each sector of a plain allocated cluster (qemu-img map: depth 0,
	 * data at an offset).
	 */
	tu_sh("set -e; cd %s; qemu-img create -q -f qcow2 base.qcow2 12M; "
	      "qemu-io -f qcow2 -c 'write -P 0xb1 0 12M' base.qcow2 >/dev/null; "
	      "truncate -s 16M c.raw; "
	      "qemu-io -f raw -c 'write -P 0xc1 4M 2M' -c 'write -P 0xc2 13M 1M' c.raw >/dev/null; "
	      "qemu-img convert -c -O qcow2 c.raw d.qcow2; "
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
	      "open(\"plain.bin\", \"wb\").write(p)' ", dir, (unsigned long long)SECTORS);
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
	for (i = 0; i < BATCH; i++) {
		ops[i].req = qcow2_req_new(img);
		ck_assert_ptr_nonnull(ops[i].req);
		ck_assert_int_eq(posix_memalign((void **)&ops[i].buf, 4096, MAX_LEN), 0);
	}
	for (round = 0; round < 60; round++) {
		for (i = 0; i < BATCH; i++) {
			struct op *o = &ops[i];

			/* 512-byte aligned, as ublk sends; a third inside one cluster. */
			o->len = (1 + rnd() % (rnd() % 3 ? MAX_LEN / 512 : 128)) * 512;
			o->off = (rnd() % ((DISK_SIZE - o->len) / 512 + 1)) * 512;
			memset(o->buf, 0xee, MAX_LEN);
			o->done = false;
			qcow2_req_opaque(o->req);
			qcow2_req_submit(o->req, QCOW2_OP_READ, o->off, o->len,
					 w.tokens + (size_t)i * MAX_LEN, op_done, o);
		}
		wait_all(&w, ops, BATCH);
		for (i = 0; i < BATCH; i++) {
			struct op *o = &ops[i];
			bool all_plain = memchr(plain + o->off / 512, 0, o->len / 512) == NULL;

			if (all_plain) {
				ck_assert_msg(o->res == 0, "opaque read [%llu, +%llu) of plain clusters: %d",
					      (unsigned long long)o->off, (unsigned long long)o->len, o->res);
				ck_assert_msg(memcmp(o->buf, mirror + o->off, o->len) == 0,
					      "opaque read at %llu differs", (unsigned long long)o->off);
				whole++;
				o->done = true;
				continue;
			}
			ck_assert_msg(o->res == -EXDEV, "opaque read [%llu, +%llu) past plain clusters: %d",
				      (unsigned long long)o->off, (unsigned long long)o->len, o->res);
			exdev++;
			/* The target's way back: a real buffer. */
			o->done = false;
			qcow2_req_submit(o->req, QCOW2_OP_READ, o->off, o->len, o->buf, op_done, o);
		}
		wait_all(&w, ops, BATCH);
		for (i = 0; i < BATCH; i++) {
			ck_assert_int_eq(ops[i].res, 0);
			ck_assert_msg(memcmp(ops[i].buf, mirror + ops[i].off, ops[i].len) == 0,
				      "read at %llu differs", (unsigned long long)ops[i].off);
		}
	}
	/* Both ways taken, and the engine's errors were not set by -EXDEV. */
	ck_assert_uint_gt(whole, 50);
	ck_assert_uint_gt(exdev, 50);
	ck_assert_uint_gt(w.nr_fixed, whole);
	ck_assert_str_eq(qcow2_errmsg(img), "");
	for (i = 0; i < BATCH; i++) {
		qcow2_req_free(ops[i].req);
		free(ops[i].buf);
	}
	ck_assert_int_eq(qcow2_close(img), 0);
	munmap(w.tokens, (size_t)BATCH * MAX_LEN);
	qcow2_uring_free(w.inner);
	free(mirror);
	free(plain);
	tu_sh("rm -f %s/*", dir);
}

START_TEST(test_opaque_buffered) { run_one(false); }
END_TEST
START_TEST(test_opaque_direct) { run_one(true); }
END_TEST

int main(void)
{
	Suite *s = suite_create("opaque");
	TCase *tc = tcase_create("opaque read buffers");
	SRunner *sr;
	int failed;

	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return EXIT_FAILURE;
	}
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_opaque_buffered);
	tcase_add_test(tc, test_opaque_direct);
	suite_add_tcase(s, tc);
	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	rmdir(dir);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
