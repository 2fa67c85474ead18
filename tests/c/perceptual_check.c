/*
 * The perceptual-loss C ABI on the CPU backend: loads the weights file given
 * as argv[1] (VGG16, written by tests/c_abi.rs), computes the default loss
 * and its gradient for deterministic 1x3x16x16 images, prints the loss with
 * full precision and checks the error paths. Exits 0 when all checks pass.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "check.h"

enum { N = 1, C = 3, H = 16, W = 16, COUNT = N * C * H * W };

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s weights.safetensors\n", argv[0]);
        return 2;
    }
    pl_context *ctx = NULL;
    pl_vgg *vgg = NULL;
    pl_perceptual *loss = NULL;
    CHECK(pl_context_create(PL_DEVICE_CPU, 0, NULL, &ctx) == PL_OK, "context");
    CHECK(pl_vgg_load(ctx, argv[1], PL_VGG16, PL_F32, &vgg) == PL_OK, "load");
    CHECK(pl_perceptual_create(vgg, NULL, &loss) == PL_OK, "create with defaults");
    pl_vgg_destroy(vgg); /* the loss keeps the weights alive */

    /* The same images tests/c_abi.rs feeds its oracle. */
    static float pred[COUNT], target[COUNT], grad[COUNT];
    for (int i = 0; i < COUNT; i++) {
        pred[i] = (float)((i * 37) % 101) / 101.0f;
        target[i] = (float)((i * 53) % 97) / 97.0f;
    }
    float value = -1.0f;
    pl_status st = pl_perceptual_loss(loss, pred, target, PL_F32, N, C, H, W, &value, grad);
    CHECK(st == PL_OK, "loss status %d", st);
    int finite = 1;
    for (int i = 0; i < COUNT; i++) finite &= isfinite(grad[i]) != 0;
    CHECK(finite, "gradient is finite");
    printf("loss %.9g\n", value);

    /* A config by names: relu2_2 and relu3_3, MAE, ImageNet, weight 2. */
    const char *names[] = {"relu2_2", "relu3_3"};
    const float weights[] = {1.0f, 0.5f};
    pl_perceptual_config cfg = {0};
    cfg.tap_names = names;
    cfg.num_taps = 2;
    cfg.tap_weights = weights;
    cfg.num_tap_weights = 2;
    cfg.criterion = PL_MAE;
    cfg.input_norm = PL_NORM_IMAGENET;
    cfg.weight = 2.0f;
    cfg.memory_budget_bytes = (size_t)1 << 30; /* chunks CUDA calls only */
    pl_perceptual *named = NULL;
    CHECK(pl_perceptual_create(NULL, &cfg, &named) == PL_ERR_INVALID_ARGUMENT, "NULL vgg");
    pl_vgg *again = NULL;
    CHECK(pl_vgg_load(ctx, argv[1], PL_VGG16, PL_F32, &again) == PL_OK, "reload");
    CHECK(pl_perceptual_create(again, &cfg, &named) == PL_OK, "create by names");
    CHECK(pl_perceptual_loss(named, pred, target, PL_F32, N, C, H, W, &value, NULL) == PL_OK, "named loss");
    printf("named %.9g\n", value);

    /* Errors. */
    const int32_t deep[] = {3, 99};
    pl_perceptual_config bad = {0};
    bad.taps = deep;
    bad.num_taps = 2;
    pl_perceptual *nope = NULL;
    CHECK(pl_perceptual_create(again, &bad, &nope) == PL_ERR_INVALID_ARGUMENT && nope == NULL, "tap 99");
    bad.tap_names = names;
    CHECK(pl_perceptual_create(again, &bad, &nope) == PL_ERR_INVALID_ARGUMENT, "taps and names");
    pl_perceptual_config counts = {0};
    counts.tap_weights = weights;
    counts.num_tap_weights = 2;  /* the 4 default taps */
    CHECK(pl_perceptual_create(again, &counts, &nope) == PL_ERR_INVALID_ARGUMENT && nope == NULL, "2 weights, 4 taps");
    CHECK(strstr(pl_last_error(), "4 taps but 2 tap weights") != NULL, "message gives both counts");
    const float four[] = {1.0f, 1.0f, 1.0f, 2.0f};
    counts.tap_weights = four;
    counts.num_tap_weights = 4;
    CHECK(pl_perceptual_create(again, &counts, &nope) == PL_OK, "weights for the default taps");
    pl_perceptual_destroy(nope);
    counts.tap_weights = NULL;
    CHECK(pl_perceptual_create(again, &counts, &nope) == PL_ERR_INVALID_ARGUMENT, "a count without weights");
    CHECK(pl_vgg_load(ctx, "/nonexistent.safetensors", PL_VGG16, PL_F32, &vgg) == PL_ERR_IO, "missing file");
    CHECK(pl_vgg_load(ctx, argv[1], 7, PL_F32, &vgg) == PL_ERR_INVALID_ARGUMENT, "bad arch");
    CHECK(pl_vgg_load(ctx, argv[1], PL_VGG19, PL_F32, &vgg) == PL_ERR_INVALID_WEIGHTS, "VGG16 file as VGG19");
    CHECK(strstr(pl_last_error(), "features.") != NULL, "message names the tensor");
    CHECK(pl_perceptual_loss(loss, pred, target, PL_F32, N, 2, H, W, &value, NULL) == PL_ERR_INVALID_SHAPE, "2 channels");
    CHECK(pl_perceptual_loss(loss, pred, NULL, PL_F32, N, C, H, W, &value, NULL) == PL_ERR_INVALID_ARGUMENT, "NULL target");
    CHECK(pl_perceptual_loss(loss, pred, target, PL_F32, N, C, H, W, &value, (void *)target) == PL_ERR_INVALID_ARGUMENT,
          "grad aliases target");

    pl_perceptual_destroy(named);
    pl_perceptual_destroy(loss);
    pl_perceptual_destroy(NULL);
    pl_vgg_destroy(again);
    pl_context_destroy(ctx);
    return failures ? 1 : 0;
}
