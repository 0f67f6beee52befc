// SPDX-License-Identifier: MIT
/*
 * qcow2_check on a hand-built seven-cluster image, damaged one way at a time
 * with plain pwrite: the counts and messages qemu-img check gives for the
 * same damage, and repairs that leave a clean image with the data intact.
 * (tests/oracle/test_check_agrees.py compares with qemu-img itself.)
 */
#include <check.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "files.h"
#include "internal.h"
#include "run.h"

#define CS		65536u
#define NR_CLUSTERS	7
#define COPIED		(1ull << 63)

/* Layout: header, reftable, refblock, L1, L2, data (guest 0), data (guest 1). */
enum { C_HDR, C_RT, C_RB, C_L1, C_L2, C_D0, C_D1 };

static char path[] = "/tmp/uq-check-XXXXXX";
static char lines[64 << 10];
static size_t lines_len;
static struct qcow2_io *io;

static void pwrite_at(const void *buf, size_t len, uint64_t off)
{
	int fd = open(path, O_WRONLY);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pwrite(fd, buf, len, off), (ssize_t)len);
	close(fd);
}

static void set_u64(uint64_t off, uint64_t v)
{
	uint8_t b[8];

	put_be64(b, v);
	pwrite_at(b, 8, off);
}

static void set_refcount(uint64_t cluster, uint16_t v)
{
	uint8_t b[2];

	put_be16(b, v);
	pwrite_at(b, 2, C_RB * CS + 2 * cluster);
}

/* A 64 MiB v3 image, 16-bit refcounts, guest clusters 0 and 1 written. */
static void build(void)
{
	uint8_t *f = calloc(NR_CLUSTERS, CS);
	int fd, i;

	ck_assert_ptr_nonnull(f);
	put_be32(f + 0, QCOW2_MAGIC);
	put_be32(f + 4, 3);
	put_be32(f + 20, 16);			/* cluster_bits */
	put_be64(f + 24, 64ull << 20);		/* size */
	put_be32(f + 36, 1);			/* l1_size */
	put_be64(f + 40, C_L1 * CS);
	put_be64(f + 48, C_RT * CS);
	put_be32(f + 56, 1);			/* refcount_table_clusters */
	put_be32(f + 96, 4);			/* refcount_order */
	put_be32(f + 100, QCOW2_V3_HEADER_LEN);
	put_be64(f + C_RT * CS, C_RB * CS);
	for (i = 0; i < NR_CLUSTERS; i++)
		put_be16(f + C_RB * CS + 2 * i, 1);
	put_be64(f + C_L1 * CS, C_L2 * CS | COPIED);
	put_be64(f + C_L2 * CS, C_D0 * CS | COPIED);
	put_be64(f + C_L2 * CS + 8, C_D1 * CS | COPIED);
	memset(f + C_D0 * CS, 0x11, CS);
	memset(f + C_D1 * CS, 0x22, CS);

	fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, f, NR_CLUSTERS * CS), NR_CLUSTERS * CS);
	close(fd);
	free(f);
}

static void collect(void *opaque, const char *line)
{
	size_t n = strlen(line);

	(void)opaque;
	if (lines_len + n + 2 > sizeof(lines))
		return;
	memcpy(lines + lines_len, line, n);
	lines[lines_len + n] = '\n';
	lines_len += n + 1;
	lines[lines_len] = '\0';
}

/* Open, check with @fix, close. Returns qcow2_check's result. */
static int run_check(int fix, struct qcow2_check_result *res)
{
	struct qcow2_opts opts = { .read_only = !fix, .no_repair = true };
	struct qcow2 *img;
	char err[256];
	int ret;

	lines_len = 0;
	lines[0] = '\0';
	ret = qcow2_open(&img, path, &opts, io, err, sizeof(err));
	ck_assert_msg(ret == 0, "open: %s", err);
	ret = qcow2_check(img, fix, res, collect, NULL);
	ck_assert_int_eq(qcow2_close(img), 0);
	return ret;
}

static void assert_clean(void)
{
	struct qcow2_check_result res;

	ck_assert_int_eq(run_check(0, &res), 0);
	ck_assert_msg(!res.corruptions && !res.leaks && !res.check_errors,
		      "not clean: %llu corruptions, %llu leaks, %llu errors:\n%s",
		      (unsigned long long)res.corruptions, (unsigned long long)res.leaks,
		      (unsigned long long)res.check_errors, lines);
}

/* The guest data reads back as built. */
static void assert_data(void)
{
	struct qcow2_opts opts = { .read_only = true };
	uint8_t *buf = malloc(2 * CS);
	struct qcow2 *img;
	char err[256];
	uint32_t i;

	ck_assert_ptr_nonnull(buf);
	ck_assert_msg(qcow2_open(&img, path, &opts, io, err, sizeof(err)) == 0, "open: %s", err);
	ck_assert_int_eq(qcow2_pread(img, buf, 2 * CS, 0), 0);
	for (i = 0; i < 2 * CS; i++)
		ck_assert_uint_eq(buf[i], i < CS ? 0x11 : 0x22);
	ck_assert_int_eq(qcow2_close(img), 0);
	free(buf);
}

