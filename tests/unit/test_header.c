// SPDX-License-Identifier: MIT
/*
 * qcow2_header_parse against hand-built header clusters: a valid v2 and v3
 * header, one broken field at a time (each must be refused with a message
 * that names the file), serialize -> parse round trips, and a seeded
 * byte-flipping loop that must never crash (run it under UQ_SANITIZE).
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"
#include "run.h"

#define CLUSTER		65536u
#define FILE_SIZE	(4ull * CLUSTER)
#define PATH		"unit.qcow2"

static uint8_t hdr[CLUSTER];

/* A v3 image of 64 MiB: header, refcount table, refcount block, L1. */
static void build_v3(void)
{
	static const char name[] = "uqtest-feature";

	memset(hdr, 0, sizeof(hdr));
	put_be32(hdr + 0, QCOW2_MAGIC);
	put_be32(hdr + 4, 3);
	put_be32(hdr + 20, 16);			/* cluster_bits */
	put_be64(hdr + 24, 64ull << 20);	/* size */
	put_be32(hdr + 36, 1);			/* l1_size */
	put_be64(hdr + 40, 3 * CLUSTER);	/* l1_table_offset */
	put_be64(hdr + 48, 1 * CLUSTER);	/* refcount_table_offset */
	put_be32(hdr + 56, 1);			/* refcount_table_clusters */
	put_be32(hdr + 96, 4);			/* refcount_order */
	put_be32(hdr + 100, 112);		/* header_length */
	/* feature-name table: incompatible bit 20 */
	put_be32(hdr + 112, QCOW2_EXT_FEATURE_TABLE);
	put_be32(hdr + 116, 48);
	hdr[120] = 0;
	hdr[121] = 20;
	memcpy(hdr + 122, name, sizeof(name) - 1);
	/* end of extensions: zeros */
}

static void build_v2(void)
{
	build_v3();
	put_be32(hdr + 4, 2);
	memset(hdr + 72, 0, 200);
}

static void img_init(struct qcow2 *img)
{
	memset(img, 0, sizeof(*img));
	img->path = PATH;
}

static void img_release(struct qcow2 *img)
{
	free(img->backing_file);
	free(img->backing_fmt);
	free(img->data_file);
	free(img->unknown_exts);
}

static int parse(struct qcow2 *img, size_t len, uint64_t file_size)
{
	img_init(img);
	return qcow2_header_parse(img, hdr, len, file_size);
}

START_TEST(test_valid_v3)
{
	struct qcow2 img;

	build_v3();
	ck_assert_int_eq(parse(&img, sizeof(hdr), FILE_SIZE), 0);
	ck_assert_uint_eq(img.h.version, 3);
	ck_assert_uint_eq(img.cluster_size, CLUSTER);
	ck_assert_uint_eq(img.refcount_bits, 16);
	ck_assert_uint_eq(img.l2_bits, 13);
	ck_assert_uint_eq(img.h.size, 64ull << 20);
	img_release(&img);
}
END_TEST

START_TEST(test_valid_v2)
{
	struct qcow2 img;

	build_v2();
	ck_assert_int_eq(parse(&img, sizeof(hdr), FILE_SIZE), 0);
	ck_assert_uint_eq(img.h.version, 2);
	ck_assert_uint_eq(img.refcount_bits, 16);
	ck_assert_uint_eq(img.h.incompatible, 0);
	img_release(&img);
}
END_TEST

