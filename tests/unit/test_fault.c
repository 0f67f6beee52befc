// SPDX-License-Identifier: MIT
/*
 * Injected I/O errors. The test backend (support/tio.c) fails image reads,
 * writes and fdatasyncs with EIO or ENOSPC: the nth one (n stepped through
 * the whole workload), every one from the nth on (a full disk that later
 * frees up), or at random with a seed; a failed write may also have landed
 * (unknown outcome). For every run:
 *  - a request whose I/O failed completes with a negative errno; no fault
 *    is swallowed (a batch with a fault has a failed request);
 *  - the engine keeps serving: once the faults stop, every request and the
 *    final flush and close succeed (nothing hangs, nothing leaks under ASan);
 *  - reopened, the image passes our check (no leaks either) and qemu-img
 *    check, and reads back every request that succeeded; failed ones read
 *    old or new bytes.
 * A fault while closing leaves an image with no corruption (leaks allowed,
 * as after a crash) that keeps what the last successful flush covered. Faults while opening fail the open
 * with a message.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "qcheck.h"
#include "files.h"
#include "tio.h"
#include "wl.h"
#include "run.h"

#define R (1u << QCOW2_AIO_READ)
#define W (1u << QCOW2_AIO_WRITE)
#define F (1u << QCOW2_AIO_FSYNC)

struct scenario {
	const char *name;
	const char *opts;
	const char *base_opts;	/* backing file, filled; NULL: none */
	bool compressed;	/* guest data written compressed first */
	bool snapshot;		/* guest data written, then a snapshot */
	bool data_file;
	uint32_t cluster;
	uint64_t disk;
};

static char dir[] = "/dev/shm/uq-fault-XXXXXX";
static uint64_t total_runs, total_faults, total_qemu_checks;

struct fault_ctx {
	const struct scenario *sc;
	char img[256], data[256], base[256];
	uint8_t *tmpl[2];	/* starting bytes of the image and its data file */
	size_t tmpl_len[2];
	uint8_t *guest_base;
	struct tio *t;
	struct wl_model md;
	struct qcheck qc;
};

static void spill(const char *path, const uint8_t *buf, size_t len)
{
	int fd = open(path, O_WRONLY | O_TRUNC);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pwrite(fd, buf, len, 0), (ssize_t)len);
	close(fd);
}

static void setup(struct fault_ctx *c)
{
	const struct scenario *sc = c->sc;
	struct qcow2_io *io;
	struct qcow2 *img;
	char extra[600] = "", err[256];

	snprintf(c->img, sizeof(c->img), "%s/%s.qcow2", dir, sc->name);
	snprintf(c->data, sizeof(c->data), "%s/%s.data", dir, sc->name);
	snprintf(c->base, sizeof(c->base), "%s/%s-base.qcow2", dir, sc->name);
	if (sc->base_opts) {
		tu_sh("qemu-img create -q -f qcow2 -o %s %s %llu", sc->base_opts, c->base,
		   (unsigned long long)sc->disk);
		tu_image_fill(c->base, sc->disk, sc->cluster, 11, 3, false, NULL);
		snprintf(extra, sizeof(extra), "-b %s -F qcow2", c->base);
	}
	if (sc->data_file)
		snprintf(extra, sizeof(extra), "-o data_file=%s", c->data);
	tu_sh("qemu-img create -q -f qcow2 -o %s %s %s %llu", sc->opts, extra, c->img,
	   (unsigned long long)sc->disk);
	if (sc->compressed || sc->snapshot)
		tu_image_fill(c->img, sc->disk, sc->cluster, 11, 3, sc->compressed,
			      sc->snapshot ? "s" : NULL);
	c->tmpl[0] = tu_slurp(c->img, &c->tmpl_len[0]);
	if (sc->data_file)
		c->tmpl[1] = tu_slurp(c->data, &c->tmpl_len[1]);

	io = qcow2_uring_new(32);
	ck_assert_ptr_nonnull(io);
	ck_assert_msg(qcow2_open(&img, c->img, NULL, io, err, sizeof(err)) == 0, "%s", err);
	c->guest_base = malloc(sc->disk);
	ck_assert_ptr_nonnull(c->guest_base);
	ck_assert_int_eq(qcow2_pread(img, c->guest_base, sc->disk, 0), 0);
	ck_assert_int_eq(qcow2_close(img), 0);
	qcow2_uring_free(io);
	ck_assert_int_eq(wl_model_init(&c->md, c->guest_base, sc->disk), 0);
	c->t = tio_new(64);
	ck_assert_ptr_nonnull(c->t);
	qcheck_init(&c->qc, dir);
}

