/* placement.h - which worker holds which routed-expert weights.
 *
 * A placement lists, for every MoE layer and every expert, the pieces of the
 * expert's intermediate (ff) dimension and the worker holding each: a piece
 * (worker, f0, f1) is gate/up rows [f0, f1) and down columns [f0, f1) of
 * that expert. The worker's partial output over its pieces is
 *   sum over its pieces of w * down[:, f0:f1] (silu(gate[f0:f1] x) * up[f0:f1] x),
 * and the partial outputs of all workers add up to the full MoE output
 * exactly when the pieces of every expert tile [0, n_ff) once - which is
 * what nm_placement_validate checks (every weight on exactly one worker:
 * nothing missing, nothing duplicated).
 *
 * Down rows are n_ff columns long and may be quantised in blocks, so a cut
 * inside an expert must sit on a block boundary of that layer's down type
 * (`align`, per layer: real files mix types per layer).
 *
 * Families (configs/README.md):
 *   split       every worker holds a 1/N slice of every expert (balanced at
 *               batch 1; one partial sum per worker)
 *   experts     whole experts, contiguous blocks of expert ids
 *   experts-rr  whole experts, round-robin over expert ids
 *   map         an explicit map file (configs/README.md: "layer L: w w ..."
 *               lines for whole experts, "L E W F0 F1" lines for pieces;
 *               `numoe placement --profile` writes usage-balanced ones). It
 *               produces the same structure, so the validator, the hash and
 *               the worker's shard builder take it as it is.
 *
 * Every worker builds the whole map (all workers' pieces), validates it and
 * sends its hash at registration; the coordinator refuses workers whose
 * hashes differ. */
#ifndef NUMOE_MODEL_PLACEMENT_H
#define NUMOE_MODEL_PLACEMENT_H

#include <stdint.h>
#include <stdio.h>

#include "common/error.h"
#include "model/model.h"

/* Values equal numoe.proto's PlacementKind. */
enum { NM_PLACE_SPLIT = 1, NM_PLACE_EXPERTS = 2, NM_PLACE_EXPERTS_RR = 3, NM_PLACE_MAP = 4 };

typedef struct {
    int32_t worker;
    int64_t f0, f1;
} nm_piece;

typedef struct {
    int kind;
    int n_workers;
    int64_t n_layer, n_expert, n_ff;
    uint8_t *is_moe;   /* [n_layer] */
    int64_t *align;    /* [n_layer] granularity of cuts in the ff dimension */
    int32_t *n_pieces; /* [n_layer * n_expert] */
    nm_piece *pieces;  /* [n_layer * n_expert][n_workers] (at most one piece per worker) */
} nm_placement;

/* "split" / "experts" / "experts-rr" -> kind, 0 if unknown. */
int nm_placement_parse_kind(const char *s);
const char *nm_placement_kind_name(int kind);

/* An empty map (no pieces) for this shape. align may be NULL (1). */
int nm_placement_init(nm_placement *p, int kind, int n_workers, int64_t n_layer, const uint8_t *is_moe,
                      const int64_t *align, int64_t n_expert, int64_t n_ff, nm_err *err);
/* Adds one piece; fails only when the (layer, expert) already has n_workers
 * pieces or an index is outside the shape (the validator judges the rest). */
int nm_placement_add(nm_placement *p, int64_t layer, int64_t expert, int worker, int64_t f0, int64_t f1, nm_err *err);
/* Fills an empty map with one of the built-in families; fails with a clear
 * message when the family cannot place this shape on n_workers (fewer
 * experts or ff blocks than workers). */
int nm_placement_fill(nm_placement *p, nm_err *err);
/* Every piece in range and aligned, every expert of every MoE layer tiled
 * exactly once, no worker without weights. The error names the layer,
 * expert, ff range and workers. */
int nm_placement_validate(const nm_placement *p, nm_err *err);
/* Hash of the whole map, independent of the order pieces were added in. */
uint64_t nm_placement_hash(const nm_placement *p);
void nm_placement_free(nm_placement *p);

/* init + fill + validate for a loaded model (align = the block size of each
 * layer's ffn_down_exps type). */
int nm_placement_for_model(nm_placement *p, const nm_model *m, int kind, int n_workers, nm_err *err);

/* The placement shape of a loaded model: is_moe and align per layer
 * (malloc'd, the caller frees both). */
int nm_placement_model_shape(const nm_model *m, uint8_t **is_moe, int64_t **align, nm_err *err);

/* Map files (configs/README.md, "numoe placement v1"):
 *   # comment                      anywhere; blank lines are skipped
 *   workers N                      optional; must come before any placement line
 *   layer L: W0 W1 ... W(E-1)      whole experts: expert e of layer L on worker We
 *   L E W F0 F1                    one piece: ff rows [F0, F1) of expert E (F1 "-": n_ff)
 * Every MoE layer must be listed (by either form). n_workers 0 takes the
 * count from the "workers" line, else the largest worker id + 1; a non-zero
 * n_workers must agree with the file's "workers" line. Errors name
 * file:line (expert missing or listed twice, worker id out of range, layer
 * not a MoE layer, overlapping pieces); the result is validated
 * (nm_placement_validate) and has kind NM_PLACE_MAP. name labels errors. */
int nm_placement_parse_map(nm_placement *p, const char *text, size_t len, const char *name, int n_workers,
                           int64_t n_layer, const uint8_t *is_moe, const int64_t *align, int64_t n_expert,
                           int64_t n_ff, nm_err *err);
int nm_placement_load_map(nm_placement *p, const char *path, int n_workers, int64_t n_layer, const uint8_t *is_moe,
                          const int64_t *align, int64_t n_expert, int64_t n_ff, nm_err *err);
/* Writes p as a map file: "layer L:" lines where every expert of the layer
 * is whole on one worker, piece lines otherwise. Returns 0, or -1 on a
 * write error. */
int nm_placement_write_map(const nm_placement *p, FILE *f);
/* What `--placement SPEC` means for a model: a family name (split, experts,
 * experts-rr) or else the path of a map file. n_workers as in
 * nm_placement_load_map for files (0: from the file). The map is validated. */
int nm_placement_for_model_spec(nm_placement *p, const nm_model *m, const char *spec, int n_workers, nm_err *err);

#endif
