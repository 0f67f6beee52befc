// SPDX-License-Identifier: MIT
/*
 * Crash consistency. A random workload (writes, write-zeroes, discards and
 * flushes, many in flight) runs through the engine over the recording
 * backend (support/tio.c), which logs every write and fdatasync reaching the
 * image and its data file. Then every crash point is rebuilt on the files
 * from their starting bytes:
 *  - each prefix of the log: all writes completed by then, none after;
 *  - before each fdatasync completes: what earlier completed syncs made
 *    durable plus a random subset of every other write submitted so far
 *    (a crash may persist any of them, in any combination).
 * At each, the engine's check must find no corruption (leaks are allowed),
 * and the disk must read back every request acknowledged before the last
 * completed FLUSH began, and old-or-new bytes for the rest; on a sample
 * `qemu-img check` must agree that nothing is corrupt.
 *
 * UQ_CRASH_QEMU_EVERY=N runs qemu-img check on every Nth point (default 16),
 * UQ_CRASH_SUBSETS=K draws K subsets per sync (default 3), UQ_CRASH_SEED
 * changes the workloads, UQ_CRASH_ONLY=NAME runs one scenario
 * (UQ_CRASH_ONLY=snapshot-ops: logged snapshot create, apply and delete).
 */
#include <check.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcheck.h"
#include "files.h"
#include "tio.h"
#include "wl.h"
#include "run.h"

enum prep { PREP_NONE, PREP_FILL, PREP_COMPRESSED, PREP_SNAPSHOT };

struct scenario {
	const char *name;
	const char *opts;	/* qemu-img create -o */
	const char *base_opts;	/* a backing file with these, filled; NULL: none */
	enum prep prep;
	bool data_file;
	bool discard;
	uint32_t cluster;	/* discard unit */
	uint64_t disk;
	unsigned int rounds, batch;
	uint32_t max_len;
	bool snap_ops;		/* snapshot create, apply, delete between batches, logged too */
};

static char dir[] = "/dev/shm/uq-crash-XXXXXX";
static unsigned int qemu_every = 16, subsets = 3;
static uint64_t seed = 1;
static uint64_t total_points, total_qemu_checks;

struct crash_run {
	const struct scenario *sc;
	struct tio *t;
	struct wl w;
	char img[256], data[256], base[256];
	uint8_t *file_base[TIO_MAX_FILES];
	size_t file_len[TIO_MAX_FILES];
	uint8_t *guest_base;
	uint8_t *data_buf;	/* the disk as read back at a crash point */
	struct qcow2_io *pio;	/* plain backend for the checks */
	uint8_t *applied;	/* per write: part of the crash state being built */
	uint32_t *durable_at;	/* per write: event index of the sync that made it durable */
	struct wl_model md;
	int64_t model_flush;	/* guest flush the certain part of md is for (-2: none yet) */
	uint64_t rng;
	uint64_t points;
	struct qcheck qc;
	char report[4096];
	size_t report_len;
};

static uint64_t rnd(struct crash_run *c)
{
	c->rng ^= c->rng << 13;
	c->rng ^= c->rng >> 7;
	c->rng ^= c->rng << 17;
	return c->rng;
}

static void setup(struct crash_run *c)
{
	const struct scenario *sc = c->sc;
	char extra[600] = "";

	snprintf(c->img, sizeof(c->img), "%s/%s.qcow2", dir, sc->name);
	snprintf(c->data, sizeof(c->data), "%s/%s.data", dir, sc->name);
	snprintf(c->base, sizeof(c->base), "%s/%s-base.qcow2", dir, sc->name);
	if (sc->base_opts) {
		tu_sh("qemu-img create -q -f qcow2 -o %s %s %llu", sc->base_opts, c->base,
		   (unsigned long long)sc->disk);
		tu_image_fill(c->base, sc->disk, sc->cluster, 13, 5, false, NULL);
		snprintf(extra, sizeof(extra), "-b %s -F qcow2", c->base);
	}
	if (sc->data_file)
		snprintf(extra, sizeof(extra), "-o data_file=%s", c->data);
	tu_sh("qemu-img create -q -f qcow2 -o %s %s %s %llu", sc->opts, extra, c->img,
	   (unsigned long long)sc->disk);
	if (sc->prep != PREP_NONE)
		tu_image_fill(c->img, sc->disk, sc->cluster, 13, 9, sc->prep == PREP_COMPRESSED,
			      sc->prep == PREP_SNAPSHOT ? "before" : NULL);
}

