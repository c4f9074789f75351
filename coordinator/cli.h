/* cli.h - coordinator subcommands reached through the `numoe` front binary. */
#ifndef NUMOE_COORDINATOR_CLI_H
#define NUMOE_COORDINATOR_CLI_H

int nm_cmd_generate(int argc, char **argv);
int nm_cmd_bench_model(int argc, char **argv);
int nm_cmd_chat(int argc, char **argv);
int nm_cmd_serve(int argc, char **argv);
int nm_cmd_perplexity(int argc, char **argv);

#endif
