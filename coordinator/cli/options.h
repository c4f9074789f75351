/* options.h - the command-line options the model-running commands share:
 * the session's (model, threads, context, batch, workers...) and the
 * sampler's. Used by generate, chat, serve and bench, and by the launcher,
 * which reads the worker options off the same command line.
 *
 * Each parser looks at the option at argv[*i] and, when it is one of its own,
 * stores the value and advances *i past it: 1 if consumed, 0 if not its
 * option, -1 on a bad value (message on stderr, prefixed with cmd). */
#ifndef NUMOE_COORDINATOR_CLI_OPTIONS_H
#define NUMOE_COORDINATOR_CLI_OPTIONS_H

#include "coordinator/cli/session.h"
#include "coordinator/text/sampler.h"

int nm_session_parse_opt(nm_session_opts *o, int argc, char **argv, int *i, const char *cmd);
/* The option lines for --help. */
extern const char nm_session_opts_help[];

/* --temp --top-k --top-p --min-p --repeat-penalty --repeat-last-n
 * --presence-penalty --frequency-penalty --seed */
int nm_sampler_parse_opt(nm_sampler_params *p, int argc, char **argv, int *i, const char *cmd);
/* The option lines for --help, with the defaults of nm_sampler_params_default. */
extern const char nm_sampler_opts_help[];

#endif