/* The workload, logged. */
static void record(struct crash_run *c)
{
	const struct scenario *sc = c->sc;
	struct qcow2_opts opts = { .l2_cache_bytes = 4096, .refcount_cache_bytes = 4096,
				   .slice_bytes = 512 };
	struct wl_cfg cfg = { .disk = sc->disk, .align = sc->cluster, .max_len = sc->max_len,
			      .batch = sc->batch, .discard = sc->discard, .flush_pct = 6,
			      .seed = seed * 7919 + sc->disk + sc->cluster };
	struct qcow2 *img;
	char err[256];
	unsigned int r;
	int i;

	c->t = tio_new(64);
	ck_assert_ptr_nonnull(c->t);
	ck_assert_int_eq(tio_track(c->t, c->img), 0);
	if (sc->data_file)
		ck_assert_int_eq(tio_track(c->t, c->data), 1);
	for (i = 0; i < c->t->nr_files; i++)
		c->file_base[i] = tu_slurp(c->t->files[i].path, &c->file_len[i]);

	ck_assert_msg(qcow2_open(&img, c->img, &opts, &c->t->io, err, sizeof(err)) == 0,
		      "%s", err);
	c->guest_base = malloc(sc->disk);
	ck_assert_ptr_nonnull(c->guest_base);
	ck_assert_int_eq(qcow2_pread(img, c->guest_base, sc->disk, 0), 0);
	ck_assert_int_eq(wl_init(&c->w, img, c->t, &cfg), 0);

	c->t->logging = true;
	for (r = 0; r < sc->rounds; r++) {
		ck_assert_int_eq(wl_batch(&c->w), 0);
		if (r % 5 == 4)
			ck_assert_int_eq(wl_flush(&c->w), 0);
		/* Offline operations, crash-safe by their contract. */
		if (sc->snap_ops && r == 3) {
			ck_assert_msg(qcow2_snapshot_create(img, "during") == 0, "%s",
				      qcow2_errmsg(img));
			/*
			 * Back to the snapshot just taken: the disk reads the
			 * same, while the active tables change hands (the
			 * copies made by create are freed again).
			 */
			ck_assert_msg(qcow2_snapshot_apply(img, "during") == 0, "%s",
				      qcow2_errmsg(img));
		}
		if (sc->snap_ops && r == 9)
			ck_assert_msg(qcow2_snapshot_delete(img, "before") == 0, "%s",
				      qcow2_errmsg(img));
		/* The last snapshot gone: shared clusters become ours alone again. */
		if (sc->snap_ops && r == 12)
			ck_assert_msg(qcow2_snapshot_delete(img, "during") == 0, "%s",
				      qcow2_errmsg(img));
	}
	for (r = 0; r < c->w.nr_ops; r++)
		ck_assert_msg(c->w.ops[r].res == 0, "op %u (%d) failed: %d %s", r,
			      c->w.ops[r].op, c->w.ops[r].res, qcow2_errmsg(img));
	for (i = 0; i < (int)c->w.cfg.batch; i++) {
		qcow2_req_free(c->w.reqs[i]);
		c->w.reqs[i] = NULL;
	}
	ck_assert_int_eq(qcow2_close(img), 0);
	c->t->logging = false;
	ck_assert_msg(c->t->stray_writes == 0, "%llu writes went to an untracked file",
		      (unsigned long long)c->t->stray_writes);
}

/* When each write became durable: the first sync of its file that began after it completed. */
static void compute_durability(struct crash_run *c)
{
	struct tio *t = c->t;
	uint32_t i, j;

	c->durable_at = malloc((t->nr_writes + 1) * sizeof(*c->durable_at));
	c->applied = malloc(t->nr_writes + 1);
	ck_assert_ptr_nonnull(c->durable_at);
	ck_assert_ptr_nonnull(c->applied);
	memset(c->applied, 0, t->nr_writes + 1);
	for (i = 0; i < t->nr_writes; i++) {
		const struct tio_write *w = &t->writes[i];

		c->durable_at[i] = UINT32_MAX;
		ck_assert_msg(w->done != UINT32_MAX && w->res == (int)w->len,
			      "write %u did not complete in full", i);
		/* Overlapping writes in flight together would leave the file undefined. */
		for (j = 0; j < i; j++) {
			const struct tio_write *o = &t->writes[j];

			if (o->file == w->file && o->off < w->off + w->len &&
			    w->off < o->off + o->len && o->done > w->sub)
				ck_abort_msg("%s: writes %u and %u overlap in flight",
					     c->sc->name, j, i);
		}
		for (j = 0; j < t->nr_syncs; j++) {
			const struct tio_sync *s = &t->syncs[j];

			if (s->file == w->file && s->sub > w->done && s->res == 0 &&
			    s->done < c->durable_at[i])
				c->durable_at[i] = s->done;
		}
	}
}

