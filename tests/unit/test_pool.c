// SPDX-License-Identifier: MIT
/*
 * The ublk queue's buffer pool (src/ublk/pool.c) against a model: random
 * allocations and frees never overlap, an allocation succeeds exactly when a
 * long enough run of free pages exists (first fit: the lowest such run), and
 * the pages are writable.
 */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "../../src/ublk/internal.h"
#include "run.h"

#define NPAGES 300	/* not a multiple of 64: the last bitmap word is partial */

static int model[NPAGES];	/* owner id per page, 0: free */

static int model_first_fit(unsigned int n)
{
	unsigned int run = 0;

	for (unsigned int i = 0; i < NPAGES; i++) {
		run = model[i] ? 0 : run + 1;
		if (run == n)
			return (int)(i + 1 - n);
	}
	return -1;
}

START_TEST(test_pool_model)
{
	struct ublk_pool p;
	struct { int first; unsigned int n; } held[NPAGES];
	unsigned int nheld = 0, seed = 12345, allocs = 0, refused = 0;

	memset(model, 0, sizeof(model));
	ck_assert_int_eq(ublk_pool_init(&p, (size_t)NPAGES * UBLK_POOL_PAGE - 100), 0);
	ck_assert_uint_eq(p.pages, NPAGES);
	for (int step = 0; step < 20000; step++) {
		seed = seed * 1103515245u + 12345u;
		if (nheld && (seed >> 16) % 3 == 0) {
			unsigned int k = (seed >> 8) % nheld;

			for (unsigned int i = 0; i < held[k].n; i++) {
				/* the bytes written at allocation are still there */
				ck_assert_uint_eq(p.base[(size_t)(held[k].first + i) * UBLK_POOL_PAGE],
						  (uint8_t)held[k].first);
				model[held[k].first + i] = 0;
			}
			ublk_pool_free(&p, (unsigned int)held[k].first, held[k].n);
			held[k] = held[--nheld];
			continue;
		}
		unsigned int n = 1 + (seed >> 12) % ((seed >> 20) % 4 ? 8 : 128);
		int want = model_first_fit(n);
		int got = ublk_pool_alloc(&p, n);

		ck_assert_int_eq(got, want);
		if (got < 0) {
			refused++;
			continue;
		}
		allocs++;
		for (unsigned int i = 0; i < n; i++) {
			ck_assert_int_eq(model[got + i], 0);
			model[got + i] = got + 1;
			p.base[(size_t)(got + i) * UBLK_POOL_PAGE] = (uint8_t)got;
		}
		held[nheld].first = got;
		held[nheld].n = n;
		nheld++;
	}
	ck_assert_uint_gt(allocs, 1000);
	ck_assert_uint_gt(refused, 10);
	while (nheld) {
		nheld--;
		ublk_pool_free(&p, (unsigned int)held[nheld].first, held[nheld].n);
	}
	ck_assert_uint_eq(p.free, NPAGES);
	ck_assert_int_eq(ublk_pool_alloc(&p, NPAGES), 0);
	ck_assert_int_eq(ublk_pool_alloc(&p, 1), -1);
	ck_assert_int_eq(ublk_pool_alloc(&p, 0), -1);
	ublk_pool_fini(&p);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("pool");
	TCase *tc = tcase_create("pool");

	tcase_add_test(tc, test_pool_model);
	suite_add_tcase(s, tc);
	return tu_suite_run(s) ? EXIT_FAILURE : EXIT_SUCCESS;
}
