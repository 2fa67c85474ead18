//! Any bytes as a weights file: the load succeeds or returns an error;
//! it never panics, crashes or aborts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use perceptual_loss::{Device, Error, Vgg, VggOptions, WeightsSource};

fuzz_target!(|data: &[u8]| {
    match Vgg::load_with(&Device::cpu(), WeightsSource::Bytes(data), VggOptions::default()) {
        Ok(vgg) => assert!(vgg.depth() <= 30),
        Err(e) => assert!(matches!(e, Error::InvalidWeights(_) | Error::OutOfMemory(_)), "{e}"),
    }
});