/* One broken field per row: offset, width (4 or 8), value, message part. */
static const struct bad_field {
	const char *what;
	unsigned int off, width;
	uint64_t val;
	const char *msg;
} bad_fields[] = {
	{ "bad magic", 0, 4, 0x514649fcu, "magic" },
	{ "version 1", 4, 4, 1, "version" },
	{ "version 4", 4, 4, 4, "version" },
	{ "cluster_bits 8", 20, 4, 8, "cluster_bits" },
	{ "cluster_bits 22", 20, 4, 22, "cluster_bits" },
	{ "cluster_bits huge", 20, 4, 0xffffffffu, "cluster_bits" },
	{ "l1_size absurd", 36, 4, 0x7fffffff, "L1" },
	{ "l1_size too small", 36, 4, 0, "L1" },
	{ "L1 beyond EOF", 40, 8, 16 * CLUSTER, "L1" },
	{ "L1 offset wraps", 40, 8, 0xffffffffffff0000ull, "L1" },
	{ "L1 misaligned", 40, 8, 3 * CLUSTER + 512, "L1" },
	{ "reftable beyond EOF", 48, 8, 16 * CLUSTER, "refcount" },
	{ "reftable misaligned", 48, 8, CLUSTER + 512, "refcount" },
	{ "reftable clusters absurd", 56, 4, 0x7fffffff, "refcount" },
	{ "reftable clusters 0", 56, 4, 0, "refcount" },
	{ "refcount_order 7", 96, 4, 7, "refcount" },
	{ "header_length short", 100, 4, 72, "header" },
	{ "header_length past cluster", 100, 4, CLUSTER + 8, "header" },
	{ "unknown encryption method", 32, 4, 3, "encrypt" },
	{ "LUKS without its header extension", 32, 4, 2, "encrypt" },
	{ "size absurd", 24, 8, 1ull << 63, "size" },
	{ "unknown incompatible bit (named)", 72, 8, 1ull << 20, "uqtest-feature" },
	{ "unknown incompatible bit (unnamed)", 72, 8, 1ull << 33, "33" },
};

START_TEST(test_bad_field)
{
	const struct bad_field *b = &bad_fields[_i];
	struct qcow2 img;
	int ret;

	build_v3();
	if (b->width == 4)
		put_be32(hdr + b->off, (uint32_t)b->val);
	else
		put_be64(hdr + b->off, b->val);
	ret = parse(&img, sizeof(hdr), FILE_SIZE);
	ck_assert_msg(ret < 0, "%s: accepted", b->what);
	ck_assert_msg(strncmp(img.errmsg, PATH ": ", strlen(PATH) + 2) == 0,
		      "%s: message does not name the file: '%s'", b->what, img.errmsg);
	ck_assert_msg(strstr(img.errmsg, b->msg) || strcasestr(img.errmsg, b->msg),
		      "%s: message lacks '%s': '%s'", b->what, b->msg, img.errmsg);
	ck_assert_msg(!strchr(img.errmsg, '\n'), "%s: message is not one line", b->what);
	img_release(&img);
}
END_TEST

START_TEST(test_truncated)
{
	struct qcow2 img;
	size_t len;

	build_v3();
	for (len = 0; len < 112; len += 8) {
		ck_assert_msg(parse(&img, len, len) < 0, "accepted %zu bytes", len);
		img_release(&img);
	}
}
END_TEST

START_TEST(test_extension_past_cluster)
{
	struct qcow2 img;

	build_v3();
	put_be32(hdr + 116, CLUSTER);		/* feature table length */
	ck_assert_int_lt(parse(&img, sizeof(hdr), FILE_SIZE), 0);
	ck_assert_ptr_nonnull(strstr(img.errmsg, PATH));
	img_release(&img);
}
END_TEST

/* The name's offset and length come from the image: their sum must not wrap. */
START_TEST(test_backing_name_bounds)
{
	struct qcow2 img;

	build_v3();
	put_be64(hdr + 8, 0xffffffffffffffc0ull);
	put_be32(hdr + 16, 100);
	ck_assert_int_lt(parse(&img, sizeof(hdr), FILE_SIZE), 0);
	ck_assert_ptr_nonnull(strstr(img.errmsg, "backing file name"));
	img_release(&img);
	/* An empty name is no backing file, as for QEMU. */
	put_be64(hdr + 8, 1024);
	put_be32(hdr + 16, 0);
	ck_assert_int_eq(parse(&img, sizeof(hdr), FILE_SIZE), 0);
	ck_assert_ptr_null(img.backing_file);
	img_release(&img);
}
END_TEST