static void teardown(struct fault_ctx *c)
{
	char msg[600];

	ck_assert_msg(qcheck_flush(&c->qc, msg, sizeof(msg)) == 0, "%s", msg);
	total_qemu_checks += c->qc.checked;
	tio_free(c->t);
	wl_model_free(&c->md);
	free(c->tmpl[0]);
	free(c->tmpl[1]);
	free(c->guest_base);
	unlink(c->img);
	unlink(c->data);
	unlink(c->base);
}

/* The files as they were before any run. */
static void restore(struct fault_ctx *c)
{
	spill(c->img, c->tmpl[0], c->tmpl_len[0]);
	if (c->sc->data_file)
		spill(c->data, c->tmpl[1], c->tmpl_len[1]);
}

/* Leaks are allowed after errors (as in QEMU); anything else is shown. */
static void no_report(void *opaque, const char *line)
{
	(void)opaque;
	if (strncmp(line, "Leaked", 6))
		fprintf(stderr, "  check: %s\n", line);
}

/*
 * Reopened without faults: consistent, and reads what the model allows.
 * Leaks only with @leaks_ok (a close that failed, as after a crash): a
 * failed request gives back what it allocated, and the flushes after it
 * write that down.
 */
static void verify(struct fault_ctx *c, const char *what, bool leaks_ok)
{
	struct qcow2_opts opts = { .read_only = true };
	struct qcow2_check_result res;
	struct qcow2_io *io = qcow2_uring_new(32);
	struct qcow2 *img;
	uint8_t *data = malloc(c->sc->disk);
	char err[256], label[300], msg[600];
	int64_t bad;

	ck_assert_ptr_nonnull(io);
	ck_assert_ptr_nonnull(data);
	ck_assert_msg(qcow2_open(&img, c->img, &opts, io, err, sizeof(err)) == 0, "%s: %s: %s",
		      c->sc->name, what, err);
	ck_assert_int_eq(qcow2_check(img, 0, &res, no_report, NULL), 0);
	ck_assert_msg(!res.corruptions && !res.check_errors, "%s: %s: check finds %llu corruptions",
		      c->sc->name, what, (unsigned long long)res.corruptions);
	ck_assert_msg(leaks_ok || !res.leaks, "%s: %s: %llu clusters leaked", c->sc->name, what,
		      (unsigned long long)res.leaks);
	ck_assert_int_eq(qcow2_pread(img, data, c->sc->disk, 0), 0);
	bad = wl_model_check(&c->md, data);
	ck_assert_msg(bad < 0, "%s: %s: guest byte %lld reads 0x%02x, expected 0x%02x",
		      c->sc->name, what, (long long)bad, bad < 0 ? 0 : data[bad],
		      bad < 0 ? 0 : c->md.m[bad]);
	qcow2_close(img);
	qcow2_uring_free(io);
	free(data);
	snprintf(label, sizeof(label), "%s: %s", c->sc->name, what);
	ck_assert_msg(qcheck_add(&c->qc, c->img, label, msg, sizeof(msg)) == 0, "%s", msg);
}

static struct qcow2 *open_rw(struct fault_ctx *c)
{
	struct qcow2_opts opts = { .l2_cache_bytes = 4096, .refcount_cache_bytes = 4096,
				   .slice_bytes = 512 };
	struct qcow2 *img;
	char err[256];

	ck_assert_msg(qcow2_open(&img, c->img, &opts, &c->t->io, err, sizeof(err)) == 0,
		      "%s", err);
	return img;
}

static struct wl_cfg wl_cfg(const struct fault_ctx *c, uint64_t seed)
{
	return (struct wl_cfg){ .disk = c->sc->disk, .align = c->sc->cluster,
				.max_len = 3 * c->sc->cluster + 1000, .batch = 6,
				.discard = true, .flush_pct = 8, .seed = seed };
}

