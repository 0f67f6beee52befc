// SPDX-License-Identifier: MIT
/*
 * The sparse table (table.c) that holds the L1 and refcount tables: absent
 * chunks read zero and cost no memory, a set allocates its chunk (a zero set
 * does not), a table with every entry set reads back, growth keeps entries
 * and shrinking drops those past the end, and the big-endian copies a flush
 * writes carry zeros for absent chunks and past the end.
 */
#include <check.h>
#include <stdlib.h>

#include "internal.h"

START_TEST(test_null_chunks_read_zero)
{
	struct qcow2_table t;
	uint64_t i;

	ck_assert_int_eq(qcow2_table_init(&t, 2u << 20), 0);	/* 16 MiB as an array */
	ck_assert_uint_eq(t.nr_held, 0);
	/* The pointer array only: 4096 chunks. */
	ck_assert_uint_eq(qcow2_table_bytes(&t), 4096 * sizeof(uint64_t *));
	for (i = 0; i < t.nr; i += 4099)
		ck_assert_uint_eq(qcow2_table_get(&t, i), 0);
	ck_assert_uint_eq(qcow2_table_get(&t, t.nr - 1), 0);
	ck_assert(qcow2_table_hole(&t, 12345));
	ck_assert_uint_eq(qcow2_table_hi(&t, t.nr), 0);
	/* Zeros set into absent chunks allocate nothing. */
	ck_assert_int_eq(qcow2_table_set(&t, 777, 0), 0);
	ck_assert_uint_eq(t.nr_held, 0);
	qcow2_table_free(&t);
}
END_TEST

START_TEST(test_set_allocates)
{
	struct qcow2_table t;

	ck_assert_int_eq(qcow2_table_init(&t, 1u << 20), 0);
	ck_assert_int_eq(qcow2_table_set(&t, 1000, 0xabc000), 0);
	ck_assert_uint_eq(t.nr_held, 1);
	ck_assert(!qcow2_table_hole(&t, 1000));
	ck_assert(!qcow2_table_hole(&t, 512));		/* same chunk: 512..1023 */
	ck_assert(qcow2_table_hole(&t, 1024));
	ck_assert_uint_eq(qcow2_table_get(&t, 1000), 0xabc000);
	ck_assert_uint_eq(qcow2_table_get(&t, 999), 0);
	ck_assert_uint_eq(qcow2_table_get(&t, 1001), 0);
	/* Far apart: one more chunk each. */
	ck_assert_int_eq(qcow2_table_set(&t, t.nr - 1, 7), 0);
	ck_assert_int_eq(qcow2_table_set(&t, 0, 9), 0);
	ck_assert_uint_eq(t.nr_held, 3);
	ck_assert_uint_eq(qcow2_table_hi(&t, t.nr), t.nr);
	ck_assert_uint_eq(qcow2_table_hi(&t, t.nr - 1), 1001);
	ck_assert_uint_eq(qcow2_table_bytes(&t), 2048 * sizeof(uint64_t *) + 3 * 4096);
	/* Reserve allocates the chunks of a range, keeps what is set. */
	ck_assert_int_eq(qcow2_table_reserve(&t, 600, 2000), 0);
	ck_assert_uint_eq(t.nr_held, 7);		/* chunks 2..5 new */
	ck_assert_uint_eq(qcow2_table_get(&t, 1000), 0xabc000);
	qcow2_table_clear(&t);
	ck_assert_uint_eq(t.nr_held, 0);
	ck_assert_uint_eq(qcow2_table_get(&t, 1000), 0);
	qcow2_table_free(&t);
}
END_TEST