/* QEMU refuses an encryption header extension in an image without LUKS. */
START_TEST(test_crypto_ext_without_luks)
{
	struct qcow2 img;

	build_v3();
	put_be32(hdr + 112, QCOW2_EXT_CRYPTO);
	put_be32(hdr + 116, 16);
	put_be64(hdr + 120, 2 * CLUSTER);
	put_be64(hdr + 128, 4096);
	memset(hdr + 136, 0, 48);
	ck_assert_int_lt(parse(&img, sizeof(hdr), FILE_SIZE), 0);
	ck_assert_ptr_nonnull(strstr(img.errmsg, "LUKS"));
	img_release(&img);
}
END_TEST

/* Sizes are whole 512-byte sectors, a partial last one dropped (QEMU). */
START_TEST(test_size_partial_sector)
{
	struct qcow2 img;

	build_v3();
	put_be64(hdr + 24, (64ull << 20) - 7);
	ck_assert_int_eq(parse(&img, sizeof(hdr), FILE_SIZE), 0);
	ck_assert_uint_eq(img.h.size, (64ull << 20) - 512);
	img_release(&img);
}
END_TEST

START_TEST(test_roundtrip)
{
	static uint8_t out[CLUSTER];
	struct qcow2 img, again;
	int n;

	build_v3();
	ck_assert_int_eq(parse(&img, sizeof(hdr), FILE_SIZE), 0);
	memset(out, 0, sizeof(out));
	n = qcow2_header_serialize(&img, out, sizeof(out));
	ck_assert_int_gt(n, 0);
	memcpy(hdr, out, sizeof(hdr));
	ck_assert_int_eq(parse(&again, sizeof(hdr), FILE_SIZE), 0);
	ck_assert_mem_eq(&img.h, &again.h, sizeof(img.h));
	ck_assert_uint_eq(img.unknown_exts_len, again.unknown_exts_len);
	ck_assert_mem_eq(img.unknown_exts, again.unknown_exts, img.unknown_exts_len);
	img_release(&img);
	img_release(&again);
}
END_TEST

/* Flip random bytes of the first 512: parse must return, never crash. */
START_TEST(test_fuzz)
{
	struct qcow2 img;
	unsigned int seed = 12345, i, j, n;
	int ret;

	for (i = 0; i < 20000; i++) {
		build_v3();
		n = 1 + rand_r(&seed) % 8;
		for (j = 0; j < n; j++)
			hdr[rand_r(&seed) % 512] = rand_r(&seed);
		ret = parse(&img, sizeof(hdr), FILE_SIZE);
		if (ret < 0)
			ck_assert_msg(img.errmsg[0] || ret == -ENOMEM,
				      "iteration %u: error %d without a message", i, ret);
		img_release(&img);
	}
}
END_TEST

static Suite *header_suite(void)
{
	Suite *s = suite_create("header");
	TCase *tc = tcase_create("parse");

	tcase_add_test(tc, test_valid_v3);
	tcase_add_test(tc, test_valid_v2);
	tcase_add_loop_test(tc, test_bad_field, 0,
			    sizeof(bad_fields) / sizeof(bad_fields[0]));
	tcase_add_test(tc, test_truncated);
	tcase_add_test(tc, test_extension_past_cluster);
	tcase_add_test(tc, test_roundtrip);
	tcase_add_test(tc, test_backing_name_bounds);
	tcase_add_test(tc, test_crypto_ext_without_luks);
	tcase_add_test(tc, test_size_partial_sector);
	tcase_add_test(tc, test_fuzz);
	tcase_set_timeout(tc, 120);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return tu_suite_run(header_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
