/* test_placement.c - the expert placement families and the validator that
 * every weight of every expert sits on exactly one worker (model/placement.h). */
#include <stdlib.h>
#include <string.h>

#include "tests/unit/check.h"
#include "model/placement.h"

#define L 4 /* layers: 0 dense, 1..3 MoE */
#define E 8
static const uint8_t IS_MOE[L] = {0, 1, 1, 1};

static int init(nm_placement *p, int kind, int n, int64_t n_ff, int64_t align, nm_err *err) {
    int64_t al[L] = {align, align, align, align};
    return nm_placement_init(p, kind, n, L, IS_MOE, al, E, n_ff, err);
}

/* Each (layer, expert) tiled exactly once: the sum of piece widths per worker
 * and per expert, recomputed independently of the validator. */
static void check_cover(const nm_placement *p, const char *what) {
    for (int64_t l = 0; l < p->n_layer; l++)
        for (int64_t e = 0; e < p->n_expert; e++) {
            size_t c = (size_t)(l * p->n_expert + e);
            int64_t cover = 0;
            for (int i = 0; i < p->n_pieces[c]; i++) {
                const nm_piece *q = &p->pieces[c * (size_t)p->n_workers + (size_t)i];
                cover += q->f1 - q->f0;
            }
            CHECK(cover == (p->is_moe[l] ? p->n_ff : 0), "%s: layer %lld expert %lld covers %lld of %lld", what,
                  (long long)l, (long long)e, (long long)cover, (long long)p->n_ff);
        }
}

static void test_families_valid(void) {
    const int kinds[] = {NM_PLACE_SPLIT, NM_PLACE_EXPERTS, NM_PLACE_EXPERTS_RR};
    for (int ki = 0; ki < 3; ki++)
        for (int n = 1; n <= 8; n++) {
            nm_placement p;
            nm_err err = {{0}};
            CHECK(init(&p, kinds[ki], n, 64, 1, &err) == 0, "%s", err.msg);
            int rc = nm_placement_fill(&p, &err);
            CHECK(rc == 0, "%s n=%d: %s", nm_placement_kind_name(kinds[ki]), n, err.msg);
            if (!rc) {
                CHECK(nm_placement_validate(&p, &err) == 0, "%s n=%d: %s", nm_placement_kind_name(kinds[ki]), n,
                      err.msg);
                check_cover(&p, nm_placement_kind_name(kinds[ki]));
            }
            nm_placement_free(&p);
        }
}

static void test_split_balanced_and_aligned(void) {
    nm_placement p;
    nm_err err;
    /* ff 96 in blocks of 32 over 2 workers: 2 + 1 blocks */
    CHECK(init(&p, NM_PLACE_SPLIT, 2, 96, 32, &err) == 0, "%s", err.msg);
    CHECK(nm_placement_fill(&p, &err) == 0, "%s", err.msg);
    CHECK(nm_placement_validate(&p, &err) == 0, "%s", err.msg);
    size_t c = (size_t)(1 * E + 5);
    CHECK(p.n_pieces[c] == 2, "pieces %d", p.n_pieces[c]);
    for (int i = 0; i < p.n_pieces[c]; i++) {
        const nm_piece *q = &p.pieces[c * 2 + (size_t)i];
        CHECK(q->f0 % 32 == 0 && q->f1 % 32 == 0, "unaligned [%lld, %lld)", (long long)q->f0, (long long)q->f1);
        CHECK(q->worker == 0 ? q->f0 == 0 && q->f1 == 32 : q->f0 == 32 && q->f1 == 96, "worker %d [%lld, %lld)",
              q->worker, (long long)q->f0, (long long)q->f1);
    }
    nm_placement_free(&p);
    /* F32 (block 1): 32 over 3 workers = 10 + 11 + 11 */
    CHECK(init(&p, NM_PLACE_SPLIT, 3, 32, 1, &err) == 0, "%s", err.msg);
    CHECK(nm_placement_fill(&p, &err) == 0, "%s", err.msg);
    int64_t width[3] = {0};
    const nm_piece *pc = &p.pieces[(size_t)(2 * E) * 3]; /* layer 2, expert 0 */
    for (int i = 0; i < 3; i++) width[pc[i].worker] = pc[i].f1 - pc[i].f0;
    CHECK(width[0] + width[1] + width[2] == 32 && width[0] >= 10 && width[1] >= 10 && width[2] >= 10, "%lld %lld %lld",
          (long long)width[0], (long long)width[1], (long long)width[2]);
    nm_placement_free(&p);
}

