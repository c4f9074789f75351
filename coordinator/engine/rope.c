#include "coordinator/engine/rope.h"

#include <math.h>
#include <stdlib.h>

/* The pair index at which a wavelength completes `rot` rotations over the
 * original context: d * ln(n_ctx_orig / (2 pi rot)) / (2 ln base). */
static double corr_dim(int n_dims, int64_t n_ctx_orig, double rot, double base) {
    return n_dims * log((double)n_ctx_orig / (rot * 2.0 * M_PI)) / (2.0 * log(base));
}

int nm_rope_init(nm_rope *r, int n_dims, float base, float freq_scale, float ext_factor, int64_t n_ctx_orig) {
    r->n_dims = n_dims;
    r->inv_freq = malloc((size_t)(n_dims / 2) * sizeof *r->inv_freq);
    if (!r->inv_freq) return -1;
    double lo = 0, hi = 0;
    if (ext_factor != 0.0f) {
        lo = floor(corr_dim(n_dims, n_ctx_orig, 32.0, base));
        hi = ceil(corr_dim(n_dims, n_ctx_orig, 1.0, base));
        if (lo < 0) lo = 0;
        if (hi > n_dims - 1) hi = n_dims - 1;
    }
    for (int i = 0; i < n_dims / 2; i++) {
        /* computed in float like HF: base ** (arange(0, d, 2) / d) in float32 */
        double theta = 1.0 / pow((double)base, (double)(2 * i) / (double)n_dims);
        double mix = 0.0;
        if (ext_factor != 0.0f) {
            double span = hi - lo > 0.001 ? hi - lo : 0.001;
            double y = ((double)i - lo) / span;
            y = y < 0 ? 0 : y > 1 ? 1 : y;
            mix = (1.0 - y) * ext_factor;
        }
        r->inv_freq[i] = (float)(freq_scale * theta * (1.0 - mix) + theta * mix);
    }
    return 0;
}

void nm_rope_free(nm_rope *r) {
    free(r->inv_freq);
    r->inv_freq = NULL;
}

void nm_rope_apply(const nm_rope *r, float *x, int64_t pos) {
    for (int i = 0; i < r->n_dims / 2; i++) {
        float ang = (float)pos * r->inv_freq[i];
        float c = cosf(ang), s = sinf(ang);
        float x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = x0 * c - x1 * s;
        x[2 * i + 1] = x0 * s + x1 * c;
    }
}
