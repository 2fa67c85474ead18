/*
 * Exercises the C ABI from C on the CPU backend: the article TV loss of a
 * hand-derived 3x3 example, its gradient, per-image values, gradient
 * accumulation, the feature distance, the versions, and the error paths.
 * Prints "ok" and exits 0 when every check passes; tests/c_abi.rs builds
 * and runs it.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "check.h"

int main(void) {
    CHECK(pl_abi_version() == PL_ABI_VERSION, "ABI version %u", pl_abi_version());
    pl_context *ctx = NULL;
    CHECK(pl_context_create(PL_DEVICE_CPU, 0, NULL, &ctx) == PL_OK, "create");
    CHECK(strlen(pl_version()) > 0, "version");

    /* dh: 6 9 12 15 18 21 (squares 1251), dw: 1 2 4 5 7 8 (159), 6 each:
     * loss = 2 * (1251 + 159) / 6 = 470; dL/dx(0,0) = (4/6) * -(6 + 1). */
    float x[9] = {1, 2, 4, 7, 11, 16, 22, 29, 37};
    float grad[9];
    float loss = -1.0f, per_image = -1.0f;
    pl_outputs out;
    CHECK(pl_outputs_init(&out) == PL_OK && out.struct_size == sizeof out, "outputs init");
    out.loss = &loss;
    out.grad = grad;
    out.per_sample = &per_image;
    pl_status st = pl_tv_loss(ctx, NULL, x, PL_F32, 1, 1, 3, 3, &out);
    CHECK(st == PL_OK, "tv status %d", st);
    CHECK(loss == 470.0f && per_image == 470.0f, "loss %f, per image %f", loss, per_image);
    CHECK(fabsf(grad[0] - (-7.0f * 4.0f / 6.0f)) < 1e-5f, "grad[0] %f", grad[0]);

    /* Accumulating: grad = 1 * grad + dL/dx doubles it. */
    out.beta = 1.0f;
    CHECK(pl_tv_loss(ctx, NULL, x, PL_F32, 1, 1, 3, 3, &out) == PL_OK, "accumulate");
    CHECK(fabsf(grad[0] - (-14.0f * 4.0f / 6.0f)) < 1e-5f, "accumulated grad[0] %f", grad[0]);

    /* Loss only, weight 0.5 (and 0 is a weight like any other). */
    pl_outputs loss_only;
    pl_outputs_init(&loss_only);
    loss_only.loss = &loss;
    pl_tv_config cfg;
    CHECK(pl_tv_config_init(&cfg) == PL_OK && cfg.weight == 1.0f && cfg.variant == PL_TV_ARTICLE, "tv init");
    cfg.weight = 0.5f;
    st = pl_tv_loss(ctx, &cfg, x, PL_F32, 1, 1, 3, 3, &loss_only);
    CHECK(st == PL_OK && loss == 235.0f, "weighted loss %f", loss);
    cfg.weight = 0.0f;
    st = pl_tv_loss(ctx, &cfg, x, PL_F32, 1, 1, 3, 3, &loss_only);
    CHECK(st == PL_OK && loss == 0.0f, "weight 0 gives 0, not the default: %f", loss);

    /* L1 summed over the batch: |dh| sums to 81, |dw| to 27. */
    pl_tv_config_init(&cfg);
    cfg.variant = PL_TV_L1;
    cfg.reduction = PL_REDUCTION_SUM;
    st = pl_tv_loss(ctx, &cfg, x, PL_F32, 1, 1, 3, 3, &loss_only);
    CHECK(st == PL_OK && loss == 108.0f, "l1 loss %f", loss);
    /* Isotropic with eps: one 2x2 image [0 3; 4 0] has one term sqrt(9 + 16 + 24) = 7. */
    float iso[4] = {0, 3, 4, 0};
    pl_tv_config_init(&cfg);
    cfg.variant = PL_TV_ISOTROPIC;
    cfg.eps = 24.0f;
    st = pl_tv_loss(ctx, &cfg, iso, PL_F32, 1, 1, 2, 2, &loss_only);
    CHECK(st == PL_OK && loss == 7.0f, "isotropic loss %f", loss);

    /* Feature MAE of two images against zero: means 2 and 4, loss 3. */
    float a[4] = {1, -3, 4, -4}, b[4] = {0, 0, 0, 0}, per[2], ga[4];
    pl_feature_config fc;
    CHECK(pl_feature_config_init(&fc) == PL_OK && fc.criterion == PL_MSE, "feature init");
    fc.criterion = PL_MAE;
    pl_outputs_init(&out);
    out.loss = &loss;
    out.grad = ga;
    out.per_sample = per;
    st = pl_feature_loss(ctx, &fc, a, b, PL_F32, 2, 1, 1, 2, &out);
    CHECK(st == PL_OK && loss == 3.0f && per[0] == 2.0f && per[1] == 4.0f, "mae %f (%f, %f)", loss, per[0], per[1]);
    CHECK(ga[0] == 0.25f && ga[1] == -0.25f, "mae grad %f %f", ga[0], ga[1]);

    /* Errors: status, message, outputs untouched. */
    loss = -1.0f;
    CHECK(pl_tv_loss(NULL, NULL, x, PL_F32, 1, 1, 3, 3, &loss_only) == PL_ERR_INVALID_ARGUMENT, "NULL ctx");
    CHECK(strstr(pl_last_error(), "ctx (a pl_context handle) is NULL") != NULL, "message names ctx");
    CHECK(pl_tv_loss(ctx, NULL, NULL, PL_F32, 1, 1, 3, 3, &loss_only) == PL_ERR_INVALID_ARGUMENT, "NULL x");
    CHECK(pl_tv_loss(ctx, NULL, x, PL_F32, 1, 1, 3, 3, NULL) == PL_ERR_INVALID_ARGUMENT, "NULL out");
    CHECK(pl_tv_loss(ctx, NULL, x, PL_F32, 1, 1, 1, 9, &loss_only) == PL_ERR_INVALID_SHAPE, "H = 1");
    CHECK(pl_tv_loss(ctx, NULL, x, PL_F32, -1, 1, 3, 3, &loss_only) == PL_ERR_INVALID_SHAPE, "negative n");
    CHECK(pl_tv_loss(ctx, NULL, x, 7, 1, 1, 3, 3, &loss_only) == PL_ERR_INVALID_ARGUMENT, "bad dtype");
    pl_tv_config_init(&cfg);
    cfg.variant = 99;
    CHECK(pl_tv_loss(ctx, &cfg, x, PL_F32, 1, 1, 3, 3, &loss_only) == PL_ERR_INVALID_ARGUMENT, "bad variant");
    pl_tv_config_init(&cfg);
    cfg.reduction = PL_REDUCTION_SUM;
    CHECK(pl_tv_loss(ctx, &cfg, x, PL_F32, 1, 1, 3, 3, &loss_only) == PL_ERR_INVALID_ARGUMENT, "article sum");
    pl_tv_config_init(&cfg);
    cfg.struct_size = 3;
    CHECK(pl_tv_loss(ctx, &cfg, x, PL_F32, 1, 1, 3, 3, &loss_only) == PL_ERR_INVALID_ARGUMENT, "bad struct_size");
    CHECK(strstr(pl_last_error(), "struct_size is 3") != NULL, "message names the size");
    CHECK(pl_tv_loss(ctx, NULL, (const char *)x + 1, PL_F32, 1, 1, 2, 2, &loss_only) == PL_ERR_INVALID_ARGUMENT,
          "misaligned");
    out.loss = &loss;
    out.grad = x;
    out.per_sample = NULL;
    CHECK(pl_tv_loss(ctx, NULL, x, PL_F32, 1, 1, 3, 3, &out) == PL_ERR_INVALID_ARGUMENT, "grad aliases x");
    CHECK(loss == -1.0f, "loss written on error: %f", loss);
    CHECK(pl_outputs_init(NULL) == PL_ERR_INVALID_ARGUMENT, "init NULL");

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
