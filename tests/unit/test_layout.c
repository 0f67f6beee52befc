// SPDX-License-Identifier: MIT
/*
 * The pure on-disk layout helpers of internal.h: refcount entries of every
 * width (QEMU's bit order, checked against hand-computed bytes), big-endian
 * accessors and the guest offset -> L1/L2 index math.
 */
#include <check.h>
#include <stdlib.h>

#include "internal.h"
#include "run.h"

/* Round trip every width: neighbours must survive each write. */
START_TEST(test_rc_roundtrip)
{
	uint32_t order = _i;
	uint64_t max = order == 6 ? UINT64_MAX : (1ull << (1u << order)) - 1;
	uint8_t blk[512];
	uint64_t n = sizeof(blk) * 8 >> order;
	uint64_t i;

	memset(blk, 0, sizeof(blk));
	for (i = 0; i < n; i++)
		qcow2_rc_write(blk, i, order, (i * 0x9e3779b97f4a7c15ull) & max);
	for (i = 0; i < n; i++)
		ck_assert_uint_eq(qcow2_rc_read(blk, i, order),
				  (i * 0x9e3779b97f4a7c15ull) & max);

	/* Overwrite every other entry with max, then 0: others unchanged. */
	for (i = 0; i < n; i += 2)
		qcow2_rc_write(blk, i, order, max);
	for (i = 0; i < n; i += 2)
		qcow2_rc_write(blk, i, order, 0);
	for (i = 0; i < n; i++)
		ck_assert_uint_eq(qcow2_rc_read(blk, i, order),
				  i % 2 ? (i * 0x9e3779b97f4a7c15ull) & max : 0);
}
END_TEST

/* Sub-byte widths fill each byte from its least significant bit. */
START_TEST(test_rc_subbyte_layout)
{
	uint8_t blk[4] = { 0 };

	qcow2_rc_write(blk, 0, 0, 1);
	qcow2_rc_write(blk, 9, 0, 1);
	ck_assert_uint_eq(blk[0], 0x01);
	ck_assert_uint_eq(blk[1], 0x02);

	memset(blk, 0, sizeof(blk));
	qcow2_rc_write(blk, 1, 1, 3);		/* bits 2-3 of byte 0 */
	qcow2_rc_write(blk, 4, 1, 2);		/* bits 0-1 of byte 1 */
	ck_assert_uint_eq(blk[0], 0x0c);
	ck_assert_uint_eq(blk[1], 0x02);

	memset(blk, 0, sizeof(blk));
	qcow2_rc_write(blk, 0, 2, 0x5);
	qcow2_rc_write(blk, 1, 2, 0xa);
	qcow2_rc_write(blk, 3, 2, 0xf);
	ck_assert_uint_eq(blk[0], 0xa5);
	ck_assert_uint_eq(blk[1], 0xf0);
}
END_TEST

/* Byte-sized and wider entries are big-endian. */
START_TEST(test_rc_wide_layout)
{
	uint8_t blk[16] = { 0 };

	qcow2_rc_write(blk, 1, 3, 0xab);
	ck_assert_uint_eq(blk[1], 0xab);

	memset(blk, 0, sizeof(blk));
	qcow2_rc_write(blk, 1, 4, 0x1234);
	ck_assert_uint_eq(blk[2], 0x12);
	ck_assert_uint_eq(blk[3], 0x34);

	memset(blk, 0, sizeof(blk));
	qcow2_rc_write(blk, 1, 5, 0x01020304);
	ck_assert_mem_eq(blk + 4, "\x01\x02\x03\x04", 4);

	memset(blk, 0, sizeof(blk));
	qcow2_rc_write(blk, 1, 6, 0x0102030405060708ull);
	ck_assert_mem_eq(blk + 8, "\x01\x02\x03\x04\x05\x06\x07\x08", 8);
	ck_assert_uint_eq(qcow2_rc_read(blk, 1, 6), 0x0102030405060708ull);
}
END_TEST

START_TEST(test_be_accessors)
{
	uint8_t b[8];

	put_be16(b, 0xa1b2);
	ck_assert_mem_eq(b, "\xa1\xb2", 2);
	ck_assert_uint_eq(get_be16(b), 0xa1b2);
	put_be32(b, QCOW2_MAGIC);
	ck_assert_mem_eq(b, "QFI\xfb", 4);
	ck_assert_uint_eq(get_be32(b), QCOW2_MAGIC);
	put_be64(b, 0x8000000000050000ull);
	ck_assert_mem_eq(b, "\x80\x00\x00\x00\x00\x05\x00\x00", 8);
	ck_assert_uint_eq(get_be64(b), 0x8000000000050000ull);
}
END_TEST

/* Index math for 64 KiB clusters (8192 L2 entries, 512 MiB per table)
 * and 512-byte clusters (64 entries, 32 KiB per table). */
START_TEST(test_index_math)
{
	struct qcow2 img;

	memset(&img, 0, sizeof(img));
	img.h.cluster_bits = 16;
	img.cluster_size = 1u << 16;
	img.l2_bits = 13;
	ck_assert_uint_eq(qcow2_l2_span(&img), 512ull << 20);
	ck_assert_uint_eq(qcow2_l1_index(&img, (512ull << 20) - 1), 0);
	ck_assert_uint_eq(qcow2_l1_index(&img, 512ull << 20), 1);
	ck_assert_uint_eq(qcow2_l2_index(&img, (512ull << 20) + 3 * 65536 + 17), 3);
	ck_assert_uint_eq(qcow2_cluster_off(&img, 0x12345), 0x10000);
	ck_assert(qcow2_aligned(&img, 0x30000));
	ck_assert(!qcow2_aligned(&img, 0x30200));

	img.h.cluster_bits = 9;
	img.cluster_size = 512;
	img.l2_bits = 6;
	ck_assert_uint_eq(qcow2_l2_span(&img), 32768);
	ck_assert_uint_eq(qcow2_l1_index(&img, 32768 * 5 + 513), 5);
	ck_assert_uint_eq(qcow2_l2_index(&img, 32768 * 5 + 513), 1);
	ck_assert_uint_eq(qcow2_l2_index(&img, 32767), 63);
}
END_TEST

static Suite *layout_suite(void)
{
	Suite *s = suite_create("layout");
	TCase *tc = tcase_create("refcount");

	tcase_add_loop_test(tc, test_rc_roundtrip, 0, 7);
	tcase_add_test(tc, test_rc_subbyte_layout);
	tcase_add_test(tc, test_rc_wide_layout);
	suite_add_tcase(s, tc);

	tc = tcase_create("index");
	tcase_add_test(tc, test_be_accessors);
	tcase_add_test(tc, test_index_math);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return tu_suite_run(layout_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
