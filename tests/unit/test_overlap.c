// SPDX-License-Identifier: MIT
/*
 * The metadata overlap check (overlap.c) on a fresh 64 KiB-cluster 4 GiB image
 * with one data cluster: each kind of metadata is found, ignored when the
 * write is meant to update it, and writes beside it pass; the scan marks
 * follow L1 entries set later; and a flush that would write an L2 slice
 * over the refcount table is refused, leaving only the corrupt bit on disk.
 * (tests/oracle/test_overlap.py drives hand-crafted images through `io`.)
 */
#include <check.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "files.h"
#include "internal.h"
#include "run.h"

/* Where a fresh image of ours puts things: header, reftable, refblock, L1, L2, data. */
#define RT	0x10000ull
#define RB	0x20000ull
#define L1	0x30000ull
#define L2	0x40000ull
#define DATA	0x50000ull

#define PATH_TEMPLATE	"/tmp/uq-overlap-XXXXXX"

static char path[sizeof(PATH_TEMPLATE)];
static struct qcow2_io *io;

static struct qcow2 *open_image(bool writable)
{
	struct qcow2_opts opts = { .read_only = !writable };
	struct qcow2 *img;
	char err[256];

	ck_assert_msg(qcow2_open(&img, path, &opts, io, err, sizeof(err)) == 0, "%s", err);
	return img;
}

static void setup(void)
{
	struct qcow2_create_opts o = { .size = 4ull << 30 };	/* 8 L1 entries */
	static uint8_t buf[4096];
	struct qcow2 *img;
	char err[256];
	int fd;

	memcpy(path, PATH_TEMPLATE, sizeof(path));
	fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	close(fd);
	io = qcow2_uring_new(32);
	ck_assert_ptr_nonnull(io);
	ck_assert_int_eq(qcow2_create(path, &o, io, err, sizeof(err)), 0);
	img = open_image(true);
	memset(buf, 0x5a, sizeof(buf));
	ck_assert_int_eq(qcow2_pwrite(img, buf, sizeof(buf), 0), 0);
	ck_assert_int_eq(qcow2_close(img), 0);
	/* The layout the cases below rely on. */
	ck_assert_uint_eq(tu_pread_be64(path, 48), RT);
	ck_assert_uint_eq(tu_pread_be64(path, 40), L1);
	ck_assert_uint_eq(tu_pread_be64(path, RT), RB);
	ck_assert_uint_eq(tu_pread_be64(path, L1) & L1E_OFFSET_MASK, L2);
	ck_assert_uint_eq(tu_pread_be64(path, L2) & L2E_OFFSET_MASK, DATA);
}

static void teardown(void)
{
	unlink(path);
	qcow2_uring_free(io);
}

static const struct {
	uint64_t off, len;
	unsigned int ign;
	const char *hit;	/* the metadata named, or NULL: allowed */
} cases[] = {
	{ DATA, 4096, 0, NULL },
	{ DATA + 65536, 1 << 20, 0, NULL },
	{ 0, 512, 0, "header" },
	{ 0, 512, QCOW2_OL_HEADER, NULL },
	{ RT + 100, 8, 0, "refcount table" },
	{ RT, 65536, QCOW2_OL_REFCOUNT_TABLE, NULL },
	{ RB + 4096, 4096, 0, "refcount block" },
	{ RB, 4096, QCOW2_OL_REFCOUNT_BLOCK, NULL },
	{ L1, 8, 0, "active L1 table" },
	{ L1, 512, QCOW2_OL_ACTIVE_L1, NULL },
	{ L2, 4096, 0, "active L2 table" },
	{ L2 + 65535, 2, 0, "active L2 table" },	/* straddles the L2 table and the data */
	{ L2, 65536, QCOW2_OL_ACTIVE_L2, NULL },
	{ RT, 4 * 65536, QCOW2_OL_REFCOUNT_TABLE | QCOW2_OL_REFCOUNT_BLOCK, "active L1 table" },
	{ UINT64_MAX - 100, 50, 0, NULL },		/* no wrap-around */
};

START_TEST(test_kinds)
{
	struct qcow2 *img = open_image(false);
	int ret = qcow2_overlap_check(img, cases[_i].ign, cases[_i].off, cases[_i].len);

	if (!cases[_i].hit) {
		ck_assert_msg(ret == 0, "case %d: %s", _i, qcow2_errmsg(img));
	} else {
		ck_assert_int_eq(ret, -EIO);
		ck_assert_msg(strstr(qcow2_errmsg(img), cases[_i].hit), "case %d: %s", _i,
			      qcow2_errmsg(img));
		ck_assert(img->corrupt);
	}
	ck_assert_int_eq(qcow2_close(img), 0);
}
END_TEST

START_TEST(test_marks_follow_new_l1_entries)
{
	struct qcow2 *img = open_image(false);

	ck_assert_int_eq(qcow2_overlap_check(img, 0, DATA + 65536, 4096), 0);
	/* An L1 entry set in place, past the last one the scan looked at. */
	ck_assert_int_eq(qcow2_table_set(&img->l1, 5, (DATA + 65536) | QCOW2_OFLAG_COPIED), 0);
	qcow2_l1_note(img, 5);
	ck_assert_int_eq(qcow2_overlap_check(img, 0, DATA + 65536, 4096), -EIO);
	ck_assert_ptr_nonnull(strstr(qcow2_errmsg(img), "active L2 table"));
	ck_assert_int_eq(qcow2_close(img), 0);
}
END_TEST

START_TEST(test_flush_refuses_l2_slice_over_reftable)
{
	struct qcow2 *img = open_image(true);

	/* L1 entry 0 names the refcount table as its L2 table: a discard of
	 * guest cluster 0 changes "L2 entry" 0, i.e. the refcount table. */
	ck_assert_int_eq(qcow2_table_set(&img->l1, 0, RT | QCOW2_OFLAG_COPIED), 0);
	ck_assert_int_eq(qcow2_discard(img, 65536, 0), 0);
	ck_assert_int_eq(qcow2_flush(img), -EIO);
	ck_assert(img->corrupt);
	ck_assert_ptr_nonnull(strstr(qcow2_errmsg(img), "refcount table"));
	/* Further writes are refused; close writes only the header (metadata held back). */
	ck_assert_int_eq(qcow2_pwrite(img, img->zero_buf, 4096, 1 << 20), -EIO);
	ck_assert_int_eq(qcow2_close(img), -EIO);
	ck_assert_uint_eq(tu_pread_be64(path, RT), RB);
	ck_assert_uint_eq(tu_pread_be64(path, L1) & L1E_OFFSET_MASK, L2);
	ck_assert_uint_eq(tu_pread_be64(path, 72) & QCOW2_INCOMPAT_CORRUPT, QCOW2_INCOMPAT_CORRUPT);
}
END_TEST

static Suite *overlap_suite(void)
{
	Suite *s = suite_create("overlap");
	TCase *tc = tcase_create("overlap");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_loop_test(tc, test_kinds, 0, sizeof(cases) / sizeof(cases[0]));
	tcase_add_test(tc, test_marks_follow_new_l1_entries);
	tcase_add_test(tc, test_flush_refuses_l2_slice_over_reftable);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return tu_suite_run(overlap_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
