// SPDX-License-Identifier: MIT
/*
 * ublk-qcow2: one binary, one subcommand per verb. main() only dispatches;
 * every subcommand parses its own options and owns its output.
 */
#include <stdio.h>
#include <string.h>

#include "cmds.h"
#include "util.h"

static const struct {
	const char *name;
	int (*fn)(int argc, char **argv);
	const char *summary;
} commands[] = {
	{ "create", cmd_create, "create a qcow2 or raw image" },
	{ "info", cmd_info, "show an image's format, sizes and features" },
	{ "check", cmd_check, "check (and repair) an image's metadata" },
	{ "map", cmd_map, "show how guest ranges map into the image file" },
	{ "convert", cmd_convert, "copy an image into a new raw or qcow2 image" },
	{ "resize", cmd_resize, "change an image's virtual size" },
	{ "bench", cmd_bench, "time reads or writes through the engine (as qemu-img bench)" },
	{ "snapshot", cmd_snapshot, "list, create, apply or delete internal snapshots" },
	{ "rebase", cmd_rebase, "change an image's backing file" },
	{ "commit", cmd_commit, "write an image's data into its backing file" },
	{ "io", cmd_io, "read, write, discard and flush ranges (a qemu-io subset)" },
	{ "add", cmd_add, "serve an image as /dev/ublkbN" },
	{ "del", cmd_del, "stop and delete a ublk device" },
	{ "list", cmd_list, "show the ublk devices" },
	{ "features", cmd_features, "print the kernel's ublk feature bits" },
	{ "recover", cmd_recover, "serve a ublk device again after its daemon died" },
};

#define NR_COMMANDS (sizeof(commands) / sizeof(commands[0]))

static void usage(FILE *f)
{
	size_t i;

	fprintf(f, "usage: " UQ_PROG " [-v] COMMAND [OPTIONS] ...\n\ncommands:\n");
	for (i = 0; i < NR_COMMANDS; i++)
		fprintf(f, "  %-10s%s\n", commands[i].name, commands[i].summary);
	fprintf(f, "\n  -v, --verbose  debug messages on stderr (syslog from a daemon)\n"
		"  -V, --version  print the version and exit\n"
		"\nRun '" UQ_PROG " COMMAND --help' for a command's options.\n");
}

int main(int argc, char **argv)
{
	size_t i;

	/* Quiet by default; -v before the command turns on debug lines. */
	while (argc > 1 && (!strcmp(argv[1], "-v") || !strcmp(argv[1], "--verbose"))) {
		uq_log_verbose(true);
		argv[1] = argv[0];
		argc--;
		argv++;
	}
	if (argc < 2) {
		usage(stderr);
		return 1;
	}
	if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
		usage(stdout);
		return 0;
	}
	if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "-V")) {
		printf(UQ_PROG " version " UQ_VERSION "\n");
		return 0;
	}
	for (i = 0; i < NR_COMMANDS; i++)
		if (!strcmp(argv[1], commands[i].name))
			return commands[i].fn(argc - 1, argv + 1);
	uq_err("unknown command '%s' (see '" UQ_PROG " --help')", argv[1]);
	return 1;
}
