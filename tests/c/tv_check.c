/*
 * Exercises the C ABI from C on the CPU backend: the article TV loss of a
 * hand-derived 3x3 example, its gradient, and the error paths. Prints "ok"
 * and exits 0 when every check passes; tests/c_abi.rs builds and runs it.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "check.h"

int main(void) {
    pl_context *ctx = NULL;
    CHECK(pl_context_create(PL_DEVICE_CPU, 0, NULL, &ctx) == PL_OK, "create");
    CHECK(strlen(pl_version()) > 0, "version");

    /* dh: 6 9 12 15 18 21 (squares 1251), dw: 1 2 4 5 7 8 (159), 6 each:
     * loss = 2 * (1251 + 159) / 6 = 470; dL/dx(0,0) = (4/6) * -(6 + 1). */
    float x[9] = {1, 2, 4, 7, 11, 16, 22, 29, 37};
    float grad[9];
    float loss = -1.0f;
    pl_status st = pl_tv_loss(ctx, x, PL_F32, 1, 1, 3, 3, PL_TV_ARTICLE, 1.0f, &loss, grad);
    CHECK(st == PL_OK, "tv status %d", st);
    CHECK(loss == 470.0f, "loss %f", loss);
    CHECK(fabsf(grad[0] - (-7.0f * 4.0f / 6.0f)) < 1e-5f, "grad[0] %f", grad[0]);

    /* Loss only: grad_out NULL. Weight scales the loss. */
    st = pl_tv_loss(ctx, x, PL_F32, 1, 1, 3, 3, PL_TV_ARTICLE, 0.5f, &loss, NULL);
    CHECK(st == PL_OK && loss == 235.0f, "weighted loss %f", loss);

    /* L1 sum: |dh| sums to 81, |dw| to 27. */
    st = pl_tv_loss(ctx, x, PL_F32, 1, 1, 3, 3, PL_TV_L1_SUM, 1.0f, &loss, NULL);
    CHECK(st == PL_OK && loss == 108.0f, "l1 loss %f", loss);

    /* Errors: status, message, outputs untouched. */
    loss = -1.0f;
    CHECK(pl_tv_loss(NULL, x, PL_F32, 1, 1, 3, 3, PL_TV_ARTICLE, 1.0f, &loss, NULL) == PL_ERR_INVALID_ARGUMENT, "NULL ctx");
    CHECK(strstr(pl_last_error(), "ctx") != NULL, "message names ctx");
    CHECK(pl_tv_loss(ctx, NULL, PL_F32, 1, 1, 3, 3, PL_TV_ARTICLE, 1.0f, &loss, NULL) == PL_ERR_INVALID_ARGUMENT, "NULL x");
    CHECK(pl_tv_loss(ctx, x, PL_F32, 1, 1, 1, 9, PL_TV_ARTICLE, 1.0f, &loss, NULL) == PL_ERR_INVALID_SHAPE, "H = 1");
    CHECK(pl_tv_loss(ctx, x, PL_F32, -1, 1, 3, 3, PL_TV_ARTICLE, 1.0f, &loss, NULL) == PL_ERR_INVALID_SHAPE, "negative n");
    CHECK(pl_tv_loss(ctx, x, 7, 1, 1, 3, 3, PL_TV_ARTICLE, 1.0f, &loss, NULL) == PL_ERR_INVALID_ARGUMENT, "bad dtype");
    CHECK(pl_tv_loss(ctx, x, PL_F32, 1, 1, 3, 3, 99, 1.0f, &loss, NULL) == PL_ERR_INVALID_ARGUMENT, "bad variant");
    CHECK(pl_tv_loss(ctx, (const char *)x + 1, PL_F32, 1, 1, 2, 2, PL_TV_ARTICLE, 1.0f, &loss, NULL) == PL_ERR_INVALID_ARGUMENT, "misaligned");
    CHECK(pl_tv_loss(ctx, x, PL_F32, 1, 1, 3, 3, PL_TV_ARTICLE, 1.0f, &loss, x) == PL_ERR_INVALID_ARGUMENT, "grad aliases x");
    CHECK(loss == -1.0f, "loss written on error: %f", loss);

    pl_context *cuda = NULL;
    CHECK(pl_context_create(PL_DEVICE_CUDA, -1, NULL, &cuda) != PL_OK && cuda == NULL, "negative ordinal");
    CHECK(pl_context_create(5, 0, NULL, &cuda) == PL_ERR_INVALID_ARGUMENT, "bad kind");
    CHECK(pl_context_create(PL_DEVICE_CPU, 0, NULL, NULL) == PL_ERR_INVALID_ARGUMENT, "NULL out");
    CHECK(pl_context_synchronize(ctx) == PL_OK, "synchronize");
    pl_context_destroy(ctx);
    pl_context_destroy(NULL);

    if (failures) return 1;
    printf("ok\n");
    return 0;
}
