// SPDX-License-Identifier: MIT
/* The unit test programs' main() (run.h). */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "run.h"

int tu_suite_run(Suite *s)
{
	SRunner *sr = srunner_create(s);
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed;
}

int tu_run_tests(const char *suite, const char *tcase, unsigned int timeout, char *dir,
		 const TTest *const *tests, unsigned int nr)
{
	Suite *s = suite_create(suite);
	TCase *tc = tcase_create(tcase);
	unsigned int i;
	int failed;

	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return EXIT_FAILURE;
	}
	tcase_set_timeout(tc, timeout);
	for (i = 0; i < nr; i++)
		tcase_add_test(tc, tests[i]);
	suite_add_tcase(s, tc);
	failed = tu_suite_run(s);
	rmdir(dir);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