static void test_split_impossible(void) {
    nm_placement p;
    nm_err err;
    /* one Q8_0 block per down row cannot go to two workers */
    CHECK(init(&p, NM_PLACE_SPLIT, 2, 32, 32, &err) == 0, "%s", err.msg);
    CHECK(nm_placement_fill(&p, &err) != 0, "split of 1 block over 2 workers accepted");
    CHECK(strstr(err.msg, "cannot be split between 2 workers") && strstr(err.msg, "at most 1 worker"), "%s", err.msg);
    nm_placement_free(&p);
    /* more workers than experts */
    CHECK(init(&p, NM_PLACE_EXPERTS, 9, 32, 32, &err) == 0, "%s", err.msg);
    CHECK(nm_placement_fill(&p, &err) != 0, "9 workers for 8 experts accepted");
    CHECK(strstr(err.msg, "8 experts per layer cannot be placed whole on 9 workers"), "%s", err.msg);
    nm_placement_free(&p);
}

static void test_experts_contiguous_and_rr(void) {
    nm_placement p;
    nm_err err;
    CHECK(init(&p, NM_PLACE_EXPERTS, 3, 32, 32, &err) == 0, "%s", err.msg);
    CHECK(nm_placement_fill(&p, &err) == 0 && nm_placement_validate(&p, &err) == 0, "%s", err.msg);
    int owner[E];
    for (int e = 0; e < E; e++) owner[e] = p.pieces[(size_t)(1 * E + e) * 3].worker;
    for (int e = 1; e < E; e++) CHECK(owner[e] >= owner[e - 1], "blocks not contiguous at expert %d", e);
    CHECK(owner[0] == 0 && owner[E - 1] == 2, "first/last owner %d %d", owner[0], owner[E - 1]);
    nm_placement_free(&p);
    CHECK(init(&p, NM_PLACE_EXPERTS_RR, 3, 32, 32, &err) == 0, "%s", err.msg);
    CHECK(nm_placement_fill(&p, &err) == 0 && nm_placement_validate(&p, &err) == 0, "%s", err.msg);
    for (int e = 0; e < E; e++)
        CHECK(p.pieces[(size_t)(3 * E + e) * 3].worker == e % 3, "expert %d on worker %d", e,
              p.pieces[(size_t)(3 * E + e) * 3].worker);
    nm_placement_free(&p);
}

/* A whole-expert map written by hand, then broken in each way. */
static void hand_map(nm_placement *p, int skip_l, int skip_e) {
    nm_err err;
    CHECK(init(p, NM_PLACE_EXPERTS, 2, 64, 32, &err) == 0, "%s", err.msg);
    for (int l = 1; l < L; l++)
        for (int e = 0; e < E; e++)
            if (l != skip_l || e != skip_e) CHECK(nm_placement_add(p, l, e, e & 1, 0, 64, &err) == 0, "%s", err.msg);
}

static void test_validator_missing_expert(void) {
    nm_placement p;
    nm_err err;
    hand_map(&p, 2, 5);
    CHECK(nm_placement_validate(&p, &err) != 0, "missing expert accepted");
    CHECK(strstr(err.msg, "layer 2 expert 5 is on no worker"), "%s", err.msg);
    nm_placement_free(&p);
}

static void test_validator_repeated_expert(void) {
    nm_placement p;
    nm_err err;
    hand_map(&p, -1, -1);
    CHECK(nm_placement_validate(&p, &err) == 0, "%s", err.msg);
    CHECK(nm_placement_add(&p, 3, 4, 1, 0, 64, &err) == 0, "%s", err.msg); /* expert 4 already on worker 0 */
    CHECK(nm_placement_validate(&p, &err) != 0, "repeated expert accepted");
    CHECK(strstr(err.msg, "layer 3 expert 4 is on two workers (0 and 1)"), "%s", err.msg);
    nm_placement_free(&p);
}

