//! Timing helpers shared by the benchmarks.

use perceptual_loss::cudarc::driver::sys::CUevent_flags;
use perceptual_loss::Device;

/// The middle value.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median milliseconds of `op` over `reps` CUDA-event-timed runs on
/// `dev`'s stream, after five warm-up runs.
pub fn time_gpu(dev: &Device, reps: usize, mut op: impl FnMut()) -> f64 {
    let st = dev.cuda_stream().expect("a CUDA device");
    for _ in 0..5 {
        op();
    }
    let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let samples = (0..reps)
        .map(|_| {
            let start = st.record_event(timing).unwrap();
            op();
            let end = st.record_event(timing).unwrap();
            end.synchronize().unwrap();
            start.elapsed_ms(&end).unwrap() as f64
        })
        .collect();
    median(samples)
}
