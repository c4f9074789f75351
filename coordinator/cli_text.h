/* cli_text.h - text subcommands of the `numoe` front binary: `numoe tokenize`
 * and `numoe detokenize` (coordinator/cmd_tokenize.c). Same convention as
 * launch/commands.h: argv[0] is the subcommand name, the return value the
 * exit status (0 ok, 1 runtime error, 2 usage error). */
#ifndef NUMOE_COORDINATOR_CLI_TEXT_H
#define NUMOE_COORDINATOR_CLI_TEXT_H

int nm_cmd_tokenize(int argc, char **argv);
int nm_cmd_detokenize(int argc, char **argv);

#endif
