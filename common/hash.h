/* hash.h - FNV-1a (64-bit): the cheap, stable hash both sides of the worker
 * protocol compute over the same bytes (model identity, placement maps) and
 * compare at registration. Not for anything adversarial. */
#ifndef NUMOE_COMMON_HASH_H
#define NUMOE_COMMON_HASH_H

#include <stddef.h>
#include <stdint.h>

#define NM_FNV_OFFSET 0xcbf29ce484222325ull

/* h extended by n bytes of data (start with NM_FNV_OFFSET). */
uint64_t nm_fnv1a64(uint64_t h, const void *data, size_t n);

#endif
