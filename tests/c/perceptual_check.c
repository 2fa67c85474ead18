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
    CHECK(pl_vgg_load(ctx, argv[1], NULL, &vgg) == PL_OK, "load");
    CHECK(pl_perceptual_create(vgg, NULL, &loss) == PL_OK, "create with defaults");
    pl_vgg_destroy(vgg); /* the loss keeps the weights alive */

    /* The same images tests/c_abi.rs feeds its oracle. */
    static float pred[COUNT], target[COUNT], grad[COUNT];
    for (int i = 0; i < COUNT; i++) {
        pred[i] = (float)((i * 37) % 101) / 101.0f;
        target[i] = (float)((i * 53) % 97) / 97.0f;
    }
    float value = -1.0f, per_image = -1.0f;
    pl_outputs out;
    pl_outputs_init(&out);
    out.loss = &value;
    out.grad = grad;
    out.per_sample = &per_image;
    pl_status st = pl_perceptual_loss(loss, pred, target, PL_F32, N, C, H, W, &out);
    CHECK(st == PL_OK, "loss status %d", st);
    CHECK(per_image == value, "one image: its loss %g is the loss %g", per_image, value);
    int finite = 1;
    for (int i = 0; i < COUNT; i++) finite &= isfinite(grad[i]) != 0;
    CHECK(finite, "gradient is finite");
    printf("loss %.9g\n", value);
    pl_outputs loss_only;
    pl_outputs_init(&loss_only);
    loss_only.loss = &value;

    /* A config by names: relu2_2 and relu3_3, MAE, ImageNet, weight 2. */
    const char *names[] = {"relu2_2", "relu3_3"};
    const float weights[] = {1.0f, 0.5f};
    pl_perceptual_config cfg;
    CHECK(pl_perceptual_config_init(&cfg) == PL_OK && cfg.num_taps == 4 && cfg.taps[3] == 22, "config init");
    cfg.taps = NULL;
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
    pl_vgg_options up_to_relu3_3;
    CHECK(pl_vgg_options_init(&up_to_relu3_3) == PL_OK && up_to_relu3_3.depth == -1, "options init");
    up_to_relu3_3.depth = 15;
    pl_vgg *shallow = NULL;
    CHECK(pl_vgg_load(ctx, argv[1], &up_to_relu3_3, &shallow) == PL_OK, "load to relu3_3");
    CHECK(pl_perceptual_create(shallow, &cfg, &named) == PL_OK, "create by names");
    CHECK(pl_perceptual_loss(named, pred, target, PL_F32, N, C, H, W, &loss_only) == PL_OK, "named loss");
    printf("named %.9g\n", value);

    /* Perceptual (relu2_2) + style (relu1_2, relu2_2 Grams, weight 3) in
     * one call, both parts returned. */
    const char *style_names[] = {"relu1_2", "relu2_2"};
    pl_perceptual_config both;
    pl_perceptual_config_init(&both);
    CHECK(both.num_style_taps == 0 && both.style_weight == 1.0f && both.style_criterion == PL_MSE,
          "no style terms by default");
    both.taps = NULL;
    both.tap_names = names;
    both.num_taps = 1;
    both.style_tap_names = style_names;
    both.num_style_taps = 2;
    both.style_weight = 3.0f;
    pl_perceptual *combined = NULL;
    CHECK(pl_perceptual_create(shallow, &both, &combined) == PL_OK, "create with style");
    float parts[2] = {-1.0f, -1.0f};
    pl_outputs with_parts;
    pl_outputs_init(&with_parts);
    with_parts.loss = &value;
    with_parts.parts = parts;
    CHECK(pl_perceptual_loss(combined, pred, target, PL_F32, N, C, H, W, &with_parts) == PL_OK, "style loss");
    CHECK(parts[0] > 0.0f && parts[1] > 0.0f && fabsf(parts[0] + parts[1] - value) <= 1e-6f * value,
          "parts %g + %g sum to the loss %g", parts[0], parts[1], value);
    printf("style %.9g %.9g\n", parts[0], parts[1]);
    /* A caller built before parts existed: its smaller pl_outputs is read
     * up to where it ends. */
    with_parts.struct_size = offsetof(pl_outputs, parts);
    parts[0] = -1.0f;
    CHECK(pl_perceptual_loss(combined, pred, target, PL_F32, N, C, H, W, &with_parts) == PL_OK, "v1 outputs");
    CHECK(parts[0] == -1.0f, "a v1 pl_outputs has no parts pointer");
    const float with_style = value;
    /* ... and its smaller config gets no style terms. */
    both.struct_size = offsetof(pl_perceptual_config, style_taps);
    pl_perceptual *old = NULL;
    CHECK(pl_perceptual_create(shallow, &both, &old) == PL_OK, "v1 config");
    with_parts.struct_size = sizeof(pl_outputs);
    CHECK(pl_perceptual_loss(old, pred, target, PL_F32, N, C, H, W, &with_parts) == PL_OK && parts[1] == 0.0f,
          "a v1 config has no style part");
    pl_perceptual_destroy(old);
    /* A caller built against the second version (style, no cuda_graphs)
     * gets the same loss. */
    both.struct_size = offsetof(pl_perceptual_config, cuda_graphs);
    pl_perceptual *v2 = NULL;
    float v2_value = -1.0f;
    with_parts.loss = &v2_value;
    CHECK(pl_perceptual_create(shallow, &both, &v2) == PL_OK, "v2 config");
    CHECK(pl_perceptual_loss(v2, pred, target, PL_F32, N, C, H, W, &with_parts) == PL_OK && v2_value == with_style,
          "a v2 config gives the same loss (%g vs %g)", v2_value, with_style);
    with_parts.loss = &value;
    pl_perceptual_destroy(v2);
    CHECK(both.cuda_graphs == 0 && both.reserved == 0, "graphs off by default");
    both.struct_size = sizeof both;
    both.reserved = 1;
    CHECK(pl_perceptual_create(shallow, &both, &v2) == PL_ERR_INVALID_ARGUMENT, "reserved must be 0");
    both.reserved = 0;
    pl_perceptual_destroy(combined);
    pl_outputs tv_parts;
    pl_outputs_init(&tv_parts);
    tv_parts.loss = &value;
    tv_parts.parts = parts;
    CHECK(pl_tv_loss(ctx, NULL, pred, PL_F32, N, C, H, W, &tv_parts) == PL_ERR_INVALID_ARGUMENT,
          "parts of a TV loss");

    /* Errors. */
    const int32_t deep[] = {3, 99}, too_deep[] = {22};
    pl_perceptual_config bad;
    pl_perceptual_config_init(&bad);
    bad.taps = deep;
    bad.num_taps = 2;
    pl_perceptual *nope = NULL;
    CHECK(pl_vgg_load(ctx, argv[1], NULL, &again) == PL_OK, "reload");
    CHECK(pl_perceptual_create(again, &bad, &nope) == PL_ERR_INVALID_ARGUMENT && nope == NULL, "tap 99");
    CHECK(strstr(pl_last_error(), "no layer \"99\"") != NULL, "the message names tap 99");
    bad.taps = too_deep;
    bad.num_taps = 1;
    CHECK(pl_perceptual_create(shallow, &bad, &nope) == PL_ERR_INVALID_ARGUMENT, "relu4_3 past depth 15");
    CHECK(strstr(pl_last_error(), "deeper than the loaded weights") != NULL, "message says why");
    bad.tap_names = names;
    CHECK(pl_perceptual_create(again, &bad, &nope) == PL_ERR_INVALID_ARGUMENT, "taps and names");
    pl_perceptual_config_init(&bad);
    bad.num_taps = 0;
    CHECK(pl_perceptual_create(again, &bad, &nope) == PL_ERR_INVALID_ARGUMENT, "no taps");
    pl_perceptual_config zeroed = {0};
    CHECK(pl_perceptual_create(again, &zeroed, &nope) == PL_ERR_INVALID_ARGUMENT, "a struct never initialised");
    CHECK(strstr(pl_last_error(), "struct_size is 0") != NULL, "message names struct_size");
    pl_perceptual_config counts;
    pl_perceptual_config_init(&counts);
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
    CHECK(pl_vgg_load(ctx, "/nonexistent.safetensors", NULL, &vgg) == PL_ERR_IO, "missing file");
    pl_vgg_options opts;
    pl_vgg_options_init(&opts);
    opts.arch = 7;
    CHECK(pl_vgg_load(ctx, argv[1], &opts, &vgg) == PL_ERR_INVALID_ARGUMENT, "bad arch");
    opts.arch = PL_VGG19;
    CHECK(pl_vgg_load(ctx, argv[1], &opts, &vgg) == PL_ERR_INVALID_WEIGHTS, "VGG16 file as VGG19");
    CHECK(strstr(pl_last_error(), "features.") != NULL, "message names the tensor");
    CHECK(pl_perceptual_loss(loss, pred, target, PL_F32, N, 2, H, W, &loss_only) == PL_ERR_INVALID_SHAPE, "2 channels");
    CHECK(pl_perceptual_loss(loss, pred, NULL, PL_F32, N, C, H, W, &loss_only) == PL_ERR_INVALID_ARGUMENT,
          "NULL target");
    CHECK(pl_perceptual_loss(NULL, pred, target, PL_F32, N, C, H, W, &loss_only) == PL_ERR_INVALID_ARGUMENT,
          "NULL loss handle");
    CHECK(strstr(pl_last_error(), "(a pl_perceptual handle) is NULL") != NULL, "message names the handle");
    out.grad = (void *)target;
    CHECK(pl_perceptual_loss(loss, pred, target, PL_F32, N, C, H, W, &out) == PL_ERR_INVALID_ARGUMENT,
          "grad aliases target");

    /* A kept target: the same loss as passing it, from a copy. */
    float explicit_value = -1.0f, kept_value = -2.0f;
    pl_outputs kept_out;
    pl_outputs_init(&kept_out);
    kept_out.loss = &explicit_value;
    CHECK(pl_perceptual_loss(loss, pred, target, PL_F32, N, C, H, W, &kept_out) == PL_OK, "explicit target");
    static float copy[COUNT];
    memcpy(copy, target, sizeof copy);
    CHECK(pl_perceptual_set_target(loss, copy, PL_F32, N, C, H, W) == PL_OK, "set_target");
    memset(copy, 0, sizeof copy); /* the library kept its own copy */
    kept_out.loss = &kept_value;
    CHECK(pl_perceptual_loss(loss, pred, NULL, PL_F32, N, C, H, W, &kept_out) == PL_OK, "kept target");
    CHECK(kept_value == explicit_value, "kept %g vs passed %g", kept_value, explicit_value);
    CHECK(pl_perceptual_loss(loss, pred, NULL, PL_F32, N, C, H, 8, &kept_out) == PL_ERR_INVALID_ARGUMENT,
          "a pred of another shape than the kept target");
    CHECK(pl_perceptual_clear_target(loss) == PL_OK, "clear_target");
    CHECK(pl_perceptual_loss(loss, pred, NULL, PL_F32, N, C, H, W, &kept_out) == PL_ERR_INVALID_ARGUMENT,
          "no kept target");
    CHECK(strstr(pl_last_error(), "no kept target") != NULL, "message says so");
    CHECK(pl_perceptual_set_target(loss, NULL, PL_F32, N, C, H, W) == PL_ERR_INVALID_ARGUMENT, "NULL to keep");

    /* LPIPS with the embedded v0.1 weights, on the full VGG16. */
    pl_lpips *lpips = NULL;
    CHECK(pl_lpips_create(again, NULL, &lpips) == PL_OK, "LPIPS with defaults");
    float distance = -1.0f;
    pl_outputs lp_out;
    pl_outputs_init(&lp_out);
    lp_out.loss = &value;
    lp_out.per_sample = &distance;
    CHECK(pl_lpips_loss(lpips, pred, target, PL_F32, N, C, H, W, &lp_out) == PL_OK, "LPIPS loss");
    CHECK(distance == value && distance > 0.0f, "one image: its distance %g is the mean %g", distance, value);
    printf("lpips %.9g\n", value);
    float kept_distance = -1.0f;
    lp_out.per_sample = &kept_distance;
    CHECK(pl_lpips_set_target(lpips, target, PL_F32, N, C, H, W) == PL_OK, "LPIPS set_target");
    CHECK(pl_lpips_loss(lpips, pred, NULL, PL_F32, N, C, H, W, &lp_out) == PL_OK && kept_distance == distance,
          "LPIPS against its kept target");
    CHECK(pl_lpips_clear_target(lpips) == PL_OK, "LPIPS clear_target");
    static float lp_map[H * W];
    float lp_layers[5];
    CHECK(pl_lpips_spatial(lpips, pred, target, PL_F32, N, C, H, W, lp_map, lp_layers) == PL_OK, "LPIPS map");
    float layer_sum = 0.0f;
    for (int k = 0; k < 5; k++) layer_sum += lp_layers[k];
    CHECK(fabsf(layer_sum - distance) <= 1e-5f * distance, "per-layer values %g sum to the distance %g", layer_sum,
          distance);
    CHECK(pl_lpips_spatial(lpips, pred, target, PL_F32, N, C, H, W, NULL, NULL) == PL_ERR_INVALID_ARGUMENT,
          "a NULL map");
    pl_lpips *bad_lpips = NULL;
    CHECK(pl_lpips_create(shallow, NULL, &bad_lpips) == PL_ERR_INVALID_ARGUMENT && bad_lpips == NULL,
          "LPIPS on weights to relu3_3");
    CHECK(strstr(pl_last_error(), "deeper than the loaded weights") != NULL, "message says why");
    pl_lpips_config lp_cfg;
    CHECK(pl_lpips_config_init(&lp_cfg) == PL_OK && lp_cfg.lin == 1 && lp_cfg.weight == 1.0f, "LPIPS config init");
    lp_cfg.lin_weights_path = "/nonexistent/lin.safetensors";
    CHECK(pl_lpips_create(again, &lp_cfg, &bad_lpips) == PL_ERR_IO, "a missing lin weights file");
    lp_cfg.lin = 0;
    CHECK(pl_lpips_create(again, &lp_cfg, &bad_lpips) == PL_ERR_INVALID_ARGUMENT, "lin 0 with a file");
    CHECK(pl_lpips_loss(lpips, pred, target, PL_F32, N, C, 8, 8, &lp_out) == PL_ERR_INVALID_SHAPE, "8x8 for relu5_3");
    pl_lpips_destroy(lpips);
    pl_lpips_destroy(NULL);

    pl_perceptual_destroy(named);
    pl_perceptual_destroy(loss);
    pl_perceptual_destroy(NULL);
    pl_vgg_destroy(again);
    pl_vgg_destroy(shallow);
    pl_context_destroy(ctx);
    return failures ? 1 : 0;
}
