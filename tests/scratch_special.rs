//! scratch
use smoothce::{reference, Backend, CrossEntropy, Smoothing};
#[test]
fn scratch() {
    let mut seed = 777_u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f64 / (1u64 << 24) as f64) as f32
    };
    let specials = [
        f32::NEG_INFINITY,
        f32::NAN,
        f32::INFINITY,
        3e38,
        -3e38,
        1e-40,
        -1e-40,
        f32::MAX,
        f32::MIN,
    ];
    for &k in &[1usize, 2, 5, 16, 17, 40, 100, 5000, 300000] {
        for trial in 0..40 {
            let mut z: Vec<f32> = (0..k).map(|_| (rnd() * 2.0 - 1.0) * 10.0).collect();
            let nspecial = trial % 4;
            for _ in 0..nspecial {
                let i = (rnd() * k as f32) as usize % k;
                z[i] = specials[(rnd() * specials.len() as f32) as usize % specials.len()];
            }
            if trial == 39 {
                z.iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
            }
            if trial == 38 {
                z.iter_mut()
                    .for_each(|v| *v = if rnd() < 0.5 { 3e38 } else { -3e38 });
            }
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
                    let ctx = format!(
                        "k {k} trial {trial} {sm:?} {b:?} y {y} z_y {}",
                        z[y as usize]
                    );
                    assert!(
                        reference::agrees(l[0], want, 2e-6),
                        "{ctx} loss {} want {want}",
                        l[0]
                    );
                    assert!(
                        reference::agrees(l2[0], want, 2e-6),
                        "{ctx} fwd loss {} want {want}",
                        l2[0]
                    );
                    assert_eq!(l[0].to_bits(), l3[0].to_bits(), "{ctx}");
                    for i in 0..k {
                        assert!(
                            reference::agrees(g[i], rg[i], 2e-6)
                                || (g[i] as f64 - rg[i]).abs() <= 2e-6,
                            "{ctx} i {i} g {} want {}",
                            g[i],
                            rg[i]
                        );
                        assert_eq!(g[i].to_bits(), zi[i].to_bits(), "{ctx} i {i}");
                    }
                }
            }
        }
    }
}
