//! Any options, dtype and alignment for `pl_tv_loss` on the CPU, with
//! dimensions that are small (the buffer holds them) or impossible
//! (negative, or a size past any address space, which the library must
//! refuse before reading): a status comes back, never a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use perceptual_loss::ffi::*;

fuzz_target!(|data: &[u8]| {
    if data.len() < 48 {
        return;
    }
    let word = |i: usize| i64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().unwrap());
    // Small (0 to 8), or impossible: negative, or at least 2^57.
    let dim = |i: usize| match word(i) & 3 {
        0 | 1 => (word(i) >> 2).rem_euclid(9),
        2 => -(word(i) >> 2).abs() - 1,
        _ => (1 << 57) + (word(i) >> 2).rem_euclid(1 << 20),
    };
    let (n, c, h, w) = (dim(0), dim(1), dim(2), dim(3));
    let extra = word(4);
    let buffer = vec![0.5f32; 4096];
    let offset = (extra & 3) as usize; // sometimes misaligned
    unsafe {
        let mut ctx = std::ptr::null_mut();
        assert_eq!(pl_context_create(PL_DEVICE_CPU, 0, std::ptr::null_mut(), &mut ctx), PL_OK);
        let mut config = std::mem::zeroed();
        pl_tv_config_init(&mut config);
        config.variant = ((extra >> 2) % 6) as i32;
        config.reduction = ((extra >> 5) % 3) as i32;
        config.weight = f32::from_bits((word(5) & 0xffff_ffff) as u32);
        let mut loss = 0f32;
        let mut out = std::mem::zeroed();
        pl_outputs_init(&mut out);
        out.loss = &mut loss;
        let x = buffer.as_ptr().cast::<u8>().add(offset).cast();
        let fits = [n, c, h, w].iter().all(|d| (1..=8).contains(d));
        let dtype = ((extra >> 7) % 4) as i32;
        let st = pl_tv_loss(ctx, &config, x, dtype, n, c, h, w, &out);
        assert!(fits || st != PL_OK, "impossible dimensions accepted: {n} {c} {h} {w}");
        assert_ne!(st, PL_ERR_PANIC);
        pl_context_destroy(ctx);
    }
});