#define FAULT_ROUNDS	4
#define CLEAN_ROUNDS	3

/*
 * One run: FAULT_ROUNDS batches with @f armed, then CLEAN_ROUNDS batches, a
 * flush and a close without faults, then verify. Returns the faults
 * injected; *@matched (if not NULL): the operations the rule matched.
 */
static uint64_t run_one(struct fault_ctx *c, const struct tio_fault *f, uint64_t seed,
			uint64_t *matched)
{
	struct wl_cfg cfg = wl_cfg(c, seed);
	struct qcow2 *img;
	struct wl w;
	uint64_t injected = 0, before;
	uint32_t i, first;
	unsigned int r;
	char what[160];

	restore(c);
	tio_fault_set(c->t, NULL);
	img = open_rw(c);
	ck_assert_int_eq(wl_init(&w, img, c->t, &cfg), 0);
	tio_fault_set(c->t, f);
	for (r = 0; r < FAULT_ROUNDS; r++) {
		bool failed = false;

		first = w.nr_ops;
		before = c->t->injected;
		ck_assert_msg(wl_batch(&w) == 0, "%s: the engine stalled: %s", c->sc->name,
			      qcow2_errmsg(img));
		for (i = first; i < w.nr_ops; i++) {
			ck_assert_msg(w.ops[i].res <= 0, "positive result %d", w.ops[i].res);
			/* A short write is a full file system: ENOSPC, as QEMU says. */
			ck_assert_msg(!f->short_write || w.ops[i].res == 0 ||
				      w.ops[i].res == -ENOSPC,
				      "%s: a short write failed a request with %d, not -ENOSPC",
				      c->sc->name, w.ops[i].res);
			failed |= w.ops[i].res < 0;
		}
		ck_assert_msg(!failed || c->t->injected > before,
			      "%s: a request failed with no fault injected: %s", c->sc->name,
			      qcow2_errmsg(img));
		ck_assert_msg(failed || c->t->injected == before,
			      "%s: %llu faults injected and no request failed", c->sc->name,
			      (unsigned long long)(c->t->injected - before));
	}
	injected = c->t->injected;
	if (matched)
		*matched = c->t->matched;
	tio_fault_set(c->t, NULL);
	for (r = 0; r < CLEAN_ROUNDS; r++) {
		first = w.nr_ops;
		ck_assert_int_eq(wl_batch(&w), 0);
		for (i = first; i < w.nr_ops; i++)
			ck_assert_msg(w.ops[i].res == 0, "%s: request %u (op %d) fails after the faults stopped: %d %s",
				      c->sc->name, i, w.ops[i].op, w.ops[i].res, qcow2_errmsg(img));
	}
	ck_assert_msg(wl_flush(&w) == 0, "%s: flush after the faults: %s", c->sc->name,
		      qcow2_errmsg(img));
	for (i = 0; i < w.cfg.batch; i++) {
		qcow2_req_free(w.reqs[i]);
		w.reqs[i] = NULL;
	}
	ck_assert_msg(qcow2_close(img) == 0, "%s: close after the faults", c->sc->name);

	wl_model_reset(&c->md, c->guest_base);
	for (i = 0; i < w.nr_ops; i++)
		ck_assert_int_eq(wl_model_apply(&c->md, &w.ops[i], w.ops[i].res == 0), 0);
	snprintf(what, sizeof(what), "ops 0x%x err %d nth %llu%s seed %llu", f->ops, f->err,
		 (unsigned long long)f->nth, f->persist ? "+" : "", (unsigned long long)seed);
	verify(c, what, false);
	wl_fini(&w);
	total_runs++;
	total_faults += injected;
	return injected;
}

/* How many operations of each kind a fault-free run's faulted phase does. */
static void plan(struct fault_ctx *c, uint64_t seed, uint64_t n[3])
{
	static const unsigned int kinds[3] = { R, W, F };
	int k;

	for (k = 0; k < 3; k++) {
		/* A rule that matches and never fires counts the operations. */
		struct tio_fault f = { .ops = kinds[k], .err = -EIO, .nth = UINT64_MAX };

		run_one(c, &f, seed, &n[k]);
	}
}