static void setup(void)
{
	int fd = mkstemp(path);

	ck_assert_int_ge(fd, 0);
	close(fd);
	io = qcow2_uring_new(16);
	ck_assert_ptr_nonnull(io);
	build();
}

static void teardown(void)
{
	qcow2_uring_free(io);
	unlink(path);
	strcpy(path, "/tmp/uq-check-XXXXXX");
}

START_TEST(test_clean)
{
	struct qcow2_check_result res;

	ck_assert_int_eq(run_check(0, &res), 0);
	ck_assert_uint_eq(res.corruptions, 0);
	ck_assert_uint_eq(res.leaks, 0);
	ck_assert_uint_eq(res.check_errors, 0);
	ck_assert_uint_eq(res.total_clusters, 1024);
	ck_assert_uint_eq(res.allocated_clusters, 2);
	ck_assert_uint_eq(res.fragmented_clusters, 0);
	ck_assert_uint_eq(res.compressed_clusters, 0);
	ck_assert_uint_eq(res.image_end_offset, NR_CLUSTERS * CS);
	ck_assert_str_eq(lines, "");
}
END_TEST

START_TEST(test_leak_and_fix)
{
	struct qcow2_check_result res;

	set_refcount(C_D0, 2);
	ck_assert_int_eq(run_check(0, &res), 0);
	ck_assert_uint_eq(res.leaks, 1);
	/* COPIED is set on a cluster whose refcount is not 1. */
	ck_assert_uint_eq(res.corruptions, 1);
	ck_assert_ptr_nonnull(strstr(lines, "Leaked cluster 5 refcount=2 reference=1\n"));
	ck_assert_ptr_nonnull(strstr(lines, "ERROR OFLAG_COPIED data cluster: "
				     "l2_entry=8000000000050000 refcount=2\n"));

	ck_assert_int_eq(run_check(QCOW2_FIX_LEAKS, &res), 0);
	ck_assert_uint_eq(res.leaks_fixed, 1);
	ck_assert_uint_eq(res.corruptions_fixed, 0);
	ck_assert_uint_eq(res.leaks, 0);
	ck_assert_uint_eq(res.corruptions, 0);
	assert_clean();
	assert_data();
}
END_TEST

/* A used cluster with refcount 0 needs a rebuild: -r leaks refuses. */
START_TEST(test_refcount_zero_rebuild)
{
	struct qcow2_check_result res;

	set_refcount(C_D1, 0);
	ck_assert_int_eq(run_check(0, &res), 0);
	ck_assert_uint_eq(res.corruptions, 2);
	ck_assert_ptr_nonnull(strstr(lines, "ERROR cluster 6 refcount=0 reference=1\n"));

	ck_assert_int_eq(run_check(QCOW2_FIX_LEAKS, &res), -EIO);
	ck_assert_ptr_nonnull(strstr(lines, "ERROR need to rebuild refcount structures\n"));

	ck_assert_int_eq(run_check(QCOW2_FIX_LEAKS | QCOW2_FIX_ERRORS, &res), 0);
	ck_assert_ptr_nonnull(strstr(lines, "Rebuilding refcount structure\n"));
	ck_assert_uint_eq(res.corruptions_fixed, 1);
	ck_assert_uint_eq(res.corruptions, 0);
	ck_assert_uint_eq(res.leaks, 0);
	/* The new structure went to the end of the file; the old one is free. */
	ck_assert_uint_ge(tu_pread_be64(path, 48), NR_CLUSTERS * CS);
	assert_clean();
	assert_data();
}
END_TEST

/* A misaligned refcount block: every cluster it covers is unreadable. */
START_TEST(test_refblock_misaligned)
{
	struct qcow2_check_result res;

	set_u64(C_RT * CS, C_RB * CS + 512);
	ck_assert_int_eq(run_check(0, &res), 0);
	ck_assert_uint_eq(res.corruptions, 1);
	ck_assert_uint_eq(res.check_errors, NR_CLUSTERS);
	ck_assert_ptr_nonnull(strstr(lines, "ERROR refcount block 0 is not cluster aligned; "
				     "refcount table entry corrupted\n"));

	ck_assert_int_eq(run_check(QCOW2_FIX_LEAKS | QCOW2_FIX_ERRORS, &res), 0);
	assert_clean();
	assert_data();
}
END_TEST

START_TEST(test_l2_entry_past_eof)
{
	struct qcow2_check_result res;

	set_u64(C_L2 * CS + 16, (NR_CLUSTERS + 4ull) * CS | COPIED);
	ck_assert_int_eq(run_check(0, &res), 0);
	/* The reference itself, then COPIED on a cluster with refcount 0. */
	ck_assert_uint_eq(res.corruptions, 2);
	ck_assert_uint_eq(res.allocated_clusters, 3);
	ck_assert_uint_eq(res.fragmented_clusters, 1);
	ck_assert_ptr_nonnull(strstr(lines, "ERROR: counting reference for region exceeding "
				     "the end of the file by one cluster or more: "
				     "offset 0xb0000 size 0x10000\n"));
}
END_TEST

