/* commands.h - the subcommands of the `numoe` front binary. Each takes the
 * arguments after its own name (argv[0] is the subcommand) and returns the
 * process exit status: 0 ok, 1 runtime error, 2 usage error. */
#ifndef NUMOE_LAUNCH_COMMANDS_H
#define NUMOE_LAUNCH_COMMANDS_H

int nm_cmd_inspect(int argc, char **argv);
int nm_cmd_bench_kernels(int argc, char **argv);
int nm_cmd_topology(int argc, char **argv);
int nm_cmd_placement(int argc, char **argv);
int nm_cmd_keygen(int argc, char **argv);

#endif