static const struct scenario scenarios[] = {
	{ "plain-4k", "cluster_size=4096", NULL, false, false, false, 4096, 1 << 20 },
	{ "backing-64k", "cluster_size=65536", "cluster_size=65536", false, false, false,
	  65536, 2 << 20 },
	{ "compressed-4k", "cluster_size=4096", NULL, true, false, false, 4096, 1 << 20 },
	{ "snapshot-4k", "cluster_size=4096", NULL, false, true, false, 4096, 1 << 20 },
	{ "data-file-4k", "cluster_size=4096", NULL, false, false, true, 4096, 1 << 20 },
	{ "extl2-backing", "cluster_size=65536,extended_l2=on", "cluster_size=65536", false,
	  false, false, 65536, 2 << 20 },
};

#define NR_SCENARIOS (sizeof(scenarios) / sizeof(scenarios[0]))

/* The nth operation of each kind fails, n stepped over the whole workload. */
START_TEST(test_fault_nth)
{
	static const struct { unsigned int ops; int err; bool land; } rules[] = {
		{ R, -EIO, false }, { W, -EIO, false }, { W, -EIO, true },
		{ W, -ENOSPC, false }, { F, -EIO, false }, { F, -ENOSPC, false },
	};
	struct fault_ctx c = { .sc = &scenarios[_i] };
	uint64_t n[3], nth, step, seed = 100 + _i;
	unsigned int k;

	setup(&c);
	plan(&c, seed, n);
	for (k = 0; k < sizeof(rules) / sizeof(rules[0]); k++) {
		uint64_t total = n[rules[k].ops == R ? 0 : rules[k].ops == W ? 1 : 2];

		step = total / 9 + 1;
		for (nth = 1; nth <= total; nth += step) {
			struct tio_fault f = { .ops = rules[k].ops, .err = rules[k].err,
					       .nth = nth, .land = rules[k].land };

			/* Completion order varies: the nth may not come. */
			ck_assert_uint_le(run_one(&c, &f, seed, NULL), 1);
		}
	}
	teardown(&c);
}
END_TEST

/* A full disk that frees up again: every write from the nth on fails. */
START_TEST(test_fault_persistent)
{
	struct fault_ctx c = { .sc = &scenarios[_i] };
	uint64_t n[3], seed = 200 + _i, k;

	setup(&c);
	plan(&c, seed, n);
	for (k = 1; k <= 4; k++) {
		struct tio_fault f = { .ops = W | F, .err = -ENOSPC,
				       .nth = k * (n[1] + n[2]) / 5 + 1, .persist = true };

		ck_assert_uint_ge(run_one(&c, &f, seed, NULL), 1);
	}
	teardown(&c);
}
END_TEST

/* The nth write lands in part and completes short, n stepped over the workload. */
START_TEST(test_fault_short)
{
	struct fault_ctx c = { .sc = &scenarios[_i] };
	uint64_t n[3], nth, step, seed = 500 + _i;

	setup(&c);
	plan(&c, seed, n);
	step = n[1] / 9 + 1;
	for (nth = 1; nth <= n[1]; nth += step) {
		struct tio_fault f = { .ops = W, .err = -ENOSPC, .nth = nth, .short_write = true };

		/* Completion order varies: the nth may not come. */
		ck_assert_uint_le(run_one(&c, &f, seed, NULL), 1);
	}
	teardown(&c);
}
END_TEST

/* Random faults of every kind. */
START_TEST(test_fault_random)
{
	struct fault_ctx c = { .sc = &scenarios[_i] };
	uint64_t s;

	setup(&c);
	for (s = 1; s <= 10; s++) {
		struct tio_fault f = { .ops = R | W | F, .err = s & 1 ? -EIO : -ENOSPC,
				       .per_64k = 2500, .seed = s * 977 + _i, .land = s % 3 == 0 };

		run_one(&c, &f, 300 + s, NULL);
	}
	teardown(&c);
}
END_TEST