/*
 * Rebuild the files: starting bytes, then the chosen writes in submission
 * order. With @incremental, the files hold an earlier prefix already and
 * only the writes marked 2 are new: overlapping writes are never in flight
 * together (compute_durability checks), so completion order stacks them
 * the same way.
 */
static void materialize(struct crash_run *c, bool incremental)
{
	struct tio *t = c->t;
	int fds[TIO_MAX_FILES];
	uint32_t i;
	int f;

	for (f = 0; f < t->nr_files; f++) {
		fds[f] = open(t->files[f].path, O_WRONLY | (incremental ? 0 : O_TRUNC));
		if (fds[f] < 0 || (!incremental &&
				   pwrite(fds[f], c->file_base[f], c->file_len[f], 0) !=
				   (ssize_t)c->file_len[f]))
			ck_abort_msg("cannot write %s", t->files[f].path);
	}
	for (i = 0; i < t->nr_writes; i++) {
		const struct tio_write *w = &t->writes[i];

		/* (Check's assertions cost a write each: none in the hot loops.) */
		if ((c->applied[i] == 2 || (!incremental && c->applied[i])) &&
		    pwrite(fds[w->file], w->data, w->len, w->off) != (ssize_t)w->len)
			ck_abort_msg("cannot write %s", t->files[w->file].path);
	}
	for (f = 0; f < t->nr_files; f++)
		close(fds[f]);
}

/* The guest FLUSH acknowledged last before event @p, or -1. */
static int64_t last_flush(const struct crash_run *c, uint32_t p)
{
	int64_t best = -1;
	uint32_t i;

	for (i = 0; i < c->w.nr_ops; i++) {
		const struct wl_op *o = &c->w.ops[i];

		if (o->op == QCOW2_OP_FLUSH && o->done && o->ack_ev < p &&
		    (best < 0 || o->ack_ev > c->w.ops[best].ack_ev))
			best = i;
	}
	return best;
}

/*
 * What the disk may read at crash point @p: requests acknowledged before
 * the last completed FLUSH started are certain; any other one submitted
 * before @p may or may not have landed. @all_certain: the image was closed
 * cleanly, everything acknowledged is certain.
 */
static void build_model(struct crash_run *c, uint32_t p, bool all_certain)
{
	int64_t f = all_certain ? -3 : last_flush(c, p);
	uint32_t start = f >= 0 ? c->w.ops[f].sub_ev : 0, i;

	if (f != c->model_flush) {
		wl_model_reset(&c->md, c->guest_base);
		for (i = 0; i < c->w.nr_ops; i++) {
			const struct wl_op *o = &c->w.ops[i];

			if ((all_certain || (f >= 0 && o->done && o->ack_ev < start)) &&
			    wl_model_apply(&c->md, o, true) < 0)
				ck_abort_msg("out of memory");
		}
		c->model_flush = f;
	}
	wl_model_drop_unc(&c->md);
	if (all_certain)
		return;
	for (i = 0; i < c->w.nr_ops; i++) {
		const struct wl_op *o = &c->w.ops[i];

		if (o->sub_ev < p && !(f >= 0 && o->done && o->ack_ev < start) &&
		    wl_model_apply(&c->md, o, false) < 0)
			ck_abort_msg("out of memory");
	}
}

static void report_line(void *opaque, const char *line)
{
	struct crash_run *c = opaque;
	int n = snprintf(c->report + c->report_len, sizeof(c->report) - c->report_len, "%s\n",
			 line);

	if (n > 0 && c->report_len + n < sizeof(c->report))
		c->report_len += n;
}

/* Keep the failing files for a post mortem; the message says where. */
static const char *keep(struct crash_run *c, const char *what, uint32_t p)
{
	static char msg[1500];
	int f;

	for (f = 0; f < c->t->nr_files; f++)
		tu_sh("cp %s %s.crash-%u", c->t->files[f].path, c->t->files[f].path, p);
	/* Check's messages are short: the first lines of the report only. */
	snprintf(msg, sizeof(msg), "%s: %s at crash point %u (of %u events), image kept as %s.crash-%u\n%.1000s",
		 c->sc->name, what, p, c->t->nr_evs, c->img, p, c->report);
	return msg;
}

