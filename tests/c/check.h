/* CHECK(cond, fmt, ...): reports a failed check with the library's last
 * error message and counts it; main() returns nonzero when any failed. */
#ifndef PL_TEST_CHECK_H
#define PL_TEST_CHECK_H

#include <stdio.h>

#include "perceptual_loss.h"

static int failures = 0;

#define CHECK(cond, ...)                                              \
    do {                                                              \
        if (!(cond)) {                                                \
            fprintf(stderr, "FAIL line %d: ", __LINE__);              \
            fprintf(stderr, __VA_ARGS__);                             \
            fprintf(stderr, " (last error: %s)\n", pl_last_error()); \
            failures++;                                               \
        }                                                             \
    } while (0)

#endif
