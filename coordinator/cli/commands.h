/* commands.h - the coordinator's subcommands, reached through the `numoe`
 * front binary (launch/main.c). Same convention as launch/commands.h: argv[0]
 * is the subcommand name, the return value the exit status (0 ok, 1 runtime
 * error, 2 usage error). */
#ifndef NUMOE_COORDINATOR_CLI_COMMANDS_H
#define NUMOE_COORDINATOR_CLI_COMMANDS_H

int nm_cmd_generate(int argc, char **argv);
int nm_cmd_bench_model(int argc, char **argv);
int nm_cmd_chat(int argc, char **argv);
int nm_cmd_serve(int argc, char **argv);
/* `numoe perplexity -f FILE`: llama-perplexity's windows (perplexity.c) */
int nm_cmd_perplexity(int argc, char **argv);
/* `numoe tokenize` and `numoe detokenize` (tokenize.c) */
int nm_cmd_tokenize(int argc, char **argv);
int nm_cmd_detokenize(int argc, char **argv);
/* `numoe bench ipc`: per-layer hand-off round trips (ZeroMQ REQ/REP and
 * DEALER/ROUTER with protobuf Envelopes, shm doorbell with and without
 * polling) between two processes, and with --model, through real workers
 * (bench_ipc.c). */
int nm_cmd_bench_ipc(int argc, char **argv);

#endif
