/* SPDX-License-Identifier: MIT */
/* How the unit test programs run their Check suites: main() in one call. */
#ifndef UQ_TEST_RUN_H
#define UQ_TEST_RUN_H

#include <check.h>

/* Run every test of @s (and free it). Returns how many failed. */
int tu_suite_run(Suite *s);

/*
 * main() of a test program: run @nr @tests as suite @suite, case @tcase,
 * @timeout seconds each, in a fresh directory made from the mkdtemp
 * template @dir (the tests leave it empty; it is removed after). The exit
 * status: EXIT_SUCCESS when all passed.
 */
int tu_run_tests(const char *suite, const char *tcase, unsigned int timeout, char *dir,
		 const TTest *const *tests, unsigned int nr);

#endif