/* Check the files as materialized for crash point @p. */
static void check_point(struct crash_run *c, uint32_t p, bool all_certain)
{
	struct qcow2_opts opts = { .read_only = true };
	struct qcow2_check_result res;
	struct qcow2 *img;
	uint8_t *data;
	char err[256];
	int64_t bad;
	int ret;

	c->report_len = 0;
	c->report[0] = 0;
	ret = qcow2_open(&img, c->img, &opts, c->pio, err, sizeof(err));
	if (ret)
		ck_abort_msg("%s", keep(c, err, p));
	ret = qcow2_check(img, 0, &res, report_line, c);
	if (ret || res.corruptions || res.check_errors)
		ck_abort_msg("%s", keep(c, "check finds corruption", p));
	data = c->data_buf;
	if (qcow2_pread(img, data, c->sc->disk, 0))
		ck_abort_msg("%s", keep(c, qcow2_errmsg(img), p));
	build_model(c, p, all_certain);
	bad = wl_model_check(&c->md, data);
	if (bad >= 0) {
		snprintf(err, sizeof(err), "guest byte %lld reads 0x%02x, expected 0x%02x",
			 (long long)bad, data[bad], c->md.m[bad]);
		ck_abort_msg("%s", keep(c, err, p));
	}
	qcow2_close(img);
	c->points++;
	if (all_certain || c->points % qemu_every == 0) {
		char label[160], msg[600];

		snprintf(label, sizeof(label), "%s crash point %u", c->sc->name, p);
		if (qcheck_add(&c->qc, c->img, label, msg, sizeof(msg)))
			ck_abort_msg("%s", msg);
	}
}

static void replay(struct crash_run *c)
{
	struct tio *t = c->t;
	uint32_t e, i, k;
	bool incremental;
	char msg[600];

	qcheck_init(&c->qc, dir);
	c->pio = qcow2_uring_new(32);
	ck_assert_ptr_nonnull(c->pio);
	ck_assert_int_eq(wl_model_init(&c->md, c->guest_base, c->sc->disk), 0);
	c->data_buf = malloc(c->sc->disk);
	ck_assert_ptr_nonnull(c->data_buf);
	c->model_flush = -2;
	c->rng = seed * 0x9e3779b97f4a7c15ull + 1;
	compute_durability(c);

	/*
	 * Prefixes: after each completion, and after each FLUSH
	 * acknowledgement. Just before each sync completes, also durable
	 * writes plus random subsets of the others. In event order, so that
	 * the model's certain part changes only with each FLUSH.
	 */
	incremental = false;
	for (e = 0; e <= t->nr_evs; e++) {
		const struct tio_ev *ev = e ? &t->evs[e - 1] : NULL;

		if (e < t->nr_evs && t->evs[e].kind == TIO_F_DONE) {
			for (k = 0; k < subsets; k++) {
				for (i = 0; i < t->nr_writes; i++)
					c->applied[i] = c->durable_at[i] < e ||
							(t->writes[i].sub < e && (rnd(c) & 1));
				materialize(c, false);
				check_point(c, e, false);
			}
			incremental = false;
		}
		if (ev && ev->kind != TIO_W_DONE && ev->kind != TIO_F_DONE &&
		    !(ev->kind == TIO_G_DONE && c->w.ops[ev->ref].op == QCOW2_OP_FLUSH))
			continue;
		for (i = 0; i < t->nr_writes; i++)
			c->applied[i] = t->writes[i].done < e ?
					1 + (!incremental || !c->applied[i]) : 0;
		materialize(c, incremental);
		check_point(c, e, false);
		incremental = true;
	}
	/* The clean close: everything acknowledged reads back. */
	for (i = 0; i < t->nr_writes; i++)
		c->applied[i] = 1;
	materialize(c, false);
	check_point(c, t->nr_evs, true);
	ck_assert_msg(qcheck_flush(&c->qc, msg, sizeof(msg)) == 0, "%s", msg);
}

