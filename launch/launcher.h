/* launcher.h - the `numoe` process that runs a model with expert workers:
 * it starts one numoe-worker per NUMA node (or --workers N of them, with
 * their binding), then the numoe-coordinator, and supervises them until the
 * coordinator ends. Restarting a worker that died is its job; holding and
 * re-sending the layer in flight is the coordinator's
 * (coordinator/experts/remote.c). Process tree:
 *
 *   numoe (launcher)  - waits for signals and children, nothing else
 *   +- numoe-coordinator <command> ...   (same arguments, same terminal)
 *   +- numoe-worker --worker-id 0 ...    (own process group: Ctrl-C does not reach it)
 *   +- numoe-worker --worker-id 1 ...
 *
 * The coordinator finds the workers through two environment variables the
 * launcher sets: NUMOE_LAUNCH_ENDPOINT (the ZeroMQ ipc endpoint it binds,
 * which the workers connect to) and NUMOE_LAUNCH_WORKERS (their count). */
#ifndef NUMOE_LAUNCH_LAUNCHER_H
#define NUMOE_LAUNCH_LAUNCHER_H

#include "coordinator/cli/session.h"

/* Whether argv (the whole `numoe <command> ...` line of a command that runs
 * a model) needs worker processes, and how many: fills *o from the shared
 * session options and returns the worker count (0: run the coordinator
 * alone - --workers 0, --worker-endpoints, --help, no model, or options the
 * command itself will reject with a message). Default: one worker per NUMA
 * node. For a run on the GPU engine it also sets NUMOE_POOL_SPIN_US (unless
 * set) to NM_SESSION_GPU_SPIN_US, which the workers it starts inherit. */
int nm_launch_plan(int argc, char **argv, nm_session_opts *o);

/* Runs argv as numoe-coordinator with n_workers workers started and
 * supervised here; returns the coordinator's exit status (a coordinator that
 * died of a signal is re-raised, so the shell sees the same). Cleans up
 * every worker process and shared-memory segment of the run before it
 * returns, whatever happened. */
int nm_launch(int argc, char **argv, const nm_session_opts *o, int n_workers);

#endif
