//! scratch
use smoothce::{reference, Backend, CrossEntropy, Smoothing};
#[test]
fn scratch() {
    let mut seed = 12345_u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f64 / (1u64 << 24) as f64) as f32
    };
    for &k in &[
        1usize, 2, 3, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 100, 1000, 4095, 4096, 4097, 10000,
        65537, 262144, 300000,
    ] {
        for &off in &[0.0f32, 1e4, -1e4, 3e3] {
            let z: Vec<f32> = (0..k).map(|_| off + (rnd() * 2.0 - 1.0) * 100.0).collect();
            let y = (rnd() * k as f32) as u32 % k as u32;
            for sm in [
                Smoothing::Uniform(0.1),
                Smoothing::OffTarget(0.3),
                Smoothing::Uniform(0.0),
                Smoothing::Uniform(1.0),
            ] {
                if k < 2 && matches!(sm, Smoothing::OffTarget(_)) {
                    continue;
                }
                let mut rg = vec![0.0f64; k];
                let want = reference::row(&z, y as usize, sm, Some(&mut rg)).unwrap();
                for b in [Backend::Portable, Backend::Avx2, Backend::Avx512] {
                    let ce = CrossEntropy::new(k)
                        .smoothing(sm)
                        .backend(b)
                        .reduction(smoothce::Reduction::Sum);
                    let mut l = [0.0f32];
                    let mut g = vec![0.0f32; k];
                    ce.forward_backward(&z, &[y], &mut l, &mut g).unwrap();
                    let mut l2 = [0.0f32];
                    ce.forward(&z, &[y], &mut l2).unwrap();
                    let mut zi = z.clone();
                    let mut l3 = [0.0f32];
                    ce.forward_backward_in_place(&mut zi, &[y], &mut l3)
                        .unwrap();
                    assert!(
                        reference::agrees(l[0], want, 2e-6),
                        "k {k} off {off} {sm:?} {b:?} loss {} want {want}",
                        l[0]
                    );
                    assert!(
                        reference::agrees(l2[0], want, 2e-6),
                        "fwd k {k} off {off} {sm:?} {b:?} loss {} want {want}",
                        l2[0]
                    );
                    assert_eq!(l[0].to_bits(), l3[0].to_bits());
                    let mut worst = 0.0f64;
                    for i in 0..k {
                        worst = worst.max((g[i] as f64 - rg[i]).abs());
                        assert_eq!(g[i].to_bits(), zi[i].to_bits());
                    }
                    assert!(
                        worst <= 2e-6,
                        "k {k} off {off} {sm:?} {b:?} grad err {worst}"
                    );
                }
            }
        }
    }
}