static void run_scenario(const struct scenario *sc)
{
	struct crash_run *c = calloc(1, sizeof(*c));
	int f;

	ck_assert_ptr_nonnull(c);
	c->sc = sc;
	setup(c);
	record(c);
	replay(c);
	printf("%-14s %5u writes %4u syncs %6u events: %llu crash points, %llu qemu-img checks\n",
	       sc->name, c->t->nr_writes, c->t->nr_syncs, c->t->nr_evs,
	       (unsigned long long)c->points, (unsigned long long)c->qc.checked);
	fflush(stdout);
	total_points += c->points;
	total_qemu_checks += c->qc.checked;

	wl_model_free(&c->md);
	wl_fini(&c->w);
	for (f = 0; f < c->t->nr_files; f++) {
		unlink(c->t->files[f].path);
		free(c->file_base[f]);
	}
	unlink(c->base);
	tio_free(c->t);
	qcow2_uring_free(c->pio);
	free(c->guest_base);
	free(c->data_buf);
	free(c->applied);
	free(c->durable_at);
	free(c);
}

#define KIB 1024u
#define MIB (1024u * 1024u)

static const struct scenario scenarios[] = {
	{ "plain-4k", "cluster_size=4096", NULL, PREP_NONE, false, true, 4 * KIB,
	  1 * MIB, 20, 6, 24 * KIB, false },
	{ "plain-512-rc64", "cluster_size=512,refcount_bits=64", NULL, PREP_NONE, false, true,
	  512, 512 * KIB, 20, 6, 6 * KIB, false },
	{ "v2-16k", "compat=0.10,cluster_size=16384", NULL, PREP_FILL, false, true, 16 * KIB,
	  1 * MIB, 16, 6, 40 * KIB, false },
	{ "backing-64k", "cluster_size=65536", "cluster_size=65536", PREP_NONE, false, true,
	  64 * KIB, 2 * MIB, 16, 6, 40 * KIB, false },
	{ "backing-4k", "cluster_size=4096", "cluster_size=16384", PREP_NONE, false, true,
	  4 * KIB, 1 * MIB, 16, 6, 24 * KIB, false },
	{ "compressed-4k", "cluster_size=4096", NULL, PREP_COMPRESSED, false, true, 4 * KIB,
	  1 * MIB, 16, 6, 24 * KIB, false },
	{ "snapshot-4k", "cluster_size=4096", NULL, PREP_SNAPSHOT, false, true, 4 * KIB,
	  1 * MIB, 16, 6, 24 * KIB, false },
	{ "extl2-backing", "cluster_size=65536,extended_l2=on", "cluster_size=65536",
	  PREP_NONE, false, true, 64 * KIB, 2 * MIB, 16, 6, 40 * KIB, false },
	{ "data-file-4k", "cluster_size=4096", NULL, PREP_NONE, true, true, 4 * KIB,
	  1 * MIB, 16, 6, 24 * KIB, false },
	{ "snapshot-ops", "cluster_size=4096", NULL, PREP_SNAPSHOT, false, true, 4 * KIB,
	  1 * MIB, 14, 6, 24 * KIB, true },
	/* An L1 table of 8 pieces: a flush writes the changed ones alone. */
	{ "l1-pieces-512", "cluster_size=512", NULL, PREP_NONE, false, true, 512,
	  16 * MIB, 16, 6, 6 * KIB, false },
};

static const char *only;

START_TEST(test_crash_points)
{
	if (!only || !strcmp(only, scenarios[_i].name))
		run_scenario(&scenarios[_i]);
}
END_TEST

static unsigned int env_uint(const char *name, unsigned int def)
{
	const char *v = getenv(name);

	return v && *v ? (unsigned int)strtoul(v, NULL, 0) : def;
}

int main(void)
{
	Suite *s = suite_create("crash");
	TCase *tc = tcase_create("replay");
	int failed;

	qemu_every = env_uint("UQ_CRASH_QEMU_EVERY", qemu_every);
	if (!qemu_every)
		qemu_every = 1;
	subsets = env_uint("UQ_CRASH_SUBSETS", subsets);
	seed = env_uint("UQ_CRASH_SEED", 1);
	only = getenv("UQ_CRASH_ONLY");
	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return EXIT_FAILURE;
	}
	tcase_set_timeout(tc, 600);
	tcase_add_loop_test(tc, test_crash_points, 0, sizeof(scenarios) / sizeof(scenarios[0]));
	suite_add_tcase(s, tc);
	failed = tu_suite_run(s);
	printf("crash points checked: %llu (qemu-img check on %llu of them), corruptions: %s\n",
	       (unsigned long long)total_points, (unsigned long long)total_qemu_checks,
	       failed ? "FOUND" : "0");
	if (!failed)
		rmdir(dir);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