static void test_validator_partial_overlap_gap(void) {
    nm_placement p;
    nm_err err;
    /* overlap: [0,64) on worker 0 and [32,64) on worker 1 */
    hand_map(&p, 1, 2);
    CHECK(nm_placement_add(&p, 1, 2, 0, 0, 64, &err) == 0 && nm_placement_add(&p, 1, 2, 1, 32, 64, &err) == 0, "%s",
          err.msg);
    CHECK(nm_placement_validate(&p, &err) != 0, "overlap accepted");
    CHECK(strstr(err.msg, "layer 1 expert 2: ff rows [32, 64) are on two workers (0 and 1)"), "%s", err.msg);
    nm_placement_free(&p);
    /* gap: [0,32) only */
    hand_map(&p, 1, 2);
    CHECK(nm_placement_add(&p, 1, 2, 0, 0, 32, &err) == 0, "%s", err.msg);
    CHECK(nm_placement_validate(&p, &err) != 0, "gap accepted");
    CHECK(strstr(err.msg, "layer 1 expert 2: ff rows [32, 64) are on no worker"), "%s", err.msg);
    nm_placement_free(&p);
    /* two pieces of one expert on one worker */
    hand_map(&p, 1, 2);
    CHECK(nm_placement_add(&p, 1, 2, 0, 0, 32, &err) == 0 && nm_placement_add(&p, 1, 2, 0, 32, 64, &err) == 0, "%s",
          err.msg);
    CHECK(nm_placement_validate(&p, &err) != 0 && strstr(err.msg, "worker 0 holds two pieces"), "%s", err.msg);
    nm_placement_free(&p);
}

static void test_validator_bad_pieces(void) {
    nm_placement p;
    nm_err err;
    hand_map(&p, 1, 0);
    CHECK(nm_placement_add(&p, 1, 0, 0, 0, 16, &err) == 0 && nm_placement_add(&p, 1, 0, 1, 16, 64, &err) == 0, "%s",
          err.msg);
    CHECK(nm_placement_validate(&p, &err) != 0 && strstr(err.msg, "does not start and end on 32-column blocks"), "%s",
          err.msg);
    nm_placement_free(&p);
    hand_map(&p, 1, 0);
    CHECK(nm_placement_add(&p, 1, 0, 5, 0, 64, &err) == 0, "%s", err.msg);
    CHECK(nm_placement_validate(&p, &err) != 0 && strstr(err.msg, "worker 5 does not exist (2 workers)"), "%s",
          err.msg);
    nm_placement_free(&p);
    hand_map(&p, -1, -1);
    CHECK(nm_placement_add(&p, 0, 3, 0, 0, 64, &err) == 0, "%s", err.msg); /* layer 0 is dense */
    CHECK(nm_placement_validate(&p, &err) != 0 && strstr(err.msg, "layer 0 is not a MoE layer"), "%s", err.msg);
    nm_placement_free(&p);
    CHECK(init(&p, NM_PLACE_EXPERTS, 2, 64, 32, &err) == 0, "%s", err.msg);
    CHECK(nm_placement_add(&p, 7, 0, 0, 0, 64, &err) != 0 && strstr(err.msg, "outside the model"), "%s", err.msg);
    for (int l = 1; l < L; l++) /* all on worker 0: worker 1 idle */
        for (int e = 0; e < E; e++) nm_placement_add(&p, l, e, 0, 0, 64, &err);
    CHECK(nm_placement_validate(&p, &err) != 0 && strstr(err.msg, "worker 1 holds no expert weights"), "%s", err.msg);
    nm_placement_free(&p);
}

static void test_hash(void) {
    nm_placement a, b;
    nm_err err;
    CHECK(init(&a, NM_PLACE_SPLIT, 2, 64, 32, &err) == 0 && nm_placement_fill(&a, &err) == 0, "%s", err.msg);
    /* same pieces added in the opposite worker order: same hash */
    CHECK(init(&b, NM_PLACE_SPLIT, 2, 64, 32, &err) == 0, "%s", err.msg);
    for (int l = 1; l < L; l++)
        for (int e = 0; e < E; e++) {
            CHECK(nm_placement_add(&b, l, e, 1, 32, 64, &err) == 0 && nm_placement_add(&b, l, e, 0, 0, 32, &err) == 0,
                  "layer %d expert %d: %s", l, e, err.msg);
        }
    CHECK(nm_placement_hash(&a) == nm_placement_hash(&b), "order changed the hash");
    nm_placement_free(&b);
    CHECK(init(&b, NM_PLACE_EXPERTS, 2, 64, 32, &err) == 0 && nm_placement_fill(&b, &err) == 0, "%s", err.msg);
    CHECK(nm_placement_hash(&a) != nm_placement_hash(&b), "split and experts hash equal");
    nm_placement_free(&a);
    nm_placement_free(&b);
}