/* Faults while closing: the close fails, the image stays consistent and keeps what was flushed. */
START_TEST(test_fault_close)
{
	struct fault_ctx c = { .sc = &scenarios[_i] };
	uint64_t nth;
	unsigned int ops;

	setup(&c);
	for (ops = W; ops <= F; ops <<= 1) {
		for (nth = 1;; nth++) {
			struct tio_fault f = { .ops = ops, .err = -EIO, .nth = nth };
			struct wl_cfg cfg = wl_cfg(&c, 400 + nth);
			struct qcow2 *img;
			struct wl w;
			uint32_t i, flushed;
			int ret;

			restore(&c);
			tio_fault_set(c.t, NULL);
			img = open_rw(&c);
			ck_assert_int_eq(wl_init(&w, img, c.t, &cfg), 0);
			ck_assert_int_eq(wl_batch(&w), 0);
			ck_assert_int_eq(wl_flush(&w), 0);
			flushed = w.nr_ops;
			ck_assert_int_eq(wl_batch(&w), 0);
			for (i = 0; i < w.nr_ops; i++)
				ck_assert_int_eq(w.ops[i].res, 0);
			for (i = 0; i < w.cfg.batch; i++) {
				qcow2_req_free(w.reqs[i]);
				w.reqs[i] = NULL;
			}
			tio_fault_set(c.t, &f);
			ret = qcow2_close(img);
			ck_assert_msg(c.t->injected ? ret < 0 : ret == 0,
				      "close returned %d with %llu faults", ret,
				      (unsigned long long)c.t->injected);
			total_faults += c.t->injected;
			total_runs++;
			wl_model_reset(&c.md, c.guest_base);
			for (i = 0; i < w.nr_ops; i++)
				ck_assert_int_eq(wl_model_apply(&c.md, &w.ops[i], i < flushed), 0);
			verify(&c, "close", true);
			wl_fini(&w);
			if (!c.t->injected)
				break;
		}
	}
	teardown(&c);
}
END_TEST

/* Faults while opening: the open fails with a message, nothing leaks. */
START_TEST(test_fault_open)
{
	struct fault_ctx c = { .sc = &scenarios[_i] };
	uint64_t nth;

	setup(&c);
	for (nth = 1;; nth++) {
		struct tio_fault f = { .ops = R, .err = -EIO, .nth = nth };
		struct qcow2 *img;
		char err[256] = "";
		int ret;

		tio_fault_set(c.t, &f);
		ret = qcow2_open(&img, c.img, NULL, &c.t->io, err, sizeof(err));
		total_runs++;
		total_faults += c.t->injected;
		if (!c.t->injected) {
			ck_assert_int_eq(ret, 0);
			ck_assert_int_eq(qcow2_close(img), 0);
			break;
		}
		if (ret == 0) {
			/* The failed read was one the open does not need (none today). */
			qcow2_close(img);
			ck_abort_msg("%s: open succeeded over a failed read %llu", c.sc->name,
				     (unsigned long long)nth);
		}
		ck_assert_msg(err[0], "open failed without a message");
	}
	tio_fault_set(c.t, NULL);
	teardown(&c);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("fault");
	TCase *tc = tcase_create("inject");
	int failed;

	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return EXIT_FAILURE;
	}
	tcase_set_timeout(tc, 600);
	tcase_add_loop_test(tc, test_fault_nth, 0, NR_SCENARIOS);
	tcase_add_loop_test(tc, test_fault_persistent, 0, NR_SCENARIOS);
	tcase_add_loop_test(tc, test_fault_random, 0, NR_SCENARIOS);
	tcase_add_loop_test(tc, test_fault_short, 0, NR_SCENARIOS);
	tcase_add_loop_test(tc, test_fault_close, 0, NR_SCENARIOS);
	tcase_add_loop_test(tc, test_fault_open, 0, NR_SCENARIOS);
	suite_add_tcase(s, tc);
	failed = tu_suite_run(s);
	printf("faults injected: %llu in %llu runs (qemu-img check after %llu), corruptions: %s\n",
	       (unsigned long long)total_faults, (unsigned long long)total_runs,
	       (unsigned long long)total_qemu_checks,
	       failed ? "FOUND" : "0");
	if (!failed)
		rmdir(dir);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
