/*
 * A complete C program using perceptual-loss: loads VGG16 weights, creates
 * a perceptual loss and a TV loss, and computes both with their gradients
 * on generated images, checking every status.
 *
 *   cargo build --release
 *   make -C examples/c
 *   examples/c/perceptual_demo [vgg16.safetensors] [cpu|cuda]
 *
 * Without a weights file it writes seeded stand-in weights first (real runs
 * use weights exported with scripts/export_vgg.py). On "cuda" the buffers
 * must be device memory: this demo allocates host memory, so it runs on the
 * CPU backend; see the README for the CUDA calling convention.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "perceptual_loss.h"

#define N 2
#define C 3
#define H 64
#define W 64
#define COUNT (N * C * H * W)

/* Prints the library's message and exits when a call fails. */
static void check(pl_status status, const char *what) {
    if (status != PL_OK) {
        fprintf(stderr, "%s failed (status %d): %s\n", what, status, pl_last_error());
        exit(1);
    }
}

static double norm(const float *v, int count) {
    double s = 0.0;
    for (int i = 0; i < count; i++) s += (double)v[i] * v[i];
    return sqrt(s);
}

int main(int argc, char **argv) {
    const char *weights = argc > 1 ? argv[1] : "seeded-vgg16.safetensors";
    if (argc <= 1) {
        check(pl_seeded_weights_write(weights, PL_VGG16, 0), "pl_seeded_weights_write");
        printf("using seeded stand-in weights (%s); pass a torchvision export for real use\n", weights);
    }
    printf("perceptual-loss %s (C ABI %u)\n", pl_version(), pl_abi_version());
    if (pl_abi_version() != PL_ABI_VERSION) {
        fprintf(stderr, "built against C ABI %u, but the library implements %u\n", PL_ABI_VERSION, pl_abi_version());
        return 1;
    }

    pl_context *ctx = NULL;
    check(pl_context_create(PL_DEVICE_CPU, 0, NULL, &ctx), "pl_context_create");
    pl_vgg_options load;
    check(pl_vgg_options_init(&load), "pl_vgg_options_init"); /* VGG16, f32, the whole network */
    load.depth = 22;                                           /* relu4_3: all the taps below need */
    pl_vgg *vgg = NULL;
    check(pl_vgg_load(ctx, weights, &load, &vgg), "pl_vgg_load");

    /* The article's configuration, spelled out: relu1_2 .. relu4_3, MSE. */
    const char *taps[] = {"relu1_2", "relu2_2", "relu3_3", "relu4_3"};
    pl_perceptual_config config;
    check(pl_perceptual_config_init(&config), "pl_perceptual_config_init");
    config.taps = NULL;
    config.tap_names = taps;
    config.num_taps = 4;
    config.criterion = PL_MSE;
    pl_perceptual *perceptual = NULL;
    check(pl_perceptual_create(vgg, &config, &perceptual), "pl_perceptual_create");
    pl_vgg_destroy(vgg); /* the loss keeps the weights */

    /* A smooth target and a noisy prediction of it. */
    static float pred[COUNT], target[COUNT], grad_p[COUNT], grad_tv[COUNT], grad_sum[COUNT];
    unsigned state = 12345u;
    for (int i = 0; i < COUNT; i++) {
        int x = i % W, y = (i / W) % H, c = (i / (W * H)) % C;
        target[i] = 0.5f + 0.4f * sinf(0.1f * (float)x + 0.07f * (float)y + (float)c);
        state = state * 1664525u + 1013904223u;
        pred[i] = target[i] + ((float)(state >> 8) / 16777216.0f - 0.5f) * 0.2f;
    }

    float perceptual_value = 0.0f, per_image[N], tv_value = 0.0f;
    pl_outputs out;
    check(pl_outputs_init(&out), "pl_outputs_init");
    out.loss = &perceptual_value;
    out.grad = grad_p;
    out.per_sample = per_image;
    check(pl_perceptual_loss(perceptual, pred, target, PL_F32, N, C, H, W, &out), "pl_perceptual_loss");

    /* The TV regulariser, its gradient added to the perceptual one
     * (grad = 1 * grad + dL/dx): what a training step back-propagates. */
    pl_tv_config tv;
    check(pl_tv_config_init(&tv), "pl_tv_config_init");
    tv.weight = 1e-2f;
    pl_outputs tv_out;
    check(pl_outputs_init(&tv_out), "pl_outputs_init");
    tv_out.loss = &tv_value;
    tv_out.grad = grad_tv;
    check(pl_tv_loss(ctx, &tv, pred, PL_F32, N, C, H, W, &tv_out), "pl_tv_loss");
    for (int i = 0; i < COUNT; i++) grad_sum[i] = grad_p[i];
    tv_out.grad = grad_sum;
    tv_out.beta = 1.0f;
    check(pl_tv_loss(ctx, &tv, pred, PL_F32, N, C, H, W, &tv_out), "pl_tv_loss (accumulating)");
    check(pl_context_synchronize(ctx), "pl_context_synchronize");
    printf("perceptual loss %.6g, |grad| %.6g, per image %.6g %.6g\n", perceptual_value, norm(grad_p, COUNT),
           per_image[0], per_image[1]);
    printf("tv loss         %.6g, |grad| %.6g\n", tv_value, norm(grad_tv, COUNT));
    printf("|perceptual grad + tv grad| %.6g\n", norm(grad_sum, COUNT));

    /* Errors are statuses with a message, never crashes. */
    pl_status bad = pl_tv_loss(ctx, NULL, pred, PL_F32, N, C, 1, W, &tv_out);
    printf("a 1-pixel-high image is refused: status %d, \"%s\"\n", bad, pl_last_error());

    pl_perceptual_destroy(perceptual);
    pl_context_destroy(ctx);
    return bad == PL_ERR_INVALID_SHAPE ? 0 : 1;
}