START_TEST(test_every_entry_set)
{
	uint64_t n = 3 * QCOW2_TABLE_CHUNK + 17, i, *be;
	struct qcow2_table t;

	ck_assert_int_eq(qcow2_table_init(&t, n), 0);
	for (i = 0; i < n; i++)
		ck_assert_int_eq(qcow2_table_set(&t, i, (i + 1) << 16), 0);
	ck_assert_uint_eq(t.nr_held, 4);
	for (i = 0; i < n; i++)
		ck_assert_uint_eq(qcow2_table_get(&t, i), (i + 1) << 16);
	ck_assert_uint_eq(qcow2_table_hi(&t, n), n);
	/* Copies past the end read zero. */
	be = malloc((n + 100) * 8);
	ck_assert_ptr_nonnull(be);
	qcow2_table_read_be(&t, 0, n + 100, be);
	for (i = 0; i < n + 100; i++)
		ck_assert_uint_eq(be64toh(be[i]), i < n ? (i + 1) << 16 : 0);
	/* Load of the copy into a fresh table gives the same table. */
	{
		struct qcow2_table u;

		ck_assert_int_eq(qcow2_table_init(&u, n), 0);
		ck_assert_int_eq(qcow2_table_load_be(&u, 0, be, n), 0);
		for (i = 0; i < n; i++)
			ck_assert_uint_eq(qcow2_table_get(&u, i), (i + 1) << 16);
		qcow2_table_swap(&t, &u);
		qcow2_table_free(&u);
	}
	ck_assert_uint_eq(qcow2_table_get(&t, n - 1), n << 16);
	free(be);
	qcow2_table_free(&t);
}
END_TEST

START_TEST(test_read_be_mixed)
{
	struct qcow2_table t;
	uint64_t be[3 * QCOW2_TABLE_CHUNK], i;

	ck_assert_int_eq(qcow2_table_init(&t, 4 * QCOW2_TABLE_CHUNK), 0);
	ck_assert_int_eq(qcow2_table_set(&t, QCOW2_TABLE_CHUNK + 5, 42), 0);
	/* A range that starts mid chunk 0 (absent), spans chunk 1, ends in chunk 3. */
	memset(be, 0xff, sizeof(be));
	qcow2_table_read_be(&t, 100, 3 * QCOW2_TABLE_CHUNK, be);
	for (i = 0; i < 3 * QCOW2_TABLE_CHUNK; i++)
		ck_assert_uint_eq(be64toh(be[i]), i + 100 == QCOW2_TABLE_CHUNK + 5 ? 42 : 0);
	qcow2_table_free(&t);
}
END_TEST

START_TEST(test_grow_and_shrink)
{
	struct qcow2_table t;

	ck_assert_int_eq(qcow2_table_init(&t, 100), 0);
	ck_assert_int_eq(qcow2_table_set(&t, 99, 5), 0);
	ck_assert_int_eq(qcow2_table_resize(&t, 100000), 0);
	ck_assert_uint_eq(t.nr, 100000);
	ck_assert_uint_eq(qcow2_table_get(&t, 99), 5);
	ck_assert_uint_eq(qcow2_table_get(&t, 100), 0);
	ck_assert_uint_eq(qcow2_table_get(&t, 99999), 0);
	ck_assert_int_eq(qcow2_table_set(&t, 99999, 6), 0);
	ck_assert_uint_eq(t.nr_held, 2);
	/* Shrinking drops the chunks past the end and the entries past it in the last one. */
	ck_assert_int_eq(qcow2_table_resize(&t, 50), 0);
	ck_assert_uint_eq(t.nr_held, 1);
	ck_assert_int_eq(qcow2_table_resize(&t, 100000), 0);
	ck_assert_uint_eq(qcow2_table_get(&t, 99), 0);
	ck_assert_uint_eq(qcow2_table_get(&t, 99999), 0);
	ck_assert_uint_eq(qcow2_table_hi(&t, t.nr), 0);
	/* From empty. */
	qcow2_table_free(&t);
	ck_assert_int_eq(qcow2_table_init(&t, 0), 0);
	ck_assert_int_eq(qcow2_table_resize(&t, 3 * QCOW2_TABLE_CHUNK), 0);
	ck_assert_int_eq(qcow2_table_set(&t, 2 * QCOW2_TABLE_CHUNK, 1), 0);
	ck_assert_uint_eq(qcow2_table_get(&t, 2 * QCOW2_TABLE_CHUNK), 1);
	qcow2_table_free(&t);
}
END_TEST

static Suite *table_suite(void)
{
	Suite *s = suite_create("table");
	TCase *tc = tcase_create("table");

	tcase_add_test(tc, test_null_chunks_read_zero);
	tcase_add_test(tc, test_set_allocates);
	tcase_add_test(tc, test_every_entry_set);
	tcase_add_test(tc, test_read_be_mixed);
	tcase_add_test(tc, test_grow_and_shrink);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(table_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