START_TEST(test_l2_entry_misaligned)
{
	struct qcow2_check_result res;

	set_u64(C_L2 * CS, (C_D0 * CS + 512) | COPIED);
	ck_assert_int_eq(run_check(0, &res), 0);
	/* The entry, and the neighbour its cluster-sized range reaches into. */
	ck_assert_uint_eq(res.corruptions, 2);
	ck_assert_uint_eq(res.leaks, 0);
	ck_assert_ptr_nonnull(strstr(lines, "ERROR offset=50200: Data cluster is not properly "
				     "aligned; L2 entry corrupted.\n"));
	ck_assert_ptr_nonnull(strstr(lines, "ERROR cluster 6 refcount=1 reference=2\n"));
}
END_TEST

/* An unaligned preallocated zero cluster holds no data: repaired to zero. */
START_TEST(test_zero_alloc_misaligned_fixed)
{
	struct qcow2_check_result res;

	set_u64(C_L2 * CS + 8, (C_D1 * CS + 512) | COPIED | L2E_ZERO);
	ck_assert_int_eq(run_check(0, &res), 0);
	/* The entry, and the cluster past the end of the file it reaches into. */
	ck_assert_uint_eq(res.corruptions, 2);
	ck_assert_uint_eq(res.leaks, 0);
	ck_assert_ptr_nonnull(strstr(lines, "ERROR offset=60200: Preallocated cluster is not "
				     "properly aligned; L2 entry corrupted.\n"));
	ck_assert_ptr_nonnull(strstr(lines, "ERROR cluster 7 refcount=0 reference=1\n"));

	/* Zeroed before counting: cluster 6 is then merely leaked. */
	ck_assert_int_eq(run_check(QCOW2_FIX_LEAKS | QCOW2_FIX_ERRORS, &res), 0);
	ck_assert_uint_eq(res.corruptions_fixed, 1);
	ck_assert_uint_eq(res.leaks_fixed, 1);
	ck_assert_uint_eq(tu_pread_be64(path, C_L2 * CS + 8), L2E_ZERO);
	assert_clean();
}
END_TEST

START_TEST(test_copied_flag_fixed)
{
	struct qcow2_check_result res;

	set_u64(C_L1 * CS, C_L2 * CS);
	set_u64(C_L2 * CS + 8, C_D1 * CS);
	ck_assert_int_eq(run_check(0, &res), 0);
	ck_assert_uint_eq(res.corruptions, 2);
	ck_assert_ptr_nonnull(strstr(lines, "ERROR OFLAG_COPIED L2 cluster: l1_index=0 "
				     "l1_entry=40000 refcount=1\n"));

	ck_assert_int_eq(run_check(QCOW2_FIX_LEAKS | QCOW2_FIX_ERRORS, &res), 0);
	ck_assert_uint_eq(res.corruptions_fixed, 2);
	ck_assert_uint_eq(tu_pread_be64(path, C_L1 * CS), C_L2 * CS | COPIED);
	ck_assert_uint_eq(tu_pread_be64(path, C_L2 * CS + 8), C_D1 * CS | COPIED);
	assert_clean();
}
END_TEST

/* A compressed cluster: one 512-byte sector inside cluster 6. */
START_TEST(test_compressed_counts)
{
	struct qcow2_check_result res;

	set_u64(C_L2 * CS + 8, L2E_COMPRESSED | (C_D1 * CS + 1024));
	ck_assert_int_eq(run_check(0, &res), 0);
	ck_assert_uint_eq(res.corruptions, 0);
	ck_assert_uint_eq(res.leaks, 0);
	ck_assert_uint_eq(res.allocated_clusters, 2);
	ck_assert_uint_eq(res.compressed_clusters, 1);
	ck_assert_uint_eq(res.fragmented_clusters, 1);
}
END_TEST

START_TEST(test_read_only_refuses_repair)
{
	struct qcow2_opts opts = { .read_only = true };
	struct qcow2_check_result res;
	struct qcow2 *img;
	char err[256];

	ck_assert_int_eq(qcow2_open(&img, path, &opts, io, err, sizeof(err)), 0);
	ck_assert_int_eq(qcow2_check(img, QCOW2_FIX_LEAKS, &res, NULL, NULL), -EROFS);
	ck_assert_ptr_nonnull(strstr(qcow2_errmsg(img), path));
	ck_assert_int_eq(qcow2_close(img), 0);
}
END_TEST

static Suite *check_suite(void)
{
	Suite *s = suite_create("check");
	TCase *tc = tcase_create("refcounts");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_clean);
	tcase_add_test(tc, test_leak_and_fix);
	tcase_add_test(tc, test_refcount_zero_rebuild);
	tcase_add_test(tc, test_refblock_misaligned);
	tcase_add_test(tc, test_l2_entry_past_eof);
	tcase_add_test(tc, test_l2_entry_misaligned);
	tcase_add_test(tc, test_zero_alloc_misaligned_fixed);
	tcase_add_test(tc, test_copied_flag_fixed);
	tcase_add_test(tc, test_compressed_counts);
	tcase_add_test(tc, test_read_only_refuses_repair);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return tu_suite_run(check_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