static void test_parse_kind(void) {
    CHECK(nm_placement_parse_kind("split") == NM_PLACE_SPLIT, "split");
    CHECK(nm_placement_parse_kind("experts") == NM_PLACE_EXPERTS, "experts");
    CHECK(nm_placement_parse_kind("experts-rr") == NM_PLACE_EXPERTS_RR, "experts-rr");
    CHECK(nm_placement_parse_kind("balanced") == 0 && nm_placement_parse_kind(NULL) == 0, "unknown accepted");
}

static int parse(nm_placement *p, const char *text, int n_workers, nm_err *err) {
    int64_t al[L] = {32, 32, 32, 32};
    return nm_placement_parse_map(p, text, strlen(text), "m.txt", n_workers, L, IS_MOE, al, E, 64, err);
}

static void test_map_file(void) {
    nm_placement p, q;
    nm_err err = {{0}};
    /* whole experts as "layer L:" lines give the same map (and hash) as the
     * experts family, apart from the kind */
    const char *txt = "# blocks\nlayer 1: 0 0 0 0 1 1 1 1\nlayer 2: 0 0 0 0 1 1 1 1   # comment\n\n"
                      "3 0 0 0 -\n3 1 0 0 -\n3 2 0 0 -\n3 3 0 0 -\n3 4 1 0 -\n3 5 1 0 -\n3 6 1 0 -\n3 7 1 0 -\n";
    CHECK(parse(&p, txt, 0, &err) == 0, "%s", err.msg);
    CHECK(p.n_workers == 2 && p.kind == NM_PLACE_MAP, "workers %d kind %d", p.n_workers, p.kind);
    CHECK(init(&q, NM_PLACE_EXPERTS, 2, 64, 32, &err) == 0 && nm_placement_fill(&q, &err) == 0, "%s", err.msg);
    q.kind = NM_PLACE_MAP;
    CHECK(nm_placement_hash(&p) == nm_placement_hash(&q), "map differs from contiguous blocks");
    /* write + parse round trip */
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    CHECK(f && nm_placement_write_map(&p, f) == 0, "write");
    fclose(f);
    nm_placement r;
    CHECK(parse(&r, buf, 2, &err) == 0, "%s\n%s", err.msg, buf);
    CHECK(nm_placement_hash(&r) == nm_placement_hash(&p), "round trip changed the map");
    nm_placement_free(&r);
    free(buf);
    nm_placement_free(&p);
    nm_placement_free(&q);
    /* pieces: expert 1 of layer 3 split at 32 */
    const char *sp = "workers 2\nlayer 1: 0 1 0 1 0 1 0 1\nlayer 2: 1 0 1 0 1 0 1 0\nlayer 3: 0 1 0 1 0 1 0 1\n";
    CHECK(parse(&p, sp, 2, &err) == 0, "%s", err.msg);
    nm_placement_free(&p);
    const char *pieces = "layer 1: 0 1 0 1 0 1 0 1\nlayer 2: 1 0 1 0 1 0 1 0\n3 0 0 0 -\n3 1 1 0 32\n3 1 0 32 -\n"
                         "3 2 1 0 -\n3 3 1 0 -\n3 4 1 0 -\n3 5 1 0 -\n3 6 1 0 -\n3 7 1 0 -\n";
    CHECK(parse(&p, pieces, 2, &err) == 0, "%s", err.msg);
    CHECK(p.n_pieces[3 * E + 1] == 2, "pieces %d", p.n_pieces[3 * E + 1]);
    nm_placement_free(&p);
    /* errors name file:line */
    static const struct {
        const char *text, *msg;
        int n;
    } bad[] = {
        {"layer 1: 0 1 0 1 0 1 0\n", "m.txt:1: layer 1 lists 7 experts, the model has 8: expert 7 is missing", 0},
        {"layer 1: 0 1 0 1 0 1 0 1 0\n", "m.txt:1: layer 1 lists more than 8 experts", 0},
        {"workers 2\nlayer 1: 0 1 0 1 0 1 0 3\n", "m.txt:2: layer 1 expert 7: worker 3 does not exist (2 workers)", 0},
        {"layer 1: 0 1 0 1 0 1 0 1\n", "m.txt:1: layer 1 expert 1: worker 1 does not exist (1 workers)", 1},
        {"workers 3\n", "m.txt:1: the map is for 3 workers, 2 were asked for", 2},
        {"layer 0: 0 0 0 0 0 0 0 0\n", "m.txt:1: layer 0 is not a MoE layer", 0},
        {"layer 9: 0 0 0 0 0 0 0 0\n", "m.txt:1: layer 9 does not exist", 0},
        {"layer 1: 0 0 0 0 0 0 0 0\nlayer 2: 0 0 0 0 0 0 0 0\n", "m.txt: MoE layer 3 is not in the map", 0},
        {"3 1 0 0 -\nlayer 3: 0 0 0 0 0 0 0 0\n", "m.txt:2: layer 3 expert 1 is placed twice (first at line 1)", 0},
        {"3 1 0 0 40\n3 1 1 32 -\n", "m.txt:2: layer 3 expert 1: ff rows [32, 64) overlap [0, 40) on worker 0 (line 1)",
         0},
        {"3 1 0 0\n", "m.txt:1: 4 fields, expected 5", 0},
        {"3 1 0 0 - 7\n", "m.txt:1: too many fields", 0},
        {"3 1 0 0 65\n", "m.txt:1: layer 3 expert 1: ff range [0, 65) is empty or outside [0, 64)", 0},
        {"layer 1: 0 0 0 0 0 0 0 0\nlayer 2: 0 0 0 0 0 0 0 0\n3 0 0 0 -\n", "m.txt: layer 3 expert 1 is missing", 0},
        {"layer 1: 0 0 0 0 0 0 0 0\nlayer 2: 0 0 0 0 0 0 0 0\nlayer 3: 0 0 0 0 0 0 0 0\n",
         "m.txt: placement: worker 1 holds no expert weights", 2},
        {"layer 1: 0 0 0 0 0 0 0 0\nlayer 2: 0 0 0 0 0 0 0 0\nlayer 3: 0 0 0 0 0 0 0 0\n3 0 1 0 -\n",
         "m.txt:4: layer 3 expert 0 is placed twice (first at line 3)", 2},
        {"layer 1: 0 0 0 0 0 0 0 0\nlayer 2: 0 0 0 0 0 0 0 0\n3 0 0 0 16\n3 0 1 16 -\n3 1 0 0 -\n3 2 0 0 -\n"
         "3 3 0 0 -\n3 4 0 0 -\n3 5 0 0 -\n3 6 0 0 -\n3 7 0 0 -\n",
         "does not start and end on 32-column blocks", 2},
        {"workers 2\nworkers 2\n", "m.txt:2: \"workers\" must come once", 0},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err.msg[0] = 0;
        int rc = parse(&p, bad[i].text, bad[i].n, &err);
        CHECK(rc == -1 && strstr(err.msg, bad[i].msg), "case %zu: rc %d, got '%s', want '%s'", i, rc, err.msg,
              bad[i].msg);
        if (!rc) nm_placement_free(&p);
    }
    /* a file that is not there */
    CHECK(nm_placement_load_map(&p, "/nonexistent/map.txt", 0, L, IS_MOE, NULL, E, 64, &err) == -1 &&
              strstr(err.msg, "/nonexistent/map.txt"), "%s", err.msg);
}

int main(int argc, char **argv) {
    (void)argc;
    check_init(argv[0]);
    RUN(test_families_valid);
    RUN(test_split_balanced_and_aligned);
    RUN(test_split_impossible);
    RUN(test_experts_contiguous_and_rr);
    RUN(test_validator_missing_expert);
    RUN(test_validator_repeated_expert);
    RUN(test_validator_partial_overlap_gap);
    RUN(test_validator_bad_pieces);
    RUN(test_hash);
    RUN(test_parse_kind);
    RUN(test_map_file);
    return check_summary();
}
